"""A model's repeated blocks (decoder/encoder layers), and what each block is called with.

Streaming compression works one block at a time. It needs (1) the list of blocks and (2) the inputs
of block 0 for every calibration batch: the hidden states and everything else the model passes
(attention mask, rotary position embeddings, position ids, cache position, …). Both are found
without model-specific code:

* :func:`find_blocks` — the known layouts (``model.layers`` for Llama/Mistral/Qwen2/Phi-3,
  ``transformer.h`` for GPT-2/GPTBigCode/CodeGen, ``encoder.layer`` for BERT, …), else the longest
  ``nn.ModuleList`` whose children are all of one class;
* :func:`capture_block_inputs` — "catch the first block's call": a forward pre-hook on block 0
  records its arguments and stops the forward, so only the embedding stage runs.

The arguments other than the hidden states are the same for every block of these models (one
attention-mask kind for all layers); models that mix layer kinds with different masks (e.g.
sliding-window and full attention in ``config.layer_types``) are reported by
:func:`mixed_layer_types`, and the engine falls back to whole-model calibration for them.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

KNOWN_BLOCK_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "model.language_model.layers",
    "transformer.h",
    "transformer.layers",
    "gpt_neox.layers",
    "encoder.layer",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "model.encoder.layers",
    "layers",
    "h",
)


@dataclass
class Blocks:
    """The repeated blocks of a model: ``modules[i]`` is named ``f"{path}.{i}"``."""

    path: str
    modules: nn.ModuleList

    def name(self, i: int) -> str:
        return f"{self.path}.{i}"

    def __len__(self) -> int:
        return len(self.modules)


def _uniform(ml: nn.Module) -> bool:
    return isinstance(ml, nn.ModuleList) and len(ml) >= 1 and len({type(m) for m in ml}) == 1


def find_blocks(model: nn.Module) -> Blocks | None:
    """The model's repeated blocks (known layouts first, else the longest uniform ModuleList)."""
    for path in KNOWN_BLOCK_PATHS:
        try:
            ml = model.get_submodule(path)
        except AttributeError:
            continue
        if _uniform(ml):
            return Blocks(path, ml)
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if name and _uniform(module) and len(module) >= 2 and (best is None or len(module) > best[0]):
            best = (len(module), name, module)
    return Blocks(best[1], best[2]) if best else None


def mixed_layer_types(model: nn.Module) -> bool:
    """True when the config declares blocks of different attention kinds (each gets its own mask)."""
    types = getattr(getattr(model, "config", None), "layer_types", None)
    return bool(types) and len(set(types)) > 1


@dataclass
class BlockCall:
    """One calibration batch at the entrance of a block: ``block(hidden, *args, **kwargs)``.

    ``mask`` is the batch's (batch, tokens) attention mask: positions where it is 0 are padding and
    never enter statistics.
    """

    args: tuple
    kwargs: dict[str, Any]
    mask: torch.Tensor | None


class _Caught(Exception):
    """Raised by the pre-hook of block 0 to stop the model's forward once its inputs are recorded."""


def accepts_argument(fn: Any, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name`` (explicitly or through ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device | str
) -> tuple[list[torch.Tensor], list[BlockCall]]:
    """Run the model's embedding stage on every batch; return block 0's hidden states and calls.

    Batches are moved to ``device``; the KV cache is turned off. The hidden states are returned as
    computed (on ``device``); the caller decides where to keep them.
    """
    caught: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        caught["hidden"], caught["args"], caught["kwargs"] = hidden.detach(), rest, kwargs
        raise _Caught

    use_cache = accepts_argument(model.forward, "use_cache")
    hiddens: list[torch.Tensor] = []
    calls: list[BlockCall] = []
    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            if isinstance(batch, torch.Tensor):
                batch = {"input_ids": batch}
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            caught.clear()
            try:
                model(**batch, **({"use_cache": False} if use_cache else {}))
            except _Caught:
                pass
            if "hidden" not in caught:
                raise RuntimeError("the model's forward never called its first block")
            mask = batch.get("attention_mask")
            mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            hiddens.append(caught["hidden"])
            calls.append(BlockCall(caught["args"], caught["kwargs"], mask))
    finally:
        handle.remove()
    return hiddens, calls


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returned (a tensor, or the first element of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """``block`` applied to ``hidden`` with the batch's other arguments; returns its hidden states."""
    return block_output(block(hidden, *call.args, **call.kwargs))
