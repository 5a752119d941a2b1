"""Resumable block-by-block runs: a manifest and checkpoints in the run's partial output directory.

A run that compresses a model directory block by block writes into ``.<OUTPUT>.lord-partial`` beside
``OUTPUT`` and moves it into place only when everything is written. Between blocks it checkpoints
what it needs to continue (:class:`Checkpoints`): the shard writer's state, the calibration
activations entering the next block, the groups made so far, the survey's spectra, kept factors and
sensitivity passes. When the run stops (interrupted, a crash, the machine gone), the partial
directory stays; ``lord-export compress … --resume`` continues after the last finished block and
writes the same tensors an uninterrupted run writes.

A partial run belongs to one model, one setting and one calibration set: the manifest records a
fingerprint of each (:func:`run_key`), and a resume with anything changed is refused, naming what.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .._version import __version__
from ..errors import UsageError

MANIFEST = "lord_resume.json"
FORMAT = "lord_export.resume"
VERSION = 1
_SAMPLES = 32  # chunks read from each weight file for its content fingerprint
_SAMPLE_BYTES = 1 << 16


def partial_dir(output: str | Path) -> Path:
    """Where a run writing ``output`` keeps its partial output: ``.<name>.lord-partial`` beside it."""
    out = Path(output)
    return out.absolute().parent / f".{out.name}.lord-partial"


def file_fingerprint(path: Path) -> dict[str, Any]:
    """Size, the safetensors header's hash, and the hash of evenly spaced chunks of the data: cheap
    (a few MB read), and changed by any realistic change of the weights (a fine-tune moves them all)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(min(n, size))
        for k in range(_SAMPLES):
            f.seek(8 + n + (size - 8 - n) * k // _SAMPLES)
            digest.update(f.read(_SAMPLE_BYTES))
    return {"size": size, "header": hashlib.sha256(header).hexdigest(), "data": digest.hexdigest()}


def model_fingerprint(model_dir: str | Path) -> dict[str, Any]:
    """config.json's hash and :func:`file_fingerprint` of every safetensors file of ``model_dir``."""
    d = Path(model_dir)
    files = {f.name: file_fingerprint(f) for f in sorted(d.glob("*.safetensors"))}
    return {"config": hashlib.sha256((d / "config.json").read_bytes()).hexdigest(), "files": files}


def tensors_fingerprint(*tensors: torch.Tensor) -> str:
    """The sha256 of the tensors' bytes (the calibration set's token ids and mask)."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_key(model_dir: str | Path, settings: dict[str, Any], data: str) -> dict[str, Any]:
    """What a partial run belongs to: the model, the settings that shape its output, and the data."""
    return {
        "model": model_fingerprint(model_dir),
        "settings": json.loads(json.dumps(settings, default=str)),
        "data": data,
        "lord_export_version": __version__,
    }


def key_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What changed between two :func:`run_key` values, in words."""
    out = []
    if old.get("lord_export_version") != new.get("lord_export_version"):
        out.append(f"lord_export {old.get('lord_export_version')} -> {new.get('lord_export_version')}")
    if old.get("model") != new.get("model"):
        files_old, files_new = old.get("model", {}).get("files", {}), new["model"]["files"]
        changed = sorted(set(files_old) ^ set(files_new) | {f for f in files_new if files_old.get(f) != files_new[f]})
        what = f"the weight files {changed[:3]}" if changed else "its config.json"
        out.append(f"the model changed ({what})")
    settings_old, settings_new = old.get("settings", {}), new["settings"]
    for k in sorted(set(settings_old) | set(settings_new)):
        if settings_old.get(k) != settings_new.get(k):
            out.append(f"the setting {k} changed: {settings_old.get(k)!r} -> {settings_new.get(k)!r}")
    if old.get("data") != new.get("data"):
        out.append("the calibration data changed (other files, samples, sequence length or tokenizer)")
    return out


class Checkpoints:
    """The manifest of one run in ``directory`` and the tensor files its checkpoints keep.

    ``state`` is what the last checkpoint saved (empty for a fresh run). :meth:`save` writes the tensor
    files first and the manifest last (each through a temporary file and an atomic rename), so a
    manifest never points at a checkpoint that is not complete.
    """

    def __init__(self, directory: str | Path, key: dict[str, Any], *, resume: bool):
        self.directory = Path(directory)
        self.key = key
        self.state: dict[str, Any] = {}
        manifest = self.directory / MANIFEST
        if resume and manifest.is_file():
            saved = json.loads(manifest.read_text())
            if saved.get("format") != FORMAT or saved.get("version") != VERSION:
                raise UsageError(
                    f"{self.directory} holds a partial run of another lord_export; delete it to start over"
                )
            changed = key_differences(saved["key"], key)
            if changed:
                raise UsageError(
                    f"the partial run in {self.directory} cannot be resumed: {'; '.join(changed)}; run again with the "
                    "same model, settings and data, or delete it to start over"
                )
            self.state = saved["state"]
        else:
            self._write_manifest()
        #: whether this run continues an interrupted one
        self.resumed = bool(self.state)

    def save(self, tensors: dict[str, dict[str, torch.Tensor]] | None = None, **state: Any) -> None:
        """Checkpoint: ``tensors`` ({file stem: tensors}) to their files, then ``state`` (merged into the
        saved state) to the manifest."""
        for stem, group in (tensors or {}).items():
            self.save_tensors(stem, group)
        self.state.update(json.loads(json.dumps(state, default=_json_default)))
        self._write_manifest()

    def save_tensors(self, stem: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.directory / f"{stem}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)

    def load_tensors(self, stem: str) -> dict[str, torch.Tensor]:
        with safe_open(str(self.directory / f"{stem}.safetensors"), framework="pt") as f:
            return {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)

    def drop_tensors(self, stem: str) -> None:
        (self.directory / f"{stem}.safetensors").unlink(missing_ok=True)

    def _write_manifest(self) -> None:
        manifest = self.directory / MANIFEST
        tmp = manifest.with_name(manifest.name + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "version": VERSION, "key": self.key, "state": self.state}))
        os.replace(tmp, manifest)

    def clear(self) -> None:
        """Remove everything in the directory but the manifest (a fresh start)."""
        for f in self.directory.iterdir():
            if f.name == MANIFEST:
                continue
            shutil.rmtree(f) if f.is_dir() else f.unlink()

    def finish(self) -> None:
        """The run is complete: remove the manifest and every checkpoint file from the output."""
        for f in self.directory.glob("ckpt-*.safetensors*"):
            f.unlink()
        (self.directory / MANIFEST).unlink(missing_ok=True)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"cannot store {type(obj).__name__} in a resume manifest")


@contextmanager
def resumable_output_dir(path: str | Path, *, overwrite: bool | str, resume: bool) -> Iterator[Path]:
    """The partial directory of ``path`` (:func:`partial_dir`), moved to ``path`` when the block ends
    without an error. On an error the partial directory STAYS, for ``--resume``; ``path`` is untouched.

    Without ``resume`` an existing partial directory is refused (it may hold hours of work)."""
    from ..persist.io import check_output, replace_dir

    dest = Path(path)
    check_output(dest, overwrite)
    partial = partial_dir(dest)
    if partial.exists() and not resume:
        raise UsageError(
            f"an interrupted run left its partial output in {partial}; continue it with --resume (same model, "
            "settings and data), or delete it to start over"
        )
    partial.mkdir(exist_ok=True)
    yield partial
    replace_dir(partial, dest)


def discard(path: str | Path) -> None:
    """Remove the partial directory of ``path`` (a run that cannot be resumed, e.g. bad input found late)."""
    shutil.rmtree(partial_dir(path), ignore_errors=True)
