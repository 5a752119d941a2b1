"""The planner: from a model's layers and their input statistics to LoRD groups and factors.

Per group of layers that read the same input, three steps, each in one place:

1. :func:`build_groups` partitions the targeted layers (shared input + same parent module);
2. :func:`describe_group` fixes the structure: members, stacked shape, rank (from an allocation,
   an override or the rank reduction), and whether factorizing saves parameters (parity) — no
   tensor math yet;
3. a factor source computes the group's factor tensors: the closed form of the configured method
   (:func:`closed_form`, methods registered in :data:`lord_export.core.factorize.METHODS`), a
   truncation of factors kept at a larger rank (:func:`truncated`), or the error-compensating
   forms of staged calibration (:func:`factorize_group_on_compressed`).

:func:`compress_groups` is THE loop over groups — describe, factorize, swap into the module — that
every path uses (whole model, block by block, surveys' write pass, staged stages); :func:`make_plan`
runs it over a whole model without swapping. :func:`survey_groups` is the survey's per-group pass
(error curves and kept factors for the allocation), on the same groups and descriptions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration.statistics import Calibration, InputStats, pool_expert_inputs
from ..config import LordConfig
from ..core import factorize as fz
from ..core.allocate import GroupCurve
from ..core.apply import apply_group
from ..core.experts import is_expert_layer
from ..core.fingerprint import describe_model
from ..core.plan import Group, Member, Plan, common_parent, group_name
from ..core.targets import dense_weight, find_linears, linear_info, pattern_matches
from ..errors import PlanError

log = logging.getLogger(__name__)

#: A factor source: (the root's modules by name, a factorized group) → the group's state-dict tensors
#: (see :func:`group_tensors`); it fills the group's error fields.
FactorSource = Callable[[Mapping[str, nn.Module], Group], dict[str, torch.Tensor]]


def parent_of(name: str) -> str:
    """The qualified name of the module that holds layer ``name`` ('' for a top-level layer)."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def build_groups(layers: list[str], input_of: Mapping[str, str], grouping: bool | str) -> list[list[str]]:
    """Partition ``layers`` into groups that read the same tensor and live under the same parent
    (``grouping`` "separate" or False: one layer per group).

    ``input_of`` maps each layer to the key of the input it read (from the calibration hooks, not
    guessed from names); requiring a common parent keeps, e.g., cross-attention k/v projections of
    different decoder layers (which all read the encoder output) in separate groups.
    """
    if grouping in (False, "separate"):
        return [[n] for n in layers]
    groups: dict[tuple[str, str], list[str]] = {}
    for n in layers:
        groups.setdefault((input_of[n], group_parent(n, input_of[n])), []).append(n)
    return list(groups.values())


def shared_experts(calibration: Calibration, config: LordConfig) -> Calibration:
    """``calibration`` with the experts' gate/up inputs pooled when ``config.expert_basis`` is "shared"."""
    return pool_expert_inputs(calibration) if config.expert_basis == "shared" else calibration


def group_parent(layer: str, input_key: str) -> str:
    """Where ``layer``'s group lives: its parent, or the MoE block when it shares its input with
    another expert's layer (experts sharing one basis, :func:`pool_expert_inputs`)."""
    parent = parent_of(layer)
    if is_expert_layer(layer) and input_key.endswith(".*"):
        return parent_of(parent_of(parent))  # ….mlp.experts.<e> → ….mlp
    return parent


def group_home(names: list[str]) -> str:
    """The module a group's bottleneck is registered under: the members' common parent, or for experts
    sharing one basis the MoE block (not the experts list, whose children are the experts)."""
    home = common_parent(names)
    if len({parent_of(n) for n in names}) > 1 and all(is_expert_layer(n) for n in names):
        return parent_of(home) if home.endswith("experts") else home
    return home


def split_by(ranks: Mapping[str, int | None] | None, groups: Iterable[list[str]], prefix: str = "") -> list[list[str]]:
    """``groups`` with those the allocation split (``grouping="auto"``: the group's own name absent from
    ``ranks``, its members' present) replaced by their members, one group each."""
    out: list[list[str]] = []
    for names in groups:
        full = [f"{prefix}.{n}" if prefix else n for n in names]
        if ranks and len(names) > 1 and group_name(full) not in ranks and all(group_name([n]) in ranks for n in full):
            out.extend([n] for n in names)
        else:
            out.append(list(names))
    return out


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
        parent=group_home(names),
        members=members,
        d_in=d_in,
        d_out=d_out,
        rank=0,
        full_rank=fz.full_rank(d_out, d_in),
        parity_rank=fz.parity_rank(d_out, d_in),
        factorized=True,
        calibration_tokens=tokens,
    )
    full = group.renamed(prefix) if prefix else group
    override = override_for(full, config.overrides)
    if ranks is not None and full.name in ranks and override is None:
        if ranks[full.name] is None:
            return _dense(group, "left dense by the allocation")
        group.rank = ranks[full.name]
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


def group_tensors(
    modules: Mapping[str, nn.Module], group: Group, A: torch.Tensor, B: torch.Tensor
) -> dict[str, torch.Tensor]:
    """State-dict entries of a factorized group: its bottleneck B, each member's rows of A and bias,
    in the layers' dtype."""
    dtype = modules[group.members[0].name].weight.dtype
    tensors = {f"{group.bottleneck_name}.weight": B.to(dtype).contiguous()}
    for m in group.members:
        tensors[f"{m.name}.weight"] = A[m.row_start : m.row_end].to(dtype).contiguous()
        bias = getattr(modules[m.name], "bias", None)
        if bias is not None:
            tensors[f"{m.name}.bias"] = bias.detach().clone()
    return tensors


def compress_groups(
    root: nn.Module,
    groups: Iterable[list[str]],
    config: LordConfig,
    factors: FactorSource,
    *,
    tokens: Callable[[list[str]], int] = lambda names: 0,
    ranks: Mapping[str, int | None] | None = None,
    prefix: str = "",
    modules: Mapping[str, nn.Module] | None = None,
    swap: bool = True,
) -> tuple[list[Group], dict[str, torch.Tensor]]:
    """Every group from layer names to LoRD modules: describe it, compute its factors, swap them in.

    ``groups`` are lists of layer names relative to ``root`` (the model, or a block named
    ``prefix``); ``modules`` are the dense layers to read (default: ``root``'s own — staged
    calibration reads a dense copy of the block while it swaps into the block itself). Groups left
    dense (parity, an override, the allocation) are described and kept as they are. With ``swap``
    False nothing is swapped (the caller applies a plan later). Returns the groups (names relative
    to ``root``) and their factor tensors.
    """
    modules = dict(root.named_modules()) if modules is None else modules
    groups = split_by(ranks, groups, prefix)
    described: list[Group] = []
    tensors: dict[str, torch.Tensor] = {}
    for names in groups:
        group = describe_group(modules, names, config, tokens=tokens(names), ranks=ranks, prefix=prefix)
        if group.factorized:
            group_factors = factors(modules, group)
            if swap:
                apply_group(root, group, group_factors)
            tensors.update(group_factors)
        described.append(group)
    return described, tensors


# --------------------------------------------------------------------------------- factor sources
def closed_form(calibration: Calibration, method: str, cache: dict | None = None, fisher: Any = None) -> FactorSource:
    """Factors of the configured method from each group's input statistics in ``calibration``.

    ``cache`` (any dict, shared across calls on the same calibration) keeps each group's
    rank-independent decomposition by group name, so factorizing at several ranks decomposes once.
    ``fisher`` (an :class:`~lord_export.pipeline.sensitivity.OutputFisher` keyed like the layers)
    weights each group's outputs (:func:`output_weights`).
    """

    def source(modules: Mapping[str, nn.Module], group: Group) -> dict[str, torch.Tensor]:
        return factorize_group(modules, group, calibration.of(group.members[0].name), method, cache, fisher)

    return source


def output_weights(group: Group, fisher: Any) -> torch.Tensor | None:
    """The per-output-row weights w of ``group`` (None: unweighted). The closed form then fits
    diag(w) W - minimizing ‖diag(w)(W X − A B X)‖, where w² is the LM loss's per-feature Fisher
    (:class:`~lord_export.pipeline.sensitivity.OutputFisher`) - and stores A = diag(w)⁻¹ Ã: errors and
    spectra are in that weighted norm."""
    if fisher is None:
        return None
    return fisher.weights([m.name for m in group.members])


def weighted_weight(modules: Mapping[str, nn.Module], group: Group, fisher: Any) -> tuple[torch.Tensor, Any]:
    """(diag(w) W, w) of ``group`` (:func:`output_weights`; W itself and None when unweighted)."""
    W = stacked_weight(modules, group)
    w = output_weights(group, fisher)
    if w is not None:
        w = w.to(W.device, W.dtype)
        W = W * w[:, None]
    return W, w


def factorize_group(
    modules: Mapping[str, nn.Module],
    group: Group,
    stats: InputStats,
    method: str,
    cache: dict | None = None,
    fisher: Any = None,
) -> dict[str, torch.Tensor]:
    """Factor tensors of ``group`` at its rank (state-dict names → tensors in the layers' dtype); fills
    its errors (measured, and the closed-form bound)."""
    W, C, f, w = _factors(modules, group, stats, method, group.rank, cache, fisher)
    tensors = group_tensors(modules, group, f.A if w is None else f.A / w[:, None], f.B)
    A, B = _stored(tensors, group, w)
    group.relative_error = fz.relative_error(W, A, B, C, total=float(f.spectrum.sum()))
    group.optimal_relative_error = fz.optimal_relative_error(f.spectrum, group.rank)
    return tensors


def _stored(
    tensors: Mapping[str, torch.Tensor], group: Group, w: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) as stored (the layers' dtype), A weighted like the W it approximates: the factors whose
    error the report gives."""
    A = torch.cat([tensors[f"{m.name}.weight"] for m in group.members], dim=0)
    if w is not None:
        A = A.to(w.dtype) * w[:, None]
    return A, tensors[f"{group.bottleneck_name}.weight"]


def _factors(
    modules: Mapping[str, nn.Module],
    group: Group,
    stats: InputStats,
    method: str,
    rank: int,
    cache: dict | None = None,
    fisher: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, fz.Factors, torch.Tensor | None]:
    """(weighted W, C, float64 factors of it, the row weights or None) of ``group`` at ``rank``."""
    W, w = weighted_weight(modules, group, fisher)
    C = stats.C.to(W.device)
    decomposition = None
    if cache is not None:
        if group.name not in cache:
            cache[group.name] = fz.output_spectrum(W, C)
        decomposition = cache[group.name]
    f = fz.METHODS[method](W, C, stats.mean_abs.to(W.device), rank, decomposition=decomposition)
    return W, C, f, w


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
    modules: Mapping[str, nn.Module], group: Group, stats: InputStats, method: str, rank: int, fisher: Any = None
) -> KeptFactors:
    """``group``'s factors at ``rank`` with the error of every truncation (:class:`KeptFactors`)."""
    W, C, f, w = _factors(modules, group, stats, method, rank, fisher=fisher)
    dtype = modules[group.members[0].name].weight.dtype
    A, B = (f.A if w is None else f.A / w[:, None]).to(dtype), f.B.to(dtype)
    A_w = A if w is None else A.to(w.dtype) * w[:, None]
    errors = fz.relative_errors_by_rank(W, A_w, B, C, total=float(f.spectrum.sum()))
    return KeptFactors(A, B, errors, f.spectrum)


def truncated(kept: Mapping[str, KeptFactors]) -> FactorSource:
    """Factors cut from ``kept`` (group name relative to the root → factors at a larger rank): the
    same factors a calibration at the group's rank gives (:class:`KeptFactors`)."""

    def source(modules: Mapping[str, nn.Module], group: Group) -> dict[str, torch.Tensor]:
        factors = kept.get(group.name)
        if factors is None:
            raise PlanError(f"{group.name}: no factors were kept for rank {group.rank}")
        return truncated_group_tensors(modules, group, factors)

    return source


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
    fisher: Any = None,
) -> dict[str, torch.Tensor]:
    """Factors of ``group`` when its input on the compressed path (X̂) differs from the dense path's (X).

    ``G`` holds X̂X̂ᵀ (and Σ|x̂| for ASVD), ``Cxx`` holds X Xᵀ, ``H`` = X X̂ᵀ. ``compensate=False``
    ("sequential") fits W on X̂ (LoRD with C = G); ``compensate=True`` fits the dense output W X
    from X̂ (LoRD of W_eff = W H G⁻¹ under G, :func:`lord_export.core.factorize.compensated_weight`).
    Fills ``relative_error``/``optimal_relative_error`` (the objective of the mode) and
    ``dense_output_error``/``dense_output_bound`` (‖W X − A B X̂‖ / ‖W X‖, and its minimum over
    rank-r factors, exact: :func:`lord_export.core.factorize.best_output_error`).
    """
    W, w = weighted_weight(modules, group, fisher)
    device = W.device
    Gm, Cm, Hm = G.C.to(device), Cxx.C.to(device), H.to(device)
    target = fz.compensated_weight(W, Gm, Hm) if compensate else W
    f = fz.METHODS[method](target, Gm, G.mean_abs.to(device), group.rank)
    tensors = group_tensors(modules, group, f.A if w is None else f.A / w[:, None], f.B)
    A, B = _stored(tensors, group, w)
    err, total = fz.output_error(W, A, B, Cm, Hm, Gm)
    best = fz.best_output_error(W, Gm, Hm, total, group.rank)
    group.dense_output_error = math.sqrt(err / total) if total > 0 else 0.0
    group.dense_output_bound = math.sqrt(best / total) if total > 0 else 0.0
    if compensate:
        group.relative_error, group.optimal_relative_error = group.dense_output_error, group.dense_output_bound
    else:
        group.relative_error = fz.relative_error(W, A, B, Gm, total=float(f.spectrum.sum()))
        group.optimal_relative_error = fz.optimal_relative_error(f.spectrum, group.rank)
    return tensors


# ------------------------------------------------------------------------------ the survey's pass
@dataclass
class SurveyedGroups:
    """What the survey learns about one block's (or model's) groups (see :func:`survey_groups`)."""

    curves: list[GroupCurve] = field(default_factory=list)
    fixed: dict[str, int | None] = field(default_factory=dict)  # overridden groups' ranks (None: dense)
    fixed_removed: int = 0  # parameters the overridden groups remove
    members: dict[str, list[str]] = field(default_factory=dict)  # curve name → its layers (relative)
    kept: dict[str, KeptFactors] = field(default_factory=dict)  # relative group name → kept factors
    decompositions: dict[str, tuple] = field(default_factory=dict)  # full group name → output_spectrum


def survey_groups(
    modules: Mapping[str, nn.Module],
    groups: Iterable[list[str]],
    calibration: Calibration,
    config: LordConfig,
    *,
    prefix: str = "",
    keep: bool = False,
    decompose: bool = False,
    fisher: Any = None,
) -> SurveyedGroups:
    """The allocation's view of each group: its error curve (the output spectrum), or its fixed rank
    when an override names it.

    With ``keep`` each group is also factorized at the largest rank any allocation can give it (its
    override's rank for a fixed group), so that a later pass only truncates (:func:`truncated`); with
    ``decompose`` the full eigendecomposition is kept for a later :func:`closed_form` (in memory).
    Otherwise only eigenvalues are computed. ``fisher``: the output weighting (:func:`output_weights`),
    applied to the spectra and the kept factors alike.
    """
    out = SurveyedGroups()
    for names in groups:
        stats = calibration.of(names[0])
        group = describe_group(modules, names, config, ranks={}, prefix=prefix)
        full = group.renamed(prefix) if prefix else group
        if override_for(full, config.overrides) is not None:
            out.fixed[full.name] = group.rank if group.factorized else None
            out.fixed_removed += group.dense_params - group.factor_params if group.factorized else 0
            if keep and group.factorized:
                out.kept[group.name] = keep_factors(modules, group, stats, config.method, group.rank, fisher)
            continue
        curve = _survey_curve(modules, group, full.name, stats, config, out, keep, decompose, fisher)
        out.curves.append(curve)
        out.members[full.name] = names
        if config.grouping == "auto" and len(names) > 1:  # the split option: each member on its own
            for n in names:
                member = describe_group(modules, [n], config, ranks={}, prefix=prefix)
                name = (member.renamed(prefix) if prefix else member).name
                curve.alternatives.append(
                    _survey_curve(modules, member, name, stats, config, out, keep, decompose, fisher)
                )
                out.members[name] = [n]
    return out


def _survey_curve(
    modules: Mapping[str, nn.Module],
    group: Group,
    full_name: str,
    stats: InputStats,
    config: LordConfig,
    out: SurveyedGroups,
    keep: bool,
    decompose: bool,
    fisher: Any,
) -> GroupCurve:
    """The error curve of ``group`` (and, per :func:`survey_groups`, its kept factors or decomposition)."""
    kind = ",".join(m.name.rsplit(".", 1)[-1] for m in group.members)
    curve = GroupCurve(full_name, kind, group.d_in, group.d_out, torch.empty(0))
    candidates = curve.ranks(config.rank_multiple)
    keep_rank = candidates[0] if candidates else None  # the largest rank any allocation gives
    if keep and keep_rank is not None:
        factors = out.kept[group.name] = keep_factors(modules, group, stats, config.method, keep_rank, fisher)
        curve.spectrum = factors.spectrum.cpu()
        return curve
    W = weighted_weight(modules, group, fisher)[0].to(stats.C.device)
    if decompose:
        out.decompositions[full_name] = fz.output_spectrum(W, stats.C)
        curve.spectrum = out.decompositions[full_name][0].cpu()
    else:
        curve.spectrum = fz.output_eigenvalues(W, stats.C).cpu()
    return curve


# -------------------------------------------------------------------------------- a whole model
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
    fisher: Any = None,
) -> Plan:
    """Factorize every group of ``layers`` with ``config.method`` and return the plan with factors
    (the model is not changed; :func:`lord_export.apply_plan` swaps the modules).

    ``cache``: see :func:`closed_form` (for several plans from one calibration). ``base_model``:
    the dense model's :func:`describe_model`, when the caller took it already (it reads every weight).
    """
    linears = find_linears(model)
    unknown = [n for n in layers if n not in linears]
    if unknown:
        raise PlanError(f"layers {unknown[:5]} are not linear layers of this model")
    groups: Any = build_groups(layers, calibration.input_of, config.grouping)
    if progress:
        from tqdm.auto import tqdm

        groups = tqdm(groups, desc="factorize", unit="group")
    described, tensors = compress_groups(
        model,
        groups,
        config,
        closed_form(calibration, config.method, cache, fisher),
        tokens=lambda names: calibration.of(names[0]).tokens,
        ranks=ranks,
        swap=False,
    )
    return Plan(
        config=config,
        groups=described,
        warnings=list(calibration.warnings),
        base_model=base_model or describe_model(model),
        tensors=tensors,
    )
