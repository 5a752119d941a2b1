"""Choosing and checking the compute device (one rule for every command)."""

from __future__ import annotations

import torch

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
