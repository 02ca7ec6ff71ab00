"""``ratings``: matrix factorization with row-sparse embedding gradients.

Data (synthetic, a function of ``data_seed``): ``users`` x ``items`` ratings from a rank-
``rank`` model, ``r(u, i) = 3.5 + a_u + b_i + <p_u, q_i> + noise`` with ``a, b ~ N(0, 0.5^2)``,
coordinates of ``p, q`` drawn with variance ``1/sqrt(rank)`` (so ``<p_u, q_i>`` has variance 1) and noise
``~ N(0, noise^2)``; a fraction ``density`` of the pairs is observed, and a tenth of those
is held out. Model: embeddings ``user`` (users x dim), ``item`` (items x dim),
``user_bias`` and ``item_bias`` (x 1), all ``shardstep.workers.nn.Embedding(sparse=True)``, so every
gradient is a :class:`~shardstep.workers.optim.RowSparseGrad` (train with SparseAdam, Adagrad, or SGD
without momentum); the prediction is ``mean + user_bias[u] + item_bias[i] + <user[u],
item[i]>``, ``mean`` being the mean training rating (a constant). Loss: squared error.
Metrics: held-out ``rmse``.

Baselines (properties of the task, not of the parameters), on the held-out pairs:
``baseline_rmse`` predicts the mean training rating for every pair (about 1.30 with the
defaults); ``bias_rmse`` predicts with the true mean and biases but no interaction (about
1.12); ``noise_rmse`` is the true model's, the floor no model can beat on average (about
0.49).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from shardstep.checkpoints.layout import ParamSpec
from shardstep.workers.nn import Embedding, MSELoss
from shardstep.workers.tasks.base import Batch, Task, check_dtype, check_int, check_real, declared_for
from shardstep.workers.tasks.models import DATA_STREAM, INIT_STREAM, BoundModule, check_bound

GLOBAL_MEAN, BIAS_STD = 3.5, 0.5
TABLES = ("user", "item", "user_bias", "item_bias")


@dataclass(frozen=True, eq=False)
class RatingsData:
    """Observed pairs by split: user and item ids (int64) and ratings (task dtype)."""

    train_users: np.ndarray
    train_items: np.ndarray
    train_ratings: np.ndarray
    held_out_users: np.ndarray
    held_out_items: np.ndarray
    held_out_ratings: np.ndarray
    held_out_truth: np.ndarray  # the noise-free ratings of the held-out pairs
    held_out_biases: np.ndarray  # their true mean + user bias + item bias (no interaction)


def make_ratings(users: int, items: int, rank: int, density: float, noise: float, seed: int,
                 dtype: np.dtype) -> RatingsData:
    rng = np.random.default_rng([seed, 0, DATA_STREAM])
    user_bias = rng.normal(0.0, BIAS_STD, users)
    item_bias = rng.normal(0.0, BIAS_STD, items)
    scale = rank ** -0.5 if rank else 0.0
    user_factors = rng.normal(0.0, scale ** 0.5, (users, rank))
    item_factors = rng.normal(0.0, scale ** 0.5, (items, rank))
    observed = max(2, round(density * users * items))
    pairs = rng.choice(users * items, size=observed, replace=False)
    user_ids, item_ids = pairs // items, pairs % items
    biases = GLOBAL_MEAN + user_bias[user_ids] + item_bias[item_ids]
    truth = biases + np.einsum("nk,nk->n", user_factors[user_ids], item_factors[item_ids])
    ratings = truth + rng.normal(0.0, noise, observed)
    held_out = np.zeros(observed, bool)
    held_out[rng.choice(observed, size=max(1, observed // 10), replace=False)] = True
    return RatingsData(
        user_ids[~held_out], item_ids[~held_out], ratings[~held_out].astype(dtype),
        user_ids[held_out], item_ids[held_out], ratings[held_out].astype(dtype),
        truth[held_out].astype(dtype), biases[held_out].astype(dtype),
    )


class RatingsTask(Task):
    """Predict synthetic user-item ratings by matrix factorization (sparse gradients).

    users, items: table sizes (default 600, 400). rank: rank of the true model (default 8).
    density: observed fraction of pairs (default 0.15). noise: rating noise std (default
    0.5). dim: embedding size of the model (default 16). init_std: std of the initial
    embeddings (default 0.1; biases start at 0). data_seed: the data (default 0). dtype:
    'float32' or 'float64'.
    """

    name = "ratings"
    sparse_gradients = ("*",)  # every table is an Embedding(sparse=True)

    def __init__(self, *, users: int = 600, items: int = 400, rank: int = 8, density: float = 0.15,
                 noise: float = 0.5, dim: int = 16, init_std: float = 0.1, data_seed: int = 0,
                 dtype: str = "float32"):
        self.users = check_int("users", users, 1)
        self.items = check_int("items", items, 1)
        self.rank = check_int("rank", rank, 0)
        self.density = check_real("density", density, 0.0, open_min=True)
        if self.density > 1.0:
            raise ValueError(f"density must be in (0, 1]; got {self.density}")
        if self.density * self.users * self.items < 20:
            raise ValueError(
                f"density * users * items must be at least 20 observed ratings; got "
                f"{self.density} * {self.users} * {self.items} = {self.density * self.users * self.items:g}"
            )
        self.noise = check_real("noise", noise, 0.0)
        self.dim = check_int("dim", dim, 1)
        self.init_std = check_real("init_std", init_std, 0.0)
        self.data_seed = check_int("data_seed", data_seed, 0)
        self.dtype = check_dtype("dtype", dtype)

    def _data(self) -> RatingsData:
        return self.cached("data", lambda: make_ratings(self.users, self.items, self.rank, self.density,
                                                        self.noise, self.data_seed, self.dtype))

    def _table_sizes(self) -> dict[str, tuple[int, int]]:
        return {"user": (self.users, self.dim), "item": (self.items, self.dim),
                "user_bias": (self.users, 1), "item_bias": (self.items, 1)}

    def param_specs(self) -> tuple[ParamSpec, ...]:
        if not declared_for(self, "param_specs", ("init_params",)):
            return super().param_specs()
        dtype = np.dtype(self.dtype).name
        return tuple(ParamSpec(f"{table}.weight", shape, dtype) for table, shape in self._table_sizes().items())

    def _tables(self) -> dict[str, BoundModule]:
        def build():
            sizes = self._table_sizes()
            return {table: BoundModule(Embedding(rows, width, sparse=True, dtype=self.dtype,
                                                 rng=np.random.default_rng(0)),
                                       self.name, prefix=f"{table}.", sparse=True)
                    for table, (rows, width) in sizes.items()}
        return self.cached("tables", build)

    @property
    def mean_rating(self) -> float:
        return self.cached("mean", lambda: float(np.mean(self._data().train_ratings, dtype=np.float64)))

    def _held_out_rmse(self, prediction) -> float:
        """The RMSE of ``prediction`` (one rating, or one per held-out pair) on the held-out
        ratings, in float64."""
        error = np.asarray(self._data().held_out_ratings, np.float64) - np.asarray(prediction, np.float64)
        return float(np.sqrt(np.mean(error * error)))

    @property
    def baseline_rmse(self) -> float:
        """Held-out RMSE of predicting the mean training rating for every pair."""
        return self._held_out_rmse(self.mean_rating)

    @property
    def bias_rmse(self) -> float:
        """Held-out RMSE of the true mean, user and item biases without the interaction
        term: a model below it has learned the user-item factors."""
        return self._held_out_rmse(self._data().held_out_biases)

    @property
    def noise_rmse(self) -> float:
        """Held-out RMSE of the true (noise-free) model."""
        return self._held_out_rmse(self._data().held_out_truth)

    @property
    def train_size(self) -> int:
        return int(self._data().train_ratings.size)

    def init_params(self, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, 0, INIT_STREAM])
        params = {}
        for table, bound in self._tables().items():
            for name, shape in bound.shapes.items():
                if table.endswith("_bias"):
                    params[name] = np.zeros(shape, self.dtype)
                else:
                    params[name] = rng.normal(0.0, self.init_std, shape).astype(self.dtype)
        return params

    def examples(self, seed: int, epoch: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        data = self._data()
        return {"users": data.train_users[positions], "items": data.train_items[positions],
                "ratings": data.train_ratings[positions]}

    def predict(self, params: Mapping[str, np.ndarray], users: np.ndarray, items: np.ndarray) -> np.ndarray:
        tables = self._bind(params)
        return self._forward(tables, users, items)[0]

    def _bind(self, params: Mapping[str, np.ndarray]) -> dict[str, BoundModule]:
        tables = self._tables()
        check_bound(params, list(tables.values()), self.name)
        for bound in tables.values():
            bound.bind(params, check=False)
        return tables

    def _forward(self, tables: dict[str, BoundModule], users: np.ndarray, items: np.ndarray):
        """The predictions, and the user and item rows they used."""
        user = tables["user"].module.forward(users)
        item = tables["item"].module.forward(items)
        bias = tables["user_bias"].module.forward(users)[:, 0] + tables["item_bias"].module.forward(items)[:, 0]
        prediction = np.einsum("nk,nk->n", user, item) + bias + self.dtype.type(self.mean_rating)
        return prediction, user, item

    def loss_and_grad(self, params: Mapping[str, np.ndarray], batch: Batch):
        tables = self._bind(params)
        if batch.size == 0:
            return 0.0, _all_grads(tables)
        users, items = batch.data["users"], batch.data["items"]
        prediction, user_rows, item_rows = self._forward(tables, users, items)
        criterion = self.cached("criterion", lambda: MSELoss(reduction="sum"))
        total = criterion(prediction, batch.data["ratings"])
        grad_prediction = criterion.backward(1.0 / batch.global_size)[:, None]
        # prediction = <user, item> + user_bias + item_bias + mean
        tables["user"].module.backward(grad_prediction * item_rows)
        tables["item"].module.backward(grad_prediction * user_rows)
        tables["user_bias"].module.backward(grad_prediction)
        tables["item_bias"].module.backward(grad_prediction)
        return float(total) / batch.global_size, _all_grads(tables)

    def evaluate(self, params: Mapping[str, np.ndarray]) -> dict[str, float]:
        data = self._data()
        prediction = self.predict(params, data.held_out_users, data.held_out_items)
        return {"rmse": self._held_out_rmse(prediction)}


def _all_grads(tables: dict[str, BoundModule]) -> dict:
    grads = {}
    for bound in tables.values():
        grads.update(bound.grads())
    return grads
