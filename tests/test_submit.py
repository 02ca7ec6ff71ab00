"""Cluster submission through Ray Jobs, against a real Ray head on loopback.

The head (``ray start --head --block``, started and stopped by tests/ray_heads.py; the
``head`` fixture is in tests/conftest.py) listens on loopback ports chosen there, keeps its
files in a temporary directory of its own, and has token authentication on; it is stopped
at the end by signalling its process group (and any job process it left), never with
``ray stop``. Every command runs as a real ``shardstep`` process.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shardstep.checkpoints import committed_steps, open_checkpoint
from shardstep.service.coordinator import CHECKPOINT_DIR
from shardstep.service.submit import CODE_SUBPACKAGES, ClusterError, assemble_code, prepare
from tests.ray_heads import AUTH_VARIABLES, Head, base_env, free_ports, running_head, shardstep, submitted_id
from tests.runs import DIGITS_JOB, assert_same, digits_reference, final_params, snapshot

REPOSITORY = Path(__file__).resolve().parents[1]
JOB_SECONDS = 120


def write_job(directory: Path, *, run_dir: Path | str, steps: int, every: int = 10, task: str = "digits",
              backend: str = "ray", name: str = "job.toml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(DIGITS_JOB.format(run_dir=run_dir, task=task, steps=steps, every=every, backend=backend))
    return path


def user_task_package(parent: Path, name: str | None = None) -> Path:
    """A package under ``parent`` (uniquely named unless ``name`` is given) whose
    ``tasks.Digits`` is the digits task, defined outside shardstep as a user's would be."""
    code = parent / (name or f"usertask_{secrets.token_hex(4)}")
    code.mkdir(parents=True)
    (code / "__init__.py").write_text("")
    (code / "tasks.py").write_text("from shardstep.workers.tasks.digits import DigitsTask\n\n\n"
                                   "class Digits(DigitsTask):\n    \"\"\"The digits task, defined by a user.\"\"\"\n")
    return code


# ---------------------------------------------------------------------------------------
# helpers


def status_of(head: Head, job_id: str) -> str:
    result = shardstep("jobs", "status", job_id, "--address", head.url, env=head.env)
    assert result.returncode == 0, result.stderr
    return re.search(r"^status +(\w+)$", result.stdout, re.MULTILINE).group(1)


def one_error(result: subprocess.CompletedProcess, prefix: str) -> str:
    """Exit code 2 and exactly one line on stderr, starting with ``prefix``."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------
# tests


def test_prepare_builds_the_command_and_ships_the_code(tmp_path, monkeypatch):
    """What Ray is given: the job file's directory without the run directory inside it,
    shardstep's packages, a task package kept elsewhere, and an absolute run directory."""
    code = user_task_package(tmp_path / "code")
    package = code.name
    monkeypatch.syspath_prepend(str(tmp_path / "code"))
    job = write_job(tmp_path / "jobs", run_dir="runs/first", steps=5, task=f"{package}.tasks:Digits")

    submission = prepare(str(job), shards=3)
    run_dir = str((tmp_path / "jobs" / "runs" / "first").resolve())
    assert submission.run_dir == run_dir
    assert submission.entrypoint == f"python -m shardstep.service.cli run job.toml --run-dir {run_dir} --shards 3"
    assert submission.spec.shards == 3
    env = submission.runtime_env
    assert env["working_dir"] == str((tmp_path / "jobs").resolve())
    assert "/runs/first/" in env["excludes"] and "__pycache__/" in env["excludes"]
    # shardstep's own code is assembled at submission (test_assembled_code_...)
    assert [Path(p) for p in env["py_modules"]] == [code.resolve()]
    assert submission.metadata["shardstep_run_dir"] == run_dir

    # a task package at the top of the job's directory travels in the working directory;
    # --run-dir is taken as given, relative to the current directory
    beside = tmp_path / "beside"
    other = f"usertask_{secrets.token_hex(4)}"
    shutil.copytree(code, beside / other)
    monkeypatch.syspath_prepend(str(beside))
    monkeypatch.chdir(tmp_path)
    job = write_job(beside, run_dir="/unused", steps=5, task=f"{other}.tasks:Digits")
    submission = prepare(str(job), run_dir="elsewhere/run")
    assert submission.run_dir == str(tmp_path / "elsewhere" / "run")
    assert submission.runtime_env["py_modules"] == []
    # the job's directory is uploaded: it cannot be the run directory too
    with pytest.raises(ClusterError, match=r"is the job file's directory, which is uploaded with the job"):
        prepare(str(job), run_dir=str(beside))
    # a run directory on object storage is the same for every node: taken as it is
    submission = prepare(str(job), run_dir="s3://bucket/runs/x/")
    assert submission.run_dir == "s3://bucket/runs/x" and submission.metadata["shardstep_run_dir"] == submission.run_dir
    assert "s3://bucket/runs/x" in submission.entrypoint

    # a fine-tuning source given relative to the job file would be looked for in Ray's copy
    for source, accepted in (("runs/base", False), ("~/runs/base", False), ("/shared/runs/base", True),
                             ("s3://bucket/runs/base", True)):
        text = job.read_text().replace("[task]", f'[init]\nfrom = "{source}"\n\n[task]')
        tuned = job.with_name("tuned.toml")
        tuned.write_text(text)
        if accepted:
            assert prepare(str(tuned)).spec.init.source == source
        else:
            with pytest.raises(ClusterError, match=rf"tuned.toml: init.from = '{re.escape(source)}' is relative"):
                prepare(str(tuned))


def test_user_packages_named_like_shardstep_folders_are_shipped(tmp_path, monkeypatch):
    """A user's package called ``service``, ``workers`` or ``checkpoints`` outside the job's
    directory is the user's code: it travels in py_modules like any other."""
    try:
        for name in CODE_SUBPACKAGES:
            code = user_task_package(tmp_path / name / "code", name=name)
            monkeypatch.syspath_prepend(str(code.parent))
            job = write_job(tmp_path / name / "job", run_dir="runs/first", steps=5, task=f"{name}.tasks:Digits")
            assert prepare(str(job)).runtime_env["py_modules"] == [str(code.resolve())]
    finally:  # the user's modules must not stay imported for the other tests
        for name in CODE_SUBPACKAGES:
            sys.modules.pop(name, None)
            sys.modules.pop(f"{name}.tasks", None)


def test_assembled_code_is_the_shardstep_package_and_wins_over_user_folders(tmp_path):
    """What Cluster.submit ships: a folder named ``shardstep`` holding this installation's
    subpackages (no caches), which a fresh interpreter on the cluster imports from the
    shipped copy while the job's own ``service``/``workers``/``checkpoints`` stay the user's."""
    shipped = assemble_code(tmp_path / "ship")
    assert shipped == tmp_path / "ship" / "shardstep"
    assert sorted(p.name for p in shipped.iterdir()) == sorted(CODE_SUBPACKAGES)
    for name in CODE_SUBPACKAGES:
        source = REPOSITORY / name
        expected = sorted(p.relative_to(source).as_posix() for p in source.rglob("*")
                          if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".nbi", ".nbc"))
        copied = sorted(p.relative_to(shipped / name).as_posix() for p in (shipped / name).rglob("*") if p.is_file())
        assert copied == expected, name
    job_dir = tmp_path / "job"
    for name in CODE_SUBPACKAGES:
        (job_dir / name).mkdir(parents=True)
        (job_dir / name / "__init__.py").write_text(f"WHO = 'user {name}'\n")
    probe = ("import checkpoints, service, workers, shardstep.service.cli, shardstep.checkpoints\n"
             "print(service.WHO, workers.WHO, checkpoints.WHO)\n"
             "print(shardstep.service.cli.__file__)\nprint(shardstep.checkpoints.__file__)\n")
    # as Ray runs an entrypoint: the working directory first, then py_modules, then site-packages
    env = {**base_env(), "PYTHONPATH": os.pathsep.join([str(job_dir), str(shipped.parent)])}
    out = subprocess.run([sys.executable, "-c", probe], cwd=job_dir, env=env, capture_output=True, text=True,
                         check=True, timeout=120).stdout.splitlines()
    assert out[0] == "user service user workers user checkpoints"
    assert out[1:] == [str(shipped / "service" / "cli.py"), str(shipped / "checkpoints" / "__init__.py")]


def test_submit_a_job_with_its_own_task_code_and_follow_it(head, tmp_path):
    """A task defined outside shardstep and outside the job's directory reaches the cluster
    (py_modules); the job is followed with `jobs status` and `jobs logs` to SUCCEEDED and its
    checkpoints are loadable and equal the local loop's result."""
    # named like one of shardstep's folders: shardstep lives under its own namespace, so the
    # user's package neither shadows it nor is mistaken for it and left behind
    user_task_package(tmp_path / "code", name="workers")
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job", run_dir=run_dir, steps=30, task="workers.tasks:Digits")
    env = {**head.env, "PYTHONPATH": str(tmp_path / "code")}  # here only: the head has no such path

    job_id = submitted_id(shardstep("submit", str(job), "--address", head.url, "--no-wait", env=env))
    assert status_of(head, job_id) in ("PENDING", "RUNNING")
    followed = shardstep("jobs", "logs", job_id, "--follow", "--address", head.url, env=head.env)
    assert followed.returncode == 0, followed.stderr
    assert f"run job.toml --run-dir {run_dir}" in followed.stdout and "done: 30 steps" in followed.stdout
    assert followed.stdout.rstrip().endswith(f"job {job_id} SUCCEEDED; run directory {run_dir}")
    assert status_of(head, job_id) == "SUCCEEDED"
    logs = shardstep("jobs", "logs", job_id, "--address", head.url, env=head.env)
    assert logs.returncode == 0 and "done: 30 steps" in logs.stdout, logs.stderr

    # the GCS address finds the same job server
    listing = shardstep("jobs", "list", "--address", head.gcs, env=head.env)
    assert listing.returncode == 0, listing.stderr
    assert re.search(rf"^{job_id} +SUCCEEDED .* {re.escape(str(run_dir))}$", listing.stdout, re.MULTILINE), \
        listing.stdout

    assert committed_steps(run_dir / CHECKPOINT_DIR) == [10, 20, 30]
    for step in (10, 20, 30):
        with open_checkpoint(run_dir / CHECKPOINT_DIR, step) as checkpoint:
            assert checkpoint.step == step and checkpoint.layout.num_shards == 2
    assert_same(final_params(run_dir), digits_reference(30))


def test_a_job_on_its_own_data_beside_the_job_file_trains_on_the_cluster(head, tmp_path):
    """[data] + [model] with the CSV in the job's folder: the file travels with the job (the
    local copy is moved away once submitted) and the result equals the local loop's; a data
    file outside the job's folder, which would not travel, is refused before submitting."""
    from shardstep.workers.training import Trainer
    from tests.supervised_jobs import JOB, dataset, task_of, write

    features, labels = dataset()
    folder = tmp_path / "job"
    data = write(folder / "data", "csv", features, labels)
    run_dir = tmp_path / "run"
    (folder / "job.toml").write_text(JOB.format(run_dir=run_dir, train="data/data.csv", backend="ray"))
    job_id = submitted_id(shardstep("submit", str(folder / "job.toml"), "--address", head.url, "--no-wait",
                                    env=head.env))
    kept = data.rename(tmp_path / "kept.csv")
    followed = shardstep("jobs", "logs", job_id, "--follow", "--address", head.url, env=head.env)
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert "done: 6 steps" in followed.stdout and status_of(head, job_id) == "SUCCEEDED"
    reference = Trainer(task_of(kept), seed=0, batch_size=32, optimizer="sgd", optimizer_kwargs={"lr": 0.1},
                        world_size=2).run(steps=6).params
    assert_same(final_params(run_dir), reference)

    (folder / "outside.toml").write_text(JOB.format(run_dir=tmp_path / "run2", train="../kept.csv", backend="ray"))
    refused = shardstep("submit", str(folder / "outside.toml"), "--address", head.url, env=head.env)
    assert refused.returncode == 2
    assert "data.train = '../kept.csv' is outside the job file's directory" in one_error(refused, "shardstep submit")
    assert not (tmp_path / "run2").exists()


def test_stop_then_resubmit_resumes_from_the_stopped_jobs_checkpoint(head, tmp_path):
    """`jobs stop` ends a running job; submitting the same job again continues from the
    checkpoint it left, and the result equals an uninterrupted run bit for bit."""
    # the digits task with a step of at least 20 ms, like a larger model's, so the stop lands
    # mid-run on any machine; its package sits beside the job file and travels with it
    # named like shardstep's folders, the package and two more beside the job (which the job
    # runs in) must not shadow shardstep's code
    package = "service"
    for name in ("checkpoints", "workers"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user folder {name}/ was imported')\n")
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text(
        "import time\n\nfrom shardstep.workers.tasks.digits import DigitsTask\n\n\n"
        "class SlowDigits(DigitsTask):\n"
        "    def loss_and_grad(self, params, batch):\n"
        "        time.sleep(0.02)\n"
        "        return super().loss_and_grad(params, batch)\n")
    steps = 400
    run_dir = tmp_path / "run"  # inside the job's directory: left out of the upload
    job = write_job(tmp_path, run_dir=run_dir, steps=steps, every=10, task=f"{package}:SlowDigits")
    env = head.env  # no PYTHONPATH: the job's own code is found beside its file, here and on the cluster
    root = run_dir / CHECKPOINT_DIR

    first = submitted_id(shardstep("submit", str(job), "--address", head.url, "--no-wait", env=env))
    # one run per directory: a second submission is refused while the first is on
    twice = shardstep("submit", str(job), "--address", head.url, "--no-wait", env=env)
    refused = one_error(twice, "shardstep submit: error:")
    assert re.search(rf"job {first} is (PENDING|RUNNING) on the run directory {re.escape(str(run_dir))}; two runs "
                     rf"cannot share one directory", refused), refused

    deadline = time.monotonic() + JOB_SECONDS
    while len(committed_steps(root)) < 2:
        assert time.monotonic() < deadline, "no two checkpoints within the time limit"
        time.sleep(0.05)
    stopped = shardstep("jobs", "stop", first, "--address", head.url, env=head.env)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.startswith(f"job {first} STOPPED; the committed checkpoints in {run_dir} are kept")
    left = committed_steps(root)[-1]
    assert 20 <= left < steps
    status = shardstep("jobs", "status", first, "--address", head.url, env=head.env).stdout
    assert re.search(rf"^status +STOPPED\n(.*\n)*run dir +{re.escape(str(run_dir))}\ncheckpoint +step {left} "
                     rf"\(latest committed\)$", status, re.MULTILINE), status
    committed = tuple(f"step-{step:010d}/" for step in committed_steps(root))
    kept = {name: data for name, data in snapshot(root).items() if name.startswith(committed)}

    # submitted again and waited for (the default): it goes on from the stopped job's checkpoint
    resumed = shardstep("submit", str(job), "--address", head.url, env=env)
    assert resumed.returncode == 0, resumed.stderr
    second = submitted_id(resumed)
    assert f"run directory {run_dir} (resumes from step {left})" in resumed.stdout
    assert re.search(rf"^\d\d:\d\d:\d\d {second} RUNNING(  step \d+/{steps}  .*)?$", resumed.stdout,
                     re.MULTILINE), resumed.stdout
    assert resumed.stdout.rstrip().endswith(f"job {second} SUCCEEDED; run directory {run_dir}")
    logs = shardstep("jobs", "logs", second, "--address", head.url, env=head.env).stdout
    assert f"resuming from step {left}" in logs and f"done: {steps} steps" in logs, logs
    assert committed_steps(root)[-1] == steps
    after = snapshot(root)
    assert {name: after.get(name) for name in kept} == kept  # resumed, not restarted
    assert_same(final_params(run_dir), digits_reference(steps))

    again = shardstep("jobs", "stop", first, "--address", head.url, env=head.env)
    assert again.returncode == 0 and again.stdout.strip() == f"job {first} already ended (STOPPED); nothing to stop"


def test_bad_input_exits_2_with_one_message_and_changes_nothing(head, tmp_path):
    """An unreachable or malformed address, a job file that does not validate, an unknown
    job id, a missing or wrong token: one message, exit code 2, nothing submitted and the
    run directory the job names untouched."""
    # a real run directory, made locally
    job = write_job(tmp_path, run_dir=tmp_path / "run", steps=10, every=5, backend="inline")
    done = shardstep("run", str(job), env=head.env)
    assert done.returncode == 0, done.stderr
    before = snapshot(tmp_path / "run")
    listed_before = shardstep("jobs", "list", "--address", head.url, env=head.env).stdout

    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    bad = write_job(tmp_path / "bad", run_dir=tmp_path / "run", steps=10, backend="cuda")
    home = tmp_path / "home"  # no ~/.ray/auth_token there
    home.mkdir()
    without_token = {**{k: v for k, v in head.env.items() if k not in AUTH_VARIABLES}, "HOME": str(home)}
    cases = [
        (("submit", str(job), "--address", closed), head.env,
         f"cannot reach the Ray cluster at {closed} (from --address): Connection refused"),
        (("submit", str(job)), {**head.env, "RAY_ADDRESS": closed},
         f"cannot reach the Ray cluster at {closed} (from RAY_ADDRESS)"),
        # RAY_API_SERVER_ADDRESS comes before RAY_ADDRESS
        (("jobs", "list"), {**head.env, "RAY_API_SERVER_ADDRESS": closed, "RAY_ADDRESS": head.url},
         f"cannot reach the Ray cluster at {closed} (from RAY_API_SERVER_ADDRESS)"),
        (("submit", str(job), "--address", "ftp://127.0.0.1:1"), head.env,
         "--address: a cluster address must be http(s)://HOST:PORT"),
        (("submit", str(bad), "--address", head.url), head.env,
         f"{bad}: resources.backend must be one of 'ray', 'inline'; got 'cuda'"),
        (("jobs", "status", "raysubmit_unknown", "--address", head.url), head.env,
         f"no job 'raysubmit_unknown' on the Ray cluster at {head.url}"),
        (("jobs", "logs", "raysubmit_unknown", "--address", head.url), head.env, "no job 'raysubmit_unknown'"),
        (("jobs", "stop", "raysubmit_unknown", "--address", head.url), head.env, "no job 'raysubmit_unknown'"),
        (("submit", str(job), "--address", head.url), without_token,
         f"the Ray cluster at {head.url} requires an authentication token and none was sent: set RAY_AUTH_MODE=token"),
        (("jobs", "list", "--address", head.url), {**without_token, "RAY_AUTH_MODE": "token"},
         "RAY_AUTH_MODE=token but no authentication token was found"),
        (("submit", str(job), "--address", head.url), {**head.env, "RAY_AUTH_TOKEN": "wrong"},
         f"the Ray cluster at {head.url} refused the authentication token from RAY_AUTH_TOKEN"),
    ]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda case: shardstep(*case[0], env=case[1]), cases))
    for (args, _, message), result in zip(cases, results):
        line = one_error(result, f"shardstep {args[0]}: error: ")
        assert message in line, (args, line)
        assert "Traceback" not in line

    # an explicit address wins over both variables
    explicit = shardstep("jobs", "list", "--address", head.url,
                         env={**head.env, "RAY_API_SERVER_ADDRESS": closed, "RAY_ADDRESS": closed})
    assert explicit.returncode == 0, explicit.stderr
    assert explicit.stdout == listed_before  # and nothing was submitted by the cases above
    assert snapshot(tmp_path / "run") == before


def test_submit_to_a_head_just_started_waits_for_its_job_agent(tmp_path):
    """`ray start` then `shardstep submit` at once: the job server answers before its job agent
    is up and refuses submissions with "No available agent to submit job" (HTTP 500) until it
    is; submit waits for it (saying so, bounded) and the job runs."""
    with running_head(ready="server") as fresh:
        job = write_job(tmp_path, run_dir=tmp_path / "run", steps=6, every=6)
        result = shardstep("submit", str(job), "--address", fresh.url, env=fresh.env, timeout=400)
        assert result.returncode == 0, result.stdout + result.stderr
        assert re.search(r"^job raysubmit_\w+ SUCCEEDED", result.stdout, re.MULTILINE), result.stdout
        assert "No available agent" not in result.stdout + result.stderr, result.stderr
        assert committed_steps(tmp_path / "run" / CHECKPOINT_DIR) == [6]


def test_set_assignments_are_checked_here_and_given_to_the_clusters_run(tmp_path):
    job = write_job(tmp_path, run_dir=tmp_path / "run", steps=20)
    submission = prepare(str(job), sets=["training.steps=7", "optimizer.args.lr=0.02"])
    assert submission.spec.steps == 7 and submission.spec.optimizer_args["lr"] == 0.02
    assert submission.entrypoint.endswith("--set training.steps=7 --set optimizer.args.lr=0.02")
    from shardstep.service.jobspec import JobSpecError

    with pytest.raises(JobSpecError, match="training.steps must be an integer >= 0; got -3"):
        prepare(str(job), sets=["training.steps=-3"])
