"""Plans, the central artifact: which layers are grouped, at what rank, and their factors.

This module is the data model and its two serializations: ``lord_plan.json`` (:meth:`Plan.to_dict`,
:meth:`Plan.from_dict`: the structure, the per-group report and the base-model fingerprint) and
the compact ``quantization_config`` entry of a LoRD directory's config.json
(:func:`quantization_config_from_plan`, :func:`plan_from_quantization_config`: what transformers'
``from_pretrained`` and serving engines need to rebuild the modules). A plan is made by :mod:`lord_export.planner`
from a dense model and its calibration, and applied anywhere: eager module swap
(:mod:`lord_export.apply`), fx / torch.export / dynamo graphs (:mod:`lord_export.export`). Its
JSON holds the structure and the per-group report; its tensors (one shared bottleneck ``B`` per
group and one up-projection ``A`` + bias per member) live in safetensors under the names the
compressed model's ``state_dict`` uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .._version import __version__
from ..config import LordConfig
from ..errors import PlanError
from .factorize import full_rank, parity_rank

PLAN_VERSION = 1
#: ``quantization_config.quant_method`` of a LoRD directory, and the version of that entry's layout. The
#: name is the package's, so a tool that cannot read the directory (transformers or vLLM without
#: lord_export) names what is missing in its "unknown quantization method" error.
QUANT_METHOD = "lord_export"
#: Every ``quant_method`` lord_export reads: directories written by lord_export 0.2 and earlier say "lord".
LEGACY_QUANT_METHOD = "lord"
QUANT_METHODS = (QUANT_METHOD, LEGACY_QUANT_METHOD)
FORMAT_VERSION = 1
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


def common_parent(layers: Sequence[str]) -> str:
    """The deepest module holding every layer of ``layers`` ('' for the root): their parent when they
    are siblings (q/k/v), the MoE block when the experts of a layer share one basis."""
    parents = [n.split(".")[:-1] for n in layers]
    common = parents[0]
    for p in parents[1:]:
        k = 0
        while k < min(len(common), len(p)) and common[k] == p[k]:
            k += 1
        common = common[:k]
    return ".".join(common)


def relative(name: str, parent: str) -> str:
    """``name`` relative to module ``parent``."""
    return name[len(parent) + 1 :] if parent else name


def group_name(layers: Sequence[str]) -> str:
    """The name of the group made of ``layers``: ``parent.{a,b}`` (names relative to their common parent)."""
    parent = common_parent(layers)
    leaves = ",".join(relative(n, parent) for n in layers)
    return f"{parent}.{{{leaves}}}" if parent else f"{{{leaves}}}"


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
    dense_output_error: float | None = None
    dense_output_bound: float | None = None

    @property
    def key(self) -> str:
        """Name of the shared bottleneck module under ``parent``: the members' names joined, or for
        members under different modules (experts sharing one basis) ``shared__`` and their leaf names."""
        names = [relative(m.name, self.parent) for m in self.members]
        if any("." in n for n in names):
            return "shared__" + "__".join(dict.fromkeys(n.rsplit(".", 1)[-1] for n in names))
        return "__".join(names)

    @property
    def name(self) -> str:
        return group_name([m.name for m in self.members])

    @property
    def bottleneck_name(self) -> str:
        return ".".join(p for p in (self.parent, BOTTLENECKS_ATTR, self.key) if p)

    def renamed(self, prefix: str) -> Group:
        """A copy whose layer names are prefixed with ``prefix`` (a block's name) and a dot."""

        def full(name: str) -> str:
            return f"{prefix}.{name}" if name else prefix

        members = [replace(m, name=full(m.name)) for m in self.members]
        return replace(self, parent=full(self.parent), members=members)

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


def quantization_config_from_plan(plan: Plan) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json for ``plan`` (factorized groups only)."""
    groups = []
    for g in plan.factorized_groups:
        members = [
            {"name": relative(m.name, g.parent), "d_out": m.d_out, "bias": m.has_bias, "transposed": m.transposed}
            for m in g.members
        ]
        groups.append({"parent": g.parent, "rank": g.rank, "d_in": g.d_in, "members": members})
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "lord_export_version": __version__,
        "lord_config": plan.config.to_dict(),
        "groups": groups,
    }


def plan_from_quantization_config(qc: Any) -> Plan:
    """A tensor-less :class:`Plan` from a ``quantization_config`` (a dict, or an object with ``to_dict``)."""
    d = qc if isinstance(qc, dict) else qc.to_dict()
    if d.get("quant_method") not in QUANT_METHODS:
        raise PlanError(f"quantization_config has quant_method {d.get('quant_method')!r}, not {QUANT_METHOD!r}")
    if d.get("format_version") != FORMAT_VERSION:
        raise PlanError(
            f"LoRD quantization_config format {d.get('format_version')!r} is not supported "
            f"(this lord_export reads {FORMAT_VERSION}); upgrade lord_export"
        )
    try:
        groups = []
        for g in d["groups"]:
            d_in, rank, parent = int(g["d_in"]), int(g["rank"]), g["parent"]
            members, row = [], 0
            for m in g["members"]:
                name = f"{parent}.{m['name']}" if parent else m["name"]
                d_out = int(m["d_out"])
                members.append(Member(name, d_in, d_out, bool(m["transposed"]), bool(m["bias"]), row, row + d_out))
                row += d_out
            groups.append(
                Group(
                    parent=parent,
                    members=members,
                    d_in=d_in,
                    d_out=row,
                    rank=rank,
                    full_rank=full_rank(row, d_in),
                    parity_rank=parity_rank(row, d_in),
                    factorized=True,
                )
            )
        config = LordConfig.from_dict(d.get("lord_config") or {})
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"invalid LoRD quantization_config: {e!r}") from e
    return Plan(config=config, groups=groups)
