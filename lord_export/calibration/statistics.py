"""Calibration: stream a model's linear-layer inputs into second-moment statistics.

For every targeted linear layer, forward pre-hooks accumulate C = Σ x xᵀ (float64) over the
tokens of the calibration data, plus Σ|x| per feature (for the ASVD baseline) and the token count.
Activations are never kept. Layers that read the *same tensor* in a forward pass (q/k/v, gate/up)
share one set of statistics, accumulated once; which layers share is recorded from what the hooks
see, not guessed from names. Positions where the batch's ``attention_mask`` is 0 are left out.

Precision: each batch's product xᵀx is formed in float32 (float64 inputs stay float64; bf16/fp16
inputs are upcast first, so a half-precision model loses nothing there) and summed in float64,
with TF32 turned off (:func:`exact_matmuls`) so that CUDA float32 products are real float32.

A batch run through :meth:`Calibrator.run_batch` stops when it reaches the model's output
embeddings (the LM head) after every targeted layer: the vocabulary-wide logits, a large share of a
small model's forward, have nothing to add to the statistics.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.experts import is_expert_layer
from ..errors import CalibrationError

log = logging.getLogger(__name__)

Batch = dict[str, Any] | torch.Tensor
CalibrationData = Iterable[Batch] | Callable[[nn.Module], Any]


@contextlib.contextmanager
def exact_matmuls() -> Iterator[None]:
    """TF32 off (CUDA matmuls and cuDNN) and float32 matmul precision "highest", restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    precision = torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        torch.set_float32_matmul_precision(precision)


def product_dtype(x: torch.Tensor, accumulate_dtype: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a batch product is formed in: float64 for float64 inputs, else ``accumulate_dtype``."""
    return torch.float64 if x.dtype == torch.float64 else accumulate_dtype


@dataclass
class InputStats:
    """Statistics of one distinct layer input. ``C`` is (d_in, d_in) float64."""

    C: torch.Tensor
    abs_sum: torch.Tensor
    tokens: int = 0
    #: tokens' worth of statistics borrowed from elsewhere (an expert that saw too few routed tokens)
    borrowed: int = 0

    @classmethod
    def zeros(cls, d: int, device: torch.device | str) -> InputStats:
        return cls(
            C=torch.zeros(d, d, dtype=torch.float64, device=device),
            abs_sum=torch.zeros(d, dtype=torch.float64, device=device),
        )

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    def add(self, rows: torch.Tensor, accumulate_dtype: torch.dtype = torch.float32, *, name: str = "") -> None:
        """Accumulate the (tokens, d) ``rows`` of one batch."""
        rows = rows.to(device=self.C.device, dtype=product_dtype(rows, accumulate_dtype))
        xtx = rows.T @ rows
        if not torch.isfinite(xtx).all():
            raise CalibrationError(f"non-finite activation (NaN or Inf) entering layer {name!r}")
        self.C += xtx.double()
        self.abs_sum += rows.abs().sum(0).double()
        self.tokens += rows.shape[0]


def select_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The (tokens, d) rows of activation ``x`` at positions where ``mask`` is 1.

    A (batch, d) input (one vector per sequence, e.g. BERT's pooler) keeps every row. Returns None
    when ``x`` does not line up with the (batch, tokens) ``mask``; without a mask every position is
    a row.
    """
    x = x.detach()
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    if x.dim() == 3 and x.shape[0] == mask.shape[0] and x.shape[1] <= mask.shape[1]:
        return x[mask[:, -x.shape[1] :].to(x.device).bool()]
    if x.dim() == 2 and x.shape[0] == mask.numel():
        return x[mask.reshape(-1).to(x.device).bool()]
    if x.dim() == 2 and x.shape[0] == mask.shape[0]:
        return x  # one vector per sequence (a pooler or classification head): every row is real
    return None


@dataclass
class Calibration:
    """The result of calibration: statistics per distinct input and which layer read which.

    ``input_of[layer]`` is the key (the name of the first layer that read that tensor) of the
    statistics in ``stats``; layers with the same key read the same tensor. ``order`` lists the
    keys in the order the forward pass first reached them.
    """

    stats: dict[str, InputStats]
    input_of: dict[str, str]
    batches: int = 0
    warnings: list[str] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    def of(self, layer: str) -> InputStats:
        return self.stats[self.input_of[layer]]


class ForwardDone(Exception):
    """Raised from a layer hook during :meth:`Calibrator.run_batch` once the batch has reached every
    targeted layer: the rest of the forward has nothing to add to the statistics."""


class Calibrator:
    """Context manager that installs the hooks; use :func:`calibrate` unless you drive it yourself.

    With ``batch_hooks`` (the default) every top-level forward of ``model`` is one batch and its
    ``attention_mask`` keyword masks padding; otherwise call :meth:`begin_batch` and
    :meth:`end_batch` around each forward (how the streaming engine drives one block).
    :meth:`run_batch` runs one batch and cuts its forward short at the LM head; calling the model
    directly runs it whole.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        accumulate_dtype: torch.dtype = torch.float32,
        *,
        batch_hooks: bool = True,
        stats_device: torch.device | str | None = None,
    ):
        self.model = model
        self.layers = list(layers)
        self._hooked = set(self.layers)
        self.accumulate_dtype = accumulate_dtype
        self.batch_hooks = batch_hooks
        self.stats_device = stats_device
        self.stats: dict[str, InputStats] = {}
        self.input_of: dict[str, str] = {}
        self.order: list[str] = []
        self.batches = 0
        self.warnings: list[str] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._batch_key: dict[str, str] = {}
        self._mask: torch.Tensor | None = None
        self._unmasked_warned: set[str] = set()
        self._reached: set[str] = set()  # layers called in the current batch
        self._stopping = False  # inside run_batch

    def __enter__(self) -> Calibrator:
        modules = dict(self.model.named_modules())
        if self.batch_hooks:
            self._handles.append(self.model.register_forward_pre_hook(self._start_batch, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(lambda *a: self.end_batch()))
        for name in self.layers:
            self._handles.append(modules[name].register_forward_pre_hook(self._make_hook(name)))
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        if isinstance(head, nn.Module) and all(modules[n] is not head for n in self.layers):
            self._handles.append(head.register_forward_pre_hook(self._stop_at_head))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def begin_batch(self, mask: torch.Tensor | None) -> None:
        """Start a batch whose (batch, tokens) padding mask is ``mask`` (None: no padding)."""
        self._seen.clear()
        self._batch_key = {}
        self._mask = mask
        self._reached = set()

    def end_batch(self) -> None:
        if self._batch_key:
            self.batches += 1
        self._seen.clear()

    def run_batch(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        """Run one batch (``model(**kwargs)``, ``batch_hooks`` on), stopped at the LM head.

        The forward stops when the model's output embeddings (``get_output_embeddings()``, not a
        target) are called after every targeted layer was; a model without them, or a batch that
        has not reached every targeted layer by then, runs whole.
        """
        self._stopping = True
        try:
            model(**kwargs)
        except ForwardDone:
            self.end_batch()
        finally:
            self._stopping = False

    def result(self) -> Calibration:
        if not self.stats:
            raise CalibrationError("calibration saw no tokens: the model was never run on the data")
        fallback = fill_sparse_experts(self.stats, self.input_of, self.order, self.layers)
        if fallback:
            log.info(fallback)
            self.warnings.append(fallback)
        missing = [n for n in self.layers if n not in self.input_of]
        if missing:
            raise CalibrationError(f"calibration never reached layers {missing[:5]} (the forward did not use them)")
        for key, st in self.stats.items():
            if st.tokens == 0:
                raise CalibrationError(f"every calibration position of {key!r} was padding (attention_mask 0)")
        return Calibration(self.stats, dict(self.input_of), self.batches, list(self.warnings), list(self.order))

    # -- hooks ---------------------------------------------------------------------------------
    def _start_batch(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        self.begin_batch(mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None)

    def _stop_at_head(self, module: nn.Module, args: tuple) -> None:
        if self._stopping and len(self._reached) == len(self._hooked):
            raise ForwardDone

    def _make_hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return
            self._observe(name, args[0])
            self._reached.add(name)

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
        rows = select_tokens(x, self._mask)
        if rows is None and is_expert_layer(name):
            rows = x.detach().reshape(-1, x.shape[-1])  # the tokens routed to this expert: all real
        if rows is None:
            rows = x.detach().reshape(-1, x.shape[-1])
            if name not in self._unmasked_warned:
                self._unmasked_warned.add(name)
                msg = (
                    f"layer {name!r}: input shape {tuple(x.shape)} does not line up with attention_mask "
                    f"{tuple(self._mask.shape)}; all its positions are used"
                )
                log.warning(msg)
                self.warnings.append(msg)
        st = self.stats.get(key)
        if st is None:
            st = self.stats[key] = InputStats.zeros(rows.shape[-1], self.stats_device or x.device)
            self.order.append(key)
        st.add(rows, self.accumulate_dtype, name=name)


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
    ``input_ids``/``attention_mask``, or an ``input_ids`` tensor), moved to the model's device, or
    a callback ``run(model)`` that drives the model itself (every top-level forward counts as a
    batch). Batch products are formed in ``accumulate_dtype`` (float32 by default; float64 inputs
    stay float64) and summed in float64.
    """
    from ..device import model_device

    device = model_device(model)
    with torch.no_grad(), calibrating(model, layers, accumulate_dtype) as cal:
        if callable(data):
            data(model)
        else:
            it = data
            if progress:
                from tqdm.auto import tqdm

                it = tqdm(data, desc="calibrate", unit="batch", total=total)
            for batch in it:
                cal.run_batch(model, batch_kwargs(batch, device))
    result = cal.result()
    warn_few_tokens(result)
    return result


@contextlib.contextmanager
def calibrating(
    model: nn.Module, layers: Sequence[str], accumulate_dtype: torch.dtype = torch.float32
) -> Iterator[Calibrator]:
    """``model`` in eval mode with exact matmuls and a :class:`Calibrator` on ``layers``, for callers
    that drive the batches themselves (call ``result()`` on it afterwards)."""
    was_training = model.training
    model.eval()
    try:
        with exact_matmuls(), Calibrator(model, layers, accumulate_dtype) as cal:
            yield cal
    finally:
        model.train(was_training)


def batch_kwargs(batch: Batch, device: torch.device | str) -> dict[str, Any]:
    """A calibration batch (a dict of model keyword arguments, or an input_ids tensor) on ``device``."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch.to(device)}
    if isinstance(batch, dict):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    raise TypeError(f"a calibration batch must be a dict or a tensor, got {type(batch).__name__}")


def fill_sparse_experts(
    stats: dict[str, InputStats], input_of: dict[str, str], order: list[str], layers: Sequence[str]
) -> str | None:
    """Give experts that saw fewer routed tokens than input features (or none) statistics they can be
    factorized from, in place; returns what was done, for the report, or None.

    An expert's statistics come from exactly the tokens routed to it. Below ``d_in`` tokens its C is
    singular, so it is topped up to ``d_in`` tokens' worth: the gate/up input (the layer's hidden
    states, the same space for every expert) with the layer's union of routed tokens (the mean C of
    that position over all experts, so weighted by routing frequency); the down-projection input
    (the expert's own intermediate features) with an isotropic C at the expert's own mean energy, i.e.
    plain SVD in the directions its tokens did not reach (the siblings' mean energy when it saw none).
    """
    positions: dict[tuple[str, str], dict[int, list[str]]] = {}
    for name in layers:
        if not is_expert_layer(name):
            continue
        container, e, leaf = name.rsplit(".", 2)
        positions.setdefault((container.rsplit(".", 1)[0], _role(leaf)), {}).setdefault(int(e), []).append(name)
    if not positions:
        return None
    topped, unseen = [], []
    for (_, role), experts in positions.items():
        seen = [stats[input_of[names[0]]] for names in experts.values() if names[0] in input_of]
        if not seen:
            continue
        pool_c = sum(st.C for st in seen) / max(sum(st.tokens for st in seen), 1)
        pool_energy = float(torch.diagonal(pool_c).mean())
        for names in experts.values():
            d = seen[0].C.shape[0]
            if names[0] not in input_of:
                key = names[0]
                for n in names:
                    input_of[n] = key
                stats[key] = InputStats.zeros(d, seen[0].C.device)
                order.append(key)
                unseen.append(names[0])
            st = stats[input_of[names[0]]]
            if st.tokens >= d:
                continue
            need = d - st.tokens
            if role == "down":
                energy = float(torch.diagonal(st.C).mean()) / st.tokens if st.tokens else pool_energy
                st.C += need * energy * torch.eye(d, dtype=st.C.dtype, device=st.C.device)
            else:
                st.C += need * pool_c
            st.borrowed = need
            if names[0] not in unseen:
                topped.append(f"{names[0]} ({st.tokens})")
    if not topped and not unseen:
        return None
    parts = []
    if topped:
        parts.append(f"{len(topped)} expert input(s) saw fewer routed tokens than features, e.g. {topped[0]}")
    if unseen:
        parts.append(f"{len(unseen)} expert(s) got no calibration token, e.g. {unseen[0]}")
    return (
        "; ".join(parts) + ": their statistics were topped up to d_in tokens (gate/up: the layer's routed tokens "
        "pooled over all experts; down: isotropic, i.e. plain SVD where no token reached); more calibration data "
        "routes more tokens to every expert"
    )


def pool_expert_inputs(calibration: Calibration) -> Calibration:
    """Merge the gate/up input statistics of all experts of each MoE layer into one (in place), for a
    bottleneck shared by all of them (``expert_basis="shared"``).

    The pooled C is the sum of the experts' routed-token C: the union of the layer's routed tokens,
    each counted once per expert it was routed to, so frequently used experts weigh more — the
    objective of one basis B for all experts, Σ_e ‖(W_e − A_e B) X_e‖², with every X_e replaced by
    that union (exact when experts see alike inputs; a closed form instead of an alternating fit).
    Top-ups of sparse experts (:func:`fill_sparse_experts`) only rescale the pooled C.
    """
    by_container: dict[str, list[str]] = {}
    for layer, key in calibration.input_of.items():
        if is_expert_layer(layer) and _role(layer.rsplit(".", 1)[-1]) == "in":
            by_container.setdefault(layer.rsplit(".", 2)[0], []).append(key)  # ….experts
    for container, keys in by_container.items():
        keys = list(dict.fromkeys(keys))
        pooled = f"{container}.*"  # the key says it: every expert of ``container`` reads it
        first = calibration.stats[keys[0]]
        merged = InputStats(first.C.clone(), first.abs_sum.clone(), first.tokens, first.borrowed)
        for k in keys[1:]:
            st = calibration.stats.pop(k)
            merged.C += st.C
            merged.abs_sum += st.abs_sum
            merged.tokens += st.tokens
            merged.borrowed += st.borrowed
        del calibration.stats[keys[0]]
        calibration.stats[pooled] = merged
        gone = set(keys)
        for layer, key in calibration.input_of.items():
            if key in gone:
                calibration.input_of[layer] = pooled
        calibration.order = [pooled if k == keys[0] else k for k in calibration.order if k not in gone or k == keys[0]]
    return calibration


def _role(leaf: str) -> str:
    return "down" if leaf in ("down_proj", "w2") else "in"


def warn_few_tokens(result: Calibration) -> None:
    """Warn (and record) when an input saw fewer tokens than features: C is singular there."""
    d_small = [k for k, st in result.stats.items() if st.tokens + st.borrowed < st.C.shape[0]]
    if d_small:
        st = result.stats[d_small[0]]
        msg = (
            f"{len(d_small)} layer input(s) saw fewer calibration tokens than features "
            f"(e.g. {d_small[0]!r}: {st.tokens} tokens < d_in {st.C.shape[0]}); C is singular there and the "
            "factors fit only the directions seen; use more calibration data"
        )
        log.warning(msg)
        result.warnings.append(msg)
