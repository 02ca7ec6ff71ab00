"""The job file: what a training job runs, checked in full before anything starts.

A job is described by a TOML file (reference and example: ``docs/jobs.md``)::

    spec = load_job("examples/jobs/digits.toml")     # JobSpec, or JobSpecError
    spec = spec.replace(shards=4)                     # command-line overrides, checked again

Loading checks every key and value, then builds what the job will build, so a mistake
fails here with the key that caused it instead of on a cluster minutes later:

- the task, once, with ``make_task(name, **args)``, and its initial parameters (for their
  names and dtypes: no task exposes them without allocating them);
- the ``frozen`` patterns against the task's parameter names (each must match one; at
  least one parameter must stay trainable);
- the optimizer's param groups over the trainable parameters' names and dtypes, by
  ``shardstep.workers.optim.builders.optimizer_groups`` from the optimizer's rule (nothing is
  built), once per param-group rule and once with all rules (a pattern that matches no
  parameter is an error);
- every scheduler, by ``shardstep.workers.optim.builders.build_scheduler``, on those groups;
- a metric named by ``schedulers[i].monitor`` or ``checkpoint.metric`` other than "loss"
  against the keys of one ``task.evaluate`` of the initial parameters (run only then);
- the kind of gradient the task gives each trainable parameter (``Task.sparse_gradients``)
  against the kinds the optimizer takes.

A job file names code, like a Python script: the task's class is imported and constructed
here, and a schedule function (``lr_lambda = "module:function"``) is imported and checked
to be callable, but never called: its scheduler is built with a stand-in, and the job's
function first runs when training starts.

What a hostile or broken file cannot do here: hang on a FIFO or a device (only a regular
file of at most ``MAX_JOB_FILE_BYTES`` is read), overflow the parser's or the checks' stack
or take quadratic time (nesting and key paths are bounded by ``MAX_NESTING``), put a NUL or
an unencodable character in a path, pass a non-finite hyperparameter (except where torch
gives infinity a meaning, ``INFINITE_HYPERPARAMETERS``) or an integer numpy and msgpack
cannot carry, or make a message longer than a line.

Every failure is a :class:`JobSpecError` whose message names the key path
(``training.steps``), the value received and what is allowed; messages of a loaded file
start with ``"<file>: "``.

The ``[init]`` source of a fine-tuning job is not opened here (it may live on storage only the
cluster sees); the coordinator checks it against the model before it starts anything.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import fnmatch
import importlib.util
import inspect
import json
import math
import numbers
import os
import re
import stat
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shardstep.checkpoints.layout import ParamSpec
from shardstep.checkpoints.run import Retention
from shardstep.service.job_code import use_job_code
from shardstep.workers.checks import is_integer, is_real
from shardstep.workers.optim import lr_scheduler
from shardstep.workers.optim.builders import (
    COMPOSITE_SCHEDULERS,
    SCHEDULER_NAMES,
    build_scheduler,
    optimizer_groups,
)
from shardstep.workers.optim.registry import CLASS_NAMES as OPTIMIZER_CLASS_NAMES
from shardstep.workers.optim.registry import NAMES as OPTIMIZER_NAMES
from shardstep.workers.optim.registry import optimizer_class
from shardstep.workers.optim.registry import rule as optimizer_rule
from shardstep.workers.optim.rule import DEFAULT_DTYPES
from shardstep.workers.tasks import TASK_NAMES, make_task, task_class
from shardstep.workers.tasks.base import ParamGroupRule, Task, TaskArgumentError
from shardstep.workers.tasks.data_files import DataError
from shardstep.workers.training import SCHEDULER_INTERVALS

__all__ = ["BACKENDS", "NONFINITE_POLICIES", "PLACEMENTS", "TRANSPORTS", "InitSpec", "JobSpec", "JobSpecError", "SchedulerSpec", "load_job",
           "parse_job"]

BACKENDS = ("ray", "inline")
# how a step's parameters and gradients move between Ray actors (docs/engine.md, "Transports")
TRANSPORTS = ("auto", "shared_memory", "object_store")
# Ray's placement-group strategies, for all of a start's actors together (docs/cluster.md, "Placement")
PLACEMENTS = ("pack", "spread", "strict_pack", "strict_spread")
# resources a job names through their own keys (shard_cpus, worker_cpus), never as custom ones
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
DEFAULT_START_TIMEOUT = 300.0
# the MLflow experiment a run logs to unless logging.mlflow_experiment names another
DEFAULT_MLFLOW_EXPERIMENT = "shardstep"
NONFINITE_POLICIES = ("stop", "skip")
KEEP_MODES = ("min", "max")
# the metric every job has: the training loss of a step
TRAINING_LOSS = "loss"
PLATEAU = "ReduceLROnPlateau"
DEFAULT_MAX_SKIPPED_STEPS = 20

# a job file is a few KiB: the limit keeps a wrong path (a log, a data set) out of memory
MAX_JOB_FILE_BYTES = 1 << 20
# arrays and tables inside one another (args, options) and parts of a key path: a job needs
# a handful; the bound keeps the checks, repr, JSON and msgpack far from Python's recursion
# limit, and tomllib (quadratic in the parts of one dotted key) fast
MAX_NESTING = 32
# what numpy and msgpack carry: a larger integer would pass here and fail on the cluster
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# Linux's limits: bytes per name in a path (NAME_MAX) and per path (PATH_MAX)
NAME_MAX, PATH_MAX = 255, 4096
# the longest value or foreign message a message shows (a huge value stays one short line)
SHOWN_CHARS = 120
FOREIGN_MESSAGE_CHARS = 1000
# the hyperparameters where torch gives +inf a meaning, by optimizer: Rprop's largest step
# size (its clamp then has no ceiling) and ASGD's t0 (averaging never starts: mu stays
# 1 / max(1, step - inf) = 1). torch documents infinity for none of the others (not lr), and
# no scheduler argument; NaN nowhere
INFINITE_HYPERPARAMETERS: dict[str, tuple[str, ...]] = {"rprop": ("step_sizes[1]",), "asgd": ("t0",)}
# a bare TOML key, shown as written; any other key is shown quoted
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class JobSpecError(ValueError):
    """A job file or job spec that cannot run; the message names the key, the value and what
    is allowed. It is always one line: the command line prints it as ``error: <message>``,
    and a builder's or the user's multi-line message is joined onto it."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


TOP_LEVEL_KEYS = ("run_dir", "task", "data", "model", "optimizer", "param_groups", "schedulers", "training",
                  "resources", "checkpoint", "early_stopping", "logging", "frozen", "init")
# the task a job's [data] and [model] tables describe (shardstep.workers.tasks.supervised),
# and the keys of [data] that name files (relative to the job file, or URLs)
DATA_TASK = "supervised"
DATA_PATH_KEYS = ("train", "validation")
NAMED_TABLE_KEYS = ("name", "args")
SCHEDULER_KEYS = ("name", "interval", "monitor", "args")
INIT_KEYS = ("from", "step", "optimizer_state", "skip")
# the fields whose values decide what the task, optimizer and scheduler checks see
BUILD_FIELDS = ("task", "task_args", "optimizer", "optimizer_args", "param_groups", "schedulers", "seed",
                "keep_metric", "stop_metric", "frozen", "code_dir")


# ---------------------------------------------------------------------------------------
# value checks; ``path`` is the key path the message names


def _type_name(value: Any) -> str:
    """The TOML word for a value's type (what a job file's author sees)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, numbers.Integral):
        return "integer"
    if isinstance(value, numbers.Real):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, datetime.datetime):
        return "datetime"
    if isinstance(value, datetime.date):
        return "date"
    if isinstance(value, datetime.time):
        return "time"
    return type(value).__name__


def _shown(value: Any) -> str:
    """``repr(value)``, cut to SHOWN_CHARS with the full length said."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit
        return f"an integer of {value.bit_length()} bits"
    except RecursionError:
        return "a value nested too deeply to show"
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({len(text)} characters)"


def _got(value: Any) -> str:
    """``'cuda'`` for a value of the expected kind; ``3.5 (float)`` when the type is wrong."""
    return f"{_shown(value)} ({_type_name(value)})"


def _join(path: str, key: Any) -> str:
    """The key path of ``key`` in table ``path`` (the top level when empty); a key that is not
    bare is quoted as TOML writes it (``worker_labels."ray.io/zone"``), so a newline in a
    key cannot break a message's line."""
    shown = key if isinstance(key, str) and BARE_KEY.fullmatch(key) else _clip(json.dumps(key), SHOWN_CHARS)
    return f"{path}.{shown}" if path else shown


def _clip(text: str, limit: int = FOREIGN_MESSAGE_CHARS) -> str:
    """A message of a builder or of the user's code, cut to ``limit`` characters."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _suggest(word: Any, choices: Sequence[str]) -> str:
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not close:
        folded = {choice.lower(): choice for choice in choices}
        close = difflib.get_close_matches(word.lower(), list(folded), n=1, cutoff=0.6)
        close = [folded[c] for c in close]
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_int(path: str, value: Any, minimum: int, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if not is_integer(value):
        raise JobSpecError(f"{path} must be an integer >= {minimum}; got {_got(value)}")
    if value < minimum:
        raise JobSpecError(f"{path} must be an integer >= {minimum}; got {_shown(int(value))}")
    if value > INT64_MAX:
        raise JobSpecError(f"{path} must be an integer from {minimum} to {INT64_MAX} (int64); got "
                           f"{_shown(int(value))}")
    return int(value)


def _check_real(path: str, value: Any, minimum: float, *, strict: bool, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    bound = f"{'>' if strict else '>='} {minimum:g}"
    if not is_real(value) or not math.isfinite(value):
        raise JobSpecError(f"{path} must be a finite number {bound}; got {_got(value)}")
    if value < minimum or (strict and value == minimum):
        raise JobSpecError(f"{path} must be a finite number {bound}; got {_shown(value)}")
    return float(value)


def _check_choice(path: str, value: Any, allowed: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in allowed:
        shown = _shown(value) if isinstance(value, str) else _got(value)
        raise JobSpecError(f"{path} must be one of {', '.join(map(repr, allowed))}; got {shown}"
                           f"{_suggest(value, allowed)}")
    return value


def _check_text(path: str, value: Any, what: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise JobSpecError(f"{path} must be {what}; got {_got(value)}")
    return value


# "s3://", "gs://", "file://": a path that is a URL names object storage (run_dir, init.from)
# or is refused; never taken as a relative path ("s3://b/run" would be a local directory "s3:")
URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _check_path_text(path: str, value: str) -> str:
    """A path the operating system can hold: no NUL, every character encodable in the file
    system's encoding, names of at most NAME_MAX bytes and at most PATH_MAX bytes in all
    (refused here rather than when the run creates its directory)."""
    url = URL_SCHEME.match(value)
    if url:
        raise JobSpecError(f"{path} is a URL ({url.group(0)}...); it must be a file system path (only run_dir "
                           f"and init.from may name object storage); got {_shown(value)}")
    if "\0" in value:
        raise JobSpecError(f"{path} holds a NUL character (at index {value.index(chr(0))}), which no path can "
                           f"hold; got {_shown(value)}")
    try:
        encoded = os.fsencode(value)
    except UnicodeEncodeError as error:
        raise JobSpecError(f"{path} holds {value[error.start]!r} (at index {error.start}), which the file system's "
                           f"encoding ({sys.getfilesystemencoding()}) cannot hold; got {_shown(value)}") from None
    if len(encoded) > PATH_MAX:
        raise JobSpecError(f"{path} is {len(encoded)} bytes long; a path may be at most {PATH_MAX} bytes; got "
                           f"{_shown(value)}")
    longest = max(encoded.split(b"/"), key=len)
    if len(longest) > NAME_MAX:
        raise JobSpecError(f"{path} has a name of {len(longest)} bytes; a name in a path may be at most {NAME_MAX} "
                           f"bytes; got {_shown(value)}")
    return value


def _object_url(path: str, value: str) -> str | None:
    """``value`` normalized when it names object storage (``s3://bucket/prefix``, ``gs://``,
    ``az://``), else None; another scheme, or a URL without a bucket, is refused."""
    if not URL_SCHEME.match(value):
        return None
    from shardstep.checkpoints.errors import CheckpointError
    from shardstep.checkpoints.storage import ObjectPath

    try:
        return str(ObjectPath(value))
    except CheckpointError as error:
        raise JobSpecError(f"{path}: {error}") from None


def _check_location_text(path: str, value: str) -> str:
    """A run directory or checkpoint: an object-storage URL, or a path as _check_path_text."""
    return _object_url(path, value) or _check_path_text(path, value)


def _resolve_location(path: str, value: str, base: Path) -> str:
    """A URL as it is (normalized); a path as :func:`_resolve_path`."""
    return _object_url(path, value) or _resolve_path(path, value, base)


def _inside(inner: str, outer: str) -> bool:
    """Whether location ``inner`` is ``outer`` or below it (URLs compare by prefix)."""
    if URL_SCHEME.match(inner) or URL_SCHEME.match(outer):
        return inner == outer or inner.startswith(outer.rstrip("/") + "/")
    return os.path.commonpath([inner, outer]) == os.path.normpath(outer)


def _resolve_path(path: str, value: str, base: Path) -> str:
    """``value`` (a checked path text) absolute: ``~`` expanded, relative to ``base``."""
    try:
        resolved = str((base / Path(value).expanduser()).resolve())
    except (RuntimeError, OSError) as error:  # "~user" of no such user, a symlink loop
        raise JobSpecError(f"{path}: cannot resolve {_shown(value)}: {_clip(str(error))}") from None
    return _check_path_text(path, resolved)


def _check_named_table(path: str, value: Any, form: str, what: str, check: Callable[[str, Any], Any]) -> dict:
    """A table of non-empty string names, each value checked by ``check(name, value)``."""
    if not isinstance(value, Mapping):
        raise JobSpecError(f"{path} must be a table of {form}; got {_got(value)}")
    for name in value:
        if not isinstance(name, str) or not name:
            raise JobSpecError(f"{path}: {what} names must be non-empty strings; got {_got(name)}")
    return {name: check(name, item) for name, item in value.items()}


def _check_resources(path: str, value: Any, actor: str) -> dict[str, float]:
    """A table of custom Ray resource name -> amount > 0 (``{accelerator = 1}``)."""
    def amount(name: str, item: Any) -> float:
        if name in RESERVED_RESOURCES:
            own = f"resources.{actor}_cpus" if name == "CPU" else "nothing: shardstep's actors do not request it"
            raise JobSpecError(f"{path}.{name}: {name} is not a custom resource (it is set by {own}); allowed: "
                               f"any name but {', '.join(RESERVED_RESOURCES)}")
        return _check_real(_join(path, name), item, 0.0, strict=True)
    return _check_named_table(path, value, "custom Ray resources, name = amount (e.g. { special_hardware = 1 })",
                              "resource", amount)


def _check_labels(path: str, value: Any) -> dict[str, str]:
    """A table of Ray node label -> selector (``{zone = "us-east-1a"}``, ``"in(a,b)"``, ``"!in(c)"``)."""
    return _check_named_table(path, value, 'Ray node labels, name = value or selector (e.g. { zone = "us-east-1a" })',
                              "label", lambda name, item: _check_text(_join(path, name), item, "a label value or a "
                                                                      "selector such as 'in(a,b)'"))


def _check_bool(path: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise JobSpecError(f"{path} must be true or false; got {_got(value)}")
    return value


def _plain(path: str, value: Any, depth: int = 0) -> Any:
    """A deep copy of ``value`` made of None, bool, int, float, str, list and str-keyed dict
    (what msgpack and JSON carry): integers in int64, at most MAX_NESTING arrays and tables
    deep; tuples become lists, numpy scalars Python numbers."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if is_integer(value):
        if not INT64_MIN <= value <= INT64_MAX:
            raise JobSpecError(f"{path} must be an integer from {INT64_MIN} to {INT64_MAX} (int64, what numpy and "
                               f"msgpack carry); got {_shown(int(value))}")
        return int(value)
    if is_real(value):
        return float(value)
    if isinstance(value, (Mapping, list, tuple)) and depth == MAX_NESTING:
        kind = "a table" if isinstance(value, Mapping) else "an array"
        raise JobSpecError(f"{path} is {kind} nested {MAX_NESTING} arrays and tables deep; a job's values may nest "
                           f"at most {MAX_NESTING} deep")
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise JobSpecError(f"{path}: keys must be strings; got {_got(key)}")
            out[key] = _plain(_join(path, key), item, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(f"{path}[{index}]", item, depth + 1) for index, item in enumerate(value)]
    raise JobSpecError(f"{path} must be a string, number, boolean, array or table; got {_got(value)}")


def _check_finite(path: str, value: Any, infinite: Sequence[str] = ()) -> None:
    """Refuse NaN and infinity anywhere in the hyperparameter ``value`` (a number, or arrays
    and tables of them, as ``_plain`` made it); +inf is allowed at the sub-paths ``infinite``
    (``"step_sizes[1]"``, relative to ``path``). The optimizers refuse NaN themselves but, as
    torch does, take ``lr = inf`` and train to NaN."""
    def walk(sub: str, item: Any) -> None:
        if isinstance(item, float) and not math.isfinite(item):
            if item == math.inf and sub in infinite:
                return
            allowed = f" (+inf is allowed only at {', '.join(infinite)})" if infinite else ""
            raise JobSpecError(f"{path}.{sub} must be a finite number{allowed}; got {item}")
        if isinstance(item, Mapping):
            for key, child in item.items():
                walk(_join(sub, key), child)
        elif isinstance(item, list):
            for index, child in enumerate(item):
                walk(f"{sub}[{index}]", child)
    walk("", value)


def _check_patterns(path: str, value: Any) -> tuple[str, ...]:
    """An array of glob patterns on parameter names (``fnmatch``)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise JobSpecError(f"{path} must be an array of glob patterns on parameter names such as [\"0.*\"]; "
                           f"got {_got(value)}")
    return tuple(_check_text(f"{path}[{index}]", pattern, "a glob pattern on parameter names such as '0.*'")
                 for index, pattern in enumerate(value))


def _check_args(path: str, value: Any) -> dict:
    if not isinstance(value, Mapping):
        raise JobSpecError(f"{path} must be a table of arguments; got {_got(value)}")
    return _plain(path, value)


def _check_keys(path: str, table: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """Refuse keys of ``table`` not in ``allowed``; ``path`` is the table's (empty at the top)."""
    for key in table:
        if key not in allowed:
            where = f"in [{path}]" if path else "at the top level"
            full = _join(path, key)
            raise JobSpecError(f"unknown key {full}{_suggest(key, allowed)}; allowed {where}: {', '.join(allowed)}"
                               f"{_misplaced(path, key)}")


def _misplaced(path: str, key: str) -> str:
    """A hint for TOML's classic slip: a top-level key written below a table header."""
    if not path or key not in TOP_LEVEL_KEYS:
        return ""
    return (f". {key} is a top-level key: in TOML every key after a [table] header belongs to that table, "
            f"so write {key} before the first header")


def _optimizer_name(path: str, value: Any) -> str:
    """The registry name (``"adam"``, ``"sparse_adam"``) for a registry or class name in any
    letter case."""
    folded = {name.lower(): name for name in OPTIMIZER_NAMES}
    folded.update({cls.lower(): name for cls, name in OPTIMIZER_CLASS_NAMES.items()})
    if isinstance(value, str) and value.lower() in folded:
        return folded[value.lower()]
    shown = repr(value) if isinstance(value, str) else _got(value)
    raise JobSpecError(f"{path} must be one of {', '.join(map(repr, OPTIMIZER_NAMES))} (any letter case); "
                       f"got {shown}{_suggest(value, OPTIMIZER_NAMES)}")


def _scheduler_name(path: str, value: Any) -> str:
    """The class name of ``shardstep.workers.optim.lr_scheduler`` for a name in any letter case."""
    folded = {name.lower(): name for name in SCHEDULER_NAMES}
    if isinstance(value, str) and value.lower() in folded:
        return folded[value.lower()]
    shown = repr(value) if isinstance(value, str) else _got(value)
    raise JobSpecError(f"{path} must be one of {', '.join(map(repr, SCHEDULER_NAMES))} (any letter case); "
                       f"got {shown}{_suggest(value, SCHEDULER_NAMES)}")


# ---------------------------------------------------------------------------------------
# the spec


def _scheduler_values(path: str, name: Any, args: Any, interval: Any, monitor: Any) -> dict[str, Any]:
    name = _scheduler_name(f"{path}.name", name)
    args = _check_args(f"{path}.args", args)
    _check_finite(f"{path}.args", args)
    interval = _check_choice(f"{path}.interval", interval, SCHEDULER_INTERVALS)
    monitor = _check_text(f"{path}.monitor", monitor, f"{TRAINING_LOSS!r} or the name of a metric of the task")
    if name != PLATEAU and monitor != TRAINING_LOSS:
        raise JobSpecError(f"{path}.monitor applies only to {PLATEAU}; got monitor = {monitor!r} on {name}")
    return {"name": name, "args": args, "interval": interval, "monitor": monitor}


@dataclass(frozen=True)
class SchedulerSpec:
    """One learning-rate scheduler of a job.

    name: a class name of ``shardstep.workers.optim.lr_scheduler`` (given in any letter case, kept in
    its canonical spelling). args: its constructor arguments without the optimizer
    (SequentialLR and ChainedScheduler take ``schedulers`` as ``[name, args]`` pairs).
    interval: "step" (after every optimizer step) or "epoch" (after every epoch). monitor:
    ReduceLROnPlateau only, the value it is given: "loss" (the training loss) or the name
    of a metric of the task's evaluation.
    """

    name: str
    args: dict
    interval: str = "step"
    monitor: str = TRAINING_LOSS

    def __post_init__(self) -> None:
        values = _scheduler_values("scheduler", self.name, self.args, self.interval, self.monitor)
        for key, value in values.items():
            object.__setattr__(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "args": _plain("args", self.args), "interval": self.interval,
                "monitor": self.monitor}


def _init_values(source: Any, step: Any, optimizer_state: Any, skip: Any) -> dict[str, Any]:
    """The ``[init]`` values, checked: an absolute ``from``, a ``step`` >= 0 or None, a boolean
    ``optimizer_state``, ``skip`` patterns."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    url = _object_url("init.from", _check_text("init.from", source, "a directory path"))
    if url is None:
        _check_path_text("init.from", source)
        if not os.path.isabs(source):
            raise JobSpecError(f"init.from must be an absolute path here (a job file's relative path is resolved "
                               f"against the file's directory); got {_shown(source)}")
    return {"source": url or os.path.normpath(source), "step": _check_int("init.step", step, 0, optional=True),
            "optimizer_state": _check_bool("init.optimizer_state", optimizer_state),
            "skip": _check_patterns("init.skip", skip)}


@dataclass(frozen=True)
class InitSpec:
    """Where a fine-tuning job's parameters come from: the ``[init]`` table.

    source (``from`` in the file): a run directory, its ``checkpoints`` directory, or one
    committed ``step-<k>`` checkpoint directory (absolute here). step: the committed step to
    read from a run directory (default: its newest). optimizer_state: carry the optimizer
    state too, matched by parameter name (the source must have the same optimizer). skip:
    glob patterns on the SOURCE's parameter names to leave out.
    """

    source: str
    step: int | None = None
    optimizer_state: bool = False
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key, value in _init_values(self.source, self.step, self.optimizer_state, self.skip).items():
            object.__setattr__(self, key, value)

    def to_dict(self) -> dict[str, Any]:
        """The ``[init]`` table's keys: ``from``, ``step``, ``optimizer_state``, ``skip``."""
        return {"from": self.source, "step": self.step, "optimizer_state": self.optimizer_state,
                "skip": list(self.skip)}

    @classmethod
    def from_dict(cls, data: Any) -> InitSpec:
        if not isinstance(data, Mapping):
            raise JobSpecError(f"init must be a table ([init]) of {', '.join(INIT_KEYS)}; got {_got(data)}")
        _check_keys("init", data, INIT_KEYS)
        if "from" not in data:
            raise JobSpecError("init.from is required: the run directory or step-<k> checkpoint directory to "
                               "start from")
        return cls(source=data["from"], step=data.get("step"), optimizer_state=data.get("optimizer_state", False),
                   skip=data.get("skip", ()))


# ---------------------------------------------------------------------------------------
# the fields: each declares where it lives in the job file and how a value is checked alone
# (what ties fields together is checked after, in _checked_fields)


def setting(key: str, check: Callable[[str, Any], Any], *, default: Any = dataclasses.MISSING,
            factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A JobSpec field at job-file key ``key`` (``"training.steps"``): ``check(key, value)``
    returns the value normalized or raises JobSpecError naming ``key``."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"key": key, "check": check})


def _integer(minimum: int, *, optional: bool = False) -> Callable[[str, Any], int | None]:
    return lambda path, value: _check_int(path, value, minimum, optional=optional)


def _number(minimum: float, *, strict: bool, optional: bool = False) -> Callable[[str, Any], float | None]:
    return lambda path, value: _check_real(path, value, minimum, strict=strict, optional=optional)


def _one_of(allowed: Sequence[str], *, optional: bool = False) -> Callable[[str, Any], str | None]:
    return lambda path, value: None if value is None and optional else _check_choice(path, value, allowed)


def _text(what: str, *, optional: bool = False) -> Callable[[str, Any], str | None]:
    return lambda path, value: _check_text(path, value, what, optional=optional)


def _resources(actor: str) -> Callable[[str, Any], dict[str, float]]:
    return lambda path, value: _check_resources(path, value, actor)


def _task_name(path: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise JobSpecError(f"{path} must be one of {', '.join(map(repr, TASK_NAMES))} or 'package.module:Class'; "
                           f"got {_got(value)}")
    return value


def _checked_rules(path: str, rules: Any) -> tuple[ParamGroupRule, ...] | None:
    if rules is None:
        return None
    if not isinstance(rules, (list, tuple)) or not all(isinstance(r, ParamGroupRule) for r in rules):
        raise JobSpecError(f"{path} must be None or a sequence of ParamGroupRule; got {rules!r}")
    return tuple(_rule(f"{path}[{i}]", r.pattern, r.options) for i, r in enumerate(rules))


def _checked_schedulers(path: str, schedulers: Any) -> tuple[SchedulerSpec, ...]:
    if not isinstance(schedulers, (list, tuple)) or not all(isinstance(s, SchedulerSpec) for s in schedulers):
        raise JobSpecError(f"{path} must be a sequence of SchedulerSpec; got {schedulers!r}")
    return tuple(SchedulerSpec(**_scheduler_values(f"{path}[{i}]", s.name, s.args, s.interval, s.monitor))
                 for i, s in enumerate(schedulers))


def _absolute_path(path: str, value: str, why: str) -> str:
    _check_path_text(path, value)
    if not os.path.isabs(value):
        raise JobSpecError(f"{path} must be an absolute path{why}; got {_shown(value)}")
    return value


def _run_dir_value(path: str, run_dir: Any) -> str:
    """An absolute directory path or an object-storage URL."""
    if isinstance(run_dir, os.PathLike):
        run_dir = os.fspath(run_dir)
    if not isinstance(run_dir, str) or not run_dir:
        raise JobSpecError(f"{path} is required: the directory of the run's checkpoints; got {_got(run_dir)}")
    url = _object_url(path, run_dir)
    if url is not None:
        return url
    return _absolute_path(path, run_dir, " here (a job file's relative run_dir is resolved against the file's "
                                         "directory)")


def _tensorboard_value(path: str, tensorboard: Any) -> bool | str:
    """true, false or an absolute local directory (where it may be, with run_dir, is checked after)."""
    if isinstance(tensorboard, os.PathLike):
        tensorboard = os.fspath(tensorboard)
    if not isinstance(tensorboard, (bool, str)) or (isinstance(tensorboard, str) and not tensorboard.strip()):
        raise JobSpecError(f"{path} must be true, false or a directory for the event files; got {_got(tensorboard)}")
    if isinstance(tensorboard, str):
        if URL_SCHEME.match(tensorboard):
            raise JobSpecError(f"{path} must be a local directory (TensorBoard's event files are written by the "
                               f"coordinator); got {_shown(tensorboard)}")
        _absolute_path(path, tensorboard, " here (a job file's is resolved against the file's directory)")
    return tensorboard


def _init_value(path: str, init: Any) -> InitSpec | None:
    if init is not None and not isinstance(init, InitSpec):
        raise JobSpecError(f"{path} must be None or an InitSpec; got {init!r}")
    return init


def _code_dir_value(path: str, code_dir: Any) -> str | None:
    if code_dir is None:
        return None
    _check_text(path, code_dir, "the absolute path of the job file's directory")
    return _absolute_path(path, code_dir, " (the job file's directory)")


@dataclass(frozen=True)
class JobSpec:
    """A validated training job (the job file's reference: ``docs/jobs.md``).

    Constructing one checks every value on its own and together (types, ranges, choices,
    steps or epochs, keep_best with metric, an absolute run_dir). :func:`load_job`,
    :func:`parse_job`, :meth:`from_dict` and :meth:`replace` also build the task, the
    optimizer and the schedulers to check the names and arguments the values alone cannot
    show. ``param_groups`` None means the task's own rules, ``()`` one group for all
    parameters. Training stops at ``steps`` or ``epochs``, whichever comes first.
    ``frozen``: glob patterns of parameters that are not trained (in no param group, no
    optimizer state). ``init``: the checkpoint a fine-tuning job starts from, or None.
    ``max_skipped_steps``: with ``nonfinite = "skip"``, the steps skipped in a row after
    which the run stops with an error (it is diverging).
    """

    task: str = setting("task.name", _task_name)
    task_args: dict = setting("task.args", _check_args)
    optimizer: str = setting("optimizer.name", _optimizer_name)
    optimizer_args: dict = setting("optimizer.args", _check_args)
    param_groups: tuple[ParamGroupRule, ...] | None = setting("param_groups", _checked_rules)
    schedulers: tuple[SchedulerSpec, ...] = setting("schedulers", _checked_schedulers)
    steps: int | None = setting("training.steps", _integer(0, optional=True))
    epochs: int | None = setting("training.epochs", _integer(0, optional=True))
    batch_size: int = setting("training.batch_size", _integer(1), default=64)
    seed: int = setting("training.seed", _integer(0), default=0)
    eval_every: int | None = setting("training.eval_every", _integer(1, optional=True), default=None)
    clip_grad_norm: float | None = setting("training.clip_grad_norm", _number(0.0, strict=True, optional=True),
                                           default=None)
    nonfinite: str = setting("training.nonfinite", _one_of(NONFINITE_POLICIES), default="stop")
    max_skipped_steps: int = setting("training.max_skipped_steps", _integer(1), default=DEFAULT_MAX_SKIPPED_STEPS)
    time_limit: float | None = setting("training.time_limit", _number(0.0, strict=True, optional=True), default=None)
    accumulate: int = setting("training.accumulate", _integer(1), default=1)
    # torch's scalar dtype for step counters and scalar optimizer state (docs/optimizers.md)
    scalar_dtype: str = setting("training.scalar_dtype", _one_of(DEFAULT_DTYPES), default="float32")
    shards: int = setting("resources.shards", _integer(1), default=1)
    workers: int = setting("resources.workers", _integer(1), default=1)
    backend: str = setting("resources.backend", _one_of(BACKENDS), default="ray")
    address: str | None = setting("resources.address", _text("a Ray cluster address such as 'ray://head:10001' or "
                                                              "'auto'", optional=True), default=None)
    max_failures: int = setting("resources.max_failures", _integer(0), default=0)
    worker_cpus: float = setting("resources.worker_cpus", _number(0.0, strict=False), default=0.0)
    shard_cpus: float = setting("resources.shard_cpus", _number(0.0, strict=False), default=0.0)
    transport: str = setting("resources.transport", _one_of(TRANSPORTS), default="auto")
    start_timeout: float = setting("resources.start_timeout", _number(0.0, strict=True),
                                   default=DEFAULT_START_TIMEOUT)
    placement: str | None = setting("resources.placement", _one_of(PLACEMENTS, optional=True), default=None)
    shard_resources: dict = setting("resources.shard_resources", _resources("shard"), factory=dict)
    worker_resources: dict = setting("resources.worker_resources", _resources("worker"), factory=dict)
    shard_labels: dict = setting("resources.shard_labels", _check_labels, factory=dict)
    worker_labels: dict = setting("resources.worker_labels", _check_labels, factory=dict)
    checkpoint_every: int | None = setting("checkpoint.every", _integer(1, optional=True), default=None)
    checkpoint_async: bool = setting("checkpoint.async", _check_bool, default=True)
    keep_last: int | None = setting("checkpoint.keep_last", _integer(1, optional=True), default=None)
    keep_every: int | None = setting("checkpoint.keep_every", _integer(1, optional=True), default=None)
    keep_best: int | None = setting("checkpoint.keep_best", _integer(1, optional=True), default=None)
    keep_metric: str | None = setting("checkpoint.metric", _text(f"{TRAINING_LOSS!r} or the name of a metric of "
                                                                 f"the task", optional=True), default=None)
    keep_mode: str = setting("checkpoint.mode", _one_of(KEEP_MODES), default="min")
    # the run's result is its best checkpoint by keep_metric, not its last (docs/jobs.md)
    load_best: bool = setting("checkpoint.load_best", _check_bool, default=False)
    stop_metric: str | None = setting("early_stopping.metric", _text("the name of a metric the task's evaluation "
                                                                     "reports", optional=True), default=None)
    stop_patience: int = setting("early_stopping.patience", _integer(1), default=3)
    stop_min_delta: float = setting("early_stopping.min_delta", _number(0.0, strict=False), default=0.0)
    stop_mode: str = setting("early_stopping.mode", _one_of(KEEP_MODES), default="min")
    # [logging]: TensorBoard event files (true: in RUN_DIR/tensorboard, or a directory), an
    # MLflow run (the tracking URI, else MLFLOW_TRACKING_URI's; the experiment),
    # Ray's metrics (docs/observability.md)
    tensorboard: bool | str = setting("logging.tensorboard", _tensorboard_value, default=False)
    mlflow: bool = setting("logging.mlflow", _check_bool, default=False)
    mlflow_tracking_uri: str | None = setting("logging.mlflow_tracking_uri", _text(
        "an MLflow tracking URI such as 'http://127.0.0.1:5000' or 'sqlite:///runs/mlflow.db'", optional=True),
        default=None)
    mlflow_experiment: str = setting("logging.mlflow_experiment", _text("the name of an MLflow experiment"),
                                     default=DEFAULT_MLFLOW_EXPERIMENT)
    ray_metrics: bool = setting("logging.ray_metrics", _check_bool, default=True)
    run_dir: str = setting("run_dir", _run_dir_value, default="")
    frozen: tuple[str, ...] = setting("frozen", _check_patterns, default=())
    init: InitSpec | None = setting("init", _init_value, default=None)
    # not a key of the file: the directory the file is in, where its own code is imported from
    code_dir: str | None = setting("code_dir", _code_dir_value, default=None)

    def __post_init__(self) -> None:
        for name, value in _checked_fields(self).items():
            object.__setattr__(self, name, value)

    def retention(self) -> Retention | None:
        """The checkpoint retention policy; None when no ``keep_*`` rule is set (keep all)."""
        if self.keep_last is None and self.keep_every is None and self.keep_best is None:
            return None
        return Retention(keep_last=self.keep_last, keep_every=self.keep_every, keep_best=self.keep_best,
                         metric=self.keep_metric, mode=self.keep_mode)

    def is_frozen(self, name: str) -> bool:
        """Whether parameter ``name`` matches a ``frozen`` pattern (it is not trained)."""
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.frozen)

    def group_rules(self, task: Task, trainable: Sequence[str]) -> tuple[ParamGroupRule, ...]:
        """The param-group rules the optimizer is built with over the ``trainable`` names: the
        job's, or else the task's own less those that match only frozen parameters (freezing
        what a task rule selects is the user's choice; a rule of the job's that matches only
        frozen parameters is an error of the job file)."""
        if self.param_groups is not None:
            return self.param_groups
        return tuple(rule for rule in task.param_groups if any(rule.matches(name) for name in trainable))

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, as plain values (msgpack and JSON carry them): param_groups
        as None or ``[{"pattern", "options"}]``, schedulers as ``[{"name", "args",
        "interval", "monitor"}]``, init as None or ``{"from", "step", "optimizer_state",
        "skip"}``."""
        out: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if item.name == "param_groups":
                value = None if value is None else [
                    {"pattern": rule.pattern, "options": _plain("options", rule.options)} for rule in value]
            elif item.name == "schedulers":
                value = [scheduler.to_dict() for scheduler in value]
            elif item.name == "init":
                value = None if value is None else value.to_dict()
            else:
                value = _plain(item.name, value)
            out[item.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobSpec:
        """The inverse of :meth:`to_dict`, checked like a loaded job file. Fields with a
        default may be left out; unknown fields are refused."""
        if not isinstance(data, Mapping):
            raise JobSpecError(f"a job spec must be a dict of fields; got {_got(data)}")
        names = [item.name for item in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                raise JobSpecError(f"unknown field {key!r}{_suggest(key, names)}; allowed: {', '.join(names)}")
        required = [item.name for item in dataclasses.fields(cls)
                    if item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise JobSpecError(f"a job spec needs the fields {', '.join(required)}; missing {', '.join(missing)}")
        values = dict(data)
        values["param_groups"] = _rules_from_dicts(values["param_groups"])
        values["schedulers"] = _schedulers_from_dicts(values["schedulers"])
        if values.get("init") is not None and not isinstance(values["init"], InitSpec):
            values["init"] = InitSpec.from_dict(values["init"])
        spec = cls(**values)
        _check_build(spec)
        return spec

    def replace(self, **changes: Any) -> JobSpec:
        """A copy with ``changes`` applied, checked again (the command line's overrides).
        The task, optimizer and schedulers are built again only when a field they depend on
        changes."""
        names = [item.name for item in dataclasses.fields(self)]
        for key in changes:
            if key not in names:
                raise JobSpecError(f"unknown field {key!r}{_suggest(key, names)}; allowed: {', '.join(names)}")
        spec = dataclasses.replace(self, **changes)
        if any(getattr(spec, name) != getattr(self, name) for name in BUILD_FIELDS):
            _check_build(spec)
        return spec


# where each field lives in the job file, from the declarations: the one table the parser,
# the checks and the messages share
FIELD_KEYS: dict[str, str] = {item.name: item.metadata["key"] for item in dataclasses.fields(JobSpec)}
# the tables of plain settings: table -> {key: field}
SETTING_TABLES: dict[str, dict[str, str]] = {
    table: {key.partition(".")[2]: name for name, key in FIELD_KEYS.items() if key.startswith(f"{table}.")}
    for table in ("training", "resources", "checkpoint", "early_stopping", "logging")
}


def _rules_from_dicts(value: Any) -> tuple[ParamGroupRule, ...] | None:
    if value is None:
        return None
    return _entries("param_groups", value, ParamGroupRule, "None or a list of {pattern, options}", _rule_from_dict)


def _schedulers_from_dicts(value: Any) -> tuple[SchedulerSpec, ...]:
    return _entries("schedulers", value, SchedulerSpec, "a list of {name, args, interval, monitor}",
                    _scheduler_from_dict)


def _entries(key: str, value: Any, kind: type, allowed: str, from_dict: Callable[[str, Any], Any]) -> tuple:
    """A job file's array of tables ``key``: each entry ``kind`` as given, or made from its
    table by ``from_dict(path, table)``."""
    if not isinstance(value, (list, tuple)):
        raise JobSpecError(f"{key} must be {allowed}; got {_got(value)}")
    return tuple(item if isinstance(item, kind) else from_dict(f"{key}[{index}]", item)
                 for index, item in enumerate(value))


def _rule_from_dict(path: str, item: Any) -> ParamGroupRule:
    if not isinstance(item, Mapping) or set(item) != {"pattern", "options"}:
        raise JobSpecError(f"{path} must be a dict with exactly the keys 'pattern' and 'options'; got {item!r}")
    return _rule(path, item["pattern"], item["options"])


def _scheduler_from_dict(path: str, item: Any) -> SchedulerSpec:
    if not isinstance(item, Mapping):
        raise JobSpecError(f"{path} must be a dict of name, args, interval, monitor; got {_got(item)}")
    _check_keys(path, item, SCHEDULER_KEYS)
    if "name" not in item:
        raise JobSpecError(f"{path}.name is required: one of {', '.join(SCHEDULER_NAMES)}")
    values = _scheduler_values(path, item["name"], item.get("args", {}), item.get("interval", "step"),
                               item.get("monitor", TRAINING_LOSS))
    return SchedulerSpec(**values)


def _rule(path: str, pattern: Any, options: Any) -> ParamGroupRule:
    pattern = _check_text(f"{path}.pattern", pattern, "a glob on parameter names such as '*.bias'")
    if not isinstance(options, Mapping):
        raise JobSpecError(f"{path}.options must be a table of hyperparameters; got {_got(options)}")
    options = _plain(path, options)
    for key in ("params", "param_names"):
        if key in options:
            raise JobSpecError(f"{path}.{key} cannot be set: the pattern chooses the parameters")
    return ParamGroupRule(pattern, options)


def _checked_fields(spec: JobSpec) -> dict[str, Any]:
    """Every field of ``spec`` checked and normalized: each alone by its declared check, in
    the order of the declarations, then together."""
    out = {item.name: item.metadata["check"](item.metadata["key"], getattr(spec, item.name))
           for item in dataclasses.fields(spec)}
    _check_together(out)
    return out


def _check_together(out: dict[str, Any]) -> None:
    """What ties the (each valid) fields ``out`` together, in the order of the job file's tables."""
    key = FIELD_KEYS
    data = out["task_args"].get("data") if out["task"] == DATA_TASK else None
    if isinstance(data, Mapping):
        for name in DATA_PATH_KEYS:  # a job file's are resolved against its directory
            value = data.get(name)
            if isinstance(value, str) and value and _object_url(f"data.{name}", value) is None:
                _absolute_path(f"data.{name}", value, " or a URL here (a job file's relative path is resolved "
                                                      "against the file's directory)")
    infinite = INFINITE_HYPERPARAMETERS.get(out["optimizer"], ())
    _check_finite(key["optimizer_args"], out["optimizer_args"], infinite)
    for index, rule in enumerate(out["param_groups"] or ()):
        _check_finite(f"param_groups[{index}]", rule.options, infinite)

    if out["steps"] is None and out["epochs"] is None:
        raise JobSpecError(f"{key['steps']} or {key['epochs']} is required (give both to stop at whichever "
                           f"comes first)")
    if out["accumulate"] > out["batch_size"]:
        raise JobSpecError(f"{key['accumulate']} = {out['accumulate']} micro-batches cannot be cut from "
                           f"{key['batch_size']} = {out['batch_size']} examples; give at most {out['batch_size']}")

    _check_resources_together(out)

    if (out["keep_best"] is None) != (out["keep_metric"] is None):
        raise JobSpecError(f"{key['keep_best']} and {key['keep_metric']} go together (keep the best N checkpoints "
                           f"by that metric); got keep_best = {out['keep_best']!r}, metric = {out['keep_metric']!r}")
    if out["load_best"] and out["keep_best"] is None:
        raise JobSpecError(f"{key['load_best']} = true makes the best checkpoint the run's result, so it needs "
                           f"{key['keep_best']} and {key['keep_metric']} (which keep it and say what best is)")
    if out["keep_best"] is None and out["keep_mode"] != "min":
        raise JobSpecError(f"{key['keep_mode']} applies to keep_best; got mode = {out['keep_mode']!r} without "
                           f"keep_best and metric")

    if out["stop_metric"] is None and (out["stop_patience"], out["stop_min_delta"], out["stop_mode"]) != (3, 0.0, "min"):
        raise JobSpecError(f"{key['stop_patience']}, {key['stop_min_delta']} and {key['stop_mode']} apply to early "
                           f"stopping, which needs {key['stop_metric']}")
    if out["stop_metric"] is not None and out["eval_every"] is None:
        raise JobSpecError(f"{key['stop_metric']} = {out['stop_metric']!r} stops on evaluations, so "
                           f"{key['eval_every']} is required with it")

    _check_logging_together(out)

    if out["frozen"] and out["optimizer"] == "lbfgs":
        raise JobSpecError(f"{key['frozen']} cannot be used with LBFGS (its direction and history span every "
                           f"parameter); got frozen = {list(out['frozen'])}")
    init = out["init"]
    if init is not None:
        if _inside(init.source, out["run_dir"]):
            raise JobSpecError(f"init.from must be another run's checkpoint, outside this job's run_dir "
                               f"({out['run_dir']}); got {init.source!r}")
        if init.optimizer_state and out["optimizer"] == "lbfgs":
            raise JobSpecError("init.optimizer_state = true cannot be used with LBFGS (its history spans every "
                               "parameter of the source); set optimizer_state = false")
    # the last word on retention is the checkpoint store's own check
    try:
        Retention(keep_last=out["keep_last"], keep_every=out["keep_every"], keep_best=out["keep_best"],
                  metric=out["keep_metric"], mode=out["keep_mode"])
    except ValueError as error:
        raise JobSpecError(f"checkpoint: {error}") from error


def _check_resources_together(out: Mapping[str, Any]) -> None:
    """[resources]: the keys that only the Ray backend uses, and placement against what the
    actors ask for."""
    key = FIELD_KEYS
    data = out["task_args"].get("data") if out["task"] == DATA_TASK else None
    if isinstance(data, Mapping) and data.get("ray_data") is True and out["backend"] != "ray":
        raise JobSpecError(f"data.ray_data = true reads the data with Ray Data on the cluster, which needs "
                           f"{key['backend']} = 'ray'; got backend {out['backend']!r}")
    if out["address"] is not None and out["backend"] != "ray":
        raise JobSpecError(f"{key['address']} is a Ray cluster address, used only by backend 'ray'; got address "
                           f"{out['address']!r} with backend {out['backend']!r}")
    if out["transport"] != "auto" and out["backend"] != "ray":
        raise JobSpecError(f"{key['transport']} chooses how Ray actors exchange data, used only by backend 'ray'; "
                           f"got transport {out['transport']!r} with backend {out['backend']!r}")
    placed = [name for name in ("placement", "shard_resources", "worker_resources", "shard_labels", "worker_labels")
              if out[name]]
    if placed and out["backend"] != "ray":
        raise JobSpecError(f"{key[placed[0]]} places Ray actors, used only by backend 'ray'; got "
                           f"{placed[0]} = {out[placed[0]]!r} with backend {out['backend']!r}")
    if placed and out["transport"] == "shared_memory":
        raise JobSpecError(f"{key['transport']} = 'shared_memory' pins every actor to the coordinator's node, which "
                           f"{key[placed[0]]} contradicts; use transport 'auto' or 'object_store' to place the actors")
    if out["placement"] is not None:
        empty = [kind for kind in ("shard", "worker")
                 if not out[f"{kind}_cpus"] and not out[f"{kind}_resources"]]
        if empty:
            raise JobSpecError(f"{key['placement']} = {out['placement']!r} places one bundle of resources per actor, "
                               f"but the {empty[0]}s ask for none; set resources.{empty[0]}_cpus > 0 (or "
                               f"{empty[0]}_resources)")


def _check_logging_together(out: Mapping[str, Any]) -> None:
    """[logging]: the MLflow keys that need mlflow = true, event files beside a run on object
    storage, and the package each integration needs installed (checked here, before anything
    is written: a missing extra is a bad job, not a failed run)."""
    key = FIELD_KEYS
    run_dir = out["run_dir"]
    if out["tensorboard"] is True and URL_SCHEME.match(run_dir):
        raise JobSpecError(f"{key['tensorboard']} = true writes the event files into the run directory, which is "
                           f"on object storage ({run_dir}); give a local directory instead, e.g. "
                           f"tensorboard = \"tensorboard/{Path(run_dir).name}\"")
    if not out["mlflow"] and (out["mlflow_tracking_uri"] is not None
                              or out["mlflow_experiment"] != DEFAULT_MLFLOW_EXPERIMENT):
        raise JobSpecError(f"{key['mlflow_tracking_uri']} and {key['mlflow_experiment']} apply to MLflow logging, "
                           f"which needs {key['mlflow']} = true")
    # MLflow 3 refuses its file store unless MLFLOW_ALLOW_FILE_STORE is set, and its sqlite
    # store needs the full mlflow package: there is no default that works everywhere, so the
    # store is the user's choice
    if out["mlflow"]:
        mlflow_tracking_uri(out["mlflow_tracking_uri"])
    for field, module, extra in (("tensorboard", "tensorboard", "tensorboard"), ("mlflow", "mlflow", "mlflow")):
        if out[field] is not False and importlib.util.find_spec(module) is None:
            raise JobSpecError(f"{key[field]} needs the {module} package, which is not installed here: "
                               f"pip install 'shardstep[{extra}]'")


def mlflow_tracking_uri(given: str | None) -> str:
    """The MLflow store a run logs to: ``logging.mlflow_tracking_uri``, else the environment's
    MLFLOW_TRACKING_URI where the run starts (a cluster's driver may lack what the machine
    that checked the job had)."""
    uri = given or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise JobSpecError(f"{FIELD_KEYS['mlflow']} = true needs {FIELD_KEYS['mlflow_tracking_uri']} (or "
                           f"MLFLOW_TRACKING_URI where the run starts): a tracking server such as "
                           f"'http://127.0.0.1:5000', or a store such as 'sqlite:///runs/mlflow.db' (the full mlflow "
                           f"package)")
    return uri


# ---------------------------------------------------------------------------------------
# checks that build the task, the optimizer and the schedulers


def _check_build(spec: JobSpec) -> None:
    """Build what the job builds, on stand-ins where size matters; raise JobSpecError with
    the key that caused a failure."""
    use_job_code(spec.code_dir)  # what the job names may lie beside its file
    task = _build_task(spec)
    prepare_task(task, spec.task)
    dtypes = {param.name: np.dtype(param.dtype) for param in _param_specs(task, spec)}
    metrics = _metric_names(task, spec)

    names = list(dtypes)
    for index, pattern in enumerate(spec.frozen):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise JobSpecError(f"{FIELD_KEYS['frozen']}[{index}] (pattern {pattern!r}) matches no parameter of task "
                               f"{spec.task!r}; parameters: {', '.join(names)}")
    trainable = [name for name in names if not spec.is_frozen(name)]
    if not trainable:
        raise JobSpecError(f"{FIELD_KEYS['frozen']} matches every parameter of task {spec.task!r} "
                           f"({', '.join(names)}): nothing would be trained")
    for index, rule in enumerate(spec.param_groups or ()):
        frozen = [name for name in names if rule.matches(name) and spec.is_frozen(name)]
        if frozen and not any(rule.matches(name) for name in trainable):
            raise JobSpecError(f"param_groups[{index}] (pattern {rule.pattern!r}) matches only frozen parameters "
                               f"({', '.join(frozen)}); frozen parameters are in no param group")
    _check_gradient_kinds(spec, task, trainable)

    # frozen parameters are not the optimizer's (torch's requires_grad=False)
    trainable_dtypes = {name: dtypes[name] for name in trainable}
    # the groups come from the optimizer's rule, built piece by piece so a failure names its
    # key; the builders raise TypeError or ValueError for the bad arguments they foresee, and
    # any other failure (an overflow on an extreme value) still names its key
    try:
        optimizer_groups(spec.optimizer, spec.optimizer_args, trainable_dtypes, ())
    except Exception as error:
        raise JobSpecError(f"{FIELD_KEYS['optimizer_args']}: {_message(error)}") from error
    if spec.param_groups is None:
        rules, where = spec.group_rules(task, trainable), f"task {spec.task!r}'s param_groups"
        hint = "; set param_groups = [] in the job for one group of all parameters"
    else:
        rules, where, hint = spec.param_groups, "param_groups", ""
    for index, rule in enumerate(rules):
        try:
            optimizer_groups(spec.optimizer, spec.optimizer_args, trainable_dtypes, (rule,))
        except Exception as error:
            raise JobSpecError(f"{where}[{index}] (pattern {rule.pattern!r}): {_message(error)}{hint}") from error
    try:
        optimizer = optimizer_groups(spec.optimizer, spec.optimizer_args, trainable_dtypes, rules)
    except Exception as error:
        raise JobSpecError(f"{where}: {_message(error)}{hint}") from error

    for index, scheduler in enumerate(spec.schedulers):
        path = f"schedulers[{index}]"
        _check_required_args(path, scheduler)
        args = _without_calls(f"{path}.args", scheduler.name, scheduler.args)
        try:
            build_scheduler(scheduler.name, args, optimizer)
        except Exception as error:
            raise JobSpecError(f"{path}.args: {_message(error)}") from error
        if scheduler.monitor != TRAINING_LOSS and scheduler.monitor not in metrics:
            raise JobSpecError(f"{path}.monitor must be {TRAINING_LOSS!r} or a metric of task {spec.task!r} "
                               f"({', '.join(sorted(metrics))}); got {scheduler.monitor!r}"
                               f"{_suggest(scheduler.monitor, sorted(metrics))}")
    if spec.stop_metric is not None and spec.stop_metric not in metrics:
        raise JobSpecError(f"{FIELD_KEYS['stop_metric']} must be a metric of task {spec.task!r}'s evaluation "
                           f"({', '.join(sorted(metrics))}); got {spec.stop_metric!r}"
                           f"{_suggest(spec.stop_metric, sorted(metrics))}")
    if spec.keep_metric is not None and spec.keep_metric != TRAINING_LOSS and spec.keep_metric not in metrics:
        raise JobSpecError(f"{FIELD_KEYS['keep_metric']} must be {TRAINING_LOSS!r} or a metric of task "
                           f"{spec.task!r} ({', '.join(sorted(metrics))}); got {spec.keep_metric!r}"
                           f"{_suggest(spec.keep_metric, sorted(metrics))}")


def _message(error: BaseException) -> str:
    """The builders' own messages as they are; anything else with its type (cut to
    FOREIGN_MESSAGE_CHARS: a message may quote a huge value)."""
    if isinstance(error, KeyError) and error.args:
        return _clip(str(error.args[0]))  # KeyError's str() is the repr of its argument
    if isinstance(error, (TypeError, ValueError)):
        return _clip(str(error))
    return _clip(f"{type(error).__name__}: {error}")


def _gradient_kinds(optimizer: str) -> tuple[str, ...]:
    """The kinds of gradient optimizer ``optimizer`` updates with: its rule's ``update``
    (dense) and ``update_rows`` (row-sparse). LBFGS has neither: its step runs its own driver
    over the dense gradient and refuses row-sparse ones."""
    rule = optimizer_rule(optimizer)
    if not rule.accepts_dense and not rule.accepts_sparse:
        return ("dense",)
    return tuple(kind for kind, accepted in (("dense", rule.accepts_dense), ("row-sparse", rule.accepts_sparse))
                 if accepted)


def _check_gradient_kinds(spec: JobSpec, task: Task, trainable: Sequence[str]) -> None:
    """The optimizer must take the kind of gradient the task gives every trainable parameter
    (``Task.sparse_gradients``): torch's Adam refuses row-sparse gradients and SparseAdam
    dense ones, but only at the first step, on the cluster."""
    patterns = task.sparse_gradients
    owner = type(task).__name__
    if isinstance(patterns, str) or not isinstance(patterns, (tuple, list)) or not all(
            isinstance(pattern, str) for pattern in patterns):
        raise JobSpecError(f"task {spec.task!r}: {owner}.sparse_gradients must be a tuple of glob patterns on "
                           f"parameter names; got {_got(patterns)}")
    sparse = [name for name in trainable if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
    kinds = {"row-sparse": sparse, "dense": [name for name in trainable if name not in sparse]}
    accepted = _gradient_kinds(spec.optimizer)
    for kind, names in kinds.items():
        if names and kind not in accepted:
            allowed = [name for name in OPTIMIZER_NAMES if kind in _gradient_kinds(name)]
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise JobSpecError(f"{FIELD_KEYS['optimizer']}: {optimizer_class(spec.optimizer).__name__} takes "
                               f"only {' and '.join(accepted)} gradients, but task {spec.task!r} gives {kind} "
                               f"gradients ({shown}); allowed with {kind} gradients: {', '.join(allowed)}")


def _unit_schedule(_: float) -> float:
    """What a schedule function the job names stands for while its scheduler is built here
    (the constructor takes an initial step, which calls it): validation runs none of the
    job's code; the job's own function is called from the first step of training on."""
    return 1.0


def _without_calls(path: str, name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    """``args`` of scheduler ``name`` (and of a composite's children) for the build check:
    every schedule function named by a string is resolved (imported, checked callable) and
    replaced by :func:`_unit_schedule`. Calling it here would run the user's code at
    validation: ``lr_lambda = "os:_exit"`` ended the process with exit code 0."""
    args = dict(args)
    argument = lr_scheduler.SCHEDULE_FUNCTION_ARGUMENTS.get(name)
    if argument is not None and argument in args:
        value = args[argument]
        items = value if isinstance(value, list) else [value]
        for index, item in enumerate(items):
            if isinstance(item, str):
                where = f"{path}.{argument}" + (f"[{index}]" if isinstance(value, list) else "")
                _check_importable(where, item, argument)
        # anything but a string is left for the constructor to refuse in its own words
        standing_in = [_unit_schedule if isinstance(item, str) else item for item in items]
        args[argument] = standing_in if isinstance(value, list) else standing_in[0]
    children = args.get("schedulers")
    if name in COMPOSITE_SCHEDULERS and isinstance(children, list):
        folded = {scheduler.lower(): scheduler for scheduler in SCHEDULER_NAMES}
        args["schedulers"] = [
            [child[0], _without_calls(f"{path}.schedulers[{index}][1]", folded[child[0].lower()], child[1])]
            if (isinstance(child, list) and len(child) == 2 and isinstance(child[0], str)
                and child[0].lower() in folded and isinstance(child[1], Mapping)) else child
            for index, child in enumerate(children)]
    return args


def _check_importable(path: str, reference: str, argument: str) -> None:
    """Import the function ``reference`` names and check that it is callable, without
    calling it. Importing runs the module's top level: an import that fails or exits is
    refused with its key."""
    try:
        lr_scheduler.resolve_schedule_function(reference, argument)
    except (TypeError, ValueError) as error:
        raise JobSpecError(f"{path}: {_clip(str(error))}") from error
    except (Exception, SystemExit) as error:
        raise JobSpecError(f"{path}: importing {_shown(reference)} failed: {_message(error)}") from error


def _build_task(spec: JobSpec) -> Task:
    try:
        task_class(spec.task)
    except (TypeError, ValueError) as error:
        raise JobSpecError(f"{FIELD_KEYS['task']}: {_message(error)}{_suggest(spec.task, TASK_NAMES)}") from error
    try:
        return make_task(spec.task, **spec.task_args)
    except TaskArgumentError as error:  # its message names the job-file key
        raise JobSpecError(_clip(str(error))) from error
    except (TypeError, ValueError) as error:
        raise JobSpecError(f"{FIELD_KEYS['task_args']}: {_message(error)}") from error
    except Exception as error:  # a task of the user's may fail any way; name it and its key
        raise JobSpecError(f"{FIELD_KEYS['task_args']}: building task {spec.task!r} failed: "
                           f"{_message(error)}") from error


def prepare_task(task: Task, name: str) -> None:
    """``task.prepare()`` (its data read and checked), every failure a JobSpecError."""
    try:
        task.prepare()
    except (DataError, TaskArgumentError) as error:  # the message names the key, file and column
        raise JobSpecError(_clip(str(error))) from error
    except Exception as error:
        raise JobSpecError(f"task {name!r}: {type(task).__name__}.prepare() (reading its data) failed: "
                           f"{_clip(f'{type(error).__name__}: {error}')}") from error


def serve_task(task: Task, name: str) -> None:
    """``task.serve()`` once Ray is up (Ray Data's row servers), a bad file a JobSpecError."""
    try:
        task.serve()
    except (DataError, TaskArgumentError) as error:
        raise JobSpecError(_clip(str(error))) from error


def _param_specs(task: Task, spec: JobSpec) -> tuple[ParamSpec, ...]:
    """The task's parameters by name, shape and dtype (``task.param_specs()``: the model
    itself is built by the shards, never here, unless the task does not know its shapes)."""
    owner = type(task).__name__
    try:
        specs = task.param_specs()
    except Exception as error:
        raise JobSpecError(f"task {spec.task!r}: {owner}.param_specs() failed (by default it calls init_params(0)): "
                           f"{_clip(f'{type(error).__name__}: {error}')}") from error
    if not isinstance(specs, (tuple, list)) or not specs or not all(isinstance(s, ParamSpec) for s in specs):
        raise JobSpecError(f"task {spec.task!r}: {owner}.param_specs() must return a non-empty tuple of "
                           f"ParamSpec; got {specs!r:.80}")
    for param in specs:
        if param.dtype not in ("float32", "float64"):
            raise JobSpecError(f"task {spec.task!r}: {owner}'s parameters must be float32 or float64; got "
                               f"{param.name!r} of dtype {param.dtype}")
    return tuple(specs)


def _metric_names(task: Task, spec: JobSpec) -> frozenset[str]:
    """The task's evaluation metrics, found by one evaluation of the initial parameters; run
    only when the spec names a metric other than the training loss (the one check that
    builds the model here)."""
    named = [s.monitor for s in spec.schedulers] + ([spec.keep_metric] if spec.keep_metric else [])
    # early stopping's metric is always the evaluation's own, even when it is called "loss"
    if all(name == TRAINING_LOSS for name in named) and spec.stop_metric is None:
        return frozenset()
    owner = type(task).__name__
    known = task.metric_names()
    if known is not None:
        return frozenset(known)
    try:
        metrics = task.evaluate(task.init_params(spec.seed))
    except Exception as error:
        raise JobSpecError(f"task {spec.task!r}: {owner}.evaluate of the initial parameters failed (needed to "
                           f"check the metric names): {_clip(f'{type(error).__name__}: {error}')}") from error
    if not isinstance(metrics, Mapping):
        raise JobSpecError(f"task {spec.task!r}: {owner}.evaluate must return a dict of metrics; got "
                           f"{type(metrics).__name__}")
    return frozenset(str(name) for name in metrics)


def _check_required_args(path: str, scheduler: SchedulerSpec) -> None:
    """Arguments the scheduler cannot do without, named before its constructor would fail."""
    signature = inspect.signature(getattr(lr_scheduler, scheduler.name))
    required = [name for name, parameter in signature.parameters.items()
                if name != "optimizer" and parameter.default is inspect.Parameter.empty
                and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    missing = [name for name in required if name not in scheduler.args]
    if missing:
        raise JobSpecError(f"{path}.args: {scheduler.name} requires {', '.join(missing)}; got "
                           f"{', '.join(scheduler.args) or 'no arguments'}")


# ---------------------------------------------------------------------------------------
# the job file


# ---------------------------------------------------------------------------------------
# --set KEY=VALUE: job keys from the command line

# fields no job file sets (where the job's code lives is the job file's own directory)
INTERNAL_FIELDS = ("code_dir",)
# the tables whose own keys --set reaches into: (key prefix, field, the part of the field)
_NESTED_KEYS = (("task.args.", "task_args", ()), ("optimizer.args.", "optimizer_args", ()),
                ("data.", "task_args", ("data",)), ("model.", "task_args", ("model",)))


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` as (dotted job key, value): the value is read as a TOML value
    (``300``, ``1e-3``, ``true``, ``[64, 32]``, ``"adam"``), or else taken as a string
    (``optimizer.name=adamw``)."""
    key, equals, raw = text.partition("=")
    key = key.strip()
    if not equals or not key:
        raise JobSpecError(f"--set {text!r}: expected KEY=VALUE with a dotted job key, e.g. training.steps=300")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except (tomllib.TOMLDecodeError, RecursionError):
        value = raw.strip()
    return key, value


def assigned_fields(spec: JobSpec, assignments: Sequence[str]) -> dict[str, Any]:
    """The JobSpec fields that ``--set`` assignments give ``spec`` (for ``spec.replace``,
    which checks them as a job file's values are checked)."""
    by_key = {key: field for field, key in FIELD_KEYS.items() if field not in INTERNAL_FIELDS}
    fields: dict[str, Any] = {}
    for text in assignments:
        key, value = parse_assignment(text)
        if key in by_key:
            fields[by_key[key]] = value
            continue
        nested = next(((field, root, key[len(prefix):]) for prefix, field, root in _NESTED_KEYS
                       if key.startswith(prefix) and len(key) > len(prefix)
                       and (not root or spec.task == DATA_TASK)), None)
        if nested is None:
            raise JobSpecError(f"--set {key}: not a job key{_suggest(key, list(by_key))}; the keys are the job "
                               f"file's, dotted: training.steps, optimizer.args.lr, resources.workers, data.train, "
                               f"model.layers, ... (docs/jobs.md)")
        field, root, rest = nested
        table = copy.deepcopy(fields.get(field, getattr(spec, field)))
        parts = [*root, *rest.split(".")]
        inner = table
        for part in parts[:-1]:
            if not isinstance(inner.get(part), dict):
                inner[part] = {}
            inner = inner[part]
        inner[parts[-1]] = value
        fields[field] = table
    return fields


def load_job(path: str | os.PathLike) -> JobSpec:
    """Read and check the TOML job file at ``path``; a relative run_dir is resolved against
    the file's directory."""
    path = Path(path)
    text = _read_job_file(path)
    return parse_job(text, source=_path_shown(path), base_dir=path.parent)


def _path_shown(path: Path) -> str:
    """``path`` as a message shows it: as it is, or quoted when it holds a character that
    would break the message's line (a newline in a file name)."""
    text = str(path)
    return text if text.isprintable() else _shown(text)


def _read_job_file(path: Path) -> str:
    """The text of the job file at ``path``: a regular file of at most MAX_JOB_FILE_BYTES of
    UTF-8. It is opened without blocking (a FIFO with no writer would wait forever) and
    checked through the open descriptor, so what is read is what was checked (a path swapped
    for /dev/zero in between is still refused)."""
    shown = _path_shown(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        descriptor = os.open(path, flags)
    except FileNotFoundError:
        raise JobSpecError(f"job file not found: {shown}") from None
    except OSError as error:
        raise JobSpecError(f"cannot read job file {shown}: {error.strerror or error}") from error
    except ValueError as error:  # a NUL in the path
        raise JobSpecError(f"cannot read job file {shown}: {error}") from None
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            raise JobSpecError(f"cannot read job file {shown}: it is {_file_kind(mode)}, not a regular file")
        chunks, read = [], 0
        # one byte past the limit tells a file that grew after fstat
        while read <= MAX_JOB_FILE_BYTES and (chunk := os.read(descriptor, MAX_JOB_FILE_BYTES + 1 - read)):
            chunks.append(chunk)
            read += len(chunk)
        size = max(read, os.fstat(descriptor).st_size)
    except OSError as error:
        raise JobSpecError(f"cannot read job file {shown}: {error.strerror or error}") from error
    finally:
        os.close(descriptor)
    data = b"".join(chunks)
    if size > MAX_JOB_FILE_BYTES:
        raise JobSpecError(f"cannot read job file {shown}: it is {size} bytes; a job file may be at most "
                           f"{MAX_JOB_FILE_BYTES} bytes (1 MiB)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise JobSpecError(f"{shown}: a job file must be UTF-8 text; byte {error.start} is not") from error


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((kind for test, kind in kinds if test(mode)), f"a file of type {stat.S_IFMT(mode):o}")


def parse_job(text: str, *, source: str = "<job>", base_dir: Path | None = None) -> JobSpec:
    """Check the job file ``text``; messages start with ``"<source>: "``. A relative run_dir
    is resolved against ``base_dir`` (the current directory when None)."""
    try:
        document = _parse_toml(text)
        fields, hints = _fields_from_document(document, base_dir)
        spec = JobSpec(**fields)
        try:
            _check_build(spec)
        except JobSpecError as error:
            # an args table refused a key that belongs at the top level: say why it landed there
            hint = next((hint for path, hint in hints.items() if str(error).startswith(path)), "")
            if not hint:
                raise
            raise JobSpecError(f"{error}{hint}") from error.__cause__
        return spec
    except JobSpecError as error:
        raise JobSpecError(f"{source}: {error}") from error.__cause__


# the openers of what the key-path scan skips: strings (multi-line ones first) and comments
_SKIPPED_OPENER = re.compile(r"\"\"\"|'''|[\"'#]")
_STRING_REST = {'"""': re.compile(r'(?:\\.|[^\\])*?"""', re.DOTALL), "'''": re.compile(r".*?'''", re.DOTALL),
                '"': re.compile(r'(?:\\.|[^"\\\n])*"'), "'": re.compile(r"[^'\n]*'")}
# a key path of more than MAX_NESTING parts (bare or quoted), matched from a part's start
_DEEP_KEY_PATH = re.compile(rf'(?<![A-Za-z0-9_-])(?:(?:[A-Za-z0-9_-]++|"")[ \t]*\.[ \t]*){{{MAX_NESTING}}}')


def _parse_toml(text: str) -> dict[str, Any]:
    """``tomllib.loads(text)``, every failure a JobSpecError: a syntax error with its line
    and column; nesting too deep for tomllib's recursion; a key path of more than
    MAX_NESTING parts (``a.b.c...``, which tomllib reads in quadratic time: 25 s for 40,000
    parts), refused before tomllib reads it; an integer too long for Python's int()."""
    code = _without_strings_and_comments(text)
    deep = _DEEP_KEY_PATH.search(code)
    if deep is not None:
        line = code.count("\n", 0, deep.start()) + 1
        raise JobSpecError(f"line {line}: a key path of more than {MAX_NESTING} parts ({_clip(deep.group(), 40)}); "
                           f"a job's tables nest at most {MAX_NESTING} deep")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise JobSpecError(f"TOML syntax error: {error}") from error
    except RecursionError:
        raise JobSpecError(f"arrays or tables nest too deeply for the TOML reader; a job's values may nest at most "
                           f"{MAX_NESTING} deep") from None
    except ValueError as error:  # int() of more than sys.get_int_max_str_digits() digits
        raise JobSpecError(f"a TOML value cannot be read: {str(error).partition(';')[0]}") from None


def _without_strings_and_comments(text: str) -> str:
    """``text`` with every string replaced by ``""`` and every comment removed, newlines
    kept, for the key-path scan; an unterminated string ends it (tomllib then refuses the
    file). Linear: the scan moves forward only, and stops at a string without an end."""
    kept, position = [], 0
    while (opener := _SKIPPED_OPENER.search(text, position)) is not None:
        kept.append(text[position:opener.start()])
        if opener.group() == "#":
            end = text.find("\n", opener.end())
            position = len(text) if end < 0 else end
            continue
        rest = _STRING_REST[opener.group()].match(text, opener.end())
        if rest is None:
            return "".join(kept)
        kept.append('""' + "\n" * text.count("\n", opener.start(), rest.end()))
        position = rest.end()
    kept.append(text[position:])
    return "".join(kept)


def _table(path: str, value: Any, form: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise JobSpecError(f"{path} must be a table ({form}); got {_got(value)}")
    return value


def _task_paths_resolved(task: Any, args: Any, base: Path) -> Any:
    """``args`` with the task's path arguments (:attr:`Task.path_arguments`) that are
    relative resolved against the job file's directory ``base``, like run_dir."""
    if not isinstance(task, str) or not isinstance(args, Mapping):
        return args  # refused with its own message by the checks
    try:
        names = task_class(task).path_arguments
    except Exception:
        return args  # an unknown task: the build check names it
    resolved = dict(args)
    for name in names:
        value = resolved.get(name)
        if isinstance(value, str) and value and not os.path.isabs(os.path.expanduser(value)):
            _check_path_text(f"task.args.{name}", value)
            resolved[name] = os.path.normpath(os.path.join(os.path.abspath(base), value))
    return resolved


def _fields_from_document(document: Mapping[str, Any], base_dir: Path | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The JobSpec fields of a parsed job file, its layout checked (values are checked by
    JobSpec), and a hint per args table that holds a top-level key (see :func:`_misplaced`)."""
    _check_keys("", document, TOP_LEVEL_KEYS)
    fields: dict[str, Any] = {}
    hints: dict[str, str] = {}

    run_dir = document.get("run_dir")
    if run_dir is None:
        raise JobSpecError("run_dir is required: the directory of the run's checkpoints (relative to the job file)")
    _check_location_text("run_dir", _check_text("run_dir", run_dir, "a directory path"))
    base = Path.cwd() if base_dir is None else Path(base_dir)
    fields["run_dir"] = _resolve_location("run_dir", run_dir, base)
    if base_dir is not None:
        fields["code_dir"] = os.path.abspath(base)
        use_job_code(fields["code_dir"])

    described = [table for table in ("data", "model") if table in document]
    if described:
        if "task" in document:
            raise JobSpecError(f"[{described[0]}] describes the task itself (the {DATA_TASK!r} task of [data] and "
                               f"[model]); a job gives either [task] or [data] with [model], not both")
        missing = next((table for table in ("data", "model") if table not in document), None)
        if missing is not None:
            raise JobSpecError(f"[{described[0]}] needs [{missing}] too: data + model make the task (or name a task "
                               f"with [task] instead)")
        data = dict(_table("data", document["data"], "[data]"))
        for key in DATA_PATH_KEYS:
            value = data.get(key)
            if isinstance(value, str) and value:
                _check_location_text(f"data.{key}", value)
                data[key] = _resolve_location(f"data.{key}", value, base)
        fields["task"] = DATA_TASK
        fields["task_args"] = {"data": data, "model": dict(_table("model", document["model"], "[model]"))}
    for table in ("task", "optimizer"):
        if table == "task" and described:
            continue
        if table not in document:
            raise JobSpecError(f"[{table}] is required, with at least {table}.name"
                               + (" (or describe the task with [data] and [model])" if table == "task" else ""))
        section = _table(table, document[table], f"[{table}]")
        _check_keys(table, section, NAMED_TABLE_KEYS)
        if "name" not in section:
            allowed = (f"a built-in task ({', '.join(TASK_NAMES)}) or 'package.module:Class'" if table == "task"
                       else f"one of {', '.join(OPTIMIZER_NAMES)}")
            raise JobSpecError(f"{table}.name is required: {allowed}")
        fields[table] = section["name"]
        fields[f"{table}_args"] = section.get("args", {})
        hints[f"{table}.args"] = _misplaced_in(f"{table}.args", fields[f"{table}_args"])
    if base_dir is not None and not described:
        fields["task_args"] = _task_paths_resolved(fields["task"], fields["task_args"], base)

    if "param_groups" in document:
        groups = document["param_groups"]
        if not isinstance(groups, list):
            raise JobSpecError(f"param_groups must be an array of tables ([[param_groups]], or [] for one group); "
                               f"got {_got(groups)}")
        rules = []
        for index, group in enumerate(groups):
            path = f"param_groups[{index}]"
            group = _table(path, group, "pattern plus hyperparameters")
            if "pattern" not in group:
                raise JobSpecError(f"{path}.pattern is required: a glob on parameter names such as '*.bias'")
            rules.append(_rule(path, group["pattern"], {k: v for k, v in group.items() if k != "pattern"}))
        fields["param_groups"] = tuple(rules)
    else:
        fields["param_groups"] = None

    schedulers = document.get("schedulers", [])
    if not isinstance(schedulers, list):
        raise JobSpecError(f"schedulers must be an array of tables ([[schedulers]]); got {_got(schedulers)}")
    specs = []
    for index, item in enumerate(schedulers):
        path = f"schedulers[{index}]"
        item = _table(path, item, "[[schedulers]]")
        _check_keys(path, item, SCHEDULER_KEYS)
        if "name" not in item:
            raise JobSpecError(f"{path}.name is required: one of {', '.join(SCHEDULER_NAMES)}")
        name = _scheduler_name(f"{path}.name", item["name"])
        if "monitor" in item and name != PLATEAU:
            raise JobSpecError(f"{path}.monitor applies only to {PLATEAU}; got monitor = {item['monitor']!r} "
                               f"on {name}")
        specs.append(SchedulerSpec(**_scheduler_values(path, name, item.get("args", {}), item.get("interval", "step"),
                                                       item.get("monitor", TRAINING_LOSS))))
        hints[f"{path}.args"] = _misplaced_in(f"{path}.args", item.get("args", {}))
    fields["schedulers"] = tuple(specs)

    if "frozen" in document:
        fields["frozen"] = document["frozen"]
    if "init" in document:
        section = _table("init", document["init"], "[init]")
        _check_keys("init", section, INIT_KEYS)
        if "from" not in section:
            raise JobSpecError("init.from is required: the run directory or step-<k> checkpoint directory to start "
                               "from (relative to the job file)")
        source = _check_location_text("init.from", _check_text("init.from", section["from"], "a directory path"))
        fields["init"] = InitSpec.from_dict({**section, "from": _resolve_location("init.from", source, base)})

    fields["steps"] = fields["epochs"] = None
    for table, keys in SETTING_TABLES.items():
        if table not in document:
            continue
        section = _table(table, document[table], f"[{table}]")
        _check_keys(table, section, list(keys))
        for key, value in section.items():
            fields[keys[key]] = value
    tensorboard = fields.get("tensorboard")
    if isinstance(tensorboard, str) and tensorboard.strip() and not URL_SCHEME.match(tensorboard):
        fields["tensorboard"] = _resolve_path("logging.tensorboard", _check_path_text("logging.tensorboard",
                                                                                      tensorboard), base)
    if fields["steps"] is None and fields["epochs"] is None:
        raise JobSpecError("training.steps or training.epochs is required (give both to stop at whichever "
                           "comes first)")
    return fields, {path: hint for path, hint in hints.items() if hint}


def _misplaced_in(path: str, args: Any) -> str:
    if not isinstance(args, Mapping):
        return ""
    return next((hint for key in args if (hint := _misplaced(path, key))), "")
