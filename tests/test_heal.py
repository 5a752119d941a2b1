"""heal(): a few steps lower the loss and the result is the same LoRD structure (real PEFT, tiny models)."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
import torch

import lord_export
from lord_export.pipeline.heal import heal
from tests.cli_runner import run_cli
from tests.helpers import correlated_batches, tiny_model


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
    # constant rate: a cosine decay over 8 steps leaves too few full-rate steps for a clear drop
    report = heal(model, batches, steps=8, lr=1e-2, lora_r=4, mode=mode, schedule="constant")
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


def test_hidden_state_distillation_closes_every_blocks_gap(dense_and_lord):
    """The per-block term is 0 for identical models, positive otherwise, and training lowers it."""
    from lord_export.pipeline.heal import _hidden_mse

    dense, lord = dense_and_lord
    ids = correlated_batches(n_batches=1, batch=2, seq=16, seed=5)[0]["input_ids"]
    with torch.no_grad():
        hd = dense(input_ids=ids, output_hidden_states=True).hidden_states
        hl = lord(input_ids=ids, output_hidden_states=True).hidden_states
    assert float(_hidden_mse(hd, hd, None)) == 0.0
    assert float(_hidden_mse(hl, hd, None)) > 0.0
    model = copy.deepcopy(lord)
    batches = correlated_batches(n_batches=2, batch=4, seq=32, seed=7)
    report = heal(
        model,
        batches,
        steps=8,
        lr=1e-3,
        mode="factors",
        distill_model=dense,
        lm_weight=0.0,
        distill_weight=0.0,
        hidden_weight=1.0,
        schedule="constant",
    )
    assert len(report["hidden"]) == 8 and report["hidden_weight"] == 1.0
    assert report["hidden"][-1] < report["hidden"][0], report["hidden"]
    with pytest.raises(lord_export.UsageError, match="hidden_weight"):
        heal(copy.deepcopy(lord), batches, steps=2, lr=1e-3, mode="factors", hidden_weight=1.0)


def test_lr_schedule_warms_up_then_decays_to_zero():
    from lord_export.pipeline.heal import lr_factor

    warm = [lr_factor(i, 100, 10, "cosine") for i in range(10)]
    assert warm == sorted(warm) and warm[0] < 0.1 and warm[-1] < 1.0
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    decay = [lr_factor(i, 100, 10, "cosine") for i in range(10, 100)]
    assert decay == sorted(decay, reverse=True) and decay[-1] < 1e-3
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert [lr_factor(i, 100, 0, "constant") for i in (0, 50, 99)] == [1.0, 1.0, 1.0]
    with pytest.raises(lord_export.UsageError, match="warmup_steps"):
        heal(torch.nn.Linear(2, 2), [torch.zeros(1, 2, dtype=torch.long)], steps=4, lr=1e-3, warmup_steps=4)


# ---- the ``lord-export heal`` command, run as a real subprocess ----------------------------------------------------


DATA_OPTS = ("--calib-samples", "8", "--calib-seqlen", "32", "--batch-size", "4")


@pytest.fixture(scope="module")
def tiny_lord_dir(tiny_llama_dir, code_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("heal") / "lord"
    proc = run_cli("compress", str(tiny_llama_dir), str(out), "--calib", str(code_corpus), "--rank-reduction", "0.5",
                   "--calib-samples", "16", "--calib-seqlen", "64", "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def healed_dir(tiny_lord_dir, tiny_llama_dir, code_corpus, tmp_path_factory):
    pytest.importorskip("peft")
    out = tmp_path_factory.mktemp("healed") / "healed"
    train = code_corpus / "json_encoder.py"
    held_out = code_corpus / "textwrap.py"
    proc = run_cli("heal", str(tiny_lord_dir), str(out), "--calib", str(train), *DATA_OPTS, "--steps", "6",
                   "--lr", "1e-2", "--lora-r", "4", "--eval", str(held_out), "--eval-window", "64",
                   "--distill", str(tiny_llama_dir), "--device", "cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "perplexity" in proc.stdout
    return out


@pytest.mark.slow
def test_cli_heal_writes_a_healed_lord_directory(healed_dir, tiny_lord_dir):
    names = {p.name for p in healed_dir.iterdir()}
    assert {"config.json", "model.safetensors", "lord_plan.json", "report.json", "heal_report.json"} <= names
    assert "tokenizer.json" in names
    r = json.loads((healed_dir / "heal_report.json").read_text())
    assert r["mode"] == "lora" and r["steps"] == 6 and len(r["loss"]) == 6 and r["distill"] and len(r["kl"]) == 6
    assert r["seconds"] > 0 and r["peak_memory_bytes"] > 0 and r["device"] == "cpu"
    ev = r["eval"]
    assert ev["window"] == 64 and ev["before"]["perplexity"] > 1 and ev["after"]["perplexity"] > 1
    assert ev["before"]["tokens"] == ev["after"]["tokens"] > 0
    # the per-group errors were measured before healing: cleared, and the plan says why
    plan = json.loads((healed_dir / "lord_plan.json").read_text())
    old = json.loads((tiny_lord_dir / "lord_plan.json").read_text())
    assert any(g["factorized"] for g in plan["groups"])
    for g, o in zip(plan["groups"], old["groups"], strict=True):
        assert (g["name"], g["rank"], g["factorized"]) == (o["name"], o["rank"], o["factorized"])
        if g["factorized"]:
            assert g["relative_error"] is None and o["relative_error"] is not None
    assert any(w.startswith("healed") for w in plan["warnings"])
    report = json.loads((healed_dir / "report.json").read_text())
    assert all(g["relative_error"] is None for g in report["groups"] if g["factorized"]) and report["healed"]
    # same structure, new weights
    healed, lord = lord_export.load(healed_dir), lord_export.load(tiny_lord_dir)
    assert _structure(healed) == _structure(lord)
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    assert not torch.allclose(healed(ids).logits, lord(ids).logits)


def test_cli_heal_factors_mode(tiny_lord_dir, code_corpus, tmp_path):
    out = tmp_path / "healed"
    proc = run_cli("heal", str(tiny_lord_dir), str(out), "--calib", str(code_corpus), *DATA_OPTS, "--steps", "3",
                   "--mode", "factors", "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads((out / "heal_report.json").read_text())
    assert r["mode"] == "factors" and r["lora_r"] is None and r["eval"] is None and len(r["loss"]) == 3
    assert _structure(lord_export.load(out)) == _structure(lord_export.load(tiny_lord_dir))


@pytest.mark.slow
def test_healed_directory_exports_to_onnx_and_compiles(healed_dir, tiny_lord_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from lord_export.export.dynamo import make_backend
    from lord_export.export.onnx import export_onnx

    healed_report = export_onnx(healed_dir, tmp_path / "onnx-healed")
    lord_report = export_onnx(tiny_lord_dir, tmp_path / "onnx-lord")
    assert healed_report["validation"]["passed"]
    assert healed_report["bottleneck_matmuls"] == lord_report["bottleneck_matmuls"] > 0
    assert healed_report["up_projection_matmuls"] == lord_report["up_projection_matmuls"]

    model = lord_export.load(healed_dir)
    ids = torch.tensor([[1, 5, 9, 30, 7, 11, 3]])
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, backend=make_backend())(ids).logits
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def _bad(*args: str, out) -> subprocess.CompletedProcess:
    proc = run_cli("heal", *args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc


def test_cli_heal_refuses_a_dense_directory(tiny_llama_dir, code_corpus, tmp_path):
    out = tmp_path / "o"
    proc = _bad(str(tiny_llama_dir), str(out), "--calib", str(code_corpus), out=out)
    assert "dense model directory, not a LoRD one" in proc.stderr and "lord-export compress" in proc.stderr
    assert not out.exists()


def test_cli_heal_refuses_missing_or_empty_data(tiny_lord_dir, tmp_path):
    out = tmp_path / "o"
    proc = _bad(str(tiny_lord_dir), str(out), "--calib", str(tmp_path / "nope.py"), out=out)
    assert "training data" in proc.stderr and "does not exist" in proc.stderr
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.py").write_text("")
    proc = _bad(str(tiny_lord_dir), str(out), "--calib", str(tmp_path / "empty"), out=out)
    assert "no non-empty text files" in proc.stderr
    proc = _bad(str(tiny_lord_dir), str(out), "--calib", str(tmp_path / "empty" / "a.py"), out=out)
    assert "is empty" in proc.stderr
    proc = _bad(str(tiny_lord_dir), str(out), out=out)  # no training data at all
    assert "--calib" in proc.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["empty"]


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_cli_heal_refuses_non_positive_steps(tiny_lord_dir, code_corpus, tmp_path, steps):
    out = tmp_path / "o"
    proc = _bad(str(tiny_lord_dir), str(out), "--calib", str(code_corpus), "--steps", steps, out=out)
    assert "--steps" in proc.stderr and "positive integer" in proc.stderr
    assert not out.exists()


def test_cli_heal_refuses_warmup_not_below_steps(tiny_lord_dir, code_corpus, tmp_path):
    out = tmp_path / "o"
    args = ("--calib", str(code_corpus), "--steps", "5", "--warmup-steps", "5")
    proc = _bad(str(tiny_lord_dir), str(out), *args, out=out)
    assert "--warmup-steps" in proc.stderr
    assert not out.exists()


def test_cli_heal_refuses_an_existing_output_without_overwrite(tiny_lord_dir, code_corpus, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = _bad(str(tiny_lord_dir), str(out), "--calib", str(code_corpus), *DATA_OPTS, "--steps", "1", out=out)
    assert "--overwrite" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    proc = run_cli("heal", str(tiny_lord_dir), str(out), "--calib", str(code_corpus), *DATA_OPTS, "--steps", "1",
                   "--mode", "factors", "--overwrite-any", "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (out / "heal_report.json").is_file() and not (out / "keep.txt").exists()


@pytest.mark.parametrize("mode", ["lora", "factors"])
def test_a_failure_during_training_leaves_the_model_as_it_was(mode):
    """An exception in the middle of the training loop (here: a batch the model cannot take) leaves no
    adapter, no trained factor, no changed requires_grad and the KV cache setting as before."""
    from lord_export.pipeline.heal import HealConfig, heal

    if mode == "lora":
        pytest.importorskip("peft")
    model = tiny_model("llama")
    lord_export.compress(model, correlated_batches(), rank_reduction=0.5)
    model.model.layers[0].input_layernorm.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = {n: type(m) for n, m in model.named_modules()}
    good = correlated_batches(1)[0]
    bad = {"input_ids": torch.full((2, 8), 10_000)}  # out of the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        heal(model, [good, good, bad], HealConfig(steps=3, mode=mode, lr=1e-2, warmup_steps=0))
    assert {n: type(m) for n, m in model.named_modules()} == modules  # no LoRA wrapper left
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    assert model.config.use_cache is True and not model.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n  # two steps were taken, and undone
