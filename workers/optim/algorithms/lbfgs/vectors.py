"""Where LBFGS's vectors live: the :class:`VectorSpace` interface the driver calls (named
vectors, slice-local operations, reductions returning one partial per slice) and
:class:`LocalSlices`, its implementation over slices held in this process.

Kept apart from the driver: a sharded run implements the same interface over its shards
(``shardstep.service.sharded_lbfgs``), and each shard actor serves it with a
:class:`LocalSlices` of its own slices, neither of them with any of the driver's logic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

from shardstep.workers.optim.algorithms.lbfgs.kernels import (
    _abs_max_kernel,
    _abs_sum_kernel,
    _axpy_kernel,
    _combine_kernel,
    _gram_kernel,
    _n_tasks,
)
from shardstep.workers.optim.kernels import flat
from shardstep.workers.optim.parameter import Parameter, RowSparseGrad

Name = Any  # a str ("g", "d", ...) or ("s", i) / ("y", i) for the i-th history pair, oldest first


class VectorSpace(ABC):
    """The vectors of one L-BFGS run, each split into the same slices.

    Vectors are referred to by name: ``"g"`` (gradient), ``"prev_g"``, ``"d"`` (direction),
    ``"x0"`` (a parameter snapshot), ``"s"`` / ``"y"`` (the newest pair before it enters the
    history), temporaries from :meth:`new_temp`, and ``("s", i)`` / ``("y", i)`` for the i-th
    history pair (oldest first). Writing to a name creates it.

    Every operation is slice-local: elementwise ones act on each slice; reductions return one
    partial per slice, which :func:`combine_sum` / :func:`combine_max` turn into the value.
    A sharded implementation provides the same methods over its actors' slices.
    """

    dtype: np.dtype

    # -- history of (s, y) pairs ----------------------------------------------------------
    @abstractmethod
    def history_len(self) -> int: ...

    @abstractmethod
    def push_history(self, s: Name, y: Name) -> None:
        """Make the vectors named ``s`` and ``y`` the newest pair (the names are consumed)."""

    @abstractmethod
    def pop_history(self) -> None:
        """Drop the oldest pair."""

    @abstractmethod
    def clear_history(self) -> None: ...

    # -- temporaries (line-search gradients) -----------------------------------------------
    @abstractmethod
    def new_temp(self) -> Name: ...

    @abstractmethod
    def release_temps(self, keep: Sequence[Name] = ()) -> None:
        """Free every temporary not named in ``keep``."""

    # -- the model's parameters and gradient ------------------------------------------------
    @abstractmethod
    def snapshot_params(self, dst: Name) -> None:
        """dst = current parameters."""

    @abstractmethod
    def write_params(self, src: Name) -> None:
        """parameters = src."""

    @abstractmethod
    def set_params_from(self, x0: Name, t, d: Name) -> None:
        """parameters = x0 + t d."""

    @abstractmethod
    def add_to_params(self, t, d: Name) -> None:
        """parameters += t d."""

    @abstractmethod
    def gather_grad(self, dst: Name) -> None:
        """dst = the gradient the closure left on the parameters (zeros where none)."""

    # -- elementwise ----------------------------------------------------------------------
    @abstractmethod
    def copy(self, dst: Name, src: Name) -> None: ...

    @abstractmethod
    def move(self, dst: Name, src: Name) -> None:
        """dst takes src's contents; src is consumed (an implementation may just rename)."""

    @abstractmethod
    def sub(self, dst: Name, a: Name, b: Name) -> None:
        """dst = a - b."""

    @abstractmethod
    def scale(self, dst: Name, src: Name, alpha) -> None:
        """dst = alpha * src (alpha rounded to the dtype first, as torch's mul)."""

    @abstractmethod
    def combine(self, dst: Name, names: Sequence[Name], coeffs: np.ndarray) -> None:
        """dst = sum_j coeffs[j] * names[j] (dst not among names)."""

    # -- reductions: one partial per slice -------------------------------------------------
    @abstractmethod
    def partial_gram(self, rows: Sequence[Name], cols: Sequence[Name]) -> list[np.ndarray]:
        """Per slice, the float64 (len(rows), len(cols)) matrix of partial dot products."""

    @abstractmethod
    def partial_abs_max(self, name: Name) -> list:
        """Per slice, max |x| over the slice (in the dtype)."""

    @abstractmethod
    def partial_abs_sum(self, name: Name) -> list:
        """Per slice, sum |x| over the slice (float64)."""

    # -- whole vectors, for state_dicts ----------------------------------------------------
    @abstractmethod
    def export(self, name: Name) -> np.ndarray:
        """The whole vector, slices concatenated in order."""

    @abstractmethod
    def load(self, name: Name, value: np.ndarray) -> None:
        """Set a vector from its whole (concatenated) value."""


class LocalSlices(VectorSpace):
    """Vectors held in this process, split into slices of the parameters.

    ``slices`` lists, per slice, the pieces ``(parameter, start, stop)`` of the flattened
    parameters it covers; the concatenation of all slices' pieces in order is the flat vector
    of the state_dict. Each slice stores its vectors as rows of one 2-D array.
    """

    def __init__(self, slices: Sequence[Sequence[tuple[Parameter, int, int]]], dtype):
        self.dtype = np.dtype(dtype)
        self._pieces = [[(p, int(lo), int(hi)) for p, lo, hi in s] for s in slices]
        if not self._pieces:
            raise ValueError("LocalSlices needs at least one slice")
        self._sizes = [sum(hi - lo for _, lo, hi in s) for s in self._pieces]
        self._tasks = [_n_tasks(n) for n in self._sizes]
        self._bufs = [np.empty((0, n), self.dtype) for n in self._sizes]
        self._free: list[int] = []
        self._rows: dict[str, int] = {}
        self._hist_s: list[int] = []
        self._hist_y: list[int] = []
        self._temps: set[str] = set()
        self._temp_count = 0

    @property
    def size(self) -> int:
        return sum(self._sizes)

    # -- rows -----------------------------------------------------------------------------
    def _grow(self) -> None:
        cap = self._bufs[0].shape[0]
        new_cap = max(8, 2 * cap)
        for k, buf in enumerate(self._bufs):
            grown = np.empty((new_cap, buf.shape[1]), self.dtype)
            grown[:cap] = buf
            self._bufs[k] = grown
        self._free.extend(range(new_cap - 1, cap - 1, -1))

    def __contains__(self, name: object) -> bool:
        """Whether a vector ``name`` (``"d"``, ``"prev_g"``, ...) is held."""
        return name in self._rows

    def _row(self, name: Name) -> int:
        if isinstance(name, tuple):
            kind, i = name
            rows = {"s": self._hist_s, "y": self._hist_y}[kind]
            return rows[i]
        try:
            return self._rows[name]
        except KeyError:
            raise KeyError(f"no vector named {name!r}") from None

    def _target(self, name: Name) -> int:
        if isinstance(name, tuple):
            return self._row(name)
        if name not in self._rows:
            if not self._free:
                self._grow()
            self._rows[name] = self._free.pop()
        return self._rows[name]

    def _drop(self, name: str) -> None:
        self._free.append(self._rows.pop(name))
        self._temps.discard(name)

    # -- history --------------------------------------------------------------------------
    def history_len(self) -> int:
        return len(self._hist_s)

    def push_history(self, s, y) -> None:
        self._hist_s.append(self._rows.pop(s))
        self._hist_y.append(self._rows.pop(y))

    def pop_history(self) -> None:
        self._free.append(self._hist_s.pop(0))
        self._free.append(self._hist_y.pop(0))

    def clear_history(self) -> None:
        self._free.extend(self._hist_s + self._hist_y)
        self._hist_s.clear()
        self._hist_y.clear()

    def new_temp(self) -> str:
        self._temp_count += 1
        name = f"tmp{self._temp_count}"
        self._target(name)
        self._temps.add(name)
        return name

    def release_temps(self, keep=()) -> None:
        for name in list(self._temps):
            if name not in keep:
                self._drop(name)

    # -- parameters -----------------------------------------------------------------------
    def _segments(self, k: int):
        """(parameter, start, stop in the parameter, start, stop in the slice) per piece of slice k."""
        offset = 0
        for p, lo, hi in self._pieces[k]:
            yield p, lo, hi, offset, offset + hi - lo
            offset += hi - lo

    def snapshot_params(self, dst) -> None:
        row = self._target(dst)
        for k, buf in enumerate(self._bufs):
            for p, lo, hi, a, b in self._segments(k):
                buf[row, a:b] = flat(p.data)[lo:hi]

    def write_params(self, src) -> None:
        row = self._row(src)
        for k, buf in enumerate(self._bufs):
            for p, lo, hi, a, b in self._segments(k):
                flat(p.data)[lo:hi] = buf[row, a:b]

    def set_params_from(self, x0, t, d) -> None:
        rx, rd = self._row(x0), self._row(d)
        t = self.dtype.type(t)
        for k, buf in enumerate(self._bufs):
            for p, lo, hi, a, b in self._segments(k):
                _axpy_kernel(flat(p.data)[lo:hi], buf[rx, a:b], t, buf[rd, a:b])

    def add_to_params(self, t, d) -> None:
        rd = self._row(d)
        t = self.dtype.type(t)
        for k, buf in enumerate(self._bufs):
            for p, lo, hi, a, b in self._segments(k):
                view = flat(p.data)[lo:hi]
                _axpy_kernel(view, view, t, buf[rd, a:b])

    def gather_grad(self, dst) -> None:
        row = self._target(dst)
        for k, buf in enumerate(self._bufs):
            for p, lo, hi, a, b in self._segments(k):
                grad = p.grad
                if grad is None:
                    buf[row, a:b] = 0
                elif isinstance(grad, RowSparseGrad):
                    label = repr(p.name) if p.name else f"of shape {p.shape}"
                    raise RuntimeError(
                        f"LBFGS does not support sparse gradients (parameter {label}); "
                        "give it a dense gradient (grad.to_dense())"
                    )
                else:
                    buf[row, a:b] = flat(grad)[lo:hi]

    # -- elementwise ----------------------------------------------------------------------
    def copy(self, dst, src) -> None:
        rs = self._row(src)
        rd = self._target(dst)
        if rd != rs:
            for buf in self._bufs:
                buf[rd] = buf[rs]

    def move(self, dst, src) -> None:
        if dst == src:
            return
        if dst in self._rows:
            self._drop(dst)
        self._rows[dst] = self._rows.pop(src)
        self._temps.discard(src)

    def sub(self, dst, a, b) -> None:
        ra, rb = self._row(a), self._row(b)
        rd = self._target(dst)
        for buf in self._bufs:
            np.subtract(buf[ra], buf[rb], out=buf[rd])

    def scale(self, dst, src, alpha) -> None:
        rs = self._row(src)
        rd = self._target(dst)
        alpha = self.dtype.type(alpha)
        for buf in self._bufs:
            np.multiply(buf[rs], alpha, out=buf[rd])

    def combine(self, dst, names, coeffs) -> None:
        rows = np.array([self._row(n) for n in names], dtype=np.int64)
        rd = self._target(dst)
        if rd in rows:
            raise ValueError(f"combine: destination {dst!r} is one of its sources")
        coeffs = np.ascontiguousarray(coeffs, dtype=np.float64)
        for buf in self._bufs:
            _combine_kernel(buf, rows, coeffs, buf[rd])

    # -- reductions -----------------------------------------------------------------------
    def partial_gram(self, rows, cols) -> list[np.ndarray]:
        r = np.array([self._row(n) for n in rows], dtype=np.int64)
        c = np.array([self._row(n) for n in cols], dtype=np.int64)
        partials = []
        for buf, tasks in zip(self._bufs, self._tasks):
            out = np.zeros((r.size, c.size))
            _gram_kernel(buf, r, c, tasks, out)
            partials.append(out)
        return partials

    def partial_abs_max(self, name) -> list:
        row = self._row(name)
        return [_abs_max_kernel(buf[row], tasks) for buf, tasks in zip(self._bufs, self._tasks)]

    def partial_abs_sum(self, name) -> list:
        row = self._row(name)
        return [_abs_sum_kernel(buf[row], tasks) for buf, tasks in zip(self._bufs, self._tasks)]

    # -- whole vectors --------------------------------------------------------------------
    def export(self, name) -> np.ndarray:
        row = self._row(name)
        if len(self._bufs) == 1:
            return self._bufs[0][row]  # a view, as torch's state_dict holds references
        return np.concatenate([buf[row] for buf in self._bufs])

    def load(self, name, value) -> None:
        value = np.asarray(value)
        if value.shape != (self.size,):
            raise ValueError(f"vector {name!r} must have shape ({self.size},); got {value.shape}")
        row = self._target(name)
        offset = 0
        for buf, n in zip(self._bufs, self._sizes):
            buf[row] = value[offset:offset + n]
            offset += n
