"""Crash consistency: a writer process saving step after step is killed with SIGKILL at
random moments (a fixed seed), restarted and killed again. Every other trial kills it at a
random moment; the others kill it while it is stopped inside an uncommitted checkpoint
(after a random number of steps and shard files), so the uncommitted case is exercised on
any machine however fast. After every kill, the newest committed checkpoint loads and equals
what was saved for its step, every older committed one does too, the single-file copy loads
whole, and a new store removes the leftovers."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest

from shardstep.checkpoints import CheckpointStore, ShardLayout, committed_steps
from tests.checkpoints.processes import CRASH_RUN, CRASH_SHARDS, CRASH_SPECS, CrashWriter, leftovers, verify_after_kill

TRIALS = 24
SEED = 4
REPORT_SECONDS = 60


def test_sigkill_at_random_moments_never_breaks_the_latest_checkpoint(run_root):
    """On object storage as on disk; there each killed writer's lease is taken over at once
    (its process is gone), and a kill before the first shard file leaves nothing behind."""
    root = str(run_root)
    on_object_storage = not isinstance(run_root, Path)
    environment = {name: value for name, value in os.environ.items() if name.startswith("AWS_")}
    layout = ShardLayout(CRASH_SPECS, CRASH_SHARDS)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["numpy", "shardstep.checkpoints", "tests.checkpoints.processes"])
    rng = np.random.default_rng(SEED)
    newest = 0
    saw_leftovers = 0
    stopped_inside = 0
    stopped_after_a_shard = 0
    for trial in range(TRIALS):
        stop_inside = None
        if trial % 2:
            stop_inside = (int(rng.integers(0, 3)), int(rng.integers(0, CRASH_SHARDS + 1)))
        writer = CrashWriter(context, root, stop_inside, environment)
        try:
            writer.wait_for("ready", REPORT_SECONDS)
            if stop_inside is None:
                time.sleep(float(rng.uniform(0.0, 0.25)))
            else:
                writer.wait_for("stopped", REPORT_SECONDS)
                stopped_inside += 1
                stopped_after_a_shard += stop_inside[1] > 0
        except AssertionError as error:
            raise AssertionError(f"trial {trial} (stop inside {stop_inside}): {error}") from None
        finally:
            writer.kill()
        reported = max(writer.committed, default=newest)
        saw_leftovers += bool(leftovers(root))
        if not committed_steps(root):
            continue  # killed before its first commit: nothing to check yet
        newest = verify_after_kill(root, layout, reported, newest)
        with CheckpointStore(root, run_id=CRASH_RUN) as store:
            assert sorted(store.cleanup()) == []  # the constructor already removed them
            assert not leftovers(root)
            assert store.latest() == newest
    assert newest >= TRIALS // 2, f"only {newest} steps committed over {TRIALS} trials"
    # every kill inside an uncommitted checkpoint leaves its pending directory behind (which
    # the next store must ignore and remove); random kills may add more
    assert stopped_inside == TRIALS // 2
    expected = stopped_after_a_shard if on_object_storage else stopped_inside
    assert saw_leftovers >= expected, f"leftovers after only {saw_leftovers} of {expected} stopped kills"


def test_a_writer_that_fails_is_reported_with_its_traceback(tmp_path):
    """The report channel itself: a writer that cannot open its store ends the wait at once
    with its exit code and traceback, instead of a timeout that says nothing."""
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run directory should be")
    context = multiprocessing.get_context("forkserver")
    writer = CrashWriter(context, str(blocker))
    started = time.monotonic()
    try:
        with pytest.raises(AssertionError) as raised:
            writer.wait_for("ready", REPORT_SECONDS)
    finally:
        writer.process.join(REPORT_SECONDS)
    message = str(raised.value)
    assert time.monotonic() - started < REPORT_SECONDS / 2
    assert message.startswith("the writer ended before reporting 'ready' (exited with code 1; it reported:\n"), message
    assert "Traceback (most recent call last)" in message

    # a writer that ends on its own before the kill (as one could between two random kills):
    # kill() says so, with the traceback it sent, which it reads before judging the exit
    writer = CrashWriter(context, str(blocker))
    writer.process.join(REPORT_SECONDS)
    assert writer.process.exitcode == 1
    with pytest.raises(AssertionError) as raised:
        writer.kill()
    message = str(raised.value)
    assert message.startswith("the writer was not killed by SIGKILL (exited with code 1; it reported:\n"), message
    assert "Traceback (most recent call last)" in message and "CheckpointStore(" in message, message
