"""The block-by-block engine: block discovery, equality with whole-model calibration, the
sequential/compensating math, sharded output, bf16, devices and bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from cli_runner import CLI, run_cli
from torch import nn

import lord_export as le
from lord_export.calibration.blocks import find_blocks
from lord_export.calibration.data import CalibrationOptions
from lord_export.calibration.statistics import InputStats, calibrate, exact_matmuls
from lord_export.core import factorize as fz
from lord_export.core.targets import select_targets
from lord_export.errors import UsageError
from lord_export.persist.checkpoint import INDEX_FILE, CheckpointReader, ShardWriter
from lord_export.pipeline.planner import make_plan
from tests.helpers import ARCHS, STORIES_MODEL, STORIES_TEXT, correlated_batches, needs_shared_data, tiny_model

BLOCK_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma2": "model.layers",
    "gemma3": "model.layers",
    "mistral_sliding": "model.layers",
    "phi3": "model.layers",
    "gpt2": "transformer.h",
    "gpt_bigcode": "transformer.h",
    "codegen": "transformer.h",
    "bert": "encoder.layer",
}


def compress_cmd(model_dir, out, corpus, *extra) -> list[str]:
    """``lord-export compress`` of ``model_dir`` at rank reduction 0.5 with ``extra`` flags."""
    return [*CLI, "compress", str(model_dir), str(out), "--calib", str(corpus), "--rank-reduction", "0.5", *extra]


@pytest.mark.parametrize("arch", ARCHS)
def test_find_blocks_known_layouts(arch):
    blocks = find_blocks(tiny_model(arch))
    assert blocks is not None and blocks.path == BLOCK_PATHS[arch] and len(blocks) == 2


def test_find_blocks_generic_longest_uniform_module_list():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(8, 2), nn.Linear(8, 3)])  # uniform but shorter
            self.stack = nn.ModuleList([Block() for _ in range(3)])
            self.mixed = nn.ModuleList([Block(), nn.Linear(8, 8), Block(), Block()])  # longer but not uniform

    blocks = find_blocks(Net())
    assert blocks.path == "stack" and len(blocks) == 3
    assert find_blocks(nn.Sequential(nn.Linear(4, 4))) is None


@pytest.mark.parametrize("arch", ARCHS)
def test_block_by_block_independent_equals_whole_model_factors(arch):
    """Same batches, same statistics: the engine reproduces whole-model calibration's factors."""
    data = correlated_batches()
    if arch == "bert":  # padding must stay out of the statistics in both paths
        for b in data:
            b["attention_mask"][:, -7:] = 0
    whole, streamed = tiny_model(arch), tiny_model(arch)
    layers = select_targets(whole, ("all",))
    plan_whole = make_plan(whole, calibrate(whole, data, layers), layers, le.LordConfig(rank_reduction=0.5))
    plan = le.compress(streamed, data, rank_reduction=0.5, calibration="independent")
    assert plan.report["block_by_block"]
    assert sorted(plan.tensors) == sorted(plan_whole.tensors)
    for name, t in plan_whole.tensors.items():
        assert torch.allclose(plan.tensors[name], t, rtol=1e-6, atol=1e-7), name
    assert [g.name for g in plan.groups] == [g.name for g in plan_whole.groups]


def test_compensated_weight_is_exactly_w_when_inputs_agree():
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(12, 20, generator=g, dtype=torch.float64), torch.randn(20, 15, generator=g, dtype=torch.float64)
    G = X @ X.T  # singular: 15 tokens < 20 features, damping must not leak into the result
    assert torch.equal(fz.compensated_weight(W, G, G.clone()), W)
    a, b = fz.lord(fz.compensated_weight(W, G, G.clone()), G, 5), fz.lord(W, G, 5)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B)


def test_compensating_group_equals_lord_where_compressed_and_dense_inputs_agree():
    """Block 0's first group sees identical dense and compressed inputs: compensating = LoRD there."""
    data = correlated_batches()
    ref = le.compress(tiny_model("llama"), data, rank_reduction=0.5, calibration="independent")
    for mode in ("sequential", "compensating"):
        plan = le.compress(tiny_model("llama"), data, rank_reduction=0.5, calibration=mode)
        first = plan.groups[0]
        assert first.name == "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"
        for m in first.members:
            a, b = plan.tensors[f"{m.name}.weight"], ref.tensors[f"{m.name}.weight"]
            assert (a - b).norm() <= 1e-6 * b.norm(), (mode, m.name)
        later = plan.groups[-1]  # the last down projection: its inputs differ, so do its factors
        assert not torch.allclose(
            plan.tensors[f"{later.members[0].name}.weight"], ref.tensors[f"{later.members[0].name}.weight"]
        )


def _brute_best(W, X, Xh, rank):
    """min over rank-r M of ‖W X − M X̂‖²: with X̂ = U S Vᵀ (thin), it is ‖W X‖² − Σ_{i≤r} σ_i(W X V)²."""
    _, _, Vh = torch.linalg.svd(Xh, full_matrices=False)
    s = torch.linalg.svdvals(W @ X @ Vh.T)
    return float((W @ X).square().sum() - s[:rank].square().sum())


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_best_output_error_and_compensating_reach_the_exact_optimum(rank):
    g = torch.Generator().manual_seed(rank)
    d_in, d_out, n = 10, 9, 200
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    X = torch.randn(d_in, n, generator=g, dtype=torch.float64)
    Xh = X + 0.3 * torch.randn(d_in, n, generator=g, dtype=torch.float64)  # the compressed path's input
    Cxx, G, H = X @ X.T, Xh @ Xh.T, X @ Xh.T
    total = float((W @ X).square().sum())
    best = fz.best_output_error(W, G, H, total, rank)
    assert best == pytest.approx(_brute_best(W, X, Xh, rank), rel=1e-9)
    f = fz.lord(fz.compensated_weight(W, G, H, damping=1e-12), G, rank)
    err, total2 = fz.output_error(W, f.A, f.B, Cxx, H, G)
    assert total2 == pytest.approx(total, rel=1e-12)
    assert err == pytest.approx(best, rel=1e-6)  # compensating attains the optimum (no damping)
    direct = float((W @ X - f.A @ f.B @ Xh).square().sum())
    assert err == pytest.approx(direct, rel=1e-9)  # the statistics formula is the real error
    seq = fz.lord(W, G, rank)  # fitting W on X̂ ignores the dense target: never better
    assert fz.output_error(W, seq.A, seq.B, Cxx, H, G)[0] >= best * (1 - 1e-9)


@needs_shared_data
@pytest.mark.slow
def test_sequential_and_compensating_lower_end_to_end_error_on_stories260k():
    """At rank reduction 0.5, calibrating on the compressed model brings the output distribution
    (KL of next-token probabilities against the dense model, held-out stories) closer to dense."""
    from lord_export.calibration.data import batches, tokenize_blocks
    from lord_export.persist.hf import load_dense, load_tokenizer

    docs = [d.strip() for d in STORIES_TEXT.read_text(encoding="utf-8").split("<|endoftext|>") if d.strip()]
    tok = load_tokenizer(STORIES_MODEL)
    ids, mask = tokenize_blocks(tok, docs[:256], samples=64, seqlen=256)
    held, held_mask = tokenize_blocks(tok, docs[-300:], samples=16, seqlen=256)
    keep = held_mask.bool()
    with torch.no_grad():
        ref = F.log_softmax(load_dense(STORIES_MODEL)(input_ids=held, attention_mask=held_mask).logits[keep], -1)
    kl = {}
    for mode in ("independent", "sequential", "compensating"):
        model = load_dense(STORIES_MODEL)
        le.compress(model, batches(ids, mask, 16), rank_reduction=0.5, calibration=mode)
        with torch.no_grad():
            out = F.log_softmax(model(input_ids=held, attention_mask=held_mask).logits[keep], -1)
        kl[mode] = float(F.kl_div(out, ref, log_target=True, reduction="batchmean"))
    assert kl["sequential"] < kl["independent"], kl
    assert kl["compensating"] < 0.9 * kl["independent"], kl


def test_statistics_of_bf16_activations_are_exact_float64_sums():
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(300, 24, generator=g) * 3).to(torch.bfloat16)
    st = InputStats.zeros(24, "cpu")
    with exact_matmuls():
        assert not torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "highest"
        st.add(rows[:150])
        st.add(rows[150:])
    exact = rows.double().T @ rows.double()
    err = float((st.C - exact).norm() / exact.norm())
    assert err < 1e-6 and st.tokens == 300  # float32 products, float64 sums: no bf16 rounding
    in_bf16 = (rows.T @ rows).double()  # what forming the product in the model's dtype would give
    assert float((in_bf16 - exact).norm() / exact.norm()) > 100 * err


def test_shard_writer_splits_and_indexes(tmp_path):
    tensors = {f"layers.{i}.w": torch.full((64, 64), float(i)) for i in range(5)}  # 16 KiB each
    writer = ShardWriter(tmp_path, max_shard_bytes=40_000)
    for i in range(5):
        writer.add({f"layers.{i}.w": tensors[f"layers.{i}.w"]})
    files = writer.close()
    assert len(files) == 3 and [f.name for f in files][-1] == "model-00003-of-00003.safetensors"
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4 and len(index["weight_map"]) == 5
    reader = CheckpointReader(tmp_path)
    assert all(torch.equal(reader.get(k), v) for k, v in tensors.items())
    assert not list(tmp_path.glob(".part-*"))


def test_shard_writer_streams_bytes_and_keeps_no_tensor(tmp_path):
    """A block's bytes reach the shard file when it is added; the writer keeps no reference to it."""
    import weakref

    writer = ShardWriter(tmp_path)
    block = {"layers.0.w": torch.randn(256, 256), "layers.0.b": torch.randn(256)}
    refs = [weakref.ref(t) for t in block.values()]
    writer.add(block)
    del block
    assert all(r() is None for r in refs)
    (part,) = tmp_path.glob(".part-*")
    assert part.stat().st_size == writer.header_reserve + (256 * 256 + 256) * 4
    writer.close()
    assert CheckpointReader(tmp_path).get("layers.0.w").shape == (256, 256)


@pytest.mark.parametrize("reserve", [16, 1024], ids=["header-overflows", "header-in-reserve"])
def test_shard_writer_dtypes_alignment_and_header(tmp_path, reserve):
    """Every dtype round-trips; odd-sized tensors go last so each tensor starts aligned to its item
    size; the header fills its reserve (padded with spaces) or the shard is rewritten compactly."""
    import struct

    from transformers.modeling_utils import load_state_dict

    tensors = {
        "a.bf16": torch.randn(3, 5).to(torch.bfloat16),  # 30 bytes: deferred
        "b.f32": torch.randn(512, 520),  # > 1 MiB: no compaction with a 1 KiB reserve
        "c.i64": torch.tensor(3),
        "d.bool": torch.tensor([True, False, True]),
        "e.empty": torch.zeros(0, 4),
        "f.f8": torch.randn(7).to(torch.float8_e4m3fn),
        "g.f64": torch.randn(4, 4, dtype=torch.float64),
        "h.f16": torch.randn(3).half(),
    }
    writer = ShardWriter(tmp_path, header_reserve=reserve)
    writer.add({k: tensors[k] for k in ("a.bf16", "b.f32", "c.i64")})
    writer.add({k: tensors[k] for k in ("d.bool", "e.empty", "f.f8", "g.f64", "h.f16")})
    (path,) = writer.close()
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % 8 == 0
    assert (8 + n == reserve) == (reserve == 1024)  # fits the 1 KiB reserve; overflows 16 bytes
    data = len(raw) - 8 - n
    assert data == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, t in tensors.items():
        start, end = header[name]["data_offsets"]
        assert start % t.element_size() == 0 and end - start == t.numel() * t.element_size()
    loaded = load_state_dict(str(path))  # what transformers' loader reads
    for name, t in tensors.items():
        got = CheckpointReader(tmp_path).get(name)
        assert got.dtype == t.dtype and got.shape == t.shape and loaded[name].dtype == t.dtype
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    again = ShardWriter(tmp_path / "again")
    (tmp_path / "again").mkdir()
    again.add({"x": torch.ones(2)})
    with pytest.raises(ValueError, match="written twice"):
        again.add({"x": torch.ones(2)})
    with pytest.raises(ValueError, match="cannot be stored"):
        again.add({"z": torch.ones(2, dtype=torch.complex64)})


def test_block_reads_leave_no_shard_mapped(tmp_path):
    """After a block is loaded its shards are closed: their mapped pages would stay in RSS."""
    from lord_export.pipeline.streaming import CheckpointWeights

    tensors = {f"layers.{i}.weight": torch.randn(32, 16) for i in range(3)}
    writer = ShardWriter(tmp_path, max_shard_bytes=3000)  # one tensor per shard
    for name, t in tensors.items():
        writer.add({name: t})
    writer.close()
    reader = CheckpointReader(tmp_path)
    source = CheckpointWeights(reader, None)
    for i in range(3):
        with torch.device("meta"):
            layer = nn.Linear(16, 32, bias=False)
        source.materialize(layer, f"layers.{i}", torch.device("cpu"))
        assert reader.open_files == 0
        assert torch.equal(layer.weight, tensors[f"layers.{i}.weight"])  # still readable once unmapped
    reader.get("layers.0.weight")
    assert reader.open_files == 1
    assert len(reader.load_all()) == 3 and reader.open_files == 0


def test_load_all_casts_floating_tensors_only(tmp_path):
    from lord_export.persist.checkpoint import CheckpointReader, ShardWriter

    writer = ShardWriter(tmp_path)
    writer.add({"w": torch.randn(8, 4), "ids": torch.arange(5)})
    writer.close()
    got = CheckpointReader(tmp_path).load_all("cpu", torch.bfloat16)
    assert got["w"].dtype == torch.bfloat16 and got["ids"].dtype == torch.int64
    assert torch.equal(got["ids"], torch.arange(5))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the process's mappings from /proc/self/maps")
def test_loaded_models_and_plans_do_not_view_the_weights_file(tmp_path):
    """`load` and `read_plan` (the factors `backend="lord"` compiles in) keep copies, not views of the
    safetensors memory map: once read, the file is unmapped (views would also be read through 4 KiB
    file pages: compiled decode slightly slower)."""
    import gc

    from lord_export.persist.io import read_plan

    model = tiny_model("llama")
    plan = le.compress(model, correlated_batches(1), rank_reduction=0.5)
    le.save_compressed(model, plan, tmp_path / "lord")
    weights = str((tmp_path / "lord" / "model.safetensors").resolve())
    loaded, read = le.load(tmp_path / "lord"), read_plan(tmp_path / "lord")
    gc.collect()
    assert weights not in open("/proc/self/maps").read()
    assert read.tensors and all(torch.equal(read.tensors[k], plan.tensors[k]) for k in plan.tensors)
    ids = correlated_batches(1)[0]["input_ids"]
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads RssFile from /proc/self/status")
def test_loaded_weights_do_not_pin_the_shard_mapping(tmp_path):
    """A kept tensor that viewed the shard's memory map would keep every page read from that shard
    resident; loaded weights are copies, so once a block is read the file's pages leave the RSS."""
    from safetensors.torch import save_file

    from lord_export.pipeline.streaming import CheckpointWeights

    def rss_file_mib() -> float:
        line = next(x for x in open("/proc/self/status") if x.startswith("RssFile:"))
        return int(line.split()[1]) / 1024

    save_file(
        {"big.weight": torch.randn(4096, 4096), "small.weight": torch.randn(4, 4)}, str(tmp_path / "model.safetensors")
    )
    with torch.device("meta"):
        block = nn.ModuleDict({"big": nn.Linear(4096, 4096, bias=False), "small": nn.Linear(4, 4, bias=False)})
    before = rss_file_mib()
    names = {n: n for n in block.state_dict()}
    assert not CheckpointWeights(CheckpointReader(tmp_path), None).load_into(block, names, "cpu")
    assert float(block["big"].weight.sum()) != 0.0  # every page of the 64 MiB tensor read
    block["big"].to("meta")  # the block's big part is released; the small tensor stays (as in a writer's buffer)
    assert rss_file_mib() - before < 16


@pytest.fixture(scope="module")
def bf16_sharded_dir(tmp_path_factory):
    from tests.helpers import make_tokenizer

    d = tmp_path_factory.mktemp("bf16-sharded")
    model = tiny_model("llama", dtype=torch.bfloat16)
    make_tokenizer(d)
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 0
    model.save_pretrained(d, max_shard_size="60KB")  # the input is sharded too
    assert (d / INDEX_FILE).is_file()
    return d


@pytest.mark.parametrize("mode", ["independent", "compensating"])
def test_bf16_model_compresses_block_by_block_reloads_from_shards_and_generates(
    bf16_sharded_dir, code_corpus, tmp_path, mode
):
    out = tmp_path / "lord"
    config = le.LordConfig(rank_reduction=0.5, calibration=mode)
    report = le.compress_model_dir(
        bf16_sharded_dir,
        out,
        [code_corpus],
        config,
        data=CalibrationOptions(samples=4, seqlen=32),
        max_shard_bytes=50_000,
        device="cpu",
    )
    assert report["block_by_block"] and report["params_after"] < report["params_before"]
    assert (out / INDEX_FILE).is_file() and len(list(out.glob("model-*-of-*.safetensors"))) >= 2
    model = le.load(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert any(isinstance(m, le.LordLinear) for m in model.modules())
    ids = torch.tensor([[1, 5, 9, 13]])
    text = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert text.shape == (1, 9)
    # the same data through the in-memory API gives the same factors as reading block by block from shards
    from lord_export.calibration.data import calibration_set
    from lord_export.persist.hf import load_dense, load_tokenizer

    calib = calibration_set(load_tokenizer(bf16_sharded_dir), [code_corpus], CalibrationOptions(samples=4, seqlen=32))
    in_memory = le.compress(load_dense(bf16_sharded_dir), calib.batches(), config)
    reader = CheckpointReader(out)
    for name, t in in_memory.tensors.items():
        assert torch.equal(reader.get(name), t), name
    if mode == "compensating":
        groups = json.loads((out / "report.json").read_text())["groups"]
        assert all(g["dense_output_error"] is not None for g in groups if g["factorized"])


def test_cli_compress_with_calibration_mode_reports_dense_output_error(tiny_llama_dir, code_corpus, tmp_path):
    out = tmp_path / "lord"
    proc = run_cli(
        "compress",
        str(tiny_llama_dir),
        str(out),
        "--calib",
        str(code_corpus),
        "--rank-reduction",
        "0.5",
        "--calibration",
        "sequential",
        "--calib-samples",
        "4",
        "--calib-seqlen",
        "32",
        "--device",
        "cpu",
        "-q",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["calibration_mode"] == "sequential" and report["calibration"]["tokens"] > 0
    factorized = [g for g in report["groups"] if g["factorized"]]
    assert factorized and all(g["dense_output_error"] >= g["dense_output_bound"] - 1e-9 for g in factorized)


@pytest.mark.parametrize("device", ["cuda:7", "nonsense"])
def test_cli_refuses_an_unusable_device_before_any_work(tiny_llama_dir, code_corpus, tmp_path, device):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    out = tmp_path / "lord"
    t = time.perf_counter()
    proc = run_cli(
        "compress",
        str(tiny_llama_dir),
        str(out),
        "--calib",
        str(code_corpus),
        "--rank-reduction",
        "0.5",
        "--device",
        device,
        timeout=120,
    )
    assert proc.returncode == 2 and f"device {device!r}" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and time.perf_counter() - t < 60


def test_disk_space_is_checked_before_work(tmp_path):
    import shutil

    from lord_export.pipeline.model_dir import _check_disk_space

    free = shutil.disk_usage(tmp_path).free
    _check_disk_space(tmp_path / "out", free // 2)
    with pytest.raises(UsageError, match="GB free"):
        _check_disk_space(tmp_path / "out", free * 2)


def test_a_write_that_fails_midway_leaves_no_output(tiny_llama_dir, code_corpus, tmp_path):
    """A real file-size limit (RLIMIT_FSIZE) makes the first shard write fail, as a full disk would."""
    import resource

    out = tmp_path / "lord"

    def limit_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run(
        compress_cmd(tiny_llama_dir, out, code_corpus, "--calib-samples", "4", "--calib-seqlen", "32", "-q"),
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_files,
    )
    assert proc.returncode == 1 and "File too large" in proc.stderr, proc.stderr
    # nothing that looks finished: only the hidden partial output, kept for --resume, and the CLI says so
    assert not out.exists() and [p.name for p in tmp_path.glob(".lord*")] == [".lord.lord-partial"]
    assert "--resume" in proc.stderr


def test_an_interrupted_run_leaves_no_output(tiny_llama_dir, code_corpus, tmp_path):
    out = tmp_path / "lord"
    extra = ("--calibration", "compensating", "--calib-samples", "128", "--calib-seqlen", "128", "--batch-size", "1")
    proc = subprocess.Popen(
        compress_cmd(tiny_llama_dir, out, code_corpus, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a test run started in the background ('cmd &') inherits SIGINT ignored; Ctrl-C is the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in proc.stderr:  # wait until the engine runs (128 batches per stage), then interrupt it as Ctrl-C would
        if "one at a time" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert not out.exists() and [p.name for p in tmp_path.glob(".lord*")] == [".lord.lord-partial"]
    assert "--resume" in err


def test_statistics_stay_in_float64_where_the_device_has_it():
    from lord_export.device import has_float64, statistics_device

    assert has_float64("cpu") and has_float64("meta")
    assert statistics_device("cpu", None) == torch.device("cpu")
    assert statistics_device("meta", "cpu") == torch.device("cpu")  # an explicit choice wins
    if torch.backends.mps.is_available():  # no float64 on MPS: statistics and factorization go to the CPU
        assert not has_float64("mps") and statistics_device("mps", None) == torch.device("cpu")
