"""``digits-triplet``: an embedding of the 8x8 digits trained with a triplet margin loss.

Data: the ``digits`` images and split (see :mod:`shardstep.workers.tasks.digits`). Each training image
is the anchor of one triplet per epoch, whose positive (another training image of the same
digit) and negative (a training image of another digit) are drawn uniformly by
``np.random.default_rng([seed, epoch, 2])`` for all anchors at once, so a triplet depends on
(seed, epoch, anchor) only. Model: MLP 64 -> hidden -> ``dim`` (torch's default init).
Loss: ``shardstep.workers.nn.TripletMarginLoss(margin, p=2)``. Metrics: ``nn_accuracy``, the fraction
of held-out images whose nearest training image in the embedding (Euclidean) has the same
label, and ``loss`` on a fixed set of held-out triplets (one per held-out image, drawn
among held-out images with ``np.random.default_rng([0, 0, 2])``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from shardstep.checkpoints.layout import ParamSpec
from shardstep.workers.nn import Module, TripletMarginLoss
from shardstep.workers.tasks.base import Batch, check_dtype, check_int, check_real
from shardstep.workers.tasks.digits import PIXELS, DigitsData, load_digits
from shardstep.workers.tasks.models import SAMPLING_STREAM, ModelTask, check_activation, check_widths, mlp, mlp_specs

# held-out images per block of the nearest-neighbour search (bounds its memory)
_SEARCH_BLOCK = 512


def sample_triplets(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """For every anchor ``i``: a positive, uniform over the other examples with ``labels[i]``,
    and a negative, uniform over the examples with another label (positions into ``labels``)."""
    order = np.argsort(labels, kind="stable")               # examples grouped by label
    counts = np.bincount(labels, minlength=labels.max() + 1)
    if np.any((counts > 0) & (counts < 2)) or np.count_nonzero(counts) < 2:
        raise ValueError("triplets need at least two labels with two or more examples each")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank_in_class = np.empty(labels.size, np.int64)
    rank_in_class[order] = np.arange(labels.size) - starts[labels[order]]
    size = counts[labels]
    start = starts[labels]
    # positive: one of the size - 1 others of the class, skipping the anchor itself
    pick = rng.integers(0, size - 1)
    pick += pick >= rank_in_class
    positive = order[start + pick]
    # negative: one of the n - size examples outside the class, skipping the class's block
    pick = rng.integers(0, labels.size - size)
    pick += np.where(pick >= start, size, 0)
    negative = order[pick]
    return positive.astype(np.int64), negative.astype(np.int64)


class DigitsTripletTask(ModelTask):
    """Learn a ``dim``-dimensional embedding of the digits with triplets.

    hidden: hidden widths (default [256]). dim: embedding size (default 64). margin: the
    triplet margin (default 1.0). activation: 'relu', 'tanh' or 'gelu'. dtype: 'float32' or
    'float64'.
    """

    name = "digits-triplet"

    def __init__(self, *, hidden: int | Sequence[int] = (256,), dim: int = 64, margin: float = 1.0,
                 activation: str = "relu", dtype: str = "float32"):
        self.hidden = check_widths("hidden", hidden)
        self.dim = check_int("dim", dim, 1)
        self.margin = check_real("margin", margin, 0.0)
        self.activation = check_activation(activation)
        self.dtype = check_dtype("dtype", dtype)

    def _data(self) -> DigitsData:
        return self.cached("data", lambda: load_digits(self.dtype))

    def module_specs(self) -> tuple[ParamSpec, ...]:
        return mlp_specs((PIXELS, *self.hidden, self.dim), self.dtype)

    def build_module(self, rng: np.random.Generator) -> Module:
        return mlp((PIXELS, *self.hidden, self.dim), self.activation, self.dtype, rng)

    def _criterion(self, reduction: str) -> TripletMarginLoss:
        return self.cached(f"criterion-{reduction}", lambda: TripletMarginLoss(margin=self.margin, p=2.0,
                                                                              reduction=reduction))

    @property
    def train_size(self) -> int:
        return int(self._data().train_labels.size)

    def _epoch_triplets(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        # one epoch's table, kept until another epoch is asked for
        cache = self.cached("triplets", dict)
        key = (seed, epoch)
        if key not in cache:
            cache.clear()
            rng = np.random.default_rng([seed, epoch, SAMPLING_STREAM])
            cache[key] = sample_triplets(self._data().train_labels, rng)
        return cache[key]

    def examples(self, seed: int, epoch: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        positive, negative = self._epoch_triplets(seed, epoch)
        inputs = self._data().train_inputs
        return {"anchor": inputs[positions], "positive": inputs[positive[positions]],
                "negative": inputs[negative[positions]]}

    def embed(self, params: Mapping[str, np.ndarray], inputs: np.ndarray) -> np.ndarray:
        return self.forward(params, inputs)

    def loss_and_grad(self, params: Mapping[str, np.ndarray], batch: Batch):
        model = self._model()
        model.bind(params)
        n = batch.size
        if n == 0:
            return 0.0, model.grads()
        # one forward pass over anchors, positives and negatives stacked, so the module's
        # cached activations serve one backward pass
        stacked = np.concatenate([batch.data["anchor"], batch.data["positive"], batch.data["negative"]])
        embedded = model.module.forward(stacked)
        criterion = self._criterion("sum")
        total = criterion(embedded[:n], embedded[n:2 * n], embedded[2 * n:])
        grads = criterion.backward(1.0 / batch.global_size)
        model.module.backward(np.concatenate(grads), need_input_grad=False)
        return float(total) / batch.global_size, model.grads()

    def evaluate(self, params: Mapping[str, np.ndarray]) -> dict[str, float]:
        data = self._data()
        reference = self.embed(params, data.train_inputs)
        queries = self.embed(params, data.held_out_inputs)
        nearest = nearest_neighbours(queries, reference)
        accuracy = np.mean(data.train_labels[nearest] == data.held_out_labels)
        positive, negative = self.cached(
            "held-out-triplets",
            lambda: sample_triplets(data.held_out_labels, np.random.default_rng([0, 0, SAMPLING_STREAM])))
        loss = self._criterion("mean")(queries, queries[positive], queries[negative])
        return {"nn_accuracy": float(accuracy), "loss": float(loss)}


def nearest_neighbours(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Index of the nearest ``reference`` row (Euclidean) for each query row; ties go to the
    lowest index."""
    reference_norms = np.einsum("ij,ij->i", reference, reference)
    nearest = np.empty(queries.shape[0], np.int64)
    for start in range(0, queries.shape[0], _SEARCH_BLOCK):
        block = queries[start:start + _SEARCH_BLOCK]
        # |q - r|^2 = |q|^2 - 2 q.r + |r|^2; |q|^2 is constant per query
        distances = reference_norms[None, :] - 2.0 * (block @ reference.T)
        nearest[start:start + _SEARCH_BLOCK] = distances.argmin(axis=1)
    return nearest
