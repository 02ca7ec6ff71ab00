"""Training tasks: the data, model and loss of a job (see :mod:`shardstep.workers.tasks.base`).

    from shardstep.workers.tasks import make_task
    task = make_task("digits", hidden=[128])

Built-in tasks by name (one module each): ``digits``, ``digits-triplet``, ``ratings``,
``least-squares``, ``synthetic-mlp``, ``modular-addition``, and ``supervised``, the task of a job file's ``[data]`` and
``[model]`` tables. A user's own task is named ``"package.module:Class"``
(a :class:`Task` subclass importable in every process of the job).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from shardstep.workers.tasks.base import Batch, ParamGroupRule, Task, combine_partials

__all__ = ["Batch", "ParamGroupRule", "Task", "TASK_NAMES", "combine_partials", "make_task", "task_class"]

_BUILTIN: dict[str, tuple[str, str]] = {
    "digits": ("digits", "DigitsTask"),
    "digits-triplet": ("digits_triplet", "DigitsTripletTask"),
    "ratings": ("ratings", "RatingsTask"),
    "least-squares": ("least_squares", "LeastSquaresTask"),
    "synthetic-mlp": ("synthetic_mlp", "SyntheticMLPTask"),
    "modular-addition": ("modular_addition", "ModularAdditionTask"),
    "supervised": ("supervised", "SupervisedTask"),
}

TASK_NAMES: tuple[str, ...] = tuple(_BUILTIN)


def task_class(name: str) -> type[Task]:
    """The class of a built-in task name, or of a ``"module:Class"`` reference."""
    if not isinstance(name, str):
        raise TypeError(f"task name must be a string; got {type(name).__name__}")
    if name in _BUILTIN:
        module, cls = _BUILTIN[name]
        return getattr(importlib.import_module(f"shardstep.workers.tasks.{module}"), cls)
    if ":" not in name:
        raise ValueError(
            f"unknown task {name!r}; allowed: {', '.join(TASK_NAMES)}, or 'package.module:Class' "
            f"for a Task subclass of your own"
        )
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"task {name!r}: cannot import module {module_name!r} ({error})") from error
    except (Exception, SystemExit) as error:  # its top level raised, or tried to end the process
        raise ValueError(f"task {name!r}: importing module {module_name!r} failed: {type(error).__name__}: "
                         f"{error}") from error
    cls = getattr(module, attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"task {name!r}: {attribute!r} in {module_name!r} is not a Task subclass")
    return cls


def make_task(name: str, **kwargs: Any) -> Task:
    """Build a task from its name and keyword arguments; unknown arguments are refused."""
    cls = task_class(name)
    parameters = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    allowed = [n for n, p in parameters.items()
               if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    unknown = [key for key in kwargs if key not in allowed]
    if unknown and not takes_any:
        raise TypeError(
            f"task {name!r} got unknown argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; allowed: {', '.join(allowed) or 'none'}"
        )
    return cls(**kwargs)
