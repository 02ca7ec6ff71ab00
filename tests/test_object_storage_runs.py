"""Whole runs with their run directory on object storage (``run_dir = "s3://..."``), against
the S3-compatible server the tests start (moto's, on loopback): a Ray run with 2 shards
that equals the local one bit for bit, the commands that read a run (inspect, export, plot,
resume), fine-tuning from a URL, and a run that loses the server mid-run and, once the
server is back, resumes to the same bits as an uninterrupted run.

Each run is the real command line in a process of its own (``python -m
shardstep.service.cli``), which starts its own Ray instance on loopback with the store's
endpoint and credentials in its environment, as a user would run it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from shardstep import checkpoints
from shardstep.checkpoints import committed_steps, open_checkpoint
from shardstep.checkpoints.storage import ObjectPath
from shardstep.service.coordinator import CHECKPOINT_DIR, JOB_FILE
from shardstep.service.run_dir import read_log_lines
from tests.objectstore import BUCKET
from tests.runs import DIGITS_JOB, assert_same, digits_reference

ROOT = Path(__file__).resolve().parents[1]
RUN_SECONDS = 300


@pytest.fixture
def url(s3_server):
    return ObjectPath(f"s3://{BUCKET}/runs/{uuid.uuid4().hex}")


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=tempfile.mkdtemp(prefix="rs-", dir="/tmp"), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PYTHONPATH=str(ROOT))
    return env


def _cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "shardstep.service.cli", *args], env=_environment(),
                          capture_output=True, text=True, timeout=RUN_SECONDS)
    if check:
        assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done


def _job(tmp_path: Path, run_dir: str, *, steps: int, every: int, backend: str, extra: str = "") -> Path:
    job = tmp_path / f"job-{uuid.uuid4().hex[:6]}.toml"
    job.write_text(DIGITS_JOB.format(run_dir=run_dir, task="digits", steps=steps, every=every, backend=backend)
                   + extra)
    return job


def _final(url: ObjectPath):
    with open_checkpoint(url / CHECKPOINT_DIR) as checkpoint:
        return checkpoint.step, checkpoint.export()[0]


def test_a_ray_run_on_object_storage_equals_the_local_run_bit_for_bit(s3_server, url, tmp_path):
    _cli("run", str(_job(tmp_path, str(url), steps=40, every=20, backend="ray")), "--quiet")
    step, params = _final(url)
    assert step == 40
    assert_same(params, digits_reference(40), "s3 run: ")
    stored = s3_server.objects(url.key + "/")
    names = {key[len(url.key) + 1:] for key in stored}
    assert JOB_FILE in names and committed_steps(url / CHECKPOINT_DIR) == [20, 40]
    assert not [n for n in names if n.endswith(".run-lease") or n.endswith(".writer-lease")]  # released
    # the log: every step once, in order, from its segments
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in read_log_lines(url)]
    assert steps == list(range(1, 41))
    # nothing but the run's own files, and no credential anywhere in them
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for key in stored:
        assert secret.encode() not in ObjectPath(f"s3://{BUCKET}/{key}").read_bytes(), key

    inspected = _cli("inspect", str(url)).stdout
    assert f"checkpoint  {url}/checkpoints/step-0000000040" in inspected and "committed   steps [20, 40]" in inspected
    out = tmp_path / "final.ckpt"
    _cli("export", str(url), "--out", str(out))
    assert_same(checkpoints.load(out)["model"], params)
    _cli("export", str(url), "--out", str(url / "exports" / "final.ckpt"))
    assert_same(checkpoints.load(url / "exports" / "final.ckpt")["model"], params)
    plotted = _cli("plot", str(url), "--out", str(tmp_path / "metrics.png"))
    assert plotted.stdout.strip() == f"wrote {tmp_path / 'metrics.png'}"


def test_resume_and_fine_tuning_from_a_url(url, tmp_path):
    """A run of 20 steps, resumed to 40 with `resume URL --steps`... is the 40-step run; a new
    run whose [init] from names the URL starts from its weights."""
    job = _job(tmp_path, str(url), steps=20, every=20, backend="inline")
    _cli("run", str(job), "--quiet")
    longer = _job(tmp_path, str(url), steps=40, every=20, backend="inline")
    _cli("run", str(longer), "--quiet")  # more steps: the run directory continues its own job
    step, params = _final(url)
    assert step == 40
    assert_same(params, digits_reference(40), "resumed: ")
    tuned = ObjectPath(f"s3://{BUCKET}/runs/{uuid.uuid4().hex}")
    job = _job(tmp_path, str(tuned), steps=1, every=1, backend="inline", extra=f'\n[init]\nfrom = "{url}"\n')
    done = _cli("run", str(job))
    assert f"initialized from {url}" in done.stdout
    with open_checkpoint(tuned / CHECKPOINT_DIR) as checkpoint:
        assert checkpoint.step == 1 and (checkpoint.extra or {}).get("coordinator") is not None


def test_the_server_lost_mid_run_then_resume_is_bit_identical(s3_server, url, tmp_path):
    """The network path to the server is cut once the first checkpoint is committed: the run
    fails in one clear line, the committed checkpoints stay, and after the server is back
    `shardstep resume URL` ends exactly where an uninterrupted run ends."""
    steps = 400
    job = _job(tmp_path, str(url), steps=steps, every=20, backend="inline")
    process = subprocess.Popen([sys.executable, "-m", "shardstep.service.cli", "run", str(job), "--quiet"],
                               env=_environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + RUN_SECONDS
        while not committed_steps(url / CHECKPOINT_DIR):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.05)
        s3_server.relay.cut()
        try:
            _, stderr = process.communicate(timeout=RUN_SECONDS)
        finally:
            s3_server.relay.restore()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    # whatever the cut hit first (a log segment, a shard file, a lease renewal), the line names
    # the object and says how to continue
    assert re.match(rf"shardstep run: the run failed: .*cannot (write|look up|list|read) {re.escape(str(url))}/",
                    last), stderr
    assert last.endswith(f"once the object store answers again, continue with `shardstep resume {url}`"), stderr
    assert "Traceback" not in stderr, stderr
    kept = committed_steps(url / CHECKPOINT_DIR)
    assert kept and kept[-1] < steps
    _cli("resume", str(url), "--quiet")
    step, params = _final(url)
    assert step == steps
    assert_same(params, digits_reference(steps), "resumed after the outage: ")
    logged = [int(line.split('"step": ')[1].split(",")[0]) for line in read_log_lines(url)]
    assert logged == list(range(1, steps + 1))
