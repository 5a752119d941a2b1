"""On a CUDA machine (skipped elsewhere; marker ``cuda``): compress a bf16 model on the GPU,
compile the dense model with the ``lord`` backend on the GPU, and validate an ONNX export on
ONNX Runtime's CUDA provider when this onnxruntime has it."""

from __future__ import annotations

import copy

import pytest
import torch

import lord_export as le
from lord_export.export.dynamo import make_backend
from tests.helpers import correlated_batches, tiny_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def bf16_pair():
    model = tiny_model("llama").to("cuda", torch.bfloat16)
    model.config.use_cache = False
    dense = copy.deepcopy(model)
    batches = [{k: v.cuda() for k, v in b.items()} for b in correlated_batches()]
    plan = le.compress(model, batches, rank_reduction=0.5, force=True)
    return dense, model, plan


def test_compress_bf16_on_cuda():
    dense, lord, plan = bf16_pair()
    assert plan.factorized_groups
    ids = torch.randint(3, 300, (2, 16), device="cuda")
    with torch.no_grad():
        got, want = lord(input_ids=ids).logits, dense(input_ids=ids).logits
    assert got.device.type == "cuda" and got.dtype == torch.bfloat16
    assert rel(got, want) < 0.5  # rank reduction 0.5 of random weights: close, not equal


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_lord_backend_on_cuda(dynamic):
    """dynamic=True: the pass's new linear nodes get symbolic fake values (on CUDA, linear's C++
    composite cannot take symbolic sizes outside the python dispatcher)."""
    dense, lord, plan = bf16_pair()
    cpu_plan = copy.copy(plan)
    cpu_plan.tensors = {k: v.float().cpu() for k, v in plan.tensors.items()}  # an fp32 plan on the CPU
    torch._dynamo.reset()
    backend = "lord" if "lord" in torch._dynamo.list_backends() else make_backend(plan=cpu_plan)
    options = {"plan": cpu_plan} if backend == "lord" else None
    compiled = torch.compile(dense, backend=backend, options=options, dynamic=dynamic)
    ids = torch.randint(3, 300, (2, 16), device="cuda")
    with torch.no_grad():
        got, want = compiled(input_ids=ids).logits, lord(input_ids=ids).logits
    assert got.device.type == "cuda" and got.dtype == torch.bfloat16
    assert rel(got, want) < 0.05


def test_onnx_on_the_cuda_provider(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime has no CUDAExecutionProvider ({', '.join(ort.get_available_providers())})")
    from lord_export.export.onnx import export_onnx

    model = tiny_model("llama")
    plan = le.compress(model, correlated_batches(), rank_reduction=0.5, force=True)
    le.save_compressed(model, plan, tmp_path / "lord")
    report = export_onnx(tmp_path / "lord", tmp_path / "onnx")
    assert report["validation"]["passed"] and report["validation"]["provider"] == "CUDAExecutionProvider"
