"""The FX pass on every graph kind: symbolic_trace, torch.export, dynamo (torch.compile).

Node counts: a Llama decoder layer's 7 dense linears become 4 bottleneck GEMMs (q|k|v, o,
gate|up, down) + 7 up-projections; numerics: the rewritten graph equals the eager LoRD model
within 1e-5 relative (float32) at two input shapes.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.export import Dim

import lord_export as le
from lord_export.core.modules import LordLinear
from lord_export.export.dynamo import make_backend
from lord_export.export.graph import export_lord, rewrite_exported_program, rewrite_graph_module
from lord_export.passes import share_bottlenecks
from tests.helpers import PlainMLP, correlated_batches, tiny_model

aten = torch.ops.aten
SHAPES = [(2, 16), (3, 37)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach() / b.abs().max().detach())


@pytest.fixture(scope="module")
def llama_pair():
    """(dense model, its LoRD twin, the plan); the plan factorizes every group (force)."""
    dense = tiny_model("llama")
    dense.config.use_cache = False
    lord = copy.deepcopy(dense)
    plan = le.compress(lord, correlated_batches(), rank_reduction=0.5, force=True)
    return dense, lord, plan


def linear_nodes(graph: fx.Graph, targets=(F.linear, aten.linear.default)) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target in targets]


# --- torch.export --------------------------------------------------------------------------------
def test_export_node_counts_and_numerics(llama_pair, tmp_path):
    dense, lord, plan = llama_pair
    ids = torch.randint(3, 300, (2, 16))
    dims = {"input_ids": {0: Dim("batch", min=1, max=16), 1: Dim("seq", min=2, max=128)}}
    ep = export_lord(dense, plan, (), {"input_ids": ids}, dynamic_shapes=dims)
    ep.validate()
    layer0 = [n for n in linear_nodes(ep.graph) if "layers.0." in str(n.meta.get("nn_module_stack", ""))]
    bottlenecks = [n for n in layer0 if n.args[1].name.startswith("lord_") and "lord_bottlenecks" in n.args[1].name]
    assert len(layer0) == 4 + 7 and len(bottlenecks) == 4
    assert len(linear_nodes(ep.graph)) == 2 * 11 + 1  # + lm_head
    # the dense weights of factorized layers are gone from the program
    assert not any(k.endswith("q_proj.weight") and not k.startswith("lord.") for k in ep.state_dict)
    assert len(ep.state_dict) == len(dense.state_dict()) - 14 + 2 * (4 + 7)
    for shape in SHAPES:
        x = torch.randint(3, 300, shape)
        with torch.no_grad():
            assert rel(ep.module()(input_ids=x).logits, lord(input_ids=x).logits) < 1e-5
    torch.export.save(ep, tmp_path / "lord.pt2")
    loaded = torch.export.load(tmp_path / "lord.pt2")
    with torch.no_grad():
        assert torch.equal(loaded.module()(input_ids=ids).logits, ep.module()(input_ids=ids).logits)


def test_export_concat_up_projection(llama_pair):
    dense, lord, plan = llama_pair
    ids = torch.randint(3, 300, (2, 16))
    ep = export_lord(dense, plan, (), {"input_ids": ids}, up="concat")
    ep.validate()
    splits = [n for n in ep.graph.nodes if n.target == aten.split_with_sizes.default]
    assert len(splits) == 4  # q|k|v and gate|up, two layers
    assert len(linear_nodes(ep.graph)) == 2 * (4 + 4) + 1
    with torch.no_grad():
        assert rel(ep.module()(input_ids=ids).logits, lord(input_ids=ids).logits) < 1e-5


def test_export_of_eager_lord_model_shares_bottlenecks(llama_pair):
    """Item 2: an eager LoRD model exports with one bottleneck per group (cache under tracing or the pass)."""
    _, lord, plan = llama_pair
    ids = torch.randint(3, 300, (2, 16))
    ep = torch.export.export(lord, (), {"input_ids": ids}, strict=False)
    share_bottlenecks(ep.graph)
    assert len(linear_nodes(ep.graph)) == 2 * 11 + 1


def test_plan_that_does_not_fit_fails_clearly(llama_pair):
    dense, _, plan = llama_pair
    ids = torch.randint(3, 300, (2, 16))
    ep = torch.export.export(dense, (), {"input_ids": ids}, strict=False)
    other = tiny_model("llama")
    other.config.use_cache = False
    wide = copy.deepcopy(plan)
    wide.groups[0].members[0].d_in = 99
    with pytest.raises(le.PlanError, match=r"q_proj: graph weight \(64, 64\), plan \(64, 99\)"):
        rewrite_exported_program(ep, wide)
    ghost = copy.deepcopy(plan)
    ghost.groups[0].members[0].name = "model.layers.7.self_attn.q_proj"
    ghost.tensors["model.layers.7.self_attn.q_proj.weight"] = ghost.tensors["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(le.PlanError, match="model.layers.7.self_attn.q_proj"):
        rewrite_exported_program(ep, ghost)
    assert len(linear_nodes(ep.graph)) == 15  # the input program is untouched


def test_graph_without_linears_passes_through(llama_pair):
    _, _, plan = llama_pair
    empty = copy.deepcopy(plan)
    empty.groups = []
    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.Tanh()))
    before = [n.op for n in gm.graph.nodes]
    rewrite_graph_module(gm, empty)
    assert [n.op for n in gm.graph.nodes] == before


# --- torch.fx.symbolic_trace -------------------------------------------------------------------
def test_symbolic_trace_of_dense_mlp():
    dense = PlainMLP().double()
    lord = copy.deepcopy(dense)
    xs = [torch.randn(32, 24, dtype=torch.float64) for _ in range(3)]
    plan = le.compress(lord, lambda m: [m(x) for x in xs], rank_reduction=0.5, force=True)
    gm = rewrite_graph_module(fx.symbolic_trace(dense), plan)
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]  # a, b, out replaced
    assert len(linear_nodes(gm.graph)) == 2 + 3  # bottlenecks {a,b} and {out} + 3 up-projections
    assert not hasattr(gm, "a")  # dead dense modules dropped
    for shape in [(5, 24), (2, 7, 24)]:
        x = torch.randn(shape, dtype=torch.float64)
        assert rel(gm(x), lord(x)) < 1e-12


def test_symbolic_trace_of_eager_lord_model_dedups_bottleneck():
    model = PlainMLP()
    le.compress(model, lambda m: [m(torch.randn(32, 24)) for _ in range(3)], rank_reduction=0.5, force=True)
    gm = fx.symbolic_trace(model)
    assert any(isinstance(m, LordLinear) for m in model.modules())
    assert len(linear_nodes(gm.graph)) == 3 + 3  # symbolic tracing bypasses the cache: B of {a, b} twice
    assert share_bottlenecks(gm.graph) == 1
    gm.recompile()
    assert len(linear_nodes(gm.graph)) == 2 + 3
    x = torch.randn(3, 24)
    torch.testing.assert_close(gm(x), model(x))


# --- torch.compile / dynamo --------------------------------------------------------------------
class GraphBreakMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = PlainMLP()
        self.second = PlainMLP()

    def forward(self, x):
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.second(x)


def counting_backend(graphs):
    def inner(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return inner


@pytest.mark.parametrize("dynamic", [False, True])
def test_dynamo_rewrites_each_subgraph(dynamic):
    dense = GraphBreakMLP()
    lord = copy.deepcopy(dense)
    plan = le.compress(lord, lambda m: [m(torch.randn(32, 24)) for _ in range(3)], rank_reduction=0.5, force=True)
    graphs: list[fx.GraphModule] = []
    torch._dynamo.reset()
    compiled = torch.compile(dense, backend=make_backend(plan=plan, backend=counting_backend(graphs)), dynamic=dynamic)
    for shape in [(5, 24), (9, 24)]:
        x = torch.randn(shape)
        assert rel(compiled(x), lord(x)) < 1e-5
    assert len(graphs) >= 2  # the graph break split it
    for gm in graphs[:2]:
        assert len(linear_nodes(gm.graph)) == 5  # 2 bottlenecks + 3 up-projections per PlainMLP


def test_dynamo_merges_eager_lord_bottlenecks():
    model = tiny_model("llama")
    model.config.use_cache = False
    le.compress(model, correlated_batches(), rank_reduction=0.5, force=True)
    graphs: list[fx.GraphModule] = []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=make_backend(backend=counting_backend(graphs)))
    ids = torch.randint(3, 300, (2, 16))
    with torch.no_grad():
        assert rel(compiled(input_ids=ids).logits, model(input_ids=ids).logits) < 1e-5
    assert len(linear_nodes(graphs[0].graph)) == 2 * 11 + 1  # without the merge: 2 * 14 + 1


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.slow
def test_backend_by_name_with_inductor(llama_pair, tmp_path, dynamic):
    dense, lord, plan = llama_pair
    out = tmp_path / "lord"
    le.save_compressed(lord, plan, out)
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(dense), backend="lord", options={"plan": str(out)}, dynamic=dynamic)
    for shape in SHAPES:
        x = torch.randint(3, 300, shape)
        with torch.no_grad():
            assert rel(compiled(input_ids=x).logits, lord(input_ids=x).logits) < 1e-5


def test_backend_is_found_without_importing_lord_export():
    code = (
        "import sys, torch\n"
        "from torch._dynamo import list_backends\n"
        "assert 'lord' in list_backends(exclude_tags=())\n"
        "assert 'lord_export' not in sys.modules\n"
        "f = torch.compile(torch.nn.Linear(4, 4), backend='lord', options={'backend': 'eager'})\n"
        "print(f(torch.randn(2, 4)).shape)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "torch.Size([2, 4])" in proc.stdout


def test_unknown_backend_option_is_an_error():
    torch._dynamo.reset()
    f = torch.compile(nn.Linear(4, 4), backend=make_backend(pln="x"))
    with pytest.raises(Exception, match="unknown option"):
        f(torch.randn(2, 4))
