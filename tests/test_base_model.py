"""Plans know their base model (issue 15): a plan applied to other weights (a fine-tuned copy) is
refused everywhere a plan is applied, unless overridden; the FX pass rewrites every call of a
reused layer; the dynamo backend matches parameters by dynamo's recorded names, flags naming
mismatches and casts the factors to the graph's dtype."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

import lord_export as le
from lord_export.core.fingerprint import WEIGHT_TOLERANCE, weight_difference, weight_fingerprint
from lord_export.errors import PlanError
from lord_export.export import export_lord, rewrite_graph_module
from lord_export.export.dynamo import make_backend
from tests.helpers import PlainMLP, correlated_batches, tiny_model


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def mlp_and_plan(seed: int = 0):
    torch.manual_seed(seed)
    dense = PlainMLP()
    lord = copy.deepcopy(dense)
    plan = le.compress(lord, lambda m: [m(torch.randn(32, 24)) for _ in range(3)], rank_reduction=0.5, force=True)
    return dense, lord, plan


def finetuned(model: nn.Module, scale: float = 0.05) -> nn.Module:
    """A 'fine-tuned' copy: every weight matrix moved by ``scale`` of its own size (biases kept, since
    graph rewrites keep the graph's own biases)."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in tuned.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return tuned


def test_weight_fingerprint_tells_casts_from_tuning():
    w = torch.randn(96, 80)
    fp = weight_fingerprint(w)
    assert weight_difference(fp, w) == 0.0
    assert weight_difference(fp, w.to(torch.bfloat16)) < WEIGHT_TOLERANCE / 2  # bf16 rounding: same weight
    assert weight_difference(fp, w + 0.03 * w.std() * torch.randn_like(w)) > WEIGHT_TOLERANCE
    assert weight_difference(fp, w.T.contiguous()) == float("inf")


def test_apply_plan_refuses_a_finetuned_model_unless_allowed():
    dense, lord, plan = mlp_and_plan()
    assert set(plan.base_model["weights"]) == {"a", "b", "out"}
    le.apply_plan(copy.deepcopy(dense), plan)  # its own base model: fine
    with pytest.raises(PlanError, match=r"another model.*weight of (a|b|out) differs.*allow_mismatch=True"):
        le.apply_plan(finetuned(dense), plan)
    x = torch.randn(4, 24)
    forced = le.apply_plan(finetuned(dense), plan, allow_mismatch=True)
    assert rel(forced(x), lord(x)) < 1e-5
    other = PlainMLP(hidden=48)
    with pytest.raises(PlanError):
        le.apply_plan(other, plan)


def test_old_plans_without_weight_fingerprints_still_apply(caplog):
    dense, _, plan = mlp_and_plan()
    old = copy.copy(plan)
    old.base_model = {k: v for k, v in plan.base_model.items() if k != "weights"}
    round_trip = le.Plan.from_dict(old.to_dict())
    assert "weights" not in round_trip.base_model
    with caplog.at_level("DEBUG", logger="lord_export.core.fingerprint"):
        le.apply_plan(finetuned(dense), old)  # structure matches; contents cannot be checked
    assert "no weight fingerprints" in caplog.text


def test_load_with_model_checks_the_architecture(tmp_path):
    dense, lord, plan = mlp_and_plan()
    le.save_compressed(lord, plan, tmp_path / "lord")
    x = torch.randn(3, 24)
    loaded = le.load(tmp_path / "lord", model=finetuned(dense))  # weights are all replaced: contents do not matter
    assert rel(loaded(x), lord(x)) < 1e-6
    with pytest.raises(PlanError):
        le.load(tmp_path / "lord", model=PlainMLP(hidden=48))


def test_fx_and_export_refuse_a_finetuned_graph():
    dense, lord, plan = mlp_and_plan()
    tuned = finetuned(dense)
    with pytest.raises(PlanError, match="another model"):
        rewrite_graph_module(fx.symbolic_trace(tuned), plan)
    x = torch.randn(5, 24)
    gm = rewrite_graph_module(fx.symbolic_trace(tuned), plan, allow_mismatch=True)
    assert rel(gm(x), lord(x)) < 1e-5
    with pytest.raises(PlanError, match="another model"):
        export_lord(tuned, plan, (x,))
    ep = export_lord(tuned, plan, (x,), allow_mismatch=True)
    assert rel(ep.module()(x), lord(x)) < 1e-5
    ep = export_lord(copy.deepcopy(dense), plan, (x,))
    assert rel(ep.module()(x), lord(x)) < 1e-5


def test_dynamo_backend_refuses_a_finetuned_model_unless_allowed():
    dense, lord, plan = mlp_and_plan()
    tuned = finetuned(dense)
    x = torch.randn(6, 24)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="another model") as info:
        torch.compile(tuned, backend=make_backend(plan=plan, backend="eager"))(x)
    assert "allow_base_mismatch" in str(info.value)
    torch._dynamo.reset()
    forced = torch.compile(tuned, backend=make_backend(plan=plan, backend="eager", allow_base_mismatch=True))
    assert rel(forced(x), lord(x)) < 1e-5
    torch._dynamo.reset()
    same = torch.compile(dense, backend=make_backend(plan=plan, backend="eager"))
    assert rel(same(x), lord(x)) < 1e-5


class Reused(nn.Module):
    """One planned layer called twice (as a weight-tied or reused module is)."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(32, 32)
        self.out = nn.Linear(32, 8)

    def forward(self, x):
        return self.out(torch.tanh(self.mix(torch.tanh(self.mix(x)))))


def linear_calls(graph: fx.Graph) -> int:
    return sum(1 for n in graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear)


def test_a_layer_called_twice_is_rewritten_at_every_call():
    torch.manual_seed(0)
    dense = Reused()
    lord = copy.deepcopy(dense)
    plan = le.compress(lord, lambda m: [m(torch.randn(64, 32)) for _ in range(2)], rank_reduction=0.6, force=True)
    assert {m.name for g in plan.factorized_groups for m in g.members} == {"mix", "out"}
    x = torch.randn(7, 32)
    gm = rewrite_graph_module(fx.symbolic_trace(copy.deepcopy(dense)), plan)
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]  # both calls of mix rewritten
    assert rel(gm(x), lord(x)) < 1e-5
    graphs = []

    def keep(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(dense, backend=make_backend(plan=plan, backend=keep))
    assert rel(compiled(x), lord(x)) < 1e-5
    assert linear_calls(graphs[0].graph) == 2 * 2 + 2  # each of the 3 calls: B then A (mix's B/A bound once)


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = PlainMLP()

    def forward(self, x):
        return self.inner(x)


def test_dynamo_flags_plan_names_that_do_not_fit_the_compiled_module(caplog):
    torch.manual_seed(0)
    dense = Wrapper()
    lord = copy.deepcopy(dense)
    plan = le.compress(lord, lambda m: [m(torch.randn(32, 24)) for _ in range(3)], rank_reduction=0.5, force=True)
    x = torch.randn(4, 24)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="names do not fit"):
        torch.compile(dense.inner, backend=make_backend(plan=plan, backend="eager"))(x)
    torch._dynamo.reset()
    with caplog.at_level("INFO", logger="lord_export.export.dynamo"):
        out = torch.compile(dense, backend=make_backend(plan=plan, backend="eager"))(x)
    assert rel(out, lord(x)) < 1e-5
    assert "3 of 3 planned layer(s) found" in caplog.text


def test_graph_break_subgraph_with_unplanned_layers_is_fine():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = PlainMLP(), PlainMLP()

        def forward(self, x):
            x = self.first(x)
            torch._dynamo.graph_break()
            return self.second(x)

    torch.manual_seed(0)
    dense = Two()
    lord = copy.deepcopy(dense)
    plan = le.compress(
        lord,
        lambda m: [m(torch.randn(32, 24)) for _ in range(3)],
        rank_reduction=0.5,
        force=True,
        targets=("first.a", "first.b", "first.out"),
    )
    x = torch.randn(4, 24)
    torch._dynamo.reset()
    out = torch.compile(dense, backend=make_backend(plan=plan, backend="eager"))(x)
    assert rel(out, lord(x)) < 1e-5


def test_bf16_model_with_fp32_plan_compiles_and_runs():
    model = tiny_model("llama")
    model.config.use_cache = False
    lord = copy.deepcopy(model)
    plan = le.compress(lord, correlated_batches(), rank_reduction=0.5, force=True)
    assert next(iter(plan.tensors.values())).dtype == torch.float32
    dense_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    ids = torch.randint(3, 300, (2, 12))
    torch._dynamo.reset()
    compiled = torch.compile(dense_bf16, backend=make_backend(plan=plan, backend="eager"))
    with torch.no_grad():
        got = compiled(input_ids=ids).logits
        want = lord(input_ids=ids).logits
    assert got.dtype == torch.bfloat16
    assert rel(got.float(), want) < 0.05
