"""Every supported architecture, as a tiny model from its config: grouping, optimality, exactness,
generation with KV cache, and save → load round trips."""

from __future__ import annotations

import pytest
import torch

import lord_export as le
from lord_export.core.modules import LordLinear
from tests.helpers import ARCHS, CAUSAL, PlainMLP, correlated_batches, tiny_model

# The groups of the first block, as found from the hooks (member leaf names).
FIRST_BLOCK_GROUPS = {
    "llama": [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
    "mistral": [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
    "qwen2": [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
    "qwen3": [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
    "gemma2": [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
    "gemma3": [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
    "mistral_sliding": [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
    "gpt2": [["c_attn"], ["c_proj"], ["c_fc"], ["c_proj"]],
    "gpt_bigcode": [["c_attn"], ["c_proj"], ["c_fc"], ["c_proj"]],
    "codegen": [["qkv_proj"], ["out_proj"], ["fc_in"], ["fc_out"]],
    "phi3": [["o_proj"], ["qkv_proj"], ["gate_up_proj"], ["down_proj"]],  # Phi-3 defines o_proj first
    "bert": [["query", "key", "value"], ["dense"], ["dense"], ["dense"]],
}
FIRST_BLOCK = {
    "bert": "encoder.layer.0.",
    "gpt2": "transformer.h.0.",
    "gpt_bigcode": "transformer.h.0.",
    "codegen": "transformer.h.0.",
}


@torch.no_grad()
def outputs(model, batch):
    out = model(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_and_optimality(arch):
    model = tiny_model(arch, torch.float64)
    plan = le.compress(model, correlated_batches(), rank_reduction=0.3, force=True)
    prefix = FIRST_BLOCK.get(arch, "model.layers.0.")
    first_block = [g for g in plan.groups if g.members[0].name.startswith(prefix)]
    first = [[m.name.rsplit(".", 1)[-1] for m in g.members] for g in first_block]
    assert sorted(first) == sorted(
        FIRST_BLOCK_GROUPS[arch]
    )  # which groups; their order differs across transformers versions
    for g in plan.groups:
        assert g.factorized
        assert g.relative_error == pytest.approx(g.optimal_relative_error, rel=1e-6), g.name
        assert 0 <= g.optimal_relative_error < 1  # 0 for BERT's pooler: it sees 8 tokens < rank
        n_factor = sum(p.numel() for m in g.members for p in [model.get_submodule(m.name).weight])
        assert n_factor + g.rank * g.d_in == g.rank * (g.d_in + g.d_out)  # grouped parameter count


def test_codegen_parallel_block_shares_one_covariance():
    """CodeGen's attention and MLP read the same ln_1 output: one C, but separate groups (parents differ)."""
    model = tiny_model("codegen")
    layers = ["transformer.h.0.attn.qkv_proj", "transformer.h.0.mlp.fc_in"]
    cal = le.calibrate(model, correlated_batches(1), layers)
    assert cal.input_of[layers[0]] == cal.input_of[layers[1]]
    plan = le.make_plan(model, cal, layers, le.LordConfig(rank_reduction=0.5, force=True))
    assert [len(g.members) for g in plan.groups] == [1, 1]


@pytest.mark.parametrize("arch", ARCHS)
def test_full_rank_reproduces_the_model(arch):
    model = tiny_model(arch, torch.float64)
    batch = correlated_batches(1, seed=7)[0]
    ref = outputs(model, batch)
    le.compress(model, correlated_batches(), rank_reduction=0.0, force=True)
    assert any(isinstance(m, LordLinear) for m in model.modules())
    got = outputs(model, batch)
    assert float((got - ref).norm() / ref.norm()) < 1e-6


@pytest.mark.parametrize("arch", CAUSAL)
def test_generate_with_kv_cache(arch):
    model = tiny_model(arch)
    le.compress(model, correlated_batches(), rank_reduction=0.2, force=True)
    prompt = torch.tensor([[5, 17, 42, 9]])
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
    assert cached.shape == (1, 12)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_round_trip(arch, tmp_path):
    model = tiny_model(arch)
    plan = le.compress(model, correlated_batches(), rank_reduction=0.4, force=True)
    out = tmp_path / "lord"
    le.save_compressed(model, plan, out, report=plan.report)
    loaded = le.load(out)
    batch = correlated_batches(1, seed=3)[0]
    torch.testing.assert_close(outputs(loaded, batch), outputs(model, batch), rtol=0, atol=0)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(loaded, "lm_head"):
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    assert not any(n.endswith(".bin") or n.endswith(".pt") for n in (p.name for p in out.iterdir()))
    with pytest.raises(le.UsageError, match="already exists"):
        le.save_compressed(model, plan, out)


def test_plain_module_round_trip(tmp_path):
    model = PlainMLP()
    xs = [torch.randn(8, 24) for _ in range(4)]
    plan = le.compress(model, lambda m: [m(x) for x in xs], rank_reduction=0.3, force=True)
    assert [len(g.members) for g in plan.groups] == [2, 1]
    le.save_compressed(model, plan, tmp_path / "mlp")
    loaded = le.load(tmp_path / "mlp", model=PlainMLP())
    torch.testing.assert_close(loaded(xs[0]), model(xs[0]), rtol=0, atol=0)


def test_grouping_off_gives_single_member_groups():
    model = tiny_model("llama")
    plan = le.compress(model, correlated_batches(), rank_reduction=0.5, grouping=False, force=True)
    assert all(len(g.members) == 1 for g in plan.groups)


def test_parity_leaves_groups_dense_with_a_reason():
    model = tiny_model("llama")
    plan = le.compress(model, correlated_batches(), rank_reduction=0.3)
    o_proj = next(g for g in plan.groups if g.members[0].name.endswith("o_proj"))
    assert not o_proj.factorized and "parity" in o_proj.reason  # square 64x64 needs > 50%
    assert type(model.model.layers[0].self_attn.o_proj).__name__ == "Linear"
    qkv = next(g for g in plan.groups if len(g.members) == 3)
    assert not qkv.factorized  # 64 -> 64+32+32: parity rank 42.7 < kept rank 45
    gate_up = next(g for g in plan.groups if len(g.members) == 2)
    assert gate_up.factorized  # 64 -> 2*160: parity rank 53.3 > 45
    assert plan.report["params_after"] < plan.report["params_before"]
