"""Every ``lord-export compress`` path, from a model DIRECTORY (the block-by-block engine, as users run
it), on every architecture of the test matrix: rank reduction, a parameter ratio with each allocation,
each calibration mode. Each output loads and generates, and meets what was asked."""

from __future__ import annotations

import json

import pytest
import torch

import lord_export as le
from lord_export.cli import main as cli_main
from tests.helpers import CAUSAL, MIXED, tiny_model

pytestmark = pytest.mark.slow

PATHS = {
    "rank-reduction": ["--rank-reduction", "0.5"],
    "ratio-fisher": ["--param-ratio", "0.9", "--allocation", "fisher"],  # the default recipe: refined
    "ratio-spectrum": ["--param-ratio", "0.9", "--allocation", "spectrum", "--refine", "none"],
    "ratio-uniform": ["--param-ratio", "0.9", "--allocation", "uniform", "--refine", "none"],
    "ratio-svdllm-v2": ["--param-ratio", "0.9", "--allocation", "svdllm-v2", "--refine", "none"],
    "sequential": ["--rank-reduction", "0.5", "--calibration", "sequential"],
    "compensating": ["--rank-reduction", "0.5", "--calibration", "compensating"],
    "ratio-compensating": ["--param-ratio", "0.9", "--calibration", "compensating", "--refine", "none"],
}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("arch", CAUSAL)
def test_every_path_from_a_directory(arch, path, model_dirs, code_corpus, tmp_path, capsys):
    src, out = model_dirs(arch), tmp_path / "lord"
    args = ["compress", str(src), str(out), "--calib", str(code_corpus), "--calib-samples", "4"]
    args += ["--calib-seqlen", "48", "--batch-size", "2", "-q", *PATHS[path]]
    assert cli_main(args) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["block_by_block"]
    assert report["groups_factorized"] > 0
    if "--param-ratio" in PATHS[path]:
        assert report["params_after"] <= 0.9 * report["params_before"] + 1
    model = le.load(out)
    assert any(isinstance(m, le.LordLinear) for m in model.modules())
    plan = json.loads((out / "lord_plan.json").read_text())
    assert plan["base_model"]["weights"], "the plan records the dense weights it replaced"
    ids = torch.tensor([[1, 5, 9, 13]])
    tokens = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert tokens.shape == (1, 8)


@pytest.mark.parametrize("arch", CAUSAL)
def test_captured_calls_reproduce_the_models_own_forward(arch):
    """Running the blocks one by one with the calls the engine captured gives exactly the hidden states
    the model's own forward gives its last block - also where layers get different masks and rotary
    tables (Gemma 2/3, sliding windows), which one shared call cannot reproduce."""
    from lord_export.calibration.blocks import run_block
    from lord_export.pipeline.engine import Engine, find_streamable_blocks
    from tests.helpers import correlated_batches

    model = tiny_model(arch)
    batches = correlated_batches(n_batches=2, batch=2, seq=40)
    blocks, _ = find_streamable_blocks(model)
    engine = Engine(model, le.LordConfig(rank_reduction=0.5), device="cpu")
    with torch.no_grad():
        setup = engine.begin(batches, blocks, two=False)
        for i, block in enumerate(blocks.modules):
            for b, call in enumerate(setup.calls[i]):
                setup.streams.dense[b] = run_block(block, setup.streams.dense[b], call)
        seen = []
        handle = blocks.modules[-1].register_forward_hook(
            lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
        )
        for batch in batches:
            model(**batch, use_cache=False)
        handle.remove()
    for b in range(len(batches)):
        torch.testing.assert_close(setup.streams.dense[b], seen[b], rtol=0, atol=0)
    if arch in MIXED:
        assert setup.calls.kinds == 2  # local and global layers are called differently


def test_compress_refuses_a_lord_or_quantized_directory_in_one_line(model_dirs, code_corpus, tmp_path):
    from tests.cli_runner import run_cli

    src, lord = model_dirs("llama"), tmp_path / "lord"
    args = [
        "--calib",
        str(code_corpus),
        "--calib-samples",
        "2",
        "--calib-seqlen",
        "32",
        "--rank-reduction",
        "0.5",
        "-q",
    ]
    assert cli_main(["compress", str(src), str(lord), *args]) == 0
    proc = run_cli("compress", str(lord), str(tmp_path / "twice"), *args)
    assert proc.returncode == 2 and "already a LoRD model" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "twice").exists()
    quantized = tmp_path / "gptq"
    quantized.mkdir()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (quantized / "config.json").write_text(json.dumps(config))
    proc = run_cli("compress", str(quantized), str(tmp_path / "q"), *args)
    assert proc.returncode == 2 and "quantized (gptq)" in proc.stderr, proc.stderr


def test_a_plan_made_from_a_directory_refuses_a_finetuned_model(model_dirs, code_corpus, tmp_path):
    """The block-by-block path records the dense weights' fingerprints, so every consumer of the plan
    refuses a fine-tuned copy of the base model (whose tuned weights the factors would replace)."""
    from lord_export.export.graph import export_lord
    from lord_export.persist.hf import load_dense

    src, out = model_dirs("llama"), tmp_path / "lord"
    args = ["compress", str(src), str(out), "--calib", str(code_corpus), "--calib-samples", "2"]
    assert cli_main([*args, "--calib-seqlen", "32", "--param-ratio", "0.9", "-q"]) == 0
    plan = le.read_plan(out)
    tuned = load_dense(src, dtype=torch.float32)
    name = plan.factorized_groups[0].members[0].name
    with torch.no_grad():
        tuned.get_submodule(name).weight.mul_(1.4)
    with pytest.raises(le.PlanError, match="differs from the plan's base model"):
        le.apply_plan(tuned, plan)
    with pytest.raises(le.PlanError, match="differs from the plan's base model"):
        le.compile(tuned, out)
    with pytest.raises(le.PlanError, match="differs from the plan's base model"):
        export_lord(tuned, plan, (), {"input_ids": torch.tensor([[1, 5, 9]]), "use_cache": False})
    le.apply_plan(load_dense(src, dtype=torch.float32), plan)  # the true base model is accepted
