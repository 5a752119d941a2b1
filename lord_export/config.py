"""``LordConfig``: every knob of a compression, validated, and round-tripped through JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import UsageError
from .factorize import METHODS


@dataclass
class LordConfig:
    """What to compress and how. Field help is in ``metadata["help"]`` (the CLI shows it)."""

    rank_reduction: float = field(
        default=0.3,
        metadata={
            "help": "fraction of each group's full rank min(sum d_out, d_in) removed, in [0, 1); "
            "the kept rank is round((1 - R) * full rank)"
        },
    )
    method: str = field(
        default="lord",
        metadata={"help": "lord (activation-aware, optimal), svd (weight-only baseline), asvd (activation-scaled SVD)"},
    )
    targets: tuple[str, ...] = field(
        default=("all",),
        metadata={"help": "presets (all, attention, mlp, mlp-down), layer names/suffixes, or 're:<regex>'"},
    )
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "patterns removed from the targets"})
    grouping: bool = field(
        default=True,
        metadata={"help": "share one bottleneck among layers that read the same input (q/k/v, gate/up)"},
    )
    rank_multiple: int = field(
        default=1, metadata={"help": "round each rank to a multiple of this (e.g. 8 or 64 for tensor cores)"}
    )
    force: bool = field(
        default=False,
        metadata={"help": "factorize groups even when that does not reduce parameters (at or above parity)"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        if isinstance(self.exclude, str):
            self.exclude = (self.exclude,)
        self.targets = tuple(self.targets)
        self.exclude = tuple(self.exclude)
        try:
            r = float(self.rank_reduction)
        except (TypeError, ValueError):
            raise UsageError(f"rank reduction must be a number in [0, 1), got {self.rank_reduction!r}") from None
        if not 0.0 <= r < 1.0:
            raise UsageError(f"rank reduction must be in [0, 1), got {self.rank_reduction!r}")
        self.rank_reduction = r
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.targets:
            raise UsageError("targets must name at least one preset or layer")
        if int(self.rank_multiple) < 1:
            raise UsageError(f"rank multiple must be >= 1, got {self.rank_multiple!r}")
        self.rank_multiple = int(self.rank_multiple)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        d["exclude"] = list(self.exclude)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LordConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
