"""L-BFGS (Liu & Nocedal 1989) with torch.optim.LBFGS's step loop and strong-Wolfe line search,
in vector-free form (Chen, Wang & Zhou 2014, "Large-scale L-BFGS using MapReduce", NeurIPS).

One ``step(closure)`` runs up to ``max_iter`` iterations of::

    d = -H g                      H: the L-BFGS inverse-Hessian estimate from the pairs
                                  s_i = t_i d_i (steps) and y_i = g_{i+1} - g_i (gradient changes)
    t = min(1, 1/|g|_1) lr on the very first iteration, lr afterwards (or the strong-Wolfe t)
    x = x + t d

with torch 2.13's termination tests (|g|_inf <= tolerance_grad, g.d > -tolerance_change,
|t d|_inf <= tolerance_change, |f - f_prev| < tolerance_change, max_iter, max_eval).

Vector-free two-loop recursion. Torch computes ``H g`` with the two-loop recursion (Nocedal &
Wright, Algorithm 7.4), which needs 2m dot products one after another, each on a vector the
previous one changed. Every vector that recursion ever forms is a linear combination of the
basis ``b = [s_0..s_{m-1}, y_0..y_{m-1}, g]``, so it can run on coefficient vectors ``c``
(length 2m+1, ``q = sum_j c_j b_j``) given the Gram matrix ``G[i, j] = b_i . b_j``::

    c = -e_g                                   (q = -g)
    for i = m-1 .. 0:   al_i = ro_i (G[s_i] . c);   c[y_i] -= al_i
    c = H_diag c                               (H_diag = s.y / y.y of the newest pair)
    for i = 0 .. m-1:   be_i = ro_i (G[y_i] . c);   c[s_i] += al_i - be_i
    d = sum_j c_j b_j,   g.d = G[g] . c,   ro_i = 1 / (s_i . y_i)

Only G's entries with the newest vectors change per iteration: the dot products of the new s,
the new y and the current g with every basis vector, ONE batched reduction of 3 x (2m+3)
partial dot products; the older entries are kept (and shifted when the oldest pair drops out).
Each dot product and |x|_1 is a sum over elements and |x|_inf a max, so a vector split into
slices (the shards of a sharded run) reduces to per-slice partials that a coordinator adds (or
maxes); ``d`` is formed slice by slice from the 2m+1 coefficients.

Layout: :class:`LBFGSDriver` holds the scalar logic (the step loop, the termination tests, the
strong-Wolfe line search, the recursion on coefficients) and never touches a vector; a
:class:`VectorSpace` owns the vectors (parameters, gradient, direction, history) and offers the
slice-local operations. :class:`LocalSlices` is that space over one or more slices in this
process; the :class:`LBFGS` facade uses one slice, the concatenation of all parameters.

Arithmetic: vectors stay in the parameter dtype; dot products accumulate in float64 and the
recursion on coefficients runs in float64. Scalars follow torch's types: where torch holds a
0-d tensor (g.d, ro, H_diag, |g|_1, a line-search t) we hold a numpy scalar of the parameter
dtype, where torch holds a Python number (the loss, lr) we hold one, so float32 line-search
arithmetic and comparisons round as torch's do (numpy 2 scalars promote like torch tensors).
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numba import njit, prange

from shardstep.workers.optim.kernels import elementwise_kernel, flat
from shardstep.workers.optim.optimizer import Optimizer
from shardstep.workers.optim.parameter import Parameter, RowSparseGrad
from shardstep.workers.optim.rule import Rule, check_min

LINE_SEARCH_FNS = (None, "strong_wolfe")

# torch's param_group keys and defaults; torch stores max_eval = max_iter * 5 // 4 (25 for the
# default max_iter=20) when max_eval is None.
LBFGS_DEFAULTS = dict(lr=1, max_iter=20, max_eval=25, tolerance_grad=1e-7, tolerance_change=1e-9,
                      history_size=100, line_search_fn=None)

STATE_KEYS = ("func_evals", "n_iter", "al", "d", "t", "old_dirs", "old_stps", "ro", "H_diag",
              "prev_flat_grad", "prev_loss")

# elements per inner block of the reduction kernels; reductions split a slice into a number of
# tasks that depends only on its length, so every sum is added in the same order on every run
_BLOCK = 1024
_COMBINE_BLOCK = 4096
_TASK_MIN = 32768
_TASK_MAX = 64


# ---------------------------------------------------------------------------------------
# hyperparameters


def _check_int(name: str, value: Any, low: int) -> None:
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an int; got {value!r} of type {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value}")


def validate(group) -> None:
    lr = group["lr"]
    if isinstance(lr, np.ndarray) and lr.size != 1:
        raise ValueError(f"lr given as an array must have 1 element; got shape {lr.shape}")
    check_min("lr", lr)
    _check_int("max_iter", group["max_iter"], 1)
    _check_int("max_eval", group["max_eval"], 1)
    check_min("tolerance_grad", group["tolerance_grad"])
    check_min("tolerance_change", group["tolerance_change"])
    _check_int("history_size", group["history_size"], 1)
    fn = group["line_search_fn"]
    if not (fn is None or (isinstance(fn, str) and fn == "strong_wolfe")):
        raise ValueError(f"line_search_fn must be None or 'strong_wolfe'; got {fn!r}")


def init_state(param: np.ndarray, group) -> dict:
    # LBFGS keeps one global state under the first parameter (as torch does); the facade builds it
    return {"func_evals": 0, "n_iter": 0}


# not elementwise: the facade's generic per-parameter update does not apply (update=None);
# LBFGS.step runs the driver instead.
RULE = Rule(name="lbfgs", defaults=LBFGS_DEFAULTS, validate=validate, init_state=init_state,
            update=None, scalar_state=())


# ---------------------------------------------------------------------------------------
# slice-local kernels (one slice = one 1-D piece of every vector)


def _n_tasks(n: int) -> int:
    return max(1, min(_TASK_MAX, n // _TASK_MIN))


# The reductions let LLVM vectorize each block's sum ('reassoc'; 'contract' fuses the products
# in): the order of the additions is then fixed by the compiled loop and the block's length, not
# by the data's alignment, so the same vectors give the same bits every time on a machine (the
# Gram matrix rebuilt from a state_dict equals the one kept step by step).
_REDUCE_MATH = {"reassoc", "contract"}


@elementwise_kernel(fastmath=_REDUCE_MATH)
def _gram_kernel(buf, rows, cols, n_tasks, out):
    """out[a, c] += sum_k buf[rows[a], k] * buf[cols[c], k], products and sums in float64.

    Blocks of _BLOCK elements stay in cache while every pair is summed; each entry is added up
    block by block, task by task, in an order that depends only on the slice length, so the
    same two vectors always give the same bits, whatever else is in the batch."""
    n = buf.shape[1]
    nr = rows.size
    nc = cols.size
    per = (n + n_tasks - 1) // n_tasks
    partial = np.zeros((n_tasks, nr, nc))
    for task in prange(n_tasks):
        lo = task * per
        hi = min(n, lo + per)
        for b0 in range(lo, hi, _BLOCK):
            b1 = min(hi, b0 + _BLOCK)
            for a in range(nr):
                u = buf[rows[a], b0:b1]
                for c in range(nc):
                    v = buf[cols[c], b0:b1]
                    s = np.float64(0)
                    for k in range(b1 - b0):
                        s += np.float64(u[k]) * np.float64(v[k])
                    partial[task, a, c] += s
    for task in range(n_tasks):
        for a in range(nr):
            for c in range(nc):
                out[a, c] += partial[task, a, c]


@elementwise_kernel(fastmath=_REDUCE_MATH)
def _abs_sum_kernel(x, n_tasks):
    n = x.size
    per = (n + n_tasks - 1) // n_tasks
    partial = np.zeros(n_tasks)
    for task in prange(n_tasks):
        lo = task * per
        hi = min(n, lo + per)
        s = np.float64(0)
        for k in range(lo, hi):
            s += abs(np.float64(x[k]))
        partial[task] = s
    total = np.float64(0)
    for task in range(n_tasks):
        total += partial[task]
    return total


@elementwise_kernel
def _abs_max_kernel(x, n_tasks):
    """max_k |x[k]|, NaN if any element is NaN (as torch's max)."""
    n = x.size
    per = (n + n_tasks - 1) // n_tasks
    partial = np.zeros(n_tasks, dtype=x.dtype)
    for task in prange(n_tasks):
        lo = task * per
        hi = min(n, lo + per)
        m = partial[task]
        for k in range(lo, hi):
            v = abs(x[k])
            if v > m or v != v:
                m = v
                if v != v:
                    break
        partial[task] = m
    result = partial[0]
    for task in range(1, n_tasks):
        v = partial[task]
        if v > result or v != v:
            result = v
            if v != v:
                break
    return result


@elementwise_kernel
def _combine_kernel(buf, rows, coeffs, out):
    """out = sum_j coeffs[j] * buf[rows[j]], accumulated in float64 and rounded once
    (elementwise: the result does not depend on how the slice is split into blocks)."""
    n = out.size
    n_blocks = (n + _COMBINE_BLOCK - 1) // _COMBINE_BLOCK
    for blk in prange(n_blocks):
        lo = blk * _COMBINE_BLOCK
        hi = min(n, lo + _COMBINE_BLOCK)
        size = hi - lo
        acc = np.empty(size)
        c = coeffs[0]
        v = buf[rows[0], lo:hi]
        for k in range(size):
            acc[k] = c * np.float64(v[k])
        for j in range(1, rows.size):
            c = coeffs[j]
            v = buf[rows[j], lo:hi]
            for k in range(size):
                acc[k] += c * np.float64(v[k])
        o = out[lo:hi]
        for k in range(size):
            o[k] = acc[k]


# 'contract' lets LLVM fuse x + t * d into one fused multiply-add where the CPU has one, as
# torch's CPU add_(d, alpha=t) does (one rounding): the strong-Wolfe extrapolation turns 1-ulp
# differences in the trial parameters into 1e-4 differences in the step length.
@elementwise_kernel(fastmath={"contract"})
def _axpy_kernel(out, x, t, d):
    """out = x + t * d in the arrays' dtype, fused like torch's add_ (out may be x)."""
    for i in prange(out.size):
        out[i] = x[i] + t * d[i]


@njit(cache=True, nogil=True)
def _two_loop_kernel(gram, ro, h_diag, c, al):
    """The two-loop recursion on coefficients (see the module docstring), in float64.

    gram: (2m+1, 2m+1) over [s_0..s_{m-1}, y_0..y_{m-1}, g]; ro: (m,); fills c (2m+1,) with the
    coefficients of d and al (m,); returns g.d."""
    m = ro.size
    nb = 2 * m + 1
    for j in range(nb):
        c[j] = 0.0
    c[2 * m] = -1.0
    for i in range(m - 1, -1, -1):
        acc = 0.0
        for j in range(nb):
            acc += gram[i, j] * c[j]
        al[i] = acc * ro[i]
        c[m + i] -= al[i]
    for j in range(nb):
        c[j] *= h_diag
    for i in range(m):
        acc = 0.0
        for j in range(nb):
            acc += gram[m + i, j] * c[j]
        be = acc * ro[i]
        c[i] += al[i] - be
    gtd = 0.0
    for j in range(nb):
        gtd += gram[2 * m, j] * c[j]
    return gtd


def two_loop_coefficients(gram: np.ndarray, ro: Sequence[float], h_diag: float):
    """Coefficients of ``d = -H g`` over the basis ``[s_0..s_{m-1}, y_0..y_{m-1}, g]``.

    Returns ``(c, al, gtd)``: c (2m+1,), the first-loop multipliers al (m,), and ``g . d``,
    all float64, from the basis' Gram matrix alone."""
    gram = np.ascontiguousarray(gram, dtype=np.float64)
    ro = np.asarray([float(r) for r in ro], dtype=np.float64)
    m = ro.size
    if gram.shape != (2 * m + 1, 2 * m + 1):
        raise ValueError(f"gram must be ({2 * m + 1}, {2 * m + 1}) for {m} pairs; got {gram.shape}")
    c = np.empty(2 * m + 1)
    al = np.empty(m)
    gtd = _two_loop_kernel(gram, ro, float(h_diag), c, al)
    return c, al, gtd


def combine_sum(partials):
    """Add per-slice partial sums (arrays or scalars), in slice order, in float64."""
    total = np.array(partials[0], dtype=np.float64, copy=True)
    for part in partials[1:]:
        total = total + np.asarray(part, dtype=np.float64)
    return total


def combine_max(partials):
    """The largest per-slice partial max (NaN if any is NaN)."""
    return np.max(np.asarray(partials))


# ---------------------------------------------------------------------------------------
# the vector space: everything that touches a vector


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


# ---------------------------------------------------------------------------------------
# the driver: scalar logic only


def _to_scalar(value):
    if isinstance(value, np.ndarray):
        return value.item()
    return value


def _sqrt(x):
    return np.sqrt(x) if isinstance(x, np.generic) else math.sqrt(x)


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, bounds=None):
    """Minimizer of the cubic through (x1, f1, g1) and (x2, f2, g2), clipped to ``bounds``
    (torch's port of minFunc's polyinterp; the midpoint when the cubic has no minimum)."""
    if bounds is not None:
        xmin_bound, xmax_bound = bounds
    else:
        xmin_bound, xmax_bound = (x1, x2) if x1 <= x2 else (x2, x1)
    # x1 == x2 (possible once tolerance_change is 0) gives inf/NaN here, as torch's tensor
    # arithmetic does silently; the NaN comparisons below then take the midpoint
    with np.errstate(divide="ignore", invalid="ignore"):
        d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
        d2_square = d1 * d1 - g1 * g2
    if d2_square >= 0:
        d2 = _sqrt(d2_square)
        if x1 <= x2:
            min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        else:
            min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        return min(max(min_pos, xmin_bound), xmax_bound)
    return (xmin_bound + xmax_bound) / 2.0


class LBFGSDriver:
    """torch.optim.LBFGS's step on a :class:`VectorSpace`: counters, scalars and the Gram
    matrix of the history live here, every vector in the space.

    Persistent scalars mirror torch's state: ``func_evals``, ``n_iter``, ``t``, ``ro``,
    ``h_diag``, ``prev_loss``, ``al``. ``hist_gram`` is the (2m, 2m) float64 Gram matrix of
    ``[s_0..s_{m-1}, y_0..y_{m-1}]``; it is not part of the state_dict and is rebuilt from the
    history vectors on load (one batched reduction).
    """

    def __init__(self, space: VectorSpace):
        self.space = space
        self.dt = space.dtype.type
        self.func_evals = 0
        self.n_iter = 0
        self.started = False  # torch writes d, t, history, ... once a step has iterated
        self.t = None
        self.ro: list = []
        self.h_diag: Any = 1
        self.prev_loss = None
        self.al: list | None = None
        self.hist_gram = np.zeros((0, 0))

    # -- reductions -----------------------------------------------------------------------
    def _abs_max(self, name):
        return self.dt(combine_max(self.space.partial_abs_max(name)))

    def _abs_sum(self, name):
        return self.dt(combine_sum(self.space.partial_abs_sum(name)))

    def _dot(self, a, b):
        return self.dt(combine_sum(self.space.partial_gram([a], [b]))[0, 0])

    def history_names(self, m: int) -> list:
        return [("s", i) for i in range(m)] + [("y", i) for i in range(m)]

    # -- the direction --------------------------------------------------------------------
    def _update_memory_and_gram(self, history_size: int) -> np.ndarray:
        """Form the new pair, take the ONE batched reduction, update the history and its Gram
        matrix, and return the full Gram matrix over [s.., y.., g]."""
        space, m = self.space, self.space.history_len()
        space.sub("y", "g", "prev_g")
        space.scale("s", "d", self.t)
        hist = self.history_names(m)
        # rows s, y, g against columns s_0..s_{m-1}, y_0..y_{m-1}, s, y, g
        batch = combine_sum(space.partial_gram(["s", "y", "g"], [*hist, "s", "y", "g"]))
        ns, ny, ng = 2 * m, 2 * m + 1, 2 * m + 2
        ys = self.dt(batch[0, ny])
        if ys > 1e-10:
            keep = list(range(m))
            while len(keep) >= history_size:
                keep.pop(0)
                space.pop_history()
                self.ro.pop(0)
            space.push_history("s", "y")
            self.ro.append(1.0 / ys)
            self.h_diag = ys / self.dt(batch[1, ny])
            k = len(keep)
            m2 = k + 1
            old = np.array(keep + [m + i for i in keep], dtype=np.int64)  # kept, old positions
            new_pos = np.concatenate([np.arange(k), m2 + np.arange(k)])   # their new positions
            hg = np.empty((2 * m2, 2 * m2))
            hg[np.ix_(new_pos, new_pos)] = self.hist_gram[np.ix_(old, old)]
            for r, pos in ((0, k), (1, m2 + k)):  # the new s (row 0) and y (row 1)
                hg[pos, new_pos] = batch[r, old]
                hg[new_pos, pos] = batch[r, old]
                hg[pos, k] = batch[r, ns]
                hg[pos, m2 + k] = batch[r, ny]
            self.hist_gram = hg
            g_row = np.empty(2 * m2)
            g_row[new_pos] = batch[2, old]
            g_row[k], g_row[m2 + k] = batch[2, ns], batch[2, ny]
        else:
            # the pair is not kept (its vectors are overwritten by the next iteration's)
            g_row = batch[2, :2 * m].copy()
        m = space.history_len()
        gram = np.empty((2 * m + 1, 2 * m + 1))
        gram[:2 * m, :2 * m] = self.hist_gram
        gram[2 * m, :2 * m] = g_row
        gram[:2 * m, 2 * m] = g_row
        gram[2 * m, 2 * m] = batch[2, ng]
        return gram

    def _direction(self, history_size: int):
        """d = -H g into the space; returns g.d (dtype scalar)."""
        space = self.space
        if self.n_iter == 1:
            space.clear_history()
            self.ro = []
            self.h_diag = 1
            self.hist_gram = np.zeros((0, 0))
            gram = combine_sum(space.partial_gram(["g"], ["g"]))
            c, _, gtd = two_loop_coefficients(gram, [], 1.0)
            space.combine("d", ["g"], c)
            return self.dt(gtd)
        gram = self._update_memory_and_gram(history_size)
        m = space.history_len()
        c, al, gtd = two_loop_coefficients(gram, self.ro, float(self.h_diag))
        if self.al is None:
            self.al = [None] * history_size
        while len(self.al) < m:
            self.al.append(None)
        for i in range(m):
            self.al[i] = self.dt(al[i])
        space.combine("d", [*self.history_names(m), "g"], c)
        return self.dt(gtd)

    # -- evaluation -----------------------------------------------------------------------
    def _directional_evaluate(self, closure, t, keep):
        """f and g at x0 + t d (parameters restored to x0 afterwards); returns
        (loss, name of the gradient, g.d)."""
        space = self.space
        space.release_temps(keep)
        space.set_params_from("x0", t, "d")
        loss = float(closure())
        name = space.new_temp()
        space.gather_grad(name)
        space.write_params("x0")
        return loss, name, self._dot(name, "d")

    def _strong_wolfe(self, closure, t, f, gtd, tolerance_change, max_ls, c1=1e-4, c2=0.9):
        """torch's _strong_wolfe (minFunc's lswolfe) with gradients held by name; returns
        (f, name of the gradient, t, evaluations)."""
        d_norm = self._abs_max("d")
        g = "g"
        f_new, g_new, gtd_new = self._directional_evaluate(closure, t, ())
        ls_func_evals = 1
        t_prev, f_prev, g_prev, gtd_prev = 0, f, g, gtd
        done = False
        ls_iter = 0
        while ls_iter < max_ls:
            if f_new > (f + c1 * t * gtd) or (ls_iter > 1 and f_new >= f_prev):
                bracket, bracket_f = [t_prev, t], [f_prev, f_new]
                bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
                break
            if abs(gtd_new) <= -c2 * gtd:
                bracket, bracket_f, bracket_g = [t], [f_new], [g_new]
                done = True
                break
            if gtd_new >= 0:
                bracket, bracket_f = [t_prev, t], [f_prev, f_new]
                bracket_g, bracket_gtd = [g_prev, g_new], [gtd_prev, gtd_new]
                break
            # extrapolate
            min_step = t + 0.01 * (t - t_prev)
            max_step = t * 10
            tmp = t
            t = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new,
                                   bounds=(min_step, max_step))
            t_prev, f_prev, g_prev, gtd_prev = tmp, f_new, g_new, gtd_new
            f_new, g_new, gtd_new = self._directional_evaluate(closure, t, (g_prev,))
            ls_func_evals += 1
            ls_iter += 1

        if ls_iter == max_ls:
            bracket, bracket_f, bracket_g = [0, t], [f, f_new], [g, g_new]

        # zoom: refine the bracket until a point satisfies the strong Wolfe conditions
        insuf_progress = False
        low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[-1] else (1, 0)
        while not done and ls_iter < max_ls:
            if abs(bracket[1] - bracket[0]) * d_norm < tolerance_change:
                break
            t = _cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0],
                                   bracket[1], bracket_f[1], bracket_gtd[1])
            # too close to an end of the bracket: move 0.1 of its length inside
            eps = 0.1 * (max(bracket) - min(bracket))
            if min(max(bracket) - t, t - min(bracket)) < eps:
                if insuf_progress or t >= max(bracket) or t <= min(bracket):
                    if abs(t - max(bracket)) < abs(t - min(bracket)):
                        t = max(bracket) - eps
                    else:
                        t = min(bracket) + eps
                    insuf_progress = False
                else:
                    insuf_progress = True
            else:
                insuf_progress = False

            f_new, g_new, gtd_new = self._directional_evaluate(closure, t, tuple(bracket_g))
            ls_func_evals += 1
            ls_iter += 1

            if f_new > (f + c1 * t * gtd) or f_new >= bracket_f[low_pos]:
                # Armijo fails or no lower than the low end: the new point is the high end
                bracket[high_pos], bracket_f[high_pos] = t, f_new
                bracket_g[high_pos], bracket_gtd[high_pos] = g_new, gtd_new
                low_pos, high_pos = (0, 1) if bracket_f[0] <= bracket_f[1] else (1, 0)
            else:
                if abs(gtd_new) <= -c2 * gtd:
                    done = True
                elif gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0:
                    # the old high end becomes the low end
                    bracket[high_pos], bracket_f[high_pos] = bracket[low_pos], bracket_f[low_pos]
                    bracket_g[high_pos] = bracket_g[low_pos]
                    bracket_gtd[high_pos] = bracket_gtd[low_pos]
                bracket[low_pos], bracket_f[low_pos] = t, f_new
                bracket_g[low_pos], bracket_gtd[low_pos] = g_new, gtd_new

        return bracket_f[low_pos], bracket_g[low_pos], bracket[low_pos], ls_func_evals

    # -- the step -------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any], group) -> Any:
        """One torch.optim.LBFGS.step(closure); returns the closure's first loss."""
        space = self.space
        lr = _to_scalar(group["lr"])
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]
        line_search_fn, history_size = group["line_search_fn"], group["history_size"]
        if line_search_fn not in LINE_SEARCH_FNS:
            raise ValueError(f"line_search_fn must be None or 'strong_wolfe'; got {line_search_fn!r}")

        orig_loss = closure()
        loss = float(orig_loss)
        current_evals = 1
        self.func_evals += 1
        space.gather_grad("g")
        opt_cond = self._abs_max("g") <= tolerance_grad
        if opt_cond:
            return orig_loss

        n_iter = 0
        while n_iter < max_iter:
            n_iter += 1
            self.n_iter += 1
            self.started = True

            gtd = self._direction(history_size)
            space.copy("prev_g", "g")
            self.prev_loss = loss

            if self.n_iter == 1:
                self.t = min(1.0, 1.0 / self._abs_sum("g")) * lr
            else:
                self.t = lr

            if gtd > -tolerance_change:
                break

            ls_func_evals = 0
            if line_search_fn is not None:
                space.snapshot_params("x0")
                loss, g_name, self.t, ls_func_evals = self._strong_wolfe(
                    closure, self.t, loss, gtd, tolerance_change, max_eval - current_evals)
                space.move("g", g_name)
                space.release_temps()
                space.add_to_params(self.t, "d")
                opt_cond = self._abs_max("g") <= tolerance_grad
            else:
                space.add_to_params(self.t, "d")
                if n_iter != max_iter:
                    loss = float(closure())
                    space.gather_grad("g")
                    opt_cond = self._abs_max("g") <= tolerance_grad
                    ls_func_evals = 1

            current_evals += ls_func_evals
            self.func_evals += ls_func_evals

            if n_iter == max_iter:
                break
            if current_evals >= max_eval:
                break
            if opt_cond:
                break
            # lack of progress: max |t d| (= max|d| |t|, rounding is monotonic)
            if self._abs_max("d") * abs(self.dt(self.t)) <= tolerance_change:
                break
            if abs(loss - self.prev_loss) < tolerance_change:
                break
        return orig_loss

    # -- state in torch's layout ----------------------------------------------------------
    def export_state(self) -> dict:
        """torch's state for parameter 0: tensors as ndarrays, numbers as numbers."""
        state: dict[str, Any] = {"func_evals": self.func_evals, "n_iter": self.n_iter}
        if self.al is not None:
            state["al"] = [None if a is None else _as_array(a) for a in self.al]
        if self.started:
            space, m = self.space, self.space.history_len()
            state["d"] = space.export("d")
            state["t"] = _as_array(self.t)
            state["old_dirs"] = [space.export(("y", i)) for i in range(m)]
            state["old_stps"] = [space.export(("s", i)) for i in range(m)]
            state["ro"] = [_as_array(r) for r in self.ro]
            state["H_diag"] = _as_array(self.h_diag)
            state["prev_flat_grad"] = space.export("prev_g")
            state["prev_loss"] = self.prev_loss
        return state

    def import_state(self, state) -> None:
        """Load a state from :meth:`export_state` or torch (checked by :func:`check_state`)."""
        space = self.space
        self.func_evals = int(state.get("func_evals", 0))
        self.n_iter = int(state.get("n_iter", 0))
        al = state.get("al")
        self.al = None if al is None else [None if a is None else _as_scalar(a) for a in al]
        self.started = state.get("d") is not None
        space.clear_history()
        space.release_temps()
        self.hist_gram = np.zeros((0, 0))
        self.ro, self.h_diag, self.t, self.prev_loss = [], 1, None, None
        if not self.started:
            return
        space.load("d", state["d"])
        space.load("prev_g", state["prev_flat_grad"])
        for s, y in zip(state["old_stps"], state["old_dirs"]):
            space.load("s", s)
            space.load("y", y)
            space.push_history("s", "y")
        self.ro = [_as_scalar(r) for r in state["ro"]]
        self.h_diag = _as_scalar(state["H_diag"])
        self.t = _as_scalar(state["t"])
        self.prev_loss = state["prev_loss"]
        self.rebuild_gram()

    def rebuild_gram(self) -> None:
        """The history's Gram matrix from the history vectors in the space: one batched
        reduction (the matrix is never saved)."""
        hist = self.history_names(self.space.history_len())
        self.hist_gram = combine_sum(self.space.partial_gram(hist, hist)) if hist else np.zeros((0, 0))

    def scalar_state(self) -> dict[str, Any]:
        """Every scalar of the driver as plain values (the sharded checkpoint keeps them in
        its coordinator record; the vectors are in the shards' files), with the history's
        length, which a space whose vectors live elsewhere needs back on load."""
        def plain(value: Any) -> Any:
            return None if value is None else (float(value) if isinstance(value, (np.generic, float)) else value)
        return {
            "func_evals": self.func_evals, "n_iter": self.n_iter, "started": self.started,
            "t": plain(self.t), "ro": [plain(r) for r in self.ro], "h_diag": plain(self.h_diag),
            "prev_loss": self.prev_loss, "al": None if self.al is None else [plain(a) for a in self.al],
            "history": self.space.history_len(),
        }

    def load_scalar_state(self, state: Mapping[str, Any]) -> None:
        """Load :meth:`scalar_state`'s values, cast back to the space's dtype (the space must
        already hold the vectors and ``state["history"]`` history pairs)."""
        def cast(value: Any) -> Any:
            return None if value is None else self.dt(value)
        self.func_evals, self.n_iter, self.started = state["func_evals"], state["n_iter"], state["started"]
        self.t = cast(state["t"])
        self.ro = [cast(r) for r in state["ro"]]
        # torch's initial H_diag is the integer 1, kept as such until the first pair
        self.h_diag = state["h_diag"] if isinstance(state["h_diag"], int) else cast(state["h_diag"])
        self.prev_loss = state["prev_loss"]
        self.al = None if state["al"] is None else [cast(a) for a in state["al"]]


def _as_array(value):
    """A dtype scalar (torch: a 0-d tensor) as a 0-d ndarray; Python numbers unchanged."""
    return np.array(value) if isinstance(value, np.generic) else value


def _as_scalar(value):
    """A 0-d ndarray (torch: a 0-d tensor) as a numpy scalar of its dtype."""
    return value[()] if isinstance(value, np.ndarray) else value


def check_state(state, numel: int) -> None:
    """Refuse an LBFGS state that is not torch's layout (see :meth:`LBFGSDriver.export_state`)."""
    unknown = set(state) - set(STATE_KEYS)
    if unknown:
        raise ValueError(f"LBFGS state has unknown keys {sorted(unknown)}; allowed: {list(STATE_KEYS)}")
    for key in ("func_evals", "n_iter"):
        if key in state and not isinstance(state[key], numbers.Integral):
            raise ValueError(f"LBFGS state {key!r} must be an int; got {state[key]!r}")

    def vector(name, value):
        if not isinstance(value, np.ndarray) or value.shape != (numel,):
            shape = getattr(value, "shape", type(value).__name__)
            raise ValueError(f"LBFGS state {name!r} must be a flat array of shape ({numel},); got {shape}")

    def scalar(name, value, allow_none=False):
        if value is None and allow_none:
            return
        if isinstance(value, np.ndarray):
            if value.ndim != 0:
                raise ValueError(f"LBFGS state {name!r} must be a scalar; got shape {value.shape}")
        elif not isinstance(value, numbers.Real):
            raise ValueError(f"LBFGS state {name!r} must be a number; got {value!r}")

    if "al" in state and state["al"] is not None:
        for i, a in enumerate(state["al"]):
            scalar(f"al[{i}]", a, allow_none=True)
    if state.get("d") is None:
        if state.get("n_iter", 0):
            raise ValueError("LBFGS state has n_iter > 0 but no direction 'd'")
        return
    missing = [k for k in STATE_KEYS[3:] if state.get(k) is None]
    if missing:
        raise ValueError(f"LBFGS state with a direction 'd' also needs {missing}")
    vector("d", state["d"])
    vector("prev_flat_grad", state["prev_flat_grad"])
    lengths = {k: len(state[k]) for k in ("old_dirs", "old_stps", "ro")}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"LBFGS state old_dirs, old_stps and ro must have one length; got {lengths}")
    for key in ("old_dirs", "old_stps"):
        for i, v in enumerate(state[key]):
            vector(f"{key}[{i}]", v)
    for i, r in enumerate(state["ro"]):
        scalar(f"ro[{i}]", r)
    scalar("t", state["t"])
    scalar("H_diag", state["H_diag"])
    scalar("prev_loss", state["prev_loss"])


def _cast(value, dtype):
    """Copy a loaded value; floating arrays take the parameters' dtype (as torch casts)."""
    if isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating):
            return np.array(value, dtype=dtype, copy=True, order="C")
        return np.array(value, copy=True, order="C")
    if isinstance(value, (list, tuple)):
        return [_cast(v, dtype) for v in value]
    return value


# ---------------------------------------------------------------------------------------
# the torch-style facade


class LBFGS(Optimizer):
    """torch.optim.LBFGS: every argument and default of torch 2.13.

    One parameter group only. The state (torch's layout, under parameter 0) is a view of the
    driver's: vectors are flat, concatenated over the parameters in order."""

    rule = RULE

    def __init__(self, params, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7,
                 tolerance_change=1e-9, history_size=100, line_search_fn=None):
        if max_eval is None and isinstance(max_iter, numbers.Integral) and not isinstance(max_iter, bool):
            max_eval = max_iter * 5 // 4
        self._driver: LBFGSDriver | None = None
        super().__init__(params, dict(
            lr=lr, max_iter=max_iter, max_eval=max_eval, tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change, history_size=history_size,
            line_search_fn=line_search_fn,
        ))
        dtypes = {p.dtype for p in self._params}
        if len(dtypes) != 1:
            raise ValueError(
                f"LBFGS needs all parameters in one dtype (its vectors are concatenated); "
                f"got {sorted(str(d) for d in dtypes)}"
            )

    @property
    def _params(self) -> list[Parameter]:
        return self.param_groups[0]["params"]

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        if len(self.param_groups) > 1:
            self.param_groups.pop()
            raise ValueError(
                "LBFGS doesn't support per-parameter options (parameter groups); "
                "got a group beyond the first, allowed: 1 group"
            )

    def _space(self) -> LocalSlices:
        return LocalSlices([[(p, 0, p.size) for p in self._params]], self._params[0].dtype)

    def _get_driver(self) -> LBFGSDriver:
        if self._driver is None:
            self._driver = LBFGSDriver(self._space())
        return self._driver

    def step(self, closure):  # type: ignore[override]
        """Run up to max_iter L-BFGS iterations; ``closure`` recomputes the loss, sets
        ``.grad`` and returns the loss. Returns the closure's first loss."""
        if closure is None:
            raise TypeError("LBFGS.step needs a closure that recomputes the loss and the gradients")
        loss = self._get_driver().step(closure, self.param_groups[0])
        self._sync_state()
        self._step_count += 1
        return loss

    def _sync_state(self) -> None:
        exported = self._driver.export_state() if self._driver is not None else {}
        state = self.state[self._params[0]]
        state.clear()
        state.update(exported)
        if not state:
            del self.state[self._params[0]]

    def state_dict(self):
        if self._driver is not None:
            self._sync_state()
        return super().state_dict()

    def _load_param_state(self, p, index, value):
        if p is not self._params[0]:
            raise ValueError(
                f"LBFGS keeps its state under parameter 0 (as torch does); got state for parameter {index!r}"
            )
        loaded = {name: _cast(item, p.dtype) for name, item in value.items()}
        check_state(loaded, sum(q.size for q in self._params))
        return loaded

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        driver = LBFGSDriver(self._space())
        driver.import_state(self.state.get(self._params[0], {}))
        self._driver = driver
        self._sync_state()
