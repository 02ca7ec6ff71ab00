"""Damaged and hostile files: the committed malformed corpus with its exact messages, every
single-byte corruption and every truncation of a small file, and seeded fuzzing. Any byte
string ends in a value or a CheckpointError: never another exception, never a hang, never
memory sized by a claim the file does not back."""

from __future__ import annotations

import json
import os
import re
import signal
import tracemalloc
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from shardstep import checkpoints
from tests.checkpoints import mutate
from tests.checkpoints.make_corpus import GOLDEN, MALFORMED, _chunked_file, small_file

EXPECTED = json.loads((MALFORMED / "EXPECTED.json").read_text())
FUZZ_SEED = 20261126
FUZZ_CASES = 12_000


class _Hang(Exception):
    pass


@contextmanager
def _deadline(seconds: float):
    """Fail (instead of hanging the suite) if the body runs longer than ``seconds``."""
    def expire(signum, frame):
        raise _Hang(f"load took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Slot:
    """One file on tmpfs rewritten for every case (fast, and a real file for the reader)."""

    def __init__(self, directory: Path):
        self.path = directory / "case.ckpt"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def put(self, data: bytes) -> Path:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        return self.path

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def slot(tmp_path):
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else tmp_path
    directory = base / f"checkpoint-fuzz-{os.getpid()}"
    directory.mkdir(exist_ok=True)
    s = _Slot(directory)
    yield s
    s.close()
    s.path.unlink()
    directory.rmdir()


def _outcome(path: Path) -> str:
    """'value' or 'error'; anything else propagates and fails the test."""
    try:
        checkpoints.load(path)
        checkpoints.load(path, mmap=True)
    except checkpoints.CheckpointError as error:
        assert str(path) in str(error), f"message does not name the file: {error}"
        return "error"
    return "value"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_malformed_file_is_refused_with_its_message(name):
    path = MALFORMED / name
    with pytest.raises(checkpoints.CorruptCheckpointError) as caught:
        checkpoints.load(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert re.search(EXPECTED[name], message), message
    with pytest.raises(checkpoints.CorruptCheckpointError, match=EXPECTED[name]):
        checkpoints.load(path, mmap=True)


def test_hostile_size_claims_allocate_nothing_they_claim():
    """Files claiming terabytes (shapes, lengths, header sizes) are refused before any
    allocation of that size; tracemalloc sees every numpy and Python allocation."""
    hostile = ["header_past_end", "huge_claim", "empty_but_too_large", "shape_length", "too_deep"]
    paths = [next(MALFORMED.glob(f"[0-9][0-9]-{name}.ckpt")) for name in hostile]
    tracemalloc.start()
    try:
        for path in paths:
            with pytest.raises(checkpoints.CorruptCheckpointError):
                checkpoints.load(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"peak {peak} bytes while refusing files of at most 2 KiB"


def test_every_single_byte_corruption_of_a_small_file_is_detected(slot):
    data = small_file()
    assert len(data) < 400
    checkpoints.load(slot.put(data))
    undetected = []
    with _deadline(120):
        for position in range(len(data)):
            for value in range(256):
                if value == data[position]:
                    continue
                path = slot.put(data[:position] + bytes([value]) + data[position + 1:])
                try:
                    checkpoints.load(path)
                except checkpoints.CorruptCheckpointError:
                    continue
                undetected.append((position, value))
    assert undetected == [], f"{len(undetected)} corruptions loaded: {undetected[:10]}"


@pytest.mark.parametrize("which", ["small", "chunked", "golden"])
def test_every_truncation_is_detected(which, slot):
    data = {"small": small_file, "chunked": _chunked_file, "golden": GOLDEN.read_bytes}[which]()
    lengths = range(len(data)) if which != "golden" else range(0, len(data), 7)
    with _deadline(60):
        for length in lengths:
            path = slot.put(data[:length])
            with pytest.raises(checkpoints.CorruptCheckpointError):
                checkpoints.load(path)


def test_fuzzed_files_end_in_a_value_or_a_checkpoint_error(slot):
    """Seeded mutations (flips, overwrites, truncations, insertions, deletions, duplicated
    ranges; header bytes or decoded header fields changed and re-sealed with a valid
    checksum) of three valid files."""
    bases = [small_file(), _chunked_file(), GOLDEN.read_bytes()]
    rng = np.random.default_rng(FUZZ_SEED)
    counts = {"value": 0, "error": 0}
    for case in range(FUZZ_CASES):
        data = mutate(bases[case % len(bases)], rng)
        with _deadline(5):
            counts[_outcome(slot.put(data))] += 1
    assert counts["value"] + counts["error"] == FUZZ_CASES
    # a re-sealed header edit can leave a valid file (a changed string, a changed int in
    # the tree): those load; everything else must have been refused
    assert counts["error"] >= FUZZ_CASES * 0.9, counts
