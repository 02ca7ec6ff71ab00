"""Training rows read with Ray Data and served by row servers: ``[data] ray_data = true``.

The coordinator's process reads the files with ``ray.data.read_parquet`` or ``read_csv``
(order preserved) into Arrow blocks in the cluster's object store. Row-server actors each
take a contiguous run of the blocks, check them and keep them as arrays: every server holds
its part, and no process holds the whole. A gradient worker asks the servers only for the
rows of its own shard of each global batch, by position, so the global batch order is the
sharding rule's permutation of (seed, epoch), the same as for the same data in one file. It
asks for the rows of its next ``PREFETCH_BATCHES`` batches at once, one request per server,
a step before it needs the first of them (:meth:`RemoteRows.prefetch`): the transfer overlaps
the steps, and Ray's cost per call falls on one step in many.

    served = serve_rows(task, locations, row_servers=2)   # in the coordinator, Ray up
    rows = served.client                                   # pickles into the task
    inputs, targets = rows.fetch(np.array([5, 17, 2]))     # global row ids, any order

A server that dies (its node lost) is restarted by Ray and loads its part again from the
blocks, which stay referenced by the coordinator's process (:class:`ServedRows`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shardstep.workers.tasks.data_files import DataError, select_columns, table_columns

# Ray restarts a lost server this many times (each restart reloads its part)
SERVER_RESTARTS = 8
# batches a gradient worker asks for in one request per server
PREFETCH_BATCHES = 16


class RowServer:
    """One contiguous part of the rows (a run of Arrow blocks), checked and converted by the
    task's own rules, served by position. Runs as a Ray actor.

    Its constructor takes only the task (small, kept inline by Ray), so Ray can restart it
    after its node is lost; the blocks come with :meth:`load`, which its clients call again
    when :meth:`rows` says the part is not loaded (a restarted server)."""

    def __init__(self, task: Any):
        self.task = task
        self.inputs: np.ndarray | None = None
        self.targets: np.ndarray | None = None
        self.served = 0

    def load(self, blocks: Sequence[tuple[str, int, Any, int, int]]) -> int:
        """Load the part (once per process) and return its row count; a bad cell is a
        DataError naming the source, the column and the row within that source.

        ``blocks``: (key, the number in its source of the first row taken, ObjectRef of a
        pyarrow Table, the first row taken, the row after the last taken) in order (nested
        refs: Ray leaves them to this call)."""
        if self.inputs is not None:
            return int(self.inputs.shape[0])
        import ray

        inputs, targets = [], []
        task = self.task
        tables = ray.get([ref for _, _, ref, _, _ in blocks])
        for (key, row, _, start, stop), table in zip(blocks, tables):
            if stop == start:
                continue
            location = getattr(task, key.partition(".")[2])
            where = f"{key} ({location}, read with Ray Data)"
            header, columns = table_columns(table.slice(start, stop - start), where, first_row=row)
            part = select_columns(header, columns, features=task.features, label=task.label, where=where,
                                  first_row=row)
            inputs.append(task._inputs(part.features, key))
            targets.append(task._targets(part.labels, task.classes, key))
        if not inputs:
            width = task.model.in_features
            self.inputs = np.zeros((0, width), task.dtype)
            self.targets = np.zeros(0, np.int64)
        else:
            self.inputs, self.targets = np.concatenate(inputs), np.concatenate(targets)
        return int(self.inputs.shape[0])

    def rows(self, local: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The rows at ``local`` positions of this part, in that order; None when the part
        is not loaded (this server was restarted)."""
        if self.inputs is None:
            return None
        self.served += int(local.size)
        return self.inputs[local], self.targets[local]

    def counts(self) -> tuple[int, int]:
        """(rows held, rows served so far): what a test or an operator checks."""
        return (0 if self.inputs is None else int(self.inputs.shape[0])), self.served


@dataclass
class RemoteRows:
    """The client side: the servers' handles, their parts' blocks and where each part
    starts. Pickles (handles, block refs and offsets) into the task, so every gradient
    worker can fetch, and load a restarted server again."""

    servers: list[Any]
    parts: list[list[tuple[str, int, Any, int, int]]]
    starts: np.ndarray  # global id of each server's first row, ascending; then the total
    # prefetched batches: their ids' bytes -> (the window they were asked for in, where their
    # rows start in it, how many); a window is one request per server for several batches
    _pending: dict[bytes, tuple[dict[str, Any], int, int]] = field(default_factory=dict, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"servers": self.servers, "parts": self.parts, "starts": self.starts, "_pending": {}}

    @property
    def total(self) -> int:
        return int(self.starts[-1])

    def _requests(self, ids: np.ndarray) -> list[tuple[int, np.ndarray, Any]]:
        owner = np.searchsorted(self.starts, ids, side="right") - 1
        requests = []
        for server in np.unique(owner):
            where = np.flatnonzero(owner == server)
            local = ids[where] - self.starts[server]
            requests.append((int(server), where, local, self.servers[server].rows.remote(local)))
        return requests

    def prefetch(self, batches: Sequence[np.ndarray]) -> None:
        """Ask now for the rows of several coming batches (ids each), in one request per
        server; a :meth:`fetch` of one of them takes its rows from what arrived. One request
        per server for many batches keeps Ray's cost per call off most steps."""
        batches = [np.asarray(ids, np.int64) for ids in batches if ids.tobytes() not in self._pending]
        if not batches:
            return
        window: dict[str, Any] = {"requests": self._requests(np.concatenate(batches)), "rows": None,
                                  "left": len(batches)}
        offset = 0
        for ids in batches:
            self._pending[ids.tobytes()] = (window, offset, ids.size)
            offset += ids.size

    def fetch(self, ids: np.ndarray, width: int, dtype: Any, target_shape: tuple[int, ...],
              target_dtype: Any) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(ids, np.int64)
        shape = ((width,), target_shape, dtype, target_dtype)
        found = self._pending.pop(ids.tobytes(), None)
        if found is None:
            return self._gathered(self._requests(ids), ids.size, shape)
        window, offset, count = found
        if window["rows"] is None:
            total = sum(where.size for _, where, _, _ in window["requests"])
            window["rows"] = self._gathered(window["requests"], total, shape)
        window["left"] -= 1
        inputs, targets = window["rows"]
        if window["left"] == 0:
            window["rows"] = None  # every batch of the window taken: let go of its rows
        return inputs[offset:offset + count], targets[offset:offset + count]

    def _gathered(self, requests: list[tuple[int, np.ndarray, np.ndarray, Any]], count: int,
                  shape: tuple) -> tuple[np.ndarray, np.ndarray]:
        import ray

        (width, target_shape, dtype, target_dtype) = shape
        inputs = np.empty((count, *width), dtype)
        targets = np.empty((count, *target_shape), target_dtype)
        results = ray.get([request[3] for request in requests])
        for (server, where, local, _), result in zip(requests, results):
            if result is None:  # a restarted server: load its part again, then ask again
                ray.get(self.servers[server].load.remote(self.parts[server]))
                result = ray.get(self.servers[server].rows.remote(local))
            inputs[where], targets[where] = result
        return inputs, targets


@dataclass
class ServedRows:
    """What the coordinator's process keeps while the run lives: the blocks (so a restarted
    server can load them again) and the client."""

    client: RemoteRows
    sizes: dict[str, int]  # rows per source key ("data.train", "data.validation")
    blocks: list[Any] = field(repr=False)


def read_blocks(location: str, kind: str, key: str) -> list[Any]:
    """Arrow-table refs of a Parquet or CSV file, directory or glob, in order."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its progress reports would fill the run's output
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the rows' order is the files' order
    context.enable_progress_bars = False
    reader = ray.data.read_parquet if kind == "parquet" else ray.data.read_csv
    try:
        return list(reader(location).materialize().to_arrow_refs())
    except Exception as error:  # Ray Data's reading errors come in many types
        message = str(error).strip().splitlines()
        raise DataError(f"{key}: Ray Data cannot read {location}: {message[-1] if message else type(error).__name__}") \
            from error


def serve_rows(task: Any, sources: Sequence[tuple[str, str]], kind: str, row_servers: int) -> ServedRows:
    """Read ``sources`` (``(key, location)``, rows in that order) with Ray Data and start
    ``row_servers`` servers over contiguous runs of the blocks; wait until each has loaded
    and checked its part (its DataError is raised here)."""
    import ray
    from ray.exceptions import RayTaskError

    blocks: list[tuple[str, Any]] = []
    for key, location in sources:
        blocks += [(key, ref) for ref in read_blocks(location, kind, key)]
    # rows per block (a task beside each block reads its length): messages number a bad
    # row within its source, and each source's size is known before any server loads
    counter = ray.remote(num_cpus=0)(_rows_of)
    lengths = ray.get([counter.remote(ref) for _, ref in blocks])
    sizes = {key: 0 for key, _ in sources}
    first_rows = []
    for (key, _), length in zip(blocks, lengths):
        first_rows.append(sizes[key] + 1)
        sizes[key] += length
    for key, location in sources:
        if sizes[key] == 0:
            raise DataError(f"{key} ({location}): Ray Data found no rows")
    # the servers' parts: equal runs of rows (the sharding rule's split), a block cut where a
    # part ends
    total = sum(lengths)
    count = min(row_servers, total)
    block_starts = np.concatenate([[0], np.cumsum(lengths)])
    parts = []
    for index in range(count):
        low, high = total * index // count, total * (index + 1) // count
        part = []
        for position, ((key, ref), first) in enumerate(zip(blocks, first_rows)):
            begin, end = max(low, block_starts[position]), min(high, block_starts[position + 1])
            if begin < end:
                offset = int(begin - block_starts[position])
                part.append((key, first + offset, ref, offset, int(end - block_starts[position])))
        parts.append(part)
    bare = task.without_data()
    actor = ray.remote(num_cpus=0, max_restarts=SERVER_RESTARTS, max_task_retries=SERVER_RESTARTS)(RowServer)
    servers = [actor.options(scheduling_strategy="SPREAD").remote(bare) for _ in range(count)]
    try:
        counts = ray.get([server.load.remote(part) for server, part in zip(servers, parts)])
    except RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, DataError):
            raise DataError(str(cause)) from None
        raise
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ServedRows(RemoteRows(servers, parts, starts), sizes, [ref for _, ref in blocks])


def _rows_of(table: Any) -> int:
    return int(table.num_rows)
