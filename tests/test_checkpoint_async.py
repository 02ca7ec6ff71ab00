"""Asynchronous saves: the state is copied at call time, written in the background, and a
failed write is reported at the next save, wait() or close(), or on stderr at exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardstep import checkpoints
from shardstep.checkpoints import AsyncSaver, CheckpointError, CheckpointStore, ShardLayout, open_checkpoint
from tests.checkpoints import SPECS, assert_identical
from tests.checkpoints.processes import expected_full, expected_shard

ROOT = Path(__file__).resolve().parents[1]


def test_later_in_place_updates_never_reach_the_file(tmp_path):
    weights = np.zeros(16 << 20, np.float32)  # 64 MB: the write takes a while
    state = {"w": weights, "step": np.array(1.0, np.float32), "history": [1, 2], "meta": {"k": 1}}
    expected = {"w": np.zeros(16 << 20, np.float32), "step": np.array(1.0, np.float32),
                "history": [1, 2], "meta": {"k": 1}}
    with AsyncSaver() as saver:
        saver.dump(state, tmp_path / "x.ckpt")
        updates = 0
        while saver.busy or updates == 0:
            weights += 1
            state["step"] += 1
            updates += 1
        state["history"].append(3)
        state["meta"]["k"] = 2
        saver.wait()
    assert_identical(expected, checkpoints.load(tmp_path / "x.ckpt"))


def test_a_failed_write_is_raised_by_the_next_save_and_that_save_does_not_start(tmp_path):
    bad = tmp_path / "missing" / "x.ckpt"
    good = tmp_path / "y.ckpt"
    saver = AsyncSaver()
    saver.dump({"a": np.ones(3)}, bad)  # returns: the failure happens in the background
    with pytest.raises(CheckpointError, match=r"the asynchronous save of .*missing/x.ckpt failed: cannot write") as caught:
        saver.dump({"a": np.ones(3)}, good)
    assert isinstance(caught.value.__cause__, CheckpointError)
    assert not good.exists()
    saver.dump({"a": np.ones(3)}, good)  # reported once; the saver goes on
    saver.close()
    assert_identical({"a": np.ones(3)}, checkpoints.load(good))


@pytest.mark.parametrize("finish", ["wait", "close"])
def test_wait_and_close_raise_the_pending_failure(finish, tmp_path):
    saver = AsyncSaver()
    saver.dump({}, tmp_path / "missing" / "x.ckpt")
    with pytest.raises(CheckpointError, match="failed: cannot write checkpoint"):
        getattr(saver, finish)()
    saver.close()
    with pytest.raises(CheckpointError, match="this AsyncSaver is closed"):
        saver.dump({}, tmp_path / "z.ckpt")


def test_bad_values_are_refused_at_call_time(tmp_path):
    with AsyncSaver() as saver:
        with pytest.raises(TypeError, match=r"obj\['s'\]: values of type set"):
            saver.dump({"s": {1}}, tmp_path / "x.ckpt")
        assert not saver.busy
    assert not (tmp_path / "x.ckpt").exists()


def test_back_to_back_saves_each_complete_in_order(tmp_path):
    with AsyncSaver() as saver:
        for step in range(4):
            saver.dump({"step": step, "w": np.full((1000, 10), step, np.float64)}, tmp_path / f"{step}.ckpt")
            saver.dump({"step": step}, tmp_path / "latest.ckpt")
    for step in range(4):
        assert_identical({"step": step, "w": np.full((1000, 10), step, np.float64)},
                         checkpoints.load(tmp_path / f"{step}.ckpt"))
    assert checkpoints.load(tmp_path / "latest.ckpt") == {"step": 3}


def test_asynchronous_shard_writes_then_commit(tmp_path):
    layout = ShardLayout(SPECS, 3)
    with CheckpointStore(tmp_path, run_id="run") as store, AsyncSaver() as saver:
        pending = store.begin(2, layout)
        for shard in range(3):
            params, state = expected_shard(layout, shard, 2)
            saver.write_shard(pending, shard, params, state)
            for array in params.values():
                array += 1  # the shard trains on while its file is written
        saver.wait()
        store.commit(pending)
    params, _ = open_checkpoint(tmp_path).export()
    assert_identical(expected_full(layout, 2)[0], params)


UNREPORTED = """
import sys
import numpy as np
from shardstep.checkpoints import AsyncSaver
saver = AsyncSaver()
saver.dump({"w": np.ones(10)}, sys.argv[1] + "/missing/x.ckpt")
"""

UNFINISHED = """
import sys
import numpy as np
from shardstep.checkpoints import AsyncSaver
saver = AsyncSaver()
saver.dump({"w": np.arange(4 << 20, dtype=np.float64)}, sys.argv[1] + "/big.ckpt")
"""


def test_an_unreported_failure_is_printed_at_exit(tmp_path):
    out = subprocess.run([sys.executable, "-c", UNREPORTED, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert "the asynchronous save of" in out.stderr and "failed and was never reported" in out.stderr, out.stderr


def test_exiting_without_close_still_finishes_the_write(tmp_path):
    subprocess.run([sys.executable, "-c", UNFINISHED, str(tmp_path)], cwd=ROOT, check=True, timeout=60)
    assert_identical({"w": np.arange(4 << 20, dtype=np.float64)}, checkpoints.load(tmp_path / "big.ckpt"))


def test_staging_buffers_are_reused_by_the_next_save_of_the_same_shapes(tmp_path):
    state = {"w": np.ones((300, 10), np.float32), "b": np.zeros(10, np.float32)}
    with AsyncSaver() as saver:
        saver.dump(state, tmp_path / "a.ckpt")
        saver.wait()
        first = {id(a) for a in saver._staged} | {id(a) for pool in saver._idle.values() for a in pool}
        saver.wait()  # waiting again must not drop the pool
        state["w"] += 1
        saver.dump(state, tmp_path / "b.ckpt")
        assert {id(a) for a in saver._staged} == first
    assert_identical(state, checkpoints.load(tmp_path / "b.ckpt"))
