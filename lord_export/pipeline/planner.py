"""The planner: from a dense model and its calibration statistics to a :class:`~lord_export.plan.Plan`.

Three steps per group of layers that read the same input:

1. :func:`build_groups` partitions the targeted layers (shared input + same parent module);
2. :func:`describe_group` fixes the structure: members, stacked shape, rank from the config, and
   whether factorizing saves parameters (parity) — no tensor math yet;
3. :func:`factorize_group` computes the factors in closed form (:mod:`lord_export.factorize`)
   from the group's input statistics and fills in its error against the closed-form bound.

:func:`make_plan` runs the three over a whole model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import factorize as fz
from .calibrate import Calibration, InputStats
from .config import LordConfig
from .errors import PlanError
from .fingerprint import describe_model
from .plan import Group, Member, Plan
from .targets import dense_weight, find_linears, linear_info, pattern_matches

log = logging.getLogger(__name__)


def parent_of(name: str) -> str:
    """The qualified name of the module that holds layer ``name`` ('' for a top-level layer)."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def build_groups(layers: list[str], input_of: Mapping[str, str], grouping: bool) -> list[list[str]]:
    """Partition ``layers`` into groups that read the same tensor and live under the same parent.

    ``input_of`` maps each layer to the key of the input it read (from the calibration hooks, not
    guessed from names); requiring a common parent keeps, e.g., cross-attention k/v projections of
    different decoder layers (which all read the encoder output) in separate groups.
    """
    if not grouping:
        return [[n] for n in layers]
    groups: dict[tuple[str, str], list[str]] = {}
    for n in layers:
        groups.setdefault((input_of[n], parent_of(n)), []).append(n)
    return list(groups.values())


def override_for(group: Group, overrides: Mapping[str, Any]) -> Any:
    """The first ``overrides`` value (a rank reduction or ``"dense"``) whose pattern matches a member."""
    for pattern, value in overrides.items():
        if any(pattern_matches(pattern, m.name) for m in group.members):
            return value
    return None


def describe_group(
    modules: Mapping[str, nn.Module],
    names: list[str],
    config: LordConfig,
    tokens: int = 0,
    *,
    ranks: Mapping[str, int | None] | None = None,
    prefix: str = "",
) -> Group:
    """The group of layers ``names`` with its rank and its parity decision.

    The rank comes from ``ranks`` (an allocation, keyed by the group's full name — ``prefix`` is
    the name of the block the layer names are relative to; None there means "leave dense"), else
    from a matching ``config.overrides`` entry, else from ``config.rank_reduction``.
    """
    infos = [linear_info(n, modules[n]) for n in names]
    d_in = infos[0].d_in
    members, row = [], 0
    for info in infos:
        members.append(Member(info.name, info.d_in, info.d_out, info.transposed, info.has_bias, row, row + info.d_out))
        row += info.d_out
    d_out = row
    group = Group(
        parent=parent_of(names[0]),
        members=members,
        d_in=d_in,
        d_out=d_out,
        rank=0,
        full_rank=fz.full_rank(d_out, d_in),
        parity_rank=fz.parity_rank(d_out, d_in),
        factorized=True,
        calibration_tokens=tokens,
    )
    full_name = group.renamed(prefix).name if prefix else group.name
    override = override_for(group.renamed(prefix) if prefix else group, config.overrides)
    if ranks is not None and full_name in ranks and override is None:
        if ranks[full_name] is None:
            return _dense(group, "left dense by the allocation")
        group.rank = ranks[full_name]
    elif override == "dense":
        return _dense(group, "left dense by an override")
    else:
        rr = config.rank_reduction if override is None else override
        if rr is None:  # a parameter budget without an allocated rank for this group (the survey's view)
            return _dense(group, "no rank allocated")
        group.rank = fz.rank_for(d_out, d_in, rr, config.rank_multiple)
    if group.factor_params >= group.dense_params and not config.force:
        return _dense(
            group,
            f"rank {group.rank} is not below the parity rank {group.parity_rank:.1f}: factors would hold "
            f"{group.factor_params} parameters vs {group.dense_params} dense (raise the rank reduction or use force)",
        )
    return group


def _dense(group: Group, reason: str) -> Group:
    group.factorized = False
    group.reason = reason
    group.rank = group.rank or group.full_rank
    log.info("%s left dense: %s", group.name, reason)
    return group


def stacked_weight(modules: Mapping[str, nn.Module], group: Group) -> torch.Tensor:
    """The members' weights stacked row-wise in (d_out, d_in) orientation, float64."""
    return torch.cat([dense_weight(modules[m.name]).double() for m in group.members], dim=0)


def factorize_group(
    modules: Mapping[str, nn.Module], group: Group, stats: InputStats, method: str, cache: dict | None = None
) -> dict[str, torch.Tensor]:
    """Factor tensors of ``group`` (state-dict names → tensors in the layers' dtype); fills its errors.

    ``cache`` (any dict, shared across calls) keeps each group's rank-independent decomposition,
    so factorizing the same statistics at several ranks decomposes once.
    """
    W, C, f, A, B = _factors(modules, group, stats, method, group.rank, cache)
    group.relative_error = fz.relative_error(W, A, B, C, total=float(f.spectrum.sum()))
    group.optimal_relative_error = fz.optimal_relative_error(f.spectrum, group.rank)
    return group_tensors(modules, group, A, B)


def _factors(
    modules: Mapping[str, nn.Module], group: Group, stats: InputStats, method: str, rank: int, cache: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor, fz.Factors, torch.Tensor, torch.Tensor]:
    """(W, C, float64 factors, A and B in the layers' dtype) of ``group`` at ``rank``."""
    weight = modules[group.members[0].name].weight
    W = stacked_weight(modules, group)
    C = stats.C.to(W.device)
    if method == "lord":
        key = (group.name, "lord")
        if cache is not None and key not in cache:
            cache[key] = fz.output_spectrum(W, C)
        f = fz.lord(W, C, rank, decomposition=cache.get(key) if cache is not None else None)
    elif method == "svd":
        f = fz.svd(W, rank, C)
    else:
        f = fz.asvd(W, stats.mean_abs.to(W.device), rank, C)
    return W, C, f, f.A.to(weight.dtype), f.B.to(weight.dtype)


@dataclass
class KeptFactors:
    """A group's factors at the largest rank it may still be given, to be truncated later.

    Every method orders its factors by importance (eigen/singular vectors, largest first), so the
    factors at a smaller rank r are the first r columns of ``A`` and rows of ``B``; ``errors[r − 1]``
    is the relative output error of that truncation (in the layers' dtype, as stored) and
    ``spectrum`` gives its closed-form bound.
    """

    A: torch.Tensor  # (d_out, R), the layers' dtype
    B: torch.Tensor  # (R, d_in)
    errors: torch.Tensor  # (R,) float64
    spectrum: torch.Tensor  # output spectrum, float64

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"A": self.A, "B": self.B, "errors": self.errors, "spectrum": self.spectrum}


def keep_factors(
    modules: Mapping[str, nn.Module], group: Group, stats: InputStats, method: str, rank: int
) -> KeptFactors:
    """``group``'s factors at ``rank`` with the error of every truncation (:class:`KeptFactors`)."""
    W, C, f, A, B = _factors(modules, group, stats, method, rank)
    errors = fz.relative_errors_by_rank(W, A, B, C, total=float(f.spectrum.sum()))
    return KeptFactors(A, B, errors, f.spectrum)


def truncated_group_tensors(
    modules: Mapping[str, nn.Module], group: Group, kept: KeptFactors
) -> dict[str, torch.Tensor]:
    """:func:`factorize_group`'s result at ``group.rank`` from factors kept at a larger rank."""
    r = group.rank
    if not 1 <= r <= kept.rank:
        raise PlanError(f"{group.name}: rank {r} is outside the kept factors' 1..{kept.rank}")
    group.relative_error = float(kept.errors[r - 1])
    group.optimal_relative_error = fz.optimal_relative_error(kept.spectrum, r)
    return group_tensors(modules, group, kept.A[:, :r], kept.B[:r])


def factorize_group_on_compressed(
    modules: Mapping[str, nn.Module],
    group: Group,
    G: InputStats,
    Cxx: InputStats,
    H: torch.Tensor,
    method: str,
    *,
    compensate: bool,
) -> dict[str, torch.Tensor]:
    """Factors of ``group`` when its input on the compressed path (X̂) differs from the dense path's (X).

    ``G`` holds X̂X̂ᵀ (and Σ|x̂| for ASVD), ``Cxx`` holds X Xᵀ, ``H`` = X X̂ᵀ. ``compensate=False``
    ("sequential") fits W on X̂ (LoRD with C = G); ``compensate=True`` fits the dense output W X
    from X̂ (LoRD of W_eff = W H G⁻¹ under G, :func:`lord_export.factorize.compensated_weight`).
    Fills ``relative_error``/``optimal_relative_error`` (the objective of the mode) and
    ``dense_output_error``/``dense_output_bound`` (‖W X − A B X̂‖ / ‖W X‖, and its minimum over
    rank-r factors, exact: :func:`lord_export.factorize.best_output_error`).
    """
    weight = modules[group.members[0].name].weight
    W = stacked_weight(modules, group)
    device = W.device
    Gm, Cm, Hm = G.C.to(device), Cxx.C.to(device), H.to(device)
    W_eff = fz.compensated_weight(W, Gm, Hm)
    target = W_eff if compensate else W
    if method == "lord":
        f = fz.lord(target, Gm, group.rank)
    elif method == "svd":
        f = fz.svd(target, group.rank, Gm)
    else:
        f = fz.asvd(target, G.mean_abs.to(device), group.rank, Gm)
    A = f.A.to(weight.dtype)
    B = f.B.to(weight.dtype)
    err, total = fz.output_error(W, A, B, Cm, Hm, Gm)
    best = fz.best_output_error(W, Gm, Hm, total, group.rank)
    group.dense_output_error = math.sqrt(err / total) if total > 0 else 0.0
    group.dense_output_bound = math.sqrt(best / total) if total > 0 else 0.0
    if compensate:
        group.relative_error, group.optimal_relative_error = group.dense_output_error, group.dense_output_bound
    else:
        group.relative_error = fz.relative_error(W, A, B, Gm, total=float(f.spectrum.sum()))
        group.optimal_relative_error = fz.optimal_relative_error(f.spectrum, group.rank)
    return group_tensors(modules, group, A, B)


def group_tensors(
    modules: Mapping[str, nn.Module], group: Group, A: torch.Tensor, B: torch.Tensor
) -> dict[str, torch.Tensor]:
    """State-dict entries of a factorized group: its bottleneck B, each member's rows of A and bias."""
    tensors = {f"{group.bottleneck_name}.weight": B.contiguous()}
    for m in group.members:
        tensors[f"{m.name}.weight"] = A[m.row_start : m.row_end].contiguous()
        bias = getattr(modules[m.name], "bias", None)
        if bias is not None:
            tensors[f"{m.name}.bias"] = bias.detach().clone()
    return tensors


def make_plan(
    model: nn.Module,
    calibration: Calibration,
    layers: list[str],
    config: LordConfig,
    *,
    progress: bool = False,
    cache: dict | None = None,
    ranks: Mapping[str, int | None] | None = None,
    base_model: dict[str, Any] | None = None,
) -> Plan:
    """Factorize every group of ``layers`` with ``config.method`` and return the plan with factors.

    ``cache``: see :func:`factorize_group` (for several plans from one calibration). ``base_model``:
    the dense model's :func:`describe_model`, when the caller took it already (it reads every weight).
    """
    modules = dict(model.named_modules())
    linears = find_linears(model)
    unknown = [n for n in layers if n not in linears]
    if unknown:
        raise PlanError(f"layers {unknown[:5]} are not linear layers of this model")
    member_groups = build_groups(layers, calibration.input_of, config.grouping)
    it: Any = member_groups
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(member_groups, desc="factorize", unit="group")
    groups: list[Group] = []
    tensors: dict[str, torch.Tensor] = {}
    for names in it:
        stats = calibration.of(names[0])
        group = describe_group(modules, names, config, tokens=stats.tokens, ranks=ranks)
        if group.factorized:
            tensors.update(factorize_group(modules, group, stats, config.method, cache))
        groups.append(group)
    warnings = list(calibration.warnings)
    return Plan(
        config=config, groups=groups, warnings=warnings, base_model=base_model or describe_model(model), tensors=tensors
    )
