"""The torch-style class :class:`LBFGS`: torch.optim.LBFGS's signature, its single parameter
group and its state_dict (torch's layout, under parameter 0), over a driver on one slice.

Kept apart from the driver: the facade is the single-process shell (the parameters as one
slice, the state_dict); a sharded run keeps only its param groups and steps an
:class:`~shardstep.workers.optim.algorithms.lbfgs.driver.LBFGSDriver` of its own over the
shards' vectors.
"""

from __future__ import annotations

import numpy as np

from shardstep.workers.optim.algorithms.lbfgs.driver import LBFGSDriver, check_state
from shardstep.workers.optim.algorithms.lbfgs.hyperparameters import RULE
from shardstep.workers.optim.algorithms.lbfgs.vectors import LocalSlices
from shardstep.workers.optim.optimizer import Optimizer, hyperparameters
from shardstep.workers.optim.parameter import Parameter
from shardstep.workers.optim.rule import one_dtype_only, one_group_only


def _cast(value, dtype):
    """Copy a loaded value; floating arrays take the parameters' dtype (as torch casts)."""
    if isinstance(value, np.ndarray):
        if np.issubdtype(value.dtype, np.floating):
            return np.array(value, dtype=dtype, copy=True, order="C")
        return np.array(value, copy=True, order="C")
    if isinstance(value, (list, tuple)):
        return [_cast(v, dtype) for v in value]
    return value


class LBFGS(Optimizer):
    """torch.optim.LBFGS: every argument and default of torch 2.13.

    One parameter group only. The state (torch's layout, under parameter 0) is a view of the
    driver's: vectors are flat, concatenated over the parameters in order."""

    rule = RULE

    def __init__(self, params, lr=1, max_iter=20, max_eval=None, tolerance_grad=1e-7,
                 tolerance_change=1e-9, history_size=100, line_search_fn=None):
        given = hyperparameters(locals())
        self._driver: LBFGSDriver | None = None
        super().__init__(params, self.rule.stored_defaults(given))
        dtypes = {p.dtype for p in self._params}
        if len(dtypes) != 1:
            raise one_dtype_only("LBFGS", dtypes)

    @property
    def _params(self) -> list[Parameter]:
        return self.param_groups[0]["params"]

    def add_param_group(self, param_group) -> None:
        super().add_param_group(param_group)
        if len(self.param_groups) > 1:
            self.param_groups.pop()
            raise one_group_only("LBFGS")

    def _space(self) -> LocalSlices:
        return LocalSlices([[(p, 0, p.size) for p in self._params]], self._params[0].dtype)

    def _get_driver(self) -> LBFGSDriver:
        if self._driver is None:
            self._driver = LBFGSDriver(self._space())
        return self._driver

    def step(self, closure):  # type: ignore[override]
        """Run up to max_iter L-BFGS iterations; ``closure`` recomputes the loss, sets
        ``.grad`` and returns the loss. Returns the closure's first loss."""
        if closure is None:
            raise TypeError("LBFGS.step needs a closure that recomputes the loss and the gradients")
        loss = self._get_driver().step(closure, self.param_groups[0])
        self._sync_state()
        self._step_count += 1
        return loss

    def _sync_state(self) -> None:
        exported = self._driver.export_state() if self._driver is not None else {}
        state = self.state[self._params[0]]
        state.clear()
        state.update(exported)
        if not state:
            del self.state[self._params[0]]

    def state_dict(self):
        if self._driver is not None:
            self._sync_state()
        return super().state_dict()

    def _load_param_state(self, p, index, value):
        if p is not self._params[0]:
            raise ValueError(
                f"LBFGS keeps its state under parameter 0 (as torch does); got state for parameter {index!r}"
            )
        loaded = {name: _cast(item, p.dtype) for name, item in value.items()}
        check_state(loaded, sum(q.size for q in self._params))
        return loaded

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        driver = LBFGSDriver(self._space())
        driver.import_state(self.state.get(self._params[0], {}))
        self._driver = driver
        self._sync_state()
