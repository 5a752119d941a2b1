"""Choosing and checking the compute device and the compute dtype (one rule for every command).

Checkpoints of real LLMs are stored in bfloat16 (or float16). Computing in that dtype is fast where
the hardware has units for it (CUDA GPUs from compute capability 8.0 for bfloat16; CPUs with AMX or
AVX512-BF16) and several times SLOWER where it has not: on an AVX2 CPU a bfloat16 matrix product
runs ~7x slower than float32 (oneDNN emulates it). :func:`compute_dtype` picks float32 there and
says why; results are stored in the checkpoint's dtype all the same.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UsageError


def default_device() -> str:
    """CUDA when a CUDA device is visible, else the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None) -> str:
    """``device`` (or the default) after checking that a tensor can live there; UsageError if not."""
    name = str(device) if device is not None else default_device()
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"device {name!r} is not usable here: {first}") from None
    return name


def has_float64(device: str | torch.device) -> bool:
    """Whether ``device`` holds float64 tensors (CPU and CUDA do; Apple's MPS does not)."""
    try:
        torch.zeros(1, dtype=torch.float64, device=device)
    except (RuntimeError, TypeError):
        return False
    return True


def statistics_device(device: str | torch.device, stats_device: str | torch.device | None) -> torch.device:
    """Where statistics are summed and factorized: ``stats_device``, else ``device`` when it has float64,
    else the CPU (the statistics and the eigendecompositions need float64; see :mod:`lord_export.calibrate`)."""
    if stats_device is not None:
        if not has_float64(stats_device):
            raise UsageError(f"statistics need float64, which device {str(stats_device)!r} does not support")
        return torch.device(stats_device)
    return torch.device(device) if has_float64(device) else torch.device("cpu")


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first materialized parameter (CPU when it has none)."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


#: oneDNN's ISA names from which bfloat16 / float16 matrix products run natively (ONEDNN_MAX_CPU_ISA
#: caps the ISA oneDNN uses, e.g. to AVX2: then they are emulated even on a CPU that has the units)
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX", "AVX10_1_512_AMX", "AVX10_2")
_FP16_ISAS = ("AVX512_CORE_FP16", "AVX10_1_512", "AVX512_CORE_AMX_FP16", "AVX10_1_512_AMX_FP16", "AVX10_2")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _isa_allows(isas: tuple[str, ...]) -> bool:
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return not cap or cap == "ALL" or any(cap.startswith(i) for i in isas)


def native_half(device: str | torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether ``device`` computes in the half-precision ``dtype`` natively, and why (a short phrase)."""
    device = torch.device(device)
    name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
            return False, f"this GPU has no native {name}"
        return True, f"the GPU computes {name} natively"
    if device.type != "cpu":
        return True, f"{device.type} computes {name}"
    flags = _cpu_flags()
    if dtype == torch.bfloat16:
        units = ("amx_bf16" in flags or "avx512_bf16" in flags) and _isa_allows(_BF16_ISAS)
        what = "AMX/AVX512-BF16"
    else:
        units = ("amx_fp16" in flags or "avx512_fp16" in flags) and _isa_allows(_FP16_ISAS)
        what = "AMX-FP16/AVX512-FP16"
    capability = torch.backends.cpu.get_cpu_capability()
    if units:
        return True, f"this CPU has {what} units"
    return False, f"this CPU ({capability}) has no {what} units: {name} matrix products would be emulated, ~7x slower"


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a run computes in, the dtype its results are stored in, and why."""

    compute: torch.dtype
    store: torch.dtype
    reason: str

    def describe(self) -> dict[str, str]:
        return {
            "compute_dtype": str(self.compute).removeprefix("torch."),
            "store_dtype": str(self.store).removeprefix("torch."),
            "reason": self.reason,
        }


def compute_dtype(
    device: str | torch.device, stored: torch.dtype, requested: torch.dtype | str | None = None
) -> DtypeChoice:
    """The compute dtype for weights stored as ``stored`` on ``device``: ``requested`` when given (a
    dtype, or "auto"/None), else ``stored`` when the device computes it natively, else float32."""
    if isinstance(requested, str) and requested != "auto":
        requested = getattr(torch, requested)
    if isinstance(requested, torch.dtype):
        return DtypeChoice(requested, stored, "asked for")
    if stored not in (torch.bfloat16, torch.float16):
        return DtypeChoice(stored, stored, "the weights' own dtype")
    native, why = native_half(device, stored)
    if native:
        return DtypeChoice(stored, stored, f"the weights' own dtype: {why}")
    stored_name = str(stored).removeprefix("torch.")
    return DtypeChoice(torch.float32, stored, f"float32 because {why}; results are stored as {stored_name}")
