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


def ort_runner(session: Any) -> Runner:
    """An ONNX Runtime session of a causal LM; with KV-cache inputs (optimum's layout) it also decodes.

    Inputs and outputs go through numpy (host memory), also on the CUDA provider: each decode step
    copies the KV cache out and back in, the same for dense and LoRD, which pulls CUDA decode
    speed-ups toward 1 (I/O binding would keep it on the device)."""
    import numpy as np

    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    outputs = [o.name for o in session.get_outputs()]

    def empty_past() -> dict[str, Any]:
        feeds = {}
        for name in past_names:
            shape = [d if isinstance(d, int) else 1 for d in inputs[name].shape]
            shape[2] = 0  # (batch, kv heads, past length, head dim)
            dtype = np.float16 if inputs[name].type == "tensor(float16)" else np.float32
            feeds[name] = np.zeros(shape, dtype=dtype)
        return feeds

    def run(ids: Any, past: dict[str, Any], past_len: int) -> tuple[Any, dict[str, Any]]:
        n = ids.shape[1]
        feeds = {"input_ids": ids}
        if "attention_mask" in inputs:
            feeds["attention_mask"] = np.ones((1, past_len + n), dtype=np.int64)
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None]
        feeds.update(past)
        result = dict(zip(outputs, session.run(None, feeds), strict=True))
        present = {
            n.replace("present.", "past_key_values.", 1): v for n, v in result.items() if n.startswith("present.")
        }
        return result[outputs[0]], present

    def prefill(ids: torch.Tensor) -> None:
        run(ids.numpy(), empty_past(), 0)

    def decode(prompt: torch.Tensor, steps: int) -> float:
        logits, past = run(prompt.numpy(), empty_past(), 0)
        length = prompt.shape[1]
        t = time.perf_counter()
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1).astype(np.int64)
            logits, past = run(nxt, past, length)
            length += 1
        return (time.perf_counter() - t) / steps

    runs_on = f"ORT {session.get_providers()[0].replace('ExecutionProvider', '')} float32"
    if not past_names:
        return Runner(
            prefill, None, "this ONNX has no KV-cache inputs (install lord_export[optimum] for them)", runs_on
        )
    return Runner(prefill, decode, runs_on=runs_on)
