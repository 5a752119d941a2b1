"""lord-export bench: dense vs LoRD latency across backends, and its refusals of bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import lord_export as le
from lord_export.calibration.data import CalibrationOptions
from lord_export.errors import PlanError, UsageError
from lord_export.measure.backends import BACKENDS, parse_backends
from lord_export.measure.bench import check_same_base
from lord_export.measure.flops import forward_flops
from lord_export.persist.hf import load_dense
from tests.cli_runner import run_cli


def has_optimum() -> bool:
    try:
        import optimum.exporters.onnx  # noqa: F401
    except ImportError:
        return False
    return True


SMALL = ("--tokens", "8", "--decode-context", "8", "--decode-tokens", "2")


@pytest.fixture(scope="module")
def lord_dir(tiny_llama_dir, code_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "lord"
    le.compress_model_dir(
        tiny_llama_dir,
        out,
        [code_corpus],
        le.LordConfig(rank_reduction=0.5, rank_multiple=1),
        data=CalibrationOptions(samples=4, seqlen=32),
    )
    return out


def test_bench_eager_and_onnx_runtime_side_by_side(tiny_llama_dir, lord_dir, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli(
        "bench",
        str(tiny_llama_dir),
        str(lord_dir),
        "--backends",
        "eager,ort-cpu",
        "ort-cuda",
        "tensorrt",
        "--tokens",
        "8",
        "16",
        "--decode-tokens",
        "3",
        "--decode-context",
        "8",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--device",
        "cpu",
        "--json",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    measured = {(r["backend"], r["mode"], r["tokens"]) for r in result["rows"]}
    for backend in ("eager", "ort-cpu"):
        assert {(backend, "prefill", 8), (backend, "prefill", 16)} <= measured
        if backend == "eager" or has_optimum():  # ONNX Runtime decodes with optimum's KV-cache export
            assert (backend, "decode", 8) in measured
    for r in result["rows"]:
        assert r["dense_ms"] > 0 and r["lord_ms"] > 0
        assert r["ideal_speedup"] > 1.0  # rank reduction 0.5 removes FLOPs
        where, dtype = r["runs_on"].rsplit(" ", 1)  # the label says what ran: "torch cpu" / "ORT <provider>"
        where = where.removesuffix(" io-binding")  # ORT on CUDA keeps the KV cache on the device
        assert dtype == "float32"
        if r["backend"] == "eager":
            assert where == "torch cpu"  # --device cpu
        else:
            assert where.startswith("ORT ") and f"{where[4:]}ExecutionProvider" in ort_providers()
    # every backend asked for is measured, skipped with a reason, or failed with one
    assert not result["failed"]
    for backend in ("ort-cuda", "tensorrt"):
        measured_here = any(r["backend"] == backend for r in result["rows"])
        assert measured_here or result["skipped"][backend]
        assert measured_here or f"skipped {backend}: " in proc.stdout
    if not torch.cuda.is_available():
        assert "CUDA" in result["skipped"]["ort-cuda"]
    assert "meas/ideal" in proc.stdout and "eager" in proc.stdout


@pytest.mark.skipif(not has_optimum(), reason="optimum's KV-cache ONNX export is not installed")
def test_ort_decode_with_io_binding_picks_eager_lords_tokens(lord_dir, tmp_path):
    """The KV cache kept as bound OrtValues gives the same greedy tokens as numpy feeds and as eager."""
    from lord_export.export.onnx import export_with_past_optimum, make_session
    from lord_export.measure.runners import ort_greedy, ort_runner

    model = le.load(lord_dir).eval()
    export_with_past_optimum(model, tmp_path, opset=18, validate=False)
    session = make_session(tmp_path / "model.onnx", prefer_cuda=False, threads=1)
    prompt = torch.randint(3, model.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0))
    bound, _ = ort_greedy(session, prompt, 6, io_binding=True)
    host, _ = ort_greedy(session, prompt, 6, io_binding=False)
    with torch.no_grad():
        eager = model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6)[0, 7:].tolist()
    assert bound == host == eager
    assert ort_runner(session, io_binding=True).runs_on == "ORT CPU io-binding float32"
    assert ort_runner(session).runs_on == "ORT CPU float32"  # binding is the default on CUDA only


def test_ideal_speedup_is_the_flop_ratio(tiny_llama_dir, lord_dir):
    dense = load_dense(tiny_llama_dir, dtype=torch.float32)
    lord = le.load(lord_dir)
    ids = torch.randint(0, dense.config.vocab_size, (1, 16))
    plan = le.read_plan(lord_dir, with_tensors=False)
    saved = sum(
        2 * 16 * (m.d_in * m.d_out - g.rank * m.d_out) for g in plan.factorized_groups for m in g.members
    ) - sum(2 * 16 * g.rank * g.members[0].d_in for g in plan.factorized_groups)
    assert forward_flops(dense, input_ids=ids) - forward_flops(lord, input_ids=ids) == saved


def test_unknown_backend_is_a_usage_error(tiny_llama_dir, lord_dir):
    with pytest.raises(UsageError, match="unknown backend 'onnx'.*eager"):
        parse_backends(["eager,onnx"])
    assert parse_backends(["all"]) == list(BACKENDS)
    proc = run_cli("bench", str(tiny_llama_dir), str(lord_dir), "--backends", "tensorrtx")
    assert proc.returncode == 2 and "unknown backend 'tensorrtx'" in proc.stderr


def test_lord_dir_of_another_model_is_refused(tiny_llama_dir, lord_dir, tmp_path):
    dense = load_dense(tiny_llama_dir, dtype=torch.float32)
    check_same_base(dense, lord_dir, tiny_llama_dir)  # the true pair passes

    # same architecture, different weights (another checkpoint): an unchanged tensor differs
    other = tmp_path / "other"
    shutil.copytree(lord_dir, other)
    state = load_file(other / "model.safetensors")
    key = next(k for k in state if "embed_tokens" in k)
    state[key] = state[key] + 1.0
    save_file(state, other / "model.safetensors")
    with pytest.raises(PlanError, match="was not compressed from.*embed_tokens"):
        check_same_base(dense, other, tiny_llama_dir)

    # a different architecture: the plan's fingerprint disagrees
    plan = json.loads((lord_dir / "lord_plan.json").read_text())
    plan["base_model"]["num_parameters"] += 1
    wrong = tmp_path / "wrong"
    shutil.copytree(lord_dir, wrong)
    (wrong / "lord_plan.json").write_text(json.dumps(plan))
    proc = run_cli("bench", str(tiny_llama_dir), str(wrong), "--backends", "eager", *SMALL)
    assert proc.returncode == 3 and "was not compressed from" in proc.stderr and "num_parameters" in proc.stderr

    plan = json.loads((lord_dir / "lord_plan.json").read_text())
    name = next(iter(plan["base_model"]["linears"]))
    plan["base_model"]["linears"][name] = [7, 7]
    (wrong / "lord_plan.json").write_text(json.dumps(plan))
    with pytest.raises(PlanError, match=f"base linear {name} is \\[7, 7\\]"):
        check_same_base(dense, wrong, tiny_llama_dir)

    proc = run_cli("bench", str(tiny_llama_dir), str(tiny_llama_dir), "--backends", "eager", *SMALL)
    assert proc.returncode == 2 and "not a LoRD directory" in proc.stderr


def test_too_many_tokens_for_the_model_is_a_usage_error(tiny_llama_dir, lord_dir):
    proc = run_cli("bench", str(tiny_llama_dir), str(lord_dir), "--backends", "eager", "--tokens", "100000")
    assert proc.returncode == 2 and "positions" in proc.stderr


@pytest.mark.slow
def test_bench_compile_backend_runs_the_lord_pass(tiny_llama_dir, lord_dir, tmp_path):
    """torch.compile: inductor for dense vs backend='lord' with the plan; the bench checks the compiled
    model reproduces the eager LoRD model before timing it."""
    out = tmp_path / "bench.json"
    proc = run_cli(
        "bench", str(tiny_llama_dir), str(lord_dir), "--backends", "compile", *SMALL,
        "--repeats", "1", "--warmup", "1", "--device", "cpu", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert not result["failed"] and {(r["backend"], r["mode"]) for r in result["rows"]} == {
        ("compile", "prefill"),
        ("compile", "decode"),
    }
    assert result["rows"][0]["runs_on"] == "inductor cpu float32"  # --device cpu
    # both models share dynamo's cache of one forward: past its limit LoRD's decode would run eager
    assert "recompile_limit" not in proc.stderr, proc.stderr[-2000:]


def test_bench_bad_device_and_json_folder_fail_before_work(tiny_llama_dir, lord_dir, tmp_path):
    proc = run_cli("bench", str(tiny_llama_dir), str(lord_dir), "--json", str(tmp_path / "no" / "b.json"))
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_cli("bench", str(tiny_llama_dir), str(lord_dir), "--backends", "eager", *SMALL, "--device", "nodevice")
    assert proc.returncode == 2 and "device 'nodevice' is not usable" in proc.stderr


def ort_providers() -> list[str]:
    import onnxruntime

    return onnxruntime.get_available_providers()
