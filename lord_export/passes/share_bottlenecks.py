"""Merge repeated bottleneck GEMMs: same input, same weight, no bias → computed once.

An eager LoRD model computes each group's bottleneck once through a cache, but a compiler that
traces it symbolically (dynamo) sees one ``linear(x, B)`` per member, and inductor does not
deduplicate them. This pass keeps the first of each set of identical bias-free linears and
rewires the others' users to it.
"""

from __future__ import annotations

import logging

from torch import fx

from .graph_utils import LINEAR_TARGETS

log = logging.getLogger(__name__)


def share_bottlenecks(graph: fx.Graph) -> int:
    """Deduplicate identical bias-free linear calls in ``graph`` in place; return how many were removed."""
    first: dict[tuple, fx.Node] = {}
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias is not None or len(node.args) < 2:
            continue
        key = (node.target, node.args[0], node.args[1])
        kept = first.get(key)
        if kept is None:
            first[key] = node
            continue
        node.replace_all_uses_with(kept)
        graph.erase_node(node)
        removed += 1
    if removed:
        log.debug("shared %d repeated bottleneck GEMM(s)", removed)
    return removed
