"""Early stopping on an evaluation metric ([early_stopping] metric, patience, min_delta,
mode): it stops where the metric says, with the same numbers at any shard count, survives a
resume from a checkpoint before the stop, a finished run is not trained further, and bad keys
are refused before anything starts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from shardstep.checkpoints import committed_steps
from shardstep.service import cli
from shardstep.workers.tasks import make_task
from shardstep.workers.training import Trainer
from tests.runs import DIGITS_JOB, assert_same, final_params

STOPPING = """
[early_stopping]
metric = "{metric}"
patience = {patience}
mode = "{mode}"
"""


def write_job(tmp_path: Path, *, shards: int = 2, metric: str = "loss", patience: int = 2, mode: str = "max",
              steps: int = 100, name: str = "run") -> Path:
    text = DIGITS_JOB.format(run_dir=tmp_path / name, task="digits", steps=steps, backend="inline", every=5)
    text = text.replace("seed = 5\n", "seed = 5\neval_every = 5\n", 1).replace("shards = 2", f"shards = {shards}")
    job = tmp_path / f"{name}.toml"
    job.write_text(text + STOPPING.format(metric=metric, patience=patience, mode=mode))
    return job


def reference(steps: int):
    trainer = Trainer(make_task("digits"), seed=5, batch_size=96, optimizer="adam", optimizer_kwargs={"lr": 0.01},
                      scheduler="StepLR", scheduler_kwargs={"step_size": 40, "gamma": 0.5}, world_size=2)
    return trainer.run(steps=steps).params


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_stops_after_patience_evaluations_without_improvement_at_any_shard_count(tmp_path, capsys):
    # the evaluation loss falls at every evaluation here, so with mode "max" none improves on
    # the first: evaluations at steps 5 (best), 10 and 15 (two without improvement) -> stop at 15
    for shards in (1, 2):
        job = write_job(tmp_path, shards=shards, name=f"run-{shards}")
        code, out, err = run_cli(capsys, "run", str(job), "--quiet")
        assert code == 0, err
        assert "done: 15 steps" in out
        assert "early stopping: loss did not improve on its best" in out and "at step 5" in out
        assert "in 2 evaluation(s); stopped at step 15" in out
        assert committed_steps(tmp_path / f"run-{shards}" / "checkpoints") == [5, 10, 15]
        assert_same(final_params(tmp_path / f"run-{shards}"), reference(15))


def test_a_stopped_run_is_not_trained_further_and_a_resume_before_the_stop_stops_at_the_same_step(tmp_path, capsys):
    job = write_job(tmp_path)
    assert run_cli(capsys, "run", str(job), "--quiet")[0] == 0
    stopped = final_params(tmp_path / "run")
    code, out, err = run_cli(capsys, "run", str(job), "--quiet")  # again: nothing more to train
    assert code == 0 and "done: 15 steps" in out, err
    assert committed_steps(tmp_path / "run" / "checkpoints") == [5, 10, 15]

    # as if the run had died after step 10: its checkpoint carries one evaluation without
    # improvement, so the resumed run stops at the same step with the same numbers
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-0000000015")
    code, out, err = run_cli(capsys, "resume", str(tmp_path / "run"), "--quiet")
    assert code == 0 and "done: 15 steps" in out, err
    assert_same(final_params(tmp_path / "run"), stopped)


def test_more_patience_on_resume_trains_on(tmp_path, capsys):
    job = write_job(tmp_path, patience=2)
    assert run_cli(capsys, "run", str(job), "--quiet")[0] == 0
    write_job(tmp_path, patience=4)
    code, out, err = run_cli(capsys, "run", str(job), "--quiet")
    assert code == 0, err
    assert "early_stopping.patience 2 -> 4" in out + err and "done: 25 steps" in out
    assert_same(final_params(tmp_path / "run"), reference(25))


@pytest.mark.parametrize(("edit", "message"), [
    ({'metric = "loss"': 'metric = "accurracy"'},
     "early_stopping.metric must be a metric of task 'digits''s evaluation (accuracy, loss); got 'accurracy'"),
    ({"patience = 2": "patience = 0"}, "early_stopping.patience must be an integer >= 1; got 0"),
    ({'mode = "max"': 'mode = "up"'}, "early_stopping.mode must be one of 'min', 'max'; got 'up'"),
    ({"eval_every = 5\n": ""}, "early_stopping.metric = 'loss' stops on evaluations, so training.eval_every is "
                               "required with it"),
    ({'metric = "loss"\n': ""}, "early_stopping.patience, early_stopping.min_delta and early_stopping.mode apply "
                                "to early stopping, which needs early_stopping.metric"),
    ({"patience = 2": "patience = 2\nmin_delta = -1.0"}, "early_stopping.min_delta must be"),
    ({"patience = 2": "patience = 2\nwait = 3"}, "unknown key early_stopping.wait"),
])
def test_bad_early_stopping_keys_are_refused_before_anything_is_written(tmp_path, capsys, edit, message):
    job = write_job(tmp_path)
    text = job.read_text()
    for old, new in edit.items():
        assert old in text, old
        text = text.replace(old, new)
    job.write_text(text)
    code, out, err = run_cli(capsys, "run", str(job))
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert message in err, err
    assert not (tmp_path / "run").exists()


def test_a_time_limit_stops_training_and_counts_the_time_of_every_resumed_run(tmp_path, capsys):
    """It stops at the first step whose end takes the training time (the sum of the steps'
    own seconds, as metrics.jsonl records them) to the limit, and the time carries over."""
    job = tmp_path / "timed.toml"

    def write(limit: float) -> None:
        text = DIGITS_JOB.format(run_dir=tmp_path / "timed", task="tests.fault_tasks:SlowDigits", steps=1000,
                                 backend="inline", every=1000)
        text = text.replace('name = "tests.fault_tasks:SlowDigits"\n',
                            'name = "tests.fault_tasks:SlowDigits"\n[task.args]\nseconds = 0.005\n', 1)
        job.write_text(text.replace("seed = 5\n", f"seed = 5\ntime_limit = {limit}\n", 1))

    def stopped_at(out: str) -> int:
        return int(out.split("done: ")[1].split(" steps")[0])

    def clock(upto: int) -> float:
        total = 0.0
        for record in (json.loads(line) for line in (tmp_path / "timed" / "metrics.jsonl").read_text().splitlines()):
            if record["step"] <= upto:
                total += record["seconds"]
        return total

    write(0.5)
    code, out, err = run_cli(capsys, "run", str(job), "--quiet")
    assert code == 0, err
    first = stopped_at(out)
    assert 1 < first < 1000 and f"reached training.time_limit = 0.5 s; stopped at step {first}" in out, out
    assert clock(first - 1) < 0.5 <= clock(first)
    assert committed_steps(tmp_path / "timed" / "checkpoints") == [first]

    code, out, err = run_cli(capsys, "run", str(job), "--quiet")  # its time is used up
    assert code == 0 and stopped_at(out) == first, err

    write(1.0)  # more time on resume: it trains on, counting the time already spent
    code, out, err = run_cli(capsys, "run", str(job), "--quiet")
    assert code == 0, err
    assert "training.time_limit 0.5 -> 1.0" in out + err
    second = stopped_at(out)
    assert first < second < 1000 and "reached training.time_limit = 1 s" in out, out
    assert clock(second - 1) < 1.0 <= clock(second)
