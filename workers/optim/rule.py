"""The contract every optimizer algorithm fulfils: a pure update rule on arrays.

An algorithm is a :class:`Rule`: its torch-compatible defaults, a validator for
hyperparameters, ``init_state`` (the named state of one parameter, or of any slice of one),
and ``update`` / ``update_rows`` that advance a parameter (or slice) and its state in place.
The torch-style :class:`~shardstep.workers.optim.optimizer.Optimizer` and the shard actors call the
same rule; neither branches on which algorithm runs.

Elementwise rules never reduce across elements, so applying ``update`` to every slice of a
parameter is the same as applying it to the whole parameter. State entries named in
``scalar_state`` are per-parameter scalars (a step counter, a decaying factor) that depend
only on the step and the hyperparameters, so every slice holds the same value.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shardstep.workers.checks import is_flag, is_real

# torch keeps step counters and per-parameter scalar state (NAdam's mu_product, ASGD's eta
# and mu) as 0-d tensors of ``torch.optim.optimizer._get_scalar_dtype()``: float64 when
# torch's default dtype is float64, float32 otherwise. We mirror that switch
# (``set_default_dtype``) so values round exactly as torch's do under either default and
# state_dicts convert both ways unchanged. Scalar state is created in this dtype and then
# advanced in its own dtype, so a loaded state keeps rounding as it did where it was saved.
DEFAULT_DTYPES = ("float32", "float64")
_default_dtype = np.dtype(np.float32)


def set_default_dtype(dtype: Any) -> None:
    """torch.set_default_dtype for the optimizers' scalar state: ``"float64"`` (or
    ``np.float64``, or ``torch.float64``) makes state created from now on hold step counters
    and scalar factors in float64, as torch does under ``torch.set_default_dtype(torch.float64)``.
    Parameters and array state keep their own dtypes either way."""
    global _default_dtype
    _default_dtype = _checked_default_dtype(dtype)


def get_default_dtype() -> np.dtype:
    """The dtype :func:`set_default_dtype` set (float32 unless changed), as torch.get_default_dtype."""
    return _default_dtype


@contextlib.contextmanager
def using_default_dtype(dtype: Any) -> Iterator[None]:
    """:func:`set_default_dtype` for the ``with`` block only: a shard creates its state in
    the run's dtype without changing the process's (the inline backend shares the driver's)."""
    global _default_dtype
    before, _default_dtype = _default_dtype, _checked_default_dtype(dtype)
    try:
        yield
    finally:
        _default_dtype = before


def _checked_default_dtype(dtype: Any) -> np.dtype:
    # torch.float64 prints as "torch.float64": accepted without importing torch
    spelled = dtype if isinstance(dtype, (type, np.dtype)) else str(dtype).removeprefix("torch.")
    try:
        resolved = np.dtype(spelled)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in DEFAULT_DTYPES:
        raise TypeError(f"the default dtype must be one of {', '.join(DEFAULT_DTYPES)}; got {dtype!r}")
    return resolved


# Flags that only select torch's device kernels or autograd behaviour. They are stored in
# param_groups with torch's values so state_dicts interoperate.
#  - foreach, fused: accepted and ignored; every update here is already one fused pass.
#  - capturable, differentiable: only False is accepted (no CUDA graphs, no autograd through
#    the step); True raises ValueError.
IGNORED_FLAGS = ("foreach", "fused")
FALSE_ONLY_FLAGS = ("capturable", "differentiable")


@dataclass(frozen=True)
class Rule:
    """One optimizer algorithm, shared by the facade and the shard actors."""

    name: str
    defaults: Mapping[str, Any]
    validate: Callable[[Mapping[str, Any]], None]
    init_state: Callable[[np.ndarray, Mapping[str, Any]], dict[str, Any]]
    # update(param, grad, state, group): dense gradient; param, grad and array state share one
    # shape (the parameter's in the facade, a 1-D slice in a shard); updates happen in place
    # and state the rule creates lazily takes that shape.
    update: Callable[[np.ndarray, np.ndarray, dict[str, Any], Mapping[str, Any]], None] | None
    # update_rows(param, rows, values, state, group): param is 2-D (rows, -1); rows are unique
    # and sorted; values[k] is the gradient of row rows[k].
    update_rows: Callable[..., None] | None = None
    scalar_state: tuple[str, ...] = field(default=("step",))

    @property
    def accepts_dense(self) -> bool:
        return self.update is not None

    @property
    def accepts_sparse(self) -> bool:
        return self.update_rows is not None


def new_step() -> np.ndarray:
    """A step counter as torch stores it: a 0-d array of the default dtype (torch's
    ``_get_scalar_dtype()``: the default dtype is float32 or float64 here), 0 before the first
    step."""
    return np.zeros((), dtype=_default_dtype)


def new_scalar(value: float) -> np.ndarray:
    """Scalar state (a decaying factor) as torch creates it: a 0-d array of the default dtype."""
    return np.array(value, dtype=_default_dtype)


def store_scalar(state: np.ndarray, value: float) -> float:
    """Write ``value`` into 0-d scalar state, rounded to that state's own dtype, and return
    what it now holds."""
    state[...] = state.dtype.type(value)
    return float(state)


def advance(step: np.ndarray) -> float:
    """Increment a step counter in place and return the new value as a Python float."""
    step += 1
    return float(step)


# ---------------------------------------------------------------------------------------
# hyperparameter checks: each names the argument, the value received and what is allowed


def require_number(name: str, value: Any) -> float:
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.floating):
        value = value.item()
    if not is_real(value):
        raise TypeError(f"{name} must be a real number; got {value!r} of type {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN; got {value}")
    return value


def check_min(name: str, value: Any, low: float = 0.0) -> None:
    value = require_number(name, value)
    if not value >= low:
        raise ValueError(f"{name} must be >= {low:g}; got {value}")


def check_interval(name: str, value: Any, low: float, high: float, *, closed_high: bool = False) -> None:
    """Check ``low <= value < high`` (or ``<= high`` when ``closed_high``)."""
    value = require_number(name, value)
    inside = low <= value <= high if closed_high else low <= value < high
    if not inside:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must be in [{low:g}, {high:g}{bracket}; got {value}")


def check_bool(name: str, value: Any) -> None:
    if not is_flag(value):
        raise TypeError(f"{name} must be a bool; got {value!r} of type {type(value).__name__}")


def check_pair(name: str, value: Any) -> tuple[Any, Any]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (a, b); got {value!r}")
    return value[0], value[1]


def check_betas(group: Mapping[str, Any]) -> None:
    """The Adam family's ``betas``: a pair, each in [0, 1)."""
    beta1, beta2 = check_pair("betas", group["betas"])
    check_interval("betas[0]", beta1, 0.0, 1.0)
    check_interval("betas[1]", beta2, 0.0, 1.0)


def check_adam_family(group: Mapping[str, Any]) -> None:
    """The checks torch's Adam, AdamW, Adamax, NAdam and RAdam share."""
    check_min("lr", group["lr"])
    check_min("eps", group["eps"])
    check_betas(group)
    check_min("weight_decay", group["weight_decay"])
    check_bool("maximize", group["maximize"])
    check_device_flags(group)


def check_device_flags(group: Mapping[str, Any]) -> None:
    """Device-only flags: see IGNORED_FLAGS and FALSE_ONLY_FLAGS."""
    for flag in IGNORED_FLAGS:
        if flag in group and group[flag] not in (None, True, False):
            raise ValueError(f"{flag} must be None, True or False; got {group[flag]!r}")
    for flag in FALSE_ONLY_FLAGS:
        if group.get(flag, False):
            raise ValueError(
                f"{flag}=True is a torch device feature shardstep does not have; "
                f"got {flag}={group[flag]!r}, allowed: False"
            )
    if group.get("foreach") and group.get("fused"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
