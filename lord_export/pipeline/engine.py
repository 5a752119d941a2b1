"""The compression engine: calibrate, factorize and swap one block at a time.

Memory is bounded by one block: the model's repeated blocks (:mod:`lord_export.calibration.blocks`)
are processed in order, each loaded onto the compute device (from the model in memory, or read from
the checkpoint's safetensors shards while the rest of the model stays on the meta device:
:mod:`lord_export.pipeline.streaming`), fitted by the calibration mode
(:mod:`lord_export.pipeline.modes`), run to produce the next block's inputs, written out and freed.
Statistics exist for one block at a time; calibration activations (one hidden-state tensor per
batch and stream) are kept between blocks.

One setup serves every pass over the blocks (:meth:`Engine.begin`): the embedding stage runs once on
the calibration batches, and every block's call is recorded (blocks of different attention kinds get
their own masks and rotary tables). The survey of a parameter budget
(:func:`lord_export.pipeline.survey.streamed_survey`) uses the same setup and weight source.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration.blocks import (
    BlockCalls,
    Blocks,
    capture_block_calls,
    capture_block_inputs,
    find_blocks,
    output_structure,
    run_block,
)
from ..calibration.statistics import Calibrator, exact_matmuls, warn_few_tokens
from ..config import LordConfig
from ..core.plan import Group
from ..core.targets import select_targets
from ..device import model_device, statistics_device
from ..progress import Progress, StageTimes
from .modes import MODES, BlockWork, kept
from .planner import KeptFactors, build_groups, closed_form, compress_groups, shared_experts
from .sensitivity import no_cache
from .streaming import InMemoryWeights, Streams, WeightSource, move_call, replaying

log = logging.getLogger(__name__)


@dataclass
class EngineResult:
    """What the engine produced: the plan's groups, its factor tensors (unless streamed to disk)."""

    groups: list[Group]
    tensors: dict[str, torch.Tensor]
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, Any] = field(default_factory=dict)
    blocks: int = 0
    streamed: bool = True
    calibration_batches: int = 0


@dataclass
class Setup:
    """The calibration batches at the entrance of the blocks: streams, every block's calls, and what a
    block returns (``template``, for stand-ins)."""

    streams: Streams
    calls: BlockCalls
    template: int | None


class Engine:
    """Compress ``model`` block by block (see the module docstring); one instance per run."""

    def __init__(
        self,
        model: nn.Module,
        config: LordConfig,
        *,
        device: torch.device | str,
        source: WeightSource | None = None,
        stats_device: torch.device | str | None = None,
        writer: Any = None,
        progress: Callable[[str], None] | None = None,
        bars: bool = False,
        ranks: dict[str, int | None] | None = None,
        store_dtype: torch.dtype | None = None,
        fisher: Any = None,
    ):
        self.model = model
        self.config = config
        self.device = torch.device(device)
        self.source = source or InMemoryWeights()
        self.stats_device = statistics_device(self.device, stats_device)
        self.writer = writer
        self.say = progress or (lambda msg: None)
        self.bars = bars
        self.ranks = ranks
        self.store_dtype = store_dtype
        #: the output weighting of the closed form (an OutputFisher keyed by full layer names), or None
        self.fisher = fisher
        #: checkpoint tensor name → the dtype it is stored in (what the writer writes it back in)
        self.stored_dtypes: dict[str, torch.dtype] = {}
        self.groups: list[Group] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.warnings: list[str] = []
        self.batches = 0
        self.times = StageTimes()
        self.refinements: list[dict[str, Any]] = []

    # -- the setup shared by every pass ----------------------------------------------------------
    def begin(self, batches: Sequence[dict[str, torch.Tensor]], blocks: Blocks, *, two: bool) -> Setup:
        """Run the embedding stage on ``batches``: block 0's inputs (the streams; ``two``: also a
        compressed stream) and every block's call, on the compute device."""
        embed = model_device(self.model)
        with torch.no_grad():
            hidden0, call0 = capture_block_inputs(self.model, blocks.modules[0], batches[:1], embed)
            block = self.materialize(blocks, 0)
            try:
                template = output_structure(block, hidden0[0].to(self.device), move_call(call0[0], self.device))
            finally:
                self.source.release(block)
            hiddens, calls = capture_block_calls(self.model, blocks, batches, embed, template)
        memo: dict[int, Any] = {}
        calls = calls.map(lambda c: move_call(c, self.device, memo))
        self.batches = len(hiddens)
        streams = Streams(hiddens, self.device, two=two, dtype=self.source.compute_dtype)
        return Setup(streams, calls, template)

    def materialize(self, blocks: Blocks, i: int) -> nn.Module:
        block = blocks.modules[i]
        self.source.materialize(block, blocks.name(i), self.device)
        return block

    def layers_by_block(self, blocks: Blocks) -> tuple[dict[int, list[str]], list[str]]:
        """The targeted layers of each block (names relative to it), and those outside the blocks."""
        layers = select_targets(self.model, self.config.targets, self.config.exclude)
        inside: dict[int, list[str]] = {}
        for i in range(len(blocks)):
            prefix = blocks.name(i) + "."
            inside[i] = [n[len(prefix) :] for n in layers if n.startswith(prefix)]
        outside = [n for n in layers if not n.startswith(blocks.path + ".")]
        return inside, outside

    # -- the run ------------------------------------------------------------------------------
    def run(
        self,
        batches: Sequence[dict[str, torch.Tensor]],
        blocks: Blocks,
        *,
        spill: Any = None,
        checkpoints: Any = None,
    ) -> EngineResult:
        """Compress every block of ``blocks`` (and targeted layers outside them) on ``batches``.

        With ``spill`` (a survey's :class:`~lord_export.persist.checkpoint.FactorSpill`) the factors
        kept there are truncated to ``self.ranks`` instead (the ``kept`` mode); nothing is calibrated
        unless a later stage needs the streams. With ``checkpoints`` (a
        :class:`~lord_export.pipeline.resume.Checkpoints`) the state is saved after every block, and a
        resumed run continues after the last block it saved.
        """
        t0 = time.perf_counter()
        inside, outside = self.layers_by_block(blocks)
        fit, two = (kept, False) if spill is not None else MODES[self.config.calibration]
        refine = self.config.refines
        two = two or refine
        needs_streams = spill is None or bool(outside) or refine
        with torch.no_grad(), exact_matmuls():
            if needs_streams:
                self.say(f"capturing the inputs of the {len(blocks)} blocks of {blocks.path} ({len(batches)} batches)")
                setup = self.begin(batches, blocks, two=two)
            else:
                setup = Setup(Streams([], self.device, two=False), BlockCalls([[] for _ in range(len(blocks))]), None)
            start, block_seconds = self._resume(checkpoints, setup)
            progress = Progress(self.say, "block", len(blocks) - start)
            for i in range(start, len(blocks)):
                t_block = time.perf_counter()
                groups = self._process_block(blocks, i, inside[i], setup, fit, spill)
                if spill is not None:
                    t_block -= spill.meta(i)["seconds"]  # the survey's time for this block counts too
                block_seconds.append(round(time.perf_counter() - t_block, 3))
                self._checkpoint(checkpoints, setup, i + 1, block_seconds)
                if spill is not None:
                    spill.discard(i)
                progress.step(f"{blocks.name(i)}: {sum(g.factorized for g in groups)} group(s) factorized")
            if outside:
                self._outside_layers(outside, blocks, setup, batches)
        timings = {
            "compress_s": round(time.perf_counter() - t0, 3),
            "blocks_s": block_seconds,
            "stages": self.times.rounded(),
        }
        if self.refinements:
            timings["refinement"] = self.refinements
        return EngineResult(self.groups, self.tensors, self.warnings, timings, len(blocks), True, self.batches)

    def _process_block(self, blocks: Blocks, i: int, local: list[str], setup: Setup, fit: Callable, spill: Any):
        """Block ``i``: fit it (the calibration mode), advance the compressed stream, record, release."""
        block = self.materialize(blocks, i)
        work = BlockWork(
            block=block,
            prefix=blocks.name(i),
            local=local,
            calls=setup.calls[i],
            streams=setup.streams,
            config=self.config,
            stats_device=self.stats_device,
            ranks=self.ranks,
            store=self._store,
            times=self.times,
            fisher=self.fisher.renamed(blocks.name(i)) if self.fisher is not None else None,
        )
        if spill is not None:
            work.kept, work.kept_groups = take_kept(spill, i, self.device)
        # the dense stream's held-out inputs of this block, before the mode advances it past the block
        held_dense = self._held_out_inputs(setup.streams) if self.config.refines else {}
        groups, tensors = fit(work)
        self._add_warnings(work.warnings)
        if self.config.refines and any(g.factorized for g in groups):
            self._refine(block, work, blocks.name(i), held_dense)
        if setup.streams.two:
            s = setup.streams
            with self.times("forward_s"):
                for b, call in enumerate(work.calls):
                    s.comp[b] = s.park(run_block(block, s.load(s.comp[b]), call))
        with self.times("write_s"):
            self._record(groups, tensors, blocks.name(i), block)
        self.source.release(block)
        return groups

    def _refine_config(self) -> Any:
        from .refine import RefineConfig

        return RefineConfig(steps=self.config.refine_steps, lr=self.config.refine_lr)

    def _held_out_inputs(self, streams: Streams) -> dict[int, torch.Tensor]:
        """The dense stream's entries of refinement's held-out batches (for the report's own error)."""
        from .refine import split_batches

        _, held = split_batches(len(streams.dense), self._refine_config().holdout)
        return {b: streams.dense[b] for b in held}

    def _refine(self, block: nn.Module, work: BlockWork, name: str, held_dense: dict[int, torch.Tensor]) -> None:
        """Block refinement (:mod:`lord_export.pipeline.refine`): the LoRD block on the compressed stream
        fitted to the dense block's outputs (the dense stream, just advanced past this block)."""
        from .refine import refine_block

        s = work.streams
        config = self._refine_config()
        weights = self.fisher.weights([name]) if self.fisher is not None else None
        with self.times("refine_s"):
            report = refine_block(
                block, work.calls, s.comp, s.dense, config, load=s.load,
                feature_weights=weights.square() if weights is not None else None, dense_inputs=held_dense,
            )  # fmt: skip
        if report is not None:
            self.refinements.append({"block": name, **report})

    def _resume(self, checkpoints: Any, setup: Setup) -> tuple[int, list[float]]:
        """(the first block to do, the seconds of the blocks done) - after restoring what a checkpoint
        saved: the groups and warnings so far, the streams entering that block, the weight fingerprints."""
        state = checkpoints.state.get("run") if checkpoints is not None else None
        if not state:
            return 0, []
        self.groups = [Group.from_dict(g) for g in state["groups"]]
        self.warnings = list(state["warnings"])
        self.refinements = list(state.get("refinements", []))
        self.source_fingerprints(state["fingerprints"])
        saved = checkpoints.load_tensors("ckpt-streams") if len(setup.streams) else {}
        s = setup.streams
        for b in range(len(s)):
            s.dense[b] = s.park(saved[f"dense.{b}"])
            if s.two:
                s.comp[b] = s.park(saved[f"comp.{b}"])
        self.say(f"resuming after block {state['blocks_done']} of {len(setup.calls)}")
        return state["blocks_done"], list(state["block_seconds"])

    def _checkpoint(self, checkpoints: Any, setup: Setup, done: int, block_seconds: list[float]) -> None:
        """Save what a resumed run needs to continue after ``done`` blocks."""
        if checkpoints is None:
            return
        s = setup.streams
        tensors = {f"dense.{b}": h for b, h in enumerate(s.dense)}
        if s.two:
            tensors.update({f"comp.{b}": h for b, h in enumerate(s.comp)})
        state = {
            "blocks_done": done,
            "groups": [g.to_dict() for g in self.groups],
            "warnings": self.warnings,
            "block_seconds": block_seconds,
            "refinements": self.refinements,
            "fingerprints": getattr(self.source, "fingerprints", {}),
            "writer": self.writer.checkpoint() if self.writer is not None else None,
        }
        checkpoints.save({"ckpt-streams": tensors} if tensors else None, run=state)

    def source_fingerprints(self, saved: dict) -> None:
        """Give the weight source the fingerprints of blocks an interrupted run read."""
        if hasattr(self.source, "fingerprints"):
            self.source.fingerprints.update(saved)

    def _store(self, source: Callable) -> Callable:
        """``source`` with its factors rounded through the storage dtype, so the compressed stream (and
        the report's errors) see the factors as they will be stored."""
        if self.store_dtype is None:
            return source

        def rounded(modules, group):
            tensors = source(modules, group)
            return {k: v.to(self.store_dtype).to(v.dtype) for k, v in tensors.items()}

        return rounded

    # -- layers outside the blocks (e.g. BERT's pooler) -----------------------------------------
    def _outside_layers(self, outside: list[str], blocks: Blocks, setup: Setup, batches: Sequence[dict]) -> None:
        """Calibrate targets outside the blocks with the blocks replaced by a replay of their output."""
        final = setup.streams.final
        current = {"b": 0}
        embed = model_device(self.model)
        with replaying(blocks, setup.template, lambda: setup.streams.load(final[current["b"]])):
            with Calibrator(self.model, outside, stats_device=self.stats_device) as cal:
                for b, batch in enumerate(batches):
                    current["b"] = b
                    self.model(**{k: v.to(embed) for k, v in batch.items()}, **no_cache(self.model))
        calibration = shared_experts(cal.result(), self.config)
        warn_few_tokens(calibration)
        self._add_warnings(calibration.warnings)
        groups, tensors = compress_groups(
            self.model,
            build_groups(outside, calibration.input_of, self.config.grouping),
            self.config,
            self._store(closed_form(calibration, self.config.method)),
            tokens=lambda names: calibration.of(names[0]).tokens,
            ranks=self.ranks,
        )
        self.groups.extend(groups)
        self.tensors.update(tensors)

    # -- helpers ------------------------------------------------------------------------------
    def _add_warnings(self, warnings: Sequence[str]) -> None:
        self.warnings.extend(w for w in warnings if w not in self.warnings)

    def _record(self, groups: list[Group], tensors: dict, prefix: str, block: nn.Module) -> None:
        self.groups.extend(g.renamed(prefix) for g in groups)
        if self.writer is not None:
            state = {f"{prefix}.{k}": v for k, v in block.state_dict().items()}
            self.writer.add({k: self._stored(k, v) for k, v in state.items()})
        else:
            if self.config.refines:  # the factors as refinement left them in the block, not the closed form
                current = dict(block.named_parameters())
                tensors = {k: current[k].detach().clone() if k in current else v for k, v in tensors.items()}
            self.tensors.update({f"{prefix}.{k}": v for k, v in tensors.items()})

    def _stored(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the dtype tensor ``name`` is stored in: the checkpoint's, or the storage dtype for
        new tensors (factors)."""
        dtype = self.stored_dtypes.get(name, self.store_dtype)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def write_rest(self, blocks: Blocks) -> list[str]:
        """Write every tensor outside the blocks (tied ones once); returns the names stored tied."""
        from ..persist.io import unique_state_dict

        tensors, tied = unique_state_dict(self.model, skip_prefix=blocks.path + ".")
        for name, tensor in tensors.items():
            self.writer.add({name: self._stored(name, tensor)})
        return tied


def take_kept(spill: Any, i: int, device: torch.device) -> tuple[dict[str, KeptFactors], list]:
    """Block ``i``'s kept factors from the survey's spill: (relative group name → factors, the block's
    groups as (layer names, tokens))."""
    tensors, meta = spill.take(i)
    factors = {
        name: KeptFactors(*(tensors[f"{name}|{k}"].to(device) for k in ("A", "B", "errors", "spectrum")))
        for name in meta["kept"]
    }
    groups = [(list(names), int(tokens)) for names, tokens in meta["groups"]]
    return factors, groups


def find_streamable_blocks(model: nn.Module) -> tuple[Blocks | None, str | None]:
    """The model's blocks, or None with the reason the engine cannot stream this model."""
    blocks = find_blocks(model)
    if blocks is None:
        return None, "no repeated blocks (an nn.ModuleList of one module class) were found"
    return blocks, None
