"""L-BFGS across shards: the driver's vectors live in the shard actors.

:class:`~shardstep.workers.optim.algorithms.lbfgs.LBFGSDriver` runs its scalar logic (step loop,
termination tests, strong-Wolfe line search, the two-loop recursion on Gram coefficients)
here in the coordinator; every vector (parameters, gradient, direction, the ``(s, y)``
history) stays split by the shards, each holding its slice of every vector in a
:class:`~shardstep.workers.optim.algorithms.lbfgs.LocalSlices`. Elementwise operations are sent to
every shard without waiting (calls to one actor run in order); a reduction waits once for
one partial per shard and the driver adds them in shard order. The vector-free recursion
needs ONE batched Gram reduction per iteration whatever the history size, so the number of
round trips per iteration is a constant (counted in :attr:`ShardedSpace.round_trips`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from shardstep.workers.optim.algorithms.lbfgs import Name, VectorSpace


class ShardedSpace(VectorSpace):
    """A :class:`VectorSpace` whose slices are the shards' (one slice per shard).

    ``call(shard_index, method, *args)`` submits ``ShardActor.lbfgs(method, *args)`` and
    returns a future; ``wait(futures)`` returns their values. Fire-and-forget futures are
    kept in :attr:`outstanding` so the coordinator surfaces their errors at its next wait.
    """

    def __init__(self, num_shards: int, dtype: np.dtype, call: Callable[..., Any],
                 wait: Callable[[list], list]):
        self.dtype = np.dtype(dtype)
        self.num_shards = num_shards
        self._call = call
        self._wait = wait
        self.outstanding: list[Any] = []
        self.round_trips = 0
        self._history = 0
        self._temps = 0

    def _broadcast(self, method: str, *args: Any) -> None:
        self.outstanding.extend(self._call(s, method, *args) for s in range(self.num_shards))

    def _reduce(self, method: str, *args: Any) -> list:
        futures = [self._call(s, method, *args) for s in range(self.num_shards)]
        values = self._wait(self.outstanding + futures)
        self.outstanding = []
        self.round_trips += 1
        return values[-self.num_shards:]

    # -- history ---------------------------------------------------------------------------
    def history_len(self) -> int:
        return self._history

    def restore_history(self, length: int) -> None:
        """After the shards loaded ``length`` history pairs from a checkpoint."""
        self._history = length

    def push_history(self, s: Name, y: Name) -> None:
        self._broadcast("push_history", s, y)
        self._history += 1

    def pop_history(self) -> None:
        self._broadcast("pop_history")
        self._history -= 1

    def clear_history(self) -> None:
        self._broadcast("clear_history")
        self._history = 0

    # -- temporaries: every shard numbers them alike ---------------------------------------------
    def new_temp(self) -> Name:
        self._broadcast("new_temp")
        self._temps += 1
        return f"tmp{self._temps}"

    def release_temps(self, keep: Sequence[Name] = ()) -> None:
        self._broadcast("release_temps", tuple(keep))

    # -- parameters and elementwise operations ---------------------------------------------------
    def snapshot_params(self, dst: Name) -> None:
        self._broadcast("snapshot_params", dst)

    def write_params(self, src: Name) -> None:
        self._broadcast("write_params", src)

    def set_params_from(self, x0: Name, t, d: Name) -> None:
        self._broadcast("set_params_from", x0, t, d)

    def add_to_params(self, t, d: Name) -> None:
        self._broadcast("add_to_params", t, d)

    def gather_grad(self, dst: Name) -> None:
        self._broadcast("gather_grad", dst)

    def copy(self, dst: Name, src: Name) -> None:
        self._broadcast("copy", dst, src)

    def move(self, dst: Name, src: Name) -> None:
        self._broadcast("move", dst, src)

    def sub(self, dst: Name, a: Name, b: Name) -> None:
        self._broadcast("sub", dst, a, b)

    def scale(self, dst: Name, src: Name, alpha) -> None:
        self._broadcast("scale", dst, src, alpha)

    def combine(self, dst: Name, names: Sequence[Name], coeffs: np.ndarray) -> None:
        self._broadcast("combine", dst, list(names), np.asarray(coeffs))

    # -- reductions: one partial per shard, in shard order ----------------------------------------
    def partial_gram(self, rows: Sequence[Name], cols: Sequence[Name]) -> list[np.ndarray]:
        return [part for parts in self._reduce("partial_gram", list(rows), list(cols)) for part in parts]

    def partial_abs_max(self, name: Name) -> list:
        return [part for parts in self._reduce("partial_abs_max", name) for part in parts]

    def partial_abs_sum(self, name: Name) -> list:
        return [part for parts in self._reduce("partial_abs_sum", name) for part in parts]

    # -- whole vectors (state_dict export) ---------------------------------------------------------
    def export(self, name: Name) -> np.ndarray:
        return np.concatenate(self._reduce("export", name))

    def load(self, name: Name, value: np.ndarray) -> None:
        raise NotImplementedError("sharded LBFGS state is loaded by each shard from its checkpoint slice")
