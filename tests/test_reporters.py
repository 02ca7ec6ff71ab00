"""[logging]: TensorBoard event files and MLflow runs, read back with the libraries' own
readers (TensorBoard's EventAccumulator, MLflow's client and artifact download): the
reporters driven with records as the coordinator makes them (a fresh run, a resume in a new
process, recoveries in one process, a skipped step, a store that vanishes mid-run), then
real runs through the coordinator, across a resume."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardstep.checkpoints import committed_steps
from shardstep.service.coordinator import METRICS_FILE, Coordinator
from shardstep.service.jobspec import JobSpec, JobSpecError
from shardstep.service.reporting import FINISHED, KILLED, Reporters, RunInfo
from shardstep.workers.tasks.base import ParamGroupRule

GROUPS = ("other", "*.bias")
T0 = 1_760_000_000.0  # the records' Unix time at step 0


def job(tmp_path: Path, steps: int, **logging) -> JobSpec:
    return JobSpec(task="digits", task_args={}, optimizer="adam", optimizer_args={"lr": 0.01},
                   param_groups=(ParamGroupRule("*.bias", {"lr": 0.02}),), schedulers=(), steps=steps, epochs=None,
                   batch_size=64, eval_every=5, checkpoint_every=10, backend="inline",
                   run_dir=str(tmp_path / "run"), **logging)


def logged(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]


# ---------------------------------------------------------------------------------------
# the reporters driven directly, with records shaped as metrics.jsonl's


def record(step: int, shift: float = 0.0, *, evaluated: bool = False, skipped: bool = False) -> dict:
    """A step's record; ``shift`` moves every number (the values a different run would log)."""
    out = {"step": step, "epoch": 0, "batch": step - 1, "loss": 2.0 / step + shift, "lr": 0.01 + shift,
           "lrs": [0.01 + shift, 0.02 + shift], "seconds": 0.05 + shift / 10, "time": T0 + 0.5 * step + shift,
           "grad_norm": 3.0 / step + shift}
    if evaluated:
        out["eval"] = {"accuracy": 0.5 + step / 100 + shift}
    if skipped:
        out.update(skipped=True, loss=math.nan, grad_norm=math.nan)
    return out


def info(spec_dict: dict, start_step: int, attempt: int = 0, run_id: str = "0123456789abcdef") -> RunInfo:
    return RunInfo(name="digits", run_id=run_id, run_dir="/runs/digits", job=spec_dict, start_step=start_step,
                   attempt=attempt, group_names=GROUPS)


@pytest.fixture
def spec(tmp_path) -> dict:
    return job(tmp_path, 8).to_dict()


def board(directory: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # size 0: every event kept (the default samples 10,000 scalars and 10 tensors per tag)
    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def served(directory: Path):
    """The directory as the TensorBoard server reads it (its plugin accumulator: every summary a
    tensor, the text plugin's among them). The legacy EventAccumulator above purges its
    scalars at a restart but not its tensors, so the Text tab's view is read here."""
    from tensorboard.backend.event_processing import plugin_event_accumulator as served_reader

    accumulator = served_reader.EventAccumulator(str(directory), size_guidance=served_reader.STORE_EVERYTHING_SIZE_GUIDANCE)
    accumulator.Reload()
    return accumulator


def served_values(accumulator, tag: str) -> list[tuple[int, float]]:
    from tensorboard.util import tensor_util

    return [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in accumulator.Tensors(tag)]


def f32(values) -> list[float]:
    """What an event file holds of a value: simple_value is a float32."""
    return [float(np.float32(v)) for v in values]


def job_of(event) -> dict:
    """The job a text summary shows: the JSON inside its fenced code block."""
    text = event.tensor_proto.string_val[0].decode("utf-8")
    fence, _, rest = text.partition("json\n")
    assert set(fence) == {"`"} and rest.endswith("\n" + fence), text
    return json.loads(rest[:-len(fence) - 1])


def killed_after_eight_steps(reporter, spec):
    """A first start that logs steps 1..8, commits a checkpoint at step 5 and is killed."""
    reporter.start(info(spec, 0))
    for step in range(1, 9):
        reporter.step(record(step))
        if step == 5:
            reporter.checkpoint(5, 0.25)
    reporter.finish(KILLED)


# the Text tab's renderer (tensorboard's vendored bleach) warns about its own html5lib
@pytest.mark.filterwarnings("ignore:html5lib's sanitizer is deprecated:DeprecationWarning")
def test_tensorboard_writes_a_fresh_run_that_its_reader_shows(tmp_path, spec):
    from tensorboard import plugin_util

    from shardstep.service.report_tensorboard import TensorBoard

    reporter = TensorBoard(tmp_path / "board")
    records = [record(1), record(2), record(3, skipped=True), record(4), record(5, evaluated=True)]
    reporter.start(info(spec, 0))
    for r in records:
        reporter.step(r)
    reporter.checkpoint(5, 0.25)
    flushed = board(tmp_path / "board")  # a checkpoint flushes: a live TensorBoard sees the steps
    assert [e.step for e in flushed.Scalars("train/loss")] == [1, 2, 4, 5]
    reporter.finish(FINISHED)

    shown = board(tmp_path / "board")
    assert set(shown.Tags()["scalars"]) == {"train/loss", "train/grad_norm", "train/step_seconds", "lr/other",
                                             "lr/*.bias", "eval/accuracy", "checkpoint/seconds"}
    kept = [r for r in records if not r.get("skipped")]  # the skipped step is in no tag
    for tag, field in (("train/loss", "loss"), ("train/grad_norm", "grad_norm"), ("train/step_seconds", "seconds")):
        events = shown.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 4, 5], tag
        assert [e.value for e in events] == f32(r[field] for r in kept), tag
        assert [e.wall_time for e in events] == [r["time"] for r in kept], tag
    assert [e.value for e in shown.Scalars("lr/*.bias")] == f32(r["lrs"][1] for r in kept)
    assert [(e.step, e.value) for e in shown.Scalars("eval/accuracy")] == [(5, f32([0.55])[0])]
    assert [(e.step, e.value) for e in shown.Scalars("checkpoint/seconds")] == [(5, 0.25)]
    server = served(tmp_path / "board")
    assert {"scalars", "text"} <= set(server.ActivePlugins())
    assert served_values(server, "train/loss") == list(zip([1, 2, 4, 5], f32(r["loss"] for r in kept)))
    assert list(server.PluginTagToContent("text")) == ["job"]  # what the Text tab lists
    (text,) = server.Tensors("job")
    assert text.step == 1 and job_of(text) == spec
    html = plugin_util.markdown_to_safe_html(text.tensor_proto.string_val[0].decode())  # the tab's own rendering
    assert html.startswith("<pre><code>") and "&quot;optimizer&quot;: &quot;adam&quot;" in html
    assert len(list((tmp_path / "board").iterdir())) == 1


def test_tensorboard_shows_the_resumed_values_of_the_steps_trained_again(tmp_path, spec):
    """A resume (a new process) from the checkpoint of step 5 after the first process logged
    1..8: steps 6..8 are trained again (here with other values, to see which TensorBoard
    shows: the later start's), 9..12 are new; every step shows once."""
    from shardstep.service.report_tensorboard import TensorBoard

    killed_after_eight_steps(TensorBoard(tmp_path / "board"), spec)
    resumed_spec = dict(spec, steps=12)
    second = TensorBoard(tmp_path / "board")
    second.start(info(resumed_spec, 5))
    for step in range(6, 13):
        second.step(record(step, shift=1.0 if step <= 8 else 0.0))
    second.checkpoint(10, 0.5)
    second.finish(FINISHED)

    shown = board(tmp_path / "board")
    loss = shown.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 13))
    assert [e.value for e in loss] == f32([record(s).get("loss") for s in range(1, 6)]
                                          + [record(s, 1.0)["loss"] for s in (6, 7, 8)]
                                          + [record(s)["loss"] for s in range(9, 13)])
    assert [e.wall_time for e in loss][5:8] == [record(s, 1.0)["time"] for s in (6, 7, 8)]
    assert [e.step for e in shown.Scalars("checkpoint/seconds")] == [5, 10]
    server = served(tmp_path / "board")
    assert served_values(server, "train/loss") == list(zip(range(1, 13), [e.value for e in loss]))
    texts = server.Tensors("job")
    assert [t.step for t in texts] == [1, 6] and [job_of(t)["steps"] for t in texts] == [8, 12]
    files = sorted(p.name for p in (tmp_path / "board").iterdir())
    assert len(files) == 2  # the resume's sorts after the first's: TensorBoard reads them in that order

    # without the START event the old values would stay: the reader keeping everything shows both
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    unpurged = EventAccumulator(str(tmp_path / "board"), size_guidance={"scalars": 0}, purge_orphaned_data=False)
    unpurged.Reload()
    assert [e.step for e in unpurged.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9, 10, 11, 12]


def test_tensorboard_resume_sorts_after_an_event_file_of_the_same_second_from_another_host(tmp_path, spec):
    """TensorBoard reads a directory's files in the order of their names (the second first,
    then host, pid): a resume on another host a second behind must still come after."""
    import socket
    import time

    from shardstep.service.report_tensorboard import TensorBoard

    first = TensorBoard(tmp_path / "board")
    first.start(info(spec, 0))
    for step in range(1, 9):
        first.step(record(step))
    first.finish(KILLED)
    (written,) = (tmp_path / "board").iterdir()
    # the name the other host gave it: its clock a second ahead of this one's, its name after ours
    ahead = f"events.out.tfevents.{int(time.time()) + 1:010d}.{socket.gethostname()}zz.1.0"
    written.rename(written.with_name(ahead))
    second = TensorBoard(tmp_path / "board")
    second.start(info(spec, 5))
    for step in range(6, 9):
        second.step(record(step, shift=1.0))
    second.finish(FINISHED)
    names = sorted(p.name for p in (tmp_path / "board").iterdir())
    assert names[0] == ahead
    loss = board(tmp_path / "board").Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == list(zip(range(1, 9), f32([record(s)["loss"] for s in range(1, 6)]
                                                                         + [record(s, 1.0)["loss"] for s in (6, 7, 8)])))


def test_tensorboard_recoveries_in_one_process_each_replace_the_steps_after_the_checkpoint(tmp_path, spec):
    from shardstep.service.report_tensorboard import TensorBoard

    reporter = TensorBoard(tmp_path / "board")
    reporter.start(info(spec, 0))
    for step in range(1, 8):
        reporter.step(record(step))
    reporter.checkpoint(4, 0.25)
    for attempt, shift in ((1, 1.0), (2, 2.0)):  # twice from the same checkpoint
        reporter.start(info(spec, 4, attempt=attempt))
        for step in range(5, 8 + attempt):
            reporter.step(record(step, shift))
    reporter.finish(FINISHED)

    shown = board(tmp_path / "board")
    loss = shown.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 10))
    assert [e.value for e in loss] == f32([record(s)["loss"] for s in range(1, 5)]
                                          + [record(s, 2.0)["loss"] for s in range(5, 10)])
    assert [e.step for e in shown.Scalars("checkpoint/seconds")] == [4]
    server = served(tmp_path / "board")
    assert [step for step, _ in served_values(server, "train/loss")] == list(range(1, 10))
    assert [t.step for t in server.Tensors("job")] == [1, 5]  # the second recovery's replaced the first's
    assert len(list((tmp_path / "board").iterdir())) == 3  # each start's file was closed and read whole


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A local MLflow file store (MLflow 3 opens it only with MLFLOW_ALLOW_FILE_STORE), and
    no usage report to MLflow's servers from the tests."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    return (tmp_path / "mlruns").resolve().as_uri()


def the_run(store: str, experiment: str = "digits"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return client, run


def history(client, run, key: str) -> list[tuple[int, float, int]]:
    return sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(run.info.run_id, key))


def test_mlflow_logs_a_fresh_run_with_its_job_within_mlflows_limits(tmp_path, store, spec):
    from shardstep.service.report_mlflow import MLflow

    spec = dict(spec, task_args={"sizes": [64, 32], "notes": "x" * 7000, "k" * 300: 1, "k" * 300 + "2": 2,
                                 "weird*key": True, "../up": None, "empty": {}})
    reporter = MLflow(store, "digits")
    records = [record(1), record(2), record(3, skipped=True), record(4), record(5, evaluated=True)]
    reporter.start(info(spec, 0))
    for r in records:
        reporter.step(r)
    reporter.checkpoint(5, 0.25)
    reporter.finish(FINISHED)

    client, run = the_run(store)
    assert run.info.run_name == "digits" and run.info.status == "FINISHED"
    assert run.data.tags["shardstep.run_id"] == "0123456789abcdef"
    assert run.data.tags["shardstep.run_dir"] == "/runs/digits" and run.data.tags["shardstep.latest_checkpoint"] == "5"
    params = run.data.params
    assert params["optimizer"] == "adam" and params["optimizer_args.lr"] == "0.01" and params["steps"] == "8"
    assert params["epochs"] == "null" and params["param_groups"] == '[{"pattern": "*.bias", "options": {"lr": 0.02}}]'
    assert params["task_args.sizes"] == "[64, 32]" and params["task_args.weird_key"] == "true"
    assert params["task_args.../up"] == "null" and params["task_args.empty"] == "{}"
    notes = params["task_args.notes"]
    assert len(notes) == 6000 and notes.endswith(" [... cut: 7000 characters; the whole value is in job.json]")
    long_keys = [key for key in params if key.startswith("task_args.kkk")]
    assert len(long_keys) == 2 and all(len(key) == 250 for key in long_keys)
    assert sorted(params[key] for key in long_keys) == ["1", "2"]
    kept = [r for r in records if not r.get("skipped")]
    for key, field in (("train/loss", "loss"), ("train/grad_norm", "grad_norm"), ("train/step_seconds", "seconds")):
        assert history(client, run, key) == [(r["step"], r[field], round(r["time"] * 1000)) for r in kept], key
    assert [v for _, v, _ in history(client, run, "lr/_.bias")] == [r["lrs"][1] for r in kept]  # "*" is refused
    assert [(s, v) for s, v, _ in history(client, run, "eval/accuracy")] == [(5, 0.55)]
    assert [(s, v) for s, v, _ in history(client, run, "checkpoint/seconds")] == [(5, 0.25)]
    assert {item.path for item in client.list_artifacts(run.info.run_id)} == {"job.json"}
    saved = Path(client.download_artifacts(run.info.run_id, "job.json", str(tmp_path)))
    assert json.loads(saved.read_text()) == spec


def test_mlflow_sends_metrics_in_batches(store, spec):
    from shardstep.service.report_mlflow import MLflow

    reporter = MLflow(store, "digits")
    reporter.batch_steps, reporter.batch_seconds = 3, 3600.0
    reporter.start(info(spec, 0))
    client, run = the_run(store)
    seen = []
    for step in range(1, 8):
        reporter.step(record(step))
        seen.append([s for s, _, _ in history(client, run, "train/loss")])
    assert seen == [[], [], [1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]]
    reporter.checkpoint(7, 0.1)  # a checkpoint sends what waits
    assert [s for s, _, _ in history(client, run, "train/loss")] == list(range(1, 8))
    reporter.batch_seconds = 0.0  # the oldest value waited long enough: sent with its step
    reporter.step(record(8))
    assert [s for s, _, _ in history(client, run, "train/loss")] == list(range(1, 9))
    reporter.finish(FINISHED)


def test_mlflow_continues_one_run_across_resumes_leaving_out_the_steps_it_has(tmp_path, store, spec):
    """The first process logged 1..8 (checkpoint 5) and was killed; the resume trains 6..8
    again (other values here, to see which MLflow keeps: the first's) and 9..12 with more
    steps and max_failures 2; a third process goes on to 14 with max_failures back at 0."""
    from shardstep.service.report_mlflow import MLflow

    killed_after_eight_steps(MLflow(store, "digits"), spec)
    client, run = the_run(store)
    assert run.info.status == "KILLED"

    second_spec = dict(spec, steps=12, max_failures=2)
    second = MLflow(store, "digits")
    second.start(info(second_spec, 5))
    client, run = the_run(store)
    assert run.info.status == "RUNNING"
    for step in range(6, 13):
        second.step(record(step, shift=1.0 if step <= 8 else 0.0))
    second.checkpoint(10, 0.5)
    second.finish(FINISHED)

    client, run = the_run(store)  # still one MLflow run
    loss = history(client, run, "train/loss")
    assert [s for s, _, _ in loss] == list(range(1, 13))
    assert [v for _, v, _ in loss] == [record(s)["loss"] for s in range(1, 13)]  # 6..8: the first's values
    assert [s for s, _, _ in history(client, run, "checkpoint/seconds")] == [5, 10]
    assert run.info.status == "FINISHED" and run.data.tags["shardstep.latest_checkpoint"] == "10"
    assert run.data.params["steps"] == "8" and run.data.params["max_failures"] == "0"  # MLflow keeps the first
    assert run.data.tags["shardstep.job.steps"] == "12" and run.data.tags["shardstep.job.max_failures"] == "2"
    assert {item.path for item in client.list_artifacts(run.info.run_id)} == {"job.json", "job-5.json"}
    resumed = Path(client.download_artifacts(run.info.run_id, "job-5.json", str(tmp_path)))
    assert json.loads(resumed.read_text()) == second_spec

    third = MLflow(store, "digits")
    third.start(info(dict(spec, steps=14), 12))
    for step in (13, 14):
        third.step(record(step))
    third.finish(FINISHED)
    client, run = the_run(store)
    assert [s for s, _, _ in history(client, run, "train/loss")] == list(range(1, 15))
    assert run.data.tags["shardstep.job.steps"] == "14" and "shardstep.job.max_failures" not in run.data.tags
    assert {item.path for item in client.list_artifacts(run.info.run_id)} == {"job.json", "job-5.json", "job-12.json"}


def test_mlflow_logs_from_the_replay_the_steps_a_crashed_process_never_sent(store, spec):
    """A process that died (no finish) had sent 1..5 at its checkpoint and held 6..8: the
    resume's 6..8 are the ones MLflow gets."""
    from shardstep.service.report_mlflow import MLflow

    crashed = MLflow(store, "digits")
    crashed.start(info(spec, 0))
    for step in range(1, 9):
        crashed.step(record(step))
        if step == 5:
            crashed.checkpoint(5, 0.25)
    del crashed  # the process ends here: no finish, its buffer is lost
    resumed = MLflow(store, "digits")
    resumed.start(info(spec, 5))
    for step in range(6, 9):
        resumed.step(record(step, shift=1.0))
    resumed.finish(FINISHED)
    client, run = the_run(store)
    assert [(s, v) for s, v, _ in history(client, run, "train/loss")] == \
        [(s, record(s)["loss"]) for s in range(1, 6)] + [(s, record(s, 1.0)["loss"]) for s in (6, 7, 8)]
    assert {item.path for item in client.list_artifacts(run.info.run_id)} == {"job.json"}  # the job did not change


def test_mlflow_recovery_in_one_process_sends_what_waited_and_skips_its_replay(store, spec):
    from shardstep.service.report_mlflow import MLflow

    reporter = MLflow(store, "digits")
    reporter.start(info(spec, 0))
    for step in range(1, 8):
        reporter.step(record(step))
    reporter.start(info(spec, 4, attempt=1))  # 5..7 were buffered: sent first, then left out of the replay
    for step in range(5, 10):
        reporter.step(record(step, shift=1.0))
    reporter.finish(FINISHED)
    client, run = the_run(store)
    assert [(s, v) for s, v, _ in history(client, run, "train/loss")] == \
        [(s, record(s)["loss"]) for s in range(1, 8)] + [(s, record(s, 1.0)["loss"]) for s in (8, 9)]
    assert run.info.status == "FINISHED"
    assert {item.path for item in client.list_artifacts(run.info.run_id)} == {"job.json"}


def test_a_store_that_vanishes_mid_run_drops_mlflow_with_one_warning_and_tensorboard_goes_on(tmp_path, store, spec):
    from shardstep.service.report_mlflow import MLflow
    from shardstep.service.report_tensorboard import TensorBoard

    warnings: list[str] = []
    mlflow = MLflow(store, "digits")
    reporters = Reporters([mlflow, TensorBoard(tmp_path / "board")], warn=warnings.append)
    reporters.start(info(spec, 0))
    for step in range(1, 4):
        reporters.step(record(step))
    shutil.rmtree(tmp_path / "mlruns")  # the tracking store is gone (a lost network disk)
    for step in range(4, 6):
        reporters.step(record(step))
    reporters.checkpoint(5, 0.25)  # MLflow's flush meets the missing run
    for step in range(6, 8):
        reporters.step(record(step))
    reporters.finish(FINISHED)
    # the file store's own error (a bare Exception) names the directory it lost
    assert warnings == [f"warning: MLflow stopped reporting (Exception: '{tmp_path / 'mlruns'}' does not exist.); the "
                        "run goes on, metrics.jsonl has every step"]
    assert [r.name for r in reporters.reporters] == ["TensorBoard"]
    assert [e.step for e in board(tmp_path / "board").Scalars("train/loss")] == list(range(1, 8))


def test_mlflow_3_refuses_its_file_store_without_the_opt_in(tmp_path, monkeypatch):
    """The finding the job's default store follows: MLflow 3.18 opens a file store only with
    MLFLOW_ALLOW_FILE_STORE=true (an error, not a warning); the reporter fails at once."""
    from mlflow.exceptions import MlflowException

    from shardstep.service.report_mlflow import MLflow

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(MlflowException, match="set `MLFLOW_ALLOW_FILE_STORE=true` to opt out of this exception"):
        MLflow((tmp_path / "refused").resolve().as_uri(), "digits")


@pytest.mark.parametrize("module, make, message", [
    ("tensorboard", "from shardstep.service.report_tensorboard import TensorBoard as R; R(sys.argv[1])",
     "logging.tensorboard needs the tensorboard package: pip install 'shardstep[tensorboard]'"),
    ("mlflow", "from shardstep.service.report_mlflow import MLflow as R; R('http://127.0.0.1:9', 'x')",
     "logging.mlflow needs MLflow: pip install 'shardstep[mlflow]'"),
])
def test_a_reporter_without_its_package_names_the_extra_to_install(tmp_path, module, make, message):
    code = (f"import sys; sys.modules[{module!r}] = None\n"  # the package cannot be imported
            f"try:\n    {make}\nexcept ImportError as error:\n    print(error)\nelse:\n    print('made')")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "board")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == message
    assert not (tmp_path / "board").exists()


def test_mlflow_names_within_its_limits():
    from shardstep.service.report_mlflow import _mlflow_key, job_params

    assert _mlflow_key("train/loss") == "train/loss" and _mlflow_key("lr/*.bias") == "lr/_.bias"
    assert _mlflow_key("lr/other (1)") == "lr/other _1_" and _mlflow_key("eval/a:b") == "eval/a_b"
    assert _mlflow_key("eval/../x") == "eval/__/x" and _mlflow_key("eval//x/") == "eval/_/x/_"
    assert job_params({"a*": 1, "a?": 2}) == {"a_": "1", "a__": "2"}


# ---------------------------------------------------------------------------------------
# real runs through the coordinator


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


def test_mlflow_keeps_one_run_across_a_resume_with_every_step_once(tmp_path, store):
    from mlflow.tracking import MlflowClient

    keys = dict(mlflow=True, mlflow_tracking_uri=store, mlflow_experiment="digits")
    Coordinator(job(tmp_path, 15, **keys)).run()
    Coordinator(job(tmp_path, 25, **keys)).run()
    records = logged(tmp_path)
    client = MlflowClient(store)
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


def test_a_failed_run_is_marked_failed_in_mlflow(tmp_path, store):
    from mlflow.tracking import MlflowClient

    from shardstep.service.errors import NonFiniteError

    spec = job(tmp_path, 15, mlflow=True, mlflow_tracking_uri=store).replace(optimizer_args={"lr": 1e30})
    with pytest.raises(NonFiniteError):
        Coordinator(spec).run()
    client = MlflowClient(store)
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
                                           r"MLFLOW_TRACKING_URI where the run starts\)"):
        JobSpec(**base, mlflow=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert JobSpec(**base, mlflow=True).mlflow_tracking_uri is None


def test_a_driver_without_the_tracking_uri_the_check_saw_fails_before_the_first_step(tmp_path, monkeypatch):
    """A job checked where MLFLOW_TRACKING_URI was set, started where it is not (a cluster's
    driver): the run fails at its start with the job error, not a KeyError, and trains nothing."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    spec = JobSpec(task="digits", task_args={}, optimizer="adam", optimizer_args={}, param_groups=(), schedulers=(),
                   steps=3, epochs=None, backend="inline", run_dir=str(tmp_path / "run"), mlflow=True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    steps = []
    with pytest.raises(JobSpecError, match=r"needs logging.mlflow_tracking_uri \(or MLFLOW_TRACKING_URI where the run "
                                           r"starts\)"):
        Coordinator(spec, on_step=steps.append).run()
    assert steps == []
    assert committed_steps(tmp_path / "run" / "checkpoints") == []


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
