"""Which text becomes calibration blocks: spread over all the files (default) or their first tokens."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from lord_export.calibration.data import (
    CalibrationOptions,
    calibration_set,
    files_to_read,
    read_documents,
    spread_order,
    tokenize_blocks,
)
from lord_export.errors import UsageError
from lord_export.measure.reference import reference_model_dir
from lord_export.persist.hf import load_tokenizer
from tests.cli_runner import run_cli

ID = re.compile(r"L(\d\d)(\d{4});")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(reference_model_dir())


@pytest.fixture
def corpus(tmp_path):
    """Eight files of uniquely numbered lines: every complete ``L<file><line>;`` names where it came from."""
    for f in range(8):
        lines = [f"x = 'L{f:02d}{i:04d};'" for i in range(300)]
        (tmp_path / f"f{f}.py").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path


def ids_in(tokenizer, blocks: torch.Tensor) -> set[tuple[int, int]]:
    text = " ".join(tokenizer.decode(row, skip_special_tokens=True).replace(" ", "") for row in blocks)
    return {(int(f), int(i)) for f, i in ID.findall(text)}


def test_spread_blocks_come_from_every_file_and_sequential_from_the_first(tokenizer, corpus):
    spread = calibration_set(tokenizer, [corpus], CalibrationOptions(samples=8, seqlen=64))
    first = calibration_set(tokenizer, [corpus], CalibrationOptions(samples=8, seqlen=64, sampling="sequential"))
    assert spread.input_ids.shape == first.input_ids.shape == (8, 64)
    assert spread.tokens == first.tokens == 8 * 64
    assert {f for f, _ in ids_in(tokenizer, spread.input_ids)} == set(range(8))
    assert {f for f, _ in ids_in(tokenizer, first.input_ids)} == {0}
    assert spread.describe()["sampling"] == "spread" and first.describe()["sampling"] == "sequential"


def test_fine_tune_blocks_hold_other_text_and_leave_the_calibration_blocks_unchanged(tokenizer, corpus):
    for sampling in ("spread", "sequential"):
        options = CalibrationOptions(samples=8, seqlen=64, sampling=sampling)
        alone = calibration_set(tokenizer, [corpus], options)
        both = calibration_set(tokenizer, [corpus], options, fresh_samples=6)
        assert alone.finetune is None
        assert torch.equal(alone.input_ids, both.input_ids)
        assert both.finetune.input_ids.shape == (6, 64)
        assert not ids_in(tokenizer, both.input_ids) & ids_in(tokenizer, both.finetune.input_ids)


def test_data_smaller_than_asked_gives_every_token_either_way(tokenizer, corpus, caplog):
    files = [corpus / "f0.py", corpus / "f1.py"]
    with caplog.at_level(logging.WARNING):
        spread = calibration_set(tokenizer, files, CalibrationOptions(samples=500, seqlen=64))
    assert "fewer than the" in caplog.text
    sequential = tokenize_blocks(tokenizer, read_documents(files), samples=500, seqlen=64)
    assert torch.equal(spread.input_ids, sequential[0]) and torch.equal(spread.attention_mask, sequential[1])
    options = CalibrationOptions(samples=500, seqlen=64)
    assert calibration_set(tokenizer, files, options, fresh_samples=4).finetune is None


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    """A BERT-style fast tokenizer (WordPiece, [CLS] text [SEP]) saved and loaded like a model's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    text = [f"x = 'L{f:02d}{i:04d};'" for f in range(8) for i in range(300)]
    tok.train_from_iterator(text, trainers.WordPieceTrainer(vocab_size=400, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    d = tmp_path_factory.mktemp("bert-tokenizer")
    kw = dict(unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]")
    PreTrainedTokenizerFast(tokenizer_object=tok, **kw).save_pretrained(d)
    return AutoTokenizer.from_pretrained(d), cls, sep


def test_encoder_sequences_are_spread_over_the_documents(bert_tokenizer, corpus):
    tokenizer, cls, sep = bert_tokenizer
    options = CalibrationOptions(samples=8, seqlen=64, packing=False)
    spread = calibration_set(tokenizer, [corpus], options, fresh_samples=4)
    assert spread.input_ids.shape == (8, 64) and spread.finetune.input_ids.shape == (4, 64)
    for row, mask in zip(spread.input_ids, spread.attention_mask, strict=True):  # [CLS] … [SEP] per sequence
        n = int(mask.sum())
        assert row[0] == cls and row[n - 1] == sep and sep not in row[1 : n - 1]
    assert {f for f, _ in ids_in(tokenizer, spread.input_ids)} == set(range(8))
    assert not ids_in(tokenizer, spread.input_ids) & ids_in(tokenizer, spread.finetune.input_ids)


def test_spread_order_and_the_read_budget(tmp_path):
    for n in (1, 2, 7, 64, 100):
        order = list(spread_order(n))
        assert sorted(order) == list(range(n))
        # every prefix of length k leaves no gap wider than about n / k
        k = max(1, n // 4)
        prefix = sorted(order[:k])
        assert max(b - a for a, b in zip([0, *prefix], [*prefix, n], strict=True)) <= 2 * n / k + 1
    files = []
    for i in range(100):
        files.append(tmp_path / f"{i:03d}.txt")
        files[-1].write_text("a" * 100)
    assert files_to_read(files, 10_000) == files
    chosen = files_to_read(files, 1_000)
    assert len(chosen) == 10 and chosen == sorted(chosen)
    picked = [files.index(f) for f in chosen]
    assert max(b - a for a, b in zip(picked[:-1], picked[1:], strict=True)) <= 16
    assert picked[0] == 0 and picked[-1] >= 80


def test_unknown_sampling_is_a_clear_error():
    with pytest.raises(UsageError, match="sampling must be one of spread, sequential"):
        CalibrationOptions(sampling="random")


def test_cli_sampling_choice_and_a_bad_one(tiny_llama_dir, code_corpus, tmp_path):
    args = ["--calib", str(code_corpus), "--rank-reduction", "0.5", "--calib-samples", "4", "--calib-seqlen", "32"]
    bad = run_cli("compress", str(tiny_llama_dir), str(tmp_path / "bad"), *args, "--calib-sampling", "random")
    assert bad.returncode == 2 and "--calib-sampling" in bad.stderr and "invalid choice" in bad.stderr
    assert not (tmp_path / "bad").exists()
    out = tmp_path / "sequential"
    proc = run_cli("compress", str(tiny_llama_dir), str(out), *args, "--calib-sampling", "sequential", "-q")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "report.json").read_text())["calibration"]["sampling"] == "sequential"
