"""LBFGS's hyperparameters: torch 2.13's defaults and constructor checks, the initial state and
the :class:`~shardstep.workers.optim.rule.Rule` the registry reads as ``LBFGS.rule``.

Kept apart from the step: this is the part of LBFGS that follows the contract every algorithm
module shares (docs/optimizers.md); the base ``Optimizer`` runs ``validate`` in its
constructor, ``add_param_group`` and ``load_state_dict``, as for every other rule.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shardstep.workers.checks import is_integer
from shardstep.workers.optim import group_checks as check
from shardstep.workers.optim.rule import Rule

LINE_SEARCH_FNS = (None, "strong_wolfe")

# torch's param_group keys and defaults; torch stores max_eval = max_iter * 5 // 4 (25 for the
# default max_iter=20) when max_eval is None.
LBFGS_DEFAULTS = dict(lr=1, max_iter=20, max_eval=25, tolerance_grad=1e-7, tolerance_change=1e-9,
                      history_size=100, line_search_fn=None)


def _check_int(name: str, value: Any, low: int) -> None:
    if not is_integer(value):
        raise TypeError(f"{name} must be an int; got {value!r} of type {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}; got {value}")


def validate(group) -> None:
    lr = group["lr"]
    if isinstance(lr, np.ndarray) and lr.size != 1:
        raise ValueError(f"lr given as an array must have 1 element; got shape {lr.shape}")
    check.at_least("lr", lr)
    _check_int("max_iter", group["max_iter"], 1)
    _check_int("max_eval", group["max_eval"], 1)
    check.at_least("tolerance_grad", group["tolerance_grad"])
    check.at_least("tolerance_change", group["tolerance_change"])
    _check_int("history_size", group["history_size"], 1)
    fn = group["line_search_fn"]
    if not (fn is None or (isinstance(fn, str) and fn == "strong_wolfe")):
        raise ValueError(f"line_search_fn must be None or 'strong_wolfe'; got {fn!r}")


def derive_defaults(given, stored) -> None:
    """torch's ``max_eval=None``: ``max_iter * 5 // 4`` (left None when max_iter is not an int,
    which ``validate`` then refuses)."""
    if given.get("max_eval") is None:
        max_iter = stored["max_iter"]
        stored["max_eval"] = max_iter * 5 // 4 if is_integer(max_iter) else None


def init_state(param: np.ndarray, group) -> dict:
    # LBFGS keeps one global state under the first parameter (as torch does); the facade builds it
    return {"func_evals": 0, "n_iter": 0}


# not elementwise: the facade's generic per-parameter update does not apply (update=None);
# LBFGS.step runs the driver instead.
RULE = Rule(name="lbfgs", defaults=LBFGS_DEFAULTS, validate=validate, init_state=init_state,
            update=None, scalar_state=(), derive_defaults=derive_defaults, one_vector=True)
