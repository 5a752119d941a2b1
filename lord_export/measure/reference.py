"""The reference code model that ships with lord_export, and the data split it was trained with.

The model (``lord_export/assets/reference-code-llama``) is a small Llama-architecture code LM
trained by ``examples/train_reference_model.py`` on the Python standard library sources of the
interpreter, with its own byte-level BPE tokenizer. Files are assigned to splits by a hash of their
path relative to the standard library root, so the split is the same on every machine and no file
is in two splits: buckets 0–89 train, 90–94 calibration, 95–99 evaluation (of 100).
"""

from __future__ import annotations

import hashlib
import json
import re
import sysconfig
from pathlib import Path

from ..errors import LordError

SPLITS = {"train": range(0, 90), "calib": range(90, 95), "eval": range(95, 100)}
REFERENCE_MODEL = "reference-code-llama"
SEPARATOR_TOKEN = "<|endoftext|>"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relative: Path | str) -> str:
    """The split ("train", "calib" or "eval") of a file, from its path relative to the stdlib root."""
    digest = hashlib.sha256(Path(relative).as_posix().encode()).hexdigest()
    bucket = int(digest[:8], 16) % 100
    return next(name for name, buckets in SPLITS.items() if bucket in buckets)


def stdlib_sources(root: Path | None = None) -> list[Path]:
    """All ``.py`` files of the standard library (installed third-party packages excluded), sorted."""
    root = root or stdlib_root()
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts) and p.is_file())


def stdlib_split(split: str, root: Path | None = None) -> list[Path]:
    """The standard-library source files of one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = root or stdlib_root()
    return [p for p in stdlib_sources(root) if split_of(p.relative_to(root)) == split]


def split_texts(split: str, root: Path | None = None) -> list[Path]:
    """The files of a split that hold text: ``stdlib_split`` without the empty ones (``__init__.py``)."""
    return [p for p in stdlib_split(split, root) if p.stat().st_size > 0]


def trained_python() -> str | None:
    """The Python version whose standard library the shipped reference model was trained on."""
    record = reference_model_dir() / "training_log.json"
    match = re.search(r"Python (\d+\.\d+)", json.loads(record.read_text())["data"]["source"])
    return match.group(1) if match else None


def reference_model_dir() -> Path:
    """The directory of the shipped reference model; a clear error if the package was built without it."""
    path = Path(__file__).parent.parent / "assets" / REFERENCE_MODEL
    if not (path / "model.safetensors").is_file():
        raise LordError(
            f"the reference model is missing from {path}; reinstall lord_export from a full checkout "
            "or train it with examples/train_reference_model.py"
        )
    return path
