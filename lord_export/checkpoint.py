"""Safetensors checkpoints, single-file or sharded in Hugging Face's layout, read lazily and written
in pieces.

Layout (what ``save_pretrained`` writes and every HF loader reads): one ``model.safetensors``, or
shards ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json`` holding
``{"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}``.

* :class:`CheckpointReader` opens every shard lazily (``safe_open``) and reads one tensor at a time,
  so a block's weights can be loaded without the rest of the model. ``safe_open`` memory-maps the
  file and the pages it reads stay resident (and counted in the process's RSS) while the file is
  open — and while any tensor viewing the map lives, so readers copy what they keep
  (``CheckpointWeights.load_into``) and :meth:`CheckpointReader.close` is called after each block.
* :class:`ShardWriter` takes tensors a block at a time and writes a shard whenever the next block
  would push the current one past ``max_shard_bytes``: memory holds at most one shard's worth,
  whatever the depth of the model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UsageError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 << 30
_METADATA = {"format": "pt", "lord_export": "1"}


def parse_size(text: str | int) -> int:
    """Bytes from ``"2GB"``, ``"500MB"``, ``"10KiB"`` or a plain number of bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(text), re.IGNORECASE)
    if not m:
        raise UsageError(f"not a size: {text!r} (write e.g. 2GB, 500MB)")
    base = 1024 if m.group(3) or not m.group(2) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    size = int(float(m.group(1)) * base**power)
    if size < 1:
        raise UsageError(f"size must be positive, got {text!r}")
    return size


def weight_files(directory: str | Path) -> dict[str, Path]:
    """{tensor name: file} of a checkpoint directory (index, single file, or loose shards)."""
    d = Path(directory)
    index = d / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: d / file for name, file in weight_map.items()}
    files = [d / WEIGHTS_FILE] if (d / WEIGHTS_FILE).is_file() else sorted(d.glob("*.safetensors"))
    if not files:
        raise UsageError(f"{str(directory)!r} has no *.safetensors weights")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            out.update({k: f for k in handle.keys()})
    return out


class CheckpointReader:
    """Read tensors of a checkpoint directory by name, one at a time (files opened lazily)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.files = weight_files(directory)
        self._handles: dict[Path, object] = {}

    def keys(self) -> Iterable[str]:
        return self.files.keys()

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        f = self.files[name]
        handle = self._handles.get(f)
        if handle is None:
            handle = self._handles[f] = safe_open(str(f), framework="pt")
        return handle.get_tensor(name)

    @property
    def open_files(self) -> int:
        """How many shard files are open (memory-mapped) right now."""
        return len(self._handles)

    def close(self) -> None:
        """Unmap every open shard; later reads reopen them (tensors already read stay valid)."""
        self._handles.clear()

    def load_all(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Every tensor (for small models and the whole-model path)."""
        try:
            return {name: self.get(name).to(device) for name in self.files}
        finally:
            self.close()


class ShardWriter:
    """Write a state dict block by block into ``directory`` as HF shards (see the module docstring)."""

    def __init__(self, directory: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffered = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Add one block's tensors; flushes the current shard first if they would overflow it."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._buffer and self._buffered + size > self.max_shard_bytes:
            self.flush()
        for name, t in tensors.items():
            if name in self._buffer or any(name in names for _, names in self._parts):
                raise ValueError(f"tensor {name!r} written twice")
            self._buffer[name] = t.detach().to("cpu").contiguous()
        self._buffered += size

    def flush(self) -> None:
        if not self._buffer:
            return
        path = self.directory / f".part-{len(self._parts):05d}.safetensors"
        save_file(self._buffer, str(path), metadata=_METADATA)
        self._parts.append((path, list(self._buffer)))
        self.total_bytes += self._buffered
        self._buffer, self._buffered = {}, 0

    def close(self) -> list[Path]:
        """Flush, give the shards their final names and write the index (only when > 1 shard)."""
        self.flush()
        n = len(self._parts)
        if n == 0:
            save_file({}, str(self.directory / WEIGHTS_FILE), metadata=_METADATA)
            return [self.directory / WEIGHTS_FILE]
        if n == 1:
            final = self.directory / WEIGHTS_FILE
            os.replace(self._parts[0][0], final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(self._parts):
            final = self.directory / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(path, final)
            finals.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return finals
