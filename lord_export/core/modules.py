"""Eager LoRD layers: a shared bottleneck per group and one up-projection per member.

``LordBottleneck`` holds B (r × d_in) and computes h = x Bᵀ ONCE per input: the first member
that asks computes it, the others reuse it (same tensor object, same version), and the cache is
dropped once every member has read it. Under ``torch.compile`` the cache is bypassed (dynamo
cannot reason about it); the graph pass deduplicates the repeated bottleneck there instead.

``LordLinear`` replaces a member layer: y = h Aᵀ + bias. It keeps ``in_features`` /
``out_features`` so code that inspects Linear layers still works, and holds its bottleneck as a
plain attribute (the bottleneck is registered once, under the group's parent module), so every
tensor appears once in ``state_dict``. Both classes live at module top level so models pickle.

PEFT: ``import lord_export`` installs a hook (no peft import, :mod:`lord_export.peft_hook`) so that
``peft`` LoRA configs wrap ``LordLinear`` layers with :class:`lord_export.peft_support.LordLoraLinear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _symbolic(x: torch.Tensor) -> bool:
    return torch.compiler.is_compiling() or isinstance(x, torch.fx.Proxy)


class LordBottleneck(nn.Module):
    """h = x Bᵀ, shared by ``n_members`` layers that read the same input."""

    def __init__(self, d_in: int, rank: int, n_members: int, *, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = d_in
        self.rank = rank
        self.n_members = n_members
        self.weight = nn.Parameter(torch.empty(rank, d_in, device=device, dtype=dtype))
        self._clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """The bottleneck of ``x``, computed at most once for all members of the group."""
        if self.n_members == 1 or _symbolic(x):
            return self(x)
        version = None if x.is_inference() else x._version  # inference tensors have no version counter
        if self._input is x and self._version == version and self._output is not None:
            out = self._output
        else:
            out = self(x)
            self._input, self._version, self._output, self._uses = x, version, out, 0
        self._uses += 1
        if self._uses >= self.n_members:
            self._clear()
        return out

    def _clear(self) -> None:
        self._input: torch.Tensor | None = None
        self._version: int | None = None
        self._output: torch.Tensor | None = None
        self._uses = 0

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # never pickle a cached activation
        state.update(_input=None, _version=None, _output=None, _uses=0)
        return state

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, members={self.n_members}"


class LordLinear(nn.Module):
    """y = bottleneck(x) Aᵀ + bias: one member of a LoRD group."""

    def __init__(self, bottleneck: LordBottleneck, out_features: int, bias: bool, *, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = bottleneck.in_features
        self.out_features = out_features
        self.rank = bottleneck.rank
        self.weight = nn.Parameter(torch.empty(out_features, bottleneck.rank, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.__dict__["bottleneck"] = bottleneck  # not a submodule: registered once, under the parent

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.bottleneck.shared(x))

    def project(self, h: torch.Tensor) -> torch.Tensor:
        """The up-projection alone: h (…, rank) → (…, out_features). Adapters add to it on the same h."""
        return F.linear(h, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, rank={self.rank}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )
