"""The ``lord-export compress`` command, run as a real subprocess: success, report, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lord_export as le
from tests.cli_runner import run_cli


def test_compress_writes_a_loadable_directory_with_a_report(tiny_llama_dir, code_corpus, tmp_path):
    out = tmp_path / "lord"
    before = {p.name: p.read_bytes() for p in tiny_llama_dir.iterdir()}
    proc = run_cli(
        "compress",
        str(tiny_llama_dir),
        str(out),
        "--calib",
        str(code_corpus),
        "--rank-reduction",
        "0.5",
        "--calib-samples",
        "16",
        "--calib-seqlen",
        "64",
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    assert "group(s) factorized" in proc.stdout
    assert {p.name: p.read_bytes() for p in tiny_llama_dir.iterdir()} == before  # input untouched
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "lord_plan.json", "report.json", "tokenizer.json"} <= names
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "lord" and report["rank_reduction"] == 0.5
    assert report["params_after"] < report["params_before"]
    calibration = report["calibration"]  # the default holdout (1/8 of the blocks) is never fitted on
    assert (calibration["samples"], calibration["held_out_samples"]) == (14, 2)
    assert calibration["tokens"] == 14 * 64 and calibration["sampling"] == "spread"
    for g in report["groups"]:
        for key in (
            "members",
            "d_in",
            "d_out",
            "rank",
            "parity_rank",
            "factorized",
            "reason",
            "calibration_tokens",
            "relative_error",
            "optimal_relative_error",
        ):
            assert key in g
        if g["factorized"]:
            assert g["relative_error"] == pytest.approx(g["optimal_relative_error"], rel=1e-3)  # float32 factors
        else:
            assert "parity" in g["reason"]
    model = le.load(out)
    ids = torch.tensor([[1, 5, 9, 30, 7]])
    assert model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 9)


def test_svd_method_and_targets(tiny_llama_dir, code_corpus, tmp_path):
    out = tmp_path / "svd"
    proc = run_cli(
        "compress",
        str(tiny_llama_dir),
        str(out),
        "--calib",
        str(code_corpus),
        "--rank-reduction",
        "0.6",
        "--method",
        "svd",
        "--targets",
        "mlp",
        "--exclude",
        "re:.*layers\\.1\\..*",
        "--rank-multiple",
        "8",
        "--calib-samples",
        "4",
        "--calib-seqlen",
        "64",
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    members = [m["name"] for g in report["groups"] for m in g["members"]]
    assert members == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert all(g["rank"] % 8 == 0 for g in report["groups"])
    assert all(g["relative_error"] >= g["optimal_relative_error"] for g in report["groups"])


@pytest.fixture()
def binary_file(tmp_path):
    p = tmp_path / "blob.bin"
    p.write_bytes(bytes(range(256)) * 4)
    return p


BAD = {
    "rank reduction 1": (["--rank-reduction", "1.0"], "must be in [0, 1)"),
    "rank reduction -0.1": (["--rank-reduction", "-0.1"], "must be in [0, 1)"),
    "rank reduction text": (["--rank-reduction", "lots"], "must be a number"),
    "unknown method": (["--rank-reduction", "0.3", "--method", "magic"], "invalid choice: 'magic'"),
    "targets match nothing": (["--rank-reduction", "0.3", "--targets", "qkv_proj"], "matches no linear layer"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_exit_2_and_write_nothing(case, tiny_llama_dir, code_corpus, tmp_path):
    args, message = BAD[case]
    out = tmp_path / "out"
    proc = run_cli(
        "compress",
        str(tiny_llama_dir),
        str(out),
        "--calib",
        str(code_corpus),
        "--calib-samples",
        "2",
        "--calib-seqlen",
        "32",
        *args,
    )
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(("lord-export: error:", "lord-export compress: error:"))
    assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bad_paths_exit_2_and_write_nothing(tiny_llama_dir, code_corpus, tmp_path, binary_file):
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("")
    empty_dir = tmp_path / "emptydir"
    empty_dir.mkdir()
    not_model = tmp_path / "notmodel"
    not_model.mkdir()
    cases = [
        ([str(tmp_path / "missing"), "--calib", str(code_corpus)], "does not exist"),
        ([str(not_model), "--calib", str(code_corpus)], "no config.json"),
        ([str(tiny_llama_dir), "--calib", str(tmp_path / "nope.txt")], "does not exist"),
        ([str(tiny_llama_dir), "--calib", str(empty_file)], "is empty"),
        ([str(tiny_llama_dir), "--calib", str(empty_dir)], "no non-empty text files"),
        ([str(tiny_llama_dir), "--calib", str(binary_file)], "is binary"),
    ]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in cases:
        model_dir, *rest = args
        proc = run_cli("compress", model_dir, str(tmp_path / "out"), *rest, "--rank-reduction", "0.3")
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.slow
def test_existing_output_is_refused_unless_overwrite(tiny_llama_dir, code_corpus, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    common = [
        "compress",
        str(tiny_llama_dir),
        str(out),
        "--calib",
        str(code_corpus),
        "--rank-reduction",
        "0.5",
        "--calib-samples",
        "2",
        "--calib-seqlen",
        "32",
        "-q",
    ]
    proc = run_cli(*common)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "keep.txt").read_text() == "precious"
    # --overwrite replaces only what lord_export wrote: this directory is the user's
    proc = run_cli(*common, "--overwrite")
    assert proc.returncode == 2 and "lord_export did not write it" in proc.stderr and "--overwrite-any" in proc.stderr
    assert (out / "keep.txt").read_text() == "precious"
    proc = run_cli(*common, "--overwrite-any")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "keep.txt").exists() and (out / "lord_plan.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary directory left behind
    proc = run_cli(*common, "--overwrite")  # now it is a LoRD directory: --overwrite replaces it
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_few_calibration_tokens_warn_but_succeed(tiny_llama_dir, tmp_path):
    text = tmp_path / "tiny.txt"
    text.write_text("def f(x):\n    return x\n")
    out = tmp_path / "out"
    proc = run_cli("compress", str(tiny_llama_dir), str(out), "--calib", str(text), "--rank-reduction", "0.5", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "fewer calibration tokens than features" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert any("fewer calibration tokens" in w for w in report["warnings"])


def test_help_explains_the_knobs():
    proc = run_cli("compress", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for flag in (
        "--rank-reduction",
        "--calib",
        "--targets",
        "--method",
        "--rank-multiple",
        "--force",
        "--overwrite",
        "mlp-down",
        "min(sum d_out, d_in)",
    ):
        assert flag in text


def test_console_script_is_installed():
    exe = shutil.which("lord-export", path=str(Path(sys.executable).parent))
    assert exe is not None
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "compress" in proc.stdout


@pytest.mark.slow
def test_eval_is_independent_of_batch_size_and_reads_lord_dirs(tiny_llama_dir, code_corpus, tmp_path):
    results = []
    for batch in ("1", "5"):
        out = tmp_path / f"ppl{batch}.json"
        proc = run_cli(
            "eval",
            str(tiny_llama_dir),
            "--data",
            str(code_corpus),
            "--window",
            "64",
            "--batch-size",
            batch,
            "--json",
            str(out),
            "-q",
        )
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(out.read_text()))
    a, b = results
    assert a["tokens"] == b["tokens"] > 1000
    assert a["nll"] == pytest.approx(b["nll"], rel=1e-6)
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-6)
    lord = tmp_path / "lord"
    assert (
        run_cli(
            "compress",
            str(tiny_llama_dir),
            str(lord),
            "--calib",
            str(code_corpus),
            "--rank-reduction",
            "0.5",
            "--calib-samples",
            "8",
            "--calib-seqlen",
            "64",
            "-q",
        ).returncode
        == 0
    )
    proc = run_cli("eval", str(lord), "--data", str(code_corpus), "--window", "64", "-q")
    assert proc.returncode == 0 and proc.stdout.startswith("perplexity ")


@pytest.mark.slow
def test_eval_bad_input(tiny_llama_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    proc = run_cli("eval", str(tiny_llama_dir), "--data", str(short), "--window", "64")
    assert proc.returncode == 2 and "fewer than one window" in proc.stderr
    proc = run_cli("eval", str(tiny_llama_dir), "--data", str(short), "--window", "4096")
    assert proc.returncode == 2 and "exceeds the model's 128 positions" in proc.stderr


@pytest.mark.slow
def test_sweep_writes_table_and_plots(tiny_llama_dir, code_corpus, tmp_path):
    out = tmp_path / "sweep"
    proc = run_cli(
        "sweep",
        str(tiny_llama_dir),
        "--calib",
        str(code_corpus),
        "--eval",
        str(code_corpus),
        "--rank-reductions",
        "0.3,0.6",
        "--targets",
        "all",
        "mlp",
        "--methods",
        "lord,svd",
        "--calib-samples",
        "8",
        "--calib-seqlen",
        "64",
        "--window",
        "64",
        "--out",
        str(out),
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "sweep.json").read_text())
    rows = data["rows"]
    assert len(rows) == 2 * 2 * 2
    assert {(r["method"], r["targets"]) for r in rows} == {
        ("lord", "all"),
        ("lord", "mlp"),
        ("svd", "all"),
        ("svd", "mlp"),
    }
    for method in ("lord", "svd"):
        for target in ("all", "mlp"):
            a, b = sorted(
                (r for r in rows if r["method"] == method and r["targets"] == target), key=lambda r: r["rank_reduction"]
            )
            assert b["params"] < a["params"] <= data["dense"]["params"]
    assert all(p["parity_rank_reduction"] > 0 for p in data["parity"])
    for name in ("sweep.csv", "ppl_vs_rank_reduction.png", "ppl_vs_params.png", "params_vs_rank_reduction.png"):
        assert (out / name).stat().st_size > 0
    bad = run_cli(
        "sweep",
        str(tiny_llama_dir),
        "--calib",
        str(code_corpus),
        "--eval",
        str(code_corpus),
        "--rank-reductions",
        "0.3,1.2",
        "--out",
        str(tmp_path / "x"),
    )
    assert bad.returncode == 2 and "[0, 1)" in bad.stderr


@pytest.mark.slow
def test_sweep_over_budgets_allocations_and_calibration_modes(tiny_llama_dir, code_corpus, tmp_path):
    out = tmp_path / "sweep"
    proc = run_cli(
        "sweep", str(tiny_llama_dir), "--calib", str(code_corpus), "--eval", str(code_corpus),
        "--rank-reductions", "0.5", "--param-ratios", "0.8,0.9", "--allocations", "fisher,uniform",
        "--calibrations", "independent,compensating", "--methods", "lord", "--calib-samples", "8",
        "--calib-seqlen", "64", "--window", "64", "--out", str(out), "-q",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "sweep.json").read_text())["rows"]
    assert len(rows) == 2 * (1 + 2 * 2)  # calibrations × (rank reductions + param ratios × allocations)
    dense = json.loads((out / "sweep.json").read_text())["dense"]["params"]
    for r in rows:
        if r["param_ratio"] is not None:  # the budget is met (within one rank step, never above it)
            assert r["params"] <= r["param_ratio"] * dense + 1 and r["allocation"] in ("fisher", "uniform")
    assert {r["calibration"] for r in rows} == {"independent", "compensating"}
    assert (out / "ppl_vs_params.png").stat().st_size > 0
