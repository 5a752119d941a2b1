"""Timing that is fair on shared, noisy machines: warm-up, then runs interleaved across variants."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], float | None]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Run each fn ``warmup`` times, then ``repeats`` times interleaved; a fn returning a number
    reports its own time (seconds), otherwise it is timed around the call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            own = fn()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - t)
    return times


def median_ms(times: list[float]) -> float:
    """Median of ``times`` (seconds) in milliseconds."""
    return 1e3 * statistics.median(times)


def spread_ms(times: list[float]) -> float:
    """max − min of ``times`` (seconds) in milliseconds."""
    return 1e3 * (max(times) - min(times))


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
