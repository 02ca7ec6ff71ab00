"""[logging]: TensorBoard event files and MLflow runs of real runs, read back with the
libraries' own readers (TensorBoard's EventAccumulator, MLflow's client), across a resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from shardstep.service.coordinator import METRICS_FILE, Coordinator
from shardstep.service.jobspec import JobSpec, JobSpecError
from shardstep.workers.tasks.base import ParamGroupRule


def job(tmp_path: Path, steps: int, **logging) -> JobSpec:
    return JobSpec(task="digits", task_args={}, optimizer="adam", optimizer_args={"lr": 0.01},
                   param_groups=(ParamGroupRule("*.bias", {"lr": 0.02}),), schedulers=(), steps=steps, epochs=None,
                   batch_size=64, eval_every=5, checkpoint_every=10, backend="inline",
                   run_dir=str(tmp_path / "run"), **logging)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A local MLflow file store: MLflow 3 keeps it only for those who opt in, as here."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return (tmp_path / "mlruns").resolve().as_uri()


def logged(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]


def test_tensorboard_shows_every_step_once_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Coordinator(job(tmp_path, 15, tensorboard=True)).run()  # its last checkpoint: step 15; 11..15 logged
    Coordinator(job(tmp_path, 25, tensorboard=True)).run()
    records = logged(tmp_path)
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard"), purge_orphaned_data=True)
    board.Reload()
    tags = board.Tags()["scalars"]
    assert {"train/loss", "train/grad_norm", "train/step_seconds", "lr/other", "lr/*.bias", "eval/accuracy",
            "eval/loss", "checkpoint/seconds"} <= set(tags)
    loss = board.Scalars("train/loss")
    assert [event.step for event in loss] == [r["step"] for r in records] == list(range(1, 26))
    assert [event.value for event in loss] == pytest.approx([r["loss"] for r in records], rel=1e-7)  # float32
    assert [event.wall_time for event in loss] == pytest.approx([r["time"] for r in records], abs=1e-6)
    assert [event.value for event in board.Scalars("lr/*.bias")] == pytest.approx([0.02] * 25)
    assert [event.step for event in board.Scalars("eval/accuracy")] == [5, 10, 15, 20, 25]
    assert [event.step for event in board.Scalars("checkpoint/seconds")] == [10, 15, 20, 25]
    text = board.Tensors("job")
    assert json.loads(text[0].tensor_proto.string_val[0].decode().split("\n", 1)[1].rsplit("\n", 1)[0])["steps"] == 15
    assert len(list((tmp_path / "run" / "tensorboard").iterdir())) == 2  # one event file per start


def test_mlflow_keeps_one_run_across_a_resume_with_every_step_once(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    keys = dict(mlflow=True, mlflow_tracking_uri=mlflow_store, mlflow_experiment="digits")
    Coordinator(job(tmp_path, 15, **keys)).run()
    Coordinator(job(tmp_path, 25, **keys)).run()
    records = logged(tmp_path)
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    run_id = json.loads((tmp_path / "run" / "job.json").read_text())["run_id"]
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.tags["shardstep.run_id"] == run_id and run.data.tags["shardstep.latest_checkpoint"] == "25"
    assert run.data.params["optimizer"] == "adam" and run.data.params["optimizer_args.lr"] == "0.01"
    assert run.data.params["steps"] == "15"  # the job it was created with; the resume's is an artifact
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 26))
    by_step = {m.step: m.value for m in history}
    assert [by_step[r["step"]] for r in records] == [r["loss"] for r in records]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "lr/_.bias")] == [0.02] * 25  # "*" is not allowed
    assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, "eval/accuracy"),
                                   key=lambda m: m.step)] == [5, 10, 15, 20, 25]
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"job.json", "job-15.json"}
    resumed = json.loads(Path(client.download_artifacts(run.info.run_id, "job-15.json", str(tmp_path))).read_text())
    assert resumed["steps"] == 25


def test_a_failed_run_is_marked_failed_in_mlflow(tmp_path, mlflow_store):
    from mlflow.tracking import MlflowClient

    from shardstep.service.errors import NonFiniteError

    spec = job(tmp_path, 15, mlflow=True, mlflow_tracking_uri=mlflow_store).replace(optimizer_args={"lr": 1e30})
    with pytest.raises(NonFiniteError):
        Coordinator(spec).run()
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("shardstep").experiment_id])
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("changes, message", [
    ({"tensorboard": 3}, "logging.tensorboard must be true, false or a directory for the event files; got 3 (integer)"),
    ({"tensorboard": "s3://bucket/board"}, "logging.tensorboard must be a local directory"),
    ({"mlflow_tracking_uri": "http://127.0.0.1:5000"},
     "logging.mlflow_tracking_uri and logging.mlflow_experiment apply to MLflow logging, which needs logging.mlflow = true"),
    ({"mlflow": "yes"}, "logging.mlflow must be true or false"),
    ({"ray_metrics": 1}, "logging.ray_metrics must be true or false"),
])
def test_bad_logging_keys_are_refused_naming_the_key(tmp_path, changes, message):
    with pytest.raises(JobSpecError) as error:
        job(tmp_path, 5, **changes)
    assert str(error.value).startswith(message), str(error.value)


def test_object_storage_run_directories_need_a_local_board_and_mlflow_a_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = dict(task="digits", task_args={}, optimizer="adam", optimizer_args={}, param_groups=(), schedulers=(),
                steps=5, epochs=None, run_dir="s3://bucket/runs/digits")
    with pytest.raises(JobSpecError, match="on object storage .*give a local directory instead"):
        JobSpec(**base, tensorboard=True)
    with pytest.raises(JobSpecError, match=r"logging.mlflow = true needs logging.mlflow_tracking_uri \(or "
                                           r"MLFLOW_TRACKING_URI\)"):
        JobSpec(**base, mlflow=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert JobSpec(**base, mlflow=True).mlflow_tracking_uri is None


def test_a_missing_package_is_a_bad_job_with_the_install_command(tmp_path):
    """With tensorboard unimportable, the job is refused (exit 2) before anything is written."""
    path = tmp_path / "job.toml"
    path.write_text('run_dir = "run"\n[task]\nname = "digits"\n[optimizer]\nname = "adam"\n[training]\nsteps = 3\n'
                    '[resources]\nbackend = "inline"\n[logging]\ntensorboard = true\n')
    code = ("import sys, importlib.util; real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda name, *a: None if name == 'tensorboard' else real(name, *a)\n"
            "from shardstep.service.cli import main; sys.argv = ['shardstep', 'run', sys.argv[1]]; sys.exit(main())")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"shardstep run: error: {path}: logging.tensorboard needs the tensorboard package, which is "
                                   "not installed here: pip install 'shardstep[tensorboard]'")
    assert not (tmp_path / "run").exists()
