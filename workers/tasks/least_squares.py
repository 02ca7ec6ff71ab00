"""``least-squares``: linear regression, a convex problem with a closed-form solution.

Data (a function of ``data_seed``): ``A`` (rows x cols) with independent N(0, 1) entries,
then column ``j`` scaled by ``condition ** (-j / (cols - 1))`` so the columns' scales span a
factor ``condition``; ``y = A w* + b* + noise`` with ``w* ~ N(0, 1)``, ``b* = 1`` and
N(0, ``noise^2``) noise. Model: ``shardstep.workers.nn.Linear(cols, 1)`` (parameters ``weight``
(1 x cols) and ``bias`` (1,)). Loss: squared error ``(a_i . w + b - y_i)^2``.

The minimizer has a closed form, ``[w; b] = lstsq([A 1], y)`` (:meth:`solution`, computed in
float64 by ``np.linalg.lstsq``). Metrics: ``loss`` (mean over all rows) and
``relative_error`` = ``|theta - theta_hat| / |theta_hat|`` over the concatenated parameters
``theta = [w; b]``, ``theta_hat`` the closed form.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from shardstep.checkpoints.layout import ParamSpec
from shardstep.workers.nn import Linear, MSELoss
from shardstep.workers.tasks.base import check_dtype, check_int, check_real
from shardstep.workers.tasks.models import DATA_STREAM, ModelTask


@dataclass(frozen=True, eq=False)
class RegressionData:
    inputs: np.ndarray   # (rows, cols), task dtype
    targets: np.ndarray  # (rows, 1), task dtype


class LeastSquaresTask(ModelTask):
    """Fit ``y ~ A w + b`` by least squares; LBFGS should reach the closed form.

    rows, cols: the size of ``A`` (default 512 x 32). condition: ratio of the largest to the
    smallest column scale (default 10). noise: std of the target noise (default 0.1).
    data_seed: the data (default 0). dtype: 'float64' (default) or 'float32'.
    """

    name = "least-squares"

    def __init__(self, *, rows: int = 512, cols: int = 32, condition: float = 10.0, noise: float = 0.1,
                 data_seed: int = 0, dtype: str = "float64"):
        self.rows = check_int("rows", rows, 2)
        self.cols = check_int("cols", cols, 1)
        if self.rows <= self.cols:
            raise ValueError(f"rows must exceed cols for a unique solution; got rows={self.rows}, cols={self.cols}")
        self.condition = check_real("condition", condition, 1.0)
        self.noise = check_real("noise", noise, 0.0)
        self.data_seed = check_int("data_seed", data_seed, 0)
        self.dtype = check_dtype("dtype", dtype)

    def _make(self) -> tuple[RegressionData, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.data_seed, 0, DATA_STREAM])
        scales = self.condition ** (-np.arange(self.cols) / max(self.cols - 1, 1))
        inputs = rng.standard_normal((self.rows, self.cols)) * scales
        weight = rng.standard_normal(self.cols)
        targets = inputs @ weight + 1.0 + rng.normal(0.0, self.noise, self.rows)
        stored = RegressionData(inputs.astype(self.dtype), targets.astype(self.dtype)[:, None])
        # the closed form of the data as stored (in the task dtype), solved in float64
        design = np.hstack([stored.inputs.astype(np.float64), np.ones((self.rows, 1))])
        theta, *_ = np.linalg.lstsq(design, stored.targets[:, 0].astype(np.float64), rcond=None)
        return stored, theta[:-1], theta[-1:]

    def _data(self) -> RegressionData:
        return self.cached("data", self._make)[0]

    def solution(self) -> dict[str, np.ndarray]:
        """The exact minimizer (float64): ``{"weight": (1, cols), "bias": (1,)}``."""
        _, weight, bias = self.cached("data", self._make)
        return {"weight": weight[None, :].copy(), "bias": bias.copy()}

    def module_specs(self) -> tuple[ParamSpec, ...]:
        dtype = np.dtype(self.dtype).name
        return ParamSpec("weight", (1, self.cols), dtype), ParamSpec("bias", (1,), dtype)

    def build_module(self, rng: np.random.Generator) -> Linear:
        return Linear(self.cols, 1, bias=True, dtype=self.dtype, rng=rng)

    def make_criterion(self) -> MSELoss:
        return MSELoss(reduction="sum")

    def training_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        data = self._data()
        return data.inputs, data.targets

    @property
    def train_size(self) -> int:
        return self.rows

    def evaluate(self, params: Mapping[str, np.ndarray]) -> dict[str, float]:
        model = self._model()
        model.bind(params)
        data = self._data()
        residual = model.module.forward(data.inputs).astype(np.float64) - data.targets
        solution = self.solution()
        theta = np.concatenate([params["weight"].ravel(), params["bias"].ravel()]).astype(np.float64)
        exact = np.concatenate([solution["weight"].ravel(), solution["bias"].ravel()])
        return {"loss": float(np.mean(residual * residual)),
                "relative_error": float(np.linalg.norm(theta - exact) / np.linalg.norm(exact))}
