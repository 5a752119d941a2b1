"""Runners: one model on one backend, as ``prefill(ids)`` and ``decode(prompt, steps) -> s/token``."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Runner:
    prefill: Callable[[torch.Tensor], Any]
    decode: Callable[[torch.Tensor, int], float] | None
    decode_skip: str = ""
    runs_on: str = ""


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def torch_runner(model: Callable, device: str, dtype: torch.dtype) -> Runner:
    """A transformers causal LM (eager or compiled) on ``device``, running in ``dtype``."""
    label = str(dtype).replace("torch.", "")

    def prefill(ids: torch.Tensor) -> None:
        with torch.no_grad():
            model(input_ids=ids.to(device), use_cache=False)
        _sync(device)

    def decode(prompt: torch.Tensor, steps: int) -> float:
        with torch.no_grad():
            out = model(input_ids=prompt.to(device), use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(device)
        return (time.perf_counter() - t) / steps

    return Runner(prefill, decode, runs_on=f"torch {device} {label}")


def ort_runner(session: Any, io_binding: bool | None = None) -> Runner:
    """An ONNX Runtime session of a causal LM; with KV-cache inputs (optimum's layout) it also decodes.

    Decode feeds each step's ``present.*`` outputs back as the next step's ``past_key_values.*``.
    With ``io_binding`` (default: when the session runs on CUDA) they stay where ONNX Runtime wrote
    them, as ``OrtValue``s bound with ``IOBinding``; only the token ids go in and the last logits
    come out through host memory. Without it, everything goes through numpy, which on CUDA copies
    the whole KV cache to the host and back every step."""
    provider = session.get_providers()[0]
    on_cuda = provider.startswith("CUDA")
    use_binding = on_cuda if io_binding is None else io_binding
    has_past = any(i.name.startswith("past_key_values.") for i in session.get_inputs())

    def prefill(ids: torch.Tensor) -> None:
        session.run(None, _ort_feeds(session, ids.numpy(), _empty_past(session), 0))

    def decode(prompt: torch.Tensor, steps: int) -> float:
        return ort_greedy(session, prompt, steps, io_binding=use_binding)[1]

    binding_label = " io-binding" if use_binding and has_past else ""
    runs_on = f"ORT {provider.replace('ExecutionProvider', '')}{binding_label} float32"
    if not has_past:
        return Runner(
            prefill, None, "this ONNX has no KV-cache inputs (install lord_export[optimum] for them)", runs_on
        )
    return Runner(prefill, decode, runs_on=runs_on)


def _empty_past(session: Any) -> dict[str, Any]:
    """Zero-length ``past_key_values.*`` arrays (batch, kv heads, 0, head dim) for a first step."""
    import numpy as np

    feeds = {}
    for i in session.get_inputs():
        if i.name.startswith("past_key_values."):
            shape = [d if isinstance(d, int) else 1 for d in i.shape]
            shape[2] = 0
            feeds[i.name] = np.zeros(shape, dtype=np.float16 if i.type == "tensor(float16)" else np.float32)
    return feeds


def _ort_feeds(session: Any, ids: Any, past: dict[str, Any], past_len: int) -> dict[str, Any]:
    """input_ids, attention_mask/position_ids (when the graph takes them) and the past, for one call."""
    import numpy as np

    names = {i.name for i in session.get_inputs()}
    n = ids.shape[1]
    feeds = {"input_ids": ids}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones((1, past_len + n), dtype=np.int64)
    if "position_ids" in names:
        feeds["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None]
    feeds.update(past)
    return feeds


def ort_greedy(session: Any, prompt: torch.Tensor, steps: int, *, io_binding: bool) -> tuple[list[int], float]:
    """Greedy-decode ``steps`` tokens after ``prompt`` (batch 1); returns (tokens, seconds per token).

    The prompt's step is not timed. ``io_binding`` keeps the KV cache in ONNX Runtime's memory on
    the session's device between steps (see :func:`ort_runner`).
    """
    import numpy as np

    outputs = [o.name for o in session.get_outputs()]
    past_of = {o: o.replace("present.", "past_key_values.", 1) for o in outputs if o.startswith("present.")}
    device = "cuda" if session.get_providers()[0].startswith("CUDA") else "cpu"

    def step_numpy(ids: Any, past: dict[str, Any], past_len: int) -> tuple[Any, dict[str, Any]]:
        result = dict(zip(outputs, session.run(None, _ort_feeds(session, ids, past, past_len)), strict=True))
        return result[outputs[0]], {past_of[o]: result[o] for o in past_of}

    def step_bound(ids: Any, past: dict[str, Any], past_len: int) -> tuple[Any, dict[str, Any]]:
        binding = session.io_binding()
        for name, value in _ort_feeds(session, ids, past, past_len).items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:  # an OrtValue left on the device by the previous step
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(outputs[0], "cpu")  # the logits: argmax happens on the host
        for o in past_of:
            binding.bind_output(o, device)
        session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return values[0].numpy(), {past_of[o]: v for o, v in zip(past_of, values[1:], strict=True)}

    step = step_bound if io_binding else step_numpy
    logits, past = step(prompt.numpy(), _empty_past(session), 0)
    length, tokens = prompt.shape[1], []
    t = time.perf_counter()
    for _ in range(steps):
        nxt = logits[:, -1:].argmax(-1).astype(np.int64)
        tokens.append(int(nxt[0, 0]))
        logits, past = step(nxt, past, length)
        length += 1
    return tokens, (time.perf_counter() - t) / max(steps, 1)
