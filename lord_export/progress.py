"""Progress lines with elapsed time and an estimate of what is left, for phases longer than a few seconds.

The library reports through a ``say(message)`` callback (the command line prints it; the Python API
stays quiet unless given one): ``survey: block 3/30 (2.1 s, 6 s elapsed, about 57 s left)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Say = Callable[[str], None]


def quiet(message: str) -> None:
    """The ``say`` of a caller that wants no progress lines."""


def seconds(s: float) -> str:
    """``s`` for humans: 4.2 s, 3 min 05 s, 1 h 02 min."""
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


class Progress:
    """Counts the steps of one phase and says, after each, how long it took, the time elapsed and an
    estimate of the time left (from the mean step so far)."""

    def __init__(self, say: Say | None, phase: str, total: int, unit: str = "") -> None:
        self.say = say or quiet
        self.phase, self.total, self.unit = phase, total, unit
        self.start = self.last = time.perf_counter()
        self.done = 0

    def step(self, detail: str = "", n: int = 1) -> float:
        """One (or ``n``) more step(s) done; returns the seconds since the previous step."""
        now = time.perf_counter()
        took, self.last = now - self.last, now
        self.done += n
        elapsed = now - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        timing = f"{seconds(took)}, {seconds(elapsed)} elapsed"
        if self.done < self.total:
            timing += f", about {seconds(left)} left"
        head = f"{self.phase}: {self.unit}" if self.unit else self.phase
        self.say(f"{head} {self.done}/{self.total}{' ' + detail if detail else ''} ({timing})")
        return took

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class StageTimes(dict):
    """Seconds per stage, summed over a run: ``with times("calibrate_s"): ...``."""

    def __call__(self, stage: str):
        return _Timed(self, stage)

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.items()}


class _Timed:
    def __init__(self, times: StageTimes, stage: str) -> None:
        self.times, self.stage = times, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.times[self.stage] = self.times.get(self.stage, 0.0) + time.perf_counter() - self.start
