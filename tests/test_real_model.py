"""LoRD on real trained weights: stories260K (../shared/data), calibrated on the first 256 stories.

Measured on 2026-11-23 (CPU, this test's settings: rank reduction 0.2, all targets, calibration =
first 256 stories of tinystories_2MiB.txt in 256-token blocks, evaluation = last 1,000 stories,
512-token windows): perplexity dense 4.396, lord 5.954, asvd 8.242, svd 8.836. LoRD's increase
over dense is about a third of SVD's; the assertion allows up to 60%.
"""

from __future__ import annotations

import pytest

import lord_export as le
from lord_export.calibration.data import batches, document_windows, tokenize_blocks
from lord_export.persist.hf import load_dense, load_tokenizer
from lord_export.pipeline.evaluate import perplexity
from tests.helpers import STORIES_MODEL, STORIES_TEXT, needs_shared_data

pytestmark = [needs_shared_data, pytest.mark.slow]


@pytest.fixture(scope="module")
def stories():
    text = STORIES_TEXT.read_text(encoding="utf-8").split("<|endoftext|>")
    docs = [d.strip() for d in text if d.strip()]
    tok = load_tokenizer(STORIES_MODEL)
    ids, mask = tokenize_blocks(tok, docs[:256], samples=10_000, seqlen=256)
    windows = document_windows(tok, docs[-1000:], 512)
    return batches(ids, mask, 16), windows


def compressed_perplexity(method, calib, windows):
    model = load_dense(STORIES_MODEL)
    plan = le.compress(model, calib, method=method, rank_reduction=0.2)
    return perplexity(model, windows, batch_size=32).perplexity, plan


def test_lord_perplexity_far_closer_to_dense_than_svd(stories):
    calib, windows = stories
    dense = perplexity(load_dense(STORIES_MODEL), windows, batch_size=32).perplexity
    assert dense == pytest.approx(4.40, abs=0.05)  # the model card says about 4.36 with its windowing
    lord, lord_plan = compressed_perplexity("lord", calib, windows)
    svd, svd_plan = compressed_perplexity("svd", calib, windows)
    assert dense < lord < svd
    assert lord - dense < 0.6 * (svd - dense)
    for lg, sg in zip(lord_plan.factorized_groups, svd_plan.factorized_groups, strict=True):
        assert lg.name == sg.name and lg.rank == sg.rank
        assert lg.relative_error <= sg.relative_error + 1e-6
        assert lg.relative_error == pytest.approx(lg.optimal_relative_error, rel=1e-3)  # float32 factors
    assert lord_plan.report["params_after"] < lord_plan.report["params_before"]
