"""How much the language-model loss cares about each group's output: the ``fisher`` allocation's
sensitivities s_g = Σ_t ‖∂L/∂y_t‖² / (N · d_out) (see :mod:`lord_export.core.allocate`).

In memory, :class:`SensitivityProbe` runs calibration batches with gradients (their forward feeds
the statistics too, so the sensitivities cost one backward over a few batches). Block by block
(:func:`streamed_sensitivities`), the loss is taken on the final hidden states of the survey (the
model's own forward with its blocks replaced by a replay) and its gradient is carried back one
block at a time: each block loaded again, recomputed from its stored input, backpropagated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..calibration.blocks import Blocks, accepts_argument, run_block
from ..calibration.statistics import exact_matmuls
from ..device import model_device
from ..errors import UsageError
from ..progress import Progress
from .streaming import Streams, WeightSource, replaying

#: Tokens the Fisher sensitivity pass uses: calibration batches up to at least this many (whole
#: batches, at least one, evenly spaced over the set: :func:`sensitivity_batches`), and at most
#: :data:`SENSITIVITY_SHARE` of all calibration tokens.
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


def sensitivity_batches(
    batches: Sequence[dict[str, torch.Tensor]], max_tokens: int = SENSITIVITY_TOKENS, share: float = SENSITIVITY_SHARE
) -> list[int]:
    """Which batches the Fisher pass uses: :func:`sensitivity_batch_count` of them, evenly spaced over
    the calibration set (centred). Calibration blocks are packed in corpus order, so the leading
    batches would all come from the first files."""
    n = len(batches)
    k = sensitivity_batch_count(batches, max_tokens, share)
    return [min(n - 1, int((j + 0.5) * n / k)) for j in range(k)]


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


#: Added to the mean-normalized per-feature Fisher before it weights a group's outputs: a feature the
#: sample never moved still counts a little (measured on SmolLM2: 1e-3 to 1e-1 within 1.5 points).
WEIGHT_FLOOR = 1e-3


class OutputFisher:
    """The empirical Fisher of the LM loss at each targeted layer's output, per output feature:
    F_l[j] = Σ_t (∂L/∂y_tj)² over ``tokens`` tokens (float64 vectors, by layer name).

    Block by block (:func:`streamed_fisher`) the output of every block is measured too, under the
    block's name. It gives the allocation its sensitivities, s_g = Σ_j F[j] / (N · d_out) for a group,
    block refinement its error weighting, and the closed form its output weighting (:meth:`weights`):
    minimizing ‖diag(F)^{1/2} (W X − A B X)‖ instead of ‖W X − A B X‖ keeps the directions the loss
    reacts to, the second-order change of the loss ½ δyᵀ F δy with the Fisher taken diagonal.
    """

    def __init__(self, vectors: dict[str, torch.Tensor] | None = None, tokens: int = 0) -> None:
        self.vectors = vectors or {}
        self.tokens = tokens

    def add(self, name: str, g: torch.Tensor) -> None:
        flat = g.detach().reshape(-1, g.shape[-1]).float()
        v = flat.square().sum(0).double().cpu()
        self.vectors[name] = self.vectors[name] + v if name in self.vectors else v

    def sensitivity(self, members: Sequence[str]) -> float:
        """s_g of the group made of ``members`` (layer names)."""
        total = sum(float(self.vectors[m].sum()) for m in members if m in self.vectors)
        width = sum(self.vectors[m].numel() for m in members if m in self.vectors)
        return total / (max(self.tokens, 1) * max(width, 1))

    def weights(self, members: Sequence[str]) -> torch.Tensor | None:
        """The row weights sqrt(F / mean(F) + floor) of the group's stacked output (None when a member
        was not measured)."""
        if not members or any(m not in self.vectors for m in members):
            return None
        f = torch.cat([self.vectors[m] for m in members])
        mean = float(f.mean())
        if not mean > 0:
            return None
        return (f / mean + WEIGHT_FLOOR).sqrt()

    def renamed(self, prefix: str) -> OutputFisher:
        """The vectors of the layers under ``prefix`` (a block's name), keyed relative to it."""
        cut = len(prefix) + 1
        return OutputFisher({k[cut:]: v for k, v in self.vectors.items() if k.startswith(prefix + ".")}, self.tokens)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.vectors)


class SensitivityProbe:
    """Sums ‖∂L/∂y_t‖² over the output rows of every watched layer, one forward + backward per batch.

    L is the summed next-token cross-entropy of the batch (padding masked). Parameters get no
    gradients: the input embeddings' output is made to require grad instead, so memory stays that
    of activations. Hooks live only during :meth:`run`, so the same model can run other forwards in
    between (the survey folds the probe's batches into its calibration pass).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], blocks: Blocks | None = None):
        check_causal_lm(model)
        self.model = model
        modules = dict(model.named_modules())
        self.modules = {n: modules[n] for n in layers}
        # block outputs (hidden states, the first output) under the block's name: refinement's weights
        self.blocks = {blocks.name(i): m for i, m in enumerate(blocks.modules)} if blocks is not None else {}
        self.width = {
            n: m.weight.shape[0] if isinstance(m, nn.Linear) else m.weight.shape[1] for n, m in self.modules.items()
        }
        self.fisher = OutputFisher()

    def run(self, batch: dict[str, torch.Tensor]) -> None:
        """One forward + backward of ``batch`` (moved to the model's device), gradients summed."""
        model, device = self.model, model_device(self.model)
        batch = {k: v.to(device) for k, v in batch.items()}
        handles = [model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_())]
        for name, module in (self.modules | self.blocks).items():
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
        self.fisher.tokens += int(batch.get("attention_mask", torch.ones_like(batch["input_ids"])).sum())

    def _watch(self, name: str):
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            if isinstance(out, (tuple, list)):
                out = out[0]
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda g: self._add(name, g))

        return hook

    def _add(self, name: str, g: torch.Tensor) -> None:
        self.fisher.add(name, g)

    def sensitivities(self, groups: dict[str, list[str]]) -> dict[str, float]:
        """s_g = Σ_t ‖∂L/∂y_t‖² / (N · d_out) per group (``groups``: name → member layers)."""
        return {g: self.fisher.sensitivity(members) for g, members in groups.items()}


def fisher_sensitivities(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], groups: dict[str, list[str]]
) -> dict[str, float]:
    """s_g per group (``groups``: name → member layers) on the calibration batches of
    :func:`sensitivity_batches` (:class:`SensitivityProbe`)."""
    probe = SensitivityProbe(model, [m for members in groups.values() for m in members])
    was_training = model.training
    try:
        model.eval()
        for b in sensitivity_batches(batches):
            probe.run(batches[b])
    finally:
        model.train(was_training)
    return probe.sensitivities(groups)


def streamed_fisher(
    engine: Any,
    blocks: Blocks,
    setup: Any,
    probe: Sequence[int],
    batches: Sequence[dict[str, torch.Tensor]],
    layers: dict[int, list[str]],
    *,
    checkpoints: Any = None,
) -> OutputFisher:
    """The :class:`OutputFisher` of every targeted layer (block i's: ``layers[i]``, relative names) from the
    calibration batches numbered ``probe``, one block in memory: their hidden states are run forward through the
    blocks (each block's inputs kept), the LM loss is taken on the final hidden states (the model's own
    head, its blocks replaced by a replay) and its gradient is carried back block by block - each block
    loaded again, recomputed from its kept input, backpropagated. With ``checkpoints`` each block's
    step is saved, and a resumed run continues after the last one."""
    state = (checkpoints.state.get("fisher") if checkpoints is not None else None) or {}
    s = setup.streams
    if state.get("done"):
        return OutputFisher(checkpoints.load_tensors("ckpt-fisher"), state["tokens"])
    n = len(probe)
    tokens = sum(int(setup.calls[0][b].mask.sum()) if setup.calls[0][b].mask is not None
                 else s.dense[b].shape[:2].numel() for b in probe)  # fmt: skip
    inputs = _FisherInputs(checkpoints)
    hidden = [s.dense[b] for b in probe]
    start = state.get("forward_done", 0)
    if start:
        saved = checkpoints.load_tensors("ckpt-fisher-hidden")
        hidden = [s.park(saved[str(b)]) for b in range(n)]
    progress = Progress(engine.say, "sensitivities (forward)", len(blocks) - start, unit="block")
    with torch.no_grad():
        for i in range(start, len(blocks)):
            inputs.keep(i, hidden)
            block = engine.materialize(blocks, i)
            pairs = zip(probe, hidden, strict=True)
            hidden = [s.park(run_block(block, s.load(h), setup.calls[i][b])) for b, h in pairs]
            engine.source.release(block)
            if checkpoints is not None:
                ckpt = {"ckpt-fisher-hidden": {str(b): h for b, h in enumerate(hidden)}}
                checkpoints.save(ckpt, fisher={"forward_done": i + 1})
            progress.step(blocks.name(i))
    if "backward_next" in state:
        fisher = OutputFisher(checkpoints.load_tensors("ckpt-fisher"), tokens)
        saved = checkpoints.load_tensors("ckpt-grads")
        grads, top = [s.park(saved[str(b)]) for b in range(n)], state["backward_next"]
    else:
        fisher, top = OutputFisher(tokens=tokens), len(blocks) - 1
        probe_batches = [batches[b] for b in probe]
        grads = head_gradients(engine.model, blocks, _Hidden(s, hidden), n, probe_batches, setup.template)
    progress = Progress(engine.say, "sensitivities (backward)", top + 1, unit="block")
    for i in reversed(range(top + 1)):
        grads = block_gradients(
            blocks,
            i,
            engine.source,
            engine.device,
            s,
            inputs.get(i),
            grads,
            [setup.calls[i][b] for b in probe],
            layers[i],
            fisher,
        )
        if checkpoints is not None:
            ckpt = {"ckpt-grads": {str(b): g for b, g in enumerate(grads)}, "ckpt-fisher": fisher.tensors()}
            checkpoints.save(ckpt, fisher={"forward_done": len(blocks), "backward_next": i - 1, "tokens": tokens})
        progress.step(blocks.name(i))
    if checkpoints is not None:
        checkpoints.save({"ckpt-fisher": fisher.tensors()}, fisher={"done": True, "tokens": tokens})
    return fisher


class _FisherInputs:
    """Each block's inputs for the backward pass: on disk in a resumable run, else in memory."""

    def __init__(self, checkpoints: Any) -> None:
        self.checkpoints, self.kept = checkpoints, {}

    def keep(self, i: int, hiddens: list[torch.Tensor]) -> None:
        if self.checkpoints is not None:
            self.checkpoints.save_tensors(f"ckpt-inputs-{i}", {str(b): h for b, h in enumerate(hiddens)})
        else:
            self.kept[i] = list(hiddens)

    def get(self, i: int) -> list[torch.Tensor]:
        if i in self.kept:
            return self.kept[i]
        saved = self.checkpoints.load_tensors(f"ckpt-inputs-{i}")
        return [saved[str(b)] for b in range(len(saved))]


class _Hidden:
    """The final hidden states of the Fisher batches, in the shape :func:`head_gradients` reads."""

    def __init__(self, streams: Streams, hidden: list[torch.Tensor]) -> None:
        self.dense, self.load, self.park = hidden, streams.load, streams.park


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
    layers: list[str],
    fisher: OutputFisher,
) -> list[torch.Tensor]:
    """Backpropagate ``grads`` (∂L/∂ block i's output) through block i; add each of ``layers``' (relative
    names) per-feature Σ (∂L/∂y)² to ``fisher`` under its full name, and the block output's under the
    block's name (it weights block refinement's error, :mod:`lord_export.pipeline.refine`)."""
    block, prefix = blocks.modules[i], blocks.name(i)
    for g in grads:
        fisher.add(prefix, streams.load(g))
    source.materialize(block, prefix, device)
    block.requires_grad_(False)
    modules = dict(block.named_modules())
    handles = []

    def watch(name: str):
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: fisher.add(name, g))

        return hook

    for name in layers:
        handles.append(modules[name].register_forward_hook(watch(f"{prefix}.{name}")))
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
