"""Rewrite dense linear nodes of an FX graph into grouped low-rank pairs.

For every factorized group of a plan whose members appear in the graph, the pass inserts ONE
bottleneck GEMM on the shared input, h = x Bᵀ, and one up-projection per member, y = h Aᵀ + b
(or, with ``up="concat"``, one up-projection with the members' A stacked, followed by a split).
The member nodes' users are rewired and the dense nodes erased.

The pass is graph-kind agnostic: a caller finds the *sites* (which node computes which planned
layer, see :func:`find_sites`) and supplies ``bind(name, tensor) -> Node``, the way new tensors
enter its kind of graph (``get_attr`` on a GraphModule, a parameter placeholder in an exported
program, an extra placeholder in a dynamo graph). Recognized dense linears:

* ``F.linear(x, W, b)`` (= ``torch._C._nn.linear``, dynamo and fx graphs), ``aten.linear.default``
  (torch.export), and ``call_module`` of an ``nn.Linear`` leaf (``symbolic_trace``);
* ``addmm(b, x, W)`` / ``aten.addmm.default`` for transformers' ``Conv1D`` (weight d_in × d_out).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx

from ..core.plan import Group, Plan
from ..errors import PlanError
from .graph_utils import ADDMM_TARGETS, LINEAR_TARGETS, aten, copy_provenance, node_position, propagate_fake_value

log = logging.getLogger(__name__)

Bind = Callable[[str, torch.Tensor], fx.Node]


@dataclass
class Site:
    """A dense layer computed by ``node``: y = linear(input, W, bias) or addmm(bias, input, W)."""

    node: fx.Node
    input: fx.Node
    bias: fx.Node | None
    kind: str  # "linear" | "addmm" | "module"
    aten: bool  # emit aten ops (exported programs) instead of torch functions


def find_sites(graph: fx.Graph, weight_name: Callable[[fx.Node], str | None], modules: dict | None = None) -> dict:
    """Map layer name → its Sites (one per call, in graph order) for every dense linear whose
    weight ``weight_name`` can name. A layer called more than once (a reused or weight-tied
    module) has several sites; each is rewritten.

    ``weight_name(node)`` returns the fully qualified parameter name (``...q_proj.weight``) of a
    weight-producing node, or None. ``modules`` (a GraphModule's named modules) enables
    ``call_module`` sites of nn.Linear leaves.
    """
    sites: dict[str, list[Site]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in LINEAR_TARGETS:
            x, w = node.args[0], node.args[1]
            b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            name = weight_name(w) if isinstance(w, fx.Node) else None
            kind = "linear"
        elif node.op == "call_function" and node.target in ADDMM_TARGETS and not node.kwargs:
            if len(node.args) != 3:
                continue
            b, x, w = node.args
            name = weight_name(w) if isinstance(w, fx.Node) else None
            kind = "addmm"
        elif node.op == "call_module" and modules is not None and isinstance(modules.get(node.target), torch.nn.Linear):
            x, b = node.args[0], None
            name = f"{node.target}.weight"
            kind = "module"
        else:
            continue
        if name is None or not name.endswith(".weight"):
            continue
        layer = name[: -len(".weight")]
        site = Site(
            node,
            x,
            b if isinstance(b, fx.Node) else None,
            kind,
            node.target in (aten.linear.default, aten.addmm.default),
        )
        sites.setdefault(layer, []).append(site)
    return sites


def check_sites(plan: Plan, sites: dict[str, list[Site]], *, require_all: bool) -> list[Group]:
    """The groups to rewrite. Raises PlanError for a planned layer the graph lacks (if
    ``require_all``) or for members of one group that do not read the same input (each call of
    a group reads one input shared by its members; a layer called k times reads k inputs)."""
    groups, missing = [], []
    for g in plan.factorized_groups:
        present = [m for m in g.members if m.name in sites]
        missing += [m.name for m in g.members if m.name not in sites]
        if not present:
            continue
        inputs = {s.input for m in present for s in sites[m.name]}
        if len(inputs) > max(len(sites[m.name]) for m in present):
            raise PlanError(f"members of group {g.name} read different inputs in this graph; cannot share B")
        groups.append(g)
    if missing and require_all:
        shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise PlanError(f"the plan names layers this graph has no dense linear for: {shown}")
    return groups


def factorize_linears(
    graph: fx.Graph,
    plan: Plan,
    sites: dict[str, Site],
    bind: Bind,
    *,
    require_all: bool = True,
    up: str = "separate",
) -> int:
    """Rewrite the planned sites of ``graph`` in place; return the number of groups rewritten."""
    if up not in ("separate", "concat"):
        raise ValueError(f"up must be 'separate' or 'concat', got {up!r}")
    groups = check_sites(plan, sites, require_all=require_all)
    position = node_position(graph)
    bound: dict[str, fx.Node] = {}  # factor nodes, made once (names are unique per group) and shared by the calls

    def get(key: str, tensor: torch.Tensor, transposed: bool) -> fx.Node:
        if key not in bound:
            bound[key] = bind(key, tensor.T.contiguous() if transposed else tensor)
        return bound[key]

    for g in groups:
        members = [m for m in g.members if m.name in sites]
        calls: dict[fx.Node, list] = {}  # input node → [(member, site)]: one bottleneck per distinct input
        for m in members:
            for site in sites[m.name]:
                calls.setdefault(site.input, []).append((m, site))
        for pairs in sorted(calls.values(), key=lambda ps: min(position(s.node) for _, s in ps)):
            _rewrite_call(graph, plan, g, pairs, get, up)
        log.debug(
            "factorized %s (rank %d, %d member(s), %d call(s) in this graph)", g.name, g.rank, len(members), len(calls)
        )
    return len(groups)


def _rewrite_call(graph: fx.Graph, plan: Plan, g: Group, pairs: list, get: Callable, up: str) -> None:
    """Replace one call of a group (its members' sites reading one input) by B then the A's."""
    before = set(graph.nodes)
    first = min((s.node for _, s in pairs), key=node_position(graph))
    site0 = pairs[0][1]
    x, use_aten = site0.input, site0.aten
    transposed = site0.kind == "addmm"
    members = [m for m, _ in pairs]
    with graph.inserting_before(first):
        b_node = get(f"{g.bottleneck_name}.weight", plan.tensors[f"{g.bottleneck_name}.weight"], transposed)
        h = _gemm(graph, x, b_node, None, transposed, use_aten)
        copy_provenance(first, h)
        if up == "concat" and len(members) > 1:
            outs = _concat_up(graph, plan, g, members, h, get, transposed, use_aten)
        else:
            outs = []
            for m, site in pairs:
                a_node = get(f"{m.name}.weight", plan.tensors[f"{m.name}.weight"], transposed)
                bias = _bias_node(plan, m, site, get)
                outs.append(_gemm(graph, h, a_node, bias, transposed, use_aten))
    for node in graph.nodes:
        if node not in before:
            propagate_fake_value(node)
    for (_, site), out in zip(pairs, outs, strict=True):
        copy_provenance(site.node, out)
        site.node.replace_all_uses_with(out)
        graph.erase_node(site.node)


def _bias_node(plan: Plan, member, site: Site, get: Callable) -> fx.Node | None:
    if not member.has_bias:
        return None
    if site.bias is not None:
        return site.bias  # reuse the graph's own bias tensor
    return get(f"{member.name}.bias", plan.tensors[f"{member.name}.bias"], False)


def _gemm(graph: fx.Graph, x: fx.Node, w: fx.Node, bias: fx.Node | None, transposed: bool, use_aten: bool) -> fx.Node:
    """linear(x, w, bias), or for transposed (Conv1D) weights mm/addmm(x, w)."""
    if not transposed:
        if use_aten:
            return graph.call_function(aten.linear.default, (x, w) if bias is None else (x, w, bias))
        return graph.call_function(F.linear, (x, w, bias))
    if bias is None:
        return graph.call_function(aten.mm.default if use_aten else torch.mm, (x, w))
    return graph.call_function(aten.addmm.default if use_aten else torch.addmm, (bias, x, w))


def _concat_up(graph, plan, g, members, h, get, transposed, use_aten):
    # a call may hold a subset of the members (a graph with some of them): its own concatenation
    tag = "" if len(members) == len(g.members) else "_" + "_".join(m.name.rsplit(".", 1)[-1] for m in members)
    A = torch.cat([plan.tensors[f"{m.name}.weight"] for m in members])
    a_node = get(f"{g.bottleneck_name}.up_concat{tag}", A, transposed)
    biases = [plan.tensors.get(f"{m.name}.bias") for m in members]
    bias = None
    if any(b is not None for b in biases):
        full = torch.cat([b if b is not None else A.new_zeros(m.d_out) for b, m in zip(biases, members, strict=True)])
        bias = get(f"{g.bottleneck_name}.bias_concat{tag}", full, False)
    y = _gemm(graph, h, a_node, bias, transposed, use_aten)
    sizes = [m.d_out for m in members]
    if use_aten:
        parts = graph.call_function(aten.split_with_sizes.default, (y, sizes, -1))
    else:
        parts = graph.call_function(torch.split, (y, sizes), {"dim": -1})
    return [graph.call_function(operator.getitem, (parts, i)) for i in range(len(members))]
