"""Run one optimizer case on shardstep or on torch, identically, and record the trajectory.

A trajectory is an array of shape (steps + 1, n): the concatenated parameters before the
first step and after every step. Both sides get their gradients from the same numpy
function of their own current parameters.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from shardstep.workers.optim import Parameter, RowSparseGrad, optimizer_class
from shardstep.workers.optim.registry import CLASS_NAMES
from shardstep.workers.optim.rule import using_default_dtype
from tests.parity.optim_cases import OptimCase
from tests.parity.problems import PROBLEMS

TORCH_CLASS = {name: cls for cls, name in CLASS_NAMES.items()}
FIXTURES = Path(__file__).parents[1] / "fixtures"


def fixture_path(default_dtype: str) -> Path:
    """The committed torch trajectories run under torch's default dtype ``default_dtype``."""
    name = "optim_trajectories" if default_dtype == "float32" else f"optim_trajectories_default_{default_dtype}"
    return FIXTURES / f"{name}.npz"


@contextlib.contextmanager
def default_dtype(name: str) -> Iterator[None]:
    """Both libraries' default dtype for the block: shardstep's, and torch's when torch is
    loaded (import it before entering)."""
    torch = sys.modules.get("torch")
    before = torch.get_default_dtype() if torch is not None else None
    with using_default_dtype(name):
        if torch is not None:
            torch.set_default_dtype(getattr(torch, name))
        try:
            yield
        finally:
            if torch is not None:
                torch.set_default_dtype(before)


def _groups(case: OptimCase, params: list):
    if case.second_group is None:
        return params
    return [{"params": [p for p in params if _name(p) != "b"]},
            {"params": [p for p in params if _name(p) == "b"], **case.second_group}]


def _name(p) -> str:
    return p.name if isinstance(p, Parameter) else p._shardstep_name


class OursRun:
    """A shardstep optimizer on a case's problem; ``advance(k)`` takes steps."""

    def __init__(self, case: OptimCase, dtype: str):
        self.case = case
        self.problem = PROBLEMS[case.problem](dtype)
        init = self.problem.initial()
        self.params = [Parameter(init[n], name=n) for n in self.problem.names]
        self.optimizer = optimizer_class(case.optimizer)(_groups(case, self.params), **case.kwargs)
        self.step_index = 0

    def closure(self):
        values = {p.name: p.data for p in self.params}
        loss, grads = self.problem.loss_and_grads(values, self.step_index)
        for p in self.params:
            grad = grads[p.name]
            if isinstance(grad, tuple):
                p.grad = RowSparseGrad(grad[1], grad[2], p.shape)
            else:
                p.grad = grad
        return loss

    def flat(self) -> np.ndarray:
        return np.concatenate([p.data.reshape(-1) for p in self.params])

    def advance(self, steps: int) -> list[np.ndarray]:
        rows = []
        for _ in range(steps):
            self.optimizer.step(self.closure)
            self.step_index += 1
            rows.append(self.flat())
        return rows

    def trajectory(self) -> np.ndarray:
        return np.stack([self.flat(), *self.advance(self.case.steps)])


class TorchRun:
    """The same case on torch.optim (imported lazily: torch is a test-only oracle)."""

    def __init__(self, case: OptimCase, dtype: str):
        import torch

        self.torch = torch
        self.case = case
        self.problem = PROBLEMS[case.problem](dtype)
        init = self.problem.initial()
        self.params = []
        for n in self.problem.names:
            t = torch.nn.Parameter(torch.from_numpy(init[n].copy()))
            t._shardstep_name = n
            self.params.append(t)
        cls = getattr(torch.optim, TORCH_CLASS[case.optimizer])
        self.optimizer = cls(_groups(case, self.params), **case.kwargs)
        self.step_index = 0

    def closure(self):
        torch = self.torch
        values = {p._shardstep_name: p.detach().numpy() for p in self.params}
        loss, grads = self.problem.loss_and_grads(values, self.step_index)
        for p in self.params:
            grad = grads[p._shardstep_name]
            if isinstance(grad, tuple):
                p.grad = torch.sparse_coo_tensor(
                    torch.from_numpy(grad[1]).reshape(1, -1), torch.from_numpy(grad[2].copy()), p.shape,
                    check_invariants=True,
                )
            else:
                p.grad = torch.from_numpy(grad.copy())
        return loss

    def flat(self) -> np.ndarray:
        return np.concatenate([p.detach().numpy().reshape(-1).copy() for p in self.params])

    def advance(self, steps: int) -> list[np.ndarray]:
        rows = []
        for _ in range(steps):
            self.optimizer.step(self.closure)
            self.step_index += 1
            rows.append(self.flat())
        return rows

    def trajectory(self) -> np.ndarray:
        return np.stack([self.flat(), *self.advance(self.case.steps)])


# ---------------------------------------------------------------------------------------
# state_dict conversion between torch (tensors) and shardstep (ndarrays)


def torch_to_numpy(value):
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy().copy()
    if isinstance(value, dict):
        return {k: torch_to_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(torch_to_numpy(v) for v in value)
    return value


def numpy_to_torch(value):
    import torch

    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, dict):
        return {k: numpy_to_torch(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(numpy_to_torch(v) for v in value)
    return value


def tolerance(dtype: str, case: OptimCase | None = None) -> float:
    if dtype == "float32" and case is not None and case.float32_rtol is not None:
        return case.float32_rtol
    return {"float32": 1e-5, "float64": 1e-10}[dtype]


def assert_trajectories_close(ours: np.ndarray, reference: np.ndarray, case: OptimCase, dtype: str,
                              sizes: list[int]) -> None:
    """Per parameter and step: max|ours - ref| <= rtol * max|ref| (the normwise relative error
    in the max norm), so a coordinate crossing zero is judged against its parameter's scale."""
    rtol = tolerance(dtype, case)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    bounds = np.cumsum([0, *sizes])
    worst = 0.0
    where = None
    for start, stop in zip(bounds[:-1], bounds[1:]):
        ref = reference[:, start:stop].astype(np.float64)
        err = np.abs(ours[:, start:stop].astype(np.float64) - ref).max(axis=1)
        scale = np.abs(ref).max(axis=1)
        ratio = err / np.maximum(scale, np.finfo(np.float64).tiny)
        step = int(np.argmax(ratio))
        if ratio[step] > worst:
            worst, where = float(ratio[step]), (start, step)
    assert worst <= rtol, (
        f"{case.id} {dtype}: relative error {worst:.3g} > {rtol:g} at step {where[1]} "
        f"(parameter block starting at {where[0]})"
    )
