"""SIGTERM (what `jobs stop`, Kubernetes and schedulers send) and SIGINT (Ctrl-C) at any
moment of a run on a private local Ray: while Ray starts, mid-run and during a checkpoint.
Each ends with shardstep's own message and exit 130, every process of the run gone, and the
committed checkpoints intact."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from shardstep.checkpoints import committed_steps, open_checkpoint
from shardstep.service.run_dir import METRICS_FILE

ROOT = Path(__file__).resolve().parents[1]
JOB = """\
run_dir = "{run_dir}"

[task]
name = "synthetic-mlp"
[task.args]
params = 2000000
depth = 2
examples = 2048

[optimizer]
name = "adam"

[training]
steps = 100000
batch_size = 64

[resources]
shards = 2
workers = 1
backend = "ray"

[checkpoint]
every = 3
keep_last = 2
"""
WAIT_SECONDS = 180


def _processes_of(session: int, marker: str) -> list[tuple[int, str]]:
    """Live processes in ``session`` or whose command line names ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        if int(fields[3]) == session or marker in command:
            found.append((int(entry), command[:120]))
    return found


def _moment_reached(moment: str, run_dir: Path, header_seen: float | None) -> bool:
    if moment == "ray start":
        return header_seen is not None and time.monotonic() - header_seen > 1.0
    if moment == "mid-run":
        log = run_dir / METRICS_FILE
        return log.exists() and log.read_text().count("\n") >= 2
    if moment == "checkpoint":
        # a commit has happened, and the next checkpoint's shards are writing
        checkpoints = run_dir / "checkpoints"
        return checkpoints.is_dir() and bool(committed_steps(checkpoints)) and any(
            ".pending-" in name for name in os.listdir(checkpoints))
    raise AssertionError(moment)


@pytest.mark.parametrize(("signum", "moment"), [
    (signal.SIGTERM, "ray start"), (signal.SIGTERM, "mid-run"), (signal.SIGTERM, "checkpoint"),
    (signal.SIGINT, "ray start"), (signal.SIGINT, "checkpoint"),
])
def test_a_signal_at_any_moment_stops_the_run_with_its_message_and_keeps_the_checkpoints(tmp_path, signum, moment):
    temp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")  # Ray's unix sockets need a short path
    run_dir = tmp_path / "run"
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(run_dir=run_dir))
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=temp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", PYTHONPATH=str(ROOT))
    process = subprocess.Popen([sys.executable, "-m", "shardstep.service.cli", "run", str(job)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in process.stdout], daemon=True)
    reader.start()
    # read by a thread too: a process of the run that outlived it and kept the pipe open
    # must fail the test (below), not hang it
    errors: list[str] = []
    error_reader = threading.Thread(target=lambda: errors.append(process.stderr.read()), daemon=True)
    error_reader.start()

    def stderr_text() -> str:
        error_reader.join(timeout=60)
        assert not error_reader.is_alive(), "a process of the run still holds its stderr open"
        return errors[0]

    try:
        header_seen = None
        deadline = time.monotonic() + WAIT_SECONDS
        while not _moment_reached(moment, run_dir, header_seen):
            assert process.poll() is None, f"the run ended before {moment}: {stderr_text()}"
            assert time.monotonic() < deadline, f"the run did not reach {moment} within {WAIT_SECONDS} s"
            try:
                if lines.get(timeout=0.005).startswith("shardstep: ") and header_seen is None:
                    header_seen = time.monotonic()
            except queue.Empty:
                pass
        if moment == "ray start":
            assert not (run_dir / METRICS_FILE).exists()  # no step yet
        process.send_signal(signum)
        code = process.wait(timeout=WAIT_SECONDS)
        stderr = stderr_text()
        assert code == 130, stderr
        assert stderr.strip().splitlines()[-1] == (
            f"shardstep run: interrupted; committed checkpoints are kept (continue with `shardstep resume {run_dir}`)")
        assert "Traceback" not in stderr and "received at time" not in stderr, stderr
        # every process of the run ends: the actors, and the Ray instance it started
        deadline = time.monotonic() + 60
        while (left := _processes_of(process.pid, temp)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, left
        checkpoints = run_dir / "checkpoints"
        if checkpoints.is_dir():
            assert not [name for name in os.listdir(checkpoints) if ".pending-" in name]
            for step in committed_steps(checkpoints):
                with open_checkpoint(checkpoints, step) as checkpoint:
                    checkpoint.export()  # every chunk read and its checksum checked
        if moment == "checkpoint":
            assert committed_steps(checkpoints)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        for pid, _ in _processes_of(process.pid, temp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.stdout.close()
        process.stderr.close()
        shutil.rmtree(temp, ignore_errors=True)
