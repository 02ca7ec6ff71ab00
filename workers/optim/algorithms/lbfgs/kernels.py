"""The slice-local numba kernels of LBFGS (one slice = one 1-D piece of every vector): the
batched Gram products, |x|_1, |x|_inf, the linear combination that forms ``d`` and the fused
``x + t d``; the two-loop recursion on coefficients; and the combination of per-slice
partials into one value.

Kept in a file of their own because numba's on-disk cache (``cache=True``) is keyed on the
source file: editing the driver or the facade leaves these kernels' cache valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit, prange

from shardstep.workers.optim.kernels import elementwise_kernel

# elements per inner block of the reduction kernels; reductions split a slice into a number of
# tasks that depends only on its length, so every sum is added in the same order on every run
_BLOCK = 1024
_COMBINE_BLOCK = 4096
_TASK_MIN = 32768
_TASK_MAX = 64


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
    """The two-loop recursion on coefficients (see the package docstring), in float64.

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
