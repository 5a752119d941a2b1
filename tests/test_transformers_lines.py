"""The real stories260K model end to end on whichever transformers line this environment has
(`scripts/test.sh` runs the suite on 4.57 and on the newest 5.x): compress a model directory, load
it back with lord_export.load and with transformers' own AutoModelForCausalLM.from_pretrained,
generate, and compile the dense model with the `lord` torch.compile backend."""

from __future__ import annotations

import pytest
import torch
import transformers

import lord_export as le
from lord_export.calibration.data import CalibrationOptions
from lord_export.config import LordConfig
from lord_export.export.dynamo import make_backend
from lord_export.persist.hf import load_dense, load_tokenizer
from tests.helpers import STORIES_MODEL, STORIES_TEXT, needs_shared_data

pytestmark = needs_shared_data


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def stories_lord(tmp_path_factory):
    root = tmp_path_factory.mktemp("tf-lines")
    calib = root / "calib.txt"
    calib.write_text(STORIES_TEXT.read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    report = le.compress_model_dir(
        STORIES_MODEL,
        root / "lord",
        [calib],
        LordConfig(rank_reduction=0.3),
        data=CalibrationOptions(samples=16, seqlen=128, separator="<|endoftext|>"),
    )
    assert report["params_after"] < report["params_before"]
    return root / "lord"


def test_load_generate_and_from_pretrained(stories_lord):
    tok = load_tokenizer(stories_lord)
    ids = tok("Once upon a time", return_tensors="pt")["input_ids"]
    ours = le.load(stories_lord)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(stories_lord).eval()
    assert any(type(m).__name__ == "LordLinear" for m in theirs.modules())
    with torch.no_grad():
        assert rel(theirs(input_ids=ids).logits, ours(input_ids=ids).logits) < 1e-5
        out = theirs.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
        again = ours.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    assert torch.equal(out, again) and out.shape[1] == ids.shape[1] + 12
    assert tok.decode(out[0, ids.shape[1] :]).strip()  # real text from a real model


def test_compile_dense_with_the_lord_backend(stories_lord):
    dense = load_dense(STORIES_MODEL)
    dense.config.use_cache = False
    lord = le.load(stories_lord)
    ids = torch.randint(3, 500, (2, 24))
    torch._dynamo.reset()
    if "lord" in torch._dynamo.list_backends():  # registered by the entry point of an installed lord_export
        compiled = torch.compile(dense, backend="lord", options={"plan": str(stories_lord), "backend": "eager"})
    else:  # a source checkout that is not installed (scripts/test.sh installs it)
        compiled = torch.compile(dense, backend=make_backend(plan=str(stories_lord), backend="eager"))
    with torch.no_grad():
        got = compiled(input_ids=ids).logits
        want = lord(input_ids=ids, use_cache=False).logits
    assert rel(got, want) < 1e-4
