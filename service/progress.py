"""What a run prints while it trains.

On a terminal: one status line, redrawn in place at most ten times a second::

    step 120/200 ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━──────────────────── 60%  loss 0.3104  lr 1.0e-03, 3.0e-03  41.2 steps/s  ETA 0:02  ckpt 100

Elsewhere (a log file, a Ray job's log): plain lines, one every ``total / 20`` steps and one
for every evaluation or skipped batch, so logs stay readable and small.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
import time
from typing import Any, TextIO

_REDRAW_SECONDS = 0.1
# a plain progress line, as :meth:`Progress._plain` writes it (``submit`` and ``jobs status``
# read the latest from a cluster job's output)
PLAIN_LINE = re.compile(r"^step \d+(?:/\d+)?  epoch \d+  .*$", re.MULTILINE)


def latest_progress(output: str) -> tuple[str | None, str | None]:
    """The latest progress line of a run's plain output, and the latest one that holds an
    evaluation (None where there is none)."""
    lines = PLAIN_LINE.findall(output)
    evaluated = [line for line in lines if "  | eval " in line]
    return (lines[-1] if lines else None), (evaluated[-1] if evaluated else None)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _rates(record: dict[str, Any]) -> str:
    lrs = record.get("lrs") or [record.get("lr")]
    return ", ".join("-" if lr is None else f"{lr:.2g}" if isinstance(lr, float) else str(lr) for lr in lrs)


class Progress:
    """Feedback for one run: :meth:`update` with every step's record, :meth:`close` at the
    end. ``total``: the number of steps the run will take (None when it stops by epochs)."""

    def __init__(self, total: int | None, *, start_step: int = 0, stream: TextIO | None = None,
                 live: bool | None = None):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.total = total
        self.start_step = start_step
        # the clock starts with the first step trained, not before: Ray's start-up, the
        # actors' and a checkpoint's load are no part of the training rate
        self.started: float | None = None
        self.every = max(1, (total or 100) // 20)
        self._drawn = 0.0
        self._width = 0

    def _speed(self, step: int) -> float:
        if self.started is None:
            return float("nan")
        elapsed = time.perf_counter() - self.started
        done = step - self.start_step
        return done / elapsed if elapsed > 0 and done > 0 else float("nan")

    def _clock(self, record: dict[str, Any]) -> None:
        if self.started is None:  # the first step: its own duration is the first measure
            self.started = time.perf_counter() - float(record.get("seconds") or 0.0)
            self.start_step = record["step"] - 1

    def status(self, record: dict[str, Any]) -> str:
        """The status line for ``record`` (no bar)."""
        step = record["step"]
        speed = self._speed(step)
        parts = [f"loss {record['loss']:.4g}", f"lr {_rates(record)}", f"{speed:.1f} steps/s"]
        if self.total is not None and math.isfinite(speed):
            parts.append(f"ETA {_duration((self.total - step) / speed)}")
        if record.get("checkpoint") is not None:
            parts.append(f"ckpt {record['checkpoint']}")
        return "  ".join(parts)

    def update(self, record: dict[str, Any]) -> None:
        if record.get("skipped"):
            self._line(f"skipped batch {record['batch']} of epoch {record['epoch']}: {record['message']}")
            return
        self._clock(record)
        if self.live:
            now = time.perf_counter()
            if "eval" in record:
                self._line(self._plain(record))
            elif now - self._drawn >= _REDRAW_SECONDS or record["step"] == self.total:
                self._draw(record)
                self._drawn = now
            return
        if record["step"] % self.every == 0 or "eval" in record or record["step"] == self.total:
            self._line(self._plain(record))

    def _plain(self, record: dict[str, Any]) -> str:
        of = f"/{self.total}" if self.total is not None else ""
        line = f"step {record['step']}{of}  epoch {record['epoch']}  {self.status(record)}"
        if "eval" in record:
            line += "  | eval " + "  ".join(f"{k} {v:.4g}" for k, v in record["eval"].items())
        return line

    def _draw(self, record: dict[str, Any]) -> None:
        columns = shutil.get_terminal_size((100, 20)).columns
        step = record["step"]
        head = f"step {step}" + (f"/{self.total}" if self.total is not None else "")
        bar = ""
        if self.total:
            fraction = min(1.0, step / self.total)
            width = 24
            filled = int(round(fraction * width))
            bar = f" {'━' * filled}{'─' * (width - filled)} {fraction:4.0%}"
        text = f"{head}{bar}  {self.status(record)}"[:max(20, columns - 1)]
        self.stream.write("\r" + text.ljust(self._width))
        self.stream.flush()
        self._width = len(text)

    def event(self, text: str) -> None:
        """Something the run reports between steps (waiting for resources, a restart): a line
        of its own, above the live status line."""
        self._line(f"shardstep: {text}")

    def _line(self, text: str) -> None:
        if self.live and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self._width = 0
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
