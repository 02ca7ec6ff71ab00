"""Code beside the job file: a task module and a schedule function kept next to the job
import in `run` (inline and on a local Ray instance, whose actors get them as py_modules)
and in `resume`, from any current directory and without PYTHONPATH; a task's path
arguments resolve against the job file's directory. (`submit` of a package beside the job:
tests/test_submit.py.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from shardstep.checkpoints import committed_steps
from shardstep.service.run_dir import JOB_FILE
from tests.runs import DIGITS_JOB, final_params

TASK_MODULE = '''\
from pathlib import Path

from shardstep.workers.tasks.digits import DigitsTask


class ScaledDigits(DigitsTask):
    """The digits task with its loss scaled by a number read from a file."""

    path_arguments = ("scale_file",)

    def __init__(self, *, scale_file, **kwargs):
        super().__init__(**kwargs)
        self.scale_file = scale_file
        self.scale = float(Path(scale_file).read_text())

    def loss_and_grad(self, params, batch):
        loss, grads = super().loss_and_grad(params, batch)
        return loss * self.scale, {name: grad * self.scale for name, grad in grads.items()}
'''
SCHEDULES = '''\
def warmup(epoch):
    return min(1.0, (epoch + 1) / 5)
'''
# DIGITS_JOB's task and schedule replaced by the user's, named relative to the job file
OWN_CODE = {
    'name = "mytask:ScaledDigits"\n': 'name = "mytask:ScaledDigits"\n[task.args]\nscale_file = "data/scale.txt"\n',
    'name = "StepLR"\n[schedulers.args]\nstep_size = 40\ngamma = 0.5\n':
        'name = "LambdaLR"\n[schedulers.args]\nlr_lambda = "schedules:warmup"\n',
}


def job_text(backend: str) -> str:
    text = DIGITS_JOB.format(run_dir=f"runs/{backend}", task="mytask:ScaledDigits", steps=20, backend=backend,
                             every=10)
    for old, new in OWN_CODE.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


def project(tmp_path: Path) -> Path:
    """A user's folder: the job, its task module, its schedule and its data side by side."""
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "mytask.py").write_text(TASK_MODULE)
    (folder / "schedules.py").write_text(SCHEDULES)
    (folder / "data" / "scale.txt").write_text("0.5\n")
    for backend in ("inline", "ray"):
        (folder / f"{backend}.toml").write_text(job_text(backend))
    return folder


def shardstep(*args: str) -> subprocess.CompletedProcess:
    """The CLI from an unrelated current directory, with no PYTHONPATH and no Ray address."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    elsewhere = tempfile.mkdtemp(prefix="elsewhere-")
    try:
        return subprocess.run([sys.executable, "-m", "shardstep.service.cli", *args], capture_output=True, text=True,
                              cwd=elsewhere, env=env, timeout=300, stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_code_and_data_beside_the_job_file_train_in_run_on_both_backends(tmp_path):
    folder = project(tmp_path)
    inline = shardstep("run", str(folder / "inline.toml"), "--quiet")
    assert inline.returncode == 0, inline.stderr
    saved = json.loads((folder / "runs" / "inline" / JOB_FILE).read_text())["job"]
    assert saved["code_dir"] == str(folder)
    assert saved["task_args"] == {"scale_file": str(folder / "data" / "scale.txt")}

    on_ray = shardstep("run", str(folder / "ray.toml"), "--quiet")
    assert on_ray.returncode == 0, on_ray.stderr
    assert "on a new local Ray instance" in on_ray.stdout
    ours, theirs = final_params(folder / "runs" / "inline"), final_params(folder / "runs" / "ray")
    for name in ours:  # the actors ran the user's task: bit-identical across backends
        assert np.array_equal(ours[name], theirs[name]), name


def test_resume_finds_the_jobs_code_again(tmp_path):
    folder = project(tmp_path)
    first = shardstep("run", str(folder / "inline.toml"), "--quiet")
    assert first.returncode == 0, first.stderr
    finished = final_params(folder / "runs" / "inline")
    run_dir = folder / "runs" / "inline"
    shutil.rmtree(run_dir / "checkpoints" / "step-0000000020")  # as if stopped after step 10
    resumed = shardstep("resume", str(run_dir), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "done: 20 steps" in resumed.stdout
    assert committed_steps(run_dir / "checkpoints") == [10, 20]
    again = final_params(run_dir)
    for name in finished:
        assert np.array_equal(again[name], finished[name]), name
