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
import re
import signal
import time

import numpy as np

import checkpoints
from checkpoints import CheckpointStore, ShardLayout, committed_steps, open_checkpoint
from tests.checkpoints import assert_identical
from tests.checkpoints.processes import CRASH_RUN, CRASH_SHARDS, CRASH_SPECS, crash_writer, expected_full

TRIALS = 24
SEED = 4
LEFTOVER = re.compile(r"step-\d+\.(pending|deleting)-[0-9a-f]+|\..*\.tmp-\d+-[0-9a-f]+")


def _drain(committed) -> list[int]:
    # a SimpleQueue writes each small message with one atomic pipe write, so a kill never
    # loses or tears a report of a commit that returned
    steps = []
    while not committed.empty():
        steps.append(committed.get())
    return steps


def _verify(root, layout, reported: int, resumed_from: int) -> int:
    steps = committed_steps(root)
    assert steps, "no committed checkpoint after a kill"
    newest = steps[-1]
    # everything commit() returned for is visible, and at most one more step got through
    assert reported <= newest <= max(reported, resumed_from) + 1, (reported, newest, steps)
    assert len(steps) <= 3  # keep_last=2, plus one committed just before its prune was cut
    for step in steps:
        with open_checkpoint(root, step) as checkpoint:
            params, state_dict = checkpoint.export()
            full_params, full_state = expected_full(layout, step)
            assert_identical(full_params, params)
            assert_identical({i: full_state[s.name] for i, s in enumerate(layout.params)}, state_dict["state"])
            assert checkpoint.extra == {"data_position": step * 32}
    single = os.path.join(root, "latest.ckpt")
    if os.path.exists(single):
        value = checkpoints.load(single)
        assert_identical({"step": value["step"], "params": expected_full(layout, value["step"])[0]}, value)
    return newest


def test_sigkill_at_random_moments_never_breaks_the_latest_checkpoint(tmp_path):
    root = str(tmp_path / "run")
    layout = ShardLayout(CRASH_SPECS, CRASH_SHARDS)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["numpy", "checkpoints", "tests.checkpoints.processes"])
    rng = np.random.default_rng(SEED)
    committed = context.SimpleQueue()
    newest = 0
    saw_leftovers = 0
    stopped_inside = 0
    for trial in range(TRIALS):
        ready, stopped = context.Event(), context.Event()
        stop_inside = None
        if trial % 2:
            stop_inside = (int(rng.integers(0, 3)), int(rng.integers(0, CRASH_SHARDS + 1)))
        writer = context.Process(target=crash_writer, args=(root, ready, committed, stop_inside, stopped))
        writer.start()
        assert ready.wait(60), "the writer did not start"
        if stop_inside is None:
            time.sleep(float(rng.uniform(0.0, 0.25)))
        else:
            assert stopped.wait(60), f"trial {trial}: the writer never reached {stop_inside}"
            stopped_inside += 1
        os.kill(writer.pid, signal.SIGKILL)
        writer.join(30)
        assert writer.exitcode == -signal.SIGKILL, f"trial {trial}: writer ended with {writer.exitcode}"
        reported = max(_drain(committed), default=newest)
        leftovers = [n for n in os.listdir(root) if LEFTOVER.fullmatch(n)]
        saw_leftovers += bool(leftovers)
        if not committed_steps(root):
            continue  # killed before its first commit: nothing to check yet
        newest = _verify(root, layout, reported, newest)
        with CheckpointStore(root, run_id=CRASH_RUN) as store:
            assert sorted(store.cleanup()) == []  # the constructor already removed them
            assert not [n for n in os.listdir(root) if LEFTOVER.fullmatch(n)]
            assert store.latest() == newest
    assert newest >= TRIALS // 2, f"only {newest} steps committed over {TRIALS} trials"
    # every kill inside an uncommitted checkpoint leaves its pending directory behind (which
    # the next store must ignore and remove); random kills may add more
    assert stopped_inside == TRIALS // 2
    assert saw_leftovers >= stopped_inside, f"leftovers after only {saw_leftovers} of {stopped_inside} stopped kills"
