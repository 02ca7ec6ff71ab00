"""Small configurations of every built-in task, and a user task of the tests' own, shared by
the task and training-loop tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shardstep.workers.tasks import ParamGroupRule, Task, make_task

ROOT = Path(__file__).resolve().parents[1]

# small configurations of every built-in task (float64, so partial sums compare tightly)
SMALL = {
    "digits": {"hidden": [16], "dtype": "float64"},
    "digits-triplet": {"hidden": [16], "dim": 8, "dtype": "float64"},
    "ratings": {"users": 60, "items": 40, "density": 0.3, "dim": 4, "dtype": "float64"},
    "least-squares": {"rows": 90, "cols": 6},
    "synthetic-mlp": {"params": 5000, "depth": 2, "inputs": 12, "examples": 150, "eval_examples": 40,
                      "dtype": "float64"},
    "modular-addition": {"modulus": 11, "d_model": 8, "nhead": 2, "dim_feedforward": 16, "num_layers": 2,
                         "dtype": "float64"},
    # the task of a job's [data] and [model]: a committed CSV of 90 rows, class names as labels
    "supervised": {"data": {"train": str(ROOT / "tests" / "fixtures" / "data" / "blobs.csv"), "label": "colour",
                            "validation": 0.2, "dtype": "float64"},
                   "model": {"layers": [{"name": "Linear", "args": {"in_features": 4, "out_features": 8}},
                                        {"name": "Tanh"},
                                        {"name": "Linear", "args": {"in_features": 8, "out_features": 3}}],
                             "loss": "CrossEntropyLoss"}},
}


def small(name: str, **overrides) -> Task:
    return make_task(name, **{**SMALL[name], **overrides})


class Quadratic(Task):
    """sum_i (|w - x_i|^2 + offset^2) / 2 over 10 fixed points: a user task, importable by
    reference, whose rule freezes ``offset``."""

    param_groups = (ParamGroupRule("offset", {"lr": 0.0}),)

    def __init__(self, *, dim: int = 3):
        self.dim = dim
        self.points = np.arange(10 * dim, dtype=np.float64).reshape(10, dim) / 10

    @property
    def train_size(self) -> int:
        return 10

    def init_params(self, seed):
        return {"w": np.zeros(self.dim), "offset": np.ones(1)}

    def examples(self, seed, epoch, positions):
        return {"x": self.points[positions]}

    def loss_and_grad(self, params, batch):
        # per example: |w - x|^2 / 2 + offset^2 / 2
        diff = params["w"] - batch.data["x"]
        share = batch.size / batch.global_size
        loss = 0.5 * (float(np.sum(diff * diff)) / batch.global_size + share * float(params["offset"][0] ** 2))
        return loss, {"w": diff.sum(axis=0) / batch.global_size, "offset": share * params["offset"]}

    def evaluate(self, params):
        return {"distance": float(np.linalg.norm(params["w"] - self.points.mean(axis=0)))}
