"""The writer's store of a run on object storage: the same begin / commit / abort / prune /
set_aside as on disk, with conditional writes where the disk has rename and flock.

Layout under the run's URL (``checkpoints/FORMAT.md``, "Object storage")::

    .writer-lease                                   # who writes this run, until when
    step-0000000100/manifest.ckpt                   # written last, create-only: the commit
    step-0000000100/attempt-<token>/shard-00000-of-00004.ckpt
    step-0000000100.damaged-<token>/...             # set aside, never loaded or removed

- **Commit.** Each attempt at a step writes its shard files under ``attempt-<token>/`` (from
  each shard's own process, streamed, multipart when large); the manifest, naming them, is
  written last with ``If-None-Match: *``, so a step becomes visible whole or not at all and
  two writers can never both commit it (the loser's attempt is removed, and it is told).
- **One writer per run.** A lease object replaces ``flock``: created with ``If-None-Match``,
  renewed by compare-and-swap on its ETag every third of its term from a background thread,
  deleted on close. A second live writer is refused with who holds the lease and until when.
  A writer that died stops renewing: its lease is taken over once expired, at once when the
  holder was a process of this host that no longer exists. A writer that cannot renew (the
  store unreachable for a whole term) stops committing, since another may have taken over.
- **Leftovers.** Whatever is under ``step-<k>/`` and not named by that step's manifest (an
  attempt that crashed, lost a race, or a step whose deletion was cut short) is removed by
  the next writer when it opens the run; readers never see it, since they go by manifests.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket
import threading
import time
from typing import Any

import msgpack

from shardstep.checkpoints.errors import CheckpointError, CorruptCheckpointError
from shardstep.checkpoints.format import Encoder, write_file
from shardstep.checkpoints.layout import ShardLayout
from shardstep.checkpoints.run import (
    ATTEMPT,
    MANIFEST,
    SET_ASIDE_NOTE,
    STEP_DIR,
    CheckpointStore,
    PendingCheckpoint,
    Retention,
    RunCheckpoint,
    _check_step,
    build_manifest,
    shard_file_name,
    step_directory,
)
from shardstep.checkpoints.storage import (
    ObjectChangedError,
    ObjectExistsError,
    ObjectPath,
    copy_object,
    get_object,
    location,
    put_object,
)

LEASE = ".writer-lease"
# how long a lease holds without renewal: a crashed writer on another host blocks the run for
# at most this long; renewal every third of it rides out two failed renewals
LEASE_SECONDS = 60.0


class LeaseHeldError(CheckpointError):
    """Another live writer holds the lease: ``holder`` is its record, ``left`` its seconds."""

    def __init__(self, holder: dict, left: float, message: str):
        super().__init__(message)
        self.holder = holder
        self.left = left


class Lease:
    """The run's writer lease: one object, created and renewed by conditional writes."""

    def __init__(self, path: ObjectPath, run_id: str, seconds: float):
        self.path = path
        self.run_id = run_id
        self.seconds = seconds
        self.owner = secrets.token_hex(8)
        self._etag: str | None = None
        self._valid_until = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        return msgpack.packb({
            "owner": self.owner, "run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
            "expires": time.time() + self.seconds,
        })

    def acquire(self) -> None:
        started = time.monotonic()
        try:
            self._etag = put_object(self.path, [self._record()], create=True)
        except ObjectExistsError:
            self._take_over()
        self._valid_until = started + self.seconds
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease {self.path}", daemon=True)
        self._thread.start()

    def _take_over(self) -> None:
        found = get_object(self.path)
        if found is None:  # released between our create and our read: try once more
            self._etag = put_object(self.path, [self._record()], create=True)
            return
        data, etag = found
        holder = _holder(data)
        if holder is not None and not _gone(holder):
            left = holder["expires"] - time.time()
            run = f"run {holder.get('run_id')!r}, " if holder.get("run_id") else ""
            raise LeaseHeldError(holder, left,
                f"{self.path.parent} is being written by another writer ({run}host {holder.get('host')!r}, "
                f"pid {holder.get('pid')}); one writer per run. Its lease runs {left:.0f} s more: if that "
                "writer is gone, try again after that")
        try:
            self._etag = put_object(self.path, [self._record()], if_match=etag)
        except ObjectChangedError:
            raise CheckpointError(
                f"{self.path.parent}: another writer took over the expired lease at the same moment; "
                "one writer per run") from None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3):
            started = time.monotonic()
            try:
                self._etag = put_object(self.path, [self._record()], if_match=self._etag)
                self._valid_until = started + self.seconds
            except ObjectChangedError:
                self._lost = "another writer took over its lease"
                return
            except CheckpointError:
                continue  # the store is unreachable: the lease lapses unless a renewal gets through

    def check(self) -> None:
        """Refuse to commit when the lease may no longer be ours."""
        if self._lost is not None:
            raise CheckpointError(f"{self.path.parent}: this writer no longer owns the run: {self._lost}")
        if time.monotonic() >= self._valid_until:
            raise CheckpointError(
                f"{self.path.parent}: this writer's lease expired (it could not be renewed for "
                f"{self.seconds:.0f} s; the store was unreachable), so another writer may own the run now")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # a renewal in flight ends within the client's retry bound; never wait past it
            self._thread.join(timeout=60)
            self._thread = None
        if self._lost is not None:
            return
        try:
            found = get_object(self.path)
            if found is not None and (_holder(found[0]) or {}).get("owner") == self.owner:
                self.path.delete()
        except CheckpointError:
            pass  # unreachable: the lease expires by itself


def _holder(data: bytes) -> dict | None:
    """A lease record, or None when it does not read as one (then it is taken over)."""
    try:
        record = msgpack.unpackb(data)
    except Exception:
        return None
    if type(record) is not dict or not isinstance(record.get("expires"), (int, float)):
        return None
    return record


def _gone(holder: dict) -> bool:
    """Whether a lease's writer is certainly gone: expired, or a process of this host that
    no longer exists (so a crashed local writer does not block the next run for a term)."""
    if holder["expires"] < time.time():
        return True
    if holder.get("host") == socket.gethostname() and type(holder.get("pid")) is int and holder["pid"] > 0:
        try:
            os.kill(holder["pid"], 0)
        except OSError as error:
            return error.errno == errno.ESRCH
    return False


class ObjectCheckpointStore(CheckpointStore):
    """:class:`CheckpointStore` for a run on object storage (``CheckpointStore(url, ...)``
    returns one)."""

    def __init__(self, root: str | ObjectPath, *, run_id: str, retention: Retention | None = None,
                 lease_seconds: float = LEASE_SECONDS):
        if type(run_id) is not str or not run_id:
            raise ValueError(f"run_id must be a non-empty str; got {run_id!r}")
        if retention is not None and not isinstance(retention, Retention):
            raise TypeError(f"retention must be a Retention; got {type(retention).__name__}")
        if isinstance(lease_seconds, bool) or not isinstance(lease_seconds, (int, float)) or not lease_seconds >= 1:
            raise ValueError(f"lease_seconds must be a number >= 1; got {lease_seconds!r}")
        self.root = location(root)
        self.run_id = run_id
        self.retention = retention
        self._pending: set[str] = set()
        self._lock = -1
        self._lease: Lease | None = Lease(self.root / LEASE, run_id, float(lease_seconds))
        self._lease.acquire()
        self._lock = 0
        try:
            self.cleanup()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._lease is not None:
            self._lease.release()
            self._lease = None
        self._lock = -1

    def cleanup(self) -> list[str]:
        """Remove every object under a ``step-<k>/`` prefix that its manifest does not name
        (this store's own pending attempts excepted); returns the prefixes removed."""
        self._check_open()
        objects = self.root.walk()
        by_step: dict[str, list[str]] = {}
        for key in objects:
            top, _, rest = key.partition("/")
            if rest and STEP_DIR.fullmatch(top):
                by_step.setdefault(top, []).append(rest)
        removed = []
        for step_name, keys in sorted(by_step.items()):
            directory = self.root / step_name
            named = set()
            if MANIFEST in keys:
                try:
                    named = set(RunCheckpoint(directory).shard_files())
                except CorruptCheckpointError:
                    continue  # damaged: newest_intact reports it, set_aside moves it; never removed
                named.add(MANIFEST)
            doomed = [key for key in keys if key not in named
                      and str(directory / key.partition("/")[0]) not in self._pending]
            if doomed:
                directory.delete(doomed)
                removed.extend(sorted({f"{step_name}/{key.partition('/')[0]}" for key in doomed}))
        return removed

    def begin(self, step: int, layout: ShardLayout) -> PendingCheckpoint:
        self._check_begin(step, layout)
        # nothing to create: an attempt exists once its first shard file is written
        directory = step_directory(self.root, step) / f"attempt-{secrets.token_hex(6)}"
        self._pending.add(str(directory))
        return PendingCheckpoint(str(directory), self.run_id, step, layout)

    def abort(self, pending: PendingCheckpoint) -> None:
        self._own(pending)
        self._pending.discard(pending.directory)
        directory = location(pending.directory)
        directory.delete(list(directory.walk()))

    def commit(self, pending: PendingCheckpoint, *, param_groups: list[dict] | None = None,
               extra: Any = None, metrics: dict | None = None) -> ObjectPath:
        self._own(pending)
        attempt = location(pending.directory)
        if not ATTEMPT.fullmatch(attempt.name):
            raise CheckpointError(f"{pending!r} is not a pending checkpoint of this store")
        final = step_directory(self.root, pending.step)
        if (final / MANIFEST).is_file():
            raise CheckpointError(f"step {pending.step} is already committed in {self.root}")
        num_shards = pending.layout.num_shards
        manifest = build_manifest(
            pending, param_groups, metrics, extra,
            lambda shard: (f"{attempt.name}/{shard_file_name(shard, num_shards)}", pending.shard_path(shard)))
        self._lease.check()
        encoder = Encoder()
        tree = encoder.encode(manifest)
        try:
            write_file(final / MANIFEST, tree, encoder.tensors, create=True)
        except ObjectExistsError:
            self.abort(pending)
            raise CheckpointError(
                f"step {pending.step} of {self.root} was committed meanwhile by another writer; "
                "this writer's attempt was discarded (one writer per run)") from None
        self._pending.discard(pending.directory)
        self.prune()
        return final

    def set_aside(self, step: int, reason: str) -> ObjectPath:
        """As on disk, by copying: every object of ``step-<k>/`` goes to
        ``step-<k>.damaged-<token>/`` with a ``set-aside-reason.txt``, then the originals are
        deleted, manifest first (so a cut-short set-aside leaves a leftover, never a step
        that is half there)."""
        self._check_open()
        _check_step(step)
        if type(reason) is not str or not reason.strip():
            raise ValueError(f"reason must be a non-empty str; got {reason!r}")
        directory = step_directory(self.root, step)
        objects = directory.walk()
        if not objects:
            raise CheckpointError(f"cannot set aside step {step}: {directory} does not exist")
        aside = directory.with_name(f"{directory.name}.damaged-{secrets.token_hex(6)}")
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        put_object(aside / SET_ASIDE_NOTE, [f"{directory.name} set aside at {when}: {reason}\n".encode()])
        for key in objects:
            copy_object(directory / key, aside / key)
        if MANIFEST in objects:
            directory.delete([MANIFEST])
        directory.delete([key for key in objects if key != MANIFEST])
        return aside

    def _delete_step(self, step: int) -> None:
        """Retention's delete: the manifest first (the step is no longer committed), then its
        shard files (a cut delete leaves a leftover the next writer removes)."""
        directory = step_directory(self.root, step)
        directory.delete([MANIFEST])
        directory.delete(list(directory.walk()))
