"""Argument and array checks shared by the losses and layers.

Every message names the owner (``CrossEntropyLoss``), the argument, the value received and
what is allowed, so a bad call fails at the boundary and never deep inside numpy.
"""

from __future__ import annotations

import math

import numpy as np

from shardstep.workers.checks import is_flag, is_integer, is_real

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
REDUCTIONS = ("mean", "sum", "none")


def float_dtype_or_none(value) -> np.dtype | None:
    """``value`` (a dtype, a type or its name) as float32 or float64, or None when it is neither:
    the caller raises its own error."""
    try:
        dtype = np.dtype(value)
    except TypeError:
        return None
    return dtype if dtype in FLOAT_DTYPES else None


def float_array(owner: str, name: str, value) -> np.ndarray:
    """``value`` as a float32/float64 ndarray (lists of Python floats become float64)."""
    array = np.asarray(value)
    if array.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{owner}: {name} must be a float32 or float64 array; got dtype {array.dtype}")
    return array


def numeric_like(owner: str, name: str, value, dtype: np.dtype) -> np.ndarray:
    """A real-valued target (integer or float dtype) converted to the input's ``dtype``."""
    array = np.asarray(value)
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise TypeError(
            f"{owner}: {name} must be an integer or float array; got dtype {array.dtype}"
        )
    return array.astype(dtype, copy=False)


def same_dtype(owner: str, names: tuple[str, ...], arrays: tuple[np.ndarray, ...]) -> np.dtype:
    dtypes = [a.dtype for a in arrays]
    if any(d != dtypes[0] for d in dtypes):
        got = ", ".join(f"{n}={d}" for n, d in zip(names, dtypes))
        raise TypeError(f"{owner}: {', '.join(names)} must have the same dtype; got {got}")
    return dtypes[0]


def same_shape(owner: str, names: tuple[str, ...], arrays: tuple[np.ndarray, ...]) -> tuple[int, ...]:
    shapes = [a.shape for a in arrays]
    if any(s != shapes[0] for s in shapes):
        got = ", ".join(f"{n} {s}" for n, s in zip(names, shapes))
        raise ValueError(f"{owner}: {', '.join(names)} must have the same shape; got {got}")
    return shapes[0]


def reduction_name(owner: str, reduction, allowed: tuple[str, ...] = REDUCTIONS) -> str:
    if not isinstance(reduction, str) or reduction not in allowed:
        raise ValueError(
            f"{owner}: reduction must be one of {', '.join(repr(r) for r in allowed)}; got {reduction!r}"
        )
    return reduction


def real(owner: str, name: str, value) -> float:
    """A real number (not a bool, not NaN)."""
    if not is_real(value):
        raise TypeError(f"{owner}: {name} must be a real number; got {value!r} of type {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{owner}: {name} must not be NaN; got nan")
    return value


def flag(owner: str, name: str, value) -> bool:
    if not is_flag(value):
        raise TypeError(f"{owner}: {name} must be a bool; got {value!r} of type {type(value).__name__}")
    return bool(value)


def integer(owner: str, name: str, value) -> int:
    if not is_integer(value):
        raise TypeError(f"{owner}: {name} must be an int; got {value!r} of type {type(value).__name__}")
    return int(value)


def class_weight(owner: str, weight, classes: int, dtype: np.dtype) -> np.ndarray | None:
    """A per-class weight: None or a 1-D float array of length ``classes``, in ``dtype``."""
    if weight is None:
        return None
    array = float_array(owner, "weight", weight)
    if array.shape != (classes,):
        raise ValueError(
            f"{owner}: weight must be a 1-D array with one entry per class, shape ({classes},); "
            f"got shape {array.shape}"
        )
    return array.astype(dtype, copy=False)


def broadcast_weight(owner: str, name: str, weight, shape: tuple[int, ...], dtype: np.dtype):
    """An elementwise weight that broadcasts to ``shape`` (torch expands it to the target's shape)."""
    if weight is None:
        return None
    array = float_array(owner, name, weight)
    try:
        broadcast = np.broadcast_shapes(array.shape, shape)
    except ValueError:
        broadcast = None
    if broadcast != tuple(shape):
        raise ValueError(
            f"{owner}: {name} of shape {array.shape} must broadcast to the input's shape {tuple(shape)}"
        )
    return array.astype(dtype, copy=False)


def grad_output_array(owner: str, grad_output, reduction: str, out_shape: tuple[int, ...],
                      dtype: np.dtype) -> np.ndarray:
    """The gradient flowing into a loss's output: a scalar for 'mean'/'sum' (and for a 0-d
    'none' output), an array of the output's shape for 'none' (as torch's ``backward``
    requires); returned in the loss's dtype."""
    array = np.asarray(grad_output)
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    ):
        raise TypeError(f"{owner}: grad_output must be a real number or array; got dtype {array.dtype}")
    if reduction == "none":
        if array.shape != tuple(out_shape):
            raise ValueError(
                f"{owner}: grad_output for reduction='none' must have the output's shape "
                f"{tuple(out_shape)}; got {array.shape}"
            )
    elif array.shape != ():
        raise ValueError(
            f"{owner}: grad_output for reduction={reduction!r} must be a scalar; got shape {array.shape}"
        )
    return array.astype(dtype, copy=False)
