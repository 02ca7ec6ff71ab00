"""The one registry of optimizer algorithms: name -> class name.

Adding an optimizer is one file in ``workers/optim/algorithms/`` named like its registry name
(its rule and its torch-style class) and one entry here. Modules load on first use.
"""

from __future__ import annotations

import importlib

from shardstep.workers.optim.rule import Rule

# each class is in the module (or package) workers/optim/algorithms/<name>
_ALGORITHMS: dict[str, str] = {
    "sgd": "SGD",
    "adagrad": "Adagrad",
    "rmsprop": "RMSprop",
    "adadelta": "Adadelta",
    "adam": "Adam",
    "adamw": "AdamW",
    "adamax": "Adamax",
    "nadam": "NAdam",
    "radam": "RAdam",
    "sparse_adam": "SparseAdam",
    "asgd": "ASGD",
    "rprop": "Rprop",
    "lbfgs": "LBFGS",
}

NAMES: tuple[str, ...] = tuple(_ALGORITHMS)
CLASS_NAMES: dict[str, str] = {cls: name for name, cls in _ALGORITHMS.items()}


def optimizer_class(name: str) -> type:
    """The torch-style class for a registry name (``"adam"``) or class name (``"Adam"``)."""
    key = CLASS_NAMES.get(name, name)
    if key not in _ALGORITHMS:
        allowed = ", ".join(NAMES)
        raise ValueError(f"unknown optimizer {name!r}; allowed: {allowed}")
    return getattr(importlib.import_module(f"shardstep.workers.optim.algorithms.{key}"), _ALGORITHMS[key])


def rule(name: str) -> Rule:
    """The update rule the facade and the shard actors share."""
    return optimizer_class(name).rule
