"""numpy optimizers and LR schedulers with torch.optim's API and numbers.

    from workers.optim import Parameter, Adam
    from workers.optim import lr_scheduler
"""

from __future__ import annotations

from workers.optim.optimizer import Optimizer
from workers.optim.parameter import Parameter, RowSparseGrad
from workers.optim.registry import CLASS_NAMES, optimizer_class

__all__ = ["Optimizer", "Parameter", "RowSparseGrad", "optimizer_class", *CLASS_NAMES]


def __getattr__(name: str):
    # optimizer classes load on first use, so importing the package compiles nothing
    if name in CLASS_NAMES:
        return optimizer_class(name)
    if name == "lr_scheduler":
        import importlib

        return importlib.import_module("workers.optim.lr_scheduler")
    raise AttributeError(f"module 'workers.optim' has no attribute {name!r}")
