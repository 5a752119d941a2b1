"""``LordConfig``: every knob of a compression, validated, and round-tripped through JSON."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .core.allocate import ALLOCATIONS, DEFAULT_ALLOCATION  # noqa: E402
from .core.factorize import METHODS
from .errors import UsageError

CALIBRATION_MODES = ("independent", "sequential", "compensating")
REFINE_MODES = ("auto", "none", "block")
#: The default refinement, chosen from the measurements in benchmarks/RESULTS.md ("Quality per recipe
#: stage"): block refinement takes SmolLM2's increase at the 0.9 / 0.8 / 0.7 budgets from +7.0 / +26.9 /
#: +57.8% (the closed-form recipe) to +6.9 / +21.6 / +40.3% (0.3.4), for ~3-4x the closed form's time on a
#: CPU; at 0.9 it gains little there (most of each block's error is inherited from the blocks before).
DEFAULT_REFINE = "auto"
OUTPUT_WEIGHTINGS = ("fisher", "none")
#: shared: one bottleneck per group of layers reading the same input; separate: every layer on its own;
#: auto: the allocation chooses per group (parameter budgets; shared with a rank reduction).
GROUPINGS = ("auto", "shared", "separate")
#: How the experts of a mixture-of-experts layer are factorized (see ``LordConfig.expert_basis``).
EXPERT_BASES = ("per-expert", "shared")
#: The default grouping, chosen from the measurements in benchmarks/RESULTS.md.
DEFAULT_GROUPING = "auto"
#: The default calibration mode, chosen from the measurements in benchmarks/RESULTS.md.
DEFAULT_CALIBRATION = "independent"


def check_rank_reduction(value: Any) -> float:
    """``value`` as a rank reduction: a number in [0, 1) (the fraction of the full rank removed)."""
    try:
        r = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"rank reduction must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= r < 1.0:
        raise UsageError(f"rank reduction must be in [0, 1), got {value!r}")
    return r


def check_param_ratio(value: Any) -> float:
    """``value`` as a parameter ratio: the fraction of the whole model's parameters kept, in (0, 1]."""
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"parameter ratio must be a number in (0, 1], got {value!r}") from None
    if not 0.0 < p <= 1.0:
        raise UsageError(f"parameter ratio must be in (0, 1], got {value!r}")
    return p


def check_ppl_increase(value: Any) -> float:
    """``value`` as a perplexity increase bound: a number > 0 (0.05 is +5%)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UsageError(f"the perplexity increase bound must be a number > 0, got {value!r}") from None
    if not x > 0 or not x < 100:
        raise UsageError(f"the perplexity increase bound must be > 0 (0.05 is +5%), got {value!r}")
    return x


def _check_override(pattern: Any, value: Any) -> float | str:
    if value == "dense":
        return "dense"
    try:
        return check_rank_reduction(value)
    except UsageError:
        raise UsageError(
            f"override {pattern!r}: expected a rank reduction in [0, 1) or 'dense', got {value!r}"
        ) from None


def parse_override(text: str) -> tuple[str, float | str]:
    """``"re:.*o_proj$=0.6"`` or ``"down_proj=dense"`` → (pattern, value)."""
    pattern, sep, value = str(text).rpartition("=")
    if not sep or not pattern:
        raise UsageError(f"an override is PATTERN=VALUE (a rank reduction or 'dense'), got {text!r}")
    return pattern, _check_override(pattern, value.strip() if value.strip() == "dense" else value)


def parse_rank_reductions(text: str) -> list[float]:
    """Comma-separated rank reductions (``"0.3,0.5"``), each checked by :func:`check_rank_reduction`."""
    parts = [x.strip() for x in str(text).split(",") if x.strip()]
    if not parts:
        raise UsageError(f"expected comma-separated rank reductions, got {text!r}")
    return [check_rank_reduction(x) for x in parts]


def check_known_keys(given: Iterable[str], known: Iterable[str], what: str) -> None:
    """UsageError naming every key of ``given`` not in ``known``, with the valid names and a close match."""
    known = sorted(known)
    unknown = [k for k in given if k not in known]
    if not unknown:
        return
    hints = []
    for k in unknown:
        close = difflib.get_close_matches(k, known, n=1)
        hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise UsageError(f"unknown {what} {', '.join(hints)}; valid names: {', '.join(known)}")


@dataclass
class LordConfig:
    """What to compress and how. Field help is in ``metadata["help"]`` (the CLI shows it).

    Give ``rank_reduction`` or ``param_ratio``; with neither, the Python API uses rank reduction 0.3.
    """

    rank_reduction: float | None = field(
        default=None,
        metadata={
            "help": "fraction of each group's full rank min(sum d_out, d_in) removed, in [0, 1); "
            "the kept rank is round((1 - R) * full rank) (exclusive with param_ratio)"
        },
    )
    param_ratio: float | None = field(
        default=None,
        metadata={
            "help": "fraction of the WHOLE model's parameters kept, in (0, 1]; ranks per group are chosen by "
            "the allocation (exclusive with rank_reduction)"
        },
    )
    max_ppl_increase: float | None = field(
        default=None,
        metadata={
            "help": "compress to a quality target: the smallest whole-model parameter ratio whose held-out "
            "perplexity increase stays within this fraction (0.05: +5%), found by a bisection over ratios on the "
            "held-out calibration blocks (exclusive with rank_reduction and param_ratio)"
        },
    )
    allocation: str = field(
        default=DEFAULT_ALLOCATION,
        metadata={
            "help": f"how param_ratio is shared among groups: {', '.join(ALLOCATIONS)} (see lord_export.allocate)"
        },
    )
    overrides: dict = field(
        default_factory=dict,
        metadata={
            "help": "per-layer settings that win over rank_reduction and the allocation: {pattern: rank reduction or "
            "'dense'}; patterns as in targets (name, suffix, or 're:<regex>')"
        },
    )
    method: str = field(
        default="lord",
        metadata={"help": "lord (activation-aware, optimal), svd (weight-only baseline), asvd (activation-scaled SVD)"},
    )
    targets: tuple[str, ...] = field(
        default=("all",),
        metadata={"help": "presets (all, attention, mlp, mlp-down, experts), layer names/suffixes, or 're:<regex>'"},
    )
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "patterns removed from the targets"})
    grouping: str = field(
        default=DEFAULT_GROUPING,
        metadata={
            "help": "shared: one bottleneck among the layers that read the same input (q/k/v, gate/up); separate: "
            "every layer factorized on its own; auto: with a parameter budget the allocation chooses, per group, "
            "shared or separate by the predicted loss (with a rank reduction: shared)"
        },
    )
    expert_basis: str = field(
        default="per-expert",
        metadata={
            "help": "mixture-of-experts layers: per-expert (each expert's gate/up its own bottleneck, fitted to the "
            "tokens routed to it) or shared (one bottleneck for the gate/up of all experts of a layer, fitted to the "
            "union of their routed tokens, and one up-projection per expert: fewer parameters per rank)"
        },
    )
    rank_multiple: int = field(
        default=1, metadata={"help": "round each rank to a multiple of this (e.g. 8 or 64 for tensor cores)"}
    )
    force: bool = field(
        default=False,
        metadata={"help": "factorize groups even when that does not reduce parameters (at or above parity)"},
    )
    calibration: str = field(
        default=DEFAULT_CALIBRATION,
        metadata={
            "help": "independent: every layer fitted on the dense model's activations; sequential: on the "
            "activations of the model compressed so far; compensating: the dense output fitted from the "
            "compressed model's activations (see lord_export.engine). Measured: compensating is best from rank "
            "reduction 0.5 up, independent at lighter compression (benchmarks/RESULTS.md)"
        },
    )

    output_weighting: str = field(
        default="fisher",
        metadata={
            "help": "fisher: where the fisher allocation measures the LM loss's gradients, each group's closed form "
            "fits its outputs weighted by their per-feature Fisher (the directions the loss reacts to are kept "
            "first); none: every output direction counts the same"
        },
    )
    refine: str = field(
        default=DEFAULT_REFINE,
        metadata={
            "help": "block: after each block's closed form, fit its LoRD parameters so that the block fed the "
            "compressed model's activations reproduces the dense block's output (each token's error relative to its "
            "output, weighted per feature by the loss's Fisher with --output-weighting fisher; Adam, early-stopped "
            "on held-out calibration batches; see lord_export.pipeline.refine); none: the closed form alone; "
            "auto: block with a parameter budget or a quality target on a model processed block by block (the "
            "recipe), else none"
        },
    )
    refine_steps: int = field(default=64, metadata={"help": "at most this many refinement steps per block"})
    refine_lr: float = field(
        default=1e-3,
        metadata={"help": "the refinement's learning rate (Adam; a linear warmup over the first eighth of the steps)"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.targets = tuple(self.targets)
        self.exclude = tuple(self.exclude)
        sizes = [n for n in ("rank_reduction", "param_ratio", "max_ppl_increase") if getattr(self, n) is not None]
        if len(sizes) > 1:
            raise UsageError(f"give one of a rank reduction, a parameter ratio or a quality target, not {sizes}")
        if self.param_ratio is not None:
            self.param_ratio = check_param_ratio(self.param_ratio)
        elif self.max_ppl_increase is not None:
            self.max_ppl_increase = check_ppl_increase(self.max_ppl_increase)
        else:
            self.rank_reduction = check_rank_reduction(0.3 if self.rank_reduction is None else self.rank_reduction)
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"unknown allocation {self.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
        self.overrides = {str(k): _check_override(k, v) for k, v in dict(self.overrides or {}).items()}
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.targets:
            raise UsageError("targets must name at least one preset or layer")
        if self.calibration not in CALIBRATION_MODES:
            raise UsageError(
                f"unknown calibration mode {self.calibration!r}; choose one of {', '.join(CALIBRATION_MODES)}"
            )
        if self.output_weighting not in OUTPUT_WEIGHTINGS:
            raise UsageError(
                f"unknown output weighting {self.output_weighting!r}; choose one of {', '.join(OUTPUT_WEIGHTINGS)}"
            )
        if isinstance(self.grouping, bool):
            self.grouping = "shared" if self.grouping else "separate"
        if self.grouping not in GROUPINGS:
            raise UsageError(f"unknown grouping {self.grouping!r}; choose one of {', '.join(GROUPINGS)}")
        if self.expert_basis not in EXPERT_BASES:
            raise UsageError(f"unknown expert basis {self.expert_basis!r}; choose one of {', '.join(EXPERT_BASES)}")
        if self.expert_basis == "shared" and self.calibration != "independent":
            raise UsageError(
                f"a shared expert basis is fitted with independent calibration, not {self.calibration!r} "
                "(the routed statistics of all experts are pooled once per layer)"
            )
        if self.refine not in REFINE_MODES:
            raise UsageError(f"unknown refinement {self.refine!r}; choose one of {', '.join(REFINE_MODES)}")
        if int(self.refine_steps) < 1 or not float(self.refine_lr) > 0:
            raise UsageError(
                f"refinement needs steps >= 1 and a learning rate > 0, got {self.refine_steps}, {self.refine_lr}"
            )
        self.refine_steps, self.refine_lr = int(self.refine_steps), float(self.refine_lr)
        if int(self.rank_multiple) < 1:
            raise UsageError(f"rank multiple must be >= 1, got {self.rank_multiple!r}")
        self.rank_multiple = int(self.rank_multiple)

    @property
    def refines(self) -> bool:
        """Whether block refinement runs (``refine`` "block", or "auto" with a budget or a quality target)."""
        if self.refine == "auto":
            return self.param_ratio is not None or self.max_ppl_increase is not None
        return self.refine == "block"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["overrides"] = dict(self.overrides)
        d["targets"] = list(self.targets)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LordConfig:
        """A config from its JSON form; unknown keys are an error (they are usually typos)."""
        check_known_keys(d, (f.name for f in fields(cls)), "LordConfig field(s)")
        return cls(**d)

    def replace(self, **overrides: Any) -> LordConfig:
        """A copy with ``overrides`` applied and validated; unknown names are an error."""
        return LordConfig.from_dict({**self.to_dict(), **overrides})
