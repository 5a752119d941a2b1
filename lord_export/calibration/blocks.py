"""A model's repeated blocks (decoder/encoder layers), and what each block is called with.

Streaming compression works one block at a time. It needs (1) the list of blocks and (2) the inputs
of block 0 for every calibration batch: the hidden states and everything else the model passes
(attention mask, rotary position embeddings, position ids, cache position, …). Both are found
without model-specific code:

* :func:`find_blocks` — the known layouts (``model.layers`` for Llama/Mistral/Qwen2/Phi-3,
  ``transformer.h`` for GPT-2/GPTBigCode/CodeGen, ``encoder.layer`` for BERT, …), else the longest
  ``nn.ModuleList`` whose children are all of one class;
* :func:`capture_block_inputs` — "catch the first block's call": a forward pre-hook on block 0
  records its arguments and stops the forward, so only the embedding stage runs;
* :func:`capture_block_calls` — every block's call: the model's forward runs with each block
  replaced by a :class:`StandIn` that records what the block is called with and passes its input
  on. Models that give their layers different arguments (a sliding-window mask for some layers and
  a full causal mask for others, Gemma 2/3's local and global rotary tables, ``config.layer_types``)
  get each block's own; blocks called alike share one record.

Stand-ins read every attribute the model's code asks of its layers (``attention_type``,
``is_sliding``, ``layer_idx``, …) from the real block, so the model's forward takes the same
branches as with its real layers.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Iterator
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
    """Raised to stop the model's forward once the inputs it was run for are recorded."""


class StandIn(nn.Module):
    """Takes a block's place in the model's forward: returns ``respond(hidden, index, args, kwargs)``
    shaped like the block's own output (``template``: None for a tensor, else a tuple's length).

    Attribute reads the model's code makes on its layers fall through to the real block, which is
    held outside ``_modules`` (it is not part of the stand-in's parameters or state).
    """

    def __init__(self, block: nn.Module, index: int, template: int | None, respond: Any) -> None:
        super().__init__()
        self.__dict__["_block"] = block
        self.index, self.template, self.respond = index, template, respond

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.respond(hidden_states, self.index, args, kwargs)
        return out if self.template is None else (out,) + (None,) * (self.template - 1)


@contextlib.contextmanager
def standing_in(blocks: Blocks, template: int | None, respond: Any) -> Iterator[None]:
    """Every block replaced by a :class:`StandIn` calling ``respond`` while the context lasts."""
    saved = list(blocks.modules)
    for i, block in enumerate(saved):
        blocks.modules[i] = StandIn(block, i, template, respond)
    try:
        yield
    finally:
        for i, block in enumerate(saved):
            blocks.modules[i] = block


def output_structure(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> int | None:
    """What a block returns: None for a tensor, else the length of its tuple."""
    out = block(hidden, *call.args, **call.kwargs)
    return len(out) if isinstance(out, (tuple, list)) else None


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


class BlockCalls:
    """What each block is called with, per calibration batch: ``calls[i][b]`` is block i's call on
    batch b. Blocks called alike share one list (most models: all of them)."""

    def __init__(self, per_block: list[list[BlockCall]]):
        self.per_block = per_block

    def __getitem__(self, block: int) -> list[BlockCall]:
        return self.per_block[block]

    def __len__(self) -> int:
        return len(self.per_block)

    @property
    def kinds(self) -> int:
        """How many distinct calls the blocks get (2 for sliding-window/full attention models)."""
        return len({id(calls) for calls in self.per_block})

    def map(self, fn: Any) -> BlockCalls:
        """Every call through ``fn``, keeping shared lists shared."""
        done: dict[int, list[BlockCall]] = {}
        out = []
        for calls in self.per_block:
            if id(calls) not in done:
                done[id(calls)] = [fn(c) for c in calls]
            out.append(done[id(calls)])
        return BlockCalls(out)


@torch.no_grad()
def capture_block_calls(
    model: nn.Module,
    blocks: Blocks,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device | str,
    template: int | None,
) -> tuple[list[torch.Tensor], BlockCalls]:
    """Block 0's hidden states and every block's call, per batch (see the module docstring).

    The model's forward runs with stand-ins (``template``: the blocks' output structure, from
    :func:`output_structure`) and stops at the last block; only the embedding stage computes.
    """
    hiddens: list[torch.Tensor] = []
    per_block: list[list[BlockCall]] = [[] for _ in range(len(blocks))]
    mask_box: dict[str, torch.Tensor | None] = {}
    last = len(blocks) - 1

    def respond(hidden: torch.Tensor, index: int, args: tuple, kwargs: dict) -> torch.Tensor:
        if index == 0:
            hiddens.append(hidden.detach())
        per_block[index].append(BlockCall(tuple(args), dict(kwargs), mask_box.get("mask")))
        if index == last:
            raise _Caught
        return hidden

    use_cache = accepts_argument(model.forward, "use_cache")
    with standing_in(blocks, template, respond):
        for batch in batches:
            if isinstance(batch, torch.Tensor):
                batch = {"input_ids": batch}
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            mask = batch.get("attention_mask")
            mask_box["mask"] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
            n = len(per_block[last])
            try:
                model(**batch, **({"use_cache": False} if use_cache else {}))
            except _Caught:
                pass
            if len(per_block[last]) != n + 1:
                raise RuntimeError("the model's forward did not call each of its blocks once")
    return hiddens, BlockCalls(_share_alike(per_block))


def _share_alike(per_block: list[list[BlockCall]]) -> list[list[BlockCall]]:
    """Blocks whose calls hold the very same objects as an earlier block's share that block's list."""
    kinds: list[list[BlockCall]] = []
    out = []
    for calls in per_block:
        same = next((k for k in kinds if all(_alike(a, b) for a, b in zip(k, calls, strict=True))), None)
        if same is None:
            kinds.append(calls)
            same = calls
        out.append(same)
    return out


def _alike(a: Any, b: Any) -> bool:
    if isinstance(a, BlockCall):
        return _alike(a.args, b.args) and _alike(a.kwargs, b.kwargs)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_alike(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_alike(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # objects without a usable equality (caches): the same object or not alike
        return a is b


def block_output(out: Any) -> torch.Tensor:
    """The hidden states a block returned (a tensor, or the first element of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """``block`` applied to ``hidden`` with the batch's other arguments; returns its hidden states."""
    return block_output(block(hidden, *call.args, **call.kwargs))
