"""A run directory knows its job, holds one run at a time, and its log is never a single
point of failure: edited jobs, concurrent runs, torn or garbage metrics.jsonl, a full disk
during an append, and a diverging run that skips non-finite steps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardstep.checkpoints import committed_steps, open_checkpoint
from shardstep.service import cli
from shardstep.service.run_dir import JOB_FILE, METRICS_FILE, RUN_LOCK, RunDirectoryError, open_run_dir
from tests.runs import DIGITS_JOB, assert_same, digits_reference, final_params, snapshot

ROOT = Path(__file__).resolve().parents[1]


def write_job(path: Path, run_dir: Path, *, steps: int = 20, every: int = 10, task: str = "digits",
              replace: dict[str, str] | None = None) -> Path:
    text = DIGITS_JOB.format(run_dir=run_dir, task=task, steps=steps, backend="inline", every=every)
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path.write_text(text)
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


# ---------------------------------------------------------------------------------------
# an edited job on the same run directory


@pytest.mark.parametrize(("edit", "key", "old", "new"), [
    ({"batch_size = 96": "batch_size = 64"}, "training.batch_size", "96", "64"),
    ({"lr = 0.01": "lr = 0.05"}, "optimizer.args.lr", "0.01", "0.05"),
    ({'name = "adam"': 'name = "sgd"'}, "optimizer.name", '"adam"', '"sgd"'),
    ({"seed = 5": "seed = 6"}, "training.seed", "5", "6"),
    ({"gamma = 0.5": "gamma = 0.25"}, "schedulers", None, None),
])
def test_a_job_that_changes_what_is_trained_is_refused_and_nothing_changes(tmp_path, capsys, edit, key, old, new):
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", run_dir)
    assert run_cli(capsys, "run", str(job), "--quiet")[0] == 0
    before = snapshot(run_dir)
    write_job(job, run_dir, steps=40, replace=edit)
    code, out, err = run_cli(capsys, "run", str(job))
    assert code == 2 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("shardstep run: error: ") and "Traceback" not in err
    assert f"{run_dir} holds checkpoints of a different job ({key}" in err
    if old is not None:
        assert f"{key} {old} -> {new}" in err
    assert f"shardstep resume {run_dir}" in err and "[init] from" in err
    assert snapshot(run_dir) == before


def test_more_steps_are_applied_recorded_and_train_the_same_numbers(tmp_path, capsys):
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", run_dir, steps=20)
    assert run_cli(capsys, "run", str(job), "--quiet")[0] == 0
    run_id = json.loads((run_dir / JOB_FILE).read_text())["run_id"]
    write_job(job, run_dir, steps=40, every=20)
    code, out, err = run_cli(capsys, "run", str(job))
    assert code == 0, err
    assert "the job changed since step 20 (checkpoint.every 10 -> 20, training.steps 20 -> 40)" in out
    assert "done: 40 steps" in out
    saved = json.loads((run_dir / JOB_FILE).read_text())
    assert saved["run_id"] == run_id and saved["job"]["steps"] == 40
    assert saved["changes"] == [{"step": 20, "changed": {"checkpoint.every": [10, 20], "training.steps": [20, 40]}}]
    assert [r["step"] for r in records(run_dir)] == list(range(1, 41))
    assert_same(final_params(run_dir), digits_reference(40))
    # `resume` continues the job as changed, not as first written: complete at its 40 steps
    code, out, err = run_cli(capsys, "resume", str(run_dir), "--quiet")
    assert code == 0 and f"{run_dir} is already complete at step 40 (training.steps = 40)" in out, err


def test_fewer_steps_than_already_trained_is_refused(tmp_path, capsys):
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", run_dir, steps=20)
    assert run_cli(capsys, "run", str(job), "--quiet")[0] == 0
    before = snapshot(run_dir)
    write_job(job, run_dir, steps=10)
    code, _, err = run_cli(capsys, "run", str(job))
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{run_dir} has already trained 20 steps; training.steps = 10 would end before its latest checkpoint" in err
    assert snapshot(run_dir) == before


def test_before_the_first_checkpoint_any_change_is_the_runs_own_job(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # a run that wrote its job but committed nothing (killed before its first checkpoint)
    first = write_job(tmp_path / "first.toml", run_dir, steps=20)
    from shardstep.service.jobspec import load_job

    directory = open_run_dir(run_dir, load_job(first).to_dict(), None, None)
    directory.close()
    run_id = directory.run_id
    job = write_job(tmp_path / "job.toml", run_dir, steps=20, replace={"batch_size = 96": "batch_size = 64"})
    code, out, err = run_cli(capsys, "run", str(job), "--quiet")
    assert code == 0, err
    saved = json.loads((run_dir / JOB_FILE).read_text())
    assert saved["run_id"] == run_id and saved["job"]["batch_size"] == 64
    with open_checkpoint(run_dir / "checkpoints") as checkpoint:
        assert checkpoint.run_id == run_id


# ---------------------------------------------------------------------------------------
# one run at a time


def test_a_run_directory_in_use_is_refused_before_anything_is_written(tmp_path, capsys):
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", run_dir)
    from shardstep.service.jobspec import load_job

    holder = open_run_dir(run_dir, load_job(job).to_dict(), None, None)
    try:
        before = snapshot(run_dir)
        code, out, err = run_cli(capsys, "run", str(job))
        assert code == 2 and len(err.splitlines()) == 1
        assert f"run directory {run_dir} is in use by another run (it holds {run_dir / RUN_LOCK})" in err
        assert snapshot(run_dir) == before
        with pytest.raises(RunDirectoryError, match="in use by another run"):
            open_run_dir(run_dir, load_job(job).to_dict(), None, None)
    finally:
        holder.close()
    assert run_cli(capsys, "run", str(job), "--quiet")[0] == 0


def test_simultaneous_runs_on_a_fresh_directory_keep_one_run_id(tmp_path):
    """Both processes start at once; whichever takes the lock writes job.json, the other is
    refused (or, if it comes after, continues the same run): the directory always holds one
    run's id in job.json and in every checkpoint."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for trial in range(4):
        run_dir = tmp_path / f"run-{trial}"
        job = write_job(tmp_path / f"job-{trial}.toml", run_dir, steps=10, every=5)
        command = [sys.executable, "-m", "shardstep.service.cli", "run", str(job), "--quiet"]
        processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                     for _ in range(2)]
        outcomes = [(p.wait(timeout=120), p.stderr.read()) for p in processes]
        for process in processes:
            process.stdout.close()
            process.stderr.close()
        assert any(code == 0 for code, _ in outcomes), outcomes
        for code, err in outcomes:
            assert code == 0 or (code == 2 and "is in use by another run" in err), (code, err)
        run_id = json.loads((run_dir / JOB_FILE).read_text())["run_id"]
        for step in committed_steps(run_dir / "checkpoints"):
            with open_checkpoint(run_dir / "checkpoints", step) as checkpoint:
                assert checkpoint.run_id == run_id, f"trial {trial}, step {step}"


# ---------------------------------------------------------------------------------------
# the run log


def test_a_torn_or_garbage_log_is_cut_back_on_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", run_dir, steps=20, every=10)
    assert run_cli(capsys, "run", str(job), "--quiet")[0] == 0
    log = run_dir / METRICS_FILE
    lines = log.read_text().splitlines()
    # the state of a run that died at step 14: its log holds steps 1-14, a torn append and
    # garbage; its latest checkpoint is step 10
    shutil.rmtree(run_dir / "checkpoints" / "step-0000000020")
    log.write_text("\n".join(lines[:14]) + "\n" + lines[14][:37] + "\nnot json at all\n\x00\x00\x00\n[1, 2]\n")
    code, out, err = run_cli(capsys, "resume", str(run_dir))
    assert code == 0, err
    assert f"dropped 4 line(s) of {log} that were not whole records (a torn append or garbage); the log now ends " \
           f"at step 10" in out
    assert [r["step"] for r in records(run_dir)] == list(range(1, 21))
    assert_same(final_params(run_dir), digits_reference(20))


def mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs for a full disk needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {done.stderr.strip()}")


def fill_leaving(disk: Path, free: int) -> Path:
    """Fill the file system at ``disk`` to the last byte, then give back ``free`` bytes."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"x" * 65536)
    except OSError:
        pass
    try:
        while True:
            os.write(fd, b"x" * 512)
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(filler, filler.stat().st_size - free)
    return filler


@pytest.mark.parametrize(("during", "steps", "every", "message"), [
    ("an append", 1000, 1000, "cannot append to {run_dir}/metrics.jsonl: No space left on device; nothing was "
                              "committed yet: make room and run the job again"),
    ("a checkpoint", 20, 5, "the asynchronous save of {run_dir}/checkpoints/step-0000000005.pending-"),
])
def test_a_full_disk_fails_in_one_line_and_leaves_nothing_half_written(tmp_path, during, steps, every, message):
    """A real full file system (a small tmpfs): the run fails with one line, exit 1; the log
    ends with a whole record, no half checkpoint is left; run again with room, the job
    finishes with a log of exactly its steps."""
    disk = tmp_path / "disk"
    mount_tmpfs(disk, "4m")
    try:
        run_dir = disk / "run"
        job = write_job(tmp_path / "job.toml", run_dir, steps=steps, every=every)
        filler = fill_leaving(disk, 40 * 1024)
        command = [sys.executable, "-m", "shardstep.service.cli", "run", str(job), "--quiet"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 1, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith("shardstep run: the run failed: " + message.format(run_dir=run_dir)), done.stderr
        logged = [r["step"] for r in records(run_dir)]  # every line a whole record
        assert logged == list(range(1, len(logged) + 1)) and len(logged) >= 5
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [".writer.lock"]
        filler.unlink()
        again = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert again.returncode == 0, again.stderr
        assert [r["step"] for r in records(run_dir)] == list(range(1, steps + 1))
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30)


# ---------------------------------------------------------------------------------------
# bounded skipping


def test_a_run_that_keeps_skipping_stops_after_max_skipped_steps(tmp_path, capsys):
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", run_dir, steps=30, every=2, task="tests.fault_tasks:DivergesFrom",
                    replace={"seed = 5": 'seed = 5\nnonfinite = "skip"\nmax_skipped_steps = 6'})
    code, out, err = run_cli(capsys, "run", str(job), "--quiet")
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("shardstep run: the run failed: 6 steps in a row were skipped for non-finite values "
                          "(max_skipped_steps = 6), the last: training loss is inf at step 3")
    assert "committed checkpoints are kept (latest: step 2)" in err
    logged = records(run_dir)
    assert [r["step"] for r in logged] == [1, 2, 2, 2, 2, 2, 2]
    assert sum(bool(r.get("skipped")) for r in logged) == 5  # the sixth stopped the run before it was logged
    assert committed_steps(run_dir / "checkpoints") == [2]


# ---------------------------------------------------------------------------------------
# a checkpoint's coordinator record is checked before it is trusted


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("batch", 10**12, "an integer in [0, 15]"),
    ("batch", -1, "an integer in [0, 15]"),
    ("epoch", -3, "an integer in [0, ...]"),
    ("step", 7, "20"),
    ("optimizer_steps", "many", "an integer in [0, ...]"),
])
def test_a_coordinator_record_out_of_range_is_refused_before_training(tmp_path, capsys, key, value, allowed):
    from shardstep.checkpoints import dump, load

    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", run_dir, steps=20)
    assert run_cli(capsys, "run", str(job), "--quiet")[0] == 0
    manifest_path = run_dir / "checkpoints" / "step-0000000020" / "manifest.ckpt"
    manifest = load(manifest_path)
    manifest["extra"]["coordinator"][key] = value
    dump(manifest, manifest_path)  # a manifest with a valid checksum that claims the value
    write_job(job, run_dir, steps=40)
    before = snapshot(run_dir)
    code, out, err = run_cli(capsys, "run", str(job), "--quiet")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"shardstep run: error: the checkpoint at step 20 in {run_dir / 'checkpoints'} holds "
                          f"coordinator {key} = {value!r}; this job allows {allowed}"), err
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------------------------------
# places a run cannot write


def test_run_directories_and_outputs_that_cannot_be_written_are_one_line_each(tmp_path, capsys):
    read_only = tmp_path / "read-only"
    mount_tmpfs(read_only, "1m")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True, capture_output=True, timeout=30)
        job = tmp_path / "job.toml"
        for run_dir, message in [
            (read_only / "run", f"cannot create the run directory {read_only / 'run'}: Read-only file system"),
            (Path("/proc"), "cannot write in the run directory /proc (/proc/.run.lock: No such file or directory)"),
            (Path("/proc/sys/kernel/shardstep-run"),
             "cannot create the run directory /proc/sys/kernel/shardstep-run: No such file or directory"),
        ]:
            write_job(job, run_dir)
            code, out, err = run_cli(capsys, "run", str(job), "--quiet")
            assert (code, out) == (2, ""), err
            assert err == f"shardstep run: error: {message}\n"

        run_dir = tmp_path / "run"
        write_job(job, run_dir, steps=10)
        assert run_cli(capsys, "run", str(job), "--quiet")[0] == 0
        for command, target, what in (("plot", read_only / "metrics.png", ""),
                                      ("export", read_only / "model.ckpt", "checkpoint ")):
            code, out, err = run_cli(capsys, command, str(run_dir), "--out", str(target))
            assert (code, out) == (2, ""), err
            assert err == f"shardstep {command}: error: cannot write {what}{target}: Read-only file system\n"
    finally:
        subprocess.run(["umount", str(read_only)], capture_output=True, timeout=30)


def test_plot_leaves_out_lines_that_are_not_whole_records(tmp_path, capsys):
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", run_dir, steps=10)
    assert run_cli(capsys, "run", str(job), "--quiet")[0] == 0
    with open(run_dir / METRICS_FILE, "a") as log:
        log.write('garbage\n{"step": 11, "lo')  # a live run mid-append
    code, out, err = run_cli(capsys, "plot", str(run_dir))
    assert code == 0 and out == f"wrote {run_dir / 'metrics.png'}\n", err
    from shardstep.service.plot import read_metrics

    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, 11))


def test_readers_of_a_live_run_always_find_a_committed_step_while_retention_deletes(tmp_path, capsys):
    """A run commits a checkpoint every step and keeps only the last: `export` and `inspect`
    in another process, again and again, always read a whole committed step."""
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", run_dir, steps=100000, every=1,
                    replace={"every = 1\n": "every = 1\nkeep_last = 1\nasync = false\n"})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    writer = subprocess.Popen([sys.executable, "-m", "shardstep.service.cli", "run", str(job), "--quiet"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not committed_steps(run_dir / "checkpoints"):
            assert writer.poll() is None, writer.stderr.read()
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        exported, described = [], []
        for attempt in range(40):
            code, out, err = run_cli(capsys, "export", str(run_dir), "--out", str(tmp_path / "model.ckpt"))
            assert code == 0, f"export {attempt}: {err}"
            exported.append(int(out.split("state_dict of step ")[1].split(";")[0]))
            code, out, err = run_cli(capsys, "inspect", str(run_dir))
            assert code == 0, f"inspect {attempt}: {err}"
            described.append(int(out.split("step        ")[1].split("\n")[0]))
        assert writer.poll() is None, writer.stderr.read()
        # the run moved on while they read: retention really deleted under them
        assert len(set(exported)) > 5 and len(set(described)) > 5, (exported, described)
    finally:
        writer.send_signal(signal.SIGTERM)
        assert writer.wait(timeout=60) == 130
        writer.stderr.close()


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "JOB", "--run-dir", "ftp://bucket/runs/x"],
     "--run-dir ftp://bucket/runs/x: the ftp:// scheme is not an object store shardstep writes to"),
    (["resume", "file://bucket/runs/x"], "RUN_DIR file://bucket/runs/x: the file:// scheme is not an object store"),
    (["inspect", "s3://bucket/a/../x"], "PATH s3://bucket/a/../x: expected s3://BUCKET/PREFIX with no '.' or '..'"),
    (["run", "s3://bucket/job.toml"], "JOB 's3://bucket/job.toml' is a URL; it must be a file system path"),
    (["plot", "RUN", "--out", "s3://bucket/metrics.png"], "OUT 's3://bucket/metrics.png' is a URL; it must be a file"),
])
def test_urls_that_name_no_object_store_are_refused_before_anything_is_written(tmp_path, capsys, argv, message):
    job = write_job(tmp_path / "job.toml", tmp_path / "run")
    before = sorted(tmp_path.rglob("*"))
    argv = [str(job) if a == "JOB" else str(tmp_path / "run") if a == "RUN" else a for a in argv]
    code, out, err = run_cli(capsys, *argv)
    assert (code, out) == (2, "") and len(err.splitlines()) == 1, err
    assert f"shardstep {argv[0]}: error: {message}" in err, err
    assert sorted(tmp_path.rglob("*")) == before
    assert not any(Path(scheme).exists() for scheme in ("s3:", "ftp:", "file:"))
