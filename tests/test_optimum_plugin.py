"""`optimum-cli export onnx … --lord-rank-reduction R`: the real optimum-cli executable on local tiny
models built from configs; outputs run in ONNX Runtime through optimum's ORTModel classes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import lord_export as le
from lord_export.calibration.data import CalibrationOptions, calibration_set
from lord_export.export.onnx import matmul_census
from lord_export.persist.hf import load_dense, load_tokenizer
from tests.helpers import STORIES_MODEL, STORIES_TEXT, make_tokenizer, needs_shared_data, tiny_model

OPTIMUM_CLI = shutil.which("optimum-cli", path=str(Path(sys.executable).parent)) or shutil.which("optimum-cli")
try:
    import optimum.exporters.onnx  # noqa: F401

    HAS_OPTIMUM_ONNX = True
except ImportError:  # e.g. the transformers-5 environment: optimum-onnx needs transformers < 4.58
    HAS_OPTIMUM_ONNX = False
pytestmark = pytest.mark.skipif(
    OPTIMUM_CLI is None or not HAS_OPTIMUM_ONNX,
    reason="optimum-cli / optimum-onnx is not installed in this environment (extra lord_export[optimum], "
    "which needs transformers < 4.58)",
)
PROMPT = torch.tensor([[1, 5, 9, 30, 7]])


def optimum_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([OPTIMUM_CLI, "export", "onnx", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("optimum")
    dirs = {}
    for arch in ("llama", "gpt2", "gpt_bigcode", "bert"):
        d = root / arch
        model = tiny_model(arch)
        make_tokenizer(d)
        model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 0
        model.save_pretrained(d)
        dirs[arch] = d
    return dirs


def python_lord(model_dir: Path, calib: Path, rank_reduction: float, samples: int, seqlen: int):
    """The LoRD PyTorch model the flags describe, built through the Python API."""
    model = load_dense(model_dir)
    options = CalibrationOptions(samples=samples, seqlen=seqlen)  # the CLI's defaults: spread sampling
    plan = le.compress(
        model, calibration_set(load_tokenizer(model_dir), [calib], options).batches(), rank_reduction=rank_reduction
    )
    return model, plan


def test_help_lists_the_lord_flags():
    proc = subprocess.run([OPTIMUM_CLI, "export", "onnx", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    for flag in (
        "--lord-rank-reduction",
        "--lord-calib",
        "--lord-calib-samples",
        "--lord-calib-seqlen",
        "--lord-targets",
        "--lord-method",
        "--lord-plan",
    ):
        assert flag in proc.stdout


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_bigcode"])
def test_causal_lm_with_past_matches_lord_pytorch(arch, models, code_corpus, tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM

    out = tmp_path / "onnx"
    proc = optimum_cli(
        "--model",
        str(models[arch]),
        "--task",
        "text-generation-with-past",
        str(out),
        "--lord-rank-reduction",
        "0.5",
        "--lord-calib",
        str(code_corpus),
        "--lord-calib-samples",
        "8",
        "--lord-calib-seqlen",
        "64",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "lord_config.json").read_text())
    assert record["method"] == "lord" and record["rank_reduction"] == 0.5
    model, plan = python_lord(models[arch], code_corpus, 0.5, 8, 64)
    assert record["params_after"] == plan.report["params_after"] < record["params_before"]
    _, bottlenecks, ups = matmul_census(onnx.load(str(out / "model.onnx")))
    assert bottlenecks == len(plan.factorized_groups)
    assert ups == sum(len(g.members) for g in plan.factorized_groups)
    ort = ORTModelForCausalLM.from_pretrained(out)
    assert ort.use_cache  # optimum's decoder-with-past layout
    got = ort.generate(PROMPT, max_new_tokens=10, do_sample=False, pad_token_id=0)
    want = model.generate(PROMPT, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)


@pytest.mark.slow
def test_lord_options_before_or_after_the_output_directory(models, code_corpus, tmp_path):
    """Every --lord-* option takes one value, so the output directory may come first or last; repeated
    --lord-calib / --lord-targets / --lord-exclude flags add up."""
    extra = code_corpus.parent / "extra-calib.txt"
    extra.write_text("def g(y):\n    return y - 1\n" * 50, encoding="utf-8")
    lord = [
        "--lord-rank-reduction",
        "0.5",
        "--lord-calib",
        str(code_corpus),
        "--lord-calib",
        str(extra),
        "--lord-targets",
        "attention",
        "--lord-targets",
        "mlp",
        "--lord-exclude",
        "model.layers.0.mlp.down_proj",
        "--lord-calib-samples",
        "4",
        "--lord-calib-seqlen",
        "32",
    ]
    base = ["--model", str(models["llama"]), "--task", "text-generation-with-past"]
    records = []
    for name, argv in (
        ("after", [*base, str(tmp_path / "after"), *lord]),
        ("before", [*base, *lord, str(tmp_path / "before")]),
    ):
        proc = optimum_cli(*argv)
        assert proc.returncode == 0, (name, proc.stderr[-3000:])
        assert (tmp_path / name / "model.onnx").is_file()
        records.append(json.loads((tmp_path / name / "lord_config.json").read_text()))
    drop = ("timings", "calibration")
    assert {k: v for k, v in records[0].items() if k not in drop} == {
        k: v for k, v in records[1].items() if k not in drop
    }
    rec = records[0]
    assert rec["targets"] == ["attention", "mlp"] and rec["exclude"] == ["model.layers.0.mlp.down_proj"]
    names = {m["name"] for g in rec["groups"] for m in g["members"]}
    assert "model.layers.0.mlp.down_proj" not in names and "model.layers.1.mlp.down_proj" in names


def test_plan_input_and_bert_feature_extraction(models, code_corpus, tmp_path):
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    model = tiny_model("bert")
    ids = [{"input_ids": torch.randint(3, 300, (4, 32))} for _ in range(2)]
    plan = le.compress(model, ids, rank_reduction=0.6, exclude=("pooler.dense",))  # feature-extraction drops it
    le.save_compressed(model, plan, tmp_path / "plan")
    out = tmp_path / "onnx"
    proc = optimum_cli(
        "--model", str(models["bert"]), "--task", "feature-extraction", str(out), "--lord-plan", str(tmp_path / "plan")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, bottlenecks, _ = matmul_census(onnx.load(str(out / "model.onnx")))
    assert bottlenecks == len(plan.factorized_groups) > 0
    ort = ORTModelForFeatureExtraction.from_pretrained(out)
    x = torch.randint(3, 300, (2, 11))
    got = ort(input_ids=x, attention_mask=torch.ones_like(x), token_type_ids=torch.zeros_like(x)).last_hidden_state
    with torch.no_grad():
        want = model(input_ids=x).last_hidden_state
    assert float((got - want).abs().max() / want.abs().max()) < 1e-4


@pytest.mark.slow
def test_without_the_flag_output_equals_upstream(models, tmp_path):
    args = ["--model", str(models["gpt2"]), "--task", "text-generation-with-past"]
    ours = optimum_cli(*args, str(tmp_path / "ours"))
    assert ours.returncode == 0, ours.stderr[-2000:]
    stub = (
        "import sys, types\n"
        "sys.modules['optimum.commands.register.register_lord_export'] = types.ModuleType('disabled')\n"
        "from optimum.commands.optimum_cli import main\n"
        f"sys.argv = ['optimum-cli', 'export', 'onnx', *{args!r}, {str(tmp_path / 'upstream')!r}]\n"
        "main()\n"
    )
    upstream = subprocess.run([sys.executable, "-c", stub], capture_output=True, text=True, timeout=900)
    assert upstream.returncode == 0, upstream.stderr[-2000:]
    names = sorted(p.name for p in (tmp_path / "ours").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "upstream").iterdir())
    assert "lord_config.json" not in names
    a, b = (onnx.load(str(tmp_path / d / "model.onnx")) for d in ("ours", "upstream"))
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    wa = {i.name: onnx.numpy_helper.to_array(i) for i in a.graph.initializer}
    wb = {i.name: onnx.numpy_helper.to_array(i) for i in b.graph.initializer}
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_bad_input_exits_nonzero_and_leaves_nothing(models, code_corpus, tmp_path):
    base = ["--model", str(models["llama"]), "--task", "text-generation-with-past"]
    gpt2 = tiny_model("gpt2")
    plan = le.compress(gpt2, [torch.randint(3, 300, (2, 16))], rank_reduction=0.5, force=True)
    le.save_compressed(gpt2, plan, tmp_path / "gpt2-plan")
    cases = [
        (["--lord-rank-reduction", "1.5", "--lord-calib", str(code_corpus)], "must be in [0, 1)"),
        (["--lord-rank-reduction", "0.3"], "needs calibration data"),
        (
            ["--lord-param-ratio", "0.8", "--lord-rank-reduction", "0.3", "--lord-calib", str(code_corpus)],
            "not allowed with argument",
        ),
        (["--lord-param-ratio", "1.5", "--lord-calib", str(code_corpus)], "(0, 1]"),
        (["--lord-rank-reduction", "0.3", "--lord-calib", str(tmp_path / "missing")], "does not exist"),
        (["--lord-plan", str(tmp_path / "gpt2-plan")], "does not fit this model"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        proc = optimum_cli(*base, str(out), *extra)
        assert proc.returncode != 0, extra
        assert message in proc.stderr, (extra, proc.stderr[-2000:])
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary leftovers


@needs_shared_data
@pytest.mark.slow
def test_stories260k_perplexity_through_optimum(tmp_path):
    from optimum.onnxruntime import ORTModelForCausalLM

    from lord_export.calibration.data import document_windows
    from lord_export.pipeline.evaluate import perplexity

    docs = [d.strip() for d in STORIES_TEXT.read_text(encoding="utf-8").split("<|endoftext|>") if d.strip()]
    calib = tmp_path / "calib.txt"
    calib.write_text("<|endoftext|>".join(docs[:256]), encoding="utf-8")
    out = tmp_path / "onnx"
    proc = optimum_cli(
        "--model",
        str(STORIES_MODEL),
        "--task",
        "text-generation-with-past",
        str(out),
        "--lord-rank-reduction",
        "0.2",
        "--lord-calib",
        str(calib),
        "--lord-calib-separator",
        "<|endoftext|>",
        "--lord-calib-samples",
        "64",
        "--lord-calib-seqlen",
        "256",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tok = load_tokenizer(STORIES_MODEL)
    model = load_dense(STORIES_MODEL)
    options = CalibrationOptions(samples=64, seqlen=256, separator="<|endoftext|>")
    le.compress(model, calibration_set(tok, [calib], options).batches(), rank_reduction=0.2)
    windows = document_windows(tok, docs[-100:], 512)
    torch_ppl = perplexity(model, windows, batch_size=16)
    ort = ORTModelForCausalLM.from_pretrained(out)
    ort_ppl = perplexity(_Logits(ort), windows, batch_size=16)
    assert ort_ppl.tokens == torch_ppl.tokens
    assert ort_ppl.perplexity == pytest.approx(torch_ppl.perplexity, rel=1e-4)


class _Logits(torch.nn.Module):
    """Adapts an ORTModel to the evaluate.perplexity interface (model(input_ids=…, attention_mask=…).logits)."""

    def __init__(self, ort):
        super().__init__()
        self.ort = ort
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        return self.ort(input_ids=input_ids, attention_mask=attention_mask)
