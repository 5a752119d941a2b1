"""Streaming machinery: where a block's weights and the calibration activations live while the engine
works one block at a time, and the stand-ins that run the model's own forward around its blocks.

* Weight sources: :class:`InMemoryWeights` (a model in memory: a block visits the compute device,
  in the compute dtype, and goes back) and :class:`CheckpointWeights` (a model built on the meta
  device: a block is read from the safetensors shards and freed afterwards).
* :class:`Streams`: the hidden states entering the current block, one tensor per calibration batch,
  on the dense path and (when the run needs it) on the compressed path, parked on the CPU while an
  accelerator computes.
* :func:`replaying`: the model's own forward with its blocks replaced by stand-ins
  (:class:`~lord_export.calibration.blocks.StandIn`) that return stored final hidden states, for
  what runs after the blocks (the LM head's loss, targets outside the blocks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..calibration.blocks import BlockCall, Blocks, run_block, standing_in
from ..calibration.statistics import select_tokens
from ..core.experts import checkpoint_candidates, expert_slice, renamed_blocks
from ..core.fingerprint import weight_fingerprint
from ..core.targets import find_linears
from ..errors import CalibrationError


class WeightSource:
    """Where a block's weights come from while it is processed, and where they go afterwards."""

    #: dtype blocks compute in (None: as stored)
    compute_dtype: torch.dtype | None = None

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        raise NotImplementedError

    def release(self, module: nn.Module) -> None:
        raise NotImplementedError


class InMemoryWeights(WeightSource):
    """The model is in memory: a block visits the compute device (in ``compute_dtype`` when given) and
    goes back where it was, in the dtype it had."""

    def __init__(self, compute_dtype: torch.dtype | None = None) -> None:
        self.compute_dtype = compute_dtype
        self._home: dict[int, tuple[torch.device, torch.dtype | None]] = {}

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        p = next((p for p in module.parameters() if p.is_floating_point()), None)
        self._home[id(module)] = (p.device, p.dtype) if p is not None else (torch.device(device), None)
        module.to(device=device, dtype=self.compute_dtype) if self.compute_dtype else module.to(device)

    def release(self, module: nn.Module) -> None:
        device, dtype = self._home.pop(id(module), (torch.device("cpu"), None))
        module.to(device=device, dtype=dtype) if dtype is not None else module.to(device)


class CheckpointWeights(WeightSource):
    """Blocks read from safetensors one at a time into a model built on the meta device; freed after.

    Floating-point tensors are cast to ``compute_dtype`` when given (else kept as stored). With
    ``fingerprint`` (a set of linear layer names) the content fingerprint of those layers' dense
    weights is taken as they are read (:attr:`fingerprints`), so a plan made block by block knows
    the weights it replaced.
    """

    def __init__(
        self,
        reader: Any,
        compute_dtype: torch.dtype | None,
        base_prefix: str = "",
        *,
        fingerprint: set[str] | None = None,
    ):
        self.reader = reader
        self.compute_dtype = compute_dtype
        self.base_prefix = base_prefix
        self.fingerprint = fingerprint or set()
        self.fingerprints: dict[str, dict[str, Any]] = {}

    def checkpoint_name(self, name: str) -> str | None:
        """The checkpoint's name for the model's tensor ``name`` (with or without the base prefix)."""
        if name in self.reader:
            return name
        p = self.base_prefix + "."
        if self.base_prefix and name.startswith(p) and name[len(p) :] in self.reader:
            return name[len(p) :]
        if self.base_prefix and p + name in self.reader:
            return p + name
        return next((n for n in renamed_blocks(name) if n in self.reader), None)

    def load_into(self, module: nn.Module, names: dict[str, str], device: torch.device | str) -> list[str]:
        """Assign ``{local name: model name}`` tensors of ``module``; returns model names not in the checkpoint."""
        state, missing, fused = {}, [], {}
        try:
            for local, full in names.items():
                ckpt = self.checkpoint_name(full)
                t = self.reader.get(ckpt) if ckpt is not None else self._expert_weight(full, fused)
                if t is None:
                    missing.append(full)
                    continue
                if full.endswith(".weight") and full[: -len(".weight")] in self.fingerprint:
                    self.fingerprints[full[: -len(".weight")]] = weight_fingerprint(t)  # as stored
                dtype = self.compute_dtype if self.compute_dtype is not None and t.is_floating_point() else t.dtype
                # a copy, never a view of the memory map: a view would pin the shard's whole mapping
                # (every page read from it) for as long as the tensor lives, e.g. in the writer's buffer
                state[local] = t.to(device=device, dtype=dtype, copy=True)
        finally:
            # unmap the shards: pages of blocks already done would otherwise stay in RSS
            self.reader.close()
        module.load_state_dict(state, strict=False, assign=True)
        return missing

    def _expert_weight(self, name: str, fused: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """An unfused expert's weight (:mod:`lord_export.core.experts`) from the checkpoint's per-expert
        keys under another naming, or sliced from its fused 3-D tensor (read once per call: ``fused``)."""
        for key, half, e in checkpoint_candidates(name):
            ckpt = self.checkpoint_name(key)
            if ckpt is None:
                continue
            if e is None:
                return self.reader.get(ckpt)
            if ckpt not in fused:
                fused[ckpt] = self.reader.get(ckpt)
            return expert_slice(fused[ckpt], half, e)
        return None

    def materialize(self, module: nn.Module, prefix: str, device: torch.device) -> None:
        names = {local: f"{prefix}.{local}" for local in module.state_dict()}
        missing = self.load_into(module, names, device)
        if missing:
            raise CalibrationError(f"the checkpoint lacks tensors of {prefix}: {missing[:5]}")
        module.to(device)  # non-persistent buffers (rotary tables, causal masks) follow the weights

    def release(self, module: nn.Module) -> None:
        """Parameters and persistent buffers back to the meta device; non-persistent buffers (computed
        when the model was built, never in the checkpoint) stay, for the block's next visit."""
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
            for name, b in list(sub._buffers.items()):
                if b is not None and name not in sub._non_persistent_buffers_set:
                    sub._buffers[name] = b.to("meta")


def targeted_linears(model: nn.Module, layers: Sequence[str]) -> set[str]:
    """The names of ``layers`` that are linear layers of ``model`` (what a plan fingerprints)."""
    linears = find_linears(model)
    return {n for n in layers if n in linears}


class Streams:
    """The hidden states entering the current block, per calibration batch.

    ``dense`` follows the dense model; ``comp`` (when the run keeps two streams: staged calibration,
    block refinement) follows the model compressed so far. Tensors wait on the CPU when the engine
    computes on an accelerator (:meth:`park`) and visit the device one batch at a time (:meth:`load`),
    in ``dtype`` (the compute dtype).
    """

    def __init__(self, hiddens: Sequence[torch.Tensor], device: torch.device, *, two: bool, dtype=None):
        self.device = torch.device(device)
        self.dtype = dtype
        self.dense = [self.park(h) for h in hiddens]
        self.comp = list(self.dense) if two else None

    @property
    def two(self) -> bool:
        return self.comp is not None

    @property
    def final(self) -> list[torch.Tensor]:
        """The stream the model as compressed will see (compressed when kept, else dense)."""
        return self.comp if self.comp is not None else self.dense

    def park(self, h: torch.Tensor) -> torch.Tensor:
        h = h.detach()
        if self.dtype is not None and h.is_floating_point():
            h = h.to(self.dtype)
        return h.to("cpu") if self.device.type != "cpu" else h

    def load(self, h: torch.Tensor) -> torch.Tensor:
        return h.to(self.device)

    def __len__(self) -> int:
        return len(self.dense)


class _Stop(Exception):
    """Stops a block's forward once the input of the layer being calibrated was captured."""


def capture_input(block: nn.Module, layer: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
    """The (tokens, d) rows entering ``layer`` when ``block`` runs on ``hidden`` (padding removed).

    The block's forward is stopped right there: later layers of the block are not computed.
    """
    box: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, args: tuple) -> None:
        box["x"] = args[0]
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    try:
        run_block(block, hidden, call)
    except _Stop:
        pass
    finally:
        handle.remove()
    if "x" not in box:
        raise CalibrationError("the block never reached the layer being calibrated")
    rows = select_tokens(box["x"], call.mask)
    return rows if rows is not None else box["x"].detach().reshape(-1, box["x"].shape[-1])


def replaying(blocks: Blocks, template: int | None, outputs: Callable[[], torch.Tensor]):
    """:func:`standing_in` that makes the blocks' whole stack return ``outputs()`` (the stored final
    hidden states of the current batch): block 0 returns them, the others pass them on."""

    def respond(hidden: torch.Tensor, index: int, args: tuple, kwargs: dict) -> torch.Tensor:
        return outputs().to(hidden.device) if index == 0 else hidden

    return standing_in(blocks, template, respond)


def move_call(call: BlockCall, device: torch.device, memo: dict[int, Any] | None = None) -> BlockCall:
    """``call`` with its tensors on ``device`` (tensors shared between calls are moved once, via ``memo``)."""
    memo = {} if memo is None else memo

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            if id(v) not in memo:
                memo[id(v)] = (v, v.to(device))
            return memo[id(v)][1]
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        if isinstance(v, list):
            return [move(x) for x in v]
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        return v

    return BlockCall(move(call.args), move(call.kwargs), call.mask)
