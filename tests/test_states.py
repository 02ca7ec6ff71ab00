"""The coordinator's state machine: every move in TRANSITIONS is taken by a real run (inline
where nothing needs a process to die, on the local Ray instance where actors are killed),
and the moves taken are exactly the declared ones."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from shardstep.checkpoints import CheckpointError
from shardstep.service.coordinator import TRANSITIONS, Coordinator
from shardstep.service.errors import ActorCallError, NonFiniteError, RunFailedError
from shardstep.service.jobspec import InitSpec, JobSpec
from shardstep.workers.tasks import make_task
from shardstep.workers.training import Trainer
from tests.runs import assert_same

DECLARED = {(before.__name__, after.__name__) for before, afters in TRANSITIONS.items() for after in afters}


def job(run_dir: Path, **fields) -> JobSpec:
    values = dict(task="digits", task_args={}, optimizer="adam", optimizer_args={"lr": 1e-2}, param_groups=None,
                  schedulers=(), steps=6, epochs=None, batch_size=128, seed=3, shards=2, workers=2,
                  backend="inline", checkpoint_every=2, checkpoint_async=False, run_dir=str(run_dir))
    values.update(fields)
    return JobSpec(**values)


def moves(coordinator: Coordinator) -> set[tuple[str, str]]:
    names = [state.name for state in coordinator.state_log]
    return set(zip(names, names[1:]))


def run(spec: JobSpec, error: type[BaseException] | None = None, **hooks) -> Coordinator:
    coordinator = Coordinator(spec, **hooks)
    if error is None:
        coordinator.run()
    else:
        with pytest.raises(error):
            coordinator.run()
        assert coordinator.state.name == "Failed" and coordinator.actors is None
    return coordinator


def replace_with_a_file(path: Path) -> None:
    """The checkpoints directory becomes a file: the next checkpoint cannot be written."""
    path.rename(path.with_name("checkpoints-moved"))
    path.write_text("not a directory")


def test_every_declared_move_is_taken(tmp_path, ray_address):
    taken: set[tuple[str, str]] = set()

    # Preparing -> Starting -> Running <-> Checkpointing, Running -> Finishing -> Done
    taken |= moves(run(job(tmp_path / "plain")))
    # Preparing -> Failed: a fine-tuning source that does not exist
    taken |= moves(run(job(tmp_path / "no-source", init=InitSpec(str(tmp_path / "nowhere"))), ValueError))
    # Starting -> Failed: the shards cannot build the initial parameters
    taken |= moves(run(job(tmp_path / "no-init", task="tests.fault_tasks:NoInitialParameters"), ActorCallError))
    # Running -> Failed: a non-finite loss
    taken |= moves(run(job(tmp_path / "nan", task="tests.fault_tasks:NaNAtStep"), NonFiniteError))
    # Checkpointing -> Failed and Finishing -> Failed: the checkpoints directory goes away (the
    # run fails, with the storage's CheckpointError as the cause)
    for name, at, steps in (("lost-dir", 2, 6), ("lost-dir-at-end", 5, 5)):
        root = tmp_path / name / "checkpoints"
        spec = job(tmp_path / name, steps=steps, checkpoint_every=2 if name == "lost-dir" else None)
        coordinator = run(spec, RunFailedError, on_step=lambda r, root=root, at=at: r["step"] == at and
                          replace_with_a_file(root))
        assert isinstance(coordinator.state.error.__cause__, CheckpointError), coordinator.state.error
        taken |= moves(coordinator)

    # On Ray: Starting -> Recovering (a worker dies as it starts), Recovering -> Starting,
    # Running -> Recovering (step 1), Checkpointing -> Recovering (a checkpoint step),
    # Finishing -> Recovering (the last step, which does not checkpoint)
    marker = tmp_path / "died"
    kills = {(1, 1): "shard", (2, 4): "shard", (3, 5): "shard"}  # (failures so far, step): whose process
    box: dict = {}

    def kill(record: dict) -> None:
        coordinator = box["coordinator"]
        victim = kills.pop((coordinator.failures, record["step"]), None)
        if victim is not None:
            _, pid = coordinator.pids[0 if victim == "shard" else len(coordinator.shards)]
            os.kill(pid, signal.SIGKILL)

    spec = job(tmp_path / "ray", backend="ray", steps=5, checkpoint_every=2, max_failures=4,
               task="tests.fault_tasks:DiesOnFirstStart", task_args={"marker": str(marker)})
    coordinator = Coordinator(spec, on_step=kill)
    box["coordinator"] = coordinator
    result = coordinator.run()
    assert marker.exists() and kills == {} and result.failures == 4
    recovered_from = [before.name for before, after in zip(coordinator.state_log, coordinator.state_log[1:])
                      if after.name == "Recovering"]
    assert recovered_from == ["Starting", "Running", "Checkpointing", "Finishing"], recovered_from
    taken |= moves(coordinator)
    reference = Trainer(make_task("digits"), seed=3, batch_size=128, optimizer="adam",
                        optimizer_kwargs={"lr": 1e-2}, world_size=2).run(steps=5).params
    assert_same(result.params, reference)

    # Recovering -> Failed: a process lost with no failures allowed
    (tmp_path / "died-again").unlink(missing_ok=True)
    spec = job(tmp_path / "ray-0", backend="ray", max_failures=0, task="tests.fault_tasks:DiesOnFirstStart",
               task_args={"marker": str(tmp_path / "died-again")})
    failed = run(spec, RunFailedError)
    taken |= moves(failed)
    # the first line says which actor was lost, where and why; Ray's own text follows it
    first, *details = str(failed.state.error).splitlines()
    assert re.fullmatch(r"an actor was lost: (ShardActor|GradientWorker) \(pid \d+, node 127\.0\.0\.1\): .+; this is "
                        r"failure 1 and the job allows max_failures=0\. The committed checkpoints in .+ are intact "
                        r"\(latest: step None\); continue with `shardstep resume .+`", first), first
    assert details and "class_name:" in "\n".join(details)

    assert taken == DECLARED, (f"never taken: {sorted(DECLARED - taken)}; taken but not declared: "
                               f"{sorted(taken - DECLARED)}")


def test_a_shard_that_does_not_see_the_run_directory_says_it_must_be_shared(tmp_path):
    """What a shard on a node without the coordinator's run directory reports, before it
    holds anything (the run then fails at its start, naming the way out)."""
    from shardstep.checkpoints import ShardLayout
    from shardstep.workers.shard import ShardActor

    task = make_task("digits")
    layout = ShardLayout(task.param_specs(), 2)
    groups = [{"params": [spec.name for spec in layout.params]}]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "job.json").write_text('{"run_id": "another-run"}')
    for run_dir, why in ((tmp_path / "missing", f"cannot read {tmp_path / 'missing' / 'job.json'}"),
                         (tmp_path / "run", f"{tmp_path / 'run' / 'job.json'} belongs to run 'another-run', not 'this-run'")):
        with pytest.raises(RuntimeError) as raised:
            ShardActor(1, layout, "adam", groups, None, init={"task": task, "seed": 0},
                       run_dir={"run_dir": str(run_dir), "run_id": "this-run"})
        message = str(raised.value)
        assert message.startswith(f"shard 1 on host {os.uname().nodename} does not see the run directory {run_dir}: "
                                  f"{why}"), message
        assert message.endswith("The run directory must be on storage every node shares, at the same path")
