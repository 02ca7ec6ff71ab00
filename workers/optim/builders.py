"""Optimizers and LR schedulers built by name from plain arguments (a job file's tables):
the one place the local loop, the coordinator and the job checks build them."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardstep.workers.optim import lr_scheduler
from shardstep.workers.optim.optimizer import Optimizer
from shardstep.workers.optim.param_groups import ParamGroupRule, assign_groups
from shardstep.workers.optim.parameter import Parameter
from shardstep.workers.optim.registry import optimizer_class
from shardstep.workers.optim.rule import Rule, one_dtype_only, one_group_only

SCHEDULER_NAMES = tuple(name for name in lr_scheduler.__all__ if name != "LRScheduler")
COMPOSITE_SCHEDULERS = ("SequentialLR", "ChainedScheduler")


@dataclass(eq=False)
class OptimizerGroups:
    """An optimizer's ``defaults`` and ``param_groups`` by parameter name, without parameters
    or state: what a job's checks, its coordinator and the sharded optimizer take from the
    job's optimizer and param-group rules. An LR scheduler accepts it (it has what
    :class:`~shardstep.workers.optim.lr_scheduler.SchedulableOptimizer` names), so schedulers
    are built and checked on it too."""

    rule: Rule
    defaults: dict[str, Any]
    # {"params": [names], hyperparameters...} with the key order torch's groups have
    param_groups: list[dict[str, Any]]
    _step_count: int = 0


def optimizer_groups(name: str, kwargs: Mapping[str, Any], params: Mapping[str, Any],
                     rules: Sequence[ParamGroupRule]) -> OptimizerGroups:
    """The param groups the optimizer ``name`` built with ``kwargs`` over parameters ``params``
    (name -> dtype) and one group per matched rule would have (see
    :func:`~shardstep.workers.optim.param_groups.assign_groups`), computed from its rule: the
    same groups, checks and messages as :func:`build_optimizer`, with nothing built."""
    cls = optimizer_class(name)
    rule: Rule = cls.rule
    _check_arguments(cls, kwargs, rules)
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    defaults = rule.stored_defaults(kwargs)
    groups = []
    for matched, names in assign_groups(list(params), rules):
        # torch's add_param_group: the group's own options, then the defaults it lacks
        group: dict[str, Any] = {"params": names, **(matched.options if matched is not None else {})}
        for key, value in defaults.items():
            group.setdefault(key, value)
        rule.validate(group)
        if rule.one_vector and groups:
            raise one_group_only(cls.__name__)
        groups.append(group)
    dtypes = {np.dtype(dtype) for dtype in params.values()}
    if rule.one_vector and len(dtypes) != 1:
        raise one_dtype_only(cls.__name__, dtypes)
    return OptimizerGroups(rule, defaults, groups)


def build_optimizer(name: str, kwargs: Mapping[str, Any], params: Mapping[str, Parameter],
                    rules: Sequence[ParamGroupRule]) -> Optimizer:
    """The optimizer ``name`` over ``params``, one param group per matched rule (see
    :func:`~shardstep.workers.optim.param_groups.assign_groups`), named parameters in each group."""
    cls = optimizer_class(name)
    _check_arguments(cls, kwargs, rules)
    groups = []
    for rule, names in assign_groups(list(params), rules):
        group: dict[str, Any] = {"params": [(n, params[n]) for n in names]}
        if rule is not None:
            group.update(rule.options)
        groups.append(group)
    return cls(groups, **kwargs)


def _check_arguments(cls: type, kwargs: Any, rules: Sequence[ParamGroupRule]) -> None:
    """The optimizer's arguments and every rule's options must be hyperparameters of ``cls``."""
    hyperparameters = _keyword_names(cls, skip=("params",))
    _check_kwargs(f"optimizer {cls.__name__}", kwargs, hyperparameters)
    for rule in rules:
        if not isinstance(rule, ParamGroupRule):
            raise TypeError(f"param_groups must be ParamGroupRule objects; got {type(rule).__name__}")
        unknown = [key for key in rule.options if key not in hyperparameters]
        if unknown:
            raise ValueError(
                f"param group rule {rule.pattern!r} sets {', '.join(map(repr, unknown))}, which "
                f"{cls.__name__} does not take; allowed: {', '.join(hyperparameters)} (pass "
                f"param_groups=() to train without the task's rules)"
            )


def build_scheduler(name: str, kwargs: Mapping[str, Any], optimizer: Optimizer) -> lr_scheduler.LRScheduler:
    """The scheduler class ``name`` (exact or any letter case) on ``optimizer``."""
    cls_name = _scheduler_name(name)
    cls = getattr(lr_scheduler, cls_name)
    _check_kwargs(f"scheduler {cls_name}", kwargs, _keyword_names(cls, skip=("optimizer",)))
    kwargs = dict(kwargs)
    if cls_name in COMPOSITE_SCHEDULERS and "schedulers" in kwargs:
        children = kwargs["schedulers"]
        if isinstance(children, (str, bytes)) or not isinstance(children, Sequence):
            raise TypeError(f"{cls_name}: schedulers must be a list of [name, kwargs] pairs; got {children!r}")
        built = []
        for index, child in enumerate(children):
            if (not isinstance(child, Sequence) or isinstance(child, (str, bytes)) or len(child) != 2
                    or not isinstance(child[1], Mapping)):
                raise TypeError(f"{cls_name}: schedulers[{index}] must be a [name, kwargs] pair; got {child!r}")
            built.append(build_scheduler(child[0], child[1], optimizer))
        kwargs["schedulers"] = built
    if cls_name == "ChainedScheduler":
        kwargs.setdefault("optimizer", optimizer)
        return cls(**kwargs)
    return cls(optimizer, **kwargs)


def _scheduler_name(name: Any) -> str:
    if isinstance(name, str):
        if name in SCHEDULER_NAMES:
            return name
        folded = {n.lower(): n for n in SCHEDULER_NAMES}
        if name.lower() in folded:
            return folded[name.lower()]
    raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULER_NAMES)}")


def _keyword_names(cls: type, skip: tuple[str, ...]) -> list[str]:
    return [n for n, p in inspect.signature(cls).parameters.items()
            if n not in skip and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


def _check_kwargs(owner: str, kwargs: Any, allowed: Sequence[str]) -> None:
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{owner}: arguments must be a dict; got {type(kwargs).__name__}")
    unknown = [key for key in kwargs if key not in allowed]
    if unknown:
        raise TypeError(f"{owner} got unknown argument{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")
