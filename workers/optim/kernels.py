"""numba kernel machinery for the algorithms, and the pieces of torch's update formulas that
several of them share.

- :func:`elementwise_kernel` compiles an algorithm's ``prange`` loop twice (threaded and
  serial) and picks one by size; :func:`flat`, :func:`scalars` and :func:`lerp_weight`
  prepare its arguments.
- The shared pieces (:func:`signed`, :func:`with_weight_decay`, :func:`adam_weight_decay`,
  :func:`lerp`, :func:`decayed_square`, :func:`adam_moments`) are each the exact sequence of
  operations torch's single-tensor path performs, in the same order and dtype, so an
  algorithm that calls one rounds exactly as when it spelled the lines out (the committed
  trajectories check it). numba inlines them at its IR level (``inline="always"``), so the
  kernels compile to the same loop as before.

numba's on-disk cache keys a kernel on its own file only: after editing this module, clear
the ``__pycache__`` folders of ``algorithms/`` (a fresh checkout has none).
"""

from __future__ import annotations

import types
from collections.abc import Callable

import numpy as np
from numba import njit

# Below this many elements a kernel runs on the calling thread: starting numba's thread team
# costs ~10 us, more than the work, and its OpenMP workers then spin and take the cores an
# OpenBLAS matrix product issued right after needs (measured on 2 cores: a small kernel
# followed by a GEMM took 8 ms instead of 0.06 ms).
PARALLEL_MIN_SIZE = 1 << 16


def elementwise_kernel(function: Callable | None = None, *, fastmath: bool | set = False) -> Callable:
    """Compile a kernel ``function(array, ...)`` (a ``prange`` loop) twice from the same
    source: multi-threaded for ``array.size >= PARALLEL_MIN_SIZE`` and serial below it.
    Elementwise kernels give bit-identical results either way; reductions that split their
    work by a task count of their own (LBFGS's) do too. Use as ``@elementwise_kernel`` or
    ``@elementwise_kernel(fastmath={...})``."""
    if function is None:
        return lambda f: elementwise_kernel(f, fastmath=fastmath)
    # a distinct code object name keeps the two versions apart in numba's on-disk cache
    serial_code = function.__code__.replace(co_name=function.__name__ + "_serial")
    serial_function = types.FunctionType(serial_code, function.__globals__, serial_code.co_name,
                                         function.__defaults__, function.__closure__)
    serial_function.__qualname__ = function.__qualname__ + "_serial"
    parallel = njit(parallel=True, cache=True, nogil=True, fastmath=fastmath)(function)
    serial = njit(parallel=False, cache=True, nogil=True, fastmath=fastmath)(serial_function)

    def dispatch(array, *args):
        return (parallel if array.size >= PARALLEL_MIN_SIZE else serial)(array, *args)

    dispatch.__name__, dispatch.__qualname__, dispatch.__doc__ = (
        function.__name__, function.__qualname__, function.__doc__)
    dispatch.parallel, dispatch.serial = parallel, serial
    return dispatch


def flat(array: np.ndarray) -> np.ndarray:
    """A 1-D view of a C-contiguous array (never a copy: updates must land in place)."""
    if not array.flags.c_contiguous:
        raise ValueError("optimizer arrays must be C-contiguous so updates happen in place")
    return array.reshape(-1)


def lerp_weight(dtype: np.dtype, weight: float) -> tuple:
    """``(w, |w| < 0.5, 1 - w)`` in the parameter's dtype for torch's two-form lerp, which
    computes ``m + w (g - m)`` for small weights and ``g - (g - m)(1 - w)`` otherwise (the
    test, like torch's, is on the weight as rounded to the dtype)."""
    w = np.dtype(dtype).type(weight)
    return w, bool(abs(w) < 0.5), np.dtype(dtype).type(1) - w


def scalars(dtype: np.dtype, *values: float) -> tuple:
    """Hyperparameters as scalars of the parameter's dtype, so kernels compute in that dtype
    (float32 arithmetic for float32 parameters, as torch's CPU kernels do)."""
    kind = np.dtype(dtype).type
    return tuple(kind(v) for v in values)



@njit(inline="always")
def signed(g, maximize):
    """The gradient torch steps along: negated when maximizing."""
    return -g if maximize else g


@njit(inline="always")
def with_weight_decay(g, p, weight_decay):
    """L2 weight decay folded into the gradient (``grad.add(param, alpha=weight_decay)``),
    skipped at 0 as torch skips it."""
    if weight_decay != 0:
        g = g + weight_decay * p
    return g


@njit(inline="always")
def adam_weight_decay(p, g, weight_decay, decoupled, decay):
    """The Adam family's weight decay: decoupled (AdamW: ``p *= 1 - lr * wd``, passed in as
    ``decay``) or folded into the gradient; returns ``(p, g)``."""
    if weight_decay != 0:
        if decoupled:
            p = p * decay
        else:
            g = g + weight_decay * p
    return p, g


@njit(inline="always")
def lerp(m, g, w, w_small, one_minus_w):
    """torch's ``m.lerp_(g, w)``: ``m + w (g - m)`` for ``|w| < 0.5``, else
    ``g - (g - m)(1 - w)``, the form torch picks for accuracy (see ``rule.lerp_weight``)."""
    if w_small:
        return m + w * (g - m)
    return g - (g - m) * one_minus_w


@njit(inline="always")
def decayed_square(v, g, beta, one_minus_beta):
    """A running average of squared gradients: ``v.mul_(beta).addcmul_(g, g, value=1 - beta)``."""
    return v * beta + one_minus_beta * g * g


@njit(inline="always")
def adam_moments(exp_avg, exp_avg_sq, i, g, lerp_w, lerp_w_small, lerp_1mw, beta2, one_minus_beta2):
    """The Adam family's two moments at element ``i``: ``m = lerp(m, g, 1 - beta1)`` and
    ``v = beta2 v + (1 - beta2) g g``, stored and returned as ``(m, v)``."""
    m = lerp(exp_avg[i], g, lerp_w, lerp_w_small, lerp_1mw)
    exp_avg[i] = m
    v = decayed_square(exp_avg_sq[i], g, beta2, one_minus_beta2)
    exp_avg_sq[i] = v
    return m, v
