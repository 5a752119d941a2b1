"""Block refinement: after a block's closed-form factors, fit its LoRD parameters to the DENSE block.

The closed forms are optimal for each matrix on its own and cannot see what comes after a layer
(attention's softmax, the MLP's activation, the other layers of the block). Refinement optimizes the
block's LoRD parameters - shared bottlenecks B, up-projections A, member biases; every dense
parameter of the block frozen - so that the LoRD block fed the compressed-path inputs X̂ reproduces
the dense block's output on the dense inputs X (the block-level reconstruction of AA-SVD and
AutoRound):

    min over the LoRD parameters of  mean_t ‖f_LoRD(X̂)_t − f_dense(X)_t‖² / ‖f_dense(X)_t‖²

averaged over real (unpadded) tokens: each token's error relative to its own output. The next block
sees each token through a norm (RMSNorm / LayerNorm divide by the token's scale), so that is the error
it inherits; a sum over tokens would instead be ruled by the few tokens with massive activations (in
SmolLM2's middle blocks the first token of a sequence holds 86-98% of the output's squared norm, and
refining on the summed error barely moved those blocks). With the Fisher output weighting the
squared error of each output feature j is weighted by w_j = F_j / mean(F) (+ a floor), F_j the
empirical Fisher of the LM loss at the block's output (measured by the survey): ½ δyᵀ F δy, the
loss's second-order change, with F diagonal - the errors the loss does not react to cost little.

Adam from the closed form, in float32 (factors stored in bfloat16 get float32 master copies for the
length of the fit), one calibration batch per step, the learning rate warmed up linearly over the first
eighth of the steps and then decayed (cosine) to a tenth: without the warmup, Adam's first steps move
every parameter by about the learning rate whatever its gradient, and a rate of 1e-3 made most blocks
worse at the first check; with it, 1e-3 takes stories260K's increase at 0.8 from +145% to +116% and
leaves SmolLM2 and the reference model where 1e-4 did (benchmarks/RESULTS.md). Where the closed form
is already close to the block's optimum (light compression: most of SmolLM2's blocks at 0.9) even the
warmed-up 1e-3 overshoots, and the first held-out measurement shows no gain; the fit then starts over
from the closed form at a tenth of the rate (``RefineConfig.backoff``), which costs ``eval_every`` steps.
At every later check without a gain the fit goes back to its best parameters and goes on at a third of
the rate (``RefineConfig.decay``; Adam's moments kept): a block whose best point came early (on SmolLM2
at 0.8, 7 of 30 blocks were best at step 8, the top of the warmup, and stopped at step 32) keeps
descending at a rate that no longer overshoots, instead of stopping there.

The last batches of the calibration set are held out (never trained on); the held-out error is
measured before the first step and every few steps, and the parameters with the lowest held-out error
are kept - the closed form included, so refinement never makes the block worse on held-out tokens.
Memory is one block plus the two streams the engine keeps anyway.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration.blocks import BlockCall, run_block
from ..core.modules import LordBottleneck, LordLinear
from ..errors import UsageError
from .heal import lr_factor


@dataclass
class RefineConfig:
    """How a block is refined; validated on construction. Field help is in ``metadata["help"]``."""

    steps: int = field(default=64, metadata={"help": "at most this many Adam steps per block (one batch each)"})
    lr: float = field(
        default=1e-3, metadata={"help": "Adam's learning rate (after the warmup, cosine decay to a tenth)"}
    )
    holdout: float = field(
        default=0.125, metadata={"help": "share of the calibration batches held out for early stopping"}
    )
    warmup: int | None = field(
        default=None, metadata={"help": "steps of linear learning-rate warmup (default: steps // 8)"}
    )
    eval_every: int = field(default=8, metadata={"help": "steps between held-out measurements"})
    patience: int = field(default=3, metadata={"help": "measurements without improvement before stopping"})
    decay: float = field(
        default=1 / 3,
        metadata={
            "help": "after a later held-out measurement without gain, back to the best parameters and on at this "
            "fraction of the learning rate (1: off)"
        },
    )
    backoff: int = field(
        default=1,
        metadata={
            "help": "restarts from the closed form at a tenth of the learning rate when the first held-out "
            "measurement shows no gain"
        },
    )

    def __post_init__(self) -> None:
        if int(self.steps) < 1:
            raise UsageError(f"refinement needs steps >= 1, got {self.steps}")
        if not self.lr > 0:
            raise UsageError(f"refinement needs a learning rate > 0, got {self.lr}")
        if not 0 < self.holdout < 1:
            raise UsageError(f"the held-out share must be in (0, 1), got {self.holdout}")
        self.warmup = int(self.steps) // 8 if self.warmup is None else int(self.warmup)
        if not 0 <= self.warmup < int(self.steps):
            raise UsageError(f"refinement needs 0 <= warmup < steps, got {self.warmup}")
        if int(self.eval_every) < 1 or int(self.patience) < 1:
            raise UsageError("eval_every and patience must be >= 1")
        if not 0 < float(self.decay) <= 1:
            raise UsageError(f"the learning-rate decay must be in (0, 1], got {self.decay}")
        if int(self.backoff) < 0:
            raise UsageError(f"backoff must be >= 0, got {self.backoff}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lord_parameters(block: nn.Module) -> list[nn.Parameter]:
    """The block's LoRD parameters (bottlenecks, up-projections, member biases), each once."""
    seen: dict[int, nn.Parameter] = {}
    for m in block.modules():
        if isinstance(m, (LordBottleneck, LordLinear)):
            for p in m.parameters(recurse=False):
                seen.setdefault(id(p), p)
    return list(seen.values())


def split_batches(n: int, holdout: float) -> tuple[list[int], list[int]]:
    """(training, held-out) batch indices: the last ``max(1, round(holdout·n))`` are held out; a single
    batch is both (there is nothing to hold out)."""
    if n < 2:
        return list(range(n)), list(range(n))
    held = max(1, min(n - 1, round(holdout * n)))
    return list(range(n - held)), list(range(n - held, n))


def refine_block(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
    """Refine a block (:func:`fit_block`, same arguments) and free what the fit made before returning.

    The fit's optimizer and learning-rate scheduler reference each other, so its float32 Adam moments
    and parameter snapshots outlive it until Python's cycle collector happens to run: on a model read
    block by block, the peak memory grew with every refined block (TinyLlama-1.1B shapes, 2 → 4 layers:
    1.15× without this collection)."""
    try:
        return fit_block(*args, **kwargs)
    finally:
        gc.collect()


def fit_block(
    block: nn.Module,
    calls: Sequence[BlockCall],
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    config: RefineConfig,
    *,
    load: Any = lambda t: t,
    feature_weights: torch.Tensor | None = None,
    dense_inputs: Mapping[int, torch.Tensor] | None = None,
) -> dict[str, Any] | None:
    """Refine ``block``'s LoRD parameters in place (module docstring); returns what happened (None for a
    block without LoRD layers). ``inputs``: the compressed-path inputs per batch; ``targets``: the dense
    block's outputs per batch; ``load`` brings a parked tensor to the compute device;
    ``feature_weights``: the error weight of each output feature (None: all 1); ``dense_inputs``: the
    DENSE model's inputs of the held-out batches (by batch index), to report the refined block's own
    error: its error fed the dense inputs, what the block adds itself. The rest of
    ``held_out_error_after`` is inherited from the blocks before, which this block's factors cannot undo."""
    params = lord_parameters(block)
    if not params:
        return None
    t0 = time.perf_counter()
    train, held = split_batches(len(calls), config.holdout)
    calls = [cast_call(c, torch.float32) for c in calls]
    compute = params[0].dtype  # the run's compute dtype: products in it, parameters in float32
    device = params[0].device
    w = feature_weights.to(device, torch.float32) if feature_weights is not None else None
    # no cast cache: it would keep the first low-precision copy of each weight for every later step
    mixed = (
        torch.autocast(device.type, dtype=compute, cache_enabled=False)
        if compute in (torch.bfloat16, torch.float16)
        else None
    )
    with in_float32(block, params), mixed or contextlib.nullcontext():
        start = [p.detach().clone() for p in params]
        first = best = _held_out_error(block, calls, inputs, targets, held, load, w)
        best_state = None
        lr, restarts, cuts, total = config.lr, 0, 0, 0
        optimizer, scheduler = _adam(params, lr, config)
        steps = stale = 0
        with torch.enable_grad():
            while steps < config.steps and stale < config.patience:
                b = train[steps % len(train)]
                loss = _error(block, calls[b], inputs[b], targets[b], load, w)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                steps += 1
                total += 1
                if steps % config.eval_every == 0 or steps == config.steps:
                    now = _held_out_error(block, calls, inputs, targets, held, load, w)
                    if now < best:
                        best, best_state, stale = now, [p.detach().clone() for p in params], 0
                    elif steps == config.eval_every and best_state is None and restarts < config.backoff:
                        # no gain at the first check: the rate overshoots a start this close to the
                        # optimum; start over from the closed form at a tenth of it
                        _restore(params, start)
                        lr, restarts, steps = lr / 10, restarts + 1, 0
                        optimizer.state.clear()
                        optimizer, scheduler = _adam(params, lr, config)
                    else:
                        stale += 1
                        if stale < config.patience and config.decay < 1:
                            # back to the best point, on at a lower rate
                            _restore(params, best_state or start)
                            scheduler.base_lrs = [base * config.decay for base in scheduler.base_lrs]
                            cuts += 1
        _restore(params, best_state or start)
        optimizer.state.clear()
        for p in params:
            p.grad = None  # float32 gradients would stay with the block until it is released
        own = None
        if dense_inputs is not None and all(b in dense_inputs for b in held):
            own = _held_out_error(block, calls, dense_inputs, targets, held, load, w)
    return {
        "held_out_error_before": math.sqrt(first),
        "held_out_error_after": math.sqrt(best),
        **({"held_out_own_error": math.sqrt(own)} if own is not None else {}),
        "steps": total,
        "lr": lr,
        "rate_cuts": cuts,
        "improved": best_state is not None,
        "held_out_batches": len(held) if len(calls) > 1 else 0,
        "weighting": "fisher" if w is not None else "none",
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _adam(params: Sequence[nn.Parameter], lr: float, config: RefineConfig) -> tuple[Any, Any]:
    """Adam at ``lr`` with the warmup + cosine schedule (module docstring)."""
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, config.steps, config.warmup, "cosine", floor=0.1)
    )
    return optimizer, scheduler


@torch.no_grad()
def _restore(params: Sequence[nn.Parameter], values: Sequence[torch.Tensor]) -> None:
    for p, keep in zip(params, values, strict=True):
        p.copy_(keep)


@contextlib.contextmanager
def in_float32(block: nn.Module, trained: Sequence[nn.Parameter]) -> Iterator[None]:
    """The block in float32 (the trained parameters' float32 master copies) with only ``trained``
    requiring gradients; afterwards every tensor back in its dtype and ``requires_grad`` as it was."""
    dtypes = {id(t): t.dtype for t in list(block.parameters()) + list(block.buffers())}
    requires = {id(p): p.requires_grad for p in block.parameters()}
    block.requires_grad_(False)
    block.float()
    for p in trained:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for t in list(block.parameters()) + list(block.buffers()):
            t.data = t.data.to(dtypes.get(id(t), t.dtype))
        for p in block.parameters():
            p.requires_grad_(requires.get(id(p), False))


def cast_call(call: BlockCall, dtype: torch.dtype) -> BlockCall:
    """``call`` with its floating-point tensors (masks, rotary tables) in ``dtype``."""

    def cast(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(dtype) if v.is_floating_point() else v
        if isinstance(v, (tuple, list)):
            return type(v)(cast(x) for x in v)
        if isinstance(v, dict):
            return {k: cast(x) for k, x in v.items()}
        return v

    return BlockCall(cast(call.args), cast(call.kwargs), call.mask)


def _token_errors(block, call, x, y, load, w) -> tuple[torch.Tensor, torch.Tensor]:
    """Per real token Σ_j w_j (f(x)_tj − y_tj)² / ‖y_t‖² (float32; ``w`` None: all 1), and the tokens'
    weights (1 real, 0 padding)."""
    out = run_block(block, load(x).float(), call).float()
    target = load(y).float()
    sq = (out - target).square()
    ratio = (sq * w if w is not None else sq).sum(-1) / target.square().sum(-1).clamp_min(1e-30)
    if call.mask is not None and ratio.shape == call.mask.shape:
        return ratio, call.mask.to(ratio.device, ratio.dtype)
    return ratio, torch.ones_like(ratio)


def _error(block, call, x, y, load, w) -> torch.Tensor:
    """The mean per-token relative squared error over the batch's real tokens (module docstring)."""
    ratio, weight = _token_errors(block, call, x, y, load, w)
    return (ratio * weight).sum() / weight.sum().clamp_min(1.0)


@torch.no_grad()
def _held_out_error(block, calls, inputs, targets, held, load, w) -> float:
    """The mean per-token relative squared error over the held-out batches' real tokens."""
    num = den = 0.0
    for b in held:
        ratio, weight = _token_errors(block, calls[b], inputs[b], targets[b], load, w)
        num += float((ratio * weight).sum())
        den += float(weight.sum())
    return num / max(den, 1.0)
