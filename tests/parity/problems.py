"""Deterministic optimization problems with numpy gradients, shared by the fixture generator
and the tests, so shardstep and torch see identical gradients for identical parameters.

Every problem maps a dict of named numpy arrays to ``(loss, grads)``; gradients are dense
arrays or ``("rows", indices, values)`` triples for row-sparse gradients.
"""

from __future__ import annotations

import numpy as np


class TanhRegression:
    """A small non-convex problem: loss = mean((tanh(X w + b) - T)^2) + 0.01 sum(w^4).

    Two parameters of different shapes (w: 6x5, b: 5), so per-group hyperparameters apply.
    """

    names = ("w", "b")

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        rng = np.random.default_rng(1234)
        self.X = rng.standard_normal((16, 6)).astype(self.dtype)
        self.T = (0.8 * np.tanh(rng.standard_normal((16, 5)))).astype(self.dtype)
        self.w0 = (0.5 * rng.standard_normal((6, 5))).astype(self.dtype)
        self.b0 = (0.1 * rng.standard_normal(5)).astype(self.dtype)

    def initial(self) -> dict[str, np.ndarray]:
        return {"w": self.w0.copy(), "b": self.b0.copy()}

    def loss_and_grads(self, params: dict[str, np.ndarray], step: int):
        w, b = params["w"], params["b"]
        dt = self.dtype.type
        pred = np.tanh(self.X @ w + b)
        err = pred - self.T
        n = dt(err.size)
        loss = np.sum(err * err) / n + dt(0.01) * np.sum(w**4)
        dz = (dt(2) / n) * err * (dt(1) - pred * pred)
        grad_w = self.X.T @ dz + dt(0.04) * w**3
        grad_b = dz.sum(axis=0)
        return float(loss), {"w": grad_w.astype(self.dtype), "b": grad_b.astype(self.dtype)}


class EmbeddingRows:
    """A row-sparse problem: each step touches a few rows of a 12x4 table (with repeats).

    loss = sum_k c_k/2 * ||E[r_k] - target[r_k]||^2 over the rows r_k drawn for the step.
    """

    names = ("emb",)

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        rng = np.random.default_rng(99)
        self.E0 = rng.standard_normal((12, 4)).astype(self.dtype)
        self.target = rng.standard_normal((12, 4)).astype(self.dtype)

    def initial(self) -> dict[str, np.ndarray]:
        return {"emb": self.E0.copy()}

    def loss_and_grads(self, params: dict[str, np.ndarray], step: int):
        E = params["emb"]
        rng = np.random.default_rng(step)
        rows = rng.integers(0, 12, size=6)
        weights = rng.uniform(0.5, 2.0, size=6).astype(self.dtype)
        diff = E[rows] - self.target[rows]
        values = (weights[:, None] * diff).astype(self.dtype)
        loss = float(np.sum(weights * np.sum(diff * diff, axis=1)) / 2)
        return loss, {"emb": ("rows", rows.astype(np.int64), values)}


PROBLEMS = {"tanh": TanhRegression, "rows": EmbeddingRows}
