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
