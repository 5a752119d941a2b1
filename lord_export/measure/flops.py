"""FLOP counts of one forward and one decode step (the ideal speed-up of a LoRD model is their ratio)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def forward_flops(model: nn.Module, **kwargs: Any) -> int:
    """FLOPs of one forward, attention included: counted with eager attention (bmm), because
    FlopCounterMode does not see the fused flash-attention kernels that sdpa uses."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.config
    saved = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(**kwargs)
    finally:
        cfg._attn_implementation = saved
    return counter.get_total_flops()


def decode_step_flops(model: nn.Module, prompt: torch.Tensor) -> int:
    """FLOPs of one decode step after ``prompt`` (KV cache of the prompt's length)."""
    with torch.no_grad():
        past = model(input_ids=prompt, use_cache=True).past_key_values
    return forward_flops(model, input_ids=prompt[:, -1:], past_key_values=past, use_cache=True)
