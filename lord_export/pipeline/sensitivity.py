"""How much the language-model loss cares about each group's output: the ``fisher`` allocation's
sensitivities s_g = Σ_t ‖∂L/∂y_t‖² / (N · d_out) (see :mod:`lord_export.core.allocate`).

In memory, :class:`SensitivityProbe` runs calibration batches with gradients (their forward feeds
the statistics too, so the sensitivities cost one backward over a few batches). Block by block
(:func:`streamed_sensitivities`), the loss is taken on the final hidden states of the survey (the
model's own forward with its blocks replaced by a replay) and its gradient is carried back one
block at a time: each block loaded again, recomputed from its stored input, backpropagated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..calibration.blocks import BlockCalls, Blocks, accepts_argument, run_block
from ..calibration.statistics import exact_matmuls
from ..device import model_device
from ..errors import UsageError
from ..progress import Progress
from .streaming import Streams, WeightSource, replaying

#: Tokens the Fisher sensitivity pass uses: the first calibration batches up to at least this many
#: (whole batches, at least one), and at most :data:`SENSITIVITY_SHARE` of all calibration tokens.
#: Its backward costs about two calibration forwards per token, and per-group means of squared
#: gradients settle on a few thousand tokens; the share keeps the pass small next to a small
#: calibration set (SmolLM2's 4,096 tokens: the backward over all of them added 63%).
SENSITIVITY_TOKENS = 4096
SENSITIVITY_SHARE = 0.25


def sensitivity_batch_count(
    batches: Sequence[dict[str, torch.Tensor]], max_tokens: int = SENSITIVITY_TOKENS, share: float = SENSITIVITY_SHARE
) -> int:
    """How many leading batches the Fisher pass uses: the fewest that hold
    min(``max_tokens``, ``share`` × all tokens) tokens (at least one batch)."""
    sizes = [int(batch["input_ids"].numel()) for batch in batches]
    target = min(max_tokens, share * sum(sizes))
    tokens = 0
    for i, size in enumerate(sizes):
        tokens += size
        if tokens >= target:
            return i + 1
    return len(batches)


def check_causal_lm(model: nn.Module) -> None:
    """UsageError unless ``model`` is a causal LM (the fisher allocation differentiates its LM loss)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None or not hasattr(model, "lm_head") and "CausalLM" not in type(model).__name__:
        raise UsageError("the fisher allocation needs a causal language model (use allocation 'spectrum')")


def lm_loss_sum(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over real tokens: the L of the Fisher sensitivities."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    keep = mask[:, 1:].bool()
    return torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep], reduction="sum")


def no_cache(model: nn.Module) -> dict:
    """``use_cache=False`` when the model's forward takes it."""
    return {"use_cache": False} if accepts_argument(model.forward, "use_cache") else {}


class SensitivityProbe:
    """Sums ‖∂L/∂y_t‖² over the output rows of every watched layer, one forward + backward per batch.

    L is the summed next-token cross-entropy of the batch (padding masked). Parameters get no
    gradients: the input embeddings' output is made to require grad instead, so memory stays that
    of activations. Hooks live only during :meth:`run`, so the same model can run other forwards in
    between (the survey folds the probe's batches into its calibration pass).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        check_causal_lm(model)
        self.model = model
        modules = dict(model.named_modules())
        self.modules = {n: modules[n] for n in layers}
        self.width = {
            n: m.weight.shape[0] if isinstance(m, nn.Linear) else m.weight.shape[1] for n, m in self.modules.items()
        }
        self.sums = dict.fromkeys(self.modules, 0.0)
        self.tokens = 0

    def run(self, batch: dict[str, torch.Tensor]) -> None:
        """One forward + backward of ``batch`` (moved to the model's device), gradients summed."""
        model, device = self.model, model_device(self.model)
        batch = {k: v.to(device) for k, v in batch.items()}
        handles = [model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_())]
        for name, module in self.modules.items():
            handles.append(module.register_forward_hook(self._watch(name)))
        requires = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            with torch.enable_grad():
                logits = model(**batch, use_cache=False).logits
                lm_loss_sum(logits, batch).backward()
        finally:
            for h in handles:
                h.remove()
            for n, p in model.named_parameters():
                p.requires_grad_(requires[n])
        self.tokens += int(batch.get("attention_mask", torch.ones_like(batch["input_ids"])).sum())

    def _watch(self, name: str):
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: self._add(name, g))

        return hook

    def _add(self, name: str, g: torch.Tensor) -> None:
        flat = g.detach().reshape(-1).float()
        self.sums[name] += float(torch.dot(flat, flat))  # float32 BLAS dot: no float64 copy

    def sensitivities(self, groups: dict[str, list[str]]) -> dict[str, float]:
        """s_g = Σ_t ‖∂L/∂y_t‖² / (N · d_out) per group (``groups``: name → member layers)."""
        out = {}
        for g, members in groups.items():
            width = sum(self.width[m] for m in members)
            out[g] = sum(self.sums[m] for m in members) / (max(self.tokens, 1) * max(width, 1))
        return out


def fisher_sensitivities(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], groups: dict[str, list[str]]
) -> dict[str, float]:
    """s_g per group (``groups``: name → member layers) on the first calibration batches holding
    :data:`SENSITIVITY_TOKENS` tokens (:class:`SensitivityProbe`)."""
    probe = SensitivityProbe(model, [m for members in groups.values() for m in members])
    was_training = model.training
    try:
        model.eval()
        for batch in batches[: sensitivity_batch_count(batches)]:
            probe.run(batch)
    finally:
        model.train(was_training)
    return probe.sensitivities(groups)


def streamed_sensitivities(
    model: nn.Module,
    blocks: Blocks,
    source: WeightSource,
    device: torch.device,
    streams: Streams,
    inputs_of: Callable[[int], list[torch.Tensor]],
    n: int,
    calls: BlockCalls,
    batches: Sequence[dict[str, torch.Tensor]],
    template: int | None,
    members: list[dict[str, list[str]]],
    *,
    checkpoints: Any = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, float]:
    """Σ_t ‖∂L/∂y_t‖² per group (block i's groups: ``members[i]``, full group name → layers relative to
    the block), from the first ``n`` batches: ``streams.dense`` holds their final hidden states and
    ``inputs_of(i)`` block i's inputs. Divide by tokens × d_out for s_g. With ``checkpoints`` the
    gradients are saved after every block, and a resumed run continues with the next block down."""
    state = checkpoints.state.get("sensitivity") if checkpoints is not None else None
    if state:
        saved = checkpoints.load_tensors("ckpt-grads")
        grads = [streams.park(saved[str(b)]) for b in range(n)]
        sums, top = dict(state["sums"]), state["next"]
    else:
        grads, sums, top = head_gradients(model, blocks, streams, n, batches, template), {}, len(blocks) - 1
    progress = Progress(say, "sensitivities", top + 1, unit="block")
    for i in reversed(range(top + 1)):
        grads = block_gradients(blocks, i, source, device, streams, inputs_of(i), grads, calls[i], members[i], sums)
        if checkpoints is not None:
            tensors = {"ckpt-grads": {str(b): g for b, g in enumerate(grads)}}
            checkpoints.save(tensors, sensitivity={"next": i - 1, "sums": sums})
        progress.step(blocks.name(i))
    return sums


def head_gradients(
    model: nn.Module, blocks: Blocks, streams: Streams, n: int, batches: Sequence[dict], template: int | None
) -> list[torch.Tensor]:
    """∂L/∂(final hidden states) of the first ``n`` batches: the model run with its blocks replaced by a
    replay of ``streams.dense`` (everything after the blocks — final norm, LM head — computes)."""
    leaves = [streams.load(h).clone().requires_grad_(True) for h in streams.dense[:n]]
    current = {"b": 0}
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    embed_device = model_device(model)
    try:
        model.requires_grad_(False)
        with replaying(blocks, template, lambda: leaves[current["b"]]), torch.enable_grad(), exact_matmuls():
            for b in range(n):
                current["b"] = b
                batch = {k: v.to(embed_device) for k, v in batches[b].items()}
                logits = model(**batch, **no_cache(model)).logits
                lm_loss_sum(logits, batch).backward()
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires[name])
    return [streams.park(leaf.grad) for leaf in leaves]


def block_gradients(
    blocks: Blocks,
    i: int,
    source: WeightSource,
    device: torch.device,
    streams: Streams,
    inputs: list[torch.Tensor],
    grads: list[torch.Tensor],
    calls: list,
    members: dict[str, list[str]],
    sums: dict[str, float],
) -> list[torch.Tensor]:
    """Backpropagate ``grads`` (∂L/∂ block i's output) through block i; add Σ‖∂L/∂y‖² per group."""
    block, prefix = blocks.modules[i], blocks.name(i)
    source.materialize(block, prefix, device)
    block.requires_grad_(False)
    modules = dict(block.named_modules())
    handles = []

    def add(group: str, g: torch.Tensor) -> None:
        sums[group] = sums.get(group, 0.0) + float(g.double().square().sum())

    def watch(group: str):
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: add(group, g))

        return hook

    for group, names in members.items():
        handles.extend(modules[n].register_forward_hook(watch(group)) for n in names)
    out_grads = []
    try:
        with torch.enable_grad(), exact_matmuls():
            for b, (h, g) in enumerate(zip(inputs, grads, strict=True)):
                x = streams.load(h).clone().requires_grad_(True)
                y = run_block(block, x, calls[b])
                torch.autograd.backward(y, streams.load(g))
                out_grads.append(streams.park(x.grad))
    finally:
        for handle in handles:
            handle.remove()
        source.release(block)
    return out_grads
