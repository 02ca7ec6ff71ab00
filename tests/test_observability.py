"""Seeing a run from outside: every record's timestamp and gradient norm, the run's metrics
in a Ray head's Prometheus endpoint, its actors named on the dashboard, and the latest
progress in `submit` and `jobs status` (a real head on loopback, real `shardstep` processes)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from shardstep.service.coordinator import METRICS_FILE, Coordinator
from shardstep.service.jobspec import JobSpec
from shardstep.service.reporting import Reporter, Reporters, RunInfo, group_labels, scalars
from shardstep.workers.tasks import make_task
from shardstep.workers.tasks.base import ParamGroupRule
from tests.ray_heads import get_json, shardstep, submitted_id

SCRAPE_SECONDS = 90

SLOW_TASK = '''\
import time

from shardstep.workers.tasks.digits import DigitsTask


class SlowDigits(DigitsTask):
    """The digits task, each gradient taking at least 20 ms: a run long enough to watch."""

    def loss_and_grad(self, params, batch):
        time.sleep(0.02)
        return super().loss_and_grad(params, batch)
'''

SLOW_JOB = '''\
run_dir = "{run_dir}"

[task]
name = "slowtask:SlowDigits"

[optimizer]
name = "adam"
[optimizer.args]
lr = 0.01

[training]
steps = {steps}
batch_size = 96
eval_every = 100

[resources]
shards = 2
workers = 1
{address}

[checkpoint]
every = 100
'''


def slow_job(directory: Path, run_dir: Path, steps: int, address: str | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "slowtask.py").write_text(SLOW_TASK)
    path = directory / "job.toml"
    path.write_text(SLOW_JOB.format(run_dir=run_dir, steps=steps,
                                    address="" if address is None else f'address = "{address}"'))
    return path


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


# ---------------------------------------------------------------------------------------
# the records


def test_every_record_has_its_time_and_the_gradient_norm_before_clipping(tmp_path):
    """The global norm the record reports is the norm of the summed gradient before clipping,
    as torch's clip_grad_norm_ returns it: recomputed here from the task's own gradients at
    the parameters of step 1 (the initial ones), and equal for 1 and 3 shards up to float32
    rounding of the sums."""
    def run(shards: int, clip: float | None) -> list[dict]:
        spec = JobSpec(task="digits", task_args={}, optimizer="sgd", optimizer_args={"lr": 0.1}, param_groups=(),
                       schedulers=(), steps=4, epochs=None, batch_size=64, seed=3, clip_grad_norm=clip,
                       shards=shards, backend="inline", run_dir=str(tmp_path / f"run-{shards}-{clip}"))
        before = time.time()
        result = Coordinator(spec).run()
        logged = records_of(Path(spec.run_dir))
        assert [r["step"] for r in logged] == [1, 2, 3, 4]
        assert all(before <= r["time"] <= time.time() for r in logged)
        assert [r["time"] for r in logged] == sorted(r["time"] for r in logged)
        assert [r["grad_norm"] for r in logged] == [r["grad_norm"] for r in result.history]
        return logged

    task = make_task("digits")
    grads = task.loss_and_grad(task.init_params(3), task.batch(3, 0, 0, 64))[1]
    expected = math.sqrt(sum(float(np.sum(np.asarray(g, dtype=np.float64) ** 2)) for g in grads.values()))
    one = run(1, None)
    three = run(3, None)
    clipped = run(1, 0.05)
    assert all(math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in one)
    # the digits gradients are float32, and each shard's dot product rounds in float32
    np.testing.assert_allclose(one[0]["grad_norm"], expected, rtol=1e-6)
    np.testing.assert_allclose([r["grad_norm"] for r in three], [r["grad_norm"] for r in one], rtol=1e-6)
    # clipping scales the update, not the reported norm: step 1 (same parameters) agrees,
    # and the clipped run's later steps differ (its parameters moved less)
    assert clipped[0]["grad_norm"] == one[0]["grad_norm"]
    assert clipped[1]["grad_norm"] != one[1]["grad_norm"]


def test_the_first_record_after_a_resume_says_where_it_started(tmp_path):
    spec = JobSpec(task="digits", task_args={}, optimizer="adam", optimizer_args={}, param_groups=(), schedulers=(),
                   steps=6, epochs=None, batch_size=64, checkpoint_every=4, backend="inline",
                   run_dir=str(tmp_path / "run"))
    Coordinator(spec).run()
    Coordinator(spec.replace(steps=9)).run()
    logged = records_of(tmp_path / "run")
    assert [r["step"] for r in logged] == list(range(1, 10))
    assert [(r["step"], r["started_from"]) for r in logged if "started_from" in r] == [(7, 6)]


# ---------------------------------------------------------------------------------------
# the reporters' shared pieces


def test_group_labels_name_the_rule_that_formed_each_group():
    rules = (ParamGroupRule("*.bias", {"lr": 0.1}), ParamGroupRule("embed.*", {"lr": 0.2}))
    assert group_labels([["a.weight", "a.bias"]], rules) == ["all"]
    assert group_labels([["fc.weight"], ["fc.bias", "out.bias"], ["embed.table"]], rules) == \
        ["other", "*.bias", "embed.*"]
    assert group_labels([["x"], ["y"]], ()) == ["other", "other (1)"]


def test_scalars_leave_out_skipped_steps_and_non_finite_values():
    record = {"step": 3, "loss": 0.5, "lrs": [0.1, float("nan")], "seconds": 0.01, "grad_norm": float("inf"),
              "eval": {"accuracy": 0.75}}
    assert scalars(record, ["other", "*.bias"]) == {"train/loss": 0.5, "train/step_seconds": 0.01,
                                                     "lr/other": 0.1, "eval/accuracy": 0.75}
    assert scalars({"step": 3, "skipped": True, "loss": float("nan"), "lr": 0.1}, ["all"]) == {}


def test_a_reporter_that_fails_mid_run_is_dropped_with_one_warning_and_one_that_cannot_start_fails():
    class Flaky(Reporter):
        name = "flaky"

        def __init__(self):
            self.steps = []

        def step(self, record):
            if record["step"] == 2:
                raise OSError("disk full")
            self.steps.append(record["step"])

    class Steady(Reporter):
        def __init__(self):
            self.steps = []

        def step(self, record):
            self.steps.append(record["step"])

    warnings: list[str] = []
    flaky, steady = Flaky(), Steady()
    reporters = Reporters([flaky, steady], warn=warnings.append)
    info = RunInfo(name="run", run_id="id", run_dir="/tmp/run", job={}, start_step=0)
    reporters.start(info)
    for step in (1, 2, 3):
        reporters.step({"step": step})
    assert flaky.steps == [1] and steady.steps == [1, 2, 3]
    assert warnings == ["warning: flaky stopped reporting (OSError: disk full); the run goes on, metrics.jsonl "
                        "has every step"]

    class Unreachable(Reporter):
        def start(self, info):
            raise ConnectionError("tracking server refused")

    fresh = Reporters([Unreachable()], warn=warnings.append)
    try:
        fresh.start(info)
    except ConnectionError as error:
        assert str(error) == "tracking server refused"
    else:
        raise AssertionError("a reporter that cannot start must fail the run")


# ---------------------------------------------------------------------------------------
# a live run on a Ray head


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _samples(text: str, metric: str, run: str) -> list[tuple[dict[str, str], float]]:
    """The samples of ``metric`` tagged with run ``run``: (labels, value)."""
    found = []
    for match in re.finditer(rf"^{metric}\{{(.*?)\}} (\S+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1)))
        if labels.get("run") == run:
            found.append((labels, float(match.group(2))))
    return found


ACTOR_NAMES = ["watched/shard-0", "watched/shard-1", "watched/worker-0"]


def test_a_run_on_a_ray_head_exports_its_metrics_and_names_its_actors(head, tmp_path):
    """`shardstep run` against a head: while it trains, the head's Prometheus endpoint has the
    run's steps, loss, step time, gradient norm, learning rate, evaluation and checkpoint
    metrics, tagged with the run's name and id, each a value the run logged; the dashboard
    lists its actors as run-name/shard-k and run-name/worker-k in the run's namespace."""
    run_dir = tmp_path / "watched"
    job = slow_job(tmp_path / "job", run_dir, steps=600, address=head.gcs)
    process = subprocess.Popen([sys.executable, "-m", "shardstep.service.cli", "run", str(job)], env=head.env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               stdin=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.monotonic() + SCRAPE_SECONDS
        seen: dict[str, list] = {}
        actors: list[dict] = []
        wanted = ("ray_shardstep_steps", "ray_shardstep_loss", "ray_shardstep_step_seconds", "ray_shardstep_grad_norm",
                  "ray_shardstep_learning_rate", "ray_shardstep_eval_metric", "ray_shardstep_checkpoint_step",
                  "ray_shardstep_checkpoint_seconds")
        while time.monotonic() < deadline and process.poll() is None:
            text = _scrape(head.metrics_port)
            seen = {name: _samples(text, name, "watched") for name in wanted}
            # The actors start one after another and the state API lags them, so a listing
            # taken early can hold the shards and not yet the worker: list again until all
            # three are there (or the run ends and the assertion below says which is missing).
            if len(actors) < len(ACTOR_NAMES):
                listed = get_json(f"{head.url}/api/v0/actors?limit=100", head.token)["data"]["result"]["result"]
                actors = [a for a in listed if a.get("name", "").startswith("watched/") and a["state"] == "ALIVE"]
            if all(seen.values()) and seen["ray_shardstep_steps"][0][1] >= 200 and len(actors) >= len(ACTOR_NAMES):
                break
            time.sleep(1.0)
        out, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, out
    missing = [name for name, samples in seen.items() if not samples]
    assert not missing, (missing, out)
    logged = records_of(run_dir)
    run_id = json.loads((run_dir / "job.json").read_text())["run_id"]
    steps = seen["ray_shardstep_steps"][0]
    assert steps[0]["run_id"] == run_id and 200 <= steps[1] <= 600
    assert any(r["loss"] == seen["ray_shardstep_loss"][0][1] for r in logged)
    assert any(r.get("grad_norm") == seen["ray_shardstep_grad_norm"][0][1] for r in logged)
    assert [labels["group"] for labels, _ in seen["ray_shardstep_learning_rate"]] == ["all"]
    assert seen["ray_shardstep_learning_rate"][0][1] == 0.01
    evaluations = {(r["step"], value) for r in logged for value in r.get("eval", {}).values()}
    assert {labels["metric"] for labels, _ in seen["ray_shardstep_eval_metric"]} == {"accuracy", "loss"}
    assert all(any(value == v for _, v in evaluations) for _, value in seen["ray_shardstep_eval_metric"])
    checkpoint = seen["ray_shardstep_checkpoint_step"][0][1]
    assert checkpoint % 100 == 0 and 100 <= checkpoint <= steps[1]
    assert 0 < seen["ray_shardstep_checkpoint_seconds"][0][1] < 60
    assert sorted(a["name"] for a in actors) == ACTOR_NAMES
    assert len({a["ray_namespace"] for a in actors}) == 1
    assert actors[0]["ray_namespace"].startswith("shardstep-watched-")


def test_submit_and_jobs_status_show_the_runs_latest_progress(head, tmp_path):
    """`submit` (waiting) prints the run's latest progress line as it moves, not only the
    job's state; `jobs status` shows the latest progress and evaluation lines; the job's
    metadata names the task, optimizer and actors."""
    run_dir = tmp_path / "submitted"
    job = slow_job(tmp_path / "job", run_dir, steps=300)
    waited = shardstep("submit", str(job), "--address", head.url, env=head.env, timeout=300)
    assert waited.returncode == 0, waited.stderr
    job_id = submitted_id(waited)
    moving = re.findall(rf"^\d\d:\d\d:\d\d {job_id} RUNNING  step (\d+)/300  epoch \d+  loss \S+", waited.stdout,
                        re.MULTILINE)
    assert len(moving) >= 2 and [int(s) for s in moving] == sorted({int(s) for s in moving}), waited.stdout
    assert waited.stdout.rstrip().endswith(f"job {job_id} SUCCEEDED; run directory {run_dir}")

    status = shardstep("jobs", "status", job_id, "--address", head.url, env=head.env)
    assert status.returncode == 0, status.stderr
    progress = re.search(r"^progress +(step 300/300  epoch \d+  loss (\S+) .*)$", status.stdout, re.MULTILINE)
    assert progress and "| eval accuracy" in progress.group(1), status.stdout
    last = records_of(run_dir)[-1]
    assert last["step"] == 300 and f"{last['loss']:.4g}" == progress.group(2)
    info = get_json(f"{head.url}/api/jobs/{job_id}", head.token)
    assert info["metadata"]["shardstep_task"] == "slowtask:SlowDigits"
    assert info["metadata"]["shardstep_optimizer"] == "adam"
    assert info["metadata"]["shardstep_actors"] == "2 shard(s), 1 worker(s)"
