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
* :class:`ShardWriter` takes tensors a block at a time and writes their bytes straight into the open
  shard file, starting a new shard whenever the next block would push the current one past
  ``max_shard_bytes``; only the headers wait in memory, so the writer holds no tensor data (beyond
  odd-sized stragglers) whatever the depth of the model or the shard size.
* :class:`FactorSpill` keeps per-block tensors on disk between two passes over the blocks (the
  factors a parameter budget's survey computed, until the allocation gives them their ranks), one
  file per block, deleted when the block is taken back.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import UsageError

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 << 30
_METADATA = {"format": "pt", "lord_export": "1"}
HEADER_RESERVE = 64 << 10  # room left for a shard's header: ~400 tensors' entries
DEFERRED_FILE = ".deferred.safetensors"  # a resumable writer's tensors waiting for their shard's end
_COMPACT_BELOW = 1024  # shards with less data than 1024 reserves (64 MiB) are rewritten without padding
_DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


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

    def load_all(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Every tensor (for small models and the whole-model path), floating ones cast to ``dtype``.

        One tensor at a time is read, moved and cast, so ``device`` never holds the model in two
        dtypes at once (a float32 checkpoint loaded as bfloat16 on a GPU needs its bfloat16 size).
        What is returned never views the memory map (:meth:`copy`)."""

        def one(t: torch.Tensor) -> torch.Tensor:
            out = t.to(device)
            out = out.to(dtype) if dtype is not None and out.is_floating_point() else out
            return out.clone() if out.data_ptr() == t.data_ptr() else out

        try:
            return {name: one(self.get(name)) for name in self.files}
        finally:
            self.close()

    def copy(self, name: str) -> torch.Tensor:
        """Tensor ``name`` in memory of its own: a kept view of the map would pin the file's pages and
        be read through file pages (compiled decode measured slightly slower than from a copy)."""
        return self.get(name).clone()


class ShardWriter:
    """Write a state dict block by block into ``directory`` as HF shards (see the module docstring).

    Tensor bytes go to the open shard file as they arrive; only the header (names, dtypes, shapes,
    offsets) waits in memory until the shard is closed. A safetensors file starts with its header, so
    each shard file begins with ``header_reserve`` bytes left for it: the header is written there when
    the shard closes, padded with spaces (the format allows trailing whitespace). A shard whose header
    does not fit, or whose data is small enough that the reserve would be a visible share of the
    file, is rewritten compactly (header, then the data copied in chunks): bounded memory either way.
    Tensors whose byte size is not a multiple of 8 wait (in memory) for the end of their shard, where
    they are written largest item size first, so every tensor starts aligned to its element size.
    """

    def __init__(
        self,
        directory: str | Path,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        header_reserve: int = HEADER_RESERVE,
    ):
        if header_reserve < 16 or header_reserve % 8:
            raise ValueError(f"header_reserve must be a multiple of 8 and >= 16, got {header_reserve}")
        self.directory = Path(directory)
        self.max_shard_bytes = max_shard_bytes
        self.header_reserve = header_reserve
        self._file: Any = None
        self._entries: dict[str, dict[str, Any]] = {}
        self._deferred: dict[str, torch.Tensor] = {}
        self._offset = 0  # bytes of tensor data written to the open shard
        self._shard_bytes = 0  # written + deferred
        self._names: set[str] = set()
        self._parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Add one block's tensors; closes the current shard first if they would overflow it."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._shard_bytes and self._shard_bytes + size > self.max_shard_bytes:
            self.flush()
        for name, t in tensors.items():
            if name in self._names:
                raise ValueError(f"tensor {name!r} written twice")
            if t.dtype not in _DTYPE_NAMES:
                raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be stored in safetensors")
            self._names.add(name)
            t = t.detach().to("cpu").contiguous()
            if (t.numel() * t.element_size()) % 8:
                self._deferred[name] = t
            else:
                self._write(name, t)
        if self._file is not None:
            self._file.flush()
        self._shard_bytes += size

    def _write(self, name: str, t: torch.Tensor) -> None:
        if self._file is None:
            path = self.directory / f".part-{len(self._parts):05d}.safetensors"
            self._file = open(path, "wb")
            self._file.seek(self.header_reserve)
        nbytes = t.numel() * t.element_size()
        if nbytes:
            self._file.write(t.reshape(-1).view(torch.uint8).numpy().data)
        self._entries[name] = {
            "dtype": _DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [self._offset, self._offset + nbytes],
        }
        self._offset += nbytes

    def flush(self) -> None:
        """Close the current shard: its deferred tensors, then its header."""
        if not self._shard_bytes and self._file is None and not self._deferred:
            return
        for name, t in sorted(self._deferred.items(), key=lambda kv: (-kv[1].element_size(), kv[0])):
            self._write(name, t)
        self._deferred = {}
        f, path = self._file, Path(self._file.name)
        header = json.dumps({"__metadata__": _METADATA, **self._entries}, separators=(",", ":")).encode()
        if 8 + len(header) <= self.header_reserve and self._offset >= _COMPACT_BELOW * self.header_reserve:
            f.seek(0)
            f.write(struct.pack("<Q", self.header_reserve - 8) + header.ljust(self.header_reserve - 8, b" "))
            f.close()
        else:
            f.close()
            _rewrite_compact(path, header, self.header_reserve, self._offset)
        self._parts.append((path, list(self._entries)))
        self.total_bytes += self._offset
        self._file, self._entries, self._offset, self._shard_bytes = None, {}, 0, 0

    def close(self) -> list[Path]:
        """Close the last shard, give the shards their final names and write the index (only when > 1 shard)."""
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

    def abort(self) -> None:
        """Close the open shard file without finishing it (the caller removes the directory, or a resumed
        run continues from the last :meth:`checkpoint`)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- resuming ------------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        """Everything :meth:`restore` needs to continue this writer after a crash: the finished parts, the
        open shard (its file, entries and data length) and the tensors waiting for the shard's end
        (written to a sidecar file in ``directory``). Call it between blocks; the open file is synced."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
        sidecar = self.directory / DEFERRED_FILE
        if self._deferred:
            tmp = sidecar.with_name(sidecar.name + ".tmp")
            save_file(dict(self._deferred), str(tmp))
            os.replace(tmp, sidecar)
        return {
            "parts": [[p.name, names] for p, names in self._parts],
            "open": None
            if self._file is None
            else {"file": Path(self._file.name).name, "entries": self._entries, "offset": self._offset},
            "deferred": sorted(self._deferred),
            "shard_bytes": self._shard_bytes,
            "total_bytes": self.total_bytes,
            "names": sorted(self._names),
        }

    @classmethod
    def restore(cls, directory: str | Path, state: dict[str, Any], max_shard_bytes: int) -> ShardWriter:
        """A writer continuing from :meth:`checkpoint`'s ``state``: bytes written after it are cut off, and
        a shard that was finished after it (the next block started a new one) counts as finished."""
        w = cls(directory, max_shard_bytes)
        w._parts = [(w.directory / name, list(names)) for name, names in state["parts"]]
        w._names = set(state["names"])
        w.total_bytes = state["total_bytes"]
        keep = {p.name for p, _ in w._parts}
        opened = state["open"]
        if opened is not None:
            path = w.directory / opened["file"]
            keep.add(path.name)
            with open(path, "rb") as f:
                header_length = struct.unpack("<Q", f.read(8))[0]
            if header_length:  # finished after the checkpoint: complete, with a header of its own
                names, data = _shard_contents(path)
                w._parts.append((path, names))
                w.total_bytes += data
            else:
                w._file = open(path, "r+b")
                w._file.truncate(w.header_reserve + opened["offset"])
                w._file.seek(0, os.SEEK_END)
                w._entries = {k: dict(v) for k, v in opened["entries"].items()}
                w._offset = opened["offset"]
                w._shard_bytes = state["shard_bytes"]
                if state["deferred"]:
                    with safe_open(str(w.directory / DEFERRED_FILE), framework="pt") as handle:
                        w._deferred = {k: handle.get_tensor(k).clone() for k in state["deferred"]}
        for stray in w.directory.glob(".part-*"):  # shards begun after the checkpoint
            if stray.name not in keep:
                stray.unlink()
        return w

    def finish_resumable(self) -> None:
        """Remove the sidecar of deferred tensors (the run is complete)."""
        (self.directory / DEFERRED_FILE).unlink(missing_ok=True)


def _shard_contents(path: Path) -> tuple[list[str], int]:
    """(tensor names, data bytes) of a finished safetensors file, from its header."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    return list(entries), max((v["data_offsets"][1] for v in entries.values()), default=0)


def _rewrite_compact(path: Path, header: bytes, data_start: int, data_bytes: int) -> None:
    """Rewrite ``path`` as header (padded to 8 bytes) + its data, copying the data in chunks."""
    header = header.ljust(-(-(8 + len(header)) // 8) * 8 - 8, b" ")
    tmp = path.with_name(path.name + ".compact")
    with open(path, "rb") as src, open(tmp, "wb") as dst:
        dst.write(struct.pack("<Q", len(header)) + header)
        src.seek(data_start)
        left = data_bytes
        while left:
            chunk = src.read(min(left, 16 << 20))
            if not chunk:
                raise OSError(f"{path}: shard data ended {left} bytes early")
            dst.write(chunk)
            left -= len(chunk)
    os.replace(tmp, path)


class FactorSpill:
    """Per-block tensors parked in ``directory`` (created, and removed by :meth:`close`).

    :meth:`put` writes block ``i``'s tensors (moved to the CPU) to one safetensors file and its
    ``meta`` (JSON-able) beside it; :meth:`take` reads them back (copies, no memory map) and
    :meth:`discard` deletes them, so the disk holds only blocks not yet done. ``resume=True`` reopens a
    spill an interrupted run left.
    """

    def __init__(self, directory: str | Path, *, resume: bool = False):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=resume)
        self._meta: dict[int, Any] = {}
        self.bytes_written = 0
        for f in sorted(self.directory.glob("block-*.json")) if resume else ():
            block = int(f.stem.split("-")[1])
            self._meta[block] = json.loads(f.read_text())
            data = self._path(block)
            self.bytes_written += data.stat().st_size if data.exists() else 0

    def _path(self, block: int) -> Path:
        return self.directory / f"block-{block:05d}.safetensors"

    def put(self, block: int, tensors: Mapping[str, torch.Tensor], meta: Any) -> None:
        if block in self._meta:
            raise ValueError(f"block {block} is already in the spill")
        path = self._path(block)
        if tensors:
            tmp = path.with_name(path.name + ".tmp")
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
            os.replace(tmp, path)
            self.bytes_written += path.stat().st_size
        meta_file = path.with_suffix(".json")
        meta_file.with_name(meta_file.name + ".tmp").write_text(json.dumps(meta))
        os.replace(meta_file.with_name(meta_file.name + ".tmp"), meta_file)
        self._meta[block] = meta

    def __contains__(self, block: int) -> bool:
        return block in self._meta

    def meta(self, block: int) -> Any:
        """Block ``block``'s meta alone (no tensor is read)."""
        return self._meta[block]

    def take(self, block: int) -> tuple[dict[str, torch.Tensor], Any]:
        """Block ``block``'s tensors and meta (kept on disk until :meth:`discard`)."""
        meta = self._meta[block]
        path = self._path(block)
        if not path.exists():
            return {}, meta
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        return tensors, meta

    def discard(self, block: int) -> None:
        """Delete block ``block``'s files (its work is done and checkpointed)."""
        self._meta.pop(block, None)
        self._path(block).unlink(missing_ok=True)
        self._path(block).with_suffix(".json").unlink(missing_ok=True)

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)
        self._meta.clear()
