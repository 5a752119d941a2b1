"""transformers' from_pretrained / AutoModel / pipeline load LoRD directories (lord_export.integrations.transformers).

Real parts only: tiny models built from configs, compressed with lord_export, loaded both ways.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lord_export
from lord_export.core.modules import LordBottleneck, LordLinear
from lord_export.core.plan import QUANT_METHOD
from lord_export.persist.io import plan_from_model_dir
from tests.helpers import ROOT, correlated_batches, tiny_model

transformers = pytest.importorskip("transformers")
from transformers import AutoModel, AutoModelForCausalLM, pipeline  # noqa: E402

TOL = 1e-6


def _compress_and_save(model, directory: Path, source_dir: Path | None = None) -> Path:
    plan = lord_export.compress(model, correlated_batches(), rank_reduction=0.5)
    lord_export.save_compressed(model, plan, directory, source_dir=source_dir, report=plan.report)
    return directory


def _n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _max_diff(a, b, **inputs) -> float:
    with torch.no_grad():
        out_a, out_b = a(**inputs), b(**inputs)
    key = "logits" if hasattr(out_a, "logits") else "last_hidden_state"
    return float((getattr(out_a, key) - getattr(out_b, key)).abs().max())


def _lord_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LordLinear)]


@pytest.fixture(scope="module")
def llama_lord(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, list[str]]:
    """(LoRD directory with tokenizer, parameter count of the compressed model, its LordLinear names)."""
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    out = tmp_path_factory.mktemp("lord-llama") / "lord"
    _compress_and_save(dense, out, source_dir=tiny_llama_dir)
    return out, _n_params(dense), _lord_layers(dense)


def _ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(3, 300, (batch, seq), generator=torch.Generator().manual_seed(5))


def test_config_json_carries_the_plan_structure(llama_lord):
    d, _, names = llama_lord
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == QUANT_METHOD and qc["format_version"] == 1
    plan = plan_from_model_dir(d)
    on_disk = lord_export.read_plan(d, with_tensors=False)
    assert [g.name for g in plan.groups] == [g.name for g in on_disk.factorized_groups]
    assert [g.rank for g in plan.groups] == [g.rank for g in on_disk.factorized_groups]
    assert sorted(m.name for g in plan.groups for m in g.members) == sorted(names)


def test_from_pretrained_equals_lord_load(llama_lord):
    d, n_params, names = llama_lord
    ref = lord_export.load(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert _lord_layers(model) == names and len(names) == 12  # 2 x (q,k,v,gate,up,down); square o_proj at parity
    assert any(isinstance(m, LordBottleneck) for m in model.modules())
    assert not any(p.is_meta for p in model.parameters())
    assert _n_params(model) == n_params == _n_params(ref)
    ids = _ids()
    assert _max_diff(model, ref, input_ids=ids, attention_mask=torch.ones_like(ids)) <= TOL
    assert model.lm_head.weight is model.model.embed_tokens.weight or not model.config.tie_word_embeddings


def test_generate_and_dtype_casts(llama_lord):
    d, _, _ = llama_lord
    ref = lord_export.load(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    ids = _ids(1, 6)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = model.generate(ids, **kwargs)
    assert out.shape == (1, 14)
    assert torch.equal(out, ref.generate(ids, **kwargs))
    assert not model.is_quantized  # LoRD weights are plain floats: .half()/.float()/Trainer must work
    model.half().float()


def test_pipeline_text_generation(llama_lord):
    d, _, _ = llama_lord
    pipe = pipeline("text-generation", model=str(d), device="cpu")
    assert isinstance(pipe.model.model.layers[0].self_attn.q_proj, LordLinear)
    out = pipe("def f1(x):", max_new_tokens=5, do_sample=False)
    assert isinstance(out[0]["generated_text"], str) and out[0]["generated_text"].startswith("def f1(x):")


@pytest.mark.parametrize("first_loader", ["from_pretrained", "lord_load"])
def test_save_pretrained_round_trips_through_both_loaders(llama_lord, tmp_path, first_loader):
    d, n_params, names = llama_lord
    ref = lord_export.load(d)
    first = AutoModelForCausalLM.from_pretrained(d) if first_loader == "from_pretrained" else lord_export.load(d)
    first.save_pretrained(tmp_path)
    assert not (tmp_path / "lord_plan.json").exists()  # save_pretrained writes only config + weights
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == QUANT_METHOD
    ids = _ids()
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path), lord_export.load(tmp_path)):
        assert _lord_layers(loaded) == names
        assert _n_params(loaded) == n_params
        assert _max_diff(loaded, ref, input_ids=ids) <= TOL


def test_bert_through_automodel(tmp_path):
    model = tiny_model("bert")
    _compress_and_save(model, tmp_path / "bert")
    names = _lord_layers(model)
    assert names
    ref = lord_export.load(tmp_path / "bert")
    loaded = AutoModel.from_pretrained(tmp_path / "bert")
    assert _lord_layers(loaded) == names and _n_params(loaded) == _n_params(model)
    ids = _ids()
    assert _max_diff(loaded, ref, input_ids=ids, attention_mask=torch.ones_like(ids)) <= TOL


def test_gpt2_conv1d(tmp_path):
    model = tiny_model("gpt2")
    _compress_and_save(model, tmp_path / "gpt2")
    qc = json.loads((tmp_path / "gpt2" / "config.json").read_text())["quantization_config"]
    assert any(m["transposed"] for g in qc["groups"] for m in g["members"])  # Conv1D layers were factorized
    ref = lord_export.load(tmp_path / "gpt2")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    assert _lord_layers(loaded) == _lord_layers(model) and _n_params(loaded) == _n_params(model)
    assert _max_diff(loaded, ref, input_ids=_ids()) <= TOL
    assert loaded.generate(_ids(1, 4), max_new_tokens=4, do_sample=False, pad_token_id=0).shape == (1, 8)


def test_register_is_idempotent_and_config_pickles(llama_lord):
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    from lord_export.integrations import transformers as hf_quantizer

    hf_quantizer.register()
    hf_quantizer.register()
    assert AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is hf_quantizer.LordHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is hf_quantizer.LordQuantizationConfig
    model = AutoModelForCausalLM.from_pretrained(llama_lord[0])
    qc = model.config.quantization_config
    assert isinstance(qc, hf_quantizer.LordQuantizationConfig)
    again = pickle.loads(pickle.dumps(qc))
    assert again.to_dict() == qc.to_dict()


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_registration_independent_of_import_order(llama_lord):
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"  # transformers' registry first, lord_export second
        "import lord_export\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(llama_lord[0])!r})\n"
        "assert type(m.model.layers[0].mlp.down_proj).__name__ == 'LordLinear'\n"
    )
    r = _run(code)
    assert r.returncode == 0, r.stderr[-2000:]


def test_without_lord_export_loading_fails_loudly(llama_lord):
    """Without ``import lord_export`` transformers skips the unknown quant_method (a warning) and then
    fails on the factor shapes; it never returns a silently re-initialized dense model."""
    code = (
        f"from transformers import AutoModelForCausalLM\nAutoModelForCausalLM.from_pretrained({str(llama_lord[0])!r})\n"
    )
    r = _run(code)
    assert r.returncode != 0
    assert "Unknown quantization type, got lord_export" in r.stderr  # names the package to install


def test_directories_of_lord_export_0_2_still_load(llama_lord, tmp_path):
    """Directories written before the method was named after the package say ``quant_method: "lord"``:
    transformers and lord_export.load read them as before, and saving writes the current name."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(llama_lord[0], old)
    config = json.loads((old / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "lord"
    (old / "config.json").write_text(json.dumps(config))
    ids = _ids()
    want = lord_export.load(llama_lord[0])(ids).logits
    for loaded in (AutoModelForCausalLM.from_pretrained(old), lord_export.load(old)):
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)
    AutoModelForCausalLM.from_pretrained(old).save_pretrained(tmp_path / "resaved")
    qc = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == QUANT_METHOD == "lord_export"


def test_save_pretrained_after_an_in_memory_compress_loads_back(tmp_path):
    """``le.compress(model, ...)`` then ``model.save_pretrained(d)``: the directory carries the LoRD
    quantization_config, so transformers and lord_export.load both read it back."""
    model = tiny_model("llama")
    lord_export.compress(model, correlated_batches(), rank_reduction=0.5)
    model.save_pretrained(tmp_path / "saved")
    qc = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == QUANT_METHOD and qc["groups"]
    ids = torch.tensor([[5, 17, 42, 9]])
    want = model(ids).logits
    for loaded in (AutoModelForCausalLM.from_pretrained(tmp_path / "saved"), lord_export.load(tmp_path / "saved")):
        torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=0)
