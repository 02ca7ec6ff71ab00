"""What a run shows while it trains and after: the status line, log lines, metrics.jsonl and
the plot."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np

from shardstep.service.coordinator import METRICS_FILE, Coordinator
from shardstep.service.jobspec import JobSpec, SchedulerSpec
from shardstep.service.progress import Progress


def record(step, **extra):
    return {"step": step, "epoch": 0, "batch": step - 1, "loss": 1.0 / step, "lr": 0.1, "lrs": [0.1, 0.01],
            "checkpoint": 10 if step > 10 else None, **extra}


def test_plain_lines_every_twentieth_of_the_run_and_at_evaluations():
    out = io.StringIO()
    progress = Progress(40, stream=out, live=False)
    for step in range(1, 41):
        progress.update(record(step, **({"eval": {"accuracy": 0.5}} if step == 5 else {})))
    progress.close()
    lines = out.getvalue().splitlines()
    assert [int(line.split()[1].split("/")[0]) for line in lines] == [2 * k for k in range(1, 3)] + [5] + [
        2 * k for k in range(3, 21)]
    assert "\r" not in out.getvalue()
    assert "lr 0.1, 0.01" in lines[0] and "eval accuracy 0.5" in lines[2]
    assert "ckpt 10" in lines[-1] and "ETA" in lines[-1] and "steps/s" in lines[-1]


def test_a_terminal_gets_one_status_line_redrawn_in_place():
    out = io.StringIO()
    progress = Progress(30, stream=out, live=True)
    progress.update(record(1))
    progress.update(record(2, eval={"accuracy": 0.75}))
    progress.update(record(30))
    progress.close()
    text = out.getvalue()
    assert text.startswith("\rstep 1/30 ")
    assert "eval accuracy 0.75\n" in text
    assert "step 30/30 " in text and "100%" in text and text.endswith("\n")
    assert text.count("\n") == 2  # the evaluation line and the final newline


def test_metrics_log_and_plot(tmp_path):
    spec = JobSpec(task="digits", task_args={}, optimizer="adam", optimizer_args={"lr": 0.01}, param_groups=(),
                   schedulers=(SchedulerSpec("CosineAnnealingLR", {"T_max": 30}),), steps=30, epochs=None,
                   batch_size=64, eval_every=10, backend="inline", run_dir=str(tmp_path / "run"))
    Coordinator(spec).run()
    lines = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 31))
    assert [r["step"] for r in lines if "eval" in r] == [10, 20, 30]
    assert all({"loss", "lr", "lrs", "seconds", "epoch", "batch"} <= set(r) for r in lines)

    out = tmp_path / "plot.png"
    done = subprocess.run([sys.executable, "-m", "shardstep.service.cli", "plot", str(tmp_path / "run"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(out)
    height, width = image.shape[:2]
    assert width >= 600 and height >= 600
    pixels = image[..., :3].reshape(-1, 3)
    assert pixels.std() > 0.05  # not blank
    assert len(np.unique((pixels * 255).astype(np.uint8), axis=0)) > 20  # lines in several colours

    missing = subprocess.run([sys.executable, "-m", "shardstep.service.cli", "plot", str(tmp_path)], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and f"has no {METRICS_FILE}" in missing.stderr


def test_the_rate_and_eta_count_the_steps_trained_not_the_start_up():
    """A run whose first step comes 1.5 s after the progress starts (Ray starting, actors
    loading): the rate is that of the steps, about 100/s here, not 20 steps over 1.6 s."""
    import time

    out = io.StringIO()
    progress = Progress(2000, stream=out, live=False)
    time.sleep(1.5)
    for step in range(1, 101):
        time.sleep(0.01)
        progress.update(record(step, seconds=0.01))
    progress.close()
    last = out.getvalue().splitlines()[-1]
    rate = float(last.split(" steps/s")[0].split()[-1])
    assert rate > 40, last  # counted from the start-up it would be under 100 / 2.5 = 40
    eta = last.split("ETA ")[1].split()[0]
    minutes, seconds = map(int, eta.split(":"))
    assert minutes * 60 + seconds < 1900 / 40, last


def run_digits(tmp_path, optimizer: str, training: str) -> subprocess.CompletedProcess:
    """``shardstep run`` of a digits job on the inline backend, with ``optimizer`` and
    ``training``'s TOML tables."""
    job = tmp_path / "job.toml"
    job.write_text(f'run_dir = "{tmp_path / "run"}"\n\n[task]\nname = "digits"\n\n{optimizer}\n\n'
                   f'{training}\n\n[resources]\nbackend = "inline"\n')
    return subprocess.run([sys.executable, "-m", "shardstep.service.cli", "run", str(job)], capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)


def test_an_epoch_only_job_shows_its_step_total_and_an_eta(tmp_path):
    out = run_digits(tmp_path, '[optimizer]\nname = "adam"', "[training]\nepochs = 2\nbatch_size = 96")
    assert out.returncode == 0, out.stderr
    steps = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    # 1,442 training images in batches of 96: 16 a epoch, 32 in all
    assert steps and all(line.split()[1].endswith("/32") and "ETA" in line for line in steps), out.stdout
    assert steps[-1].startswith("step 32/32 ")


def test_a_diverging_run_says_so_once_without_numpys_overflow_warnings(tmp_path):
    """The non-finite step is reported by shardstep (step, parameters, what to do); numpy's
    overflow warnings from the diverging matmuls before it would only repeat it."""
    out = run_digits(tmp_path, '[optimizer]\nname = "sgd"\n\n[optimizer.args]\nlr = 1e8', "[training]\nsteps = 30")
    assert out.returncode == 1, out.stderr
    assert "RuntimeWarning" not in out.stderr, out.stderr
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("shardstep run: the run failed: training loss is nan and the gradients of ") and \
        "are not finite at step 4 (epoch 0, batch 3)" in line, line
