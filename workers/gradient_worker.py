"""The gradient worker: rank ``r`` of ``W`` data-parallel workers.

Each step it gathers the current parameters from the shards (one slice per shard, through
Ray's object store: zero-copy reads of the shards' results), computes the task's summable
``loss_and_grad`` on its deterministic shard of the global batch (the sharding rule of
:mod:`shardstep.workers.tasks.base`) and returns the loss plus its gradient cut into one piece per
shard, so every shard receives only what it owns: a contiguous range of a dense gradient,
or the rows it owns of a row-sparse one (renumbered from the shard's first row).

With the shared-memory transport (:mod:`shardstep.workers.shared_memory`) it reads whole parameters
from the run's parameter region instead (no gathering) and copies its dense gradients into
its own gradient region; only the loss and row-sparse pieces travel with the results.

The same class runs as a Ray actor and as a plain object in the inline backend.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shardstep.checkpoints import ShardLayout
from shardstep.workers.optim import RowSparseGrad
from shardstep.workers.runtime import limit_threads, node_id
from shardstep.workers.shard import unpack
from shardstep.workers.shared_memory import SharedGrad, SharedTransport, whole
from shardstep.workers.tasks.base import Task, accumulated_loss_and_grad, epoch_order, shard_positions


class GradientWorker:
    """Rank ``rank`` of ``world_size``: the task, the data stream, the layout of the shards."""

    def __init__(self, task: Task, rank: int, world_size: int, seed: int, batch_size: int,
                 layout: ShardLayout, threads: int | None = None, frozen: Sequence[str] = (),
                 shared: SharedTransport | None = None, accumulate: int = 1):
        if threads is not None:
            limit_threads(threads)
        self.task = task
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.batch_size = batch_size
        # its shard of each global batch is computed in this many micro-batches
        self.accumulate = accumulate
        self.layout = layout
        # frozen parameters are never updated: their gradients are not sent
        self.frozen = frozenset(frozen)
        self._orders: dict[int, np.ndarray] = {}
        # the batches named to task.prefetch: [from, until) in (epoch, index) order
        self._named_from: tuple[int, int] | None = None
        self._named_until: tuple[int, int] | None = None
        self.shared_params: dict[str, np.ndarray] | None = None
        self.grad_region: dict[str, np.ndarray] | None = None
        if shared is not None:
            self.shared_params = whole(shared.param_arrays(), layout)
            self.grad_region = shared.grad_arrays(rank)

    def ping(self) -> tuple[int, int, str | None]:
        """(rank, process id, Ray node id): proves the actor is up and says where it runs."""
        return self.rank, os.getpid(), node_id()

    def gather(self, packed: Sequence[Mapping[str, np.ndarray] | None]) -> dict[str, np.ndarray]:
        """Whole parameters from the shards' packed slices (shard order), or read-only views
        of the parameter region with shared memory (the shards' results are then None)."""
        if self.shared_params is not None:
            return self.shared_params
        return unpack(self.layout, packed)

    def compute(self, epoch: int, index: int, *slices: Mapping[str, np.ndarray]) -> tuple:
        """Loss and gradient pieces of global batch ``index`` of ``epoch`` at the parameters
        the shards sent: ``(loss, piece_0, ..., piece_{N-1})``."""
        params = self.gather(slices)
        batch = self._batch(epoch, index)
        # a diverging run overflows here; the step's finiteness check names the step and the
        # parameters and applies the job's nonfinite policy, so numpy's own warning would only
        # repeat it without them
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            loss, grads = accumulated_loss_and_grad(self.task, params, batch, self.accumulate)
        # a model with buffers (BatchNorm) reports what its forwards measured with the loss
        statistics = self.task.take_batch_statistics()
        first = (float(loss), statistics) if statistics else float(loss)
        return (first, *self.split(grads))

    def evaluate(self, *slices: Mapping[str, np.ndarray], buffers: Mapping[str, np.ndarray] | None = None
                 ) -> dict[str, float]:
        if buffers:
            self.task.set_buffers(buffers)
        metrics = self.task.evaluate(self.gather(slices))
        if not isinstance(metrics, Mapping):
            raise TypeError(f"{type(self.task).__name__}.evaluate must return a dict of metrics; "
                            f"got {type(metrics).__name__}")
        return {str(key): float(value) for key, value in metrics.items()}

    # -- internals ------------------------------------------------------------------------------

    def _batch(self, epoch: int, index: int):
        if len(self._orders) > 1:  # let go of past epochs' orders
            self._orders = {key: value for key, value in self._orders.items() if key >= epoch}
        batch = self.task.batch_in_order(self.seed, epoch, index, self.batch_size, self.rank, self.world_size,
                                         self._epoch_order(epoch))
        if self.task.prefetches:
            self._prefetch_after(epoch, index)
        return batch

    def _prefetch_after(self, epoch: int, index: int) -> None:
        """Name the coming batches to the task when the next one is not named yet: their rows
        travel while this batch computes (a window of ``task.prefetch_batches`` at a time)."""
        count = self.task.num_batches(self.batch_size)

        def advance(at: tuple[int, int]) -> tuple[int, int]:
            return (at[0], at[1] + 1) if at[1] + 1 < count else (at[0] + 1, 0)

        following = advance((epoch, index))
        if self._named_until is not None and following < self._named_until and following >= self._named_from:
            return
        coming, at = [], following
        for _ in range(self.task.prefetch_batches):
            coming.append((at[0], shard_positions(self._epoch_order(at[0]), at[1], self.batch_size, self.rank,
                                                  self.world_size)))
            at = advance(at)
        self._named_from, self._named_until = following, at
        self.task.prefetch(self.seed, coming)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        # one permutation of the training set per epoch, computed once: the current epoch's
        # and those a prefetch window reaches into (_batch lets go of the past ones)
        if epoch not in self._orders:
            self._orders[epoch] = epoch_order(self.seed, epoch, self.task.train_size)
        return self._orders[epoch]

    def split(self, grads: Any) -> list[dict[str, Any]]:
        """One dict per shard: its range of every gradient."""
        layout = self.layout
        owner = type(self.task).__name__
        names = [spec.name for spec in layout.params]
        if not isinstance(grads, Mapping) or set(grads) != set(names):
            got = sorted(grads) if isinstance(grads, Mapping) else type(grads).__name__
            raise ValueError(f"{owner}.loss_and_grad must return a gradient for every parameter; "
                             f"expected {sorted(names)}, got {got}")
        pieces: list[dict[str, Any]] = [{} for _ in range(layout.num_shards)]
        for spec in layout.params:
            if spec.name in self.frozen:
                continue
            grad = grads[spec.name]
            if isinstance(grad, RowSparseGrad):
                if grad.shape != spec.shape or grad.dtype != np.dtype(spec.dtype):
                    raise ValueError(f"{owner}: sparse gradient {spec.name!r} has shape {grad.shape} and dtype "
                                     f"{grad.dtype}; the parameter has {spec.shape} and {spec.dtype}")
                # rows in shard order, each shard's in their original order (a stable sort)
                order = np.argsort(grad.indices, kind="stable")
                indices, values = grad.indices[order], grad.values[order]
                for shard in range(layout.num_shards):
                    first, stop = layout.row_range(spec.name, shard)
                    lo, hi = np.searchsorted(indices, [first, stop])
                    local = RowSparseGrad(indices[lo:hi] - first, values[lo:hi], (stop - first, *spec.shape[1:]))
                    pieces[shard][spec.name] = local
                continue
            if not isinstance(grad, np.ndarray) or grad.shape != spec.shape or grad.dtype != np.dtype(spec.dtype):
                shape = getattr(grad, "shape", type(grad).__name__)
                raise ValueError(f"{owner}: gradient {spec.name!r} must be an ndarray of shape {spec.shape} and "
                                 f"dtype {spec.dtype}; got {shape} {getattr(grad, 'dtype', '')}")
            if self.grad_region is not None:
                np.copyto(self.grad_region[spec.name].reshape(spec.shape), grad)
                for shard in range(layout.num_shards):
                    pieces[shard][spec.name] = SharedGrad()
                continue
            flat = np.ascontiguousarray(grad).reshape(-1)
            for shard in range(layout.num_shards):
                start, stop = layout.slice(spec.name, shard)
                pieces[shard][spec.name] = flat[start:stop]
        return pieces
