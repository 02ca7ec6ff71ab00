"""Cluster submission through Ray Jobs (``ray.job_submission.JobSubmissionClient``).

    shardstep submit JOB.toml [--address URL] [--shards N] [--workers W] [--run-dir DIR] [--no-wait|--follow]
    shardstep jobs list | status ID | logs ID [--follow] | stop ID      [--address URL]

``submit`` checks the job file here (:func:`shardstep.service.jobspec.load_job`), then hands Ray's job
server one command, ``python -m shardstep.service.cli run JOB --run-dir RUN_DIR``, with a runtime
environment that carries everything the command needs (reference: ``docs/cluster.md``):

- ``working_dir``: the job file's directory (the job file travels in it; so does task code
  kept beside it), without caches, ``.gitignore``'d files and the run directory;
- ``py_modules``: shardstep's own code (the ``shardstep`` package, assembled from this
  installation's ``service``, ``workers`` and ``checkpoints`` at submission), so the
  cluster runs the code that checked the job whether or not the nodes have shardstep
  installed, and the top-level package of a ``"package.module:Class"`` task that the
  working directory does not hold.

Restarts: the command names the run directory as an absolute path (the job file's
``run_dir`` resolved here, or ``--run-dir``), and ``shardstep run`` on a directory with
committed checkpoints resumes from the latest. Submitting the same job again therefore
continues it, on any node and after any restart of the head, provided the path names
storage every node shares. A job still running on the same run directory is refused.

Address: ``--address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``, else a
cluster started on this machine (Ray's own look-up). Ray's SDK lets the two variables win
over an explicit address; here the explicit address wins. Token authentication: the
client sends a token when ``RAY_AUTH_MODE=token``, taken from ``RAY_AUTH_TOKEN``, the
file ``RAY_AUTH_TOKEN_PATH`` names, or ``~/.ray/auth_token`` (Ray's order).

Every failure to reach, authenticate with or use the cluster is a :class:`ClusterError`
with one message; the run directory is never touched here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from shardstep.service import __version__
from shardstep.service.progress import latest_progress

# where the address comes from, in order (the flag is handled before these)
ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
AUTH_MODE_VARIABLE = "RAY_AUTH_MODE"
TOKEN_VARIABLE = "RAY_AUTH_TOKEN"
TOKEN_PATH_VARIABLE = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_FILE = Path(".ray") / "auth_token"  # under the home directory

# shardstep's import name and its subpackages (folders of the repository): shipped with every job
CODE_PACKAGE = "shardstep"
CODE_SUBPACKAGES = ("service", "workers", "checkpoints")
# never uploaded: byte-code and numba caches (machine-specific), version control
UPLOAD_EXCLUDES = ("__pycache__/", "*.py[cod]", "*.nbi", "*.nbc", ".git/")
# the job's own metadata on the cluster (Ray metadata values are strings)
META_RUN_DIR = "shardstep_run_dir"
META_JOB_FILE = "shardstep_job_file"
META_VERSION = "shardstep_version"
META_TASK = "shardstep_task"
META_OPTIMIZER = "shardstep_optimizer"
META_ACTORS = "shardstep_actors"

ACTIVE = ("PENDING", "RUNNING")
FINISHED = ("SUCCEEDED", "FAILED", "STOPPED")
PROBE_SECONDS = 5.0
POLL_SECONDS = 1.0
STOP_WAIT_SECONDS = 60.0
# a head just started answers before its job agent is up, and refuses submissions with this
# (HTTP 500) until it is: the submission is retried for up to AGENT_WAIT_SECONDS
AGENT_STARTING = "No available agent to submit job"
AGENT_WAIT_SECONDS = 120.0


class ClusterError(Exception):
    """The cluster cannot be reached, refuses us, or has no such job; or the submission
    itself is wrong. The command line exits with code 2."""


# ---------------------------------------------------------------------------------------
# address and token


@dataclasses.dataclass(frozen=True)
class Address:
    """A cluster address as given (None: look for a cluster started on this machine) and
    where it came from, for messages."""

    value: str | None
    source: str

    def describe(self) -> str:
        """The cluster as a noun phrase for messages, with where its address came from."""
        if self.value is None:
            return "the Ray cluster started on this machine (no address given)"
        if self.value == "auto":
            return f"the Ray cluster started on this machine ({self.source}: auto)"
        return f"the Ray cluster at {self.value} (from {self.source})"


def resolve_address(explicit: str | None) -> Address:
    """``explicit``, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else None (Ray looks for
    a cluster started on this machine). Empty values count as unset."""
    if explicit is not None:
        if not explicit.strip():
            raise ClusterError("--address must be a cluster address such as http://HEAD:8265; got ''")
        return Address(explicit.strip(), "--address")
    for variable in ADDRESS_VARIABLES:
        value = os.environ.get(variable, "").strip()
        if value:
            return Address(value, variable)
    return Address(None, "no address given")


def _endpoint(address: Address) -> tuple[str, int] | None:
    """The host and port to probe, or None when Ray looks the cluster up itself ("auto",
    nothing given). Refuses what Ray would not understand."""
    value = address.value
    if value is None or value == "auto":
        return None
    forms = ("http(s)://HOST:PORT (the head's job server, the dashboard port: 8265 by default), "
             "ray://HOST:PORT (Ray Client), HOST:PORT (the head's GCS) or auto")
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https", "ray") or not parts.hostname:
            raise ClusterError(f"{address.source}: a cluster address must be {forms}; got {value!r}")
        try:
            port = parts.port
        except ValueError:
            raise ClusterError(f"{address.source}: the port of {value!r} is not a number from 0 to 65535") from None
        if port is None:
            port = {"http": 80, "https": 443, "ray": 10001}[parts.scheme]
        return parts.hostname, port
    host, colon, port_text = value.rpartition(":")
    if not colon or not host or not port_text.isdigit():
        raise ClusterError(f"{address.source}: a cluster address must be {forms}; got {value!r}")
    return host.strip("[]"), int(port_text)


def _probe(address: Address) -> None:
    """A TCP connection to the address, so an unreachable one fails in seconds with its
    reason (Ray's clients wait much longer, or indefinitely, and then say less)."""
    endpoint = _endpoint(address)
    if endpoint is None:
        return
    host, port = endpoint
    try:
        with socket.create_connection((host, port), timeout=PROBE_SECONDS):
            pass
    except socket.gaierror as error:
        reason = f"unknown host {host!r} ({error.strerror})"
    except TimeoutError:
        reason = f"no answer within {PROBE_SECONDS:g} s"
    except OSError as error:
        reason = error.strerror or str(error)
    else:
        return
    raise ClusterError(f"cannot reach {address.describe()}: {reason}. Give the head's job "
                       f"server address, e.g. --address http://HEAD:8265 (or set RAY_API_SERVER_ADDRESS or "
                       f"RAY_ADDRESS)")


def _as_job_server(address: Address) -> Address:
    """A bare HOST:PORT that answers HTTP is the job server itself (the dashboard port given
    without its scheme), not a GCS: Ray would wait 40 s for a GCS there, then fail."""
    value = address.value
    if value is None or value == "auto" or "://" in value:
        return address
    import requests

    try:
        requests.get(f"http://{value}/api/version", timeout=PROBE_SECONDS)
    except requests.RequestException:
        return address  # not HTTP: a GCS, as Ray reads it
    return dataclasses.replace(address, value=f"http://{value}")


def token_source() -> str | None:
    """Where Ray finds the authentication token, in Ray's order: RAY_AUTH_TOKEN (non-empty),
    the file RAY_AUTH_TOKEN_PATH names (which must then hold one), ~/.ray/auth_token.
    None when there is none. The token itself stays with Ray."""
    if os.environ.get(TOKEN_VARIABLE, "").strip():
        return TOKEN_VARIABLE
    named = os.environ.get(TOKEN_PATH_VARIABLE)
    if named:
        try:
            text = Path(named).read_text()
        except OSError as error:
            raise ClusterError(f"{TOKEN_PATH_VARIABLE} names {named}, which cannot be read: "
                               f"{error.strerror or error}") from None
        if not text.strip():
            raise ClusterError(f"{TOKEN_PATH_VARIABLE} names {named}, which is empty; it must hold the "
                               f"cluster's token")
        return f"{TOKEN_PATH_VARIABLE} ({named})"
    default = Path.home() / DEFAULT_TOKEN_FILE
    try:
        if default.read_text().strip():
            return str(default)
    except OSError:
        pass
    return None


def _token_mode() -> bool:
    return os.environ.get(AUTH_MODE_VARIABLE, "").strip().lower() == "token"


_TOKEN_PLACES = (f"{TOKEN_VARIABLE}, a file named by {TOKEN_PATH_VARIABLE}, or ~/{DEFAULT_TOKEN_FILE} "
                 f"(print the cluster's token on the head with `ray get-auth-token`)")


def _check_token_settings() -> None:
    """With RAY_AUTH_MODE=token a token must be somewhere before anything is sent."""
    if _token_mode() and token_source() is None:
        raise ClusterError(f"{AUTH_MODE_VARIABLE}=token but no authentication token was found: put the "
                           f"cluster's token in {_TOKEN_PLACES}")


def _refused_message(cluster: str) -> str:
    """What to do when the job server answered 401 or 403, from the local settings."""
    if not _token_mode():
        try:
            found = token_source()
        except ClusterError:
            found = None
        hint = f"; a token is available from {found}" if found else ""
        return (f"{cluster} requires an authentication token and none was sent: set "
                f"{AUTH_MODE_VARIABLE}=token and provide the token in {_TOKEN_PLACES}{hint}")
    return (f"{cluster} refused the authentication token from {token_source()}: it is not "
            f"this cluster's token (print the cluster's token on the head with `ray get-auth-token`)")


# ---------------------------------------------------------------------------------------
# the client


def _job_client_class() -> Any:
    try:
        import aiohttp  # noqa: F401  (log streaming)
        import requests  # noqa: F401  (every request)
        from ray.job_submission import JobSubmissionClient
    except ImportError as error:
        raise ClusterError(f"cluster commands need Ray's job client, which comes with ray[default]: "
                           f"pip install 'ray[default]' ({error})") from None
    # the command line prints its own messages; Ray's INFO and WARNING lines (uploads,
    # address guesses) would bury them
    for handler in logging.getLogger("ray").handlers:
        handler.setLevel(logging.ERROR)
    return JobSubmissionClient


@contextlib.contextmanager
def _native_stderr_silenced(silence: bool) -> Iterator[None]:
    """Ray's C++ GCS client (used to look the job server up from a GCS address) writes its
    retries and warnings straight to file descriptor 2; the error they end in reaches the
    user as one message from here."""
    if not silence:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _address_variables_hidden() -> Iterator[None]:
    """Ray's SDK lets RAY_API_SERVER_ADDRESS and RAY_ADDRESS override the address it is
    given; hide them while the client resolves the one chosen here."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class Cluster:
    """A connection to one cluster's job server; every call's failure is a ClusterError."""

    def __init__(self, address: Address):
        self.address = address
        self.url = address.value
        self.name = (f"the Ray cluster at {address.value}" if address.value not in (None, "auto")
                     else "the Ray cluster started on this machine")
        client_class = _job_client_class()
        _check_token_settings()
        _probe(address)
        address = _as_job_server(address)
        looked_up = not (address.value or "").startswith(("http://", "https://"))
        with self._talking(), _address_variables_hidden(), _native_stderr_silenced(looked_up):
            self.client = client_class(address.value)
        self.url = self.client.get_address()
        self.name = f"the Ray cluster at {self.url}"

    @contextlib.contextmanager
    def _talking(self) -> Iterator[None]:
        """Ray's exceptions as one ClusterError naming the cluster."""
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError, RayError

        cluster = self.name
        try:
            yield
        except ClusterError:
            raise
        except AuthenticationError:
            raise ClusterError(_refused_message(cluster)) from None
        except (ConnectionError, requests.ConnectionError, aiohttp.ClientConnectionError) as error:
            raise ClusterError(f"cannot reach {cluster}: {_first_line(error)}") from None
        except (RuntimeError, ValueError, TypeError, OSError, requests.RequestException, aiohttp.ClientError,
                RayError) as error:
            raise ClusterError(f"{cluster} refused the request: {_first_line(error)}") from None

    def jobs(self) -> list[Any]:
        """Every submitted job (Ray's JobDetails), oldest first."""
        with self._talking():
            details = self.client.list_jobs()
        submitted = [job for job in details if job.submission_id]
        return sorted(submitted, key=lambda job: (job.start_time or 0, job.submission_id))

    def job(self, job_id: str) -> Any:
        """The job submitted as ``job_id`` (or whose Ray job id it is)."""
        for job in self.jobs():
            if job_id in (job.submission_id, job.job_id):
                return job
        raise ClusterError(f"no job {job_id!r} on {self.name} (`shardstep jobs list` shows "
                           f"the jobs it has)")

    def info(self, job_id: str) -> Any:
        with self._talking():
            return self.client.get_job_info(job_id)

    def logs(self, job_id: str) -> str:
        with self._talking():
            return self.client.get_job_logs(job_id)

    def follow(self, job_id: str, write: Callable[[str], Any]) -> None:
        """Pass the job's output to ``write`` from its start until the job ends."""
        async def stream() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                write(chunk)

        with self._talking():
            asyncio.run(stream())

    def stop(self, job_id: str) -> bool:
        with self._talking():
            return self.client.stop_job(job_id)

    def submit(self, submission: Submission, on_wait: Callable[[str], Any] | None = None) -> str:
        """Submit, waiting (bounded) while a head that was just started brings up its job
        agent; ``on_wait`` hears once that it waits."""
        deadline = time.monotonic() + AGENT_WAIT_SECONDS
        delay, said = 0.5, False
        while True:
            try:
                return self._submit_once(submission)
            except ClusterError as error:
                if AGENT_STARTING not in str(error) or time.monotonic() + delay > deadline:
                    if AGENT_STARTING in str(error):
                        raise ClusterError(f"{error} (its job agent did not come up within {AGENT_WAIT_SECONDS:g} s; "
                                           f"check the head's logs)") from None
                    raise
                if not said and on_wait is not None:
                    on_wait(f"{self.name} has no job agent up yet (a head just started); waiting for it, up to "
                            f"{AGENT_WAIT_SECONDS:g} s")
                    said = True
                time.sleep(delay)
                delay = min(2 * delay, 5.0)

    def _submit_once(self, submission: Submission) -> str:
        # Ray uploads py_modules inside submit_job, so the assembled package only has to live
        # until it returns
        with tempfile.TemporaryDirectory(prefix="shardstep-code-") as scratch, self._talking():
            runtime_env = dict(submission.runtime_env)
            runtime_env["py_modules"] = [str(assemble_code(Path(scratch))), *runtime_env["py_modules"]]
            return self.client.submit_job(entrypoint=submission.entrypoint, runtime_env=runtime_env,
                                          metadata=submission.metadata)


def _first_line(error: BaseException | str) -> str:
    """The first line of a message (Ray's carry pages of logs after it)."""
    text = error if isinstance(error, str) else (str(error).strip() or type(error).__name__)
    lines = text.strip().splitlines()
    return lines[0] if lines else "-"


# ---------------------------------------------------------------------------------------
# what is submitted


@dataclasses.dataclass(frozen=True)
class Submission:
    """A checked job, ready for Ray: the command, its runtime environment, and metadata
    that finds the job's run directory again."""

    job_file: Path
    spec: Any
    run_dir: str
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]


def prepare(job_file: str, *, run_dir: str | None = None, shards: int | None = None,
            workers: int | None = None, sets: Sequence[str] = ()) -> Submission:
    """Check the job file (and the overrides, ``--set`` assignments included) here, and build
    what Ray is given: the cluster's run gets the same assignments."""
    from shardstep.service.jobspec import assigned_fields, load_job

    path = Path(job_file)
    spec = load_job(path)
    if sets:
        spec = spec.replace(**assigned_fields(spec, sets))
    _check_paths_travel(path)
    overrides = {key: value for key, value in (("shards", shards), ("workers", workers)) if value is not None}
    if overrides:
        spec = spec.replace(**overrides)
    # as given, never through symlinks: the path must mean the same storage on the cluster
    from shardstep.checkpoints.storage import is_url, location

    if run_dir is None:
        target = spec.run_dir
    else:  # a URL names object storage, the same for every node
        target = str(location(run_dir)) if is_url(run_dir) else os.path.abspath(os.path.expanduser(run_dir))
    working_dir = path.resolve().parent

    excludes = list(UPLOAD_EXCLUDES)
    inside = None if is_url(target) else _relative_to(Path(target), working_dir)
    if inside is not None:
        if inside == Path("."):
            raise ClusterError(f"the run directory {target} is the job file's directory, which is uploaded with "
                               f"the job; give a run directory of its own (--run-dir or run_dir)")
        excludes.append(f"/{inside.as_posix()}/")
    py_modules = []  # shardstep's own code is assembled and added by Cluster.submit
    task_package = _task_package(spec.task, working_dir)
    if task_package is not None:
        py_modules.append(str(task_package))

    command = ["python", "-m", "shardstep.service.cli", "run", path.name, "--run-dir", target]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    for assignment in sets:
        command += ["--set", assignment]
    return Submission(
        job_file=path, spec=spec, run_dir=target, entrypoint=shlex.join(command),
        runtime_env={"working_dir": str(working_dir), "py_modules": py_modules, "excludes": excludes},
        metadata={META_RUN_DIR: target, META_JOB_FILE: path.name, META_VERSION: __version__,
                  META_TASK: spec.task, META_OPTIMIZER: spec.optimizer,
                  META_ACTORS: f"{spec.shards} shard(s), {spec.workers} worker(s)"},
    )


# job-file paths other than run_dir (which the command names absolutely): a relative one is
# resolved against the job file's directory, which on the cluster is Ray's copy of it
PATH_KEYS = (("init", "from"),)


def _check_paths_travel(job_file: Path) -> None:
    """Refuse a relative path the cluster would resolve somewhere else than this machine
    (a URL means the same everywhere)."""
    from shardstep.checkpoints.storage import is_url
    from shardstep.service.jobspec import DATA_PATH_KEYS

    document = tomllib.loads(job_file.read_text(encoding="utf-8"))  # load_job has checked it
    job_directory = job_file.resolve().parent
    data = document.get("data", {})
    for key in DATA_PATH_KEYS:  # a data file travels in the job's directory, or is named by a URL
        value = data.get(key)
        if not isinstance(value, str) or is_url(value) or os.path.isabs(os.path.expanduser(value)):
            continue
        if _relative_to(Path(os.path.normpath(job_directory / value)), job_directory) is None:
            raise ClusterError(f"{job_file}: data.{key} = {value!r} is outside the job file's directory, which is "
                               f"what travels to the cluster; keep the file beside the job file, or name it by a "
                               f"URL (s3://...) or an absolute path on the head node")
    for table, key in PATH_KEYS:
        value = document.get(table, {}).get(key)
        if isinstance(value, str) and not os.path.isabs(value) and not is_url(value):
            raise ClusterError(f"{job_file}: {table}.{key} = {value!r} is relative, and on the cluster a relative "
                               f"path is resolved against Ray's copy of the job file's directory; give it as an "
                               f"absolute path on storage every node shares")


def _relative_to(path: Path, base: Path) -> Path | None:
    try:
        return path.relative_to(base)
    except ValueError:
        return None


def assemble_code(directory: Path) -> Path:
    """Copy shardstep's subpackages, as this process imports them, into
    ``directory/shardstep`` (a folder Ray can ship as ``py_modules``) and return it.

    The repository keeps ``service``, ``workers`` and ``checkpoints`` at its root and an
    editable install maps them into the ``shardstep`` namespace, so there is no folder
    named ``shardstep`` to point Ray at; on the cluster the copy comes first on the path
    and shadows any installed version."""
    package = directory / CODE_PACKAGE
    package.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.nbi", "*.nbc")
    for name in CODE_SUBPACKAGES:
        module = importlib.import_module(f"{CODE_PACKAGE}.{name}")
        shutil.copytree(Path(module.__file__).resolve().parent, package / name, ignore=ignore)
    return package


def _task_package(task: str, working_dir: Path) -> Path | None:
    """The top-level package (or single-file module) of a ``"package.module:Class"`` task,
    when neither shardstep, an installed distribution nor the working directory's top
    level provides it on the cluster."""
    if ":" not in task:
        return None
    top = task.partition(":")[0].split(".")[0]
    if top == CODE_PACKAGE:
        return None  # shipped with every job
    module = sys.modules.get(top) or importlib.import_module(top)  # imported by load_job
    paths = list(getattr(module, "__path__", []))
    if paths:
        if len(paths) != 1:
            raise ClusterError(f"task {task!r}: package {top!r} spans {len(paths)} directories ({paths}); Ray "
                               f"can ship a package from one directory only")
        location = Path(paths[0]).resolve()
    elif getattr(module, "__file__", None):
        location = Path(module.__file__).resolve()
    else:
        return None
    if any(part in ("site-packages", "dist-packages") for part in location.parts):
        return None  # an installed distribution: the nodes install it too (docs/cluster.md)
    if location.parent == working_dir:
        return None  # the working directory is the job's current directory on the cluster
    return location


# ---------------------------------------------------------------------------------------
# the commands (each returns the exit code; output goes to ``out``)


def submit(job_file: str, *, address: str | None, run_dir: str | None, shards: int | None,
           workers: int | None, mode: str, out: TextIO, err: TextIO, sets: Sequence[str] = ()) -> int:
    """``mode``: "wait" (until the job ends), "follow" (stream its output until it ends)
    or "no-wait". Exit code 0 when the job succeeded (or was only submitted), 1 when it
    failed or was stopped."""
    submission = prepare(job_file, run_dir=run_dir, shards=shards, workers=workers, sets=sets)
    cluster = Cluster(resolve_address(address))
    for job in cluster.jobs():
        if (job.metadata or {}).get(META_RUN_DIR) == submission.run_dir and _status(job) in ACTIVE:
            raise ClusterError(f"job {job.submission_id} is {_status(job)} on the run directory "
                               f"{submission.run_dir}; two runs cannot share one directory (stop it with "
                               f"`shardstep jobs stop {job.submission_id}`, or wait for it)")
    job_id = cluster.submit(submission, on_wait=lambda text: print(f"shardstep submit: {text}", file=err, flush=True))
    spec = submission.spec
    resumes = _latest_step(submission.run_dir)
    if resumes is not None:
        start = f"resumes from step {resumes}"
    elif _visible(submission.run_dir):
        start = "no committed checkpoint yet: starts at step 0"
    else:
        start = "not visible from this machine: the job resumes from a checkpoint there, if any"
    print(f"submitted {job_id} to {cluster.url}: {spec.task} with {spec.optimizer}, {spec.shards} shard(s), "
          f"{spec.workers} worker(s); run directory {submission.run_dir} ({start})", file=out, flush=True)
    if mode == "no-wait":
        print(f"follow it with `shardstep jobs logs {job_id} --follow`; stop it with "
              f"`shardstep jobs stop {job_id}`", file=out, flush=True)
        return 0
    return _watch(cluster, job_id, follow=mode == "follow", command="submit", out=out, err=err)


def list_jobs(*, address: str | None, out: TextIO) -> int:
    cluster = Cluster(resolve_address(address))
    jobs = cluster.jobs()
    if not jobs:
        print(f"no jobs on {cluster.name}", file=out)
        return 0
    rows = [("submission id", "status", "started", "duration", "run directory or entrypoint")]
    for job in jobs:
        run_dir = (job.metadata or {}).get(META_RUN_DIR)
        rows.append((job.submission_id, _status(job), _clock(job.start_time), _duration(job),
                     run_dir if run_dir else job.entrypoint))
    print("\n".join(_table(rows)), file=out)
    return 0


def job_status(job_id: str, *, address: str | None, out: TextIO) -> int:
    cluster = Cluster(resolve_address(address))
    job = cluster.job(job_id)
    run_dir = (job.metadata or {}).get(META_RUN_DIR)
    lines = [("job", job.submission_id), ("status", _status(job)),
             ("message", _first_line(job.message or "-")),
             ("started", _clock(job.start_time)), ("ended", _clock(job.end_time)),
             ("duration", _duration(job)), ("entrypoint", job.entrypoint)]
    if run_dir:
        lines.append(("run dir", run_dir))
        latest = _latest_step(run_dir)
        if latest is not None:
            lines.append(("checkpoint", f"step {latest} (latest committed)"))
    progress, evaluation = latest_progress(cluster.logs(job.submission_id))
    if progress is not None:
        lines.append(("progress", progress))
    if evaluation is not None and evaluation != progress:
        lines.append(("evaluation", evaluation))
    print("\n".join(f"{key:<11} {value}" for key, value in lines), file=out)
    return 0


def job_logs(job_id: str, *, address: str | None, follow: bool, out: TextIO, err: TextIO) -> int:
    """The job's output; with ``follow``, until it ends, and the exit code says how it ended."""
    cluster = Cluster(resolve_address(address))
    job_id = cluster.job(job_id).submission_id
    if not follow:
        out.write(cluster.logs(job_id))
        out.flush()
        return 0
    return _watch(cluster, job_id, follow=True, command="jobs logs", out=out, err=err)


def stop_job(job_id: str, *, address: str | None, out: TextIO, err: TextIO) -> int:
    """Stop the job (Ray sends SIGTERM, then SIGKILL) and wait until it has ended; the run
    directory keeps every committed checkpoint."""
    cluster = Cluster(resolve_address(address))
    job = cluster.job(job_id)
    job_id = job.submission_id
    if _status(job) in FINISHED:
        print(f"job {job_id} already ended ({_status(job)}); nothing to stop", file=out)
        return 0
    cluster.stop(job_id)
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    while _status(job := cluster.info(job_id)) not in FINISHED:
        if time.monotonic() > deadline:
            print(f"shardstep jobs stop: job {job_id} is still {_status(job)} {STOP_WAIT_SECONDS:g} s after the "
                  f"stop request", file=err)
            return 1
        time.sleep(POLL_SECONDS / 4)
    run_dir = (job.metadata or {}).get(META_RUN_DIR)
    kept = (f"; the committed checkpoints in {run_dir} are kept: submit the job again to continue from the "
            f"latest" if run_dir else "")
    print(f"job {job_id} {_status(job)}{kept}", file=out)
    return 0


def _watch(cluster: Cluster, job_id: str, *, follow: bool, command: str, out: TextIO, err: TextIO) -> int:
    """Wait until the job ends (streaming its output when ``follow``); 0 when it succeeded,
    1 when it failed or was stopped. Ctrl-C stops watching, not the job."""
    try:
        if follow:
            cluster.follow(job_id, lambda chunk: (out.write(chunk), out.flush()))
        last = None
        while (status := _status(job := cluster.info(job_id))) not in FINISHED:
            if not follow:
                # the job's state, and the run's latest progress line (step, loss, rate,
                # evaluation) whenever it moved
                shown = (status, latest_progress(cluster.logs(job_id))[0] if status == "RUNNING" else None)
                if shown != last:
                    line = f"{time.strftime('%H:%M:%S')} {job_id} {status}"
                    print(line + (f"  {shown[1]}" if shown[1] else ""), file=out, flush=True)
                    last = shown
            time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        print(f"shardstep {command}: stopped watching; job {job_id} goes on (`shardstep jobs logs {job_id} "
              f"--follow`, `shardstep jobs stop {job_id}`)", file=err)
        return 130
    run_dir = (job.metadata or {}).get(META_RUN_DIR)
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED" + (f"; run directory {run_dir}" if run_dir else ""), file=out, flush=True)
        return 0
    if status == "STOPPED":
        kept = f"; the committed checkpoints in {run_dir} are kept: submit the job again to continue" if run_dir else ""
        print(f"shardstep {command}: job {job_id} was stopped{kept}", file=err)
        return 1
    print(f"shardstep {command}: job {job_id} failed: {_failure(job.message)} (`shardstep jobs logs {job_id}` "
          f"shows its output)", file=err)
    return 1


def _failure(message: str | None) -> str:
    """Ray's reason for a failed job in one line: its first line and, when Ray appended the
    job's last output, that output's last line (the run's own error)."""
    lines = [line.strip() for line in (message or "").splitlines() if line.strip()]
    if not lines:
        return "Ray gave no reason"
    if len(lines) == 1:
        return lines[0]
    return f"{lines[0].rstrip(':')}; its last line: {lines[-1]}"


# ---------------------------------------------------------------------------------------
# formatting


def _status(job: Any) -> str:
    status = job.status
    return str(getattr(status, "value", status))


def _clock(milliseconds: int | None) -> str:
    if not milliseconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(milliseconds / 1000))


def _duration(job: Any) -> str:
    if not job.start_time:
        return "-"
    end = job.end_time or time.time() * 1000
    seconds = max(0, round((end - job.start_time) / 1000))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _visible(run_dir: str) -> bool:
    """Whether this machine sees ``run_dir`` (a local directory, or objects under its URL)."""
    from shardstep.checkpoints import CheckpointError
    from shardstep.checkpoints.storage import location

    try:
        return location(run_dir).is_dir()
    except (CheckpointError, OSError):
        return False


def _latest_step(run_dir: str) -> int | None:
    """The latest committed checkpoint of ``run_dir`` when this machine sees that directory."""
    from shardstep.checkpoints import CheckpointError, latest_step
    from shardstep.checkpoints.storage import location
    from shardstep.service.coordinator import CHECKPOINT_DIR

    try:
        return latest_step(location(run_dir) / CHECKPOINT_DIR)
    except CheckpointError:  # unreadable from here: the cluster's view is what counts
        return None
