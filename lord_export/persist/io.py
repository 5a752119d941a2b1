"""Saving and loading compressed models and plans (safetensors + JSON, never pickle).

A compressed model directory holds:

* ``config.json`` (+ tokenizer and generation files copied from the dense model),
* ``model.safetensors`` — the compressed model's state dict (tied tensors stored once),
* ``lord_plan.json`` — the plan (structure, ranks, per-group errors),
* ``report.json`` — what was done, in numbers.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.apply import apply_plan
from ..core.plan import QUANT_METHODS, Plan, plan_from_quantization_config, quantization_config_from_plan
from ..errors import ForeignOutputError, OutputExistsError, PlanError, UsageError
from .checkpoint import (  # noqa: F401 (re-export)
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE,
    WEIGHTS_FILE,
    CheckpointReader,
    ShardWriter,
)

PLAN_FILE = "lord_plan.json"
REPORT_FILE = "report.json"


#: Files that mark a directory lord_export wrote (a LoRD model, an export, a demo, a sweep).
OUTPUT_MARKERS = (
    "lord_plan.json",
    "report.json",
    "export_report.json",
    "heal_report.json",
    "demo.json",
    "sweep.json",
    "lord_config.json",
)


def check_output(path: str | Path, overwrite: bool | str = False) -> None:
    """OutputExistsError unless ``path`` is free, or may be replaced: ``overwrite=True`` replaces an empty
    directory or one lord_export wrote (:data:`OUTPUT_MARKERS`), ``overwrite="any"`` anything."""
    p = Path(path)
    if not p.exists() or overwrite == "any":
        return
    if not overwrite:
        raise OutputExistsError(path)
    if p.is_dir() and (not any(p.iterdir()) or any((p / m).exists() for m in OUTPUT_MARKERS)):
        return
    raise ForeignOutputError(path)


@contextmanager
def atomic_output_dir(path: str | Path, *, overwrite: bool | str = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; move it to ``path`` only on success.

    Refuses an existing ``path`` unless :func:`check_output` allows replacing it; on any error the
    temporary directory is removed and ``path`` is untouched.
    """
    dest = Path(path)
    check_output(dest, overwrite)
    parent = dest.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"the parent directory of output {str(path)!r} does not exist")
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=parent))
    try:
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(src: Path, dest: Path) -> None:
    """Move the finished directory ``src`` to ``dest``; an existing ``dest`` is swapped out first and
    deleted only once ``src`` is in place."""
    dest = Path(dest)
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.absolute().parent))
        os.replace(dest, old / "x")
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dest)


def unique_state_dict(model: nn.Module, *, skip_prefix: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict with every shared (tied) tensor kept once; returns (tensors, dropped names).

    ``skip_prefix`` leaves out tensors whose name starts with it (blocks already written).
    """
    seen: dict[tuple, str] = {}
    out: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for name, t in model.state_dict().items():
        if skip_prefix and name.startswith(skip_prefix):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            dropped.append(name)
            continue
        seen[key] = name
        out[name] = t.detach().contiguous()
    return out, dropped


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_compressed(
    model: nn.Module,
    plan: Plan,
    output_dir: str | Path,
    *,
    source_dir: str | Path | None = None,
    report: dict[str, Any] | None = None,
    overwrite: bool | str = False,
) -> Path:
    """Write a compressed model directory (atomically) that :func:`load` reads back."""
    with atomic_output_dir(output_dir, overwrite=overwrite) as tmp:
        write_into(tmp, model, plan, source_dir=source_dir, report=report)
    return Path(output_dir)


def write_into(
    directory: Path,
    model: nn.Module,
    plan: Plan,
    *,
    source_dir: str | Path | None = None,
    report: dict[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write the files of a compressed model directory into an existing (empty) ``directory``."""
    write_config_and_tokenizer(directory, model, plan, source_dir)
    tensors, tied = unique_state_dict(model)
    writer = ShardWriter(directory, max_shard_bytes)
    for name, tensor in tensors.items():
        writer.add({name: tensor})
    writer.close()
    write_plan(directory, plan, tied, report)


def rewrite_weights(
    directory: Path, model: nn.Module, plan: Plan, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype_of=None
) -> None:
    """Replace the weights and plan of the LoRD directory being written in ``directory`` with ``model``'s
    (after a stage that changed the factors); ``dtype_of(name)`` gives each tensor's storage dtype."""
    for f in list(directory.glob("*.safetensors")) + [directory / INDEX_FILE]:
        f.unlink(missing_ok=True)
    tensors, tied = unique_state_dict(model)
    writer = ShardWriter(directory, max_shard_bytes)
    for name, tensor in tensors.items():
        dtype = dtype_of(name) if dtype_of is not None and tensor.is_floating_point() else None
        writer.add({name: tensor.to(dtype) if dtype is not None else tensor})
    writer.close()
    write_plan(directory, plan, tied)


def write_config_and_tokenizer(directory: Path, model: nn.Module, plan: Plan, source_dir: str | Path | None) -> None:
    """config.json (with the architecture named and the plan's structure as its ``quantization_config``,
    so that transformers' ``from_pretrained`` loads the directory) and ``source_dir``'s tokenizer files."""
    from .hf import TOKENIZER_FILES

    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config = copy.copy(config)
        if not getattr(config, "architectures", None):
            config.architectures = [type(model).__name__]
        config.quantization_config = quantization_config_from_plan(plan)
        config.save_pretrained(directory)
    if source_dir is not None:
        for name in TOKENIZER_FILES:
            src = Path(source_dir) / name
            if src.is_file() and not (directory / name).exists():
                shutil.copyfile(src, directory / name)


def write_plan(directory: Path, plan: Plan, tied: list[str], report: dict[str, Any] | None = None) -> None:
    """Write ``lord_plan.json`` (with the names of tensors stored tied) and ``report.json``."""
    plan_dict = plan.to_dict()
    plan_dict["tied_parameters"] = tied
    write_json(directory / PLAN_FILE, plan_dict)
    if report is not None:
        write_json(directory / REPORT_FILE, report)


def plan_from_model_dir(path: str | Path) -> Plan | None:
    """The plan structure from ``<path>/config.json``'s LoRD quantization_config, or None if it has none."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        return None
    qc = json.loads(cfg_file.read_text()).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") not in QUANT_METHODS:
        return None
    return plan_from_quantization_config(qc)


def read_plan(path: str | Path, *, with_tensors: bool = True) -> Plan:
    """Read the plan of a compressed model directory; with its factor tensors unless told not to."""
    p = Path(path)
    plan_file = p / PLAN_FILE if p.is_dir() else p
    if not plan_file.is_file():
        raise UsageError(f"{str(path)!r} has no {PLAN_FILE}: it is not a lord_export output")
    try:
        plan = Plan.from_dict(json.loads(plan_file.read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PlanError(f"{plan_file} is not a valid plan: {e}") from e
    if with_tensors:
        try:
            reader = CheckpointReader(plan_file.parent)
        except UsageError:
            raise PlanError(f"{plan_file.parent} has no safetensors weights holding the plan's factors") from None
        wanted = set()
        for g in plan.factorized_groups:
            wanted.add(f"{g.bottleneck_name}.weight")
            for m in g.members:
                wanted.add(f"{m.name}.weight")
                if m.has_bias:
                    wanted.add(f"{m.name}.bias")
        missing = sorted(wanted - set(reader.keys()))
        if missing:
            raise PlanError(f"the weights of {plan_file.parent} lack factors {missing[:5]}")
        plan.tensors = {k: reader.copy(k) for k in sorted(wanted)}
        reader.close()
    return plan


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on the meta device (buffers stay real) while building a model."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            cls = type(param)
            module._parameters[name] = cls(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def load(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    model: nn.Module | None = None,
    trust_remote_code: bool = False,
    allow_mismatch: bool = False,
) -> nn.Module:
    """Load a LoRD-compressed model directory written by ``lord-export compress`` / :func:`save_compressed`.

    The model is built on the meta device from ``config.json``, given the plan's structure, and
    its weights are assigned from ``model.safetensors`` or its shards (tied embeddings stay tied),
    on ``device`` and, when given, cast to ``dtype``. For a model that is not a transformers model,
    pass a dense ``model`` of the right architecture: it is restructured and loaded in place; it
    must match the plan's base-model fingerprint (class, parameter count, linear shapes — its
    weight values do not matter, they are all replaced) unless ``allow_mismatch=True``.
    """
    p = Path(path)
    tied: list[str] | None = None  # None: unknown (written by save_pretrained), re-tie and check what is left
    plan = plan_from_model_dir(p) if not (p / PLAN_FILE).is_file() else None  # a save_pretrained directory
    if plan is None:
        plan = read_plan(p, with_tensors=False)
        tied = json.loads((p / PLAN_FILE).read_text()).get("tied_parameters", [])
    if model is None:
        model = build_skeleton(p, trust_remote_code)
        allow_mismatch = True  # built from the directory's own config
    apply_plan(model, plan, load_tensors=False, allow_mismatch=allow_mismatch)
    state = CheckpointReader(p).load_all(device, dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise PlanError(f"the weights of {p} hold tensors the model does not have: {result.unexpected_keys[:5]}")
    if tied is not None:
        untied = [k for k in result.missing_keys if k not in tied]
        if untied:
            raise PlanError(f"the weights of {p} lack tensors of the model: {untied[:5]}")
    if tied or (tied is None and result.missing_keys):
        tied = tied or result.missing_keys
        if not hasattr(model, "tie_weights"):
            raise PlanError(f"tensors {tied[:3]} were stored tied, but the model cannot re-tie them")
        model.tie_weights()
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise PlanError(f"after loading, tensors are still unset: {leftover[:5]}")
    model = model.to(device)
    return (model.to(dtype) if dtype is not None else model).eval()


def build_skeleton(path: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """The model of ``path``'s config.json with every parameter on the meta device (buffers real)."""
    from transformers import AutoConfig

    from .hf import check_model_dir, model_class

    check_model_dir(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = model_class(config, trust_remote_code)
    with parameters_on_meta():
        if cls.__name__.startswith("Auto"):
            return cls.from_config(config, trust_remote_code=trust_remote_code)
        return cls(config)


def is_lord_dir(path: str | Path) -> bool:
    """Whether ``path`` is a LoRD model directory (it holds a plan)."""
    return (Path(path) / PLAN_FILE).is_file()


def load_for_compute(
    path: str | Path,
    device: str | torch.device,
    compute_dtype: torch.dtype | str | None = "auto",
    *,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, Any]:
    """A dense or LoRD directory on ``device`` in eval mode, in the dtype to compute in there (see
    :func:`lord_export.device.compute_dtype`: float32 for a bfloat16 checkpoint on a CPU without
    bfloat16 units); returns (model, the :class:`~lord_export.device.DtypeChoice`)."""
    from ..device import compute_dtype as choose
    from .hf import checkpoint_dtypes, main_dtype

    choice = choose(device, main_dtype(checkpoint_dtypes(path)), compute_dtype)
    model = load_model_dir(path, dtype=choice.compute, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), choice


def load_model_dir(path: str | Path, *, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> nn.Module:
    """A LoRD directory through :func:`load`, a dense one through :func:`lord_export.hf.load_dense`."""
    from .hf import load_dense

    if is_lord_dir(path):
        model = load(path, trust_remote_code=trust_remote_code)
        return model.to(dtype) if dtype is not None else model
    return load_dense(path, dtype=dtype, trust_remote_code=trust_remote_code)
