"""Calibration: stream a model's linear-layer inputs into second-moment statistics.

For every targeted linear layer, forward pre-hooks accumulate C = Σ x xᵀ (float64) over the
tokens of the calibration data, plus Σ|x| per feature (for the ASVD baseline) and the token count.
Activations are never kept. Layers that read the *same tensor* in a forward pass (q/k/v, gate/up)
share one set of statistics, accumulated once; which layers share is recorded from what the hooks
see, not guessed from names. Positions where the model's ``attention_mask`` is 0 are left out.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import CalibrationError

log = logging.getLogger(__name__)

Batch = dict[str, Any] | torch.Tensor
CalibrationData = Iterable[Batch] | Callable[[nn.Module], Any]


@dataclass
class InputStats:
    """Statistics of one distinct layer input. ``C`` is (d_in, d_in) float64."""

    C: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int = 0

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


@dataclass
class Calibration:
    """The result of calibration: statistics per distinct input and which layer read which.

    ``input_of[layer]`` is the key (the name of the first layer that read that tensor) of the
    statistics in ``stats``; layers with the same key read the same tensor.
    """

    stats: dict[str, InputStats]
    input_of: dict[str, str]
    batches: int = 0
    warnings: list[str] = field(default_factory=list)

    def of(self, layer: str) -> InputStats:
        return self.stats[self.input_of[layer]]


class Calibrator:
    """Context manager that installs the hooks; use :func:`calibrate` unless you drive it yourself.

    Every top-level forward of ``model`` is one batch: its ``attention_mask`` keyword argument,
    when present, masks padding positions out of the statistics.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], accumulate_dtype: torch.dtype = torch.float32):
        self.model = model
        self.layers = list(layers)
        self.accumulate_dtype = accumulate_dtype
        self.stats: dict[str, InputStats] = {}
        self.input_of: dict[str, str] = {}
        self.batches = 0
        self.warnings: list[str] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._batch_key: dict[str, str] = {}
        self._mask: torch.Tensor | None = None
        self._unmasked_warned: set[str] = set()

    def __enter__(self) -> Calibrator:
        modules = dict(self.model.named_modules())
        self._handles.append(self.model.register_forward_pre_hook(self._start_batch, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._end_batch))
        for name in self.layers:
            self._handles.append(modules[name].register_forward_pre_hook(self._make_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def result(self) -> Calibration:
        if not self.stats:
            raise CalibrationError("calibration saw no tokens: the model was never run on the data")
        missing = [n for n in self.layers if n not in self.input_of]
        if missing:
            raise CalibrationError(f"calibration never reached layers {missing[:5]} (the forward did not use them)")
        for key, st in self.stats.items():
            if st.tokens == 0:
                raise CalibrationError(f"every calibration position of {key!r} was padding (attention_mask 0)")
        return Calibration(self.stats, dict(self.input_of), self.batches, list(self.warnings))

    # -- hooks ---------------------------------------------------------------------------------
    def _start_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._seen.clear()
        self._batch_key = {}
        mask = kwargs.get("attention_mask")
        self._mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def _end_batch(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._batch_key:
            self.batches += 1
        self._seen.clear()

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            self._observe(name, args[0])

        return hook

    def _observe(self, name: str, x: torch.Tensor) -> None:
        entry = self._seen.get(id(x))
        if entry is not None and entry[0]() is x:
            key = entry[1]
            fresh = False
        else:
            key = self._batch_key.get(name, name)
            self._seen[id(x)] = (weakref.ref(x), key)
            fresh = True
        if name not in self._batch_key:
            self._batch_key[name] = key
            known = self.input_of.setdefault(name, key)
            if known != key:
                raise CalibrationError(
                    f"layer {name!r} read the same input as {known!r} in an earlier batch but as {key!r} "
                    "in this one; input sharing must not change between batches"
                )
        if fresh:
            self._accumulate(key, name, x)

    def _accumulate(self, key: str, name: str, x: torch.Tensor) -> None:
        rows = self._select_tokens(name, x)
        d = rows.shape[-1]
        dtype = torch.float64 if x.dtype == torch.float64 else self.accumulate_dtype
        rows = rows.to(dtype)
        xtx = rows.T @ rows
        if not torch.isfinite(xtx).all():
            raise CalibrationError(f"non-finite activation (NaN or Inf) entering layer {name!r}")
        st = self.stats.get(key)
        if st is None:
            st = self.stats[key] = InputStats(
                C=torch.zeros(d, d, dtype=torch.float64, device=x.device),
                abs_sum=torch.zeros(d, dtype=torch.float64, device=x.device),
            )
        st.C += xtx.double()
        st.abs_sum += rows.abs().sum(0).double()
        st.tokens += rows.shape[0]

    def _select_tokens(self, name: str, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        mask = self._mask
        if mask is not None:
            if x.dim() == 3 and x.shape[0] == mask.shape[0] and x.shape[1] <= mask.shape[1]:
                return x[mask[:, -x.shape[1] :].bool()]
            if x.dim() == 2 and x.shape[0] == mask.numel():
                return x[mask.reshape(-1).bool()]
            if name not in self._unmasked_warned:
                self._unmasked_warned.add(name)
                msg = (
                    f"layer {name!r}: input shape {tuple(x.shape)} does not line up with attention_mask "
                    f"{tuple(mask.shape)}; all its positions are used"
                )
                log.warning(msg)
                self.warnings.append(msg)
        return x.reshape(-1, x.shape[-1])


def calibrate(
    model: nn.Module,
    data: CalibrationData,
    layers: Sequence[str],
    *,
    accumulate_dtype: torch.dtype = torch.float32,
    progress: bool = False,
    total: int | None = None,
) -> Calibration:
    """Run ``model`` over ``data`` and return input statistics for ``layers``.

    ``data`` is either an iterable of batches (a dict of model keyword arguments such as
    ``input_ids``/``attention_mask``, or an ``input_ids`` tensor), or a callback ``run(model)``
    that drives the model itself (every top-level forward counts as a batch). Batch products are
    formed in ``accumulate_dtype`` (float32 by default; float64 inputs stay float64) and summed
    in float64.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), Calibrator(model, layers, accumulate_dtype) as cal:
            if callable(data):
                data(model)
            else:
                it = data
                if progress:
                    from tqdm.auto import tqdm

                    it = tqdm(data, desc="calibrate", unit="batch", total=total)
                for batch in it:
                    if isinstance(batch, torch.Tensor):
                        model(input_ids=batch)
                    elif isinstance(batch, dict):
                        model(**batch)
                    else:
                        raise TypeError(f"a calibration batch must be a dict or a tensor, got {type(batch).__name__}")
        result = cal.result()
    finally:
        model.train(was_training)
    d_small = [k for k, st in result.stats.items() if st.tokens < st.C.shape[0]]
    if d_small:
        st = result.stats[d_small[0]]
        msg = (
            f"{len(d_small)} layer input(s) saw fewer calibration tokens than features "
            f"(e.g. {d_small[0]!r}: {st.tokens} tokens < d_in {st.C.shape[0]}); C is singular there and the "
            "factors fit only the directions seen; use more calibration data"
        )
        log.warning(msg)
        result.warnings.append(msg)
    return result
