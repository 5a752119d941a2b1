"""What a plan knows about the dense model it was made from, and the checks that use it.

A fingerprint is the model class, its transformers architecture, its parameter count (tied
tensors once), the shape of every linear layer and a cheap content fingerprint of every linear
weight (:func:`weight_fingerprint`). It is stored in the plan (``base_model``) so a plan, or a LoRD
directory, can refuse a dense model it was not made from — including a fine-tuned copy of the
right architecture, whose tuned weights the plan's factors would otherwise silently replace.
Graph frontends see only a graph's weights: they use :func:`weights_mismatch`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .targets import find_linears

log = logging.getLogger(__name__)

#: Relative difference ‖W − W_base‖ / ‖W_base‖ (estimated from the projections) above which a weight
#: is "another weight". Casting to bf16 moves a weight by ~0.2% and fp16 by ~0.03%; fine-tuning by more.
WEIGHT_TOLERANCE = 1e-2
_PROJECTIONS = 4
_CHUNK = 1 << 22


def _signs(start: int, n: int, k: int, device: torch.device) -> torch.Tensor:
    """Fixed pseudo-random ±1 (float64) for element indices ``start .. start+n`` of projection ``k``
    (an integer hash of the index, so it needs no RNG and is the same on every torch and device)."""
    i = torch.arange(start, start + n, dtype=torch.int64, device=device)
    h = (i * 2654435761 + (k + 1) * 40503) % (1 << 32)
    h = h ^ (h >> 16)
    h = (h * 0x45D9F3B) % (1 << 32)
    h = h ^ (h >> 16)
    return (1 - 2 * (h & 1)).to(torch.float64)


@functools.lru_cache(maxsize=2 * _PROJECTIONS)
def _first_chunk_signs(k: int, device: torch.device) -> torch.Tensor:
    """:func:`_signs` of projection ``k`` for indices ``0 .. _CHUNK``, made once per device (16 MB in
    float32, where ±1 is exact): every weight's first chunk uses them, and hashing the indices anew
    for each weight cost most of a fingerprint (seconds per model)."""
    return _signs(0, _CHUNK, k, device).to(torch.float32)


def weight_fingerprint(weight: torch.Tensor) -> dict[str, Any]:
    """A cheap content fingerprint of one weight as stored: shape, float64 sum, Frobenius norm and
    a few fixed ±1 random projections (E[(r·Δ)²] = ‖Δ‖², so they estimate ‖W − W'‖)."""
    flat = weight.detach().reshape(-1)
    device = flat.device if flat.device.type in ("cpu", "cuda") else torch.device("cpu")
    total, sq = 0.0, 0.0
    proj = [0.0] * _PROJECTIONS
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK].to(device=device, dtype=torch.float64)
        total += float(chunk.sum())
        sq += float((chunk * chunk).sum())
        for k in range(_PROJECTIONS):
            if start == 0:
                signs = _first_chunk_signs(k, device)[: chunk.numel()]  # float64 * float32: a float64 product
            else:
                signs = _signs(start, chunk.numel(), k, device)
            proj[k] += float((chunk * signs).sum())
    return {"shape": list(weight.shape), "sum": total, "norm": sq**0.5, "proj": proj}


def weight_difference(base: Mapping[str, Any], weight: torch.Tensor) -> float:
    """Estimated ‖W − W_base‖ / ‖W_base‖ from two fingerprints (inf when the shapes differ)."""
    here = weight_fingerprint(weight)
    if list(base["shape"]) != here["shape"]:
        return float("inf")
    diffs = [(a - b) ** 2 for a, b in zip(base["proj"], here["proj"], strict=True)]
    scale = max(float(base["norm"]), 1e-30)
    return max((sum(diffs) / len(diffs)) ** 0.5, abs(base["norm"] - here["norm"])) / scale


def weights_mismatch(
    base: Mapping[str, Any], weights: Mapping[str, torch.Tensor], *, transposed: Mapping[str, bool] | None = None
) -> str | None:
    """Why the linear weights ``weights`` (layer name → weight tensor as stored, e.g. the weights a
    graph holds) are not those of the plan's base model ``base`` (None when they are).

    Compares each layer's (d_out, d_in) with the base model's linear shapes and its content with
    the base model's weight fingerprint. Meta/fake tensors and plans written before weight
    fingerprints existed skip the content check.
    """
    shapes = base.get("linears") or {}
    prints = base.get("weights")
    if prints is None and weights and base:
        log.debug("the plan's base model has no weight fingerprints (an older plan): weight contents not checked")
    for name, w in weights.items():
        if not isinstance(w, torch.Tensor):
            continue
        if name in shapes:
            shape = list(w.shape)[::-1] if (transposed or {}).get(name) else list(w.shape)
            if shape != list(shapes[name]):
                return f"the plan's base linear {name} is {list(shapes[name])}, here it is {shape}"
        fp = (prints or {}).get(name)
        if fp is None or w.is_meta or _is_fake(w):
            continue
        diff = weight_difference(fp, w)
        if diff > WEIGHT_TOLERANCE:
            return (
                f"the weight of {name} differs from the plan's base model (relative difference {diff:.3g} > "
                f"{WEIGHT_TOLERANCE}): this model's weights are not the ones the plan was made from "
                "(a fine-tuned model? the plan's factors would replace its weights)"
            )
    return None


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, counting tied tensors once (``parameters()`` skips shared ones)."""
    return sum(p.numel() for p in model.parameters())


def describe_model(model: nn.Module, *, weights: bool = True) -> dict[str, Any]:
    """The fingerprint of a dense model (see the module docstring); ``weights`` adds the content
    fingerprint of every linear weight that is materialized (not on the meta device)."""
    cfg = getattr(model, "config", None)
    out = {
        "class": type(model).__name__,
        "architectures": list(getattr(cfg, "architectures", None) or []),
        "model_type": getattr(cfg, "model_type", None),
        "num_parameters": count_parameters(model),
        "linears": {n: [i.d_out, i.d_in] for n, i in find_linears(model).items()},
    }
    if weights:
        modules = dict(model.named_modules())
        prints = {n: weight_fingerprint(modules[n].weight) for n in out["linears"] if not modules[n].weight.is_meta}
        if prints:
            out["weights"] = prints
    return out


def fingerprint_mismatch(base: dict[str, Any], model: nn.Module, *, layers: Any = None) -> str | None:
    """Why ``model`` is not the dense model described by ``base`` (None when it matches).

    Structure always (class, parameter count, linear shapes); with ``layers`` (names of linear
    layers) also the content of those layers' weights (see :func:`weights_mismatch`).
    """
    here = describe_model(model, weights=False)
    for key in ("class", "num_parameters"):
        if base.get(key) is not None and base.get(key) != here[key]:
            return f"the plan's base model has {key} {base[key]!r}, this model has {here[key]!r}"
    for name, shape in (base.get("linears") or {}).items():
        if here["linears"].get(name) != list(shape):
            return f"the plan's base linear {name} is {list(shape)}, in this model it is {here['linears'].get(name)}"
    if layers:
        modules = dict(model.named_modules())
        weights = {n: modules[n].weight for n in layers if n in modules and hasattr(modules[n], "weight")}
        return weights_mismatch({"weights": base.get("weights")}, weights)
    return None
