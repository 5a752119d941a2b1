"""Every integration example runs, as users run it (a subprocess, the example's own arguments), on a tiny
model directory, and shows what it claims."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.helpers import ROOT

EXAMPLES = ROOT / "examples"
pytestmark = pytest.mark.slow


def run_example(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def on_tiny(tiny_llama_dir, code_corpus) -> list[str]:
    return [str(tiny_llama_dir), "--calib", str(code_corpus), "--prompt", "def f(x):"]


def test_compile_generate_runs_the_lord_graph(tiny_llama_dir, code_corpus):
    out = run_example("compile_generate.py", *on_tiny(tiny_llama_dir, code_corpus))
    assert "compiled dense + plan == eager LoRD: True" in out


def test_from_pretrained_and_pipeline(tiny_llama_dir, code_corpus):
    out = run_example("from_pretrained_pipeline.py", *on_tiny(tiny_llama_dir, code_corpus))
    layers = [int(line.split(":")[1]) for line in out.splitlines() if "LoRD layers:" in line or "after save" in line]
    assert len(layers) == 2 and layers[0] > 0 and layers[0] == layers[1]


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs lord_export[peft]")
def test_peft_finetune_merges_into_a_lord_model(tiny_llama_dir, code_corpus):
    out = run_example("peft_finetune.py", *on_tiny(tiny_llama_dir, code_corpus), "--steps", "3")
    merged = next(int(line.split(":")[1]) for line in out.splitlines() if line.startswith("LoRD layers after"))
    reloaded = next(int(line.split(":")[1]) for line in out.splitlines() if line.startswith("tuned model reloads"))
    assert merged > 0 and merged == reloaded


def test_onnx_runtime_matches_pytorch(tiny_llama_dir, code_corpus):
    out = run_example("onnx_runtime.py", *on_tiny(tiny_llama_dir, code_corpus))
    error = float(out.split("max relative error")[1].split()[0])
    assert error < 1e-4 and "bottleneck MatMuls" in out


def test_torch_export_program_matches_eager(tiny_llama_dir, code_corpus):
    out = run_example("torch_export.py", *on_tiny(tiny_llama_dir, code_corpus))
    assert float(out.split("max abs difference")[1].split()[0]) < 1e-4


@pytest.mark.skipif(
    importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.onnxruntime") is None,
    reason="needs lord_export[optimum] (optimum-onnx pins transformers < 4.58)",
)
def test_optimum_export_loads_in_ort_model_for_causal_lm(tiny_llama_dir, code_corpus, tmp_path):
    out = run_example("optimum_onnx.py", *on_tiny(tiny_llama_dir, code_corpus), "--out", str(tmp_path))
    assert "model.onnx" in out and (tmp_path / "onnx-lord" / "lord_config.json").is_file()


def test_quickstart_runs():
    out = run_example("quickstart.py")
    assert "fewer" in out or "parameters" in out
