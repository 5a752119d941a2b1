"""PEFT LoRA on LoRD models: default configs, one bottleneck per group, exact merges (real PEFT, no mocks)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import lord_export
from lord_export import LordBottleneck, LordLinear
from lord_export.passes import share_bottlenecks
from tests.helpers import ROOT, correlated_batches, tiny_model

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from lord_export.integrations.peft import LordLoraLinear  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def _compressed(arch: str):
    model = tiny_model(arch)
    plan = lord_export.compress(model, correlated_batches(), rank_reduction=0.5)
    return model, plan


def _structure(model: torch.nn.Module) -> dict[str, tuple]:
    """Module types and parameter shapes: what a merge must leave unchanged."""
    out: dict[str, tuple] = {n: (type(m).__name__,) for n, m in model.named_modules()}
    out.update({n: tuple(p.shape) for n, p in model.named_parameters()})
    return out


def _lm_batch(seed: int = 5) -> torch.Tensor:
    return correlated_batches(n_batches=1, batch=4, seq=32, seed=seed)[0]["input_ids"]


def _train(peft_model: torch.nn.Module, ids: torch.Tensor, steps: int, lr: float = 1e-2) -> list[float]:
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    peft_model.eval()
    return losses


def _count_bottleneck_calls(model: torch.nn.Module) -> tuple[dict[str, int], list]:
    counts: dict[str, int] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, LordBottleneck):
            counts[name] = 0

            def hook(_m, _i, _o, name=name):
                counts[name] += 1

            handles.append(mod.register_forward_hook(hook))
    return counts, handles


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits


def test_llama_lora_default_targets_train_merge_save_load(tmp_path):
    model, plan = _compressed("llama")
    before = _structure(model)
    n_groups = sum(isinstance(m, LordBottleneck) for m in model.modules())
    assert n_groups == 2 * 3  # per layer: q|k|v, gate|up, down

    peft_model = get_peft_model(model, LoraConfig(target_modules=LLAMA_TARGETS, r=4, lora_alpha=8))
    wrapped = {n: m for n, m in peft_model.named_modules() if isinstance(m, LordLoraLinear)}
    assert len(wrapped) == 2 * len(LLAMA_TARGETS)
    for m in wrapped.values():  # the adapter reads the bottleneck h: in_features = the LoRD rank
        assert m.lora_A["default"].in_features == m.get_base_layer().rank
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any("lord_bottlenecks" in n for n in trainable)

    # the shared bottleneck runs once per group and forward, with the adapters active
    counts, handles = _count_bottleneck_calls(peft_model)
    ids = _lm_batch()
    _logits(peft_model, ids)
    assert len(counts) == n_groups and set(counts.values()) == {1}, counts
    for h in handles:
        h.remove()

    lora_b = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    losses = _train(peft_model, ids, steps=8)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(not torch.equal(p, lora_b[n]) for n, p in peft_model.named_parameters() if "lora_B" in n)

    unmerged = _logits(peft_model, ids)
    merged_model = peft_model.merge_and_unload()
    assert not any(isinstance(m, LordLoraLinear) for m in merged_model.modules())
    assert _structure(merged_model) == before  # same ranks, same module types, same names
    merged = _logits(merged_model, ids)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)

    out = lord_export.save_compressed(merged_model, plan, tmp_path / "healed")
    reloaded = lord_export.load(out)
    torch.testing.assert_close(_logits(reloaded, ids), merged, atol=1e-5, rtol=0)

    # the graph pass sees the merged model as any LoRD model: one bottleneck linear per group
    reloaded.config.use_cache = False
    ep = torch.export.export(reloaded, (), {"input_ids": ids}, strict=False)
    share_bottlenecks(ep.graph)
    linear_ops = (F.linear, torch.ops.aten.linear.default)
    n_linears = sum(n.op == "call_function" and n.target in linear_ops for n in ep.graph.nodes)
    expected = sum(isinstance(m, (LordBottleneck, LordLinear, torch.nn.Linear)) for m in reloaded.modules())
    assert n_linears == expected
    torch.testing.assert_close(ep.module()(input_ids=ids).logits, merged, atol=1e-5, rtol=0)


def test_adapter_saves_and_reloads_with_plain_peft_calls(tmp_path):
    model, _ = _compressed("llama")
    ids = _lm_batch()
    peft_model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "down_proj"], r=4))
    _train(peft_model, ids, steps=2)
    expected = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path / "adapter")

    fresh, _ = _compressed("llama")  # same seed and data: the same LoRD base model
    reloaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter")  # config rebuilt from JSON, no registration
    assert sum(isinstance(m, LordLoraLinear) for m in reloaded.modules()) == 4
    torch.testing.assert_close(_logits(reloaded, ids), expected, atol=1e-5, rtol=0)


def test_gpt2_c_attn_fused_layer():
    model, _ = _compressed("gpt2")
    assert isinstance(model.transformer.h[0].attn.c_attn, LordLinear)
    before = _structure(model)
    ids = _lm_batch()
    peft_model = get_peft_model(model, LoraConfig(target_modules=["c_attn"], r=4, fan_in_fan_out=True))
    assert sum(isinstance(m, LordLoraLinear) for m in peft_model.modules()) == 2
    losses = _train(peft_model, ids, steps=6)
    assert losses[-1] < losses[0], losses
    unmerged = _logits(peft_model, ids)
    merged_model = peft_model.merge_and_unload()
    assert _structure(merged_model) == before
    torch.testing.assert_close(_logits(merged_model, ids), unmerged, atol=1e-5, rtol=0)


def test_unmerge_and_disable_restore_the_base_outputs():
    model, _ = _compressed("llama")
    ids = _lm_batch()
    base = _logits(model, ids)
    peft_model = get_peft_model(model, LoraConfig(target_modules=LLAMA_TARGETS, r=4))
    _train(peft_model, ids, steps=2)
    adapted = _logits(peft_model, ids)
    assert (adapted - base).abs().max() > 1e-3
    with peft_model.disable_adapter():
        torch.testing.assert_close(_logits(peft_model, ids), base, atol=1e-5, rtol=0)
    peft_model.merge_adapter()
    torch.testing.assert_close(_logits(peft_model, ids), adapted, atol=1e-5, rtol=0)
    peft_model.unmerge_adapter()
    torch.testing.assert_close(_logits(peft_model, ids), adapted, atol=1e-5, rtol=0)
    base_out = peft_model.unload()
    torch.testing.assert_close(_logits(base_out, ids), base, atol=1e-5, rtol=0)


def _run(code: str, **env: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


@pytest.mark.slow
def test_import_is_lazy_and_hook_applies_in_either_import_order():
    out = _run(
        """
        import sys, lord_export
        assert 'peft' not in sys.modules
        import peft
        from lord_export.integrations.peft_hook import is_patched
        print(is_patched())
        """
    )
    assert out == "True"
    out = _run(
        """
        import peft, lord_export
        from lord_export.integrations.peft_hook import is_patched
        print(is_patched())
        """
    )
    assert out == "True"


def test_without_the_hook_a_config_needs_register_lora():
    """What a user writes when the hook is off: one register_lora(config) call per config."""
    out = _run(
        """
        import sys; sys.path.insert(0, "tests")
        import lord_export
        from helpers import tiny_model, correlated_batches
        from peft import LoraConfig, get_peft_model
        from lord_export.integrations.peft import register_lora
        m = tiny_model("llama"); lord_export.compress(m, correlated_batches(), rank_reduction=0.5)
        try:
            get_peft_model(m, LoraConfig(target_modules=["q_proj"]))
        except ValueError as e:
            print("refused:", "is not supported" in str(e))
        m = tiny_model("llama"); lord_export.compress(m, correlated_batches(), rank_reduction=0.5)
        p = get_peft_model(m, register_lora(LoraConfig(target_modules=["q_proj", "down_proj"])))
        print(sum(type(x).__name__ == "LordLoraLinear" for x in p.modules()))
        """,
        LORD_EXPORT_PEFT_HOOK="0",
    )
    assert out.splitlines() == ["refused: True", "4"]
