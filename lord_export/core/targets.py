"""Which layers of a model LoRD may touch: discovery of linear layers, presets and name matching.

A target is a *linear* layer: ``torch.nn.Linear`` or transformers' ``Conv1D`` (GPT-2, GPTBigCode),
whose weight is stored transposed. Embeddings and the output embedding (LM head) are never
selected by a preset; they can only be named explicitly.

Patterns (as in PEFT): an exact fully qualified name, a suffix (``q_proj`` matches
``model.layers.0.self_attn.q_proj``), or a regular expression prefixed with ``re:``
(``re:.*layers\\.[0-3]\\..*``) which must match the whole name. Presets:

* ``all``       every linear layer except the output embedding;
* ``attention`` linears under a module named ``attn``/``self_attn``/``attention``/``self_attention``;
* ``mlp``       linears under ``mlp``/``feed_forward``/``ffn``, and BERT's ``intermediate``/``output``;
* ``mlp-down``  the MLP's down projection (``down_proj``, ``c_proj``, ``fc2``, ``fc_out``, ``w2``,
  ``dense_4h_to_h``, BERT's ``output.dense``);
* ``experts``   the linears of mixture-of-experts experts (``….experts.<e>.<linear>``; transformers 5's
  fused experts are unfused first, :mod:`lord_export.core.experts`). Shared experts are ordinary MLPs.

Routers (``gate``/``router``/``shared_expert_gate`` beside an ``experts`` module) choose the experts
and are never selected by a preset, like the output embedding.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import TargetError
from .experts import is_expert_layer, is_router

PRESETS = ("all", "attention", "mlp", "mlp-down", "experts")

_ATTENTION_PARTS = {"attn", "self_attn", "attention", "self_attention", "crossattention", "cross_attn"}
_MLP_PARTS = {"mlp", "feed_forward", "ffn", "intermediate", "output", "block_sparse_moe"}
_DOWN_NAMES = {"down_proj", "c_proj", "fc2", "fc_out", "w2", "dense_4h_to_h"}


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except Exception:  # transformers is optional for plain nn.Module models
        return None
    return Conv1D


@dataclass(frozen=True)
class LinearInfo:
    """A linear layer found in a model. ``transposed`` is True for Conv1D (weight is d_in × d_out)."""

    name: str
    d_in: int
    d_out: int
    transposed: bool
    has_bias: bool


def is_linear(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear_info(name: str, module: nn.Module) -> LinearInfo:
    transposed = not isinstance(module, nn.Linear)
    w = module.weight
    d_out, d_in = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
    return LinearInfo(name, int(d_in), int(d_out), transposed, getattr(module, "bias", None) is not None)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight in (d_out, d_in) orientation, whatever the layer stores."""
    w = module.weight.detach()
    return w if isinstance(module, nn.Linear) else w.T


def find_linears(model: nn.Module) -> dict[str, LinearInfo]:
    """All linear layers of ``model`` by fully qualified name, in module order."""
    return {name: linear_info(name, m) for name, m in model.named_modules() if name and is_linear(m)}


def output_embedding_names(model: nn.Module) -> set[str]:
    """Names of modules that are (or share a weight with) the LM head / embeddings."""
    names: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    emb_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, m in model.named_modules():
        if m is out or (is_linear(m) and id(m.weight) in emb_weights):
            names.add(name)
    return names


def _parts(name: str) -> list[str]:
    return name.split(".")


def in_attention(name: str) -> bool:
    return any(p in _ATTENTION_PARTS for p in _parts(name)[:-1])


def in_mlp(name: str) -> bool:
    return not in_attention(name) and any(p in _MLP_PARTS for p in _parts(name)[:-1])


def is_mlp_down(name: str) -> bool:
    parts = _parts(name)
    if not in_mlp(name):
        return False
    return parts[-1] in _DOWN_NAMES or (len(parts) >= 2 and parts[-2] == "output" and parts[-1] == "dense")


def _preset_members(preset: str, names: Iterable[str]) -> list[str]:
    test = {
        "all": lambda n: True,
        "attention": in_attention,
        "mlp": in_mlp,
        "mlp-down": is_mlp_down,
        "experts": is_expert_layer,
    }[preset]
    return [n for n in names if test(n)]


def pattern_matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return name == pattern or name.endswith("." + pattern)


def select_targets(model: nn.Module, targets: Sequence[str] = ("all",), exclude: Sequence[str] = ()) -> list[str]:
    """Names of the linear layers selected by ``targets`` minus ``exclude``, in module order.

    Raises TargetError when a pattern matches nothing (listing what exists) or nothing is left.
    """
    linears = find_linears(model)
    modules = dict(model.named_modules())
    protected = output_embedding_names(model) | {n for n in linears if is_router(n, modules)}
    selectable = [n for n in linears if n not in protected]
    chosen: set[str] = set()
    for t in targets:
        if t in PRESETS:
            hit = _preset_members(t, selectable)
        else:
            hit = [n for n in linears if pattern_matches(t, n)]
        if not hit:
            raise TargetError(_nothing_matched("target", t, linears))
        chosen.update(hit)
    for x in exclude:
        hit = [n for n in linears if pattern_matches(x, n)] if x not in PRESETS else _preset_members(x, linears)
        if not hit:
            raise TargetError(_nothing_matched("exclude pattern", x, linears))
        chosen.difference_update(hit)
    if not chosen:
        raise TargetError(f"targets {list(targets)} minus excludes {list(exclude)} leave no layer to compress")
    return [n for n in linears if n in chosen]


def _nothing_matched(what: str, pattern: str, linears: dict[str, LinearInfo]) -> str:
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
    example = next(iter(linears), "<none>")
    return (
        f"{what} {pattern!r} matches no linear layer; presets are {', '.join(PRESETS)}; "
        f"layer names end in: {', '.join(leaves) or '<no linear layers>'} (e.g. {example!r}); "
        "use 're:<regex>' for a regular expression"
    )
