"""Run untrusted Python (model-written code) in a throwaway, resource-limited subprocess.

Each call of :func:`run_program` starts ``sys.executable -I`` (isolated mode: no PYTHON* variables,
no user site, no script directory on sys.path) in a new session, in an empty temporary working
directory that is also its HOME and TMPDIR, with an environment built from scratch (PATH and
locale only: nothing is inherited, so no tokens or keys leak in). A small trusted runner, passed
with ``-c``, sets the limits and then executes the program read from stdin:

* ``RLIMIT_CPU`` (CPU seconds), ``RLIMIT_AS`` (memory), ``RLIMIT_FSIZE`` (largest file written),
  ``RLIMIT_NOFILE``, ``RLIMIT_CORE`` = 0 and ``RLIMIT_NPROC`` (processes);
* a wall-clock timeout after which the whole process group is killed.

The limits are set by the runner rather than in a ``preexec_fn``: ``preexec_fn`` is unsafe in a
process with threads (torch has many), and the runner sets them before any untrusted byte runs.

``RLIMIT_NPROC`` counts every process of the *user*, and Linux does not enforce it for root
(``CAP_SYS_RESOURCE``/``CAP_SYS_ADMIN`` bypass it). So when the evaluator runs as root (as in CI),
the runner drops to a fresh throwaway uid/gid (random, unused, no supplementary groups) before it
runs the program. That uid owns nothing but the sandbox directory, which (a) makes the process
limit real, counting only this run's processes, (b) stops the program from deleting or writing
files outside its directory (it may still *read* world-readable files), and (c) lets the
evaluator kill every process of that uid afterwards — including ones that called ``setsid`` to
leave the process group. The interpreter's own directories may not be reachable by that uid
(e.g. a pyenv Python under ``/root``), so the runner opens its import directories first and
imports through ``/proc/self/fd/N`` afterwards. As root the runner also moves into a new, empty
network namespace (best effort) so the program has no network.

Not root: the process limit is the user's current process count plus ``max_processes``, files
are protected only by ordinary permissions, and a process that leaves the process group with
``setsid`` survives the cleanup (still bounded by its CPU and memory limits). This is a
defence against accidents of model-written code, not a hardened jail against an adversary: for
that, run the evaluation in a container or VM.

Pass criterion: the program runs to its end without an exception (``SystemExit`` and
``os._exit`` count as failures: the runner writes a random token after the program finishes and
only that token proves it did).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timeout", "error"]

SETUP_FAILED = 121  # runner exit status: the sandbox itself could not be set up
_TAIL = 4000  # characters of stdout/stderr read back

# The trusted runner. argv[1] is its JSON configuration; the program comes on stdin.
_RUNNER = r"""
import json, os, resource, sys, traceback
cfg = json.loads(sys.argv[1]); del sys.argv[1:]
try:
    uid = cfg["uid"]
    if uid is not None:
        mapping = {}
        for p in list(sys.path):
            if p and os.path.isdir(p):
                mapping[p] = "/proc/self/fd/%d" % os.open(p, os.O_RDONLY | os.O_DIRECTORY)
        def remap(entry):
            for old, new in mapping.items():
                if entry == old or entry.startswith(old + os.sep):
                    return new + entry[len(old):]
            return entry
        sys.path[:] = list(mapping.values())
        for mod in list(sys.modules.values()):
            paths = getattr(mod, "__path__", None)
            if isinstance(paths, list):
                paths[:] = [remap(x) for x in paths]
        sys.path_importer_cache.clear()
        if cfg["no_network"]:
            try:
                import ctypes
                ctypes.CDLL(None, use_errno=True).unshare(0x40000000)  # CLONE_NEWNET
            except Exception:
                pass
    for name, value in cfg["limits"].items():
        soft, hard = value
        resource.setrlimit(getattr(resource, name), (soft, hard))
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise RuntimeError("could not drop privileges")
    sys.dont_write_bytecode = True
    source = sys.stdin.read()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
except BaseException as e:
    sys.stderr.write("sandbox setup failed: %r\n" % (e,))
    sys.stderr.flush()
    os._exit(121)
try:
    exec(compile(source, "<program>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit as e:
    sys.stderr.write("program called exit(%r) before finishing\n" % (e.code,))
    sys.stderr.flush()
    os._exit(3)
except BaseException:
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)
sys.stdout.flush()
os.write(1, ("\n" + cfg["token"] + "\n").encode())
os._exit(0)
"""

# Run as root: become the throwaway uid and SIGKILL every process of that uid (kill(-1) spares the caller).
_KILLER = r"""
import os, signal, sys
uid = int(sys.argv[1])
os.setgroups([]); os.setgid(uid); os.setuid(uid)
try:
    os.kill(-1, signal.SIGKILL)
except ProcessLookupError:
    pass
"""


@dataclass(frozen=True)
class Outcome:
    """What became of one program: ``passed`` is True only for status ``'passed'``."""

    passed: bool
    status: Status
    detail: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _mapped_ids(map_file: str) -> list[tuple[int, int]]:
    """[start, end) ranges of ids usable in this user namespace."""
    try:
        rows = Path(map_file).read_text().split("\n")
    except OSError:
        return [(0, 65536)]
    out = []
    for row in rows:
        parts = row.split()
        if len(parts) == 3:
            inside, _, count = (int(x) for x in parts)
            out.append((inside, inside + count))
    return out


def throwaway_id() -> int:
    """A random uid (also used as gid) that no account uses, mapped in this namespace; 65534 if none."""
    lo, hi = 1_000_000, 2**31 - 2
    gids = _mapped_ids("/proc/self/gid_map")
    ranges = []
    for a, b in _mapped_ids("/proc/self/uid_map"):
        a, b = max(a, lo), min(b, hi)
        if b > a and any(c <= a and b <= d for c, d in gids):
            ranges.append((a, b))
    if not ranges:
        return 65534
    start, end = random.choice(ranges)
    return random.SystemRandom().randrange(start, end)


def _processes_of(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields.get("State", "").strip().startswith("Z"):
            continue
        if int(fields.get("Uid", "-1").split()[0]) == uid:
            pids.append(int(entry.name))
    return pids


def _kill_uid(uid: int, python: str) -> None:
    """SIGKILL every process of the throwaway ``uid`` until none is left (root only)."""
    for _ in range(10):
        if not _processes_of(uid):
            return
        subprocess.run([python, "-I", "-c", _KILLER, str(uid)], env={"PATH": "/usr/bin:/bin"}, timeout=30, check=False)
        time.sleep(0.02)
    log.warning("processes of sandbox uid %d survived cleanup: %s", uid, _processes_of(uid))


def _count_own_processes() -> int:
    try:
        return len(_processes_of(os.getuid()))
    except OSError:
        return 256


def _rmtree(path: str) -> None:
    def fix(func, p, _exc):  # the program may have made entries unwritable
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=fix)


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - _TAIL))
        return f.read().decode("utf-8", "replace")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:500] if lines else ""


def run_program(
    source: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    *,
    max_processes: int = 8,
    max_file_mb: int = 16,
    cpu_seconds: float | None = None,
    drop_privileges: bool | None = None,
    no_network: bool = True,
) -> Outcome:
    """Run ``source`` in a sandboxed subprocess (see the module docstring); never raises for what it does.

    One function on purpose: the steps that set up the isolation (directory, user, limits, process
    group) and the ones that tear it down must be read together to check the security boundary.

    ``timeout`` is wall-clock seconds; ``cpu_seconds`` defaults to ``timeout`` rounded up, plus one.
    ``drop_privileges`` (default: when running as root) runs the program as a throwaway uid.
    """
    if timeout <= 0 or memory_mb <= 0 or max_processes < 1:
        raise ValueError("timeout, memory_mb and max_processes must be positive")
    python = sys.executable
    as_root = _is_root()
    drop = as_root if drop_privileges is None else drop_privileges
    if drop and not as_root:
        raise ValueError("drop_privileges needs root")
    uid = throwaway_id() if drop else None
    cpu = math.ceil(cpu_seconds if cpu_seconds is not None else timeout) + 1
    nproc = max_processes if drop else _count_own_processes() + max_processes
    mem = memory_mb * 2**20
    fsize = max_file_mb * 2**20
    token = secrets.token_hex(16)
    cfg = {
        "uid": uid,
        "no_network": no_network,
        "token": token,
        "limits": {
            "RLIMIT_CPU": [cpu, cpu + 1],
            "RLIMIT_AS": [mem, mem],
            "RLIMIT_FSIZE": [fsize, fsize],
            "RLIMIT_NOFILE": [256, 256],
            "RLIMIT_CORE": [0, 0],
            "RLIMIT_NPROC": [nproc, nproc],
        },
    }
    work = tempfile.mkdtemp(prefix="lord-sandbox-")  # the program's cwd/HOME/TMPDIR
    private = tempfile.mkdtemp(prefix="lord-sandbox-io-")  # program text and output files, not its to open
    try:
        if uid is not None:
            os.chown(work, uid, uid)
        os.chmod(work, 0o700)
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": work,
            "TMPDIR": work,
            "OMP_NUM_THREADS": "1",
        }
        prog = Path(private, "program.py")
        prog.write_text(source, encoding="utf-8")
        out_path, err_path = Path(private, "stdout"), Path(private, "stderr")
        start = time.monotonic()
        timed_out = False
        with open(prog, "rb") as stdin, open(out_path, "wb") as stdout, open(err_path, "wb") as stderr:
            try:
                proc = subprocess.Popen(
                    [python, "-I", "-c", _RUNNER, json.dumps(cfg)],
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    cwd=work,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as e:
                return Outcome(False, "error", f"could not start the sandbox: {e}")
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:  # the whole group: the program and whatever it started
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
                if uid is not None:
                    _kill_uid(uid, python)
        elapsed = time.monotonic() - start
        out, err = _tail(out_path), _tail(err_path)
    finally:
        _rmtree(work)
        _rmtree(private)
    return _judge(proc.returncode, timed_out, elapsed, timeout, out, err, token)


def _judge(rc: int, timed_out: bool, elapsed: float, timeout: float, out: str, err: str, token: str) -> Outcome:
    if timed_out:
        return Outcome(False, "timeout", f"wall-clock limit of {timeout:g} s reached")
    if rc == 0 and token in out:
        return Outcome(True, "passed", f"finished in {elapsed:.2f} s")
    if rc == SETUP_FAILED:
        return Outcome(False, "error", _last_line(err) or "sandbox setup failed")
    if rc < 0:
        sig = -rc
        if sig in (signal.SIGXCPU, signal.SIGKILL) and elapsed < timeout:
            # SIGXCPU at the soft CPU limit, SIGKILL at the hard one (nothing else kills it before the timeout)
            return Outcome(False, "timeout", f"CPU-time limit reached (killed by {signal.Signals(sig).name})")
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        reason = {signal.SIGXFSZ: " (file-size limit)", signal.SIGSEGV: " (crashed; memory limit?)"}.get(sig, "")
        return Outcome(False, "failed", f"killed by {name}{reason}")
    if rc == 0:
        return Outcome(False, "failed", "the program exited before finishing (os._exit)")
    return Outcome(False, "failed", _last_line(err) or f"exit status {rc}")
