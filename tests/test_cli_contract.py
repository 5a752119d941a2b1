"""The command line's contract: one spelling per concept (old spellings still parse, with a warning),
exit codes that say what went wrong, one-line errors, help that does not repeat itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lord_export.cli import build_parser
from lord_export.errors import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_USAGE,
    CalibrationError,
    InputError,
    LordError,
    PlanError,
    UsageError,
)
from tests.cli_runner import run_cli

#: (subcommand, old spelling, its values, the new option's destination, the expected value)
ALIASES = [
    ("eval", "--data", ["a.txt"], "eval_data", ["a.txt"]),
    ("eval", "--window", ["64"], "eval_window", 64),
    ("eval", "--limit", ["3"], "humaneval_limit", 3),
    ("eval", "--max-new-tokens", ["9"], "humaneval_max_new_tokens", 9),
    ("heal", "--data", ["a.txt"], "calib", ["a.txt"]),
    ("compress", "--calib-separator", ["<|x|>"], "separator", "<|x|>"),
    ("sweep", "--window", ["64"], "eval_window", 64),
    ("sweep", "--calib-separator", ["<|x|>"], "separator", "<|x|>"),
    ("demo", "--overwrite", [], "overwrite_any", True),
]

REQUIRED = {
    "eval": ["M"],
    "heal": ["L", "O"],
    "compress": ["M", "O", "--rank-reduction", "0.3", "--calib", "c"],
    "sweep": ["M", "--calib", "c", "--eval", "e", "--out", "o"],
    "demo": [],
}


@pytest.mark.parametrize("command, old, values, dest, expected", ALIASES)
def test_old_spellings_still_parse_with_a_deprecation_warning(command, old, values, dest, expected, capsys):
    args = build_parser().parse_args([command, *REQUIRED[command], old, *values])
    assert getattr(args, dest) == expected
    err = capsys.readouterr().err
    assert f"{old} is deprecated" in err and "0.3" in err


def test_grouping_spellings():
    from lord_export.cli.args import config_from_args

    base = ["compress", *REQUIRED["compress"]]
    for extra, expected in (([], "auto"), (["--no-grouping"], "separate"), (["--grouping", "shared"], "shared")):
        assert config_from_args(build_parser().parse_args(base + extra)).grouping == expected
    with pytest.raises(SystemExit):  # one or the other
        build_parser().parse_args(base + ["--no-grouping", "--grouping", "shared"])


def test_every_help_text_formats():
    """argparse formats help with %: a stray percent sign in a help text breaks --help."""
    for name, sub in build_parser()._subparsers._group_actions[0].choices.items():
        assert sub.format_help(), name


def test_old_spellings_are_hidden_from_help():
    help_text = build_parser()._subparsers._group_actions[0].choices["eval"].format_help()
    assert "--eval-window" in help_text and "--window" not in help_text.replace("--eval-window", "")
    assert "--data" not in help_text


def test_no_option_prints_two_defaults():
    for name, sub in build_parser()._subparsers._group_actions[0].choices.items():
        text = " ".join(sub.format_help().split())
        assert text.count("(default: None)") == 0, name
        assert "(default: cuda when present, else cpu) (default" not in text, name


def test_every_option_has_help():
    for name, sub in build_parser()._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.option_strings and action.help != "==SUPPRESS==":
                assert action.help, (name, action.option_strings)


def test_argument_errors_are_one_line_with_exit_2():
    proc = run_cli("compress", "m", "o", "--rank-reduction", "2", "--calib", "c")
    assert proc.returncode == EXIT_USAGE
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--rank-reduction" in lines[0] and "see lord-export compress --help" in lines[0]


def test_the_exit_codes_of_the_error_kinds():
    assert UsageError("x").exit_code == EXIT_USAGE == 2
    assert InputError("x").exit_code == PlanError("x").exit_code == EXIT_BAD_INPUT == 3
    assert LordError("x").exit_code == CalibrationError("x").exit_code == EXIT_FAILED == 1
    assert not isinstance(PlanError("x"), UsageError)  # a corrupt file is not bad usage
    assert EXIT_INTERNAL == 4


def test_exit_2_for_bad_usage(tmp_path):
    proc = run_cli("eval", str(tmp_path / "missing"), "--eval", str(tmp_path))
    assert proc.returncode == EXIT_USAGE and proc.stderr.startswith("lord-export: error:")


@pytest.mark.slow
def test_exit_3_for_a_corrupt_plan(tiny_llama_dir, code_corpus, tmp_path):
    out = tmp_path / "lord"
    proc = run_cli(
        "compress", str(tiny_llama_dir), str(out), "--calib", str(code_corpus), "--rank-reduction", "0.5",
        "--calib-samples", "2", "--calib-seqlen", "32", "-q",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    (out / "lord_plan.json").write_text("{not json")
    proc = run_cli("export", str(out), str(tmp_path / "onnx"))
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert "not a valid plan" in proc.stderr and proc.stderr.startswith("lord-export: failed:")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_exit_1_when_the_run_fails(tiny_llama_dir, tmp_path):
    """Calibration data whose tokens make the model produce NaN: the run fails (exit 1), nothing is written."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_llama_dir, broken)
    state = load_file(broken / "model.safetensors")
    key = next(k for k in state if "embed_tokens" in k)
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, broken / "model.safetensors")
    data = tmp_path / "d.txt"
    data.write_text("def f(x):\n    return x\n" * 50)
    out = tmp_path / "out"
    proc = run_cli(
        "compress", str(broken), str(out), "--calib", str(data), "--rank-reduction", "0.5",
        "--calib-samples", "2", "--calib-seqlen", "32", "-q",
    )  # fmt: skip
    assert proc.returncode == EXIT_FAILED, proc.stderr
    assert "NaN" in proc.stderr and not out.exists()


def test_exit_4_for_an_internal_error_with_the_traceback_under_verbose(monkeypatch, capsys):
    """An exception lord_export did not raise on purpose is a bug: one line, exit 4, the traceback with -v."""
    from lord_export import cli

    def boom(args):
        raise ZeroDivisionError("division by zero")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["demo"].set_defaults(func=boom)
    assert cli.main(["demo"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError" in err and "Traceback" not in err
    assert cli.main(["demo", "-v"]) == EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err


def test_help_lists_the_exit_codes():
    proc = subprocess.run(
        [sys.executable, "-m", "lord_export.cli", "compress", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "exit codes" in proc.stdout and "3 a corrupt input" in " ".join(proc.stdout.split())


def test_every_model_loading_command_takes_trust_remote_code():
    for name in ("compress", "heal", "eval", "sweep", "bench", "export"):
        sub = build_parser()._subparsers._group_actions[0].choices[name]
        assert any("--trust-remote-code" in a.option_strings for a in sub._actions), name


@pytest.mark.slow
def test_eval_token_budget_is_evenly_spaced_and_deterministic(tiny_llama_dir, code_corpus, tmp_path):
    runs = []
    for _ in range(2):
        out = tmp_path / f"ppl{len(runs)}.json"
        proc = run_cli("eval", str(tiny_llama_dir), "--eval", str(code_corpus), "--eval-window", "32",
                       "--eval-tokens", "200", "--json", str(out), "-q")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        runs.append(json.loads(out.read_text()))
    full = run_cli("eval", str(tiny_llama_dir), "--eval", str(code_corpus), "--eval-window", "32", "-q")
    assert runs[0] == runs[1] and runs[0]["tokens"] <= 200 and runs[0]["max_tokens"] == 200
    assert f"{runs[0]['tokens']:,}" not in full.stdout  # the full evaluation predicts more tokens
    assert runs[0]["dtype"]["compute_dtype"] == "float32"
