"""Run the real ``lord-export`` command line in a subprocess (shared by the CLI tests)."""

from __future__ import annotations

import subprocess
import sys

CLI = [sys.executable, "-m", "lord_export.cli"]


def run_cli(*args: str, timeout: float = 1200, cwd=None) -> subprocess.CompletedProcess:
    """``python -m lord_export.cli ARGS…`` with its output captured as text."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)
