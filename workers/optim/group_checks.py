"""The checks of a param group's hyperparameters, each naming the argument, the value
received and what is allowed.

A rule's ``validate`` is declared as its group's checks, in the order torch's constructor
makes them (the first failure is the one reported)::

    from shardstep.workers.optim import group_checks as check

    validate = check.all_of(check.non_negative("lr", "eps"), check.flags("maximize"), check.device_flags)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from shardstep.workers.checks import is_flag, is_real

# Flags that only select torch's device kernels or autograd behaviour. They are stored in
# param_groups with torch's values so state_dicts interoperate.
#  - foreach, fused: accepted and ignored; every update here is already one fused pass.
#  - capturable, differentiable: only False is accepted (no CUDA graphs, no autograd through
#    the step); True raises ValueError.
IGNORED_FLAGS = ("foreach", "fused")
FALSE_ONLY_FLAGS = ("capturable", "differentiable")

GroupCheck = Callable[[Mapping[str, Any]], None]


# ---------------------------------------------------------------------------------------
# one value


def number(name: str, value: Any) -> float:
    """A real number (a 0-d float array counts), not NaN; returned as a Python number."""
    if isinstance(value, np.ndarray) and value.ndim == 0 and np.issubdtype(value.dtype, np.floating):
        value = value.item()
    if not is_real(value):
        raise TypeError(f"{name} must be a real number; got {value!r} of type {type(value).__name__}")
    if math.isnan(value):
        raise ValueError(f"{name} must not be NaN; got {value}")
    return value


def at_least(name: str, value: Any, low: float = 0.0) -> None:
    value = number(name, value)
    if not value >= low:
        raise ValueError(f"{name} must be >= {low:g}; got {value}")


def in_interval(name: str, value: Any, low: float, high: float, *, closed_high: bool = False) -> None:
    """``low <= value < high`` (or ``<= high`` when ``closed_high``)."""
    value = number(name, value)
    inside = low <= value <= high if closed_high else low <= value < high
    if not inside:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"{name} must be in [{low:g}, {high:g}{bracket}; got {value}")


def boolean(name: str, value: Any) -> None:
    if not is_flag(value):
        raise TypeError(f"{name} must be a bool; got {value!r} of type {type(value).__name__}")


def pair(name: str, value: Any) -> tuple[Any, Any]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (a, b); got {value!r}")
    return value[0], value[1]


# ---------------------------------------------------------------------------------------
# a group


def all_of(*checks: GroupCheck) -> GroupCheck:
    """One group check that runs ``checks`` in order."""
    def validate(group: Mapping[str, Any]) -> None:
        for group_check in checks:
            group_check(group)
    return validate


def _each(value_check: Callable[[str, Any], Any]) -> Callable[..., GroupCheck]:
    """A group check of the keys it is given, each with ``value_check``."""
    def of_keys(*names: str) -> GroupCheck:
        def group_check(group: Mapping[str, Any]) -> None:
            for name in names:
                value_check(name, group[name])
        return group_check
    return of_keys


non_negative = _each(at_least)   # real numbers >= 0
numbers = _each(number)          # real numbers, of a range torch does not check
flags = _each(boolean)           # bools


def within(name: str, low: float, high: float, *, closed_high: bool = False) -> GroupCheck:
    """``name`` in [low, high) (or [low, high] when ``closed_high``)."""
    return lambda group: in_interval(name, group[name], low, high, closed_high=closed_high)


def betas(group: Mapping[str, Any]) -> None:
    """The Adam family's ``betas``: a pair, each in [0, 1)."""
    beta1, beta2 = pair("betas", group["betas"])
    in_interval("betas[0]", beta1, 0.0, 1.0)
    in_interval("betas[1]", beta2, 0.0, 1.0)


def device_flags(group: Mapping[str, Any]) -> None:
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


# the checks torch's Adam, AdamW, Adamax, NAdam and RAdam share
adam_family = all_of(non_negative("lr", "eps"), betas, non_negative("weight_decay"), flags("maximize"), device_flags)
