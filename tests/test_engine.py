"""The distributed engine against the local loop: bit-identical parameters for every
elementwise optimizer, shard count and backend; exact resume; recovery from killed actors."""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import pytest

from shardstep.checkpoints import committed_steps, open_checkpoint
from shardstep.service.coordinator import CHECKPOINT_DIR, Coordinator
from shardstep.service.errors import NonFiniteError, RunFailedError
from shardstep.service.jobspec import JobSpec, SchedulerSpec
from shardstep.workers.optim import get_default_dtype
from shardstep.workers.optim.registry import NAMES, rule
from shardstep.workers.optim.rule import using_default_dtype
from shardstep.workers.tasks import make_task
from shardstep.workers.training import Trainer
from tests.runs import assert_same

# every elementwise optimizer with arguments that exercise its options
ELEMENTWISE = {
    "sgd": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
    "adagrad": {"lr": 0.05, "lr_decay": 1e-3},
    "rmsprop": {"lr": 1e-3, "momentum": 0.5, "centered": True},
    "adadelta": {"lr": 1.0},
    "adam": {"lr": 1e-2, "amsgrad": True},
    "adamw": {"lr": 1e-2, "weight_decay": 0.05},
    "adamax": {"lr": 1e-2},
    "nadam": {"lr": 1e-2, "decoupled_weight_decay": True, "weight_decay": 0.01},
    "radam": {"lr": 1e-2},
    "asgd": {"lr": 0.05, "t0": 3.0},
    "rprop": {"lr": 1e-3},
}
# the optimizers whose scalar state goes beyond the step counter (NAdam's mu_product, ASGD's
# eta and mu): the ones training.scalar_dtype changes most
EXTRA_SCALAR_STATE = [name for name in NAMES if rule(name).accepts_dense and set(rule(name).scalar_state) - {"step"}]
STEPS = 7


def test_the_elementwise_table_names_every_elementwise_optimizer():
    """ELEMENTWISE is hand-written (each optimizer's arguments); it must name exactly the
    registry's optimizers with an elementwise (dense) rule, or the engine tests leave one out."""
    registry = [name for name in NAMES if rule(name).accepts_dense]
    missing, unknown = sorted(set(registry) - set(ELEMENTWISE)), sorted(set(ELEMENTWISE) - set(registry))
    assert not missing and not unknown, (
        f"tests/test_engine.py ELEMENTWISE: add {missing} with arguments that exercise their options; "
        f"remove {unknown} (not elementwise optimizers of shardstep.workers.optim.registry)")


def job(tmp_path, name="run", **fields) -> JobSpec:
    # three workers: with two, the reduction order could not matter (a + b == b + a)
    values = dict(task="digits", task_args={}, optimizer="adam", optimizer_args={"lr": 1e-2},
                  param_groups=None, schedulers=(), steps=STEPS, epochs=None, batch_size=128, seed=3,
                  shards=2, workers=3, backend="inline", run_dir=str(tmp_path / name))
    values.update(fields)
    return JobSpec(**values)


def local_run(spec: JobSpec, steps: int | None = None) -> dict[str, np.ndarray]:
    """The plain single-process loop with the same workers and seed."""
    assert len(spec.schedulers) <= 1
    scheduler = spec.schedulers[0] if spec.schedulers else None
    trainer = Trainer(make_task(spec.task, **spec.task_args), seed=spec.seed, batch_size=spec.batch_size,
                      optimizer=spec.optimizer, optimizer_kwargs=spec.optimizer_args,
                      scheduler=None if scheduler is None else scheduler.name,
                      scheduler_kwargs=None if scheduler is None else scheduler.args,
                      scheduler_interval="step" if scheduler is None else scheduler.interval,
                      world_size=spec.workers)
    return trainer.run(steps=steps or spec.steps).params




# ---------------------------------------------------------------------------------------
# every elementwise optimizer, N in {1, 2, 3}, inline and Ray, equal to the local loop


# (backend, shards, transport, the transport the run must report): on the local Ray instance
# "auto" means shared memory; the object store carries the step at N=2
ENGINE_CASES = [("inline", 1, "auto", "inline"), ("inline", 2, "auto", "inline"), ("inline", 3, "auto", "inline"),
                ("ray", 1, "auto", "shared_memory"), ("ray", 2, "object_store", "object_store"),
                ("ray", 3, "auto", "shared_memory")]


@pytest.mark.parametrize("optimizer", sorted(ELEMENTWISE))
def test_elementwise_optimizers_match_the_local_loop_bit_for_bit(optimizer, tmp_path, ray_address):
    schedulers = (SchedulerSpec("StepLR", {"step_size": 3, "gamma": 0.5}),)
    base = job(tmp_path, optimizer=optimizer, optimizer_args=ELEMENTWISE[optimizer], schedulers=schedulers)
    reference = local_run(base)
    for backend, shards, transport, used in ENGINE_CASES:
        spec = base.replace(backend=backend, shards=shards, transport=transport,
                            run_dir=str(tmp_path / f"{backend}-{shards}"))
        result = Coordinator(spec).run()
        assert result.steps == STEPS
        assert result.transport == used
        assert_same(result.params, reference, f"{optimizer} {backend} N={shards} {used}: ")


def test_row_sparse_gradients_reach_the_owning_shards(tmp_path, ray_address):
    """SparseAdam on embedding tables: each shard receives only its rows (with shared memory
    the dense gradients go through the workers' regions and the sparse ones with the results)."""
    base = job(tmp_path, task="ratings", optimizer="sparse_adam", optimizer_args={"lr": 0.02},
               batch_size=256, steps=6)
    reference = local_run(base)
    for backend, shards, transport in (("inline", 3, "auto"), ("ray", 2, "shared_memory"), ("ray", 3, "object_store")):
        spec = base.replace(backend=backend, shards=shards, transport=transport,
                            run_dir=str(tmp_path / f"{backend}-{shards}"))
        result = Coordinator(spec).run()
        assert result.transport == (transport if backend == "ray" else "inline")
        assert_same(result.params, reference, f"{backend} N={shards} {transport}: ")


def shared_regions() -> list[tuple[str, int]]:
    """The shared-memory regions this process holds open: (link target, inode)."""
    regions = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            inode = os.stat(f"/proc/self/fd/{fd}").st_ino
        except OSError:  # the directory's own descriptor, closed by now
            continue
        if target.startswith("/memfd:shardstep-"):
            regions.append((target, inode))
    return sorted(regions)


def test_shared_memory_regions_live_exactly_as_long_as_the_actors(tmp_path, ray_address):
    """One parameter region and one gradient region per worker while the actors run, created
    afresh when a killed actor is replaced, and none left open after the run."""
    assert shared_regions() == []
    seen = []
    box: dict = {}
    kill = kill_at(box, 5, "worker")

    def on_step(record: dict) -> None:
        seen.append((record["step"], shared_regions()))
        kill(record)

    base = job(tmp_path, backend="ray", workers=2, steps=8, checkpoint_every=4, checkpoint_async=False,
               max_failures=1)
    coordinator = Coordinator(base, on_step=on_step)
    box["coordinator"] = coordinator
    result = coordinator.run()
    assert result.transport == "shared_memory" and result.failures == 1
    expected = ["/memfd:shardstep-grads-0 (deleted)", "/memfd:shardstep-grads-1 (deleted)",
                "/memfd:shardstep-params (deleted)"]
    assert [[target for target, _ in regions] for _, regions in seen] == [expected] * len(seen)
    # the kill after step 5 surfaces at step 6, or at step 7 when the worker had already
    # finished step 6's computation; either way the run restarts from the checkpoint at 4
    steps = [step for step, _ in seen]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[:restart] in ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]) and steps[restart:] == [5, 6, 7, 8]
    before, after = {tuple(r) for _, r in seen[:restart]}, {tuple(r) for _, r in seen[restart:]}
    assert len(before) == len(after) == 1 and before != after  # new regions for the new actors
    assert shared_regions() == []
    assert_same(result.params, local_run(base), "after the recovery: ")


def test_sharding_is_balanced_to_one_row(tmp_path):
    spec = job(tmp_path, shards=3)
    coordinator = Coordinator(spec)
    result = coordinator.run()
    layout = coordinator.layout
    for param in layout.params:
        counts = [np.subtract(*layout.row_range(param.name, s)[::-1]) for s in range(3)]
        assert max(counts) - min(counts) <= 1 and sum(counts) == param.rows
    assert result.steps == STEPS
    assert [state.name for state in coordinator.state_log] == [
        "Preparing", "Starting", "Running", "Finishing", "Done"]


# ---------------------------------------------------------------------------------------
# resume


@pytest.mark.parametrize("backend, first, second", [("inline", 2, 3), ("inline", 3, 1), ("ray", 2, 1)])
def test_resume_at_any_checkpoint_is_bit_identical(tmp_path, backend, first, second, ray_address):
    """Stop at a checkpoint, resume with another shard count: the same parameters, with a
    scheduler ticking per epoch on the loss, the data order and the optimizer state carried."""
    schedulers = (SchedulerSpec("ReduceLROnPlateau", {"patience": 0, "factor": 0.5}, interval="epoch"),
                  SchedulerSpec("CosineAnnealingLR", {"T_max": 9}))
    base = job(tmp_path, optimizer="adamw", optimizer_args={"lr": 0.03}, schedulers=schedulers, batch_size=512,
               steps=13, checkpoint_every=4, backend=backend, shards=first)
    uninterrupted = Coordinator(base.replace(run_dir=str(tmp_path / "full"))).run()
    assert uninterrupted.epoch >= 3  # several epoch boundaries: the plateau scheduler ticked
    for stop in (4, 8):
        run_dir = str(tmp_path / f"stop-{stop}")
        Coordinator(base.replace(run_dir=run_dir, steps=stop)).run()
        assert committed_steps(os.path.join(run_dir, CHECKPOINT_DIR))[-1] == stop
        resumed = Coordinator(base.replace(run_dir=run_dir, shards=second)).run()
        assert resumed.steps == 13
        assert_same(resumed.params, uninterrupted.params, f"stopped at {stop}: ")
        assert resumed.metrics == uninterrupted.metrics


@pytest.mark.parametrize("optimizer", EXTRA_SCALAR_STATE)
def test_scalar_dtype_float64_runs_as_torchs_float64_default(optimizer, tmp_path, ray_address):
    """training.scalar_dtype = "float64": every shard creates its scalar state in float64
    (as torch under its float64 default), on either backend, without changing the driver's
    default; the checkpoint keeps it float64 and a resume with another shard count goes on
    bit-identically."""
    base = job(tmp_path, optimizer=optimizer, optimizer_args=ELEMENTWISE[optimizer], scalar_dtype="float64",
               steps=8, checkpoint_every=4)
    with using_default_dtype("float64"):
        reference = local_run(base)
    if optimizer == "nadam":
        # ASGD reads eta and mu in the parameter's dtype (float32 here), so only NAdam's
        # mu_product changes float32 parameters; for ASGD the checkpoint's dtypes tell
        assert any(not np.array_equal(reference[name], value) for name, value in local_run(base).items()), \
            "float32 and float64 scalar state gave the same parameters: the test could not tell them apart"
    for backend, shards in (("inline", 2), ("ray", 3)):
        run_dir = tmp_path / f"{backend}-{shards}"
        result = Coordinator(base.replace(backend=backend, shards=shards, run_dir=str(run_dir))).run()
        assert_same(result.params, reference, f"{optimizer} {backend} N={shards}: ")
        assert get_default_dtype() == np.float32
        with open_checkpoint(run_dir / CHECKPOINT_DIR) as checkpoint:
            state = checkpoint.load_shard(0, 1)["state"]
        scalars = {(name, key): value.dtype for name, entries in state.items() for key, value in entries.items()
                   if isinstance(value, np.ndarray) and value.ndim == 0}
        assert scalars and set(scalars.values()) == {np.dtype(np.float64)}, scalars
    stopped = tmp_path / "stopped"
    Coordinator(base.replace(steps=4, run_dir=str(stopped))).run()
    resumed = Coordinator(base.replace(shards=1, run_dir=str(stopped))).run()
    assert_same(resumed.params, reference, f"{optimizer} resumed at step 4 on 1 shard: ")


# ---------------------------------------------------------------------------------------
# failures


def kill_at(coordinator_box, step, kind):
    """An on_step callback that SIGKILLs one actor's process after ``step``."""

    def callback(record):
        if record["step"] == step and not coordinator_box.get("killed"):
            coordinator = coordinator_box["coordinator"]
            shards = len(coordinator.shards)
            _, pid = coordinator.pids[0 if kind == "shard" else shards]
            os.kill(pid, signal.SIGKILL)
            coordinator_box["killed"] = pid

    return callback


@pytest.mark.parametrize("kind", ["shard", "worker"])
def test_a_killed_actor_is_replaced_and_the_run_ends_bit_identical(tmp_path, kind, ray_address):
    base = job(tmp_path, backend="ray", steps=11, checkpoint_every=4, max_failures=1)
    reference = local_run(base)
    box: dict = {}
    coordinator = Coordinator(base, on_step=kill_at(box, 6, kind))
    box["coordinator"] = coordinator
    result = coordinator.run()
    assert box["killed"] and result.failures == 1
    assert "Recovering" in [state.name for state in coordinator.state_log]
    assert [r["step"] for r in result.history] == list(range(1, 12))
    assert_same(result.params, reference)


def test_failures_beyond_max_failures_stop_the_run_with_checkpoints_intact(tmp_path, ray_address):
    base = job(tmp_path, backend="ray", steps=11, checkpoint_every=4, checkpoint_async=False, max_failures=0)
    box: dict = {}
    coordinator = Coordinator(base, on_step=kill_at(box, 5, "shard"))
    box["coordinator"] = coordinator
    with pytest.raises(RunFailedError, match=r"max_failures=0.*intact \(latest: step 4\).*shardstep resume"):
        coordinator.run()
    assert coordinator.state.name == "Failed"
    root = os.path.join(base.run_dir, CHECKPOINT_DIR)
    assert committed_steps(root) == [4]
    with open_checkpoint(root) as checkpoint:
        params, _ = checkpoint.export()
    assert_same(params, local_run(base, steps=4))
    # and the run resumes from there to the uninterrupted result
    assert_same(Coordinator(base.replace(max_failures=0)).run().params, local_run(base))


# ---------------------------------------------------------------------------------------
# non-finite values


def nan_task():
    """digits whose gradient of one parameter turns NaN on global batch 2 of epoch 0."""
    from shardstep.workers.tasks.digits import DigitsTask

    class Exploding(DigitsTask):
        def loss_and_grad(self, params, batch):
            loss, grads = super().loss_and_grad(params, batch)
            if batch.epoch == 0 and batch.index == 2:
                grads["2.bias"] = np.full_like(grads["2.bias"], np.nan)
            return loss, grads

    return Exploding()


def test_a_non_finite_gradient_stops_the_run_naming_step_and_parameter(tmp_path):
    spec = job(tmp_path, checkpoint_every=1, checkpoint_async=False, steps=6)
    with pytest.raises(NonFiniteError, match=r"gradients of 2\.bias are not finite at step 3 \(epoch 0, batch 2\)"):
        Coordinator(spec, task=nan_task()).run()
    root = os.path.join(spec.run_dir, CHECKPOINT_DIR)
    assert committed_steps(root) == [1, 2]
    with open_checkpoint(root) as checkpoint:
        params, optimizer = checkpoint.export()
    assert all(np.isfinite(a).all() for a in params.values())
    assert all(np.isfinite(v).all() for s in optimizer["state"].values() for v in s.values()
               if isinstance(v, np.ndarray))


def test_skip_policy_skips_the_step_and_goes_on(tmp_path):
    spec = job(tmp_path, nonfinite="skip", steps=6)
    result = Coordinator(spec, task=nan_task()).run()
    skipped = [r for r in result.history if r.get("skipped")]
    assert len(skipped) == 1 and skipped[0]["batch"] == 2 and "2.bias" in skipped[0]["message"]
    assert result.steps == 6 and all(np.isfinite(a).all() for a in result.params.values())


def test_clipping_bounds_the_global_norm(tmp_path):
    """With a tiny max norm every update is the clipped gradient: SGD moves each step by
    exactly lr * max_norm in global norm."""
    spec = job(tmp_path, optimizer="sgd", optimizer_args={"lr": 1.0}, clip_grad_norm=1e-3, steps=1, shards=3)
    initial = make_task("digits").init_params(spec.seed)
    result = Coordinator(spec).run()
    moved = math.sqrt(sum(float(np.sum((result.params[n].astype(np.float64) - initial[n]) ** 2)) for n in initial))
    assert moved == pytest.approx(1e-3, rel=1e-4)


# ---------------------------------------------------------------------------------------
# LBFGS across shards


def lbfgs_job(tmp_path, name, **args):
    options = {"lr": 1.0, "max_iter": 20, "history_size": 10, "line_search_fn": "strong_wolfe"}
    options.update(args)
    return job(tmp_path, name, task="least-squares", optimizer="lbfgs", optimizer_args=options,
               batch_size=10_000, steps=3, shards=3, workers=2)


def test_sharded_lbfgs_matches_the_single_process_lbfgs(tmp_path):
    spec = lbfgs_job(tmp_path, "lbfgs")
    reference = local_run(spec)
    result = Coordinator(spec).run()
    for name in reference:
        scale = np.abs(reference[name]).max()
        assert np.abs(result.params[name] - reference[name]).max() <= 1e-6 * scale


def test_lbfgs_round_trips_per_iteration_do_not_grow_with_the_history(tmp_path):
    counts = {}
    for history in (2, 40):
        # zero tolerances: every step runs all max_iter iterations whatever the history
        spec = lbfgs_job(tmp_path, f"h{history}", history_size=history, line_search_fn=None, max_iter=30,
                         tolerance_grad=0.0, tolerance_change=0.0, lr=0.1)
        coordinator = Coordinator(spec)
        coordinator.run()
        assert coordinator.optimizer.driver.n_iter == 90
        counts[history] = coordinator.space.round_trips
    assert counts[2] == counts[40]
    assert counts[2] <= 4 * 90 + 3 * 2  # per iteration: one Gram reduction, |g|inf, |d|inf, one evaluation


def test_sharded_lbfgs_exports_torch_layout_state(tmp_path):
    """export reassembles LBFGS's sharded vectors into torch's flat per-name layout under
    parameter 0, equal to the single-process LBFGS's state_dict."""
    from shardstep.checkpoints import load
    from shardstep.service.export import export_checkpoint

    spec = lbfgs_job(tmp_path, "lbfgs", history_size=3)
    Coordinator(spec).run()
    task = make_task(spec.task, **spec.task_args)
    trainer = Trainer(task, seed=spec.seed, batch_size=spec.batch_size, optimizer="lbfgs",
                      optimizer_kwargs=spec.optimizer_args, world_size=spec.workers)
    trainer.run(steps=spec.steps)
    expected = trainer.optimizer.state_dict()
    with open_checkpoint(os.path.join(spec.run_dir, CHECKPOINT_DIR)) as checkpoint:
        export_checkpoint(checkpoint, tmp_path / "out.ckpt")
    exported = load(tmp_path / "out.ckpt")["optimizer"]
    state, want = exported["state"][0], expected["state"][0]
    assert list(state) == list(want)   # torch's key order, from the driver's one declaration of its state
    assert state["func_evals"] == want["func_evals"] and state["n_iter"] == want["n_iter"]
    assert [np.asarray(state[key]).dtype for key in ("t", "H_diag")] == [np.asarray(want[key]).dtype for key in ("t", "H_diag")]
    for key in ("d", "prev_flat_grad", "t", "H_diag"):
        assert np.allclose(state[key], want[key], rtol=1e-6, atol=1e-12), key
    for key in ("old_dirs", "old_stps", "ro", "al"):
        assert len(state[key]) == len(want[key]) == 3
        for got, ref in zip(state[key], want[key]):
            assert np.allclose(got, ref, rtol=1e-6, atol=1e-12), key
    assert exported["param_groups"][0]["params"] == expected["param_groups"][0]["params"] == [0, 1]
    assert exported["param_groups"][0]["history_size"] == 3


# ---------------------------------------------------------------------------------------
# the driver's memory


@pytest.mark.parametrize("transport", ["shared_memory", "object_store"])
def test_the_driver_never_holds_the_model(transport):
    """A 20M-parameter (80 MB) run: the coordinator's peak private memory stays below 0.1 x the
    model's bytes above the same process idle (benchmarks/driver_memory.py; its own Ray)."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "benchmarks/driver_memory.py", "--params", "20000000", "--transport",
                           transport], capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["transport"] == transport and measured["model_bytes"] > 79_000_000
    assert measured["peak_above_idle"] < 0.1 * measured["model_bytes"], measured
