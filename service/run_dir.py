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

A run directory may be a URL (``s3://bucket/runs/exp1``; checkpoints/storage.py). There the
files are objects, written whole; the lock is a lease object, ``.run-lease``
(checkpoints/object_store.py); and since an object cannot be appended to, the log is a
series of segments, ``metrics/<generation>-<sequence>.jsonl``: records are buffered and
written as the next segment before every checkpoint (so the log always reaches the newest
checkpoint) and every :data:`LOG_FLUSH_SECONDS`. Readers concatenate the segments of the
newest generation in order; cutting the log back on resume writes the kept records as the
first segment of a new generation, then deletes the older ones, so a cut that stops halfway
leaves the old log or the new one, never a mix.

A run directory knows its job: running a job on a directory that holds another job's
checkpoints applies the change only when a resumed run can honour it
(:data:`RESUMABLE_FIELDS`: how long to train, when to evaluate and checkpoint, what to keep,
what to do with non-finite values, where and how the actors run, where the job's own code
lies, where it logs to) and refuses any other
change, naming every key that differs. Such changes alter what is trained (the model, its
data, the optimizer and its schedule, the batch order), so the numbers of the continued run
would belong to no job; they belong in a new run that starts from this one's weights.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shardstep.checkpoints.errors import CheckpointError
from shardstep.checkpoints.run import numbered_names
from shardstep.checkpoints.storage import ObjectPath, get_object, location, put_object

JOB_FILE = "job.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
INIT_FILE = "init.json"
RUN_LOCK = ".run.lock"
# on object storage: the lock's lease, and the prefix of the log's segments
RUN_LEASE = ".run-lease"
LOG_SEGMENTS = "metrics"
LOG_SEGMENT = re.compile(r"(\d{6})-(\d{8})\.jsonl")
# seconds between the writes of a log segment on object storage (besides one per checkpoint)
LOG_FLUSH_SECONDS = 10.0

# the job's fields a resumed run honours when they change (see the module's docstring)
RESUMABLE_FIELDS = frozenset({
    "steps", "epochs", "eval_every", "checkpoint_every", "checkpoint_async", "keep_last", "keep_every",
    "keep_best", "keep_metric", "keep_mode", "nonfinite", "max_skipped_steps", "max_failures", "shards",
    "workers", "backend", "address", "worker_cpus", "shard_cpus", "transport", "start_timeout", "placement",
    "shard_resources", "worker_resources", "shard_labels", "worker_labels", "run_dir", "code_dir",
    "stop_metric", "stop_patience", "stop_min_delta", "stop_mode", "time_limit",
    "tensorboard", "mlflow", "mlflow_tracking_uri", "mlflow_experiment", "ray_metrics",
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


def run_location(run_dir: str | os.PathLike | ObjectPath) -> Path | ObjectPath:
    """A run directory as a local Path, or as an ObjectPath when it is a URL."""
    return location(run_dir)


def _replace(path: Path | ObjectPath, text: str) -> None:
    if isinstance(path, ObjectPath):
        try:
            put_object(path, [text.encode()])  # an object is replaced whole
        except CheckpointError as error:
            raise OSError(errno.EIO, str(error)) from None
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_text(path: Path | ObjectPath) -> str:
    """A file's text; FileNotFoundError when there is none."""
    if isinstance(path, ObjectPath):
        try:
            found = get_object(path)
        except CheckpointError as error:
            raise OSError(errno.EIO, str(error)) from None
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", str(path))
        return found[0].decode("utf-8", errors="replace")
    return path.read_text()


# ---------------------------------------------------------------------------------------
# which job a run directory belongs to


def saved_job(run_dir: Path) -> dict[str, Any] | None:
    """The contents of ``job.json`` (``run_id``, ``job``, ``changes``), or None when the
    directory has none."""
    path = run_dir / JOB_FILE
    try:
        text = _read_text(path)
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


def result_step(run_dir: Path | ObjectPath) -> int | None:
    """The step that is a run's result when its job set ``checkpoint.load_best``: its best
    committed checkpoint by the job's metric; None otherwise (a reader then takes the newest)."""
    from shardstep.checkpoints import best_step

    saved = saved_job(run_dir)
    job = saved["job"] if saved is not None else {}
    if not job.get("load_best") or not isinstance(job.get("keep_metric"), str):
        return None
    return best_step(run_dir / CHECKPOINT_DIR, job["keep_metric"], job.get("keep_mode", "min"))


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


def checkpoint_buffers(checkpoint: Any) -> dict[str, np.ndarray]:
    """The model's buffers a source holds: a run checkpoint's, in its coordinator record; a
    model file's, its BatchNorm entries (none for a model without BatchNorm, or a checkpoint
    not written by a run)."""
    if callable(getattr(checkpoint, "buffers", None)):
        return checkpoint.buffers()
    extra = checkpoint.extra if isinstance(checkpoint.extra, dict) else {}
    record = extra.get("coordinator")
    buffers = record.get("buffers") if isinstance(record, dict) else None
    if not isinstance(buffers, dict):
        return {}
    return {name: np.array(value) for name, value in buffers.items() if isinstance(value, np.ndarray)}


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

    def __init__(self, path: Path | ObjectPath, run_id: str, lock: int | Any, changes: list[tuple[str, Any, Any]]):
        self.path = path
        self.run_id = run_id
        self.changes = changes
        self._lock = lock  # a file descriptor, or on object storage a Lease

    def close(self) -> None:
        _release(self._lock)
        self._lock = -1


def _release(lock: int | Any) -> None:
    if isinstance(lock, int):
        if lock >= 0:
            os.close(lock)
    else:
        lock.release()


def _take_lease(run_dir: ObjectPath) -> Any:
    from shardstep.checkpoints.object_store import LEASE_SECONDS, Lease, LeaseHeldError

    lease = Lease(run_dir / RUN_LEASE, "", LEASE_SECONDS)
    try:
        lease.acquire()
    except LeaseHeldError as held:
        raise RunDirectoryError(
            f"run directory {run_dir} is in use by another run (host {held.holder.get('host')!r}, pid "
            f"{held.holder.get('pid')}, which holds {run_dir / RUN_LEASE} {held.left:.0f} s more); wait for that "
            "run to end, or give this one another run directory") from None
    except CheckpointError as error:
        raise RunDirectoryError(f"cannot take the run directory {run_dir}: {error}") from None
    return lease


def _take_lock(run_dir: Path | ObjectPath) -> int | Any:
    if isinstance(run_dir, ObjectPath):
        return _take_lease(run_dir)
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
    # a log segment buffer of an earlier run in this process would continue a sequence that
    # other runs may have moved on from: this run lists the segments afresh
    _SEGMENT_LOGS.pop(str(run_dir), None)
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
        _release(lock)
        raise RunDirectoryError(f"cannot write {run_dir / JOB_FILE}: {error.strerror or error}") from None
    except BaseException:
        _release(lock)
        raise
    return RunDirectory(run_dir, run_id, lock, changes)


# ---------------------------------------------------------------------------------------
# the run log


def append_record(run_dir: Path | ObjectPath, record: Mapping[str, Any]) -> None:
    """Append one record with a single write; a write that fails (or falls short, as on a
    full disk) is cut back, so the log ends with the previous record. On object storage the
    record joins the buffer of the next segment (:func:`flush_records`)."""
    if isinstance(run_dir, ObjectPath):
        log = _segment_log(run_dir)
        log.buffer.append(json.dumps(record, default=plain))
        if time.monotonic() - log.flushed >= LOG_FLUSH_SECONDS:
            flush_records(run_dir)
        return
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


def truncate_records(run_dir: Path | ObjectPath, step: int) -> int:
    """Keep the records up to the checkpoint of ``step`` (a resumed run replays the rest):
    trained steps up to ``step`` and the steps skipped before it; lines that are not whole
    records (a torn append, garbage) are dropped. Returns the number of such lines."""
    if isinstance(run_dir, ObjectPath):
        return _truncate_segments(run_dir, step)
    path = run_dir / METRICS_FILE
    try:
        log = open(path, encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return 0
    with log:
        kept, damaged = _kept_lines(log, step)
    _replace(path, "".join(line + "\n" for line in kept))
    return damaged


def _kept_lines(lines: Any, step: int) -> tuple[list[str], int]:
    kept, damaged = [], 0
    for line in lines:
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
    return kept, damaged


def log_location(run_dir: Path | ObjectPath) -> Path | ObjectPath:
    """Where the log is: ``metrics.jsonl``, or on object storage its segments' prefix."""
    return run_dir / (LOG_SEGMENTS if isinstance(run_dir, ObjectPath) else METRICS_FILE)


def read_log_lines(run_dir: Path | ObjectPath) -> list[str] | None:
    """The log's lines, in order (None when there is no log)."""
    if not isinstance(run_dir, ObjectPath):
        try:
            with open(run_dir / METRICS_FILE, encoding="utf-8", errors="replace") as log:
                return log.read().splitlines()
        except FileNotFoundError:
            return None
    segments = _segments(run_dir)
    if not segments:
        return None
    newest = max(generation for generation, _, _ in segments)
    lines: list[str] = []
    for generation, _, name in segments:
        if generation == newest:
            lines += _read_text(run_dir / LOG_SEGMENTS / name).splitlines()
    return lines


class _SegmentLog:
    """This process's buffer of the next log segment of a run on object storage."""

    def __init__(self, generation: int, sequence: int):
        self.generation = generation
        self.sequence = sequence
        self.buffer: list[str] = []
        self.flushed = time.monotonic()


_SEGMENT_LOGS: dict[str, _SegmentLog] = {}


def _segments(run_dir: ObjectPath) -> list[tuple[int, int, str]]:
    try:
        _, objects = (run_dir / LOG_SEGMENTS).children()
    except CheckpointError as error:
        raise RunLogError(f"cannot list {run_dir / LOG_SEGMENTS}: {error}") from None
    return numbered_names(objects, LOG_SEGMENT)


def _segment_log(run_dir: ObjectPath) -> _SegmentLog:
    log = _SEGMENT_LOGS.get(str(run_dir))
    if log is None:
        segments = _segments(run_dir)
        generation = max((g for g, _, _ in segments), default=0)
        sequence = max((q for g, q, _ in segments if g == generation), default=-1) + 1
        log = _SEGMENT_LOGS[str(run_dir)] = _SegmentLog(generation, sequence)
    return log


def flush_records(run_dir: Path | ObjectPath) -> None:
    """Write the buffered records as the log's next segment (object storage; on disk every
    record is written when appended). Raises RunLogError, keeping the buffer, when the
    store refuses."""
    if not isinstance(run_dir, ObjectPath):
        return
    log = _segment_log(run_dir)
    if log.buffer:
        name = f"{log.generation:06d}-{log.sequence:08d}.jsonl"
        try:
            put_object(run_dir / LOG_SEGMENTS / name, ["".join(line + "\n" for line in log.buffer).encode()])
        except CheckpointError as error:
            raise RunLogError(str(error)) from None  # it names the segment
        log.buffer.clear()
        log.sequence += 1
    log.flushed = time.monotonic()


def _truncate_segments(run_dir: ObjectPath, step: int) -> int:
    lines = read_log_lines(run_dir)
    _SEGMENT_LOGS.pop(str(run_dir), None)
    if lines is None:
        return 0
    kept, damaged = _kept_lines(lines, step)
    old = _segments(run_dir)
    generation = max(g for g, _, _ in old) + 1
    try:
        put_object(run_dir / LOG_SEGMENTS / f"{generation:06d}-{0:08d}.jsonl",
                   ["".join(line + "\n" for line in kept).encode()])
        (run_dir / LOG_SEGMENTS).delete([name for _, _, name in old])
    except CheckpointError as error:
        raise RunLogError(f"cannot cut back the log {run_dir / LOG_SEGMENTS}: {error}") from None
    _SEGMENT_LOGS[str(run_dir)] = _SegmentLog(generation, 1)
    return damaged
