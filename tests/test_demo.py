"""The shipped reference code model, its data split, and `lord-export demo`."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lord_export.calibration.data import document_windows, read_documents, text_files
from lord_export.measure.reference import (
    SPLITS,
    reference_model_dir,
    split_of,
    split_texts,
    stdlib_root,
    stdlib_sources,
    stdlib_split,
)
from lord_export.persist.hf import load_dense, load_tokenizer
from lord_export.pipeline.evaluate import perplexity
from tests.cli_runner import run_cli


def test_split_is_by_path_hash_disjoint_and_complete():
    root = stdlib_root()
    parts = {s: set(stdlib_split(s)) for s in SPLITS}
    assert all(parts.values())
    assert not (parts["train"] & parts["calib"]) and not (parts["train"] & parts["eval"])
    assert not (parts["calib"] & parts["eval"])
    assert set().union(*parts.values()) == set(stdlib_sources())
    assert not any("site-packages" in p.parts for p in parts["train"])
    # the rule itself: bucket = sha256(relative posix path) mod 100
    assert split_of("asyncio/tasks.py") == "calib"
    assert split_of("json/encoder.py") == "train"
    for p in list(parts["eval"])[:5]:
        rel = p.relative_to(root).as_posix()
        assert int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 100 >= 95
    with pytest.raises(ValueError, match="unknown split"):
        stdlib_split("test")
    for split in ("calib", "eval"):  # what the demo and the sweep read must pass the data readers' checks
        assert text_files(split_texts(split)) == split_texts(split)


def test_reference_model_ships_and_has_learned_python():
    d = reference_model_dir()
    record = json.loads((d / "training_log.json").read_text())
    assert (d / "model.safetensors").stat().st_size <= 20 * 2**20
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    model = load_dense(d, dtype=torch.float32)
    tokenizer = load_tokenizer(d)
    files = stdlib_split("eval")[:6]
    windows = document_windows(tokenizer, read_documents(files), 256)
    ppl = perplexity(model, windows, batch_size=8, pad_id=tokenizer.pad_token_id).perplexity
    unigram = record["result"]["unigram_heldout_perplexity"]
    # a learned model: far below the unigram baseline on held-out files it never saw
    assert math.isfinite(ppl) and ppl < unigram / 10, (ppl, unigram)
    text = tokenizer.decode(tokenizer("def main():\n    return 0\n")["input_ids"])
    assert text == "def main():\n    return 0\n"  # byte-level BPE round-trips source exactly


@pytest.mark.slow
def test_demo_on_a_given_model_writes_table_json_plot_and_onnx(tiny_llama_dir, code_corpus, tmp_path):
    out = tmp_path / "demo"
    args = [
        "demo",
        str(tiny_llama_dir),
        "--calib",
        str(code_corpus),
        "--eval",
        str(code_corpus),
        "--rank-reductions",
        "0.5",
        "--eval-tokens",
        "2000",
        "--latency-tokens",
        "32",
        "--repeats",
        "2",
        "--out",
        str(out),
    ]
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "demo.json").read_text())
    dense, lord = result["rows"]
    assert dense["setting"] == "dense" and lord["setting"] == "lord 0.5"
    assert lord["params"] < dense["params"] and lord["bottleneck_matmuls"] > 0 == dense["bottleneck_matmuls"]
    assert lord["ideal_speedup"] > 1.0 and lord["ort_ms"] > 0 and dense["speedup"] == 1.0
    assert all(math.isfinite(r["perplexity"]) for r in result["rows"])
    assert (out / "demo.png").stat().st_size > 0
    assert (out / "onnx" / "lord-0.5" / "model.onnx").is_file()
    assert "speed-up" in proc.stdout and "lord 0.5" in proc.stdout

    first = (out / "demo.json").stat().st_mtime_ns
    assert run_cli(*args).returncode == 0  # an earlier demo output is replaced
    assert (out / "demo.json").stat().st_mtime_ns > first

    other = tmp_path / "mine"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    proc = run_cli(*args[:-1], str(other))
    assert proc.returncode == 2 and "not an earlier demo output" in proc.stderr
    assert [p.name for p in other.iterdir()] == ["keep.txt"]

    proc = run_cli("demo", str(tiny_llama_dir), "--out", str(tmp_path / "x"))
    assert proc.returncode == 2 and "calibration and evaluation data" in proc.stderr
    proc = run_cli(*args[:6], "--rank-reductions", "0.5,1.5", "--out", str(tmp_path / "y"))
    assert proc.returncode == 2 and "in [0, 1)" in proc.stderr and not (tmp_path / "y").exists()


@pytest.mark.slow
def test_demo_default_runs_on_the_reference_model(tmp_path):
    """The README's main job with its defaults (fewer timed runs and eval tokens to keep CI short)."""
    proc = run_cli("demo", "--eval-tokens", "8192", "--repeats", "3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "lord-demo" / "demo.json").read_text())
    assert result["reference_model"] and result["eval_files"] == len(split_texts("eval"))
    dense, *lords = result["rows"]
    assert len(lords) == 2
    for r in lords:
        assert r["params"] < dense["params"] and r["bottleneck_matmuls"] > 0
        # compressed, not broken: held-out perplexity stays within 2x of the dense model's
        assert dense["perplexity"] < r["perplexity"] < 2 * dense["perplexity"]


@pytest.mark.slow
def test_training_script_runs_end_to_end(tmp_path):
    """examples/train_reference_model.py on a few files with a tiny model: it writes a loadable model + record."""
    out = tmp_path / "ref"
    script = Path(__file__).resolve().parents[1] / "examples" / "train_reference_model.py"
    args = ["--out", str(out), "--steps", "4", "--eval-every", "2", "--max-files", "12", "--vocab-size", "600"]
    args += ["--hidden-size", "64", "--layers", "1", "--intermediate-size", "128", "--heads", "2", "--kv-heads", "1"]
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "training_log.json").read_text())
    assert record["result"]["steps"] == 4 and len(record["log"]) == 2
    assert record["data"]["train_files"] == 12
    assert "--steps 4" in (out / "README.md").read_text()
    model = load_dense(out, dtype=torch.float32)
    assert model.config.vocab_size == 600 and next(model.parameters()).dtype == torch.float32
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr
