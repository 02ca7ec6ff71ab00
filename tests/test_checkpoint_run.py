"""Sharded run checkpoints: the layout rule, shard files written by parallel processes,
atomic commit, N -> M resharding, export to torch's layout, byte ranges read, retention,
leftovers and every refusal."""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil

import numpy as np
import pytest

from shardstep import checkpoints
from shardstep.checkpoints import (
    CheckpointError,
    CheckpointStore,
    CorruptCheckpointError,
    ParamSpec,
    Retention,
    ShardLayout,
    committed_steps,
    latest_step,
    open_checkpoint,
    partition,
    write_shard,
)
from shardstep.workers.optim import Adam, Parameter, RowSparseGrad, SparseAdam
from tests.checkpoints import SPECS, assert_identical, named_state, shard_inputs
from tests.checkpoints.processes import commit_expected, expected_full, expected_shard, parallel_shard_writer

_save = commit_expected


# -- the layout -------------------------------------------------------------------------------

@pytest.mark.parametrize("numel", [0, 1, 2, 3, 7, 64, 1000, 10**9 + 7])
@pytest.mark.parametrize("shards", [1, 2, 3, 5, 8, 64])
def test_partition_tiles_in_order_and_is_balanced(numel, shards):
    bounds = partition(numel, shards)
    assert bounds[0] == 0 and bounds[-1] == numel and len(bounds) == shards + 1
    sizes = [b - a for a, b in zip(bounds, bounds[1:])]
    assert min(sizes) >= 0 and max(sizes) - min(sizes) <= 1
    assert bounds == [s * numel // shards for s in range(shards + 1)]


def test_layout_slices_follow_the_row_partition_of_each_parameter():
    layout = ShardLayout(SPECS, 4)
    for spec in SPECS:
        bounds = partition(spec.rows, 4)
        assert [layout.row_range(spec.name, s) for s in range(4)] == list(zip(bounds, bounds[1:]))
        assert [layout.slice(spec.name, s) for s in range(4)] == [
            (a * spec.row_size, b * spec.row_size) for a, b in zip(bounds, bounds[1:])]
    assert list(layout.slices(2)) == [s.name for s in SPECS]


@pytest.mark.parametrize("make, error, message", [
    (lambda: ShardLayout(SPECS, 0), ValueError, "num_shards must be an int >= 1; got 0"),
    (lambda: ShardLayout((SPECS[0], SPECS[0]), 2), ValueError, "parameter names must be unique; repeated: big"),
    (lambda: ParamSpec("w", (2,), "float128"), ValueError, "dtype 'float128' is not allowed; allowed: bool"),
    (lambda: ParamSpec("w", (2, -1), "float32"), ValueError, r"shape must be a tuple of non-negative ints; got \(2, -1\)"),
    (lambda: ParamSpec("", (2,), "float32"), ValueError, "parameter name must be a non-empty str"),
    (lambda: ShardLayout(SPECS, 2).slice("big", 2), ValueError, r"shard must be an int in \[0, 2\); got 2"),
    (lambda: ShardLayout(SPECS, 2).slice("nope", 0), KeyError, "unknown parameter 'nope'"),
    (lambda: partition(5, 0), ValueError, "num_shards must be an int >= 1; got 0"),
])
def test_bad_layouts_are_refused(make, error, message):
    with pytest.raises(error, match=message):
        make()


# -- writing in parallel and committing ----------------------------------------------------

def test_shard_files_are_written_by_parallel_processes_then_committed(tmp_path):
    """Four processes each make and write only their own slices, released together by a
    barrier; their writes overlap in time; the parent only commits."""
    layout = ShardLayout(SPECS + (ParamSpec("wide", (4, 1_000_000), "float32"),), 4)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["numpy", "shardstep.checkpoints", "tests.checkpoints.processes"])
    barrier, times = context.Barrier(layout.num_shards), context.Queue()
    with CheckpointStore(tmp_path, run_id="run") as store:
        pending = store.begin(9, layout)
        workers = [context.Process(target=parallel_shard_writer, args=(pending, s, 9, barrier, times))
                   for s in range(layout.num_shards)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(120)
            assert worker.exitcode == 0
        reports = sorted(times.get(timeout=5) for _ in workers)
        assert len({pid for _, pid, _, _ in reports}) == 4 and os.getpid() not in {r[1] for r in reports}
        starts, ends = [r[2] for r in reports], [r[3] for r in reports]
        assert max(starts) < min(ends), f"the writes did not overlap: {reports}"
        store.commit(pending)
    params, state_dict = open_checkpoint(tmp_path).export()
    full_params, full_state = expected_full(layout, 9)
    assert_identical(full_params, params)
    assert_identical({i: full_state[s.name] for i, s in enumerate(layout.params)}, state_dict["state"])


@pytest.mark.parametrize("saved", [1, 2, 3, 4, 5])
def test_n_shards_load_into_m_shards_bit_identically(saved, run_root):
    layout = ShardLayout(SPECS, saved)
    _save(run_root, 3, layout)
    full_params, full_state = expected_full(layout, 3)
    with open_checkpoint(run_root) as checkpoint:
        assert checkpoint.layout == layout
        params, state_dict = checkpoint.export()
        assert_identical(full_params, params)
        assert_identical({i: full_state[s.name] for i, s in enumerate(SPECS)}, state_dict["state"])
        for loaded in range(1, 6):
            target = ShardLayout(SPECS, loaded)
            for shard in range(loaded):
                got = checkpoint.load_shard(shard, loaded)
                assert_identical(dict(zip(("params", "state"), expected_shard(target, shard, 3))), got)


def test_a_new_shard_reads_only_its_byte_ranges(tmp_path):
    """From /proc/self/io: loading 1 of 8 shards reads its eighth of every array plus at most
    one checksum chunk (1 MiB) at each end of each range, not the whole checkpoint."""
    layout = ShardLayout((ParamSpec("w", (4_000_000,), "float32"),), 1)
    _save(tmp_path, 1, layout)

    def bytes_read():
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])

    with open_checkpoint(tmp_path) as checkpoint:
        checkpoint.load_shard(0, 1)  # opens the file and reads its header once
        before = bytes_read()
        checkpoint.load_shard(3, 8)
        used = bytes_read() - before
    share = 3 * 4_000_000 * 4 // 8  # param, exp_avg, exp_avg_sq
    assert share <= used <= share + 3 * 2 * (1 << 20), used


def test_export_matches_a_real_optimizer_and_training_continues_identically(run_root):
    rng = np.random.default_rng(3)
    names = ["w", "b", "v"]
    data = [rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal(4).astype(np.float32),
            rng.standard_normal(9).astype(np.float32)]
    grads = [[rng.standard_normal(a.shape).astype(np.float32) for a in data] for _ in range(6)]

    def build():
        params = [Parameter(a.copy(), name=n) for n, a in zip(names, data)]
        return params, Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.01, "amsgrad": True}],
                            betas=(0.8, 0.95))

    def train(params, optimizer, steps):
        for grad in steps:
            for p, g in zip(params, grad):
                p.grad = g.copy()
            optimizer.step()

    params, optimizer = build()
    train(params, optimizer, grads[:3])
    state, groups = named_state(optimizer, names)
    full = {n: p.data for n, p in zip(names, params)}
    layout = ShardLayout.from_arrays(full, 3)
    with CheckpointStore(run_root, run_id="adam") as store:
        pending = store.begin(3, layout)
        for shard in range(3):
            write_shard(pending, shard, *shard_inputs(layout, shard, full, state))
        store.commit(pending, param_groups=groups)

    exported_params, exported = open_checkpoint(run_root).export()
    assert_identical(optimizer.state_dict(), exported)
    resumed_params = [Parameter(exported_params[n], name=n) for n in names]
    resumed = Adam([{"params": resumed_params[:2]}, {"params": resumed_params[2:], "lr": 0.01, "amsgrad": True}])
    resumed.load_state_dict(exported)
    train(params, optimizer, grads[3:])
    train(resumed_params, resumed, grads[3:])
    for p, q in zip(params, resumed_params):
        assert p.data.tobytes() == q.data.tobytes()


def test_sparse_adam_int_steps_survive_sharding(run_root):
    params = [Parameter(np.ones((5, 2), np.float32), name="e")]
    optimizer = SparseAdam(params)
    params[0].grad = RowSparseGrad(np.array([1, 3]), np.ones((2, 2), np.float32), (5, 2))
    optimizer.step()
    state, groups = named_state(optimizer, ["e"])
    layout = ShardLayout.from_arrays({"e": params[0].data}, 2)
    with CheckpointStore(run_root, run_id="sparse") as store:
        pending = store.begin(1, layout)
        for shard in range(2):
            write_shard(pending, shard, *shard_inputs(layout, shard, {"e": params[0].data}, state))
        store.commit(pending, param_groups=groups)
    _, exported = open_checkpoint(run_root).export()
    assert type(exported["state"][0]["step"]) is int
    assert_identical(optimizer.state_dict(), exported)


def test_manifest_records_the_run_and_the_coordinator_state(run_root):
    layout = ShardLayout(SPECS[1:3], 2)
    rng_state = np.random.default_rng(0).bit_generator.state
    extra = {"scheduler": {"last_epoch": 4, "last_lr": [0.1]}, "rng": rng_state, "data_position": (3, 128)}
    groups = [{"lr": 0.1, "betas": (0.9, 0.999), "params": ["tiny", "matrix"], "foreach": None}]
    _save(run_root, 4, layout, run_id="r-7", extra=extra, metrics={"loss": 0.25}, param_groups=groups)
    checkpoint = open_checkpoint(run_root, 4)
    assert (checkpoint.run_id, checkpoint.step, checkpoint.metrics) == ("r-7", 4, {"loss": 0.25})
    assert_identical(extra, checkpoint.extra)
    assert_identical(groups, checkpoint.param_groups)
    _, exported = checkpoint.export()
    # torch numbers parameters group by group: "tiny" is index 0 here
    assert exported["param_groups"] == [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0, 1], "foreach": None}]
    assert exported["state"][0]["exp_avg"].dtype == np.float16


# -- atomic commit, leftovers, the lock ---------------------------------------------------

def test_nothing_is_visible_before_commit_and_leftovers_are_cleaned(tmp_path):
    layout = ShardLayout(SPECS[1:], 2)
    _save(tmp_path, 1, layout)
    store = CheckpointStore(tmp_path, run_id="run")
    pending = store.begin(2, layout)
    for shard in range(2):
        write_shard(pending, shard, *expected_shard(layout, shard, 2))
    assert committed_steps(tmp_path) == [1] and latest_step(tmp_path) == 1
    with pytest.raises(CheckpointError, match=r"step 2 is not committed in .*; committed: \[1\]"):
        open_checkpoint(tmp_path, 2)
    assert store.cleanup() == []  # its own pending checkpoint is not a leftover
    (tmp_path / ".latest.ckpt.tmp-12-abcd").write_bytes(b"half")
    (tmp_path / "step-0000000007.deleting-ab12").mkdir()
    store.close()  # as if the process died here
    with CheckpointStore(tmp_path, run_id="run") as reopened:
        assert sorted(os.listdir(tmp_path)) == [".writer.lock", "step-0000000001"]
        assert reopened.latest() == 1


def test_commit_refuses_missing_or_inconsistent_shards_and_changes_nothing(tmp_path):
    layout = ShardLayout(SPECS[1:3], 3)
    with CheckpointStore(tmp_path, run_id="run") as store:
        pending = store.begin(5, layout)
        write_shard(pending, 0, *expected_shard(layout, 0, 5))
        write_shard(pending, 2, *expected_shard(layout, 2, 5))
        with pytest.raises(CheckpointError, match=r"cannot commit step 5: shard 1 of 3 was not written"):
            store.commit(pending)
        params, state = expected_shard(layout, 1, 5)
        state["matrix"]["step"] = np.array(4.0, np.float32)
        write_shard(pending, 1, params, state)
        with pytest.raises(CheckpointError, match=r"shard 1's optimizer state differs from shard 0's .*'matrix', 'step'"):
            store.commit(pending)
        assert committed_steps(tmp_path) == []
        write_shard(pending, 1, *expected_shard(layout, 1, 5))
        with pytest.raises(ValueError, match=r"param_groups\[0\] lists 'nope', which the layout does not have"):
            store.commit(pending, param_groups=[{"params": ["nope"]}])
        with pytest.raises(ValueError, match=r"optimizer state for parameters \['tiny'\] that no param group lists"):
            store.commit(pending, param_groups=[{"params": ["matrix"]}])
        with pytest.raises(ValueError, match=r"parameter 'matrix' is in param_groups\[0\] and param_groups\[1\]"):
            store.commit(pending, param_groups=[{"params": ["matrix", "tiny"]}, {"params": ["matrix"]}])
        with pytest.raises(TypeError, match=r"cannot save obj\[0\]\['fn'\]: values of type slice are not supported"):
            store.commit(pending, param_groups=[{"params": ["matrix", "tiny"], "fn": slice(2)}])
        with pytest.raises(ValueError, match=r"metrics must map names to numbers; got 'loss': 'low'"):
            store.commit(pending, metrics={"loss": "low"})
        assert committed_steps(tmp_path) == []
        store.commit(pending)
        assert committed_steps(tmp_path) == [5]
        with pytest.raises(CheckpointError, match="is not a pending checkpoint of this store"):
            store.commit(pending)
        with pytest.raises(CheckpointError, match="step 5 is already committed"):
            store.begin(5, layout)


@pytest.mark.parametrize("change, error, message", [
    (lambda p, s: p.pop("tiny"), ValueError, r"missing \['tiny'\]"),
    (lambda p, s: p.update(extra=np.zeros(1)), ValueError, r"unknown \['extra'\]"),
    (lambda p, s: p.update(tiny=np.zeros(5, np.float16)), ValueError,
     r"shard 1: params\['tiny'\] must be a 1-D array of the shard's 1 elements; got \(5,\)"),
    (lambda p, s: p.update(tiny=p["tiny"].astype(np.float32)), ValueError,
     r"params\['tiny'\] has dtype float32; the layout says float16"),
    (lambda p, s: s["matrix"].update(exp_avg=np.zeros((2, 5))), ValueError,
     r"state\['matrix'\]\['exp_avg'\] must be a 1-D array of the shard's 10 elements; got \(2, 5\)"),
    (lambda p, s: s["matrix"].update({3: 1}), TypeError, r"state\['matrix'\] key 3 must be a str"),
    (lambda p, s: s.update(ghost={}), ValueError, r"unknown in state \['ghost'\]"),
])
def test_write_shard_refuses_what_does_not_fit_the_layout(change, error, message, tmp_path):
    layout = ShardLayout(SPECS[1:3], 3)
    with CheckpointStore(tmp_path, run_id="run") as store:
        pending = store.begin(1, layout)
        params, state = expected_shard(layout, 1, 1)
        change(params, state)
        with pytest.raises(error, match=message):
            write_shard(pending, 1, params, state)
        assert os.listdir(pending.directory) == []


def test_one_writer_per_run_directory_and_one_run_per_directory(tmp_path):
    layout = ShardLayout(SPECS[1:3], 1)
    with CheckpointStore(tmp_path, run_id="a") as store:
        with pytest.raises(CheckpointError, match="is being written by another CheckpointStore"):
            CheckpointStore(tmp_path, run_id="a")
        _save(tmp_path, 1, layout, store=store)
    with CheckpointStore(tmp_path, run_id="b") as other:
        with pytest.raises(CheckpointError, match="holds checkpoints of run 'a'; this store writes run 'b'"):
            other.begin(2, layout)
    with pytest.raises(ValueError, match="run_id must be a non-empty str"):
        CheckpointStore(tmp_path, run_id="")
    with pytest.raises(TypeError, match="unexpected keyword argument 'keep'"):
        CheckpointStore(tmp_path, run_id="a", keep=3)


def test_damaged_or_swapped_shard_files_are_detected_on_load(tmp_path):
    layout = ShardLayout(SPECS[:2], 2)
    _save(tmp_path, 1, layout)
    _save(tmp_path, 2, layout)
    step1, step2 = tmp_path / "step-0000000001", tmp_path / "step-0000000002"
    shutil.copy(step1 / "shard-00001-of-00002.ckpt", step2 / "shard-00001-of-00002.ckpt")
    with pytest.raises(CorruptCheckpointError, match=r"shard-00001-of-00002.ckpt: size .* differ from the manifest's"):
        open_checkpoint(tmp_path, 2).export()
    shard = step1 / "shard-00000-of-00002.ckpt"
    intact = shard.read_bytes()
    for position, message in ((-1, "checksum mismatch in tensor"), (-62, "nonzero byte in the padding before")):
        data = bytearray(intact)
        data[position] ^= 1
        shard.write_bytes(data)
        with pytest.raises(CorruptCheckpointError, match=f"shard-00000-of-00002.ckpt: {message}"):
            open_checkpoint(tmp_path, 1).load_shard(0, 1)
    manifest = step1 / "manifest.ckpt"
    manifest.write_bytes(manifest.read_bytes()[:-1])
    with pytest.raises(CorruptCheckpointError, match=r"manifest.ckpt: .*truncated"):
        open_checkpoint(tmp_path, 1)


# -- retention ------------------------------------------------------------------------------

def _run_with(run_root, retention, losses):
    layout = ShardLayout(SPECS[1:3], 2)
    with CheckpointStore(run_root, run_id="run", retention=retention) as store:
        for step, loss in enumerate(losses, start=1):
            _save(run_root, step, layout, store=store, metrics={"loss": loss} if loss is not None else None)
    return committed_steps(run_root)


@pytest.mark.parametrize("retention, losses, kept", [
    (Retention(keep_last=2), [5, 4, 3, 2, 1], [4, 5]),
    (Retention(keep_every=3), [5, 4, 3, 2, 1, 0, 1], [3, 6, 7]),
    (Retention(keep_last=1, keep_every=2), [1] * 5, [2, 4, 5]),
    (Retention(keep_best=2, metric="loss"), [0.5, 0.1, 0.9, 0.2, 0.8], [2, 4, 5]),
    (Retention(keep_best=1, metric="loss", mode="max"), [0.5, 0.9, 0.1, None, 0.3], [2, 5]),
    (Retention(keep_best=1, metric="loss", keep_last=1), [0.1, 0.5, float("nan"), 0.7], [1, 4]),
    (Retention(), [1, 2, 3], [1, 2, 3]),
])
def test_retention_keeps_what_its_rules_say_and_always_the_newest(retention, losses, kept, run_root):
    assert _run_with(run_root, retention, losses) == kept


def test_retention_goes_on_past_an_older_checkpoint_whose_manifest_was_damaged(tmp_path):
    """Step 1's manifest is damaged after its commit: later commits still apply retention
    (the damaged step ranks nowhere among the best and goes when keep_last says so)."""
    layout = ShardLayout(SPECS[1:3], 2)
    with CheckpointStore(tmp_path, run_id="run", retention=Retention(keep_best=1, metric="loss", keep_last=1)) as store:
        _save(tmp_path, 1, layout, store=store, metrics={"loss": 0.1})
        _save(tmp_path, 2, layout, store=store, metrics={"loss": 0.5})
        manifest = tmp_path / "step-0000000001" / "manifest.ckpt"
        manifest.write_bytes(manifest.read_bytes()[:-1])
        _save(tmp_path, 3, layout, store=store, metrics={"loss": 0.7})
        _save(tmp_path, 4, layout, store=store, metrics={"loss": 0.6})
    assert committed_steps(tmp_path) == [2, 4]  # 2 is the best readable; 1 ranked nowhere and went


def test_retention_never_touches_a_checkpoint_being_written(run_root):
    layout = ShardLayout(SPECS[1:3], 2)
    with CheckpointStore(run_root, run_id="run", retention=Retention(keep_last=1)) as store:
        pending = store.begin(1, layout)  # slow writer, still open
        write_shard(pending, 0, *expected_shard(layout, 0, 1))
        _save(run_root, 2, layout, store=store)
        _save(run_root, 3, layout, store=store)
        assert committed_steps(run_root) == [3]
        assert pending.shard_path(0).is_file()
        write_shard(pending, 1, *expected_shard(layout, 1, 1))
        store.commit(pending)  # an older step committed late: the newest (3) stays
        assert committed_steps(run_root) == [3]


@pytest.mark.parametrize("kwargs, message", [
    ({"keep_last": 0}, "keep_last must be an int >= 1 or None; got 0"),
    ({"keep_every": True}, "keep_every must be an int >= 1 or None; got True"),
    ({"keep_best": 2}, "keep_best and metric go together; got keep_best=2, metric=None"),
    ({"metric": "loss"}, "keep_best and metric go together"),
    ({"keep_best": 1, "metric": "loss", "mode": "lowest"}, "mode must be 'min' or 'max'; got 'lowest'"),
])
def test_bad_retention_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Retention(**kwargs)
    with pytest.raises(TypeError, match="unexpected keyword argument 'keep_first'"):
        Retention(keep_first=1)


def test_open_checkpoint_without_any_commit_is_a_checkpoint_error(run_root):
    with pytest.raises(CheckpointError, match=f"no committed checkpoint in {re.escape(str(run_root))}"):
        checkpoints.open_checkpoint(run_root)
    assert latest_step(run_root / "missing") is None


def test_export_file_streams_the_consolidated_state_into_one_file(run_root, tmp_path):
    """The single-file export equals export(), and writing it never holds the state: 48 MB of
    arrays pass through with a peak of a few 8 MiB blocks (tracemalloc sees numpy's memory).
    From object storage too: the export reads exact byte ranges into the same blocks. Into
    object storage, the upload holds up to (PART_CONCURRENCY + 1) parts of PART_SIZE, so
    there the export is checked for its content."""
    import tracemalloc

    layout = ShardLayout((ParamSpec("w", (4_000_000,), "float32"),) + SPECS[1:], 3)
    _save(run_root, 1, layout, param_groups=[{"lr": 0.1, "params": [s.name for s in layout.params]}])
    with open_checkpoint(run_root) as checkpoint:
        tracemalloc.start()
        try:
            checkpoint.export_file(tmp_path / "consolidated.ckpt")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        params, state_dict = checkpoint.export()
        checkpoint.export_file(run_root / "consolidated.ckpt")
    assert peak < 20 << 20, f"peak {peak / 2**20:.1f} MiB while streaming 48 MB"
    for target in (tmp_path, run_root):
        assert_identical({"model": params, "optimizer": state_dict}, checkpoints.load(target / "consolidated.ckpt"))


@pytest.mark.torch_live
def test_a_torch_optimizer_state_goes_through_shards_and_back_into_torch(tmp_path):
    from tests.conftest import require_torch

    torch = require_torch()
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    optimizer = torch.optim.Adam([{"params": weights[:1]}, {"params": weights[1:], "lr": 0.01}], amsgrad=True)
    for _ in range(3):
        optimizer.zero_grad()
        (weights[0].sum() ** 2 + weights[1].pow(3).sum()).backward()
        optimizer.step()
    names = ["w", "b"]
    torch_state = optimizer.state_dict()
    state = {names[i]: {k: v.numpy().copy() for k, v in s.items()} for i, s in torch_state["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in torch_state["param_groups"]]
    full = {n: w.detach().numpy().copy() for n, w in zip(names, weights)}
    layout = ShardLayout.from_arrays(full, 2)
    with CheckpointStore(tmp_path, run_id="torch") as store:
        pending = store.begin(3, layout)
        for shard in range(2):
            write_shard(pending, shard, *shard_inputs(layout, shard, full, state))
        store.commit(pending, param_groups=groups)
    params, exported = open_checkpoint(tmp_path).export()
    as_tensors = {"state": {i: {k: torch.from_numpy(v) for k, v in s.items()} for i, s in exported["state"].items()},
                  "param_groups": exported["param_groups"]}
    fresh = [torch.nn.Parameter(torch.from_numpy(params[n])) for n in names]
    restored = torch.optim.Adam([{"params": fresh[:1]}, {"params": fresh[1:], "lr": 0.01}], amsgrad=True)
    restored.load_state_dict(as_tensors)
    reloaded = restored.state_dict()
    assert reloaded["param_groups"] == torch_state["param_groups"]
    for i, entries in torch_state["state"].items():
        for key, value in entries.items():
            assert torch.equal(reloaded["state"][i][key], value), (i, key)
