"""Fixtures shared by the tests (the tiny models and data themselves are in ``tests/helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_tokenizer, tiny_model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny Llama model directory with its own tokenizer (safetensors)."""
    d = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model("llama")
    make_tokenizer(d)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 0
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def code_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of real Python source (a slice of the standard library) for calibration."""
    import sysconfig

    d = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("json/encoder.py", "json/decoder.py", "textwrap.py", "colorsys.py"):
        src = stdlib / name
        (d / name.replace("/", "_")).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """A saved tiny model directory (with a tokenizer) per architecture of tests/helpers.py, made once."""
    made = {}

    def get(arch: str):
        if arch not in made:
            d = tmp_path_factory.mktemp(f"dir-{arch}")
            model = tiny_model(arch)
            make_tokenizer(d)
            model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 0
            model.save_pretrained(d)
            made[arch] = d
        return made[arch]

    return get
