"""``synthetic-mlp``: an MLP classifier sized by parameter count, on synthetic data.

For scale and speed work: ``params`` picks the width ``w`` of ``depth`` equal hidden layers
so that the MLP ``inputs -> w -> ... -> w -> classes`` (torch's Linear layers with biases,
default initialization) has the parameter count nearest to ``params``
(:func:`width_for`); :attr:`SyntheticMLPTask.num_params` is the exact count.

Data (a function of ``data_seed``): inputs with independent N(0, 1) entries, labelled by
a random linear teacher, ``label = argmax(x T)`` with ``T`` (inputs x classes) N(0, 1);
``examples`` training and ``eval_examples`` held-out examples. Loss: cross-entropy.
Metrics: held-out ``accuracy`` and ``loss``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shardstep.workers.tasks.base import check_dtype, check_int
from shardstep.workers.tasks.models import DATA_STREAM, MLPClassifierTask, check_activation, mlp_param_count


def width_for(params: int, depth: int, inputs: int, classes: int) -> int:
    """The hidden width whose MLP has the parameter count nearest to ``params``.

    count(w) = (inputs + 1) w + (depth - 1)(w^2 + w) + (w + 1) classes, increasing in w."""
    linear = inputs + 1 + (depth - 1) + classes
    if depth == 1:
        estimate = (params - classes) / linear
    else:
        quadratic = depth - 1
        estimate = (-linear + math.sqrt(linear * linear + 4 * quadratic * (params - classes))) / (2 * quadratic)
    candidates = {max(1, math.floor(estimate)), max(1, math.ceil(estimate))}

    def count(w: int) -> int:
        return mlp_param_count((inputs, *[w] * depth, classes))

    return min(sorted(candidates), key=lambda w: abs(count(w) - params))


@dataclass(frozen=True, eq=False)
class TeacherData:
    train_inputs: np.ndarray
    train_labels: np.ndarray
    held_out_inputs: np.ndarray
    held_out_labels: np.ndarray


class SyntheticMLPTask(MLPClassifierTask):
    """A ``params``-sized MLP classifier on teacher-labelled Gaussian inputs.

    params: target parameter count (default 1,000,000). depth: hidden layers (default 4).
    inputs, classes: input size and number of classes (default 256, 10). examples,
    eval_examples: training and held-out set sizes (default 8192, 1024). activation:
    'relu' (default), 'tanh' or 'gelu'. data_seed: the data (default 0). dtype: 'float32'
    (default) or 'float64'.
    """

    name = "synthetic-mlp"

    def __init__(self, *, params: int = 1_000_000, depth: int = 4, inputs: int = 256, classes: int = 10,
                 examples: int = 8192, eval_examples: int = 1024, activation: str = "relu",
                 data_seed: int = 0, dtype: str = "float32"):
        self.depth = check_int("depth", depth, 1)
        self.inputs = check_int("inputs", inputs, 1)
        self.classes = check_int("classes", classes, 2)
        smallest = mlp_param_count((self.inputs, *[1] * self.depth, self.classes))
        self.target_params = check_int("params", params, smallest)
        self.examples_count = check_int("examples", examples, 1)
        self.eval_examples = check_int("eval_examples", eval_examples, 1)
        self.activation = check_activation(activation)
        self.data_seed = check_int("data_seed", data_seed, 0)
        self.dtype = check_dtype("dtype", dtype)
        self.width = width_for(self.target_params, self.depth, self.inputs, self.classes)

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.inputs, *[self.width] * self.depth, self.classes)

    @property
    def num_params(self) -> int:
        """The model's exact parameter count."""
        return mlp_param_count(self.sizes)

    def _make(self) -> TeacherData:
        rng = np.random.default_rng([self.data_seed, 0, DATA_STREAM])
        teacher = rng.standard_normal((self.inputs, self.classes)).astype(self.dtype)
        total = self.examples_count + self.eval_examples
        inputs = rng.standard_normal((total, self.inputs), dtype=self.dtype)
        labels = (inputs @ teacher).argmax(axis=1).astype(np.int64)
        cut = self.examples_count
        return TeacherData(inputs[:cut], labels[:cut], inputs[cut:], labels[cut:])

    def _data(self) -> TeacherData:
        return self.cached("data", self._make)

    @property
    def train_size(self) -> int:
        return self.examples_count
