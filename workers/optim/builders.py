"""Optimizers and LR schedulers built by name from plain arguments (a job file's tables):
the one place the local loop, the coordinator and the job checks build them."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from shardstep.workers.optim import lr_scheduler
from shardstep.workers.optim.optimizer import Optimizer
from shardstep.workers.optim.param_groups import ParamGroupRule, assign_groups
from shardstep.workers.optim.parameter import Parameter
from shardstep.workers.optim.registry import optimizer_class

SCHEDULER_NAMES = tuple(name for name in lr_scheduler.__all__ if name != "LRScheduler")
COMPOSITE_SCHEDULERS = ("SequentialLR", "ChainedScheduler")


def build_optimizer(name: str, kwargs: Mapping[str, Any], params: Mapping[str, Parameter],
                    rules: Sequence[ParamGroupRule]) -> Optimizer:
    """The optimizer ``name`` over ``params``, one param group per matched rule (see
    :func:`~shardstep.workers.tasks.base.assign_groups`), named parameters in each group."""
    cls = optimizer_class(name)
    hyperparameters = _keyword_names(cls, skip=("params",))
    _check_kwargs(f"optimizer {cls.__name__}", kwargs, hyperparameters)
    rules = list(rules)
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
    groups = []
    for rule, names in assign_groups(list(params), rules):
        group: dict[str, Any] = {"params": [(n, params[n]) for n in names]}
        if rule is not None:
            group.update(rule.options)
        groups.append(group)
    return cls(groups, **kwargs)


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
