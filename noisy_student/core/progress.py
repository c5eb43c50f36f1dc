"""Progress of long steps: a tqdm bar on a terminal; elsewhere (DVC, Prefect, CI logs) a log line
at every tenth of the way with the time left, at most one per ``min_interval`` seconds."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm import tqdm

log = logging.getLogger("noisy_student.core.progress")


class Progress:
    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        *,
        initial: int = 0,
        leave: bool = True,
        min_interval: float = 0.0,
        enabled: bool = True,
    ) -> None:
        """``enabled`` False: silent (the other processes of a distributed run)."""
        self.total, self.desc, self.unit = total, desc, unit
        self.done = initial
        self.min_interval = min_interval
        self.enabled = enabled
        self.interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            leave=leave,
            disable=not (self.interactive and enabled),
        )
        self.start = time.monotonic()
        self.start_done = initial
        self.last_log = self.start
        self.logged = False
        self.next_tenth = initial * 10 // max(total, 1) + 1

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.interactive:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
            return
        tenth = self.done * 10 // max(self.total, 1)
        now = time.monotonic()
        # the last line only closes what earlier lines began: a quick step stays silent
        final = self.done >= self.total and (self.logged or not self.min_interval)
        if tenth >= self.next_tenth and (final or now - self.last_log >= self.min_interval):
            self.next_tenth = tenth + 1
            self.last_log = now
            self.logged = True
            log.info("%s", self.line(now, postfix))

    def line(self, now: float, postfix: dict[str, Any]) -> str:
        elapsed = now - self.start
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        extra = "".join(f"  {k} {v}" for k, v in postfix.items())
        return (
            f"{self.desc}: {self.done}/{self.total} {self.unit} "
            f"({100 * self.done / max(self.total, 1):.0f}%), {_clock(elapsed)} elapsed, "
            f"{_clock(left)} left{extra}"
        )

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(iterable: Iterable, total: int, desc: str, unit: str, **kwargs: Any) -> Iterator:
    """``iterable`` with a Progress advanced by one per item."""
    with Progress(total, desc, unit, **kwargs) as bar:
        for item in iterable:
            yield item
            bar.update()


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan: no rate yet
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
