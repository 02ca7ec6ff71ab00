"""What every benchmark script shares: the machine line and writing its own section of
docs/benchmarks.md between its markers, leaving the other sections as they are."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def machine() -> str:
    """CPU model, cores, memory and OS of this machine, for a table's header."""
    cpu = "unknown CPU"
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, {platform.system()} {platform.release()} {platform.machine()}"


def write_section(doc: Path, begin: str, end: str, section: str) -> None:
    """Replace the text from ``begin`` to ``end`` in ``doc`` with ``section`` (which
    includes both markers), or append ``section`` when the markers are not there yet."""
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    doc.write_text(text)


def p90(values: list[float]) -> float:
    """The 90th percentile, by rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def alternate_blocks(ours, theirs, rounds: int, block: int, settle: int) -> tuple[list[float], list[float]]:
    """Seconds per step of two step functions (each returns its step's seconds), run in
    alternating blocks of ``block`` steps for ``rounds`` rounds, the first ``settle`` of each
    block not kept. Blocks, not single steps, alternate: numpy's BLAS and torch's OpenMP
    threads spin for a while after a call, and a step right after the other system's would
    run against them."""
    timed: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for run, kept in ((ours, timed[0]), (theirs, timed[1])):
            kept.extend([run() for _ in range(block)][settle:])
    return timed
