"""Learning-rate schedulers with torch.optim.lr_scheduler's API and numbers (torch 2.13).

Every scheduler takes the arguments and defaults of its torch namesake and sets the same
Python floats in ``optimizer.param_groups`` tick by tick: the formulas below are evaluated
in torch's operation order, including torch's recursive ("chainable") forms and, when
``step(epoch)`` is given, its closed forms.

Differences from torch, all about state and arguments (never about the numbers):

* ``state_dict()`` is an explicit dict of plain data (numbers, strings, lists, dicts, None;
  see each class's ``fields``), never ``self.__dict__``. It carries the learning
  rates the scheduler last set (``last_lr``), and the momenta for momentum-cycling
  schedulers, and ``load_state_dict`` writes them back into the optimizer's param groups,
  so the optimizer and the scheduler can be restored in either order, and the scheduler
  may even be constructed after the optimizer state was loaded.
* Schedule functions (``lr_lambda``, ``scale_fn``) may be given as ``"module:function"``
  strings; state_dict stores references and callable objects, and refuses lambdas and local
  functions with a ValueError instead of silently dropping them (see docs/schedulers.md).
* ``optimizer.step`` is not wrapped; the "scheduler stepped before the optimizer" warning
  reads the optimizer's ``_step_count``.
* Arguments are validated up front (ValueError/TypeError naming the argument, the value and
  what is allowed), including values torch accepts but then fails on or misbehaves with.
"""

from __future__ import annotations

import copy
import functools
import importlib
import math
import types
import warnings
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

import numpy as np

from shardstep.workers.checks import is_flag, is_integer, is_real
from shardstep.workers.optim.optimizer import Optimizer

__all__ = [
    "LRScheduler",
    "LambdaLR",
    "MultiplicativeLR",
    "StepLR",
    "MultiStepLR",
    "ConstantLR",
    "LinearLR",
    "ExponentialLR",
    "SequentialLR",
    "PolynomialLR",
    "CosineAnnealingLR",
    "ChainedScheduler",
    "ReduceLROnPlateau",
    "CyclicLR",
    "CosineAnnealingWarmRestarts",
    "OneCycleLR",
]

EPOCH_ARGUMENT_WARNING = (
    "passing an epoch to scheduler.step() is deprecated (as in torch): it sets last_epoch to "
    "that epoch and uses the scheduler's closed form where it has one; call step() without "
    "arguments instead"
)
STEP_ORDER_WARNING = (
    "lr_scheduler.step() was called before optimizer.step(); call optimizer.step() first, "
    "otherwise the first value of the learning rate schedule is skipped"
)


# ---------------------------------------------------------------------------------------
# argument checks: each names the argument, the value received and what is allowed


def _plain_number(value: Any) -> Any:
    """numpy scalars become Python numbers so states stay plain data; others pass through."""
    return value.item() if isinstance(value, np.generic) else value


def _real(name: str, value: Any) -> Any:
    if not is_real(value):
        raise TypeError(f"{name} must be a real number; got {value!r} of type {type(value).__name__}")
    return _plain_number(value)


def _positive_real(name: str, value: Any) -> Any:
    value = _real(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be a positive real number; got {value!r}")
    return value


def _non_negative_real(name: str, value: Any) -> Any:
    value = _real(name, value)
    if not value >= 0:
        raise ValueError(f"{name} must be a non-negative real number; got {value!r}")
    return value


def _real_in(name: str, value: Any, interval: str) -> Any:
    """``interval`` is one of "[0, 1]", "(0, 1]", "[0, 1)"."""
    value = _real(name, value)
    low_ok = value > 0 if interval.startswith("(") else value >= 0
    high_ok = value < 1 if interval.endswith(")") else value <= 1
    if not (low_ok and high_ok):
        raise ValueError(f"{name} must be in {interval}; got {value!r}")
    return value


def _positive_int(name: str, value: Any) -> int:
    # ValueError (not TypeError) for non-integers too, as torch raises for T_0 / total_steps
    if not is_integer(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}")
    return int(value)


def _non_negative_int(name: str, value: Any) -> int:
    if not is_integer(value) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    return int(value)


def _last_epoch_argument(value: Any) -> int:
    if not is_integer(value) or value < -1:
        raise ValueError(f"last_epoch must be an integer >= -1; got {value!r}")
    return int(value)


def _choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        names = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"{name} must be one of {names}; got {value!r}")
    return value


def _bool(name: str, value: Any) -> bool:
    if not is_flag(value):
        raise TypeError(f"{name} must be a bool; got {value!r} of type {type(value).__name__}")
    return bool(value)


def _real_as_float(name: str, value: Any) -> float:
    return float(_real(name, value))


def _none_or(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    """``check``, letting None through unchecked."""

    def check_unless_none(name: str, value: Any) -> Any:
        return None if value is None else check(name, value)

    return check_unless_none


def _per_group(name: str, value: Any, groups: int, check: Callable[[str, Any], Any]) -> list:
    """One value for every param group: a scalar is repeated, a list must have one per group."""
    if isinstance(value, (list, tuple)):
        if len(value) != groups:
            raise ValueError(
                f"{name} must be a number or a list of {groups} numbers (one per param group); "
                f"got a list of {len(value)}"
            )
        return [check(f"{name}[{index}]", item) for index, item in enumerate(value)]
    return [check(name, value)] * groups


@runtime_checkable
class SchedulableOptimizer(Protocol):
    """What a scheduler uses of an optimizer: its ``param_groups`` (it writes ``lr`` and the
    keys it cycles), its ``defaults`` (to tell SGD-like from Adam-like momentum) and
    ``_step_count`` (for the step-order warning). Every :class:`Optimizer` has them, and so
    has the coordinator's view of a sharded optimizer, which holds no parameters."""

    defaults: Mapping[str, Any]
    param_groups: list[dict[str, Any]]
    _step_count: int


def _check_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, SchedulableOptimizer) or not isinstance(optimizer.param_groups, list):
        raise TypeError(
            f"optimizer must be a shardstep.workers.optim Optimizer; got {optimizer!r} of type "
            f"{type(optimizer).__name__}"
        )


# ---------------------------------------------------------------------------------------
# momentum: SGD-like optimizers have group["momentum"], Adam-like ones cycle betas[0]


def _momentum_key(optimizer: Optimizer, owner: str) -> str:
    if "betas" in optimizer.defaults:
        return "betas"
    if "momentum" in optimizer.defaults:
        return "momentum"
    raise ValueError(
        f"{owner}: cycle_momentum=True needs an optimizer with 'momentum' or 'betas' in its "
        f"defaults; {type(optimizer).__name__} has neither (pass cycle_momentum=False)"
    )


def _read_momentum(group: Mapping[str, Any], key: str) -> Any:
    return _plain_number(group["betas"][0] if key == "betas" else group["momentum"])


def _write_momentum(group: dict[str, Any], key: str, value: Any) -> None:
    if key == "betas":
        group["betas"] = (value, *group["betas"][1:])
    else:
        group["momentum"] = value


# ---------------------------------------------------------------------------------------
# schedule functions (lr_lambda, scale_fn) that survive state_dict
#
# A function is kept together with the "module:qualname" reference it was given as (or that
# resolves back to it). Stored forms, per function:
#   {"reference": "package.module:function"}
#   {"class": "package.module:Class", "attributes": {...plain __dict__...}}   (callable object)
#   {"same_as": j}   the very object stored at position j (shared, as torch shares one lambda)


# the argument of each scheduler that takes schedule functions (one, or a list of one per group)
SCHEDULE_FUNCTION_ARGUMENTS: dict[str, str] = {"LambdaLR": "lr_lambda", "MultiplicativeLR": "lr_lambda",
                                               "CyclicLR": "scale_fn"}


def resolve_schedule_function(value: Any, argument: str) -> Callable:
    """The callable a schedule-function argument names, without calling it: ``value`` itself,
    or what a ``"module:function"`` string imports to (ValueError or TypeError naming
    ``argument`` otherwise). A job file's check resolves its functions with this, so that
    validation imports the user's code but runs none of it."""
    return _ScheduleFunction.from_argument(value, argument).function


def _resolve_reference(reference: str, argument: str) -> Callable:
    module_name, colon, qualname = reference.partition(":")
    if not colon or not module_name or not qualname:
        raise ValueError(
            f"{argument} must be a callable or a 'package.module:function' reference; got {reference!r}"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"{argument} reference {reference!r}: cannot import {module_name!r} ({error})") from error
    for part in qualname.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ValueError(
                f"{argument} reference {reference!r}: module {module_name!r} has no attribute {qualname!r}"
            ) from None
    if not callable(target):
        raise TypeError(f"{argument} reference {reference!r} names a {type(target).__name__}, which is not callable")
    return target


def _reference_to(target: Any) -> str | None:
    """``module:qualname`` of a function or class when importing it gives back the same object."""
    module_name = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    if not module_name or not qualname or "<" in qualname:
        return None
    reference = f"{module_name}:{qualname}"
    try:
        resolved = _resolve_reference(reference, "reference")
    except (ValueError, TypeError):
        return None
    return reference if resolved is target else None


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(k, (str, int)) and _is_plain(v) for k, v in value.items())
    return False


class _ScheduleFunction:
    """A user function, and the "module:function" string it was given as (else None)."""

    __slots__ = ("function", "reference")

    def __init__(self, function: Callable, reference: str | None = None):
        self.function = function
        self.reference = reference

    @classmethod
    def from_argument(cls, value: Any, argument: str) -> _ScheduleFunction:
        if isinstance(value, str):
            return cls(_resolve_reference(value, argument), value)
        if not callable(value):
            raise TypeError(
                f"{argument} must be a callable or a 'package.module:function' reference; got "
                f"{value!r} of type {type(value).__name__}"
            )
        return cls(value)

    def describe(self, owner: str, label: str) -> dict[str, Any]:
        """The plain-data form of this function for a state_dict, or a ValueError saying why not."""
        if self.reference is not None:
            return {"reference": self.reference}
        function = self.function
        advice = "pass 'module:function' or a callable object"
        if isinstance(function, (types.FunctionType, types.BuiltinFunctionType)):
            reference = _reference_to(function)
            if reference is not None:
                return {"reference": reference}
            qualname = getattr(function, "__qualname__", "")
            if function.__name__ == "<lambda>":
                kind = "a lambda"
            elif "<locals>" in qualname:
                kind = f"a local function ({qualname})"
            else:
                kind = f"a function that does not import back as '{function.__module__}:{qualname}'"
            raise ValueError(f"{owner}: {label} is {kind} and cannot be serialized; {advice}")
        if isinstance(function, types.MethodType):
            raise ValueError(f"{owner}: {label} is a bound method and cannot be serialized; {advice}")
        if isinstance(function, functools.partial):
            raise ValueError(f"{owner}: {label} is a functools.partial and cannot be serialized; {advice}")
        cls = type(function)
        class_reference = _reference_to(cls)
        if class_reference is None:
            raise ValueError(
                f"{owner}: {label} is a callable {cls.__qualname__} object whose class cannot be "
                f"imported back as 'module:Class' and so cannot be serialized; define the class at "
                f"module level or pass 'module:function'"
            )
        attributes = getattr(function, "__dict__", None)
        if attributes is None:
            raise ValueError(
                f"{owner}: {label} is a callable {cls.__qualname__} object without a __dict__ and "
                f"cannot be serialized; {advice} whose state is in plain attributes"
            )
        for name, value in attributes.items():
            if not _is_plain(value):
                raise ValueError(
                    f"{owner}: {label} is a callable {cls.__qualname__} object whose attribute "
                    f"{name!r} holds a {type(value).__name__}; only None, bool, int, float, str and "
                    f"lists/dicts of them can be serialized"
                )
        return {"class": class_reference, "attributes": copy.deepcopy(attributes)}

    @classmethod
    def restore(cls, entry: Any, owner: str, label: str) -> _ScheduleFunction:
        if isinstance(entry, Mapping) and set(entry) == {"reference"}:
            return cls(_resolve_reference(entry["reference"], f"{owner}: {label}"), entry["reference"])
        if isinstance(entry, Mapping) and set(entry) == {"class", "attributes"}:
            target = _resolve_reference(entry["class"], f"{owner}: {label}")
            if not isinstance(target, type) or not isinstance(entry["attributes"], Mapping):
                raise ValueError(f"{owner}: {label} state names {entry['class']!r}, which is not a class")
            # the object's state is its plain attributes: construct without __init__ and set them
            restored = target.__new__(target)
            restored.__dict__.update(copy.deepcopy(dict(entry["attributes"])))
            return cls(restored)
        raise ValueError(
            f"{owner}: {label} state must be {{'reference': 'module:function'}} or "
            f"{{'class': 'module:Class', 'attributes': {{...}}}}; got {entry!r}"
        )


def _functions_per_group(argument: str, value: Any, groups: int) -> list[_ScheduleFunction]:
    if isinstance(value, (list, tuple)):
        if len(value) != groups:
            raise ValueError(
                f"{argument} must be one function or a list of {groups} (one per param group); "
                f"got a list of {len(value)}"
            )
        return [_ScheduleFunction.from_argument(item, f"{argument}[{i}]") for i, item in enumerate(value)]
    # one function shared by every group, as torch shares it
    return [_ScheduleFunction.from_argument(value, argument)] * groups


def _describe_functions(functions: list[_ScheduleFunction], owner: str, argument: str) -> list:
    described: list[dict[str, Any]] = []
    for index, entry in enumerate(functions):
        first = next(j for j, other in enumerate(functions) if other.function is entry.function)
        if first < index:
            described.append({"same_as": first})
        else:
            described.append(entry.describe(owner, f"{argument} for group {index}"))
    return described


def _restore_functions(entries: Any, groups: int, owner: str, argument: str) -> list[_ScheduleFunction]:
    if not isinstance(entries, list) or len(entries) != groups:
        raise ValueError(f"{owner}: state {argument!r} must be a list of {groups} entries; got {entries!r}")
    restored: list[_ScheduleFunction] = []
    for index, entry in enumerate(entries):
        if isinstance(entry, Mapping) and set(entry) == {"same_as"}:
            first = entry["same_as"]
            if not is_integer(first) or not 0 <= first < index:
                raise ValueError(f"{owner}: state {argument}[{index}] refers to entry {first!r}, which is not earlier")
            restored.append(restored[first])
        else:
            restored.append(_ScheduleFunction.restore(entry, owner, f"{argument} for group {index}"))
    return restored


# ---------------------------------------------------------------------------------------
# state_dict helpers


def _float_list(owner: str, key: str, value: Any, length: int | None) -> list:
    if not isinstance(value, (list, tuple)) or not all(is_real(v) for v in value):
        raise ValueError(f"{owner}: state {key!r} must be a list of numbers; got {value!r}")
    if length is not None and len(value) != length:
        raise ValueError(
            f"{owner}: state {key!r} has {len(value)} values; the optimizer has {length} param groups"
        )
    return [_plain_number(v) for v in value]


def _unchanged(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Field:
    """One entry of a scheduler's state_dict, kept in an attribute of the scheduler.

    A scheduler declares its fields once, in state_dict order, in its class attribute
    ``fields``; the base class derives from them the constructor's checks (``_set_fields``),
    the state_dict entries (``_state_fields``) and the load (``_load_fields``).

    ``check(name, value)`` returns the value as plain data or raises an error naming
    ``name``, for constructor arguments and saved entries alike. It is None when checking
    needs the scheduler itself (its param groups, its settings, other entries of the state):
    the class's own load code then checks and applies the field. ``from_state`` turns a
    checked value into the attribute's form, ``to_state`` turns the attribute back.
    """

    name: str
    check: Callable[[str, Any], Any] | None
    to_state: Callable[[Any], Any] = _unchanged
    from_state: Callable[[Any], Any] = _unchanged
    # the attribute, when it is not ``name`` (a private one, or a name a method has)
    attribute: str | None = None

    @property
    def attribute_name(self) -> str:
        return self.attribute or self.name


class LRScheduler:
    """Base class: adjusts ``group["lr"]`` of every param group of an optimizer.

    Construction records ``base_lrs`` (each group's ``initial_lr``, set from ``lr`` when
    ``last_epoch == -1``) and takes an initial step to epoch ``last_epoch + 1``. Each
    :meth:`step` advances ``last_epoch`` and sets the rates :meth:`get_lr` computes.

    Subclasses implement :meth:`get_lr` (and optionally ``_closed_form_lr``), and declare
    their extra state in ``fields`` (see :class:`Field`).
    """

    # this class's state beyond the common entries, in state_dict order
    fields: tuple[Field, ...] = ()
    # set while the constructor takes its initial step (torch's ``_is_initial``)
    _is_initial: bool = False
    # "momentum" or "betas" when this scheduler drives momentum, else None
    _momentum_key: str | None = None

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        last_epoch = _last_epoch_argument(last_epoch)
        self.optimizer = optimizer
        if last_epoch == -1:
            for group in optimizer.param_groups:
                group.setdefault("initial_lr", group["lr"])
        else:
            for index, group in enumerate(optimizer.param_groups):
                if "initial_lr" not in group:
                    raise KeyError(
                        f"param_groups[{index}] has no 'initial_lr'; {type(self).__name__} with "
                        f"last_epoch={last_epoch} resumes a schedule and reads 'initial_lr', which "
                        f"the first scheduler on this optimizer set. Load the optimizer state first, "
                        f"or construct with last_epoch=-1 and restore with load_state_dict()"
                    )
        self.base_lrs: list = [_plain_number(group["initial_lr"]) for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        # to warn when step() runs before any optimizer.step() since construction
        self._optimizer_steps_at_init = optimizer._step_count
        self._initial_step()

    def _initial_step(self) -> None:
        self._step_count = 0
        self._is_initial = True
        try:
            self.step()
        finally:
            self._is_initial = False

    # -- stepping ---------------------------------------------------------------------------

    def get_lr(self) -> list:
        """The rates for ``last_epoch`` (called by :meth:`step`; read :meth:`get_last_lr`)."""
        raise NotImplementedError(f"{type(self).__name__} must implement get_lr()")

    def get_last_lr(self) -> list:
        """The learning rates this scheduler last set, one per param group."""
        return list(self._last_lr)

    def step(self, epoch: int | None = None) -> None:
        """Advance one epoch. ``epoch`` (deprecated, as in torch) jumps to that epoch and uses
        the closed form where the scheduler has one."""
        if self._step_count == 1 and self.optimizer._step_count == self._optimizer_steps_at_init:
            warnings.warn(STEP_ORDER_WARNING, UserWarning, stacklevel=2)
        self._step_count += 1
        if epoch is not None:
            warnings.warn(EPOCH_ARGUMENT_WARNING, UserWarning, stacklevel=2)
        self._update_lr(epoch)

    def _update_lr(self, epoch: int | None = None) -> None:
        if epoch is None:
            self.last_epoch += 1
            rates = self.get_lr()
        else:
            self.last_epoch = epoch
            closed_form = getattr(self, "_closed_form_lr", None)
            rates = closed_form() if closed_form is not None else self.get_lr()
        self._apply(rates)

    def _apply(self, rates: Sequence[Any]) -> None:
        groups = self.optimizer.param_groups
        if len(rates) != len(groups):
            raise ValueError(
                f"{type(self).__name__} computed {len(rates)} learning rates for "
                f"{len(groups)} param groups; was a param group added after the scheduler was built?"
            )
        for group, rate in zip(groups, rates):
            group["lr"] = rate
        self._record_last()

    def _group_rates(self) -> list:
        return [group["lr"] for group in self.optimizer.param_groups]

    def _record_last(self) -> None:
        self._last_lr = [_plain_number(group["lr"]) for group in self.optimizer.param_groups]
        if self._momentum_key is not None:
            self._last_momentum = [_read_momentum(g, self._momentum_key) for g in self.optimizer.param_groups]

    def _restore_last_lr(self, last_lr: list) -> None:
        """Take ``last_lr`` (checked) as the last rates and write them into the param groups,
        as the step that computed them did."""
        self._last_lr = last_lr
        for group, rate in zip(self.optimizer.param_groups, last_lr):
            group["lr"] = rate

    # -- state ------------------------------------------------------------------------------

    def _set_fields(self, **arguments: Any) -> None:
        """Check constructor arguments against their fields and set them, in the order given:
        the first bad argument in the constructor's order is the one reported."""
        declared = {field.name: field for field in self.fields if field.check is not None}
        for name, value in arguments.items():
            field = declared[name]
            setattr(self, field.attribute_name, field.from_state(field.check(name, value)))

    @classmethod
    def _field_names(cls) -> tuple[str, ...]:
        return tuple(field.name for field in cls.fields)

    def _state_fields(self) -> dict[str, Any]:
        """This class's state beyond the common entries (plain data only)."""
        return {field.name: field.to_state(getattr(self, field.attribute_name)) for field in self.fields}

    def _checked_fields(self, state: Mapping[str, Any], taken_as_saved: Sequence[str] = ()) -> dict[str, Any]:
        """The saved value of every field that has a check, checked, by attribute; the fields
        in ``taken_as_saved`` are taken as they are."""
        values = {}
        for field in self.fields:
            if field.check is None:
                continue
            value = state[field.name]
            if field.name not in taken_as_saved:
                value = field.from_state(field.check(field.name, value))
            values[field.attribute_name] = value
        return values

    def _load_fields(self, state: Mapping[str, Any]) -> Callable[[], None]:
        """Check ``state`` and return a function that applies it (so nothing changes unless the
        whole state is valid). Fields without a check are left to the class's own code."""
        self._check_state(state, self._field_names())
        values = self._checked_fields(state)
        return lambda: self.__dict__.update(values)

    _common_keys: tuple[str, ...] = ("last_epoch", "step_count", "base_lrs", "last_lr")

    def _common_state(self) -> dict[str, Any]:
        return {
            "last_epoch": self.last_epoch,
            "step_count": self._step_count,
            "base_lrs": list(self.base_lrs),
            "last_lr": list(self._last_lr),
        }

    def state_dict(self) -> dict[str, Any]:
        """The scheduler's state as a dict of plain data (see the module docstring)."""
        state = {"scheduler": type(self).__name__, **self._common_state()}
        if self._momentum_key is not None:
            state["momentum_key"] = self._momentum_key
            state["last_momentum"] = list(self._last_momentum)
        state.update(self._state_fields())
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict` and write the saved learning rates (and momenta) into
        the optimizer's param groups, so the load order of optimizer and scheduler is free."""
        self._prepare_load(state_dict)()

    def _check_state(self, state_dict: Any, required: Iterable[str]) -> Mapping[str, Any]:
        owner = type(self).__name__
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{owner}.load_state_dict() needs a dict; got {type(state_dict).__name__}")
        saved_as = state_dict.get("scheduler")
        if saved_as != owner:
            raise ValueError(f"{owner}.load_state_dict() got the state of a {saved_as!r} scheduler")
        missing = [key for key in required if key not in state_dict]
        if missing:
            raise ValueError(f"{owner}.load_state_dict(): state is missing {', '.join(map(repr, missing))}")
        return state_dict

    def _prepare_momentum(self, state: Mapping[str, Any]) -> Callable[[], None]:
        owner, groups = type(self).__name__, len(self.optimizer.param_groups)
        key = state.get("momentum_key")
        if key != self._momentum_key:
            raise ValueError(
                f"{owner}: state drives {key or 'no momentum'!r} but this scheduler drives "
                f"{self._momentum_key or 'no momentum'!r}"
            )
        if key is None:
            return lambda: None
        momenta = _float_list(owner, "last_momentum", state.get("last_momentum"), groups)

        def apply() -> None:
            self._last_momentum = momenta
            for group, value in zip(self.optimizer.param_groups, momenta):
                _write_momentum(group, key, value)

        return apply

    def _prepare_load(self, state_dict: Mapping[str, Any]) -> Callable[[], None]:
        owner, groups = type(self).__name__, len(self.optimizer.param_groups)
        state = self._check_state(state_dict, self._common_keys)
        # a real number: step(epoch) may have set a fractional epoch, as torch allows
        last_epoch = _real(f"{owner}: state 'last_epoch'", state["last_epoch"])
        step_count = _non_negative_int(f"{owner}: state 'step_count'", state["step_count"])
        base_lrs = _float_list(owner, "base_lrs", state["base_lrs"], groups)
        last_lr = _float_list(owner, "last_lr", state["last_lr"], groups)
        apply_fields = self._load_fields(state)
        apply_momentum = self._prepare_momentum(state)

        def apply() -> None:
            apply_fields()
            self.last_epoch = last_epoch
            self._step_count = step_count
            self.base_lrs = base_lrs
            self._restore_last_lr(last_lr)
            apply_momentum()

        return apply


# ---------------------------------------------------------------------------------------
# schedules of a function of the epoch


class LambdaLR(LRScheduler):
    """lr = base_lr * lr_lambda(last_epoch).

    ``lr_lambda``: a function, a ``"module:function"`` reference, a callable object, or a
    list of those (one per param group). See docs/schedulers.md for what survives state_dict.
    """

    def __init__(self, optimizer: Optimizer, lr_lambda: Any, last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        self._lr_lambdas = _functions_per_group("lr_lambda", lr_lambda, len(optimizer.param_groups))
        super().__init__(optimizer, last_epoch)

    @property
    def lr_lambdas(self) -> list[Callable]:
        return [entry.function for entry in self._lr_lambdas]

    def get_lr(self) -> list:
        return [
            base_lr * entry.function(self.last_epoch)
            for entry, base_lr in zip(self._lr_lambdas, self.base_lrs, strict=True)
        ]

    # lr_lambdas is no Field: its stored form names the scheduler's own class (LambdaLR or
    # MultiplicativeLR) in its errors, and restoring it needs the number of param groups.
    def _state_fields(self) -> dict[str, Any]:
        return {"lr_lambdas": _describe_functions(self._lr_lambdas, type(self).__name__, "lr_lambda")}

    def _load_fields(self, state: Mapping[str, Any]) -> Callable[[], None]:
        self._check_state(state, ("lr_lambdas",))
        restored = _restore_functions(
            state["lr_lambdas"], len(self.optimizer.param_groups), type(self).__name__, "lr_lambda"
        )
        return lambda: setattr(self, "_lr_lambdas", restored)


class MultiplicativeLR(LambdaLR):
    """lr = lr * lr_lambda(last_epoch), from the second epoch on (the rate compounds)."""

    def get_lr(self) -> list:
        if self._is_initial:
            return self._group_rates()
        return [
            group["lr"] * entry.function(self.last_epoch)
            for entry, group in zip(self._lr_lambdas, self.optimizer.param_groups, strict=True)
        ]


# ---------------------------------------------------------------------------------------
# decays


class StepLR(LRScheduler):
    """lr = base_lr * gamma ** (last_epoch // step_size): multiply by gamma every step_size
    epochs (recursively: lr * gamma at each non-zero multiple of step_size)."""

    fields = (Field("step_size", _positive_int), Field("gamma", _positive_real))

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1) -> None:
        self._set_fields(step_size=step_size, gamma=gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        if self.last_epoch == 0 or self.last_epoch % self.step_size != 0:
            return self._group_rates()
        return [group["lr"] * self.gamma for group in self.optimizer.param_groups]

    def _closed_form_lr(self) -> list:
        return [base_lr * self.gamma ** (self.last_epoch // self.step_size) for base_lr in self.base_lrs]


def _milestone_list(name: str, milestones: Any, *, strictly_increasing: bool) -> list[int]:
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable):
        raise TypeError(f"{name} must be a list of integers; got {milestones!r}")
    values = list(milestones)
    for value in values:
        if not is_integer(value) or value < 0:
            raise ValueError(f"{name} must be non-negative integers; got {milestones!r}")
    values = [int(v) for v in values]
    ordered = all(a < b if strictly_increasing else a <= b for a, b in zip(values, values[1:]))
    if not ordered:
        how = "increasing" if strictly_increasing else "non-decreasing"
        raise ValueError(f"{name} must be {how}; got {values!r}")
    return values


class MultiStepLR(LRScheduler):
    """lr = base_lr * gamma ** (number of milestones <= last_epoch); a milestone listed n
    times multiplies by gamma ** n."""

    fields = (
        # a Counter of milestones, saved as the sorted list with repeats
        Field("milestones", partial(_milestone_list, strictly_increasing=False),
              to_state=lambda milestones: sorted(milestones.elements()), from_state=Counter),
        Field("gamma", _positive_real),
    )

    def __init__(self, optimizer: Optimizer, milestones: Iterable[int], gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        self._set_fields(milestones=milestones, gamma=gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        if self.last_epoch not in self.milestones:
            return self._group_rates()
        return [group["lr"] * self.gamma ** self.milestones[self.last_epoch] for group in self.optimizer.param_groups]

    def _closed_form_lr(self) -> list:
        passed = bisect_right(sorted(self.milestones.elements()), self.last_epoch)
        return [base_lr * self.gamma ** passed for base_lr in self.base_lrs]


class ConstantLR(LRScheduler):
    """lr = base_lr * factor for epochs < total_iters, then base_lr (recursively: lr * factor
    at epoch 0, lr * (1.0 / factor) at total_iters)."""

    fields = (
        # torch allows factor 0, then divides by it at total_iters
        Field("factor", partial(_real_in, interval="(0, 1]")),
        Field("total_iters", _positive_int),
    )

    def __init__(self, optimizer: Optimizer, factor: float = 1.0 / 3, total_iters: int = 5,
                 last_epoch: int = -1) -> None:
        self._set_fields(factor=factor, total_iters=total_iters)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        if self.last_epoch == 0:
            return [group["lr"] * self.factor for group in self.optimizer.param_groups]
        if self.last_epoch != self.total_iters:
            return self._group_rates()
        return [group["lr"] * (1.0 / self.factor) for group in self.optimizer.param_groups]

    def _closed_form_lr(self) -> list:
        return [
            base_lr * (self.factor + (self.last_epoch >= self.total_iters) * (1 - self.factor))
            for base_lr in self.base_lrs
        ]


class LinearLR(LRScheduler):
    """lr = base_lr * (start_factor + (end_factor - start_factor) * min(last_epoch,
    total_iters) / total_iters), evaluated recursively as torch does."""

    fields = (
        Field("start_factor", partial(_real_in, interval="(0, 1]")),
        Field("end_factor", partial(_real_in, interval="[0, 1]")),
        Field("total_iters", _positive_int),
    )

    def __init__(self, optimizer: Optimizer, start_factor: float = 1.0 / 3, end_factor: float = 1.0,
                 total_iters: int = 5, last_epoch: int = -1) -> None:
        self._set_fields(start_factor=start_factor, end_factor=end_factor, total_iters=total_iters)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        if self.last_epoch == 0:
            return [group["lr"] * self.start_factor for group in self.optimizer.param_groups]
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._group_rates()
        change = self.end_factor - self.start_factor
        ratio = 1.0 + change / (self.total_iters * self.start_factor + (self.last_epoch - 1) * change)
        return [group["lr"] * ratio for group in self.optimizer.param_groups]

    def _closed_form_lr(self) -> list:
        return [
            base_lr * (self.start_factor + (self.end_factor - self.start_factor)
                       * min(self.total_iters, self.last_epoch) / self.total_iters)
            for base_lr in self.base_lrs
        ]


class ExponentialLR(LRScheduler):
    """lr = base_lr * gamma ** last_epoch (recursively: lr * gamma each epoch)."""

    fields = (Field("gamma", _positive_real),)

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        self._set_fields(gamma=gamma)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        # the constructor's step must not advance a resumed schedule
        if self._is_initial:
            return self._group_rates()
        return [group["lr"] * self.gamma for group in self.optimizer.param_groups]

    def _closed_form_lr(self) -> list:
        return [base_lr * self.gamma ** self.last_epoch for base_lr in self.base_lrs]


class PolynomialLR(LRScheduler):
    """lr = base_lr * (1 - min(last_epoch, total_iters) / total_iters) ** power
    (recursively: lr * ((1 - e / T) / (1 - (e - 1) / T)) ** power)."""

    fields = (
        Field("total_iters", _positive_int),
        # a negative power divides by zero at total_iters
        Field("power", _non_negative_real),
    )

    def __init__(self, optimizer: Optimizer, total_iters: int = 5, power: float = 1.0,
                 last_epoch: int = -1) -> None:
        self._set_fields(total_iters=total_iters, power=power)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        if self._is_initial or self.last_epoch > self.total_iters:
            return self._group_rates()
        decay = ((1.0 - self.last_epoch / self.total_iters)
                 / (1.0 - (self.last_epoch - 1) / self.total_iters)) ** self.power
        return [group["lr"] * decay for group in self.optimizer.param_groups]

    def _closed_form_lr(self) -> list:
        return [
            base_lr * (1.0 - min(self.total_iters, self.last_epoch) / self.total_iters) ** self.power
            for base_lr in self.base_lrs
        ]


class CosineAnnealingLR(LRScheduler):
    """lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * last_epoch / T_max)) / 2, in torch's
    recursive form lr' = eta_min + (lr - eta_min) * (1 + cos(pi e / T)) / (1 + cos(pi (e-1) / T))
    (which keeps following a cosine past T_max), and in closed form for step(epoch)."""

    fields = (Field("T_max", _positive_int), Field("eta_min", _non_negative_real))

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1) -> None:
        self._set_fields(T_max=T_max, eta_min=eta_min)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        epoch, period, floor = self.last_epoch, self.T_max, self.eta_min
        if self._is_initial:
            return self._group_rates()
        if self._step_count == 1 and epoch > 0:
            return [
                floor + (base_lr - floor) * (1 + math.cos(epoch * math.pi / period)) / 2
                for base_lr in self.base_lrs
            ]
        if (epoch - 1 - period) % (2 * period) == 0:
            # at the bottom of the cosine the recursive ratio is 0/0: step up by the first increment
            return [
                group["lr"] + (base_lr - floor) * (1 - math.cos(math.pi / period)) / 2
                for base_lr, group in zip(self.base_lrs, self.optimizer.param_groups, strict=True)
            ]
        ratio_numerator = 1 + math.cos(math.pi * epoch / period)
        ratio_denominator = 1 + math.cos(math.pi * (epoch - 1) / period)
        return [
            ratio_numerator / ratio_denominator * (group["lr"] - floor) + floor
            for group in self.optimizer.param_groups
        ]

    def _closed_form_lr(self) -> list:
        return [
            self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * self.last_epoch / self.T_max)) / 2
            for base_lr in self.base_lrs
        ]


class CosineAnnealingWarmRestarts(LRScheduler):
    """SGDR: lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * T_cur / T_i)) / 2, where T_cur
    counts epochs since the last restart and T_i (first T_0) grows by T_mult at each restart.
    ``step(epoch)`` accepts fractional epochs (``epoch + batch / batches``)."""

    fields = (
        Field("T_0", _positive_int),
        Field("T_i", _positive_int),
        Field("T_mult", _positive_int),
        Field("eta_min", _non_negative_real),
        # fractional after step(epoch) with a fractional epoch
        Field("T_cur", _real),
    )

    def __init__(self, optimizer: Optimizer, T_0: int, T_mult: int = 1, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        self._set_fields(T_0=T_0, T_mult=T_mult, eta_min=eta_min)
        # T_i and T_cur are the position in the schedule, not arguments: the first period, at last_epoch
        self.T_i = self.T_0
        self.T_cur = _last_epoch_argument(last_epoch)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list:
        return [
            self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * self.T_cur / self.T_i)) / 2
            for base_lr in self.base_lrs
        ]

    def step(self, epoch: float | None = None) -> None:
        """Advance one epoch, or go to ``epoch`` (may be fractional; counts from 0)."""
        if epoch is None and self.last_epoch < 0:
            epoch = 0
        if epoch is None:
            epoch = self.last_epoch + 1
            self.T_cur = self.T_cur + 1
            if self.T_cur >= self.T_i:
                self.T_cur = self.T_cur % self.T_i
                self.T_i = self.T_i * self.T_mult
        else:
            epoch = _real("epoch", epoch)
            if epoch < 0:
                raise ValueError(f"epoch must be >= 0; got {epoch!r}")
            if epoch < self.T_0:
                self.T_i = self.T_0
                self.T_cur = epoch
            elif self.T_mult == 1:
                self.T_cur = epoch % self.T_0
            else:
                # restarts so far: the largest n with T_0 * (T_mult**n - 1) / (T_mult - 1) <= epoch
                n = int(math.log((epoch / self.T_0 * (self.T_mult - 1) + 1), self.T_mult))
                self.T_cur = epoch - self.T_0 * (self.T_mult**n - 1) / (self.T_mult - 1)
                self.T_i = self.T_0 * self.T_mult ** (n)
        self.last_epoch = math.floor(epoch)
        self._apply(self.get_lr())


# ---------------------------------------------------------------------------------------
# metric-driven


class ReduceLROnPlateau(LRScheduler):
    """lr = max(lr * factor, min_lr) once the metric has not improved for more than
    ``patience`` steps (then wait ``cooldown`` steps); reductions smaller than eps are skipped.

    Improvement: mode "min" & "rel": metric < best * (1 - threshold); "min" & "abs":
    metric < best - threshold; "max" & "rel": metric > best * (threshold + 1); "max" & "abs":
    metric > best + threshold.
    """

    # Not the common state of the other schedulers: this one has no base rates and no step
    # count, so its last_epoch and last_lr are fields of its own.
    fields = (
        Field("last_epoch", _real),
        # checked against the optimizer's param groups, and written into them, by _prepare_load
        Field("last_lr", None, to_state=list, attribute="_last_lr"),
        Field("best", _real_as_float),
        Field("num_bad_epochs", _non_negative_int),
        Field("cooldown_counter", _non_negative_int),
        Field("mode", partial(_choice, allowed=("min", "max"))),
        Field("factor", partial(_real_in, interval="[0, 1)")),
        Field("patience", _non_negative_int),
        Field("threshold", _non_negative_real),
        Field("threshold_mode", partial(_choice, allowed=("rel", "abs"))),
        Field("cooldown", _non_negative_int),
        Field("eps", _non_negative_real),
        # any length: _reduce_lr refills it from default_min_lr when the param groups change
        Field("min_lrs", partial(_float_list, "ReduceLROnPlateau", length=None), to_state=list),
        Field("default_min_lr", _none_or(_non_negative_real)),
    )

    def __init__(self, optimizer: Optimizer, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: float | list[float] = 0, eps: float = 1e-8) -> None:
        # torch checks factor even before the optimizer
        self._set_fields(factor=factor)
        _check_optimizer(optimizer)
        self.optimizer = optimizer
        groups = len(optimizer.param_groups)
        # one argument, two fields: a number is also kept for param groups added later
        if isinstance(min_lr, (list, tuple)):
            self.default_min_lr = None
            self.min_lrs = _per_group("min_lr", min_lr, groups, _non_negative_real)
        else:
            self.default_min_lr = _non_negative_real("min_lr", min_lr)
            self.min_lrs = [self.default_min_lr] * groups
        self._set_fields(patience=patience, cooldown=cooldown, eps=eps, mode=mode, threshold=threshold,
                         threshold_mode=threshold_mode)
        self.last_epoch = 0
        self.best = self._worst
        self.cooldown_counter = 0
        self.num_bad_epochs = 0
        self._record_last()

    @property
    def _worst(self) -> float:
        return math.inf if self.mode == "min" else -math.inf

    @property
    def in_cooldown(self) -> bool:
        return self.cooldown_counter > 0

    def _is_better(self, value: float, best: float) -> bool:
        if self.mode == "min" and self.threshold_mode == "rel":
            return value < best * (1.0 - self.threshold)
        if self.mode == "min":
            return value < best - self.threshold
        if self.threshold_mode == "rel":
            return value > best * (self.threshold + 1.0)
        return value > best + self.threshold

    def step(self, metrics: Any, epoch: int | None = None) -> None:  # type: ignore[override]
        """Record one value of the monitored metric and reduce the rates if it stagnates."""
        current = float(metrics)
        if epoch is None:
            epoch = self.last_epoch + 1
        else:
            warnings.warn(EPOCH_ARGUMENT_WARNING, UserWarning, stacklevel=2)
        self.last_epoch = epoch
        if self._is_better(current, self.best):
            self.best = current
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.in_cooldown:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # bad epochs during cooldown do not count
        if self.num_bad_epochs > self.patience:
            self._reduce_lr()
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        self._record_last()

    def _reduce_lr(self) -> None:
        groups = self.optimizer.param_groups
        if len(groups) != len(self.min_lrs):
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"ReduceLROnPlateau was built for {len(self.min_lrs)} param groups with a "
                    f"min_lr per group, but the optimizer now has {len(groups)}; set min_lrs to a "
                    f"list of {len(groups)} values"
                )
            self.min_lrs = [self.default_min_lr] * len(groups)
        for group, min_lr in zip(groups, self.min_lrs):
            old_lr = float(group["lr"])
            new_lr = max(old_lr * self.factor, min_lr)
            if old_lr - new_lr > self.eps:
                group["lr"] = new_lr

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": "ReduceLROnPlateau", **self._state_fields()}

    def _prepare_load(self, state_dict: Mapping[str, Any]) -> Callable[[], None]:
        apply_fields = self._load_fields(state_dict)
        groups = len(self.optimizer.param_groups)
        last_lr = _float_list("ReduceLROnPlateau", "last_lr", state_dict["last_lr"], groups)

        def apply() -> None:
            apply_fields()
            self._restore_last_lr(last_lr)

        return apply


# ---------------------------------------------------------------------------------------
# cycles

def _copy_unless_none(values: list | None) -> list | None:
    return None if values is None else list(values)


def _scale_fn_state(scale_fn: _ScheduleFunction | None) -> dict[str, Any] | None:
    return None if scale_fn is None else scale_fn.describe("CyclicLR", "scale_fn")


def _check_same_cycle_momentum(owner: str, saved: Any, built: bool) -> None:
    """A state cycles momentum exactly when the scheduler loading it does: the momentum
    key and the param groups' momentum bounds are fixed at construction."""
    saved = _bool("cycle_momentum", saved)
    if saved != built:
        raise ValueError(
            f"{owner}: state has cycle_momentum={saved} but this scheduler was built with cycle_momentum={built}"
        )


class CyclicLR(LRScheduler):
    """Cyclical learning rates (Smith 2017): with cycle = floor(1 + e / (up + down)) and x the
    position in the cycle, lr = base_lr + (max_lr - base_lr) * scale * s(x), where scale rises
    0→1 over step_size_up and falls back over step_size_down, and s is the amplitude policy:
    "triangular" 1, "triangular2" 1 / 2**(cycle - 1), "exp_range" gamma**e, or ``scale_fn``
    of the cycle or iteration (``scale_mode``). With cycle_momentum, momentum (or betas[0])
    moves inversely between max_momentum and base_momentum.
    """

    # The fields without a check are checked by _load_fields: max_lrs and the momentum lists
    # must have one value per param group, the momentum lists are only kept with
    # cycle_momentum (None otherwise), which must be what this scheduler was built with, and
    # scale_fn is restored from its stored form.
    fields = (
        Field("max_lrs", None, to_state=list),
        Field("total_size", _positive_real),
        Field("step_ratio", partial(_real_in, interval="(0, 1]")),
        Field("mode", partial(_choice, allowed=("triangular", "triangular2", "exp_range"))),
        Field("gamma", _positive_real),
        Field("scale_mode", partial(_choice, allowed=("cycle", "iterations"))),
        Field("scale_fn", None, to_state=_scale_fn_state, attribute="_scale_fn"),
        Field("cycle_momentum", None),
        Field("base_momentums", None, to_state=_copy_unless_none),
        Field("max_momentums", None, to_state=_copy_unless_none),
    )

    def __init__(self, optimizer: Optimizer, base_lr: float | list[float], max_lr: float | list[float],
                 step_size_up: int = 2000, step_size_down: int | None = None, mode: str = "triangular",
                 gamma: float = 1.0, scale_fn: Any = None, scale_mode: str = "cycle",
                 cycle_momentum: bool = True, base_momentum: float | list[float] = 0.8,
                 max_momentum: float | list[float] = 0.9, last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        last_epoch = _last_epoch_argument(last_epoch)
        groups = len(optimizer.param_groups)
        base_lrs = _per_group("base_lr", base_lr, groups, _non_negative_real)
        self.max_lrs = _per_group("max_lr", max_lr, groups, _non_negative_real)
        up = float(_positive_real("step_size_up", step_size_up))
        down = up if step_size_down is None else float(_positive_real("step_size_down", step_size_down))
        self.total_size = up + down
        self.step_ratio = up / self.total_size
        self._scale_fn = None if scale_fn is None else _ScheduleFunction.from_argument(scale_fn, "scale_fn")
        if self._scale_fn is None:
            self._set_fields(mode=mode)
            # the built-in policies fix what they scale by, as in torch
            self.scale_mode = "iterations" if mode == "exp_range" else "cycle"
        else:
            if not isinstance(mode, str):
                raise TypeError(f"mode must be a string; got {mode!r} of type {type(mode).__name__}")
            self.mode = mode  # ignored when scale_fn is given, as in torch
            self._set_fields(scale_mode=scale_mode)
        self._set_fields(gamma=gamma)
        self.cycle_momentum = _bool("cycle_momentum", cycle_momentum)
        self.base_momentums = self.max_momentums = None  # kept only with cycle_momentum
        if self.cycle_momentum:
            self._momentum_key = _momentum_key(optimizer, "CyclicLR")
            self.base_momentums = _per_group("base_momentum", base_momentum, groups, _non_negative_real)
            self.max_momentums = _per_group("max_momentum", max_momentum, groups, _non_negative_real)
        if last_epoch == -1:
            for group, rate in zip(optimizer.param_groups, base_lrs):
                group["lr"] = rate
            if self.cycle_momentum:
                for group, low, high in zip(optimizer.param_groups, self.base_momentums, self.max_momentums):
                    _write_momentum(group, self._momentum_key, high)
                    group["max_momentum"] = high
                    group["base_momentum"] = low
        super().__init__(optimizer, last_epoch)
        self.base_lrs = base_lrs

    def scale_fn(self, x: float) -> float:
        """The amplitude policy at cycle or iteration ``x``."""
        if self._scale_fn is not None:
            return self._scale_fn.function(x)
        if self.mode == "triangular":
            return 1.0
        if self.mode == "triangular2":
            return 1 / (2.0 ** (x - 1))
        return self.gamma**x

    def get_lr(self) -> list:
        cycle = math.floor(1 + self.last_epoch / self.total_size)
        x = 1.0 + self.last_epoch / self.total_size - cycle
        if x <= self.step_ratio:
            scale_factor = x / self.step_ratio
        else:
            scale_factor = (x - 1) / (self.step_ratio - 1)
        scale_at = cycle if self.scale_mode == "cycle" else self.last_epoch
        # scale_fn is called once per group and use, as torch does (it may keep state)
        rates = [
            base_lr + (max_lr - base_lr) * scale_factor * self.scale_fn(scale_at)
            for base_lr, max_lr in zip(self.base_lrs, self.max_lrs, strict=True)
        ]
        if self.cycle_momentum:
            momenta = [
                high - (high - low) * scale_factor * self.scale_fn(scale_at)
                for low, high in zip(self.base_momentums, self.max_momentums, strict=True)
            ]
            for group, momentum in zip(self.optimizer.param_groups, momenta, strict=True):
                _write_momentum(group, self._momentum_key, momentum)
        return rates

    def _load_fields(self, state: Mapping[str, Any]) -> Callable[[], None]:
        self._check_state(state, self._field_names())
        groups = len(self.optimizer.param_groups)
        _check_same_cycle_momentum("CyclicLR", state["cycle_momentum"], self.cycle_momentum)
        scale_fn = state["scale_fn"]
        if scale_fn is not None:
            scale_fn = _ScheduleFunction.restore(scale_fn, "CyclicLR", "scale_fn")
        values = {"_scale_fn": scale_fn, "max_lrs": _float_list("CyclicLR", "max_lrs", state["max_lrs"], groups)}
        # with a scale_fn the mode is ignored (as in torch), so any saved mode is kept as it is
        values.update(self._checked_fields(state, taken_as_saved=("mode",) if scale_fn is not None else ()))
        if self.cycle_momentum:
            values["base_momentums"] = _float_list("CyclicLR", "base_momentums", state["base_momentums"], groups)
            values["max_momentums"] = _float_list("CyclicLR", "max_momentums", state["max_momentums"], groups)
        # group["max_momentum"] / ["base_momentum"] are informational for CyclicLR (it reads its
        # own lists), and a resumed CyclicLR never sets them: they are left to the optimizer state
        return lambda: self.__dict__.update(values)


_PHASE_KEYS = frozenset({"end_step", "start_lr", "end_lr", "start_momentum", "end_momentum"})


def _phase(end_step: float, start_lr: str, end_lr: str, start_momentum: str, end_momentum: str) -> dict[str, Any]:
    return {"end_step": end_step, "start_lr": start_lr, "end_lr": end_lr,
            "start_momentum": start_momentum, "end_momentum": end_momentum}


def _phase_list(name: str, phases: Any) -> list[dict[str, Any]]:
    if not isinstance(phases, list) or not phases or not all(
        isinstance(p, Mapping) and set(p) == _PHASE_KEYS for p in phases
    ):
        raise ValueError(f"OneCycleLR: state {name!r} must be a list of phase dicts; got {phases!r}")
    return [dict(p) for p in phases]


class OneCycleLR(LRScheduler):
    """1cycle (Smith & Topin 2017): lr anneals from max_lr / div_factor up to max_lr over
    pct_start of total_steps, then down to initial_lr / final_div_factor (three_phase: back to
    initial_lr first, then down). Annealing is cosine, end + (start - end) / 2 * (cos(pi*pct)
    + 1), or linear, (end - start) * pct + start. Momentum moves inversely (cycle_momentum).

    The per-group bounds live in the param groups, as in torch: initial_lr, max_lr, min_lr and
    (with cycle_momentum) max_momentum, base_momentum.
    """

    # The fields without a check are checked by _load_fields: cycle_momentum must be what
    # this scheduler was built with, and group_bounds must hold its bounds for each param
    # group, where it writes them back.
    fields = (
        Field("total_steps", _positive_int),
        Field("phases", _phase_list, to_state=copy.deepcopy, attribute="_phases"),
        Field("anneal_strategy", partial(_choice, allowed=("cos", "linear"))),
        Field("cycle_momentum", None),
        Field("group_bounds", None, attribute="_group_bounds"),
    )

    def __init__(self, optimizer: Optimizer, max_lr: float | list[float], total_steps: int | None = None,
                 epochs: int | None = None, steps_per_epoch: int | None = None, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", cycle_momentum: bool = True,
                 base_momentum: float | list[float] = 0.85, max_momentum: float | list[float] = 0.95,
                 div_factor: float = 25.0, final_div_factor: float = 1e4, three_phase: bool = False,
                 last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        last_epoch = _last_epoch_argument(last_epoch)
        if total_steps is not None:
            self._set_fields(total_steps=total_steps)
        elif epochs is not None and steps_per_epoch is not None:
            self.total_steps = _positive_int("epochs", epochs) * _positive_int("steps_per_epoch", steps_per_epoch)
        else:
            raise ValueError(
                "OneCycleLR needs total_steps, or both epochs and steps_per_epoch; got "
                f"total_steps={total_steps!r}, epochs={epochs!r}, steps_per_epoch={steps_per_epoch!r}"
            )
        pct_start = float(_real_in("pct_start", pct_start, "[0, 1]"))
        self._set_fields(anneal_strategy=anneal_strategy)
        three_phase = _bool("three_phase", three_phase)
        div_factor = _positive_real("div_factor", div_factor)
        final_div_factor = _positive_real("final_div_factor", final_div_factor)
        warmup_end = float(pct_start * self.total_steps) - 1
        if three_phase:
            self._phases = [
                _phase(warmup_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                _phase(float(2 * pct_start * self.total_steps) - 2,
                       "max_lr", "initial_lr", "base_momentum", "max_momentum"),
                _phase(self.total_steps - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum"),
            ]
        else:
            self._phases = [
                _phase(warmup_end, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                _phase(self.total_steps - 1, "max_lr", "min_lr", "base_momentum", "max_momentum"),
            ]
        groups = len(optimizer.param_groups)
        max_lrs = _per_group("max_lr", max_lr, groups, _positive_real)
        self.cycle_momentum = _bool("cycle_momentum", cycle_momentum)
        if self.cycle_momentum:
            self._momentum_key = _momentum_key(optimizer, "OneCycleLR")
            max_momentums = _per_group("max_momentum", max_momentum, groups, _non_negative_real)
            base_momentums = _per_group("base_momentum", base_momentum, groups, _non_negative_real)
        if last_epoch == -1:
            for group, peak in zip(optimizer.param_groups, max_lrs):
                group["initial_lr"] = peak / div_factor
                group["max_lr"] = peak
                group["min_lr"] = group["initial_lr"] / final_div_factor
            if self.cycle_momentum:
                for group, high, low in zip(optimizer.param_groups, max_momentums, base_momentums):
                    _write_momentum(group, self._momentum_key, high)
                    group["max_momentum"] = high
                    group["base_momentum"] = low
        else:
            needed = self._group_keys()
            for index, group in enumerate(optimizer.param_groups):
                missing = [key for key in needed if key not in group]
                if missing:
                    raise KeyError(
                        f"param_groups[{index}] has no {', '.join(map(repr, missing))}; OneCycleLR "
                        f"with last_epoch={last_epoch} resumes a schedule whose bounds the first "
                        f"OneCycleLR stored in the param groups. Load the optimizer state first"
                    )
        super().__init__(optimizer, last_epoch)

    def _group_keys(self) -> tuple[str, ...]:
        keys = ("initial_lr", "max_lr", "min_lr")
        return keys + ("max_momentum", "base_momentum") if self.cycle_momentum else keys

    @property
    def _group_bounds(self) -> list[dict[str, Any]]:
        """The bounds get_lr reads from each param group."""
        keys = self._group_keys()
        return [{key: _plain_number(group[key]) for key in keys} for group in self.optimizer.param_groups]

    def _anneal(self, start: float, end: float, pct: float) -> float:
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def get_lr(self) -> list:
        step_number = self.last_epoch
        if step_number > self.total_steps:
            raise ValueError(
                f"OneCycleLR was stepped to step {step_number}, past total_steps={self.total_steps}"
            )
        rates = []
        last_phase = len(self._phases) - 1
        for group in self.optimizer.param_groups:
            phase_start = 0.0
            for index, phase in enumerate(self._phases):
                phase_end = phase["end_step"]
                if step_number <= phase_end or index == last_phase:
                    pct = (step_number - phase_start) / (phase_end - phase_start)
                    rate = self._anneal(group[phase["start_lr"]], group[phase["end_lr"]], pct)
                    if self.cycle_momentum:
                        momentum = self._anneal(group[phase["start_momentum"]], group[phase["end_momentum"]], pct)
                    break
                phase_start = phase["end_step"]
            rates.append(rate)
            if self.cycle_momentum:
                _write_momentum(group, self._momentum_key, momentum)
        return rates

    def _load_fields(self, state: Mapping[str, Any]) -> Callable[[], None]:
        self._check_state(state, self._field_names())
        _check_same_cycle_momentum("OneCycleLR", state["cycle_momentum"], self.cycle_momentum)
        bounds = self._checked_group_bounds(state["group_bounds"])
        values = self._checked_fields(state)

        def apply() -> None:
            self.__dict__.update(values)
            for group, saved in zip(self.optimizer.param_groups, bounds):
                group.update(saved)

        return apply

    def _checked_group_bounds(self, bounds: Any) -> list:
        keys = self._group_keys()
        if not isinstance(bounds, list) or len(bounds) != len(self.optimizer.param_groups) or not all(
            isinstance(b, Mapping) and set(b) == set(keys) and all(is_real(v) for v in b.values()) for b in bounds
        ):
            raise ValueError(
                f"OneCycleLR: state 'group_bounds' must hold {', '.join(keys)} for each of the "
                f"{len(self.optimizer.param_groups)} param groups; got {bounds!r}"
            )
        return bounds


# ---------------------------------------------------------------------------------------
# combinations


def _check_child_types(owner: str, schedulers: list[Any]) -> None:
    if not schedulers:
        raise ValueError(f"{owner} needs at least one scheduler; got none")
    for index, scheduler in enumerate(schedulers):
        if not isinstance(scheduler, LRScheduler):
            raise TypeError(
                f"{owner}: schedulers[{index}] must be a shardstep.workers.optim.lr_scheduler scheduler; got "
                f"{scheduler!r} of type {type(scheduler).__name__}"
            )


def _check_children(owner: str, optimizer: Optimizer, schedulers: list[Any]) -> None:
    _check_child_types(owner, schedulers)
    for index, scheduler in enumerate(schedulers):
        if isinstance(scheduler, ReduceLROnPlateau):
            raise ValueError(
                f"{owner}: schedulers[{index}] is a ReduceLROnPlateau, which {owner} cannot step "
                f"because its step() needs a metric"
            )
        if scheduler.optimizer is not optimizer:
            raise ValueError(
                f"{owner}: schedulers[{index}] ({type(scheduler).__name__}) drives a different "
                f"optimizer; all schedulers must drive the optimizer given to {owner}"
            )


def _integer_entry(owner: str, name: str, value: Any) -> int:
    if not is_integer(value):
        raise ValueError(f"{owner}: state {name!r} must be an integer; got {value!r}")
    return int(value)


def _children_momentum_key(schedulers: list[LRScheduler]) -> str | None:
    keys = [child._momentum_key for child in schedulers if child._momentum_key is not None]
    return keys[0] if keys else None


class _Composite(LRScheduler):
    """Shared state handling of SequentialLR and ChainedScheduler: children's states nested,
    then the composite's own fields."""

    _schedulers: list[LRScheduler]

    # a composite keeps no base rates or step count of its own: its children do
    _common_keys = ("last_lr", "schedulers")

    def _common_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"last_lr": list(self._last_lr)}
        if self._momentum_key is not None:
            state["momentum_key"] = self._momentum_key
            state["last_momentum"] = list(self._last_momentum)
        state["schedulers"] = [child.state_dict() for child in self._schedulers]
        return state

    def state_dict(self) -> dict[str, Any]:
        return {"scheduler": type(self).__name__, **self._common_state(), **self._state_fields()}

    def _prepare_load(self, state_dict: Mapping[str, Any]) -> Callable[[], None]:
        state = self._check_state(state_dict, self._field_names() + self._common_keys)
        apply_fields = self._load_fields(state)
        apply_children = self._prepare_children(state)

        def apply() -> None:
            apply_fields()
            apply_children()

        return apply

    def _prepare_children(self, state: Mapping[str, Any]) -> Callable[[], None]:
        owner, groups = type(self).__name__, len(self.optimizer.param_groups)
        children = state["schedulers"]
        if not isinstance(children, list) or len(children) != len(self._schedulers):
            count = len(children) if isinstance(children, list) else children
            raise ValueError(f"{owner}: state has {count} schedulers; this {owner} has {len(self._schedulers)}")
        appliers = [child._prepare_load(saved) for child, saved in zip(self._schedulers, children)]
        last_lr = _float_list(owner, "last_lr", state["last_lr"], groups)
        apply_momentum = self._prepare_momentum(state)

        def apply() -> None:
            # children first: the last rates written must be the composite's own
            for apply_child in appliers:
                apply_child()
            self._restore_last_lr(last_lr)
            apply_momentum()

        return apply


class SequentialLR(_Composite):
    """Runs ``schedulers[i]`` from ``milestones[i-1]`` on; at a milestone the next scheduler
    restarts at its epoch 0 (closed form where it has one)."""

    fields = (
        Field("last_epoch", partial(_integer_entry, "SequentialLR")),
        Field("milestones", partial(_milestone_list, strictly_increasing=True), to_state=list,
              attribute="_milestones"),
    )

    def __init__(self, optimizer: Optimizer, schedulers: list[LRScheduler], milestones: list[int],
                 last_epoch: int = -1) -> None:
        _check_optimizer(optimizer)
        schedulers = list(schedulers)
        _check_children("SequentialLR", optimizer, schedulers)
        self._set_fields(milestones=milestones)
        if len(self._milestones) != len(schedulers) - 1:
            raise ValueError(
                f"milestones must have one entry fewer than schedulers ({len(schedulers) - 1}); got "
                f"{len(self._milestones)} milestones for {len(schedulers)} schedulers"
            )
        for index, scheduler in enumerate(schedulers[1:], start=1):
            # torch fails at the milestone: a composite cannot restart from epoch 0
            if isinstance(scheduler, _Composite):
                raise ValueError(
                    f"SequentialLR: schedulers[{index}] is a {type(scheduler).__name__}, which cannot "
                    f"start at a milestone; only the first scheduler may be a composite"
                )
        last_epoch = _last_epoch_argument(last_epoch)
        self._schedulers = schedulers
        self.last_epoch = last_epoch + 1
        self.optimizer = optimizer
        self._momentum_key = _children_momentum_key(schedulers)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        # every child took its constructor's step; take those back, then redo only the first one
        _undo_initial_steps(self)
        first = bisect_right(self._milestones, 0)
        schedulers[first]._initial_step()
        self._record_last()

    def step(self) -> None:  # type: ignore[override]
        self.last_epoch += 1
        index = bisect_right(self._milestones, self.last_epoch)
        scheduler = self._schedulers[index]
        if index > 0 and self._milestones[index - 1] == self.last_epoch:
            scheduler._update_lr(0)
        else:
            scheduler.step()
        self._record_last()

    def _load_fields(self, state: Mapping[str, Any]) -> Callable[[], None]:
        # every entry is there: _Composite._prepare_load checked the whole state's keys at once
        values = self._checked_fields(state)
        milestones = values["_milestones"]
        if len(milestones) != len(self._schedulers) - 1:
            raise ValueError(
                f"SequentialLR: state has {len(milestones)} milestones for {len(self._schedulers)} schedulers"
            )
        return lambda: self.__dict__.update(values)


def _undo_initial_steps(scheduler: LRScheduler) -> None:
    if isinstance(scheduler, _Composite):
        for child in scheduler._schedulers:
            _undo_initial_steps(child)
    else:
        scheduler.last_epoch -= 1


class ChainedScheduler(_Composite):
    """Steps every scheduler in order at each step(); their multiplicative effects compose."""

    def __init__(self, schedulers: Sequence[LRScheduler], optimizer: Optimizer | None = None) -> None:
        schedulers = list(schedulers)
        _check_child_types("ChainedScheduler", schedulers)
        if optimizer is None:
            optimizer = schedulers[0].optimizer
        _check_optimizer(optimizer)
        _check_children("ChainedScheduler", optimizer, schedulers)
        self._schedulers = schedulers
        self.optimizer = optimizer
        self._momentum_key = _children_momentum_key(schedulers)
        self._record_last()

    def step(self) -> None:  # type: ignore[override]
        for scheduler in self._schedulers:
            scheduler.step()
        self._record_last()
