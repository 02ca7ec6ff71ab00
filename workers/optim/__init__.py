"""numpy optimizers and LR schedulers with torch.optim's API and numbers.

    from shardstep.workers.optim import Parameter, Adam
    from shardstep.workers.optim import lr_scheduler
"""

from __future__ import annotations

from shardstep.workers.optim.optimizer import Optimizer
from shardstep.workers.optim.parameter import Parameter, RowSparseGrad
from shardstep.workers.optim.registry import CLASS_NAMES, optimizer_class
from shardstep.workers.optim.rule import get_default_dtype, set_default_dtype

__all__ = ["Optimizer", "Parameter", "RowSparseGrad", "optimizer_class", "get_default_dtype",
           "set_default_dtype", *CLASS_NAMES]


def __getattr__(name: str):
    # optimizer classes load on first use, so importing the package compiles nothing
    if name in CLASS_NAMES:
        return optimizer_class(name)
    if name == "lr_scheduler":
        import importlib

        return importlib.import_module("shardstep.workers.optim.lr_scheduler")
    raise AttributeError(f"module 'shardstep.workers.optim' has no attribute {name!r}")
