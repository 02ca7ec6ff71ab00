"""A run directory's files besides the checkpoints: their names, how they are written, and
which job a run directory belongs to.

    RUN_DIR/.run.lock       held by the one run that writes the directory
    RUN_DIR/job.json        the run's id, its job and the changes later runs made to it
    RUN_DIR/init.json       a fine-tuning run's record of where its parameters came from
    RUN_DIR/metrics.jsonl   one JSON record per step, appended; cut back on resume
    RUN_DIR/checkpoints/    the committed checkpoints (shardstep.checkpoints)

Every whole-file write goes to a temporary name first and is renamed into place, so a
reader never sees half a file; a record is appended with one write and cut back if the
write fails, so the log never holds half a record from this process.

A run directory knows its job: running a job on a directory that holds another job's
checkpoints applies the change only when a resumed run can honour it
(:data:`RESUMABLE_FIELDS`: how long to train, when to evaluate and checkpoint, what to keep,
what to do with non-finite values, where and how the actors run, where the job's own code
lies) and refuses any other
change, naming every key that differs. Such changes alter what is trained (the model, its
data, the optimizer and its schedule, the batch order), so the numbers of the continued run
would belong to no job; they belong in a new run that starts from this one's weights.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

JOB_FILE = "job.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
INIT_FILE = "init.json"
RUN_LOCK = ".run.lock"

# the job's fields a resumed run honours when they change (see the module's docstring)
RESUMABLE_FIELDS = frozenset({
    "steps", "epochs", "eval_every", "checkpoint_every", "checkpoint_async", "keep_last", "keep_every",
    "keep_best", "keep_metric", "keep_mode", "nonfinite", "max_skipped_steps", "max_failures", "shards",
    "workers", "backend", "address", "worker_cpus", "shard_cpus", "transport", "start_timeout", "placement",
    "shard_resources", "worker_resources", "shard_labels", "worker_labels", "run_dir", "code_dir",
    "stop_metric", "stop_patience", "stop_min_delta", "stop_mode", "time_limit",
    "accumulate",
})
# the longest value a message quotes
_QUOTED = 60


class RunDirectoryError(ValueError):
    """A run directory this run cannot use: another run holds it, it belongs to a different
    job, or its storage refuses the lock. Bad input: nothing was changed."""


class RunLogError(Exception):
    """``metrics.jsonl`` could not be appended to (a full disk, a read-only file system)."""


def plain(value: Any) -> Any:
    """A numpy scalar as the Python number JSON writes."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# which job a run directory belongs to


def saved_job(run_dir: Path) -> dict[str, Any] | None:
    """The contents of ``job.json`` (``run_id``, ``job``, ``changes``), or None when the
    directory has none."""
    path = run_dir / JOB_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise RunDirectoryError(f"cannot read {path}: {error.strerror or error}") from error
    try:
        saved = json.loads(text)
        if not (isinstance(saved, dict) and isinstance(saved.get("run_id"), str) and isinstance(saved.get("job"), dict)):
            raise ValueError("it is not an object with a run_id and a job")
    except ValueError as error:
        raise RunDirectoryError(f"{path} is damaged ({error}); it names the run its checkpoints belong to, so the "
                                f"directory cannot be continued without it") from None
    return saved


def quoted(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= _QUOTED else text[:_QUOTED - 3] + "..."


def _with_defaults(job: Mapping[str, Any]) -> dict[str, Any]:
    """``job`` with the fields it lacks (a job.json written before a key existed) at their
    defaults, in the plain form :meth:`JobSpec.to_dict` gives."""
    import dataclasses

    from shardstep.service.jobspec import JobSpec

    filled = {}
    for item in dataclasses.fields(JobSpec):
        if item.default is not dataclasses.MISSING:
            filled[item.name] = item.default
        elif item.default_factory is not dataclasses.MISSING:
            filled[item.name] = item.default_factory()
    filled = json.loads(json.dumps(filled, default=str))
    filled.update(json.loads(json.dumps(dict(job), default=str)))
    return filled


def job_differences(saved: Mapping[str, Any], job: Mapping[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """Every difference between two jobs' field dicts (:meth:`JobSpec.to_dict`) as
    ``(field, job-file key, saved value, new value)``; a table of arguments gives one
    entry per argument that differs. Fields only one job has (a job.json written before a
    key existed) compare with the other's value taken as missing."""
    from shardstep.service.jobspec import FIELD_KEYS

    missing = object()
    differences = []
    for name in sorted(set(saved) | set(job)):
        old, new = saved.get(name, missing), job.get(name, missing)
        if old == new:
            continue
        key = FIELD_KEYS.get(name, name)
        if isinstance(old, dict) and isinstance(new, dict) and name.endswith("_args"):
            for arg in sorted(set(old) | set(new)):
                if old.get(arg, missing) != new.get(arg, missing):
                    differences.append((name, f"{key}.{arg}", old.get(arg, missing), new.get(arg, missing)))
        else:
            differences.append((name, key, old, new))
    return [(name, key, None if old is missing else old, None if new is missing else new)
            for name, key, old, new in differences]


def check_job_change(run_dir: Path, saved: Mapping[str, Any], job: Mapping[str, Any],
                     trained: tuple[int, int] | None) -> list[tuple[str, Any, Any]]:
    """The changes ``job`` makes to the directory's ``saved`` job, as ``(key, old, new)``,
    once they are known to be ones a resumed run honours; refuses (RunDirectoryError)
    otherwise. ``trained``: (step, epoch) of the latest committed checkpoint, or None when
    nothing is committed (then the run starts over and any change is its own job)."""
    differences = [d for d in job_differences(_with_defaults(saved), _with_defaults(job)) if d[0] != "run_dir"]
    if trained is None or not differences:
        return [(key, old, new) for _, key, old, new in differences]
    refused = [(key, old, new) for name, key, old, new in differences if name not in RESUMABLE_FIELDS]
    if refused:
        listed = "; ".join(f"{key} {quoted(old)} -> {quoted(new)}" for key, old, new in refused)
        raise RunDirectoryError(
            f"{run_dir} holds checkpoints of a different job ({listed}). A run directory continues only its own job; "
            "a resumed run may change how long it trains and when it stops, when it evaluates and checkpoints, "
            "what it keeps, its handling of non-finite values, accumulation and where its actors run "
            "(docs/jobs.md). Continue the saved job with "
            f"`shardstep resume {run_dir}`, or train with the new settings in a new run directory whose "
            f"[init] from = \"{run_dir}\" starts from this run's weights")
    step, epoch = trained
    for name, key, _, new in differences:
        if name == "steps" and new is not None and new < step:
            raise RunDirectoryError(f"{run_dir} has already trained {step} steps; {key} = {new} would end before "
                                    f"its latest checkpoint (give at least {step})")
        if name == "epochs" and new is not None and new < epoch:
            raise RunDirectoryError(f"{run_dir} is already in epoch {epoch}; {key} = {new} would end before its "
                                    f"latest checkpoint (give at least {epoch})")
    return [(key, old, new) for _, key, old, new in differences]


def position(checkpoint: Any) -> tuple[int, int]:
    """(step, epoch) of a checkpoint, from its coordinator record."""
    extra = checkpoint.extra if isinstance(checkpoint.extra, dict) else {}
    coordinator = extra.get("coordinator")
    return checkpoint.step, coordinator.get("epoch", 0) if isinstance(coordinator, dict) else 0


def trained_position(run_dir: Path) -> tuple[int, int] | None:
    """(step, epoch) of the newest committed checkpoint whose manifest reads (its files are
    not verified here), or None."""
    from shardstep.checkpoints import CorruptCheckpointError, committed_steps, open_checkpoint

    root = run_dir / CHECKPOINT_DIR
    for step in reversed(committed_steps(root)):
        try:
            with open_checkpoint(root, step) as checkpoint:
                return position(checkpoint)
        except CorruptCheckpointError:
            continue
    return None


def starting_checkpoint(run_dir: Path) -> tuple[Any, list[tuple[int, str]]]:
    """The run directory's newest intact checkpoint, open and verified (None when nothing
    is committed), and the damaged ``step-<k>`` directories newer than it as ``(step,
    reason)``. A directory whose committed checkpoints are all damaged is refused
    (CheckpointError): the run would start over and they would be its only record."""
    from shardstep.checkpoints import open_intact

    return open_intact(run_dir / CHECKPOINT_DIR)


def check_saved_job(run_dir: Path, job: Mapping[str, Any], trained: tuple[int, int] | None) -> None:
    """Refuse (RunDirectoryError) a job that the run directory's own cannot become;
    ``trained``: (step, epoch) where the run resumes, or None. Reads only, takes no lock
    (:func:`open_run_dir` checks again under the lock)."""
    saved = saved_job(run_dir)
    if saved is not None:
        check_job_change(run_dir, saved["job"], job, trained)


# ---------------------------------------------------------------------------------------
# the run's hold on its directory


class RunDirectory:
    """A run directory held by this run: its lock is taken before anything is written, and
    held until :meth:`close` (the kernel releases it if the process dies)."""

    def __init__(self, path: Path, run_id: str, lock: int, changes: list[tuple[str, Any, Any]]):
        self.path = path
        self.run_id = run_id
        self.changes = changes
        self._lock = lock

    def close(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1


def _take_lock(run_dir: Path) -> int:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirectoryError(f"cannot create the run directory {run_dir}: {error.strerror or error}") from None
    try:
        lock = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise RunDirectoryError(f"cannot write in the run directory {run_dir} ({run_dir / RUN_LOCK}: "
                                f"{error.strerror or error})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(lock)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RunDirectoryError(f"run directory {run_dir} is in use by another run (it holds {run_dir / RUN_LOCK}); "
                                    f"wait for that run to end, or give this one another run directory") from None
        raise RunDirectoryError(f"cannot lock run directory {run_dir}: {error.strerror or error}; its storage must "
                                f"support file locks (for NFS, mount with locking enabled)") from None
    return lock


def open_run_dir(run_dir: Path, job: Mapping[str, Any], init: Mapping[str, Any] | None,
                 trained: tuple[int, int] | None) -> RunDirectory:
    """Take the directory's lock, then create ``job.json`` (a new run) or check the job
    against the one it holds (see :func:`check_job_change`; an accepted change is recorded
    in it); record where a fine-tuning run's parameters came from."""
    lock = _take_lock(run_dir)
    try:
        saved = saved_job(run_dir)
        job = dict(job)
        if saved is None:
            run_id, changes = secrets.token_hex(8), []
            _replace(run_dir / JOB_FILE, json.dumps({"run_id": run_id, "job": job, "changes": []}, indent=1))
        else:
            run_id = saved["run_id"]
            changes = check_job_change(run_dir, saved["job"], job, trained)
            if changes or saved["job"].get("run_dir") != job.get("run_dir"):
                history = list(saved.get("changes", []))
                if changes:
                    history.append({"step": None if trained is None else trained[0],
                                    "changed": {key: [old, new] for key, old, new in changes}})
                _replace(run_dir / JOB_FILE, json.dumps({"run_id": run_id, "job": job, "changes": history}, indent=1))
        if init is not None:
            _replace(run_dir / INIT_FILE, json.dumps(dict(init), indent=1))
    except OSError as error:
        os.close(lock)
        raise RunDirectoryError(f"cannot write {run_dir / JOB_FILE}: {error.strerror or error}") from None
    except BaseException:
        os.close(lock)
        raise
    return RunDirectory(run_dir, run_id, lock, changes)


# ---------------------------------------------------------------------------------------
# the run log


def append_record(run_dir: Path, record: Mapping[str, Any]) -> None:
    """Append one record with a single write; a write that fails (or falls short, as on a
    full disk) is cut back, so the log ends with the previous record."""
    data = (json.dumps(record, default=plain) + "\n").encode()
    path = run_dir / METRICS_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise RunLogError(f"cannot append to {path}: {error.strerror or error}") from None
    try:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as error:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass  # a resume drops the torn record
            raise RunLogError(f"cannot append to {path}: {error.strerror or error}") from None
    finally:
        os.close(fd)


def _record_step(line: str) -> tuple[int, bool] | None:
    """(step, skipped) of one log line, or None when it is not a whole record."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict) or type(record.get("step")) is not int:
        return None
    return record["step"], bool(record.get("skipped"))


def truncate_records(run_dir: Path, step: int) -> int:
    """Keep the records up to the checkpoint of ``step`` (a resumed run replays the rest):
    trained steps up to ``step`` and the steps skipped before it; lines that are not whole
    records (a torn append, garbage) are dropped. Returns the number of such lines."""
    path = run_dir / METRICS_FILE
    try:
        log = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return 0
    kept, damaged = [], 0
    with log:
        for line in log:
            line = line.rstrip("\n")
            if not line:
                continue
            parsed = _record_step(line)
            if parsed is None:
                damaged += 1
                continue
            record_step, skipped = parsed
            # a skipped step's record carries the step before it: skips at ``step`` came
            # after that step's checkpoint
            if record_step < step or (record_step == step and not skipped):
                kept.append(line)
    _replace(path, "".join(line + "\n" for line in kept))
    return damaged
