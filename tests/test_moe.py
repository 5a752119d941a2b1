"""Mixture-of-experts models on both transformers lines: expert weights factorized (transformers 5's
fused 3-D experts unfused into per-expert linears first), routers left dense, each expert calibrated
on exactly its routed tokens, a shared basis across experts, and the directory path through the CLI
(compress → ``lord_export.load`` → ``from_pretrained`` → ``save_pretrained`` → generate)."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torch import nn

import lord_export as le
from lord_export.cli import main as cli_main
from lord_export.core.experts import is_expert_layer, prepare_experts
from lord_export.core.modules import LordBottleneck, LordLinear
from lord_export.errors import UsageError
from tests.helpers import MOE, correlated_batches, tiny_model

TOP_K, EXPERTS = 2, 4
#: an expert's linears: gate/up/down (transformers 5, and Qwen on 4.x) or w1/w3/w2 (Mixtral on 4.x)
EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")
GATES = (".gate_proj", ".w1")


def moe_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for name, m in model.named_modules() if hasattr(m, "experts") and name.endswith(("mlp", "moe"))]


def many_batches() -> list[dict]:
    # 768 tokens, ~384 routed to each expert: every expert sees more tokens than its 64 input features
    return correlated_batches(n_batches=4, batch=4, seq=48)


@pytest.mark.parametrize("arch", MOE)
def test_experts_are_factorized_and_routers_stay_dense(arch, caplog):
    model = tiny_model(arch)
    routers = {n: type(m) for n, m in model.named_modules() if n.endswith(("mlp.gate", "moe.gate"))}
    before = sum(p.numel() for p in model.parameters())
    with caplog.at_level(logging.WARNING):
        plan = le.compress(model, many_batches(), rank_reduction=0.5)
    expert_linears = [n for n, _ in model.named_modules() if is_expert_layer(n) and n.endswith(EXPERT_LINEARS)]
    assert len(expert_linears) == 2 * EXPERTS * 3  # two layers, four experts, gate/up/down each
    assert all(isinstance(model.get_submodule(n), LordLinear) for n in expert_linears)
    assert {n: type(model.get_submodule(n)) for n in routers} == routers  # untouched
    assert not any(isinstance(model.get_submodule(n), LordLinear) for n in routers)
    after = sum(p.numel() for p in model.parameters())
    assert after == before - sum(g.dense_params - g.factor_params for g in plan.factorized_groups)
    assert 1 - after / before > 0.10  # the experts are most of an MoE layer: 0.133 / 0.168 at this size
    assert "does not line up" not in caplog.text  # routed tokens are not a masking problem


@pytest.mark.parametrize("arch", MOE)
def test_each_expert_is_calibrated_on_its_routed_tokens(arch):
    model = tiny_model(arch)
    prepare_experts(model)
    batches = many_batches()
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    layers = [n for n in le.select_targets(model, ("experts",))]
    calibration = le.calibrate(model, batches, layers)
    for block in ("model.layers.0", "model.layers.1"):
        gate_keys = {calibration.input_of[n] for n in layers if n.startswith(block) and n.endswith(GATES)}
        assert len(gate_keys) == EXPERTS  # each expert reads its own rows (gate/up share them)
        assert sum(calibration.stats[k].tokens for k in gate_keys) == tokens * TOP_K


@pytest.mark.parametrize("arch", MOE)
def test_expert_factors_meet_the_closed_form_bound_on_routed_tokens(arch):
    model = tiny_model(arch)
    prepare_experts(model)
    dense = copy.deepcopy(model)
    batches = many_batches()
    routed: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in dense.named_modules():
        if is_expert_layer(name + ".x") and (hasattr(m, "gate_proj") or hasattr(m, "w1")):  # one expert MLP

            def grab(mod, args, name=name):
                routed.setdefault(name, []).append(args[0].detach())

            hooks.append(m.register_forward_pre_hook(grab))
    with torch.no_grad():
        for b in batches:
            dense(**b)
    for h in hooks:
        h.remove()
    plan = le.compress(model, batches, rank_reduction=0.5)
    checked = 0
    for g in plan.factorized_groups:
        if not (is_expert_layer(g.members[0].name) and g.members[0].name.endswith(GATES)):
            continue
        expert = g.members[0].name.rsplit(".", 1)[0]
        x = torch.cat(routed[expert]).double()
        assert x.shape[0] >= x.shape[1]  # no top-up: the bound is the routed tokens' own
        w = torch.cat([dense.get_submodule(m.name).weight for m in g.members]).detach().double()
        b = model.get_submodule(g.members[0].name).bottleneck.weight.detach().double()
        a = torch.cat([model.get_submodule(m.name).weight for m in g.members]).detach().double()
        err = ((x @ w.T - x @ b.T @ a.T) ** 2).sum()
        sigma = torch.linalg.svdvals(x @ w.T)
        bound = (sigma[g.rank :] ** 2).sum()
        assert float(err) == pytest.approx(float(bound), rel=1e-4)
        checked += 1
    assert checked == 2 * EXPERTS


@pytest.mark.parametrize("arch", MOE)
def test_outputs_at_low_rank_reduction_stay_close_to_dense(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 200, (2, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids).logits
    le.compress(model, many_batches(), rank_reduction=0.02, force=True, targets=("experts",))
    with torch.no_grad():
        out = model(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.05


def test_a_shared_basis_is_one_bottleneck_for_all_experts_of_a_layer():
    model = tiny_model("qwen3_moe")
    per_expert = copy.deepcopy(model)
    le.compress(per_expert, many_batches(), rank_reduction=0.5, targets=("experts",))
    plan = le.compress(model, many_batches(), rank_reduction=0.5, targets=("experts",), expert_basis="shared")
    for block in moe_blocks(model):
        shared = {id(e.gate_proj.bottleneck) for e in block.experts} | {id(e.up_proj.bottleneck) for e in block.experts}
        assert len(shared) == 1
        (bottleneck,) = block.lord_bottlenecks.values()
        assert isinstance(bottleneck, LordBottleneck) and bottleneck.n_members == 2 * EXPERTS
    pooled = [g for g in plan.factorized_groups if len(g.members) == 2 * EXPERTS]
    assert len(pooled) == 2 and all(g.calibration_tokens == 768 * TOP_K for g in pooled)
    # at the same rank a shared basis stores one B per layer instead of one per expert
    saved = sum(p.numel() for p in per_expert.parameters()) - sum(p.numel() for p in model.parameters())
    assert saved == 2 * (EXPERTS - 1) * pooled[0].rank * pooled[0].d_in


def test_a_shared_basis_refuses_sequential_calibration():
    with pytest.raises(UsageError, match="shared expert basis"):
        le.LordConfig(rank_reduction=0.5, expert_basis="shared", calibration="compensating")


class ToyExperts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 16, 16))


def test_unrecognized_expert_weights_get_a_warning_with_their_share(caplog):
    model = nn.Sequential(nn.Linear(16, 16), nn.Module())
    model[1].add_module("experts", ToyExperts())
    with caplog.at_level(logging.WARNING):
        _, warning = prepare_experts(model)
    assert "1.experts.weight" in warning and "79.0%" in warning  # 1024 of 1296
    assert "1.experts.weight" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("basis", ["per-expert", "shared"])
@pytest.mark.parametrize("arch", MOE)
def test_from_a_directory_through_the_cli(arch, basis, model_dirs, code_corpus, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    src, out = model_dirs(arch), tmp_path / "lord"
    args = ["compress", str(src), str(out), "--calib", str(code_corpus), "--calib-samples", "8"]
    args += ["--calib-seqlen", "48", "--batch-size", "2", "-q", "--param-ratio", "0.85", "--expert-basis", basis]
    if (arch, basis) != ("mixtral", "per-expert"):
        args += ["--refine", "none"]  # one run of the whole recipe (block refinement of experts) is enough
    assert cli_main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["params_after"] <= 0.85 * report["params_before"] + 1
    assert bool(report["timings"].get("refinement")) == ("--refine" not in args)  # the recipe refines by default
    plan = json.loads((out / "lord_plan.json").read_text())
    experts = [g for g in plan["groups"] if g["factorized"] and ".experts." in g["name"]]
    assert experts  # the allocation spends the budget on experts too
    model = le.load(out)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(ids).logits, hf(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    hf.save_pretrained(tmp_path / "resaved")
    again = le.load(tmp_path / "resaved")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, a, rtol=0, atol=1e-5)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **gen), hf.generate(ids, **gen))


@pytest.mark.parametrize("arch", MOE)
def test_a_directory_whose_experts_all_stay_dense_loads(arch, model_dirs, code_corpus, tmp_path, capsys):
    """Experts left dense (not targeted, or given no rank by the allocation) are written per expert,
    like the factorized ones, and every loader reads them back."""
    from transformers import AutoModelForCausalLM

    src, out = model_dirs(arch), tmp_path / "lord"
    args = ["compress", str(src), str(out), "--calib", str(code_corpus), "--calib-samples", "4"]
    args += ["--calib-seqlen", "48", "--batch-size", "2", "-q", "--rank-reduction", "0.5", "--targets", "attention"]
    assert cli_main(args) == 0, capsys.readouterr().err
    ids = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = le.load(out)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_graph_pass_refuses_fused_experts_and_names_the_fallback():
    from lord_export.core.experts import fused_experts

    dense = tiny_model("qwen3_moe")
    if next(fused_experts(dense), None) is None:
        pytest.skip("transformers 4 keeps experts as nn.Linear: nothing fused to refuse")
    model = copy.deepcopy(dense)
    plan = le.compress(model, many_batches(), rank_reduction=0.5, targets=("experts",))
    compiled = torch.compile(dense, backend="lord", options={"plan": plan})
    with pytest.raises(Exception, match="holds fused .*lord_export.load"):
        compiled(torch.randint(3, 200, (1, 8)))
