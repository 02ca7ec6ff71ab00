"""The command line: real processes, real files, exit codes and messages."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shardstep.checkpoints import committed_steps, load
from shardstep.service.coordinator import CHECKPOINT_DIR
from tests.runs import DIGITS_JOB, assert_same, digits_reference, final_params, snapshot


def write_job(tmp_path: Path, steps: int, backend: str = "inline", every: int = 10, name: str = "job.toml",
              run_dir: str = "run") -> Path:
    path = tmp_path / name
    path.write_text(DIGITS_JOB.format(run_dir=run_dir, task="digits", steps=steps, backend=backend, every=every))
    return path


def shardstep(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardstep.service.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_run_inspect_export_and_run_again_resumes(tmp_path):
    job = write_job(tmp_path, steps=30)
    done = shardstep("run", str(job))
    assert done.returncode == 0, done.stderr
    assert "done: 30 steps" in done.stdout and "exchanged data" not in done.stdout  # inline: no actors
    run_dir = tmp_path / "run"
    assert committed_steps(run_dir / CHECKPOINT_DIR) == [10, 20, 30]
    assert_same(final_params(run_dir), digits_reference(30))

    shown = shardstep("inspect", str(run_dir))
    assert shown.returncode == 0, shown.stderr
    for pattern in (r"step +30\n", r"shards +2\n", r"0\.weight +256x64 +float32 +16,384 +0 +exp_avg, exp_avg_sq, step",
                    r"committed +steps \[10, 20, 30\]", r"total 19,210 elements"):
        assert re.search(pattern, shown.stdout), (pattern, shown.stdout)

    out = tmp_path / "export.ckpt"
    exported = shardstep("export", str(run_dir), "--out", str(out), "--step", "20")
    assert exported.returncode == 0, exported.stderr
    data = load(out)
    assert_same(data["model"], digits_reference(20))
    assert data["optimizer"]["param_groups"][0]["params"] == [0, 1, 2, 3]
    assert set(data["optimizer"]["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}

    # the same run directory with more steps: continues from step 30, never starts over
    longer = write_job(tmp_path, steps=50, name="longer.toml")
    again = shardstep("run", str(longer), "--shards", "3")
    assert again.returncode == 0, again.stderr
    assert "resuming from step 30" in again.stdout
    assert committed_steps(run_dir / CHECKPOINT_DIR) == [10, 20, 30, 40, 50]
    assert_same(final_params(run_dir), digits_reference(50))


def test_user_packages_named_like_shardstep_folders_neither_shadow_nor_are_shadowed(tmp_path):
    """The task lives in the user's own package ``service``, beside folders ``workers`` and
    ``checkpoints`` that fail when imported, all first on the path: shardstep imports only
    ``shardstep.*``, so the run trains the user's task and never touches their folders."""
    (tmp_path / "service").mkdir()
    (tmp_path / "service" / "__init__.py").write_text(
        "from shardstep.workers.tasks.digits import DigitsTask\n\n\n"
        "class Digits(DigitsTask):\n    \"\"\"The digits task, in a user's package named service.\"\"\"\n")
    for name in ("workers", "checkpoints"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user folder {name}/ was imported')\n")
    job = tmp_path / "job.toml"
    job.write_text(DIGITS_JOB.format(run_dir="run", task="service:Digits", steps=20, backend="inline", every=10))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "shardstep.service.cli", "run", "job.toml", "--quiet"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "done: 20 steps" in done.stdout
    assert_same(final_params(tmp_path / "run"), digits_reference(20))


def test_bad_input_exits_2_with_one_message_and_changes_nothing(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(DIGITS_JOB.format(run_dir="run", task="digits", steps=10, backend="cuda", every=5))
    result = shardstep("run", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == (f"shardstep run: error: {bad}: resources.backend must be one of 'ray', "
                                      f"'inline'; got 'cuda'")
    assert not (tmp_path / "run").exists()

    job = write_job(tmp_path, steps=10)
    assert shardstep("run", str(job)).returncode == 0
    before = snapshot(tmp_path / "run")
    for args, message in [
        (("resume", str(tmp_path / "nowhere")), "is not a run directory"),
        (("inspect", str(tmp_path / "nowhere")), "is neither a run directory nor a checkpoint directory"),
        (("export", str(tmp_path / "run"), "--out", str(tmp_path), "--step", "10"), "is a directory"),
        (("export", str(tmp_path / "run"), "--out", str(tmp_path / "x"), "--step", "7"), "step 7 is not committed"),
        (("run", str(job), "--shards", "0"), "must be an integer >= 1; got 0"),
    ]:
        result = shardstep(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
    assert snapshot(tmp_path / "run") == before

    empty = tmp_path / "empty"
    write_job(tmp_path, steps=10, name="empty.toml", run_dir="empty")
    empty.mkdir()
    (empty / "job.json").write_text((tmp_path / "run" / "job.json").read_text())
    result = shardstep("resume", str(empty))
    assert result.returncode == 2 and "has no committed checkpoint to resume from" in result.stderr


def test_a_killed_coordinator_resumes_bit_identical(tmp_path, ray_address):
    """SIGKILL the driver process mid-run; `shardstep resume` finishes the run exactly."""
    steps = 1500
    job = write_job(tmp_path, steps=steps, backend="ray", every=25)
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    process = subprocess.Popen([sys.executable, "-m", "shardstep.service.cli", "run", str(job), "--quiet"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = tmp_path / "run" / CHECKPOINT_DIR
    deadline = time.monotonic() + 120
    try:
        while len(committed_steps(root)) < 3:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoints within 120 s"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    killed_at = committed_steps(root)[-1]
    assert killed_at < steps
    resumed = shardstep("resume", str(tmp_path / "run"), "--quiet", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "done: 1500 steps" in resumed.stdout
    assert "(actors exchanged data through shared memory)" in resumed.stdout  # one node: auto
    assert committed_steps(root)[-1] == steps
    assert_same(final_params(tmp_path / "run"), digits_reference(steps))


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def test_local_mode_starts_its_own_ray_whatever_else_runs_on_the_machine(tmp_path):
    """Another Ray cluster was started on this machine with `ray start` (it is the one a plain
    ray.init() would join): a job with no address still runs on a private instance of its own,
    says so, and leaves the other cluster as it was."""
    temp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's unix sockets live in it
    names = ("port", "node-manager-port", "object-manager-port", "ray-client-server-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port")
    ports = dict(zip(names, _free_ports(len(names))))
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update(RAY_TMPDIR=temp, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    address_file = Path(temp) / "ray" / "ray_current_cluster"  # where ray.init() looks, with RAY_TMPDIR
    other = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                              "--node-ip-address=127.0.0.1", "--include-dashboard=false", "--num-cpus=1",
                              f"--temp-dir={Path(temp) / 'ray'}", "--disable-usage-stats",
                              *[f"--{name}={port}" for name, port in ports.items()]],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not address_file.exists():
            assert other.poll() is None, "ray start exited"
            assert time.monotonic() < deadline, "the other cluster did not come up within 90 s"
            time.sleep(0.2)
        joined = address_file.read_text().strip()
        assert joined == f"127.0.0.1:{ports['port']}"
        job = write_job(tmp_path, steps=10, backend="ray")
        # no RAY_AUTH_MODE: Ray's default for a new instance, on which it warns at every start
        private = {key: value for key, value in env.items() if key != "RAY_AUTH_MODE"}
        done = subprocess.run([sys.executable, "-m", "shardstep.service.cli", "run", str(job), "--quiet"],
                              env=private, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert "Token authentication" not in done.stderr, done.stderr  # shardstep's own instance: no notice
        summary = re.search(r"^done: 10 steps \(epoch 0\) in [0-9.]+ s on a new local Ray instance \(([0-9.:]+)\) "
                            r"\(actors exchanged data through shared memory\)", done.stdout, re.MULTILINE)
        assert summary, done.stdout
        assert summary.group(1) != joined  # where it ran, as Ray's own runtime context says

        assert other.poll() is None and address_file.read_text().strip() == joined
        assert_same(final_params(tmp_path / "run"), digits_reference(10))
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(other.pid, sig)
            except ProcessLookupError:
                break
            try:
                other.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp, ignore_errors=True)


def test_a_finished_run_is_complete_without_starting_anything_and_resume_steps_extends_it(tmp_path):
    job = write_job(tmp_path, steps=20)
    assert shardstep("run", str(job), "--quiet").returncode == 0
    run_dir = tmp_path / "run"
    before = snapshot(run_dir)
    # asked for the Ray backend: a run with anything to train would start a local instance
    for again in (("resume", str(run_dir), "--backend", "ray"), ("run", str(job))):
        done = shardstep(*again)
        assert done.returncode == 0, done.stderr
        assert done.stdout == (f"shardstep: {run_dir} is already complete at step 20 (training.steps = 20); nothing "
                               f"to train. Train it further with `shardstep resume {run_dir} --steps N` (N > 20)\n")
        assert snapshot(run_dir) == before
    extended = shardstep("resume", str(run_dir), "--steps", "30", "--quiet")
    assert extended.returncode == 0 and "done: 30 steps" in extended.stdout, extended.stderr
    assert committed_steps(run_dir / CHECKPOINT_DIR) == [10, 20, 30]
    assert_same(final_params(run_dir), digits_reference(30))  # as a run planned for 30 steps
    for steps, message in (("0", "argument --steps: must be an integer >= 1; got '0'"),
                           ("25", "has already trained 30 steps; training.steps = 25 would end before")):
        refused = shardstep("resume", str(run_dir), "--steps", steps)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr, \
            refused.stderr


def test_an_interrupt_while_the_job_is_read_says_nothing_was_written(tmp_path):
    """Ctrl-C while the job's own task module is still importing (before any run directory is
    known): exit 130, shardstep's message, no placeholder, nothing written."""
    (tmp_path / "slowtask.py").write_text("import time\ntime.sleep(60)\n")
    job = tmp_path / "job.toml"
    job.write_text(DIGITS_JOB.format(run_dir="run", task="slowtask:Task", steps=5, backend="inline", every=5))
    process = subprocess.Popen([sys.executable, "-m", "shardstep.service.cli", "run", str(job)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    assert err == "shardstep run: interrupted before the run started; nothing was written\n", err
    assert not (tmp_path / "run").exists()


def test_a_fine_tuning_run_says_what_it_loaded_before_it_trains(tmp_path):
    assert shardstep("run", str(write_job(tmp_path, steps=10)), "--quiet").returncode == 0
    tuned = write_job(tmp_path, steps=20, name="tuned.toml", run_dir="tuned")
    tuned.write_text(tuned.read_text() + '\n[init]\nfrom = "run"\n')
    done = shardstep("run", str(tuned))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    said = next(i for i, line in enumerate(lines) if line.startswith(f"initialized from {tmp_path / 'run'}"))
    first_step = next(i for i, line in enumerate(lines) if line.startswith("step "))
    assert said < first_step < next(i for i, line in enumerate(lines) if line.startswith("done: ")), done.stdout
    assert "loaded 0.weight, 0.bias, 2.weight, 2.bias; new none" in lines[said]


def test_set_overrides_job_keys_checked_like_the_file_on_run_and_resume(tmp_path):
    import json

    job = write_job(tmp_path, steps=20)
    done = shardstep("run", str(job), "--set", "training.steps=10", "--set", "checkpoint.every=5", "--quiet")
    assert done.returncode == 0 and "done: 10 steps" in done.stdout, done.stderr
    run_dir = tmp_path / "run"
    assert committed_steps(run_dir / CHECKPOINT_DIR) == [5, 10]
    assert_same(final_params(run_dir), digits_reference(10))
    saved = json.loads((run_dir / "job.json").read_text())["job"]
    assert saved["steps"] == 10 and saved["checkpoint_every"] == 5
    # the resume route to a longer run: the same as --steps, bit for bit
    longer = shardstep("resume", str(run_dir), "--set", "training.steps=20", "--quiet")
    assert longer.returncode == 0 and "done: 20 steps" in longer.stdout, longer.stderr
    assert_same(final_params(run_dir), digits_reference(20))
    before = snapshot(run_dir)
    for command, message in (
            (("run", str(job), "--set", "training.stepz=5"),
             "--set training.stepz: not a job key (did you mean 'training.steps'?)"),
            (("run", str(job), "--set", "training.batch_size=0"), "training.batch_size must be an integer >= 1"),
            (("run", str(job), "--set", "steps"), "--set 'steps': expected KEY=VALUE with a dotted job key"),
            (("resume", str(run_dir), "--set", "optimizer.args.lr=0.5"),
             "holds checkpoints of a different job (optimizer.args.lr 0.01 -> 0.5)")):
        refused = shardstep(*command)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
        assert len(refused.stderr.splitlines()) == 1 and "Traceback" not in refused.stderr
        assert snapshot(run_dir) == before
