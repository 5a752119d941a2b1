"""Loading Hugging Face model directories safely: safetensors only, no remote code by default."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import RemoteCodeError, UsageError

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
)

_AUTO_FALLBACKS = ("AutoModelForCausalLM", "AutoModel")


def check_model_dir(path: str | Path) -> Path:
    """Return ``path`` as a Path if it is a model directory (has config.json), else raise UsageError."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"model directory {str(path)!r} does not exist")
    if not p.is_dir():
        raise UsageError(f"{str(path)!r} is a file, not a model directory")
    if not (p / "config.json").is_file():
        raise UsageError(f"{str(path)!r} is not a model directory: it has no config.json")
    return p


def read_config_json(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())


def max_positions(model_dir: str | Path) -> int | None:
    """The model's maximum sequence length from its config.json, when it declares one."""
    cfg = read_config_json(model_dir)
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    return None


def model_class(config: Any, trust_remote_code: bool = False) -> type:
    """The transformers class named by ``config.architectures`` (or a sensible Auto class)."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if getattr(config, "auto_map", None) and not trust_remote_code:
        raise RemoteCodeError("this model needs its own code (auto_map in config.json) and trust_remote_code is off")
    for auto in _AUTO_FALLBACKS:
        try:
            getattr(transformers, auto)._model_mapping[type(config)]
            return getattr(transformers, auto)
        except KeyError:
            continue
    raise UsageError(f"transformers has no model class for architectures {getattr(config, 'architectures', None)}")


def dtype_keyword() -> str:
    """The ``from_pretrained`` keyword for the dtype in the installed transformers."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_dense(
    model_dir: str | Path, *, dtype: torch.dtype | str | None = None, trust_remote_code: bool = False
) -> nn.Module:
    """Load a dense model from a local directory, from safetensors only (never pickle)."""
    from transformers import AutoConfig

    path = check_model_dir(model_dir)
    if not any(path.glob("*.safetensors")):
        raise UsageError(
            f"{str(model_dir)!r} has no *.safetensors weights; lord_export never unpickles .bin/.pt files "
            "(convert them with a tool you trust first)"
        )
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    cls = model_class(config, trust_remote_code)
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code}
    # from_pretrained's keyword is ``dtype`` from transformers 4.56 on, ``torch_dtype`` before
    kwargs[dtype_keyword()] = dtype if dtype is not None else "auto"
    if cls.__name__.startswith("Auto"):
        model = cls.from_pretrained(path, **kwargs)
    else:
        kwargs.pop("trust_remote_code")
        model = cls.from_pretrained(path, **kwargs)
    model.eval()
    return model


def load_tokenizer(model_dir: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer: the fast one when tokenizer.json exists, else the slow (sentencepiece) one."""
    from transformers import AutoTokenizer

    path = Path(model_dir)
    use_fast = (path / "tokenizer.json").is_file()
    try:
        return AutoTokenizer.from_pretrained(path, use_fast=use_fast, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types here; the message is what matters
        raise UsageError(f"could not load a tokenizer from {str(model_dir)!r}: {e}") from e


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's padding id, or 0 for tokenizers without one (padding is always masked out)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else 0


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def checkpoint_dtypes(model_dir: str | Path) -> dict[str, torch.dtype]:
    """{tensor name: dtype} of the directory's safetensors files, read from their headers only."""
    import struct

    out: dict[str, torch.dtype] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name != "__metadata__" and entry.get("dtype") in _SAFETENSORS_DTYPES:
                out[name] = _SAFETENSORS_DTYPES[entry["dtype"]]
    return out


def main_dtype(stored: dict[str, torch.dtype]) -> torch.dtype:
    """The dtype most floating-point tensors of a checkpoint (:func:`checkpoint_dtypes`) are stored in."""
    counts: dict[torch.dtype, int] = {}
    for dt in stored.values():
        if dt.is_floating_point:
            counts[dt] = counts.get(dt, 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


def weights_bytes(model_dir: str | Path) -> int:
    """Bytes of the directory's safetensors weights."""
    return sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
