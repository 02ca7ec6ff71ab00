"""What the separate processes of the run-checkpoint tests execute: shard writers that
make their own slices (nothing is gathered through the parent), and a training-like writer
that saves step after step until it is killed.

Values are functions of (parameter, element index, step), so any process, and the
verifier, computes exactly what a shard holds without ever building the whole state.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from checkpoints import CheckpointStore, Retention, ShardLayout, dump, write_shard
from checkpoints.layout import ParamSpec

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


def crash_writer(root: str, ready: Any, committed: Any, stop_inside: tuple[int, int] | None = None,
                 stopped: Any = None) -> None:
    """Resume a run after the newest committed step and save step after step (three
    shards, keep the last two, plus a single-file copy of the newest) until killed.

    ``stop_inside=(steps, shards)``: after committing ``steps`` steps, begin the next one,
    write ``shards`` of its shard files, set ``stopped`` and wait there to be killed, so a
    kill lands inside an uncommitted checkpoint for certain."""
    store = CheckpointStore(root, run_id=CRASH_RUN, retention=Retention(keep_last=2))
    layout = ShardLayout(CRASH_SPECS, CRASH_SHARDS)
    step = (store.latest() or 0) + 1
    ready.set()
    for done in range(1 << 30):
        pending = store.begin(step, layout)
        for shard in range(CRASH_SHARDS):
            if stop_inside == (done, shard):
                stopped.set()
                time.sleep(3600)
            params, state = expected_shard(layout, shard, step)
            write_shard(pending, shard, params, state)
        if stop_inside == (done, CRASH_SHARDS):
            stopped.set()
            time.sleep(3600)
        store.commit(pending, extra={"data_position": step * 32}, metrics={"loss": 1.0 / step})
        committed.put(step)
        dump({"step": step, "params": expected_full(layout, step)[0]}, os.path.join(root, "latest.ckpt"))
        step += 1
