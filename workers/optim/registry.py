"""The one registry of optimizer algorithms: name -> (module, class).

Adding an optimizer is one file in ``workers/optim/algorithms/`` (its rule and its
torch-style class) and one entry here. Modules load on first use.
"""

from __future__ import annotations

import importlib

from shardstep.workers.optim.rule import Rule

_ALGORITHMS: dict[str, tuple[str, str]] = {
    "sgd": ("sgd", "SGD"),
    "adagrad": ("adagrad", "Adagrad"),
    "rmsprop": ("rmsprop", "RMSprop"),
    "adadelta": ("adadelta", "Adadelta"),
    "adam": ("adam", "Adam"),
    "adamw": ("adamw", "AdamW"),
    "adamax": ("adamax", "Adamax"),
    "nadam": ("nadam", "NAdam"),
    "radam": ("radam", "RAdam"),
    "sparse_adam": ("sparse_adam", "SparseAdam"),
    "asgd": ("asgd", "ASGD"),
    "rprop": ("rprop", "Rprop"),
    "lbfgs": ("lbfgs", "LBFGS"),
}

NAMES: tuple[str, ...] = tuple(_ALGORITHMS)
CLASS_NAMES: dict[str, str] = {cls: name for name, (_, cls) in _ALGORITHMS.items()}


def optimizer_class(name: str) -> type:
    """The torch-style class for a registry name (``"adam"``) or class name (``"Adam"``)."""
    key = CLASS_NAMES.get(name, name)
    if key not in _ALGORITHMS:
        allowed = ", ".join(NAMES)
        raise ValueError(f"unknown optimizer {name!r}; allowed: {allowed}")
    module, cls = _ALGORITHMS[key]
    return getattr(importlib.import_module(f"shardstep.workers.optim.algorithms.{module}"), cls)


def rule(name: str) -> Rule:
    """The update rule the facade and the shard actors share."""
    return optimizer_class(name).rule
