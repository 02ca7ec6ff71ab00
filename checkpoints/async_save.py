"""Asynchronous saves: snapshot now, write in a background thread, report errors later.

A call to :meth:`AsyncSaver.dump` or :meth:`AsyncSaver.write_shard` checks the value and
copies every array into staging buffers before it returns, so in-place updates made after
the call never reach the file; the file is then written (atomically, as by the synchronous
functions) in one background thread.

One save at a time: a call made while the previous save is still writing first waits for
it. Queueing instead would hold one more full copy of the state per queued save and let
checkpoints complete out of the order they were requested; waiting keeps memory at one
staging copy, keeps commits in step order, and turns a disk slower than the save interval
into visible back-pressure instead of growing memory.

Errors are never dropped: a failed background write raises (as a CheckpointError naming
the file, chained to the cause) from the next ``dump``/``write_shard``, ``wait()`` or
``close()``; the new save is then not started. A saver that is never closed reports an
unreported failure on stderr when the interpreter exits, after its thread finished (the
thread is not a daemon, so exiting never cuts a save short).

The staging buffers are kept for the next save (same shapes and dtypes reuse them, so a
steady training loop copies into memory that is already mapped); ``close()`` frees them.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from shardstep.checkpoints.errors import CheckpointError
from shardstep.checkpoints.format import DTYPES, Encoder, write_file
from shardstep.checkpoints.run import PendingCheckpoint, encode_shard


class _Outcome:
    """What the background thread reports; shared with the exit hook."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.target = ""


def _report_at_exit(outcome: _Outcome) -> None:
    if outcome.thread is not None:
        outcome.thread.join()
    if outcome.error is not None:
        print(f"checkpoints: the asynchronous save of {outcome.target} failed and was never "
              f"reported (call AsyncSaver.close()): {outcome.error!r}", file=sys.stderr)


class AsyncSaver:
    """Writes one checkpoint at a time in a background thread (see the module docstring)."""

    def __init__(self) -> None:
        self._outcome = _Outcome()
        self._idle: dict[tuple, list[np.ndarray]] = {}
        self._staged: list[np.ndarray] = []
        self._closed = False
        self._finalizer = weakref.finalize(self, _report_at_exit, self._outcome)

    # -- public -----------------------------------------------------------------------------

    def dump(self, obj: Any, path: str | os.PathLike) -> None:
        """Like :func:`shardstep.checkpoints.dump`, in the background."""
        self._before_save()
        encoder = Encoder(self._stage)
        tree = encoder.encode(obj)
        self._start(str(path), lambda: write_file(path, tree, encoder.tensors))

    def write_shard(self, pending: PendingCheckpoint, shard: int, params: Mapping[str, np.ndarray],
                    state: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Like :func:`shardstep.checkpoints.write_shard`, in the background; the coordinator commits
        after this shard's ``wait()`` returned."""
        self._before_save()
        encoder, tree = encode_shard(pending, shard, params, state, self._stage)
        path = pending.shard_path(shard)
        self._start(str(path), lambda: write_file(path, tree, encoder.tensors))

    @property
    def busy(self) -> bool:
        """Whether a save is still writing."""
        thread = self._outcome.thread
        return thread is not None and thread.is_alive()

    def wait(self) -> None:
        """Block until the current save is on disk; raise if it failed."""
        outcome = self._outcome
        if outcome.thread is not None:
            outcome.thread.join()
            outcome.thread = None
        if self._staged:
            # the finished save's staging buffers become the next save's (shapes that no
            # longer occur are dropped with the old pool)
            self._idle = {}
            for array in self._staged:
                self._idle.setdefault((array.dtype.str, array.shape), []).append(array)
            self._staged = []
        if outcome.error is not None:
            error, outcome.error = outcome.error, None
            raise CheckpointError(f"the asynchronous save of {outcome.target} failed: {error}") from error

    def close(self) -> None:
        """Wait for the current save (raising its error), then free the staging buffers."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._idle = {}

    def __enter__(self) -> AsyncSaver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _before_save(self) -> None:
        if self._closed:
            raise CheckpointError("this AsyncSaver is closed")
        self.wait()

    def _start(self, target: str, write: Callable[[], Any]) -> None:
        outcome = self._outcome

        def run() -> None:
            try:
                write()
            except BaseException as error:  # kept for the caller, whatever it is
                outcome.error = error

        outcome.target = target
        outcome.thread = threading.Thread(target=run, name=f"checkpoint-save {target}")
        outcome.thread.start()

    def _stage(self, array: np.ndarray) -> np.ndarray:
        """A C-contiguous little-endian copy of ``array``, in a reused buffer when one fits."""
        dtype = DTYPES[array.dtype.name]
        spare = self._idle.get((dtype.str, array.shape))
        copy = spare.pop() if spare else np.empty(array.shape, dtype)
        # one pass in this thread: splitting the copy over threads measured slower on a
        # shared 2-core machine (docs/benchmarks.md), and the copy is memory-bound anyway
        np.copyto(copy, array)
        self._staged.append(copy)
        return copy
