"""Sharded run checkpoints: written by every shard in parallel, committed atomically,
loadable at any shard count, pruned by a retention policy.

A run directory holds one directory per committed step::

    <root>/step-0000000100/manifest.ckpt                # written last, by the commit
    <root>/step-0000000100/shard-00000-of-00004.ckpt    # written by shard 0
    ...

A checkpoint is written into ``step-<k>.pending-<token>/``: each shard writes its own file
there (:func:`write_shard`, no gathering through one process), then
:meth:`CheckpointStore.commit` checks every file's header, writes the manifest and renames
the directory to ``step-<k>``. That rename is the commit: a directory without the plain
``step-<k>`` name is never loaded, and the writer's store removes such leftovers when it
opens. Retention deletes by renaming to ``step-<k>.deleting-<token>`` first, so a crash
mid-delete also leaves only a leftover.

A damaged checkpoint (:meth:`RunCheckpoint.verify`, :func:`newest_intact`) is set aside by
renaming it to ``step-<k>.damaged-<token>`` (:meth:`CheckpointStore.set_aside`): never loaded,
never removed, and step k can be committed again. Layout and manifest:
``checkpoints/FORMAT.md``.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import math
import os
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from shardstep.checkpoints.errors import CheckpointError, CorruptCheckpointError
from shardstep.checkpoints.format import (
    ALLOWED_DTYPES,
    DTYPES,
    MAX_NDIM,
    Encoder,
    FileReader,
    StreamedArray,
    TensorEntry,
    TensorRef,
    _fsync_directory,
    _show,
    _write_all,
    dump,
    fill,
    load,
    write_file,
)
from shardstep.checkpoints.layout import ParamSpec, ShardLayout
from shardstep.checkpoints.storage import ObjectMissingError, ObjectPath, is_url, location

MANIFEST = "manifest.ckpt"
MANIFEST_KIND = "shardstep-run-checkpoint"
MANIFEST_VERSION = 1
LOCK = ".writer.lock"
STEP_DIR = re.compile(r"step-(\d+)")
# on object storage each attempt at a step writes its shard files under a prefix of its own,
# step-<k>/attempt-<token>/, and the manifest names them so (checkpoints/FORMAT.md)
ATTEMPT = re.compile(r"attempt-[0-9a-f]{12}")
LEFTOVER = re.compile(r"step-\d+\.(pending|deleting)-[0-9a-f]+|\..*\.tmp-\d+-[0-9a-f]+")
# a damaged step directory renamed out of the way by set_aside: neither committed nor a
# leftover, so nothing loads it and nothing removes it (the user may want to look at it)
DAMAGED = re.compile(r"step-\d+\.damaged-[0-9a-f]+")
# written into a set-aside directory: when and why it was set aside
SET_ASIDE_NOTE = "set-aside-reason.txt"
SHARD_RECORD_FIELDS = ("file", "size", "header_checksum", "slices")
SHARD_FIELDS = ("run_id", "step", "shard", "num_shards", "param", "state")
MANIFEST_FIELDS = ("kind", "version", "run_id", "step", "created", "num_shards", "params",
                   "param_groups", "state", "shards", "metrics", "extra")


def step_directory(root: Path, step: int) -> Path:
    return root / f"step-{step:010d}"


def shard_file_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}.ckpt"


def _check_step(step: Any) -> int:
    if type(step) is not int or step < 0:
        raise ValueError(f"step must be a non-negative int; got {step!r}")
    return step


# ---------------------------------------------------------------------------------------
# writing one shard


@dataclass(frozen=True)
class PendingCheckpoint:
    """A checkpoint being written; small and picklable, so it can be sent to shard actors."""

    directory: str
    run_id: str
    step: int
    layout: ShardLayout

    def shard_path(self, shard: int) -> Path | ObjectPath:
        return location(self.directory) / shard_file_name(shard, self.layout.num_shards)


def encode_shard(pending: PendingCheckpoint, shard: int, params: Mapping[str, np.ndarray],
                 state: Mapping[str, Mapping[str, Any]] | None,
                 stage: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[Encoder, Any]:
    """Check one shard's slices against the layout and encode its file's value tree."""
    if not isinstance(pending, PendingCheckpoint):
        raise TypeError(f"pending must be a PendingCheckpoint from CheckpointStore.begin; got {type(pending).__name__}")
    layout = pending.layout
    layout.check_shard(shard)
    state = {} if state is None else state
    if not isinstance(params, Mapping) or not isinstance(state, Mapping):
        raise TypeError("params and state must be dicts keyed by parameter name")
    names = [spec.name for spec in layout.params]
    missing = [name for name in names if name not in params]
    unknown = [name for name in params if name not in layout]
    unknown_state = [name for name in state if name not in layout]
    if missing or unknown or unknown_state:
        raise ValueError(
            f"shard {shard}: params must hold exactly the layout's parameters; missing "
            f"{missing}, unknown {unknown}, unknown in state {unknown_state}"
        )
    for name in names:
        start, stop = layout.slice(name, shard)
        _check_slice(params[name], f"params[{name!r}]", layout.spec(name).dtype, stop - start, shard)
    for name, entries in state.items():
        if not isinstance(entries, Mapping):
            raise TypeError(f"state[{name!r}] must be a dict of named state; got {type(entries).__name__}")
        start, stop = layout.slice(name, shard)
        for key, value in entries.items():
            if type(key) is not str:
                raise TypeError(f"state[{name!r}] key {key!r} must be a str")
            if isinstance(value, np.ndarray) and value.ndim >= 1:
                _check_slice(value, f"state[{name!r}][{key!r}]", None, stop - start, shard)
    tree = {
        "run_id": pending.run_id, "step": pending.step, "shard": shard, "num_shards": layout.num_shards,
        "param": {name: params[name] for name in names},
        "state": {name: dict(entries) for name, entries in state.items()},
    }
    encoder = Encoder(stage)
    return encoder, encoder.encode(tree)


def _check_slice(array: Any, what: str, dtype: str | None, length: int, shard: int) -> None:
    if not isinstance(array, np.ndarray) or array.ndim != 1 or array.size != length:
        shape = getattr(array, "shape", type(array).__name__)
        raise ValueError(
            f"shard {shard}: {what} must be a 1-D array of the shard's {length} elements; got {shape}"
        )
    if dtype is not None and array.dtype.name != dtype:
        raise ValueError(f"shard {shard}: {what} has dtype {array.dtype}; the layout says {dtype}")


def write_shard(pending: PendingCheckpoint, shard: int, params: Mapping[str, np.ndarray],
                state: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Write one shard's file of a pending checkpoint (atomically; call from that shard).

    ``params[name]`` is the shard's flat slice ``layout.slice(name, shard)`` of every
    parameter; ``state[name]`` its optimizer state: 1-D arrays of the slice's length are
    per-element state (sliced), anything else (0-d step counters, Python numbers) is
    per-parameter scalar state, which every shard must hold with the same value.
    """
    encoder, tree = encode_shard(pending, shard, params, state)
    write_file(pending.shard_path(shard), tree, encoder.tensors)


# ---------------------------------------------------------------------------------------
# retention


@dataclass(frozen=True)
class Retention:
    """Which committed checkpoints to keep: the union of the newest ``keep_last``, every step
    divisible by ``keep_every`` and the ``keep_best`` best by ``metric`` (``mode`` "min" or
    "max"). Rules left at None keep nothing by themselves; with no rule at all every
    checkpoint is kept. The newest committed checkpoint is always kept, and checkpoints being
    written are never considered."""

    keep_last: int | None = None
    keep_every: int | None = None
    keep_best: int | None = None
    metric: str | None = None
    mode: str = "min"

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every", "keep_best"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 1):
                raise ValueError(f"{name} must be an int >= 1 or None; got {value!r}")
        if (self.keep_best is None) != (self.metric is None):
            raise ValueError(
                f"keep_best and metric go together; got keep_best={self.keep_best!r}, metric={self.metric!r}"
            )
        if self.metric is not None and type(self.metric) is not str:
            raise ValueError(f"metric must be a str; got {self.metric!r}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max'; got {self.mode!r}")

    def keep(self, checkpoints: Mapping[int, Mapping[str, float]]) -> set[int]:
        """The steps to keep among ``{step: metrics}``."""
        steps = sorted(checkpoints)
        if not steps:
            return set()
        if self.keep_last is None and self.keep_every is None and self.keep_best is None:
            return set(steps)
        kept = {steps[-1]}
        if self.keep_last is not None:
            kept.update(steps[-self.keep_last:])
        if self.keep_every is not None:
            kept.update(step for step in steps if step % self.keep_every == 0)
        if self.keep_best is not None:
            sign = 1 if self.mode == "min" else -1
            ranked = [
                (sign * float(metrics[self.metric]), -step, step)
                for step, metrics in checkpoints.items()
                if self.metric in metrics and not math.isnan(float(metrics[self.metric]))
            ]
            kept.update(step for _, _, step in sorted(ranked)[:self.keep_best])
        return kept

    def best(self, checkpoints: Mapping[int, Mapping[str, float]]) -> int | None:
        """The best step among ``{step: metrics}`` by ``metric`` (the newer of equals), or None
        when none has it (or the policy names no metric)."""
        if self.metric is None:
            return None
        sign = 1 if self.mode == "min" else -1
        ranked = sorted((sign * float(metrics[self.metric]), -step, step) for step, metrics in checkpoints.items()
                        if self.metric in metrics and not math.isnan(float(metrics[self.metric])))
        return ranked[0][2] if ranked else None


# ---------------------------------------------------------------------------------------
# the writer's store


class CheckpointStore:
    """The writer side of one run directory: begin, commit, abort, prune.

    One store writes a run directory at a time (an exclusive lock file, released by the
    kernel if the process dies); opening it removes leftovers of crashed writes. Reading
    (:func:`open_checkpoint`, :func:`latest_step`) needs no store.
    """

    def __new__(cls, root: str | os.PathLike, *args: Any, **kwargs: Any):
        if cls is CheckpointStore and is_url(root):
            # a URL names object storage: the same store, committed by conditional writes
            from shardstep.checkpoints.object_store import ObjectCheckpointStore

            return super().__new__(ObjectCheckpointStore)
        return super().__new__(cls)

    def __init__(self, root: str | os.PathLike, *, run_id: str, retention: Retention | None = None):
        if type(run_id) is not str or not run_id:
            raise ValueError(f"run_id must be a non-empty str; got {run_id!r}")
        if retention is not None and not isinstance(retention, Retention):
            raise TypeError(f"retention must be a Retention; got {type(retention).__name__}")
        self.root = Path(root)
        self.run_id = run_id
        self.retention = retention
        self._pending: set[str] = set()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise CheckpointError(f"cannot open run directory {self.root}: {error.strerror or error}") from error
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(self._lock)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise CheckpointError(
                    f"run directory {self.root} is being written by another CheckpointStore "
                    "(its lock file is held); one writer per run directory"
                ) from None
            # e.g. ENOLCK / EOPNOTSUPP on shared storage mounted without lock support
            raise CheckpointError(
                f"cannot lock run directory {self.root}: {error.strerror or error}; the storage must "
                "support file locks (for NFS, mount with locking enabled)"
            ) from error
        self.cleanup()

    def close(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def __enter__(self) -> CheckpointStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._lock < 0:
            raise CheckpointError(f"the store of {self.root} is closed")

    def cleanup(self) -> list[str]:
        """Remove what crashed writes left behind (pending or half-deleted directories,
        temporary files), except this store's own pending checkpoints; returns the names."""
        removed = []
        for entry in sorted(os.listdir(self.root)):
            if LEFTOVER.fullmatch(entry) and str(self.root / entry) not in self._pending:
                _remove(self.root / entry)
                removed.append(entry)
        return removed

    def discard_pending(self) -> list[str]:
        """Remove this store's pending checkpoints and whatever crashed writes left: what a
        writer that stops does with saves it will never commit, wherever it was stopped (even
        inside :meth:`begin` or :meth:`commit`). Returns the names removed."""
        self._check_open()
        self._pending.clear()
        return self.cleanup()

    def _check_begin(self, step: int, layout: ShardLayout) -> None:
        """What every begin checks: an open store, a step not committed yet, and a root that
        holds no other run's checkpoints."""
        self._check_open()
        _check_step(step)
        if not isinstance(layout, ShardLayout):
            raise TypeError(f"layout must be a ShardLayout; got {type(layout).__name__}")
        if (step_directory(self.root, step) / MANIFEST).exists():
            raise CheckpointError(f"step {step} is already committed in {self.root}")
        newest = latest_step(self.root)
        if newest is not None:
            owner = RunCheckpoint(step_directory(self.root, newest)).run_id
            if owner != self.run_id:
                raise CheckpointError(
                    f"{self.root} holds checkpoints of run {owner!r}; this store writes run "
                    f"{self.run_id!r}: use a separate directory per run"
                )

    def begin(self, step: int, layout: ShardLayout) -> PendingCheckpoint:
        """Create the pending directory of ``step``; hand the result to every shard."""
        self._check_begin(step, layout)
        directory = step_directory(self.root, step).with_name(
            f"step-{step:010d}.pending-{secrets.token_hex(6)}")
        try:
            directory.mkdir()
            _fsync_directory(self.root)
        except OSError as error:
            raise CheckpointError(f"cannot create {directory}: {error.strerror or error}") from error
        self._pending.add(str(directory))
        return PendingCheckpoint(str(directory), self.run_id, step, layout)

    def abort(self, pending: PendingCheckpoint) -> None:
        """Discard a pending checkpoint and whatever its shards wrote."""
        self._own(pending)
        self._pending.discard(pending.directory)
        _remove(Path(pending.directory))

    def _own(self, pending: PendingCheckpoint) -> None:
        self._check_open()
        if not isinstance(pending, PendingCheckpoint) or pending.directory not in self._pending:
            raise CheckpointError(f"{pending!r} is not a pending checkpoint of this store")

    def commit(self, pending: PendingCheckpoint, *, param_groups: list[dict] | None = None,
               extra: Any = None, metrics: Mapping[str, float] | None = None) -> Path:
        """Check every shard file, write the manifest, make the checkpoint visible atomically,
        then apply retention. Returns the committed directory.

        ``param_groups``: optimizer groups (hyperparameters plus ``"params"``: the member
        parameter names, in the optimizer's order); default one group of every parameter.
        ``extra``: coordinator state (scheduler, RNG, data position; any savable value).
        ``metrics``: numbers retention can rank by (e.g. ``{"loss": 0.31}``).
        """
        self._own(pending)
        directory = Path(pending.directory)
        final = step_directory(self.root, pending.step)
        if os.path.lexists(final / MANIFEST):
            raise CheckpointError(f"step {pending.step} is already committed in {self.root}")
        try:
            entries = os.listdir(directory)
        except OSError as error:
            raise CheckpointError(f"cannot commit step {pending.step}: {directory}: {error.strerror or error}") from error
        for entry in entries:
            if LEFTOVER.fullmatch(entry):
                _remove(directory / entry)  # a shard writer's temporary file from a retried write

        manifest = build_manifest(pending, param_groups, metrics, extra,
                                  lambda shard: (pending.shard_path(shard).name, pending.shard_path(shard)))
        dump(manifest, directory / MANIFEST)
        if os.path.lexists(final):
            # step-<k> without a manifest is no committed checkpoint (its manifest was deleted):
            # refusing would fail every later save of this step, deleting it would destroy
            # what the user may want to inspect, so it is moved aside
            self.set_aside(pending.step, f"the commit of step {pending.step} found it without {MANIFEST}")
        try:
            os.rename(directory, final)
            _fsync_directory(self.root)
        except OSError as error:
            raise CheckpointError(f"cannot commit {final}: {error.strerror or error}") from error
        self._pending.discard(pending.directory)
        self.prune()
        return final

    def set_aside(self, step: int, reason: str) -> Path:
        """Move the damaged directory of ``step`` (committed, or left without a manifest) out
        of the way: rename it to ``step-<k>.damaged-<token>``, with ``reason`` and the time in
        its ``set-aside-reason.txt``, and return the new path. Nothing is deleted; the
        directory is never loaded, listed as committed or removed by :meth:`cleanup`, and
        step k can be committed again. Which steps are damaged: :func:`newest_intact`."""
        self._check_open()
        _check_step(step)
        if type(reason) is not str or not reason.strip():
            raise ValueError(f"reason must be a non-empty str; got {reason!r}")
        directory = step_directory(self.root, step)
        if not os.path.lexists(directory):
            raise CheckpointError(f"cannot set aside step {step}: {directory} does not exist")
        aside = directory.with_name(f"{directory.name}.damaged-{secrets.token_hex(6)}")
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        try:
            if directory.is_dir() and not directory.is_symlink():
                # written before the rename: a crash in between leaves a note in a directory
                # that is set aside again later, never a set-aside directory without its note
                _write_note(directory / SET_ASIDE_NOTE, f"{directory.name} set aside at {when}: {reason}\n")
            os.rename(directory, aside)
            _fsync_directory(self.root)
        except OSError as error:
            raise CheckpointError(f"cannot set aside {directory}: {error.strerror or error}") from error
        return aside

    def prune(self) -> list[int]:
        """Apply the retention policy; returns the deleted steps."""
        self._check_open()
        if self.retention is None:
            return []
        steps = committed_steps(self.root)
        kept = self.retention.keep({step: self._metrics_of(step) for step in steps})
        deleted = [step for step in steps if step not in kept]
        for step in deleted:
            self._delete_step(step)
        return deleted

    def _delete_step(self, step: int) -> None:
        """Delete a committed step: renamed out of sight first, so a crash mid-delete leaves a
        leftover, never half a checkpoint."""
        doomed = step_directory(self.root, step)
        hidden = doomed.with_name(f"{doomed.name}.deleting-{secrets.token_hex(6)}")
        os.rename(doomed, hidden)
        _fsync_directory(self.root)
        shutil.rmtree(hidden)

    def latest(self) -> int | None:
        return latest_step(self.root)

    def _metrics_of(self, step: int) -> Mapping[str, float]:
        """A committed step's metrics for retention; none for one whose manifest no longer
        reads (damaged after its commit): it never ranks among the best, and keep_last and
        keep_every treat it like any other step, so pruning never fails on it."""
        try:
            return RunCheckpoint(step_directory(self.root, step)).metrics
        except CorruptCheckpointError:
            return {}


def _write_note(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, memoryview(text.encode()))
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _check_groups(param_groups: list[dict] | None, layout: ShardLayout) -> list[dict]:
    names = [spec.name for spec in layout.params]
    if param_groups is None:
        return [{"params": names}]
    if type(param_groups) is not list:
        raise TypeError(f"param_groups must be a list of dicts; got {type(param_groups).__name__}")
    seen: dict[str, int] = {}
    groups = []
    for index, group in enumerate(param_groups):
        if not isinstance(group, Mapping) or "params" not in group:
            raise ValueError(f"param_groups[{index}] must be a dict with a 'params' list of parameter names")
        members = group["params"]
        if type(members) not in (list, tuple) or any(type(name) is not str for name in members):
            raise ValueError(f"param_groups[{index}]['params'] must list parameter names; got {members!r}")
        for name in members:
            if name not in layout:
                raise ValueError(f"param_groups[{index}] lists {name!r}, which the layout does not have")
            if name in seen:
                raise ValueError(f"parameter {name!r} is in param_groups[{seen[name]}] and param_groups[{index}]")
            seen[name] = index
        groups.append({key: (list(members) if key == "params" else value) for key, value in group.items()})
    Encoder().encode(groups)  # every hyperparameter must be savable: fail here, not later
    return groups


def _check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict of name -> number; got {type(metrics).__name__}")
    checked = {}
    for name, value in metrics.items():
        if type(name) is not str or isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ValueError(f"metrics must map names to numbers; got {name!r}: {value!r}")
        checked[name] = float(value)
    return checked


def build_manifest(pending: PendingCheckpoint, param_groups: list[dict] | None, metrics: Mapping[str, float] | None,
                   extra: Any, shard_file: Callable[[int], tuple[str, Any]]) -> dict:
    """Check every shard file of a pending checkpoint and return its manifest.
    ``shard_file(shard)`` gives the name the manifest records and where the file is."""
    layout = pending.layout
    groups = _check_groups(param_groups, layout)
    metrics = _check_metrics(metrics)
    def check(shard: int) -> tuple[dict, dict]:
        name, path = shard_file(shard)
        missing = CheckpointError(
            f"cannot commit step {pending.step}: shard {shard} of {layout.num_shards} was not written ({path})")
        if not isinstance(path, ObjectPath) and not path.exists():
            raise missing
        try:
            reader = FileReader(path)  # on object storage, its look-up is the existence check
        except ObjectMissingError:
            raise missing from None
        with reader:
            return _shard_schema(reader, pending, shard), {
                "file": name, "size": reader.size, "header_checksum": reader.header_checksum,
                "slices": {param: list(bounds) for param, bounds in layout.slices(shard).items()},
            }

    if isinstance(shard_file(0)[1], ObjectPath):
        # every read is a round trip to the store: the shard files are checked side by side
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(8, layout.num_shards)) as pool:
            checked = list(pool.map(check, range(layout.num_shards)))
    else:
        checked = [check(shard) for shard in range(layout.num_shards)]
    shards, schema = [], None
    for shard, (shard_schema, record) in enumerate(checked):
        shards.append(record)
        if schema is None:
            schema = shard_schema
        elif not _same(schema, shard_schema):
            raise CheckpointError(
                f"cannot commit step {pending.step}: shard {shard}'s optimizer state differs from "
                f"shard 0's in its keys, dtypes or scalar values ({_first_difference(schema, shard_schema)})"
            )
    grouped = {name for group in groups for name in group["params"]}
    stray = [name for name in schema if name not in grouped]
    if stray:
        raise ValueError(f"optimizer state for parameters {stray} that no param group lists")
    return {
        "kind": MANIFEST_KIND, "version": MANIFEST_VERSION, "run_id": pending.run_id,
        "step": pending.step, "created": time.time(), "num_shards": layout.num_shards,
        "params": [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in layout.params],
        "param_groups": groups, "state": schema, "shards": shards, "metrics": metrics, "extra": extra,
    }


def _shard_schema(reader: FileReader, pending: PendingCheckpoint, shard: int) -> dict:
    """A shard file's optimizer-state schema ({name: {key: {"per_element": dtype} or
    {"value": v}}}), after checking the file against the pending checkpoint."""
    tree = reader.tree
    layout = pending.layout
    if type(tree) is not dict or tuple(tree) != SHARD_FIELDS:
        raise CorruptCheckpointError(f"{reader.path}: not a shard file (fields {list(tree) if type(tree) is dict else type(tree).__name__})")
    expected = {"run_id": pending.run_id, "step": pending.step, "shard": shard, "num_shards": layout.num_shards}
    for key, value in expected.items():
        if tree[key] != value or type(tree[key]) is not type(value):
            raise CheckpointError(f"{reader.path}: {key} is {tree[key]!r}; this checkpoint expects {value!r}")
    if type(tree["param"]) is not dict or list(tree["param"]) != [s.name for s in layout.params]:
        raise CorruptCheckpointError(f"{reader.path}: its parameters do not match the layout")
    for spec in layout.params:
        start, stop = layout.slice(spec.name, shard)
        _check_entry(reader, tree["param"][spec.name], f"param {spec.name!r}", spec.dtype, stop - start)
    if type(tree["state"]) is not dict:
        raise CorruptCheckpointError(f"{reader.path}: state must be a map")
    # the replicated values (0-d step counters, ...) are read below: on object storage in one request
    reader.prefetch([reader.entries[value.index] for entries in tree["state"].values() if type(entries) is dict
                     for value in entries.values() if type(value) is TensorRef
                     and 0 <= value.index < len(reader.entries) and len(reader.entries[value.index].shape) != 1])
    schema = {}
    for name, entries in tree["state"].items():
        if name not in layout or type(entries) is not dict:
            raise CorruptCheckpointError(f"{reader.path}: state for unknown parameter {name!r}")
        start, stop = layout.slice(name, shard)
        schema[name] = {}
        for key, value in entries.items():
            if type(value) is TensorRef and len(reader.entries[value.index].shape) == 1:
                entry = _check_entry(reader, value, f"state {name!r}/{key!r}", None, stop - start)
                schema[name][key] = {"per_element": entry.dtype.name}
            else:
                schema[name][key] = {"value": _read_value(reader, value)}
    return schema


def _check_entry(reader: FileReader, ref: Any, what: str, dtype: str | None, length: int):
    if type(ref) is not TensorRef:
        raise CorruptCheckpointError(f"{reader.path}: {what} is not an array")
    entry = reader.entries[ref.index]
    if entry.shape != (length,) or (dtype is not None and entry.dtype.name != dtype):
        raise CorruptCheckpointError(
            f"{reader.path}: {what} is {entry.dtype.name}{list(entry.shape)}; expected "
            f"{dtype or 'an array'} of {length} elements"
        )
    return entry


def _read_value(reader: FileReader, value: Any) -> Any:
    """A small replicated value with its arrays read in full."""
    refs: list[TensorRef] = []

    def collect(node: Any) -> None:
        if type(node) is TensorRef:
            refs.append(node)
        elif type(node) in (dict,):
            for item in node.values():
                collect(item)
        elif type(node) in (list, tuple):
            for item in node:
                collect(item)

    collect(value)
    arrays = [None] * len(reader.entries)
    for ref in refs:
        arrays[ref.index] = reader.read_array(reader.entries[ref.index])
    return fill(value, arrays)


def _same(a: Any, b: Any) -> bool:
    """Exact equality of saved values: same types, same bits (NaN equals itself)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if type(a) is float:
        return np.float64(a).tobytes() == np.float64(b).tobytes()
    if type(a) is dict:
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if type(a) in (list, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _first_difference(a: dict, b: dict) -> str:
    for name in list(a) + [n for n in b if n not in a]:
        if name not in a or name not in b:
            return f"parameter {name!r} has state in only one of them"
        if list(a[name]) != list(b[name]):
            return f"parameter {name!r}: keys {list(a[name])} vs {list(b[name])}"
        for key in a[name]:
            if not _same(a[name][key], b[name][key]):
                return f"parameter {name!r}, {key!r}: {a[name][key]!r} vs {b[name][key]!r}"
    return "order of parameters"


# ---------------------------------------------------------------------------------------
# reading committed checkpoints


def numbered_names(names: Iterable[str], pattern: re.Pattern[str]) -> list[tuple[Any, ...]]:
    """``(*numbers, name)`` of every name ``pattern`` matches whole, its groups (all digits) read
    as ints: the names in numeric order, whatever order the listing gave them in."""
    found = []
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            found.append((*map(int, match.groups()), name))
    return sorted(found)


def _step_entries(root: Path) -> list[tuple[int, str]]:
    """``(step, name)`` of every ``step-<k>`` entry of a run directory, committed or not,
    oldest first (pending, deleting and set-aside names never match)."""
    if isinstance(root, ObjectPath):
        names, _ = root.children()
    else:
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            return []
        except OSError as error:
            raise CheckpointError(f"cannot list {root}: {error.strerror or error}") from error
    return numbered_names(names, STEP_DIR)


def committed_steps(root: str | os.PathLike) -> list[int]:
    """The committed steps in a run directory, oldest first (pending ones never count, nor
    do set-aside ``step-<k>.damaged-<token>`` directories)."""
    root = location(root)
    return [step for step, name in _step_entries(root) if (root / name / MANIFEST).is_file()]


def latest_step(root: str | os.PathLike) -> int | None:
    """The newest committed step, or None."""
    steps = committed_steps(root)
    return steps[-1] if steps else None


def best_step(root: str | os.PathLike, metric: str, mode: str = "min") -> int | None:
    """The committed step whose manifest's ``metric`` is best (``mode`` "min" or "max"; the
    newer of equals), or None when no manifest has it. A manifest that no longer reads never
    ranks (as in :meth:`Retention.keep`)."""
    root = location(root)
    metrics = {}
    for step in committed_steps(root):
        try:
            with RunCheckpoint(step_directory(root, step)) as checkpoint:
                metrics[step] = checkpoint.metrics
        except CorruptCheckpointError:
            continue
    return Retention(keep_best=1, metric=metric, mode=mode).best(metrics)


def newest_intact(root: str | os.PathLike) -> tuple[int | None, list[tuple[int, str]]]:
    """The newest committed step whose manifest loads and whose :meth:`RunCheckpoint.verify`
    passes (None when there is none), and ``(step, one-line reason)`` for every newer
    ``step-<k>`` directory that did not, newest first: damaged files, or a directory without
    a manifest (not a committed step, but not something to pass over in silence either).

    Reads every byte of each checkpoint it checks, newest first, until one is intact. A
    failure that says nothing about the checkpoint (permissions, I/O errors on opening)
    propagates as a :class:`CheckpointError` rather than passing the step over.
    """
    checkpoint, damaged = open_newest_intact(root)
    if checkpoint is None:
        return None, damaged
    checkpoint.close()
    return checkpoint.step, damaged


def open_intact(root: str | os.PathLike) -> tuple[RunCheckpoint | None, list[tuple[int, str]]]:
    """:func:`open_newest_intact` for a reader that needs a checkpoint: a directory whose
    committed checkpoints are all damaged is refused (CheckpointError naming each one);
    None only when nothing is committed."""
    checkpoint, damaged = open_newest_intact(root)
    if checkpoint is None and committed_steps(root):
        raise CheckpointError(f"no committed checkpoint in {root} is intact: "
                              + "; ".join(f"step {step}: {reason}" for step, reason in damaged))
    return checkpoint, damaged


def open_newest_intact(root: str | os.PathLike) -> tuple[RunCheckpoint | None, list[tuple[int, str]]]:
    """As :func:`newest_intact`, but the intact checkpoint is returned open, with every shard
    file it verified still open: a reader keeps reading it even if a live run's retention
    deletes the step meanwhile (the caller closes it; on object storage a deleted object
    cannot be read on, and the reader fails with a CheckpointError naming it)."""
    root = location(root)
    damaged: list[tuple[int, str]] = []
    for step, name in reversed(_step_entries(root)):
        directory = root / name
        if not (directory / MANIFEST).is_file():
            if isinstance(root, ObjectPath):
                # on object storage shard files go straight under step-<k>/: without a manifest
                # they are an attempt that never committed, which the next writer removes
                continue
            reason = f"{directory}: no {MANIFEST}, so not a committed checkpoint (its manifest was deleted or never written)"
            damaged.append((step, reason))
            continue
        checkpoint = None
        try:
            checkpoint = RunCheckpoint(directory)
            if checkpoint.step != step:
                raise CorruptCheckpointError(
                    f"{directory / MANIFEST}: is the manifest of step {checkpoint.step}; this "
                    f"directory holds step {step}")
            checkpoint.verify()
        except CorruptCheckpointError as error:
            if checkpoint is not None:
                checkpoint.close()
            damaged.append((step, str(error)))
            continue
        except BaseException:
            if checkpoint is not None:
                checkpoint.close()
            raise
        return checkpoint, damaged
    return None, damaged


def open_checkpoint(root: str | os.PathLike, step: int | None = None) -> RunCheckpoint:
    """A committed checkpoint of a run directory: ``step``, or the newest when None."""
    root = location(root)
    if step is None:
        step = latest_step(root)
        if step is None:
            raise CheckpointError(f"no committed checkpoint in {root}")
    _check_step(step)
    directory = step_directory(root, step)
    if not (directory / MANIFEST).is_file():
        raise CheckpointError(f"step {step} is not committed in {root}; committed: {committed_steps(root)}")
    return RunCheckpoint(directory)


class RunCheckpoint:
    """A committed checkpoint: its manifest, and readers of its shard files.

    ``load_shard(shard, num_shards)`` gives one shard of any new shard count, reading only
    the byte ranges (to the 1 MiB checksum chunk) it needs; ``export()`` gives the full
    parameters and a torch-layout optimizer state_dict. Both verify every chunk they read;
    ``verify()`` checks every byte of the checkpoint without loading it.

    Nothing is allocated on a claim that is not checked first: opening checks the manifest
    against itself (parameter table, slices, state schema, shard file names, and array bytes
    no larger than the shard files it records), and every shard file a read needs is opened
    and checked against the manifest (size, header checksum, every array's shape and dtype)
    before any array is allocated.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = location(directory)
        manifest = load(self.directory / MANIFEST)
        self._manifest = _check_manifest(manifest, self.directory / MANIFEST)
        self.run_id: str = manifest["run_id"]
        self.step: int = manifest["step"]
        self.metrics: dict[str, float] = manifest["metrics"]
        self.extra: Any = manifest["extra"]
        self.param_groups: list[dict] = manifest["param_groups"]
        # {parameter name: {state key: kind}}: what each parameter's optimizer state holds
        # (parameters without state are absent)
        self.state_schema: dict[str, dict[str, str]] = self._manifest["state"]
        self.layout = ShardLayout(
            tuple(ParamSpec(p["name"], tuple(p["shape"]), p["dtype"]) for p in manifest["params"]),
            manifest["num_shards"])
        self._readers: dict[int, FileReader] = {}
        # per open shard file, its arrays checked against the manifest, by (parameter, state
        # key or None for the parameter itself)
        self._entries: dict[int, dict[tuple[str, str | None], TensorEntry]] = {}

    def shard_files(self) -> list[str]:
        """The names of the shard files the manifest lists, in shard order (what a committed
        step directory must keep besides the manifest)."""
        return [record["file"] for record in self._manifest["shards"]]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self._entries.clear()

    def __enter__(self) -> RunCheckpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def verify(self) -> None:
        """Check the whole checkpoint: every shard file the manifest names exists, has the
        size and header checksum the manifest records and the arrays its slices and state
        schema say, zero padding, and every data chunk matches its checksum. Reads one
        checksum chunk (1 MiB) at a time, so memory stays bounded whatever the checkpoint's
        size. Raises :class:`CorruptCheckpointError` naming the file and what is wrong."""
        for shard in range(self.layout.num_shards):
            self._reader(shard).verify_all()

    def _reader(self, shard: int) -> FileReader:
        """Shard ``shard``'s file, opened once and checked against the manifest."""
        reader = self._readers.get(shard)
        if reader is not None:
            return reader
        record = self._manifest["shards"][shard]
        path = self.directory / record["file"]
        listed = f"the manifest lists it as shard {shard} of {self.layout.num_shards}, {record['size']} bytes"
        if not isinstance(path, ObjectPath):  # on object storage FileReader's look-up tells (below)
            try:
                status = os.stat(path)
            except FileNotFoundError:
                raise CorruptCheckpointError(f"{path}: missing; {listed}") from None
            except OSError:
                status = None  # not a statement about the checkpoint: FileReader reports it
            if status is not None and not stat.S_ISREG(status.st_mode):
                raise CorruptCheckpointError(f"{path}: not a regular file; {listed}")
        try:
            reader = FileReader(path)
        except ObjectMissingError:
            raise CorruptCheckpointError(f"{path}: missing; {listed}") from None
        try:
            if reader.size != record["size"] or reader.header_checksum != record["header_checksum"]:
                raise CorruptCheckpointError(
                    f"{reader.path}: size {reader.size} / header checksum {reader.header_checksum:#x} differ "
                    f"from the manifest's {record['size']} / {record['header_checksum']:#x}; the file was "
                    "replaced or damaged"
                )
            reader.check_padding()
            self._entries[shard] = self._check_shard_file(reader, shard, record)
        except BaseException:
            reader.close()
            raise
        self._readers[shard] = reader
        return reader

    def _check_shard_file(self, reader: FileReader, shard: int, record: dict) -> dict:
        """A shard file's tree against the manifest: the same run, step and shard, and every
        array the manifest's slices and state schema promise, with exactly that shape and
        dtype. Returns those arrays' table entries; nothing of the file's data is read."""
        tree = reader.tree
        manifest = f"the manifest of {self.directory}"
        if type(tree) is not dict or tuple(tree) != SHARD_FIELDS:
            fields = _show(list(tree)) if type(tree) is dict else type(tree).__name__
            raise CorruptCheckpointError(f"{reader.path}: not a shard file (fields {fields}; expected {list(SHARD_FIELDS)})")
        for key, value in (("run_id", self.run_id), ("step", self.step), ("shard", shard),
                           ("num_shards", self.layout.num_shards)):
            if type(tree[key]) is not type(value) or tree[key] != value:
                raise CorruptCheckpointError(f"{reader.path}: {key} is {_show(tree[key])}; {manifest} says {value!r}")
        params, state = tree["param"], tree["state"]
        names = [spec.name for spec in self.layout.params]
        if type(params) is not dict or set(params) != set(names):
            held = _show(list(params)) if type(params) is dict else type(params).__name__
            raise CorruptCheckpointError(f"{reader.path}: holds parameters {held}; {manifest} lists {_show(names)}")
        if type(state) is not dict or set(state) != set(self.state_schema):
            held = _show(list(state)) if type(state) is dict else type(state).__name__
            raise CorruptCheckpointError(
                f"{reader.path}: holds optimizer state of {held}; {manifest} lists {_show(list(self.state_schema))}")
        entries = {}
        for spec in self.layout.params:
            entries[(spec.name, None)] = self._checked_entry(
                reader, params[spec.name], f"parameter {spec.name!r}", spec.dtype, record["slices"][spec.name], shard)
        for name, schema in self.state_schema.items():
            held = state[name]
            if type(held) is not dict or set(held) != set(schema):
                shown = _show(list(held)) if type(held) is dict else type(held).__name__
                raise CorruptCheckpointError(
                    f"{reader.path}: the state of parameter {name!r} holds {shown}; {manifest} lists {list(schema)}")
            for key, kind in schema.items():
                if "per_element" in kind:
                    entries[(name, key)] = self._checked_entry(
                        reader, held[key], f"state {key!r} of parameter {name!r}", kind["per_element"],
                        record["slices"][name], shard)
        return entries

    def _checked_entry(self, reader: FileReader, ref: Any, what: str, dtype: str, bounds: list[int],
                       shard: int) -> TensorEntry:
        lo, hi = bounds
        expected = f"the manifest of {self.directory} says {dtype}[{hi - lo}] (shard {shard}'s elements [{lo}, {hi}))"
        if type(ref) is not TensorRef:
            raise CorruptCheckpointError(f"{reader.path}: {what} is not an array; {expected}")
        entry = reader.entries[ref.index]
        if entry.shape != (hi - lo,) or entry.dtype.name != dtype:
            raise CorruptCheckpointError(f"{reader.path}: {what} is {entry.dtype.name}{list(entry.shape)}; {expected}")
        return entry

    def _open_files(self, ranges: Mapping[str, tuple[int, int]]) -> None:
        """Open and check every shard file holding part of ``ranges`` ({parameter: (start,
        stop)} of the flattened parameters) before anything is allocated for them."""
        for shard, record in enumerate(self._manifest["shards"]):
            slices = record["slices"]
            if any(max(start, slices[name][0]) < min(stop, slices[name][1]) for name, (start, stop) in ranges.items()):
                self._reader(shard)

    def _read(self, name: str, key: str | None, dtype: np.dtype, start: int, stop: int, out: np.ndarray) -> None:
        """Elements [start, stop) of a parameter (key None) or of its per-element state
        ``key``, gathered from the shard files that hold them, into ``out`` (1-D)."""
        view = memoryview(out.view(np.uint8))
        size = dtype.itemsize
        for shard, record in enumerate(self._manifest["shards"]):
            lo, hi = record["slices"][name]
            a, b = max(start, lo), min(stop, hi)
            if a >= b:
                continue
            reader = self._reader(shard)
            entry = self._entries[shard][(name, key)]
            reader.read_into(entry, view[(a - start) * size:(b - start) * size], (a - lo) * size, (b - lo) * size)
            reader.check_bool(entry, out[a - start:b - start])

    def load_shard(self, shard: int, num_shards: int) -> dict[str, dict]:
        """Shard ``shard`` of ``num_shards`` (any count): ``{"params": {name: 1-D slice},
        "state": {name: {key: slice or scalar}}}`` with the slices of
        ``ShardLayout(params, num_shards)``."""
        layout = ShardLayout(self.layout.params, num_shards)
        layout.check_shard(shard)
        self._open_files(layout.slices(shard))
        params, state = {}, {}
        for spec in layout.params:
            start, stop = layout.slice(spec.name, shard)
            params[spec.name] = self._fresh(spec.name, None, DTYPES[spec.dtype], start, stop)
        for name, entries in self._manifest["state"].items():
            start, stop = layout.slice(name, shard)
            state[name] = {
                key: (self._fresh(name, key, DTYPES[kind["per_element"]], start, stop)
                      if "per_element" in kind else copy.deepcopy(kind["value"]))
                for key, kind in entries.items()
            }
        return {"params": params, "state": state}

    def _fresh(self, name: str, key: str | None, dtype: np.dtype, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype)
        self._read(name, key, dtype, start, stop, out)
        return out

    def export(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The consolidated model parameters (name -> full array) and optimizer state_dict in
        torch's layout (``{"state": {index: {...}}, "param_groups": [{..., "params":
        [index, ...]}]}``, indices numbered group by group as torch does). Each array is
        allocated once at full size and filled straight from the shard files."""

        def full(name: str, key: str | None, dtype: np.dtype) -> np.ndarray:
            spec = self.layout.spec(name)
            array = np.empty(spec.shape, dtype)
            self._read(name, key, dtype, 0, spec.numel, array.reshape(-1))
            return array

        self._open_files({spec.name: (0, spec.numel) for spec in self.layout.params})
        return self._consolidated(full)

    def export_file(self, path: str | os.PathLike) -> None:
        """Write the export as one single-file checkpoint, ``{"model": params, "optimizer":
        state_dict}``, streaming: every array goes from the shard files to the new file a
        block at a time, so memory holds one 8 MiB block, never the state."""

        def streamed(name: str, key: str | None, dtype: np.dtype) -> StreamedArray:
            spec = self.layout.spec(name)

            def blocks(max_bytes: int):
                step = max(1, max_bytes // dtype.itemsize)
                buffer = np.empty(min(step, spec.numel), dtype)
                for start in range(0, spec.numel, step):
                    stop = min(start + step, spec.numel)
                    self._read(name, key, dtype, start, stop, buffer[:stop - start])
                    yield memoryview(buffer[:stop - start].view(np.uint8))

            return StreamedArray(dtype, spec.shape, blocks)

        self._open_files({spec.name: (0, spec.numel) for spec in self.layout.params})
        model, optimizer = self._consolidated(streamed)
        encoder = Encoder()
        write_file(path, encoder.encode({"model": model, "optimizer": optimizer}), encoder.tensors)

    def _consolidated(self, array: Callable[[str, str | None, np.dtype], Any]) -> tuple[dict, dict]:
        params = {spec.name: array(spec.name, None, DTYPES[spec.dtype]) for spec in self.layout.params}
        index: dict[str, int] = {}
        groups = []
        for group in self.param_groups:
            exported = {}
            for key, value in group.items():
                if key == "params":
                    value = [index.setdefault(name, len(index)) for name in value]
                exported[key] = copy.deepcopy(value)
            groups.append(exported)
        state = {}
        for name, entries in self._manifest["state"].items():
            state[index[name]] = {
                key: (array(name, key, DTYPES[kind["per_element"]]) if "per_element" in kind
                      else copy.deepcopy(kind["value"]))
                for key, kind in entries.items()
            }
        return params, {"state": state, "param_groups": groups}


def _check_manifest(manifest: Any, path: Path) -> dict:
    """Every field the readers rely on, so a bad manifest is a CorruptCheckpointError before
    anything is allocated on what it claims: a parameter table of known dtypes and
    non-negative shapes, slices that tile every parameter in shard order, a state schema of
    known dtypes, shard files named as the layout names them, and no shard whose arrays need
    more bytes than the manifest records for its file (the readers check that size against
    the real file before reading). Values from the file appear in messages through _show,
    which bounds them."""

    def bad(message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: {message}")

    if type(manifest) is not dict or manifest.get("kind") != MANIFEST_KIND:
        raise bad("not a run-checkpoint manifest")
    if manifest.get("version") != MANIFEST_VERSION:
        raise bad(f"unsupported manifest version {_show(manifest.get('version'))}; this reader reads {MANIFEST_VERSION}")
    if list(manifest) != list(MANIFEST_FIELDS):
        raise bad(f"manifest fields {_show(list(manifest))}; expected {list(MANIFEST_FIELDS)}")
    num_shards, step = manifest["num_shards"], manifest["step"]
    if type(num_shards) is not int or num_shards < 1 or type(step) is not int or step < 0:
        raise bad(f"num_shards {_show(num_shards)} must be an int >= 1 and step {_show(step)} an int >= 0")
    if type(manifest["run_id"]) is not str:
        raise bad(f"run_id {_show(manifest['run_id'])} must be a str")

    params = manifest["params"]
    if type(params) is not list:
        raise bad(f"params must be a list of {{name, shape, dtype}} maps; got {type(params).__name__}")
    specs = []
    for index, param in enumerate(params):
        if type(param) is not dict or set(param) != {"name", "shape", "dtype"}:
            raise bad(f"params[{index}] must be a map of exactly name, shape and dtype; got {_show(param)}")
        name, shape, dtype = param["name"], param["shape"], param["dtype"]
        if type(name) is not str or not name:
            raise bad(f"params[{index}]: name {_show(name)} must be a non-empty str")
        if type(shape) is not list or len(shape) > MAX_NDIM or any(type(d) is not int or d < 0 for d in shape):
            raise bad(f"parameter {name!r}: shape {_show(shape)} must be a list of at most {MAX_NDIM} non-negative ints")
        if type(dtype) is not str or dtype not in DTYPES:
            raise bad(f"parameter {name!r}: dtype {_show(dtype)} is unknown; allowed: {ALLOWED_DTYPES}")
        specs.append(ParamSpec(name, tuple(shape), dtype))
    try:
        ShardLayout(tuple(specs), num_shards)
    except ValueError as error:  # repeated names
        raise bad(f"bad parameter table ({error})") from None
    by_name = {spec.name: spec for spec in specs}

    state = manifest["state"]
    if type(state) is not dict:
        raise bad(f"state schema must be a map; got {type(state).__name__}")
    for name, entries in state.items():
        if name not in by_name:
            raise bad(f"state schema for parameter {_show(name)}, which the parameter table lacks")
        if type(entries) is not dict:
            raise bad(f"state schema of {name!r} must be a map; got {type(entries).__name__}")
        for key, kind in entries.items():
            if type(key) is not str:
                raise bad(f"state schema of {name!r}: key {_show(key)} must be a str")
            per_element = kind.get("per_element") if type(kind) is dict else None
            if not (type(kind) is dict and (list(kind) == ["value"] or (
                    list(kind) == ["per_element"] and type(per_element) is str and per_element in DTYPES))):
                raise bad(f"state schema of {name!r}/{key!r} is {_show(kind)}; expected {{'value': v}} or "
                          f"{{'per_element': dtype}} with dtype one of {ALLOWED_DTYPES}")

    shards = manifest["shards"]
    if type(shards) is not list or len(shards) != num_shards:
        raise bad(f"lists {len(shards) if type(shards) is list else '?'} shard files for {num_shards} shards")
    for shard, record in enumerate(shards):
        if type(record) is not dict or set(record) != set(SHARD_RECORD_FIELDS):
            raise bad(f"shard record {shard} must be a map of exactly {', '.join(SHARD_RECORD_FIELDS)}")
        # the only file a reader may open for this shard: never "..", a path or another shard's
        expected_name = shard_file_name(shard, num_shards)
        attempt, _, file_name = record["file"].rpartition("/") if type(record["file"]) is str else ("", "", None)
        if file_name != expected_name or (attempt and not ATTEMPT.fullmatch(attempt)):
            raise bad(f"shard {shard}'s file is {_show(record['file'])}; the only names allowed are "
                      f"{expected_name!r} and attempt-<12 hex digits>/{expected_name}")
        size, header_sum, slices = record["size"], record["header_checksum"], record["slices"]
        if type(size) is not int or size < 0 or type(header_sum) is not int or not 0 <= header_sum < 1 << 64:
            raise bad(f"shard {shard}'s size {_show(size)} and header checksum {_show(header_sum)} must be "
                      "non-negative ints (the checksum below 2**64)")
        if type(slices) is not dict or set(slices) != set(by_name):
            shown = _show(list(slices)) if type(slices) is dict else type(slices).__name__
            raise bad(f"shard {shard}'s slices are of {shown}; expected exactly the parameters {_show(list(by_name))}")
    for spec in specs:
        expected = 0
        for shard, record in enumerate(shards):
            bounds = record["slices"][spec.name]
            if (type(bounds) is not list or len(bounds) != 2 or any(type(b) is not int for b in bounds)
                    or bounds[0] != expected or bounds[1] < bounds[0]):
                raise bad(f"shard {shard}'s slice of {spec.name!r} is {_show(bounds)}; slices must tile "
                          f"[0, {spec.numel}) in shard order, so this one is [{expected}, stop) with stop >= {expected}")
            expected = bounds[1]
        if expected != spec.numel:
            raise bad(f"the slices of {spec.name!r} cover [0, {expected}); its shape {list(spec.shape)} has "
                      f"{spec.numel} elements")
    for shard, record in enumerate(shards):
        # a shard file holds at least its arrays' bytes: what the slices claim is bounded by
        # the size recorded here, which the readers check against the real file
        claimed = 0
        for spec in specs:
            lo, hi = record["slices"][spec.name]
            arrays = [(f"parameter {spec.name!r}", spec.dtype)] + [
                (f"state {key!r} of parameter {spec.name!r}", kind["per_element"])
                for key, kind in state.get(spec.name, {}).items() if "per_element" in kind]
            for what, dtype in arrays:
                needed = (hi - lo) * DTYPES[dtype].itemsize
                claimed += needed
                if claimed > record["size"]:
                    raise bad(f"{what} (shape {list(spec.shape)}, {dtype}) needs {needed} bytes for shard {shard}'s "
                              f"elements [{lo}, {hi}), {claimed} with the shard's arrays before it; the manifest "
                              f"records its file {record['file']} as {record['size']} bytes")

    groups = manifest["param_groups"]
    if type(groups) is not list or any(
            type(g) is not dict or type(g.get("params")) is not list
            or any(type(n) is not str or n not in by_name for n in g["params"]) for g in groups):
        raise bad("param_groups must be maps whose 'params' list parameter names")
    grouped = {name for group in groups for name in group["params"]}
    if any(name not in grouped for name in state):
        raise bad("optimizer state for a parameter that no param group lists")
    metrics = manifest["metrics"]
    # retention ranks by these: anything but a number would fail the prune after a commit
    if type(metrics) is not dict or any(type(k) is not str or type(v) not in (int, float) for k, v in metrics.items()):
        raise bad(f"metrics must map names to numbers; got {_show(metrics)}")
    return manifest
