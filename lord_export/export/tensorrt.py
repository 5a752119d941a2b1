"""TensorRT: engines built from the LoRD ONNX with the TensorRT Python API (``lord-export export
--format tensorrt``); ``lord-export bench --backends tensorrt`` uses torch-tensorrt's compile backend.

TensorRT cannot be installed on machines without its NVIDIA libraries; both ``tensorrt`` and
``torch_tensorrt`` are imported lazily and a missing one fails with a message naming the package.
What does not need TensorRT is checked here: that the ONNX uses only operators TensorRT's ONNX
parser supports (:data:`TRT_ONNX_OPS`) in the opset range it parses, and that the optimization
profiles are well-formed. TensorRT 10+ builds strongly typed networks: precision follows the ONNX's
dtype (export it in float16 for an fp16 engine).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LordError, UsageError

log = logging.getLogger(__name__)

#: Operators of the default ONNX domain that TensorRT's ONNX parser supports ("Y" rows of
#: onnx/onnx-tensorrt docs/operators.md at commit 96e7811 — TensorRT 10.0, opsets 9 to 20).
TRT_ONNX_OPS = frozenset(
    """Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike
    Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements
    GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
    GroupNormalization GRU HardSigmoid HardSwish Hardmax Identity If ImageScaler InstanceNormalization IsInf
    IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool
    MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot
    Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean
    ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round
    ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax
    Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose
    Trilu Unsqueeze Upsample Where Xor""".split()
)
TRT_OPSET_RANGE = (9, 20)


def require_tensorrt(package: str = "tensorrt") -> Any:
    """Import ``tensorrt`` or ``torch_tensorrt`` or raise a clear error naming what is missing."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError as e:
        hint = (
            "pip install 'lord_export[tensorrt]' on a machine with NVIDIA's TensorRT libraries"
            if package == "torch_tensorrt"
            else "install NVIDIA TensorRT (the 'tensorrt' Python package) on a CUDA machine"
        )
        raise UsageError(
            f"the TensorRT path needs the '{package}' package, which is not installed: {hint} ({e})"
        ) from None


def unsupported_ops(model_proto: Any) -> dict[str, int]:
    """Operators (``domain::op`` for non-default domains) TensorRT's ONNX parser would reject, with counts."""
    bad: dict[str, int] = {}
    for node in _walk(model_proto.graph):
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        if key not in TRT_ONNX_OPS:
            bad[key] = bad.get(key, 0) + 1
    return bad


def _walk(graph: Any):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if len(attr.g.node):
                yield from _walk(attr.g)


def check_onnx_for_tensorrt(model_proto: Any) -> None:
    """Raise UsageError when the ONNX uses operators or an opset TensorRT's parser does not support."""
    opset = next((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    lo, hi = TRT_OPSET_RANGE
    if opset is None or not lo <= opset <= hi:
        raise UsageError(f"TensorRT parses ONNX opsets {lo}..{hi}; this model has opset {opset}")
    bad = unsupported_ops(model_proto)
    if bad:
        raise UsageError(f"operators TensorRT's ONNX parser does not support: {bad}")


@dataclass(frozen=True)
class Profile:
    """min/opt/max shapes of one dynamic input (one TensorRT optimization profile entry)."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def make_profiles(
    input_names: list[str], *, batch: tuple[int, int, int] = (1, 1, 8), sequence: tuple[int, int, int] = (1, 128, 512)
) -> list[Profile]:
    """Profiles for (batch, sequence) inputs such as input_ids/attention_mask; validated."""
    profiles = [
        Profile(n, (batch[0], sequence[0]), (batch[1], sequence[1]), (batch[2], sequence[2])) for n in input_names
    ]
    for p in profiles:
        check_profile(p)
    return profiles


def check_profile(p: Profile) -> None:
    if not (len(p.min) == len(p.opt) == len(p.max)):
        raise UsageError(f"profile {p.name}: min/opt/max ranks differ: {p.min} {p.opt} {p.max}")
    for lo, mid, hi in zip(p.min, p.opt, p.max, strict=True):
        if not 1 <= lo <= mid <= hi:
            raise UsageError(f"profile {p.name}: need 1 <= min <= opt <= max per dim, got {p.min} {p.opt} {p.max}")


def build_engine(
    onnx_path: str | Path, plan_path: str | Path, profiles: list[Profile], workspace_gib: float = 4
) -> Path:
    """Build and write a serialized TensorRT engine (.plan) from an ONNX file (TensorRT Python API)."""
    import onnx

    check_onnx_for_tensorrt(onnx.load(str(onnx_path), load_external_data=False))
    for p in profiles:
        check_profile(p)
    trt = require_tensorrt("tensorrt")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch and strong typing are the defaults in TensorRT 10+
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise LordError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    for p in profiles:
        profile.set_shape(p.name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise LordError(f"TensorRT failed to build an engine from {onnx_path}")
    out = Path(plan_path)
    out.write_bytes(bytes(engine))
    return out
