"""A job's own code: the modules a job file names (``task = "linreg:LinReg"``, a scheduler's
``lr_lambda = "schedules:warmup"``) import from the job file's directory, the way ``python
script.py`` imports what lies beside the script, in ``run``, ``resume`` and ``submit``.

- In the driver, the job's ``code_dir`` (the job file's directory, recorded in ``job.json``
  so ``resume`` finds it again) goes first on ``sys.path`` before anything the job names is
  imported.
- In the actors, the top-level module or package of each of those names that lies in
  ``code_dir`` travels with the run as Ray's ``py_modules`` (on one machine and on a
  cluster alike); installed packages and shardstep itself never do.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

# "package.module:attribute": how a job file names code
_REFERENCE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_.]*")


def use_job_code(code_dir: str | None) -> None:
    """Put the job's code directory first on this process's import path (once)."""
    if code_dir and code_dir not in sys.path:
        sys.path.insert(0, code_dir)


def _references(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value] if _REFERENCE.fullmatch(value) else []
    if isinstance(value, dict):
        return [name for item in value.values() for name in _references(item)]
    if isinstance(value, (list, tuple)):
        return [name for item in value for name in _references(item)]
    return []


def named_modules(spec: Any) -> list[str]:
    """The top-level modules of the code a job names: its task, its model's torch module
    (``[model] module``) and its schedule functions."""
    model = spec.task_args.get("model") if isinstance(spec.task_args, dict) else None
    names = (_references(spec.task) + [name for s in spec.schedulers for name in _references(s.args)]
             + (_references(model.get("module")) if isinstance(model, dict) else []))
    return sorted({name.partition(":")[0].split(".")[0] for name in names})


def shipped_modules(spec: Any) -> list[str]:
    """Paths of the job's own top-level modules and packages (those found in its
    ``code_dir``), for Ray's ``py_modules``."""
    code_dir = getattr(spec, "code_dir", None)
    if not code_dir:
        return []
    use_job_code(code_dir)
    root = Path(code_dir).resolve()
    shipped = []
    for name in named_modules(spec):
        if name == "shardstep":
            continue
        found = importlib.util.find_spec(name)
        if found is None:
            continue
        locations = list(found.submodule_search_locations or []) or ([found.origin] if found.origin else [])
        for location in locations:
            path = Path(location).resolve()
            if path.parent == root:
                shipped.append(str(path))
    return shipped
