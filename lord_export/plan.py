"""Plans: which layers are grouped, at what rank, and their factors — the central artifact.

A plan is computed once from a dense model and its calibration, and applied anywhere (eager
module swap in :mod:`lord_export.apply`, graph passes later). Its JSON form holds the structure
and the per-group report; its tensors (one shared bottleneck ``B`` per group and one
up-projection ``A`` + bias per member) live in safetensors under the names the compressed
model's ``state_dict`` uses.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import factorize as fz
from .calibrate import Calibration
from .config import LordConfig
from .errors import PlanError
from .targets import dense_weight, find_linears, linear_info

log = logging.getLogger(__name__)

PLAN_VERSION = 1
BOTTLENECKS_ATTR = "lord_bottlenecks"


@dataclass
class Member:
    """One dense layer of a group; its rows of the stacked weight are ``[row_start, row_end)``."""

    name: str
    d_in: int
    d_out: int
    transposed: bool
    has_bias: bool
    row_start: int
    row_end: int


@dataclass
class Group:
    """Layers that read one input and share one bottleneck B (r × d_in)."""

    parent: str
    members: list[Member]
    d_in: int
    d_out: int
    rank: int
    full_rank: int
    parity_rank: float
    factorized: bool
    reason: str | None = None
    calibration_tokens: int = 0
    relative_error: float | None = None
    optimal_relative_error: float | None = None

    @property
    def key(self) -> str:
        """Name of the shared bottleneck module under ``parent``."""
        return "__".join(m.name.rsplit(".", 1)[-1] for m in self.members)

    @property
    def name(self) -> str:
        leaves = ",".join(m.name.rsplit(".", 1)[-1] for m in self.members)
        return f"{self.parent}.{{{leaves}}}" if self.parent else f"{{{leaves}}}"

    @property
    def bottleneck_name(self) -> str:
        return ".".join(p for p in (self.parent, BOTTLENECKS_ATTR, self.key) if p)

    @property
    def dense_params(self) -> int:
        return self.d_in * self.d_out

    @property
    def factor_params(self) -> int:
        return self.rank * (self.d_in + self.d_out)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["name"] = self.name
        d["bottleneck"] = self.bottleneck_name if self.factorized else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Group:
        d = {k: v for k, v in d.items() if k not in ("name", "bottleneck")}
        d["members"] = [Member(**m) for m in d["members"]]
        return cls(**d)


@dataclass
class Plan:
    """A compression plan. ``tensors`` maps state-dict names to factor tensors (may be empty)."""

    config: LordConfig
    groups: list[Group]
    warnings: list[str] = field(default_factory=list)
    base_model: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    report: dict[str, Any] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return (
            f"Plan(method={self.config.method!r}, rank_reduction={self.config.rank_reduction}, "
            f"groups={len(self.groups)}, factorized={len(self.factorized_groups)}, tensors={len(self.tensors)})"
        )

    @property
    def factorized_groups(self) -> list[Group]:
        return [g for g in self.groups if g.factorized]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "lord_export.plan",
            "version": PLAN_VERSION,
            "config": self.config.to_dict(),
            "base_model": self.base_model,
            "groups": [g.to_dict() for g in self.groups],
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if d.get("format") != "lord_export.plan":
            raise PlanError("not a lord_export plan (missing format tag)")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {d.get('version')!r} is not supported (this is {PLAN_VERSION})")
        return cls(
            config=LordConfig.from_dict(d["config"]),
            groups=[Group.from_dict(g) for g in d["groups"]],
            warnings=list(d.get("warnings", [])),
            base_model=dict(d.get("base_model", {})),
        )


def _parent_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def build_groups(layers: list[str], calibration: Calibration, grouping: bool) -> list[list[str]]:
    """Partition ``layers`` into groups that read the same tensor and live under the same parent.

    The shared-input fact comes from the calibration hooks; requiring a common parent keeps, e.g.,
    cross-attention k/v projections of different decoder layers (which all read the encoder
    output) in separate groups.
    """
    if not grouping:
        return [[n] for n in layers]
    groups: dict[tuple[str, str], list[str]] = {}
    for n in layers:
        groups.setdefault((calibration.input_of[n], _parent_of(n)), []).append(n)
    return list(groups.values())


def make_plan(
    model: nn.Module,
    calibration: Calibration,
    layers: list[str],
    config: LordConfig,
    *,
    progress: bool = False,
) -> Plan:
    """Factorize every group of ``layers`` with ``config.method`` and return the plan with factors."""
    modules = dict(model.named_modules())
    linears = find_linears(model)
    unknown = [n for n in layers if n not in linears]
    if unknown:
        raise PlanError(f"layers {unknown[:5]} are not linear layers of this model")
    member_groups = build_groups(layers, calibration, config.grouping)
    it: Any = member_groups
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(member_groups, desc="factorize", unit="group")
    groups: list[Group] = []
    tensors: dict[str, torch.Tensor] = {}
    for names in it:
        group, group_tensors = _plan_group(modules, names, calibration, config)
        groups.append(group)
        tensors.update(group_tensors)
    warnings = list(calibration.warnings)
    return Plan(config=config, groups=groups, warnings=warnings, base_model=describe_model(model), tensors=tensors)


def _plan_group(
    modules: dict[str, nn.Module], names: list[str], calibration: Calibration, config: LordConfig
) -> tuple[Group, dict[str, torch.Tensor]]:
    infos = [linear_info(n, modules[n]) for n in names]
    d_in = infos[0].d_in
    members, row = [], 0
    for info in infos:
        members.append(Member(info.name, info.d_in, info.d_out, info.transposed, info.has_bias, row, row + info.d_out))
        row += info.d_out
    d_out = row
    rank = fz.rank_for(d_out, d_in, config.rank_reduction, config.rank_multiple)
    parity = fz.parity_rank(d_out, d_in)
    stats = calibration.of(names[0])
    group = Group(
        parent=_parent_of(names[0]),
        members=members,
        d_in=d_in,
        d_out=d_out,
        rank=rank,
        full_rank=fz.full_rank(d_out, d_in),
        parity_rank=parity,
        factorized=True,
        calibration_tokens=stats.tokens,
    )
    saves = rank * (d_in + d_out) < d_in * d_out
    if not saves and not config.force:
        group.factorized = False
        group.reason = (
            f"rank {rank} is not below the parity rank {parity:.1f}: factors would hold "
            f"{rank * (d_in + d_out)} parameters vs {d_in * d_out} dense (raise the rank reduction or use force)"
        )
        log.info("%s left dense: %s", group.name, group.reason)
        return group, {}

    weight = modules[names[0]].weight
    W = torch.cat([dense_weight(modules[n]).double() for n in names], dim=0)
    C = stats.C.to(W.device)
    if config.method == "lord":
        f = fz.lord(W, C, rank)
    elif config.method == "svd":
        f = fz.svd(W, rank, C)
    else:
        f = fz.asvd(W, stats.mean_abs.to(W.device), rank, C)
    A = f.A.to(weight.dtype)
    B = f.B.to(weight.dtype)
    group.relative_error = fz.relative_error(W, A, B, C, total=float(f.spectrum.sum()))
    group.optimal_relative_error = fz.optimal_relative_error(f.spectrum, rank)
    tensors = {f"{group.bottleneck_name}.weight": B.contiguous()}
    for m in members:
        tensors[f"{m.name}.weight"] = A[m.row_start : m.row_end].contiguous()
        bias = getattr(modules[m.name], "bias", None)
        if bias is not None:
            tensors[f"{m.name}.bias"] = bias.detach().clone()
    return group, tensors


def describe_model(model: nn.Module) -> dict[str, Any]:
    """A fingerprint of the dense model a plan was made from (checked when a plan is applied)."""
    cfg = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "architectures": list(getattr(cfg, "architectures", None) or []),
        "model_type": getattr(cfg, "model_type", None),
        "num_parameters": sum(p.numel() for p in _unique_parameters(model)),
        "linears": {n: [i.d_out, i.d_in] for n, i in find_linears(model).items()},
    }


def _unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())  # parameters() already skips shared (tied) tensors


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, counting tied tensors once."""
    return sum(p.numel() for p in _unique_parameters(model))
