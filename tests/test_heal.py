"""heal(): a few steps lower the loss and the result is the same LoRD structure (real PEFT, tiny models)."""

from __future__ import annotations

import copy

import pytest
import torch

import lord_export
from lord_export.heal import heal
from tests.conftest import correlated_batches, tiny_model


def _structure(model: torch.nn.Module) -> dict[str, tuple]:
    out: dict[str, tuple] = {n: (type(m).__name__,) for n, m in model.named_modules()}
    out.update({n: tuple(p.shape) for n, p in model.named_parameters()})
    return out


@pytest.fixture(scope="module")
def dense_and_lord():
    dense = tiny_model("llama")
    lord = copy.deepcopy(dense)
    lord_export.compress(lord, correlated_batches(), rank_reduction=0.5)
    return dense, lord


@pytest.mark.parametrize("mode", ["lora", "factors"])
def test_heal_lowers_loss_and_keeps_structure(dense_and_lord, mode, tmp_path):
    if mode == "lora":
        pytest.importorskip("peft")
    _, lord = dense_and_lord
    model = copy.deepcopy(lord)
    before = _structure(model)
    batches = correlated_batches(n_batches=2, batch=4, seq=32, seed=7)
    report = heal(model, batches, steps=8, lr=1e-2, lora_r=4, mode=mode)
    assert report["last_loss"] < report["first_loss"] - 0.05, report["loss"]
    assert len(report["loss"]) == 8 and report["seconds"] > 0 and report["peak_memory_bytes"] > 0
    assert _structure(model) == before
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    old = lord.state_dict()
    assert any(not torch.equal(t, old[k]) for k, t in model.state_dict().items())


def test_heal_distillation_pulls_the_student_towards_the_teacher(dense_and_lord):
    pytest.importorskip("peft")
    _, lord = dense_and_lord
    model = copy.deepcopy(lord)
    teacher = tiny_model("llama", seed=3)  # far from the student, so the KL term has something to close
    batches = correlated_batches(n_batches=2, batch=4, seq=32, seed=7)
    report = heal(model, batches, steps=6, lr=1e-2, lora_r=4, distill_model=teacher, lm_weight=0.0)
    assert report["distill"] and len(report["kl"]) == 6
    assert report["kl"][-1] < report["kl"][0], report["kl"]
