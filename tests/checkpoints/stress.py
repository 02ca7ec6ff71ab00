"""Longer runs of the checkpoint fault tests than CI affords (not collected by pytest).

    python -m tests.checkpoints.stress --fuzz 200000 --kills 300 --seed 1

``--fuzz``: seeded mutations of the three valid test files (as in
tests/test_checkpoint_corruption.py), each of which must load or raise a CheckpointError
within 5 s. ``--kills``: SIGKILL trials of the step-after-step writer (as in
tests/test_checkpoint_crash.py), with kill delays up to ``--max-delay`` seconds, each
followed by the full verification. Prints a summary; exits nonzero on the first failure.
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shardstep import checkpoints
from shardstep.checkpoints import CheckpointStore, ShardLayout, committed_steps
from tests.checkpoints import mutate
from tests.checkpoints.make_corpus import GOLDEN, _chunked_file, small_file
from tests.checkpoints.processes import CRASH_RUN, CRASH_SHARDS, CRASH_SPECS, LEFTOVER, CrashWriter, verify_after_kill


def fuzz(cases: int, seed: int) -> None:
    bases = [small_file(), _chunked_file(), GOLDEN.read_bytes()]
    rng = np.random.default_rng(seed)
    outcomes = collections.Counter()
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None) as directory:
        path = Path(directory) / "case.ckpt"
        started = time.perf_counter()
        for case in range(cases):
            path.write_bytes(mutate(bases[case % len(bases)], rng))
            signal.setitimer(signal.ITIMER_REAL, 5.0)  # the default SIGALRM action ends the process
            try:
                checkpoints.load(path)
                checkpoints.load(path, mmap=True)
                outcomes["value"] += 1
            except checkpoints.CheckpointError:
                outcomes["error"] += 1
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
    print(f"fuzz: {cases} files in {time.perf_counter() - started:.1f} s: {dict(outcomes)}")


def kills(trials: int, seed: int, max_delay: float) -> None:
    layout = ShardLayout(CRASH_SPECS, CRASH_SHARDS)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["numpy", "shardstep.checkpoints", "tests.checkpoints.processes"])
    rng = np.random.default_rng(seed)
    newest, leftovers = 0, 0
    with tempfile.TemporaryDirectory() as directory:
        root = str(Path(directory) / "run")
        for trial in range(trials):
            writer = CrashWriter(context, root)
            try:
                writer.wait_for("ready", 60)
                time.sleep(float(rng.uniform(0.0, max_delay)))
            except AssertionError as error:
                raise SystemExit(f"trial {trial}: {error}") from None
            finally:
                writer.kill()
            reported = max(writer.committed, default=newest)
            if not committed_steps(root):
                continue
            newest = verify_after_kill(root, layout, reported, newest)
            leftovers += any(LEFTOVER.fullmatch(n) for n in os.listdir(root))
            with CheckpointStore(root, run_id=CRASH_RUN):
                assert not [n for n in os.listdir(root) if LEFTOVER.fullmatch(n)]
    print(f"kills: {trials} trials, {newest} steps committed, leftovers cleaned after {leftovers} kills")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fuzz", type=int, default=200_000)
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--max-delay", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.fuzz:
        fuzz(args.fuzz, args.seed)
    if args.kills:
        kills(args.kills, args.seed, args.max_delay)
    return 0


if __name__ == "__main__":
    sys.exit(main())
