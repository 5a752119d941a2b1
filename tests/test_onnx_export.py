"""ONNX export: real torch.onnx (dynamo) exports, onnx.checker, ONNX Runtime sessions, op census,
int8 quantization, TensorRT pre-checks, and bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

import lord_export as le
from lord_export.calibration.data import document_windows
from lord_export.export import onnx as onnx_export
from lord_export.export.onnx import (
    ValidationError,
    export_onnx,
    int4_block_size,
    make_session,
    quantize_int4,
    quantize_int8,
    session_providers,
)
from lord_export.export.tensorrt import (
    Profile,
    check_onnx_for_tensorrt,
    check_profile,
    make_profiles,
    require_tensorrt,
    unsupported_ops,
)
from lord_export.pipeline.evaluate import perplexity
from tests.cli_runner import run_cli
from tests.helpers import STORIES_MODEL, STORIES_TEXT, correlated_batches, needs_shared_data, tiny_model


def lord_dir(arch: str, tmp_path, rank_reduction: float = 0.5):
    model = tiny_model(arch)
    plan = le.compress(model, correlated_batches(), rank_reduction=rank_reduction, force=True)
    le.save_compressed(model, plan, tmp_path / arch)
    return tmp_path / arch, plan


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_bigcode", "bert"])
def test_export_validate_and_census(arch, tmp_path):
    src, plan = lord_dir(arch, tmp_path)
    report = export_onnx(src, tmp_path / "onnx")
    path = tmp_path / "onnx" / "model.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    v = report["validation"]
    assert v["passed"] and v["max_rel_error"] < 1e-4
    assert v["provider"] == session_providers()[0]  # CUDA where this onnxruntime and machine have it, else CPU
    assert v["inputs"]["input_ids"] == [3, 23]  # validated at another shape than the export example
    groups = len(plan.factorized_groups)
    assert report["bottleneck_matmuls"] == groups  # exactly one bottleneck MatMul per group
    assert report["up_projection_matmuls"] == sum(len(g.members) for g in plan.factorized_groups)
    assert json.loads((tmp_path / "onnx" / "export_report.json").read_text())["factorized_groups"] == groups
    assert unsupported_ops(onnx.load(str(path))) == {}  # what TensorRT's parser would get is supported


def test_dense_export_has_no_bottlenecks(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "dense")
    report = export_onnx(tmp_path / "dense", tmp_path / "onnx")
    assert report["bottleneck_matmuls"] == 0 and not report["lord"]


def test_int4_lord_runs_in_ort_close_to_float(tmp_path):
    """4-bit MatMulNBits on the LoRD ONNX: every factor MatMul quantized, logits within a stated
    tolerance of the float32 LoRD ONNX (itself validated against PyTorch to 1e-4)."""
    src, plan = lord_dir("llama", tmp_path)
    export_onnx(src, tmp_path / "onnx")
    q = quantize_int4(tmp_path / "onnx", block_size=128)
    ops = [n.op_type for n in onnx.load(q["path"]).graph.node]
    bottlenecks_and_ups = sum(1 + len(g.members) for g in plan.factorized_groups)
    assert ops.count("MatMulNBits") >= bottlenecks_and_ups and "DequantizeLinear" not in ops
    # the tiny model's ranks (32) are below the block size: those MatMuls use smaller blocks, no padding
    assert q["matmuls_per_block_size"].get("32", 0) >= sum(len(g.members) for g in plan.factorized_groups)
    assert q["bytes_int4"] < 0.65 * q["bytes_float"]
    fp32 = make_session(tmp_path / "onnx" / "model.onnx", prefer_cuda=False)
    int4 = make_session(q["path"], prefer_cuda=False)
    ids = np.random.default_rng(0).integers(3, 100, size=(2, 16)).astype(np.int64)
    feeds = {i.name: (np.ones_like(ids) if "mask" in i.name else ids) for i in fp32.get_inputs()}
    a, b = fp32.run(None, feeds)[0], int4.run(None, feeds)[0]
    # tolerance: 4-bit weights of a random tiny model; relative Frobenius error of the logits <= 0.15
    assert np.linalg.norm(a - b) / np.linalg.norm(a) < 0.15
    assert (a.argmax(-1) == b.argmax(-1)).mean() > 0.6


def test_int4_block_size_per_matmul():
    assert int4_block_size(1024, 128) == 128
    assert int4_block_size(192, 128) == 64  # a rank not a multiple of the block: largest dividing power of two
    assert int4_block_size(96, 128) == 32
    assert int4_block_size(40, 128) == 128  # no power of two >= 16 divides it: ONNX Runtime zero-pads


def test_failed_validation_keeps_the_onnx_aside(tmp_path, monkeypatch):
    src, _ = lord_dir("llama", tmp_path)
    monkeypatch.setitem(onnx_export.TOLERANCE, "float32", -1.0)
    with pytest.raises(ValidationError, match="disagrees with PyTorch"):
        export_onnx(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert (tmp_path / "out.failed" / "model.onnx").is_file()


def test_int8_quantization(tmp_path):
    src, _ = lord_dir("llama", tmp_path, rank_reduction=0.3)
    export_onnx(src, tmp_path / "onnx")
    q = quantize_int8(tmp_path / "onnx")
    assert q["bytes_int8"] < 0.6 * q["bytes_float"]
    assert q["max_rel_error_vs_float"] < 0.2 and q["top1_agreement"] > 0.7
    session = make_session(q["path"], prefer_cuda=False)
    assert any(n.op_type.startswith(("DynamicQuantize", "MatMulInteger")) for n in onnx.load(q["path"]).graph.node)
    assert session.get_providers()[0] == "CPUExecutionProvider"


@needs_shared_data
@pytest.mark.slow
def test_stories260k_onnx_perplexity_equals_pytorch(tmp_path):
    src = tmp_path / "stories-lord"
    from lord_export.calibration.data import batches, tokenize_blocks
    from lord_export.persist.hf import load_dense, load_tokenizer

    tok = load_tokenizer(STORIES_MODEL)
    docs = [d.strip() for d in STORIES_TEXT.read_text(encoding="utf-8").split("<|endoftext|>") if d.strip()]
    ids, mask = tokenize_blocks(tok, docs[:64], samples=1000, seqlen=256)
    model = load_dense(STORIES_MODEL)
    plan = le.compress(model, batches(ids, mask, 16), rank_reduction=0.2)
    le.save_compressed(model, plan, src, source_dir=STORIES_MODEL)
    export_onnx(src, tmp_path / "onnx")
    windows = document_windows(tok, docs[-200:], 512)
    torch_ppl = perplexity(model, windows, batch_size=16)
    session = make_session(tmp_path / "onnx" / "model.onnx", prefer_cuda=False)
    nll, count = 0.0, 0
    for w in windows:  # one window per run: no padding
        x = np.array([w], dtype=np.int64)
        logits = session.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})[0][0].astype(np.float64)
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
            - logits.max(-1, keepdims=True)
        )
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    assert count == torch_ppl.tokens
    onnx_ppl = float(np.exp(nll / count))
    assert onnx_ppl == pytest.approx(torch_ppl.perplexity, rel=1e-4)


@pytest.mark.slow
def test_cli_export_and_bad_input(tmp_path):
    src, _ = lord_dir("gpt2", tmp_path)
    out = tmp_path / "onnx"
    proc = run_cli("export", str(src), str(out), "--int8")
    bad_block = run_cli("export", str(src), str(tmp_path / "z"), "--quantize", "int4", "--block-size", "48")
    assert bad_block.returncode == 2 and "power of two" in bad_block.stderr
    assert proc.returncode == 0, proc.stderr
    assert "bottleneck MatMul" in proc.stdout and "validated in ONNX Runtime" in proc.stdout
    assert (out / "model.int8.onnx").is_file()
    again = run_cli("export", str(src), str(out))
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = run_cli("export", str(src), str(tmp_path / "x"), "--format", "tflite")
    assert bad.returncode == 2 and "invalid choice: 'tflite'" in bad.stderr
    missing = run_cli("export", str(tmp_path / "nope"), str(tmp_path / "y"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def _tensorrt_installed() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_tensorrt_installed(), reason="tests the message for a machine without TensorRT")
def test_tensorrt_missing_is_a_clear_error(tmp_path):
    with pytest.raises(le.UsageError, match="'tensorrt' package, which is not installed"):
        require_tensorrt("tensorrt")
    with pytest.raises(le.UsageError, match="'torch_tensorrt'"):
        require_tensorrt("torch_tensorrt")
    src, _ = lord_dir("llama", tmp_path)
    proc = run_cli("export", str(src), str(tmp_path / "trt"), "--format", "tensorrt")
    assert proc.returncode == 2 and "tensorrt" in proc.stderr and not (tmp_path / "trt").exists()


@pytest.mark.skipif(not _tensorrt_installed(), reason="TensorRT is not installed (needs NVIDIA's libraries and a GPU)")
def test_tensorrt_engine_builds(tmp_path):
    from lord_export.export.tensorrt import build_engine

    src, _ = lord_dir("llama", tmp_path)
    report = export_onnx(src, tmp_path / "onnx")
    plan = build_engine(tmp_path / "onnx" / "model.onnx", tmp_path / "engine.plan", make_profiles(report["inputs"]))
    assert plan.stat().st_size > 0


def test_tensorrt_prechecks():
    profiles = make_profiles(["input_ids", "attention_mask"], batch=(1, 2, 4), sequence=(1, 64, 256))
    assert profiles[0] == Profile("input_ids", (1, 1), (2, 64), (4, 256))
    with pytest.raises(le.UsageError, match="min <= opt <= max"):
        check_profile(Profile("input_ids", (1, 8), (1, 4), (1, 16)))
    with pytest.raises(le.UsageError, match="ranks differ"):
        check_profile(Profile("input_ids", (1,), (1, 4), (1, 16)))
    node = onnx.helper.make_node("Unique", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    assert unsupported_ops(model) == {"Unique": 1}
    with pytest.raises(le.UsageError, match="Unique"):
        check_onnx_for_tensorrt(model)
    old = onnx.helper.make_model(
        onnx.helper.make_graph([], "g", [], []), opset_imports=[onnx.helper.make_opsetid("", 21)]
    )
    with pytest.raises(le.UsageError, match="opsets 9..20"):
        check_onnx_for_tensorrt(old)


def test_with_past_generates_like_pytorch(tmp_path):
    pytest.importorskip("optimum.onnxruntime", reason="--with-past uses optimum's layout (extra lord_export[optimum])")
    from optimum.onnxruntime import ORTModelForCausalLM

    src, plan = lord_dir("llama", tmp_path)
    report = export_onnx(src, tmp_path / "past", with_past=True)
    assert report["bottleneck_matmuls"] == len(plan.factorized_groups)
    assert any(name.startswith("past_key_values") for name in report["inputs"])
    ort = ORTModelForCausalLM.from_pretrained(tmp_path / "past")
    prompt = torch.tensor([[1, 5, 9, 30, 7]])
    want = le.load(src).generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(ort.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0), want)


def test_float16_export(tmp_path):
    src, plan = lord_dir("llama", tmp_path)
    report = export_onnx(src, tmp_path / "fp16", dtype="float16")
    inits = onnx.load(str(tmp_path / "fp16" / "model.onnx")).graph.initializer
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in inits)
    assert report["validation"]["passed"] and report["validation"]["max_rel_error"] < 2e-2
    assert report["bottleneck_matmuls"] == len(plan.factorized_groups)
