"""Calibration modes: how one block's groups get their factors (``LordConfig.calibration``).

For a linear layer W whose input on the dense model is X and on the model compressed so far is X̂:

* ``independent`` — LoRD on the dense model's activations, min ‖W X − A B X‖ (every layer fitted on
  its own; identical to whole-model calibration). One pass over the block's batches calibrates and
  advances the dense stream.
* ``sequential`` — LoRD on the compressed model's activations, min ‖W X̂ − A B X̂‖: each layer sees
  the inputs it will see at inference, including the error of everything compressed before it.
* ``compensating`` — fit the DENSE output from the compressed input, min ‖W X − A B X̂‖: the closed
  form of :func:`lord_export.core.factorize.compensated_weight` (exactly LoRD when X̂ = X).

The last two run a block in stages, one per distinct layer input in execution order (q|k|v, then o,
then gate|up, then down for a Llama block): a stage's inputs are captured after the earlier stages
of the same block were swapped, so even within a block nothing is fitted on activations it will
not see. Both report each group's error against the dense output and the best error any rank-r
factors could reach from those inputs.

A fourth way, ``kept``: the factors were computed earlier (a parameter budget's survey, at the
largest rank any allocation could give) and are only truncated to the allocated ranks.

Each mode is a function of a :class:`BlockWork`: it swaps the block's groups to LoRD modules and
advances the dense stream past the block; the engine then refines the block (when asked) and
advances the compressed stream.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration.blocks import BlockCall, run_block
from ..calibration.statistics import Calibrator, InputStats, warn_few_tokens
from ..config import LordConfig
from ..core.plan import Group
from ..progress import StageTimes
from .planner import (
    FactorSource,
    KeptFactors,
    build_groups,
    closed_form,
    compress_groups,
    factorize_group_on_compressed,
    shared_experts,
    truncated,
)
from .streaming import Streams, capture_input


@dataclass
class BlockWork:
    """One block's job: its layers to compress, its calls, the streams, and the settings."""

    block: nn.Module
    prefix: str
    local: list[str]  # targeted layers, relative to the block
    calls: list[BlockCall]  # per batch
    streams: Streams
    config: LordConfig
    stats_device: torch.device
    ranks: Mapping[str, int | None] | None = None
    kept: dict[str, KeptFactors] | None = None  # ``kept`` mode: relative group name → factors
    kept_groups: list[tuple[list[str], int]] | None = None  # ``kept`` mode: (layer names, tokens)
    fisher: Any = None  # the output weighting (an OutputFisher keyed by names relative to the block)
    store: Callable[[FactorSource], FactorSource] = lambda source: source  # rounds factors as stored
    warnings: list[str] = field(default_factory=list)
    times: StageTimes = field(default_factory=StageTimes)


def advance_dense(work: BlockWork, block: nn.Module | None = None) -> None:
    """Run (the dense) ``block`` on every batch of the dense stream: its outputs become the stream."""
    block = work.block if block is None else block
    s = work.streams
    for b, call in enumerate(work.calls):
        s.dense[b] = s.park(run_block(block, s.load(s.dense[b]), call))


def independent(work: BlockWork) -> tuple[list[Group], dict[str, torch.Tensor]]:
    """Statistics from the dense stream (one pass that also advances it), then the closed form."""
    s = work.streams
    with (
        work.times("calibrate_s"),
        Calibrator(work.block, work.local, batch_hooks=False, stats_device=work.stats_device) as cal,
    ):
        for b, call in enumerate(work.calls):
            cal.begin_batch(call.mask)
            s.dense[b] = s.park(run_block(work.block, s.load(s.dense[b]), call))
            cal.end_batch()
    if not work.local:
        return [], {}
    calibration = shared_experts(cal.result(), work.config)
    warn_few_tokens(calibration)
    work.warnings.extend(calibration.warnings)
    with work.times("factorize_s"):
        return compress_groups(
            work.block,
            build_groups(work.local, calibration.input_of, work.config.grouping),
            work.config,
            work.store(closed_form(calibration, work.config.method, fisher=work.fisher)),
            tokens=lambda names: calibration.of(names[0]).tokens,
            ranks=work.ranks,
            prefix=work.prefix,
        )


def kept(work: BlockWork) -> tuple[list[Group], dict[str, torch.Tensor]]:
    """Factors kept by the survey, truncated to the allocated ranks; the dense stream is advanced only
    when the run keeps streams (refinement, targets after the blocks)."""
    if len(work.streams):
        with work.times("forward_s"):
            advance_dense(work)
    tokens = {tuple(names): n for names, n in work.kept_groups or []}
    tokens |= {(name,): n for names, n in work.kept_groups or [] for name in names}  # a group the allocation split
    with work.times("truncate_s"):
        return compress_groups(
            work.block,
            [names for names, _ in work.kept_groups or []],
            work.config,
            work.store(truncated(work.kept or {})),
            tokens=lambda names: tokens[tuple(names)],
            ranks=work.ranks,
            prefix=work.prefix,
        )


def staged(work: BlockWork) -> tuple[list[Group], dict[str, torch.Tensor]]:
    """Sequential/compensating: stage by stage on the compressed stream, a dense copy of the block
    beside it (module docstring); the dense stream is advanced through the copy."""
    timer = work.times("staged_fit_s")
    timer.__enter__()
    dense_block = copy.deepcopy(work.block)
    groups: list[Group] = []
    tensors: dict[str, torch.Tensor] = {}
    s = work.streams
    if work.local:
        with Calibrator(work.block, work.local, batch_hooks=False, stats_device=work.stats_device) as cal:
            cal.begin_batch(work.calls[0].mask)  # one batch finds which layers share an input, and the order
            run_block(work.block, s.load(s.comp[0]), work.calls[0])
            cal.end_batch()
        input_of, order = dict(cal.input_of), list(cal.order)
        modules = dict(dense_block.named_modules())
        stage_groups = build_groups(work.local, input_of, work.config.grouping)
        for key in order:
            stage = [g for g in stage_groups if input_of[g[0]] == key]
            done, factors = compress_groups(
                work.block,
                stage,
                work.config,
                work.store(_on_compressed(work, dense_block, key)),
                ranks=work.ranks,
                prefix=work.prefix,
                modules=modules,
            )
            groups.extend(done)
            tensors.update(factors)
    advance_dense(work, dense_block)
    del dense_block
    timer.__exit__()
    return groups, tensors


def _on_compressed(work: BlockWork, dense_block: nn.Module, key: str) -> FactorSource:
    """The staged factor source: the stage's inputs on both paths (G = X̂X̂ᵀ, X Xᵀ, H = X X̂ᵀ),
    captured now, then the mode's closed form."""
    s = work.streams

    def source(modules: Mapping[str, nn.Module], group: Group) -> dict[str, torch.Tensor]:
        G = Cxx = H = None
        tokens = 0
        for b, call in enumerate(work.calls):
            x_hat = capture_input(work.block, work.block.get_submodule(key), s.load(s.comp[b]), call)
            x = capture_input(dense_block, dense_block.get_submodule(key), s.load(s.dense[b]), call)
            if G is None:
                d_in = x.shape[-1]
                G, Cxx = InputStats.zeros(d_in, work.stats_device), InputStats.zeros(d_in, work.stats_device)
                H = torch.zeros(d_in, d_in, dtype=torch.float64, device=work.stats_device)
            G.add(x_hat, name=key)
            Cxx.add(x, name=key)
            H += (x.to(work.stats_device, torch.float32).T @ x_hat.to(work.stats_device, torch.float32)).double()
            tokens += x.shape[0]
        group.calibration_tokens = tokens
        compensate = work.config.calibration == "compensating"
        return factorize_group_on_compressed(
            modules, group, G, Cxx, H, work.config.method, compensate=compensate, fisher=work.fisher
        )

    return source


#: calibration mode → the function that fits a block (and whether it needs the compressed stream)
MODES: dict[str, tuple[Callable[[BlockWork], Any], bool]] = {
    "independent": (independent, False),
    "sequential": (staged, True),
    "compensating": (staged, True),
}
