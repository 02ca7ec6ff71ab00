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
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
    # derive_defaults(given, stored): set the defaults torch's constructor computes from other
    # arguments (LBFGS's max_eval from max_iter); ``given`` is what the caller passed
    derive_defaults: Callable[[Mapping[str, Any], dict[str, Any]], None] | None = None
    # the algorithm steps all its parameters as one concatenated vector (LBFGS): one param
    # group, one dtype
    one_vector: bool = False

    @property
    def accepts_dense(self) -> bool:
        return self.update is not None

    @property
    def accepts_sparse(self) -> bool:
        return self.update_rows is not None

    def stored_defaults(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """The ``defaults`` a torch-style constructor called with the hyperparameters ``given``
        stores: the rule's defaults, overridden by ``given``, in the rule's key order. A pair
        given as a list (a job file's TOML array) is kept as the tuple torch's default spells,
        so state_dicts compare equal whichever way it came."""
        stored = {**self.defaults, **given}
        for key, default in self.defaults.items():
            if isinstance(default, tuple) and isinstance(stored[key], list):
                stored[key] = tuple(stored[key])
        if self.derive_defaults is not None:
            self.derive_defaults(given, stored)
        return stored


def one_group_only(owner: str) -> ValueError:
    """What an algorithm that steps one concatenated vector says of a second param group."""
    return ValueError(f"{owner} doesn't support per-parameter options (parameter groups); "
                      f"got a group beyond the first, allowed: 1 group")


def one_dtype_only(owner: str, dtypes: Iterable[Any]) -> ValueError:
    """What an algorithm that steps one concatenated vector says of parameters of mixed dtypes."""
    return ValueError(f"{owner} needs all parameters in one dtype (its vectors are concatenated); "
                      f"got {sorted(str(d) for d in dtypes)}")


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
