"""What the separate processes of the run-checkpoint tests execute: shard writers that
make their own slices (nothing is gathered through the parent), and a training-like writer
that saves step after step until it is killed, with what the tests that kill it share.

Values are functions of (parameter, element index, step), so any process, and the
verifier, computes exactly what a shard holds without ever building the whole state.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import time
import traceback
from typing import Any

import numpy as np

from shardstep.checkpoints import (
    CheckpointStore,
    Retention,
    ShardLayout,
    committed_steps,
    dump,
    load,
    open_checkpoint,
    write_shard,
)
from shardstep.checkpoints.layout import ParamSpec
from shardstep.checkpoints.storage import ObjectPath, location
from tests.checkpoints import assert_identical

CRASH_SPECS = (ParamSpec("embed/weight", (300, 257), "float32"), ParamSpec("head.bias", (5,), "float32"),
               ParamSpec("norm", (3,), "float16"))
CRASH_SHARDS = 3
CRASH_RUN = "crash-trial"


def element_values(name: str, key: str, start: int, stop: int, step: int, dtype: str) -> np.ndarray:
    """Element values of a parameter (key "param") or of its state ``key`` at ``step``."""
    salt = sum(map(ord, name + "/" + key)) % 97
    index = np.arange(start, stop, dtype=np.float64)
    return np.sin(index * 0.001 * (salt + 1) + step).astype(dtype)


def expected_shard(layout: ShardLayout, shard: int, step: int) -> tuple[dict, dict]:
    """Shard ``shard``'s slices of the parameters and Adam-like state at ``step``."""
    params, state = {}, {}
    for spec in layout.params:
        start, stop = layout.slice(spec.name, shard)
        params[spec.name] = element_values(spec.name, "param", start, stop, step, spec.dtype)
        state[spec.name] = {
            "step": np.array(float(step), np.float32),
            "exp_avg": element_values(spec.name, "exp_avg", start, stop, step, spec.dtype),
            "exp_avg_sq": element_values(spec.name, "exp_avg_sq", start, stop, step, "float32"),
        }
    return params, state


def commit_expected(root: Any, step: int, layout: ShardLayout, run_id: str = "run",
                    store: CheckpointStore | None = None, **commit: Any) -> Any:
    """Write and commit step ``step`` of :func:`expected_shard`'s state in ``root`` (with
    ``store``, or a store of its own); returns the committed directory."""
    own = store is None
    store = store or CheckpointStore(root, run_id=run_id)
    try:
        pending = store.begin(step, layout)
        for shard in range(layout.num_shards):
            write_shard(pending, shard, *expected_shard(layout, shard, step))
        return store.commit(pending, **commit)
    finally:
        if own:
            store.close()


def expected_full(layout: ShardLayout, step: int) -> tuple[dict, dict]:
    """The same state consolidated: full-shape arrays by name."""
    params, state = {}, {}
    for spec in layout.params:
        params[spec.name] = element_values(spec.name, "param", 0, spec.numel, step, spec.dtype).reshape(spec.shape)
        state[spec.name] = {
            "step": np.array(float(step), np.float32),
            "exp_avg": element_values(spec.name, "exp_avg", 0, spec.numel, step, spec.dtype).reshape(spec.shape),
            "exp_avg_sq": element_values(spec.name, "exp_avg_sq", 0, spec.numel, step, "float32").reshape(spec.shape),
        }
    return params, state


def parallel_shard_writer(pending: Any, shard: int, step: int, barrier: Any, times: Any) -> None:
    """One shard process: build its own slices, wait for the others, write, report when."""
    params, state = expected_shard(pending.layout, shard, step)
    barrier.wait()
    started = time.monotonic()
    write_shard(pending, shard, params, state)
    times.put((shard, os.getpid(), started, time.monotonic()))


def crash_writer(root: str, channel: Any, stop_inside: tuple[int, int] | None = None,
                 environment: dict[str, str] | None = None) -> None:
    """Resume a run after the newest committed step and save step after step (three
    shards, keep the last two, plus a single-file copy of the newest) until killed.

    Reports go through ``channel`` (this writer's own pipe): ``("ready", step)`` once the
    store is open, ``("committed", step)`` after each commit returned, ``("stopped", step)``
    and ``("error", traceback)`` if the writer fails. Each is one small pipe write, so a kill
    delivers it whole or not at all, and no lock exists that a killed writer could leave held.

    ``stop_inside=(steps, shards)``: after committing ``steps`` steps, begin the next one,
    write ``shards`` of its shard files, report ``stopped`` and wait there to be killed, so a
    kill lands inside an uncommitted checkpoint for certain.

    ``environment``: set first (an object store's endpoint and credentials; the forkserver
    this runs under may have started before the test set them)."""
    os.environ.update(environment or {})
    try:
        store = CheckpointStore(root, run_id=CRASH_RUN, retention=Retention(keep_last=2))
        store.prune()  # as a run's coordinator does on opening: finish a prune a kill cut short
        layout = ShardLayout(CRASH_SPECS, CRASH_SHARDS)
        step = (store.latest() or 0) + 1
        channel.send(("ready", step))
        for done in range(1 << 30):
            pending = store.begin(step, layout)
            for shard in range(CRASH_SHARDS + 1):
                if stop_inside == (done, shard):
                    channel.send(("stopped", step))
                    time.sleep(3600)
                if shard < CRASH_SHARDS:
                    params, state = expected_shard(layout, shard, step)
                    write_shard(pending, shard, params, state)
            store.commit(pending, extra={"data_position": step * 32}, metrics={"loss": 1.0 / step})
            channel.send(("committed", step))
            dump({"step": step, "params": expected_full(layout, step)[0]}, location(root) / "latest.ckpt")
            step += 1
    except BaseException:
        channel.send(("error", traceback.format_exc()))
        raise


class CrashWriter:
    """A :func:`crash_writer` in a process of its own, with its own report pipe.

    Every wait is bounded, and a failure says whether the writer is still running, how it
    ended (exit code or signal) and the traceback it reported, if any. The process is a
    daemon, so an interrupted test never leaves it for the interpreter to wait on at exit."""

    def __init__(self, context: Any, root: str, stop_inside: tuple[int, int] | None = None,
                 environment: dict[str, str] | None = None):
        self._reports, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=crash_writer, args=(root, sender, stop_inside, environment),
                                       daemon=True)
        self.process.start()
        sender.close()  # the writer holds the only sending end: its death ends the pipe
        self.committed: list[int] = []
        self.error: str | None = None

    def wait_for(self, kind: str, timeout: float) -> None:
        """Read reports until one of ``kind``; an AssertionError naming the writer's fate
        if it ends first or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"the writer did not report {kind!r} within {timeout:g} s ({self.fate()})")
            if not multiprocessing.connection.wait([self._reports], remaining):
                continue
            try:
                if self._record(self._reports.recv()) == kind:
                    return
            except EOFError:
                self.process.join(5)
                raise AssertionError(f"the writer ended before reporting {kind!r} ({self.fate()})") from None

    def kill(self) -> None:
        """SIGKILL the writer, wait for it, and read every report it got out; an
        AssertionError naming its fate (and the traceback it reported) if something else
        ended it."""
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(30)
        # the reports first: a writer that failed on its own before the kill sent its traceback
        while self.process.exitcode is not None and self._reports.poll():
            try:
                self._record(self._reports.recv())
            except EOFError:
                break
            except OSError as error:  # a report the kill cut short (only a long one is two writes)
                self.error = (self.error or "") + f"(a report cut short by the kill: {error})"
                break
        self._reports.close()
        assert self.process.exitcode == -signal.SIGKILL, f"the writer was not killed by SIGKILL ({self.fate()})"

    def fate(self) -> str:
        code = self.process.exitcode
        if code is None:
            state = f"pid {self.process.pid} still running"
        elif code < 0:
            state = f"killed by {signal.Signals(-code).name}"
        else:
            state = f"exited with code {code}"
        return state + (f"; it reported:\n{self.error}" if self.error else "")

    def _record(self, report: tuple[str, Any]) -> str:
        kind, value = report
        if kind == "committed":
            self.committed.append(value)
        elif kind == "error":
            self.error = value
        return kind


# what an interrupted save leaves behind: pending or half-deleted step directories, temporary files
LEFTOVER = re.compile(r"step-\d+\.(pending|deleting)-[0-9a-f]+|\..*\.tmp-\d+-[0-9a-f]+")


def leftovers(root: Any) -> list[str]:
    """What interrupted saves left in a run directory: on disk the LEFTOVER names; on object
    storage every object under a step-<k>/ prefix that no intact manifest of that step names
    (read through a second client, boto3, not through the code under test)."""
    root = location(root)
    if not isinstance(root, ObjectPath):
        return sorted(name for name in os.listdir(root) if LEFTOVER.fullmatch(name))
    import boto3

    client = boto3.client("s3")
    prefix = root.key + "/"
    keys = [item["Key"][len(prefix):] for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=root.bucket, Prefix=prefix) for item in page.get("Contents", [])]
    named = set()
    for key in keys:
        step, _, rest = key.partition("/")
        if rest == "manifest.ckpt":
            manifest = load(root / key)
            named.add(key)
            named.update(f"{step}/{record['file']}" for record in manifest["shards"])
    return sorted(key for key in keys if re.fullmatch(r"step-\d+/.+", key) and key not in named)


def verify_after_kill(root: str, layout: ShardLayout, reported: int, resumed_from: int) -> int:
    """After a kill: the newest committed checkpoint is at least the newest one the writer
    reported and at most one further; every committed one loads and equals what was saved
    for its step; the single-file copy loads whole. Returns the newest committed step."""
    steps = committed_steps(root)
    assert steps, "no committed checkpoint after a kill"
    newest = steps[-1]
    # everything commit() returned for is visible, and at most one more step got through
    assert reported <= newest <= max(reported, resumed_from) + 1, (reported, newest, steps)
    # keep_last=2, plus one committed just before its prune was cut (each writer prunes when it
    # opens, so cut prunes never add up)
    assert len(steps) <= 3, steps
    for step in steps:
        with open_checkpoint(root, step) as checkpoint:
            params, state_dict = checkpoint.export()
            full_params, full_state = expected_full(layout, step)
            assert_identical(full_params, params)
            assert_identical({i: full_state[s.name] for i, s in enumerate(layout.params)}, state_dict["state"])
            assert checkpoint.extra == {"data_position": step * 32}
    single = location(root) / "latest.ckpt"
    if single.is_file():
        value = load(single)
        assert_identical({"step": value["step"], "params": expected_full(layout, value["step"])[0]}, value)
    return newest
