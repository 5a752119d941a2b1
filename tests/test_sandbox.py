"""The sandbox contains what model-written code may do: loop, fork, allocate, delete, escape its group."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from lord_export.measure.sandbox import run_program

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox needs Linux (resource limits, /proc)")

T = 3.0  # wall-clock limit used by these tests


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "State:\tZ" not in state


def test_plain_outcomes():
    assert run_program("x = [1, 2]\nassert sum(x) == 3\n", timeout=T).status == "passed"
    bad = run_program("assert 1 == 2, 'nope'\n", timeout=T)
    assert (bad.passed, bad.status) == (False, "failed") and "AssertionError" in bad.detail
    assert run_program("def f(:\n", timeout=T).status == "failed"
    # leaving early is not finishing: exit(0) and os._exit(0) do not pass
    assert run_program("import sys\nsys.exit(0)\n", timeout=T).status == "failed"
    assert run_program("import os\nos._exit(0)\n", timeout=T).status == "failed"


def test_stdlib_imports_work():
    src = "import math, hashlib, collections, itertools, re, json, heapq, fractions\nassert math.gcd(4, 6) == 2\n"
    assert run_program(src, timeout=T).passed


def test_environment_is_minimal_and_cwd_is_a_fresh_dir(monkeypatch):
    monkeypatch.setenv("LORD_SECRET_TOKEN", "hunter2")
    src = (
        "import os\n"
        "assert 'LORD_SECRET_TOKEN' not in os.environ, 'secret leaked'\n"
        "assert os.listdir('.') == [], os.listdir('.')\n"
        "assert os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR']\n"
        "open('scratch.txt', 'w').write('ok')\n"
    )
    out = run_program(src, timeout=T)
    assert out.passed, out.detail


def test_infinite_loop_times_out_within_bound():
    start = time.monotonic()
    out = run_program("while True:\n    pass\n", timeout=2.0)
    assert out.status == "timeout" and not out.passed
    assert time.monotonic() - start < 2.0 + 3.0


def test_sleep_times_out():
    start = time.monotonic()
    assert run_program("import time\ntime.sleep(60)\n", timeout=1.0).status == "timeout"
    assert time.monotonic() - start < 4.0


def test_memory_bomb_is_stopped():
    out = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))\n", timeout=T, memory_mb=256)
    assert out.status == "failed" and "MemoryError" in out.detail
    out = run_program("x = bytearray(1 << 34)\n", timeout=T, memory_mb=256)
    assert out.status == "failed" and "MemoryError" in out.detail


def test_fork_bomb_is_bounded_and_later_programs_still_run():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    start = time.monotonic()
    out = run_program(bomb, timeout=2.0, max_processes=8)
    assert not out.passed and out.status in ("timeout", "failed")
    assert time.monotonic() - start < 10.0
    # the evaluator is fine and the next program runs normally
    assert run_program("assert 2 + 2 == 4\n", timeout=T).passed


def test_process_count_is_limited():
    src = (
        "import os, time\n"
        "kids = 0\n"
        "for _ in range(50):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(30)\n"
        "            os._exit(0)\n"
        "        kids += 1\n"
        "    except OSError:\n"
        "        break\n"
        "assert kids >= 50, f'only {kids} processes allowed'\n"
    )
    out = run_program(src, timeout=T, max_processes=8)
    assert out.status == "failed" and "only" in out.detail, out
    assert int(out.detail.split("only ")[1].split()[0]) < 8


def test_processes_that_leave_the_group_are_killed():
    if os.geteuid() != 0:
        pytest.skip("only the root mode (throwaway uid) can find processes that left the process group")
    src = (
        "import os, sys, time\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "sys.stderr.write(f'{pid}\\n')\n"
        "sys.stderr.flush()\n"
        "os._exit(5)\n"
    )
    out = run_program(src, timeout=T)
    pid = int(out.detail)
    deadline = time.monotonic() + 2
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), f"escaped process {pid} survived the sandbox"


@pytest.fixture
def exposed_sentinel():
    """A file outside any sandbox dir, in a directory every user may enter (as exposed as permissions allow)."""
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="lord-sentinel-"))
    try:
        d.chmod(0o755)
        (d / "keep").mkdir(mode=0o755)
        sentinel = d / "keep" / "sentinel.txt"
        sentinel.write_text("precious")
        sentinel.chmod(0o644)
        yield sentinel
    finally:
        shutil.rmtree(d)


@pytest.mark.parametrize("how", ["os.remove(p)", "shutil.rmtree(os.path.dirname(p))", "open(p, 'w').write('gone')"])
def test_files_outside_the_sandbox_survive(exposed_sentinel, how):
    if os.geteuid() != 0:
        pytest.skip("protection of files outside the sandbox relies on the throwaway uid (root mode)")
    src = f"import os, shutil\np = {str(exposed_sentinel)!r}\nassert os.path.exists(p)\n{how}\n"
    out = run_program(src, timeout=T)
    assert not out.passed and "PermissionError" in out.detail, out
    assert exposed_sentinel.read_text() == "precious"


def test_no_network_as_root():
    if os.geteuid() != 0:
        pytest.skip("network isolation needs root")
    src = "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)\n"
    out = run_program(src, timeout=T)
    assert not out.passed and "unreachable" in out.detail.lower(), out  # loopback is down in a fresh namespace
