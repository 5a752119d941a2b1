"""What a plan knows about the dense model it was made from, and the checks that use it.

A fingerprint is the model class, its transformers architecture, its parameter count (tied
tensors once) and the shape of every linear layer. It is stored in the plan (``base_model``) so a
plan, or a LoRD directory, can refuse a dense model it was not made from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PlanError
from .targets import find_linears


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, counting tied tensors once (``parameters()`` skips shared ones)."""
    return sum(p.numel() for p in model.parameters())


def describe_model(model: nn.Module) -> dict[str, Any]:
    """The fingerprint of a dense model (see the module docstring)."""
    cfg = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "architectures": list(getattr(cfg, "architectures", None) or []),
        "model_type": getattr(cfg, "model_type", None),
        "num_parameters": count_parameters(model),
        "linears": {n: [i.d_out, i.d_in] for n, i in find_linears(model).items()},
    }


def fingerprint_mismatch(base: dict[str, Any], model: nn.Module) -> str | None:
    """Why ``model`` is not the dense model described by ``base`` (None when it matches)."""
    here = describe_model(model)
    for key in ("class", "num_parameters"):
        if base.get(key) is not None and base.get(key) != here[key]:
            return f"the plan's base model has {key} {base[key]!r}, this model has {here[key]!r}"
    for name, shape in (base.get("linears") or {}).items():
        if here["linears"].get(name) != list(shape):
            return f"the plan's base linear {name} is {list(shape)}, in this model it is {here['linears'].get(name)}"
    return None


def check_same_base(dense: nn.Module, lord_dir: str | Path, dense_dir: str | Path) -> None:
    """Refuse a LoRD directory that was not compressed from the dense model in ``dense_dir``.

    Compares the plan's fingerprint of its base model and every tensor the LoRD directory keeps
    unchanged (embeddings, norms, layers left dense).
    """
    from .checkpoint import CheckpointReader
    from .io import read_plan

    lord_dir = Path(lord_dir)
    plan = read_plan(lord_dir, with_tensors=False)
    where = f"{lord_dir} was not compressed from {dense_dir}"
    why = fingerprint_mismatch(plan.base_model, dense)
    if why:
        raise PlanError(f"{where}: {why}")
    state = dense.state_dict()
    reader = CheckpointReader(lord_dir)
    for key in reader.keys():
        if key in state:
            mine = reader.get(key)
            if tuple(mine.shape) == tuple(state[key].shape) and not torch.allclose(
                mine.to(torch.float32), state[key].to(torch.float32), rtol=1e-2, atol=1e-3
            ):
                raise PlanError(f"{where}: tensor {key} differs")
