"""Resumable block-by-block runs: an interrupted run keeps its progress in a hidden partial directory,
``--resume`` continues it and writes exactly the tensors and plan an uninterrupted run writes, and a
resume with another model, setting or calibration set is refused, naming what changed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import lord_export as le
from lord_export.calibration.data import CalibrationOptions
from lord_export.errors import UsageError
from lord_export.persist.checkpoint import CheckpointReader
from lord_export.pipeline import resume as resume_module
from lord_export.pipeline.resume import MANIFEST, partial_dir
from tests.helpers import make_tokenizer

pytestmark = pytest.mark.slow
DATA = CalibrationOptions(samples=4, seqlen=48, batch_size=2)


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    """A 4-block tiny Llama (so a run can stop in the middle of each phase), sharded on disk."""
    import transformers as tf

    from tests.helpers import VOCAB

    d = tmp_path_factory.mktemp("deep")
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    make_tokenizer(d)
    tf.LlamaForCausalLM(config).save_pretrained(d)
    return d


class Stop(Exception):
    """Stands for the machine going away after a checkpoint."""


def interrupted_after(monkeypatch, n: int) -> None:
    """Make the n-th checkpoint of the next run the last: the run stops right after saving it."""
    original = resume_module.Checkpoints.save
    count = {"saves": 0}

    def save(self, *args, **kwargs):
        original(self, *args, **kwargs)
        count["saves"] += 1
        if count["saves"] == n:
            raise Stop(f"stopped after checkpoint {n}")

    monkeypatch.setattr(resume_module.Checkpoints, "save", save)


def compress(src, out, corpus, config, **kwargs):
    return le.compress_model_dir(src, out, [corpus], config, data=DATA, device="cpu", max_shard_bytes=40_000, **kwargs)


def tensors(directory) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(directory)
    return {name: reader.copy(name) for name in reader.keys()}


CASES = {
    "rank-reduction": (le.LordConfig(rank_reduction=0.5), [1, 3]),
    "compensating": (le.LordConfig(rank_reduction=0.5, calibration="compensating"), [2]),
    # checkpoints: Fisher forward 1-4, backward 5-8, Fisher done 9, survey 10-13, survey done 14, write 15-18
    "ratio-fisher": (le.LordConfig(param_ratio=0.85), [2, 6, 9, 11, 14, 16]),
    "ratio-compensating": (le.LordConfig(param_ratio=0.85, calibration="compensating", refine="none"), [3, 12, 17]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_resumed_run_writes_what_an_uninterrupted_run_writes(case, deep_dir, code_corpus, tmp_path, monkeypatch):
    config, stops = CASES[case]
    whole = tmp_path / "whole"
    report = compress(deep_dir, whole, code_corpus, config)
    assert not report["resumed"]
    want, plan = tensors(whole), json.loads((whole / "lord_plan.json").read_text())
    for n in stops:
        out = tmp_path / f"resumed-{n}"
        with monkeypatch.context() as m:
            interrupted_after(m, n)
            with pytest.raises(Stop):
                compress(deep_dir, out, code_corpus, config)
        assert not out.exists() and (partial_dir(out) / MANIFEST).is_file()  # nothing that looks finished
        with pytest.raises(UsageError, match="--resume"):
            compress(deep_dir, out, code_corpus, config)  # a fresh run does not silently discard the progress
        report = compress(deep_dir, out, code_corpus, config, resume=True)
        assert report["resumed"] and not partial_dir(out).exists()
        got = tensors(out)
        assert got.keys() == want.keys(), n
        for name, t in want.items():
            assert torch.equal(got[name], t), (n, name)
        resumed_plan = json.loads((out / "lord_plan.json").read_text())
        assert resumed_plan == plan, n
        assert not [f for f in out.iterdir() if f.name.startswith(".") or "ckpt" in f.name or f.name == MANIFEST]


def test_a_resume_with_anything_changed_is_refused(deep_dir, code_corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    config = le.LordConfig(rank_reduction=0.5)
    with monkeypatch.context() as m:
        interrupted_after(m, 2)
        with pytest.raises(Stop):
            compress(deep_dir, out, code_corpus, config)
    with pytest.raises(UsageError, match="the setting rank_reduction changed: 0.5 -> 0.4"):
        compress(deep_dir, out, code_corpus, config.replace(rank_reduction=0.4), resume=True)
    with pytest.raises(UsageError, match="calibration data changed"):
        le.compress_model_dir(
            deep_dir, out, [code_corpus], config, data=CalibrationOptions(samples=3, seqlen=48, batch_size=2),
            device="cpu", max_shard_bytes=40_000, resume=True,
        )  # fmt: skip
    changed = tmp_path / "changed-model"
    shutil.copytree(deep_dir, changed)
    state = {k: v for k, v in tensors(changed).items()}
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"] * 1.01
    from safetensors.torch import save_file

    for f in changed.glob("*.safetensors"):
        f.unlink()
    save_file(state, str(changed / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UsageError, match="the model changed"):
        compress(changed, out, code_corpus, config, resume=True)
    report = compress(deep_dir, out, code_corpus, config, resume=True)  # the same run again: resumes
    assert report["resumed"]


def test_resume_without_a_partial_run_starts_from_the_beginning(deep_dir, code_corpus, tmp_path):
    report = compress(deep_dir, tmp_path / "out", code_corpus, le.LordConfig(rank_reduction=0.5), resume=True)
    assert not report["resumed"] and (tmp_path / "out" / "lord_plan.json").is_file()


def test_the_cli_says_how_to_resume(deep_dir, code_corpus, tmp_path, monkeypatch, capsys):
    from lord_export.cli import main

    out = tmp_path / "out"
    args = ["compress", str(deep_dir), str(out), "--calib", str(code_corpus), "--rank-reduction", "0.5"]
    args += ["--calib-samples", "4", "--calib-seqlen", "48", "--batch-size", "2", "-q"]
    with monkeypatch.context() as m:
        interrupted_after(m, 1)
        assert main(args) == 4  # Stop is not a lord_export error: internal
    err = capsys.readouterr().err
    assert "--resume to continue" in err and str(partial_dir(out)) in err
    assert main([*args, "--resume"]) == 0 and (out / "lord_plan.json").is_file()
