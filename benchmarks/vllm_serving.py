"""Dense vs LoRD served by vLLM (the "lord" quantization method of lord_export.integrations.vllm).

For each model directory (the dense model, then its LoRD compression), in fresh processes:

* offline: ``vllm.LLM.generate`` on a batch of prompts, greedy, a fixed number of new tokens
  (``ignore_eos``): engine start time, batch prefill time (``max_tokens=1``, the time to the first
  token of the whole batch), output tokens/s of the full batch, and the resident memory of the
  process tree once loaded;
* server: the OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``) under a
  bounded local load: ``--requests`` streamed ``/v1/completions`` requests, ``--concurrency`` at a
  time; requests/s, output tokens/s, time to first token (mean, p50, p90), mean latency.

The LoRD directory is made first when absent: ``lord-export compress MODEL OUT --param-ratio 0.8
--refine none --calib <the stdlib "calib" split>`` (override with ``--lord-dir``). A table is
printed and a JSON record (command, machine, date, settings, rows) is written.

Needs the vLLM venv (``scripts/vllm-env.sh``) with lord_export on the path and its plugin active
(installed entry point, or the stand-in this script makes for a source checkout)::

    PYTHONPATH=. nice -n 19 .venv-vllm/bin/python benchmarks/vllm_serving.py --json out/vllm_serving.json

Defaults fit a 2-core CPU in a few minutes (SmolLM2-135M, float32, 16 prompts x 32 tokens, 16
server requests 4 at a time). On a GPU pass ``--dtype bfloat16`` and larger numbers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path.home() / ".cache" / "lord-export-models" / "smollm2-135m"  # get-smollm2.sh puts it here
ENTRY_POINT = "lord_export.integrations.vllm:register"


# --------------------------------------------------------------------------- setup
def plugin_env(scratch: Path) -> dict[str, str]:
    """Environment for vLLM processes: lord_export importable and its vLLM plugin registered."""
    import importlib.metadata

    env = dict(os.environ)
    paths = [str(ROOT)]
    if not any(ep.value == ENTRY_POINT for ep in importlib.metadata.entry_points(group="vllm.general_plugins")):
        info = scratch / "entry-point" / "lord_export_vllm_dev-0.dist-info"
        info.mkdir(parents=True, exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lord-export-vllm-dev\nVersion: 0\n")
        (info / "entry_points.txt").write_text(f"[vllm.general_plugins]\nlord = {ENTRY_POINT}\n")
        paths.insert(0, str(info.parent))
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.pop("VLLM_PLUGINS", None)
    return env


def make_lord_dir(model: Path, out: Path, param_ratio: float, env: dict[str, str]) -> float:
    """Compress ``model`` into ``out`` with the lord-export CLI; returns the seconds it took."""
    from lord_export.measure.reference import split_texts

    calib = [str(p) for p in split_texts("calib")]
    cmd = [sys.executable, "-m", "lord_export.cli", "compress", str(model), str(out), "--param-ratio", str(param_ratio)]
    cmd += ["--refine", "none", "--calib-samples", "32", "--calib-seqlen", "256", "--no-measure", "-q", "--calib"]
    t0 = time.perf_counter()
    subprocess.run(cmd + calib, env=env, check=True)
    return time.perf_counter() - t0


def prompts(n: int) -> list[str]:
    """``n`` code prompts: the openings of standard-library files of the evaluation split."""
    from lord_export.measure.reference import split_texts

    files = split_texts("eval")
    return [files[i % len(files)].read_text(encoding="utf-8", errors="replace")[:400] for i in range(n)]


def tree_rss(pid: int) -> int:
    import psutil

    proc = psutil.Process(pid)
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


# --------------------------------------------------------------------------- offline (a worker process)
def offline_worker(args: argparse.Namespace) -> None:
    """Run in its own process (``--_offline DIR``): prints one JSON line of measurements."""
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(
        args._offline,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=args.max_model_len,
        max_num_seqs=args.batch,
        seed=0,
    )
    start_s = time.perf_counter() - t0
    texts = prompts(args.batch)
    llm.generate(texts[:2], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    t = time.perf_counter()
    llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    prefill_s = time.perf_counter() - t
    t = time.perf_counter()
    outs = llm.generate(
        texts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True), use_tqdm=False
    )
    gen_s = time.perf_counter() - t
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    row = {
        "engine_start_s": round(start_s, 2),
        "prompt_tokens": n_in,
        "output_tokens": n_out,
        "batch_prefill_s": round(prefill_s, 3),
        "generate_s": round(gen_s, 3),
        "output_tok_per_s": round(n_out / gen_s, 1),
        "rss_gib": round(tree_rss(os.getpid()) / 2**30, 3),
        "first_tokens": list(outs[0].outputs[0].token_ids[:8]),
    }
    print("RESULT " + json.dumps(row), flush=True)


def run_offline(directory: Path, args: argparse.Namespace, env: dict[str, str]) -> dict:
    cmd = [sys.executable, __file__, "--_offline", str(directory), "--dtype", args.dtype, "--batch", str(args.batch)]
    cmd += ["--max-tokens", str(args.max_tokens), "--max-model-len", str(args.max_model_len)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"offline run of {directory} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


# --------------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def one_request(base: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    req = urllib.request.Request(
        f"{base}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    first = None
    tokens = 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("choices") and first is None:
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft_s": first, "latency_s": time.perf_counter() - t0, "tokens": tokens}


def run_server(directory: Path, args: argparse.Namespace, env: dict[str, str], scratch: Path) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(directory)]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype, "--enforce-eager"]
    cmd += ["--max-model-len", str(args.max_model_len), "--max-num-seqs", str(max(args.concurrency, 1))]
    log_file = scratch / f"server-{directory.name}.log"
    t0 = time.perf_counter()
    with log_file.open("w") as log:
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            while not healthy(f"{base}/health"):
                if server.poll() is not None or time.perf_counter() - t0 > 600:
                    raise RuntimeError(f"the server for {directory} did not start:\n{log_file.read_text()[-4000:]}")
                time.sleep(1)
            start_s = time.perf_counter() - t0
            rss = tree_rss(server.pid)
            texts = prompts(args.requests)
            one_request(base, str(directory), texts[0], 4)  # warm-up
            t = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(lambda p: one_request(base, str(directory), p, args.max_tokens), texts))
            wall = time.perf_counter() - t
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait(30)
    ttft = sorted(r["ttft_s"] for r in results if r["ttft_s"] is not None)
    n_out = sum(r["tokens"] for r in results)
    return {
        "server_start_s": round(start_s, 2),
        "server_rss_gib": round(rss / 2**30, 3),
        "requests": len(results),
        "concurrency": args.concurrency,
        "req_per_s": round(len(results) / wall, 2),
        "server_output_tok_per_s": round(n_out / wall, 1),
        "ttft_mean_s": round(statistics.mean(ttft), 3),
        "ttft_p50_s": round(ttft[len(ttft) // 2], 3),
        "ttft_p90_s": round(ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))], 3),
        "latency_mean_s": round(statistics.mean(r["latency_s"] for r in results), 3),
    }


# --------------------------------------------------------------------------- main
def dir_params(directory: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in directory.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                shape = h.get_slice(k).get_shape()
                size = 1
                for s in shape:
                    size *= s
                n += size
    return n


def table(rows: list[dict]) -> str:
    cols = [
        ("model", "model"),
        ("params_M", "params (M)"),
        ("engine_start_s", "LLM start s"),
        ("batch_prefill_s", "batch prefill s"),
        ("output_tok_per_s", "offline tok/s"),
        ("rss_gib", "offline RSS GiB"),
        ("server_start_s", "server start s"),
        ("req_per_s", "req/s"),
        ("server_output_tok_per_s", "server tok/s"),
        ("ttft_mean_s", "TTFT mean s"),
        ("ttft_p90_s", "TTFT p90 s"),
        ("latency_mean_s", "latency s"),
    ]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k, _ in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="dense Hugging Face model directory")
    ap.add_argument("--lord-dir", type=Path, default=None, help="its LoRD directory (made when absent)")
    ap.add_argument("--param-ratio", type=float, default=0.8, help="for the LoRD directory made here")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=16, help="offline prompts (and max_num_seqs)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--requests", type=int, default=16, help="server requests")
    ap.add_argument("--concurrency", type=int, default=4, help="server requests in flight at once")
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the record here")
    ap.add_argument("--_offline", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._offline:
        offline_worker(args)
        return

    if str(ROOT) not in sys.path:  # a source checkout: lord_export from this tree
        sys.path.insert(0, str(ROOT))
    scratch = Path(tempfile.mkdtemp(prefix="vllm-serving-"))
    env = plugin_env(scratch)
    record: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "_offline"},
    }
    try:
        import torch
        import vllm

        record["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version()}
        if torch.cuda.is_available():
            record["machine"]["gpu"] = torch.cuda.get_device_name(0)
        lord_dir = args.lord_dir or scratch / "lord"
        if not (lord_dir / "config.json").is_file():
            record["compress_s"] = round(make_lord_dir(args.model, lord_dir, args.param_ratio, env), 1)
        rows = []
        for label, directory in (("dense", args.model), ("lord", lord_dir)):
            row = {"model": label, "dir": str(directory), "params_M": round(dir_params(directory) / 1e6, 2)}
            print(f"== {label}: offline", flush=True)
            row.update(run_offline(directory, args, env))
            if not args.skip_server:
                print(f"== {label}: server", flush=True)
                row.update(run_server(directory, args, env, scratch))
            rows.append(row)
        record["rows"] = rows
        print(table(rows))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(record, indent=2) + "\n")
            print(f"wrote {args.json}")
    finally:
        if args.lord_dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
