"""Graph helpers shared by the passes and the graph frontends (fx, torch.export, dynamo).

Which ops count as a dense linear, how a graph is copied without touching the caller's, and how a
new node gets the fake value and provenance meta that later compiler stages expect.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx
from torch._dispatch.python import enable_python_dispatcher

aten = torch.ops.aten
#: ``linear(x, W, b)`` as fx/dynamo graphs (torch function) and exported programs (aten) spell it.
LINEAR_TARGETS = (F.linear, aten.linear.default)
#: ``addmm(b, x, W)``: how transformers' ``Conv1D`` (weight d_in × d_out) appears in graphs.
ADDMM_TARGETS = (torch.addmm, aten.addmm.default)

_PROVENANCE_META = ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node", "seq_nr")


def node_position(graph: fx.Graph) -> Callable[[fx.Node], int]:
    """A key function giving each node of ``graph`` its index in graph order."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: order[n]


def fake_mode_of(values: list) -> object | None:
    """The fake mode the values themselves belong to (not the ambient tracing context's)."""
    for v in torch.utils._pytree.tree_leaves(values):
        mode = getattr(v, "fake_mode", None)
        if mode is not None:
            return mode
    return None


def propagate_fake_value(node: fx.Node) -> None:
    """Give a new call_function node the fake value ("val" or "example_value") its inputs have."""
    if node.op != "call_function":
        return
    for key in ("val", "example_value"):
        inputs = list(node.all_input_nodes)
        if not inputs or not all(key in a.meta for a in inputs):
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a, k=key: a.meta[k])
        mode = fake_mode_of([a.meta[key] for a in inputs])
        if mode is None:
            continue
        # the python dispatcher, as dynamo uses when it computes example values: composite ops
        # (linear on CUDA) then decompose in Python, where symbolic (dynamic) sizes are allowed
        with mode, enable_python_dispatcher():
            node.meta[key] = node.target(*args, **kwargs)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule over a copy of ``gm``'s graph (node meta copied), sharing its attributes."""
    new_graph = fx.Graph()
    out = new_graph.graph_copy(gm.graph, {})
    new_graph.output(out)
    return fx.GraphModule(gm, new_graph)


def copy_provenance(src: fx.Node, dst: fx.Node) -> None:
    """Copy the meta that says where ``src`` came from (module stack, source line) onto ``dst``."""
    for key in _PROVENANCE_META:
        if key in src.meta and key not in dst.meta:
            dst.meta[key] = src.meta[key]
