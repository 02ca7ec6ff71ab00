"""A task to fine-tune into: the ``digits`` images, a body named as the ``digits`` MLP's first
layer and a new head.

``DigitsPairsTask`` classifies digit pairs (0-1, 2-3, ..., 8-9: five classes) with
Linear(64, h) -> activation -> Linear(h, 5). Its parameters are ``0.weight`` and ``0.bias``
(the same names and shapes as a one-hidden-layer ``digits`` model's first layer) and
``head.weight``, ``head.bias`` (new: the ``digits`` head is ``2.*``, of 10 classes).
Named in jobs as ``"tests.finetune_tasks:DigitsPairsTask"``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from shardstep.workers.nn import CrossEntropyLoss, Linear, Module, Sequential
from shardstep.workers.tasks.digits import PIXELS, DigitsTask
from shardstep.workers.tasks.models import ACTIVATIONS

PAIRS = 5


class DigitsPairsTask(DigitsTask):
    """Which pair of digits an 8x8 image shows (label // 2), by an MLP with one hidden layer."""

    name = ""

    @property
    def sizes(self) -> tuple[int, ...]:
        return (PIXELS, *self.hidden, PAIRS)

    def build_module(self, rng: np.random.Generator) -> Module:
        if len(self.hidden) != 1:
            raise ValueError(f"DigitsPairsTask has one hidden layer; got hidden={list(self.hidden)}")
        width = self.hidden[0]
        return Sequential(OrderedDict([
            ("0", Linear(PIXELS, width, bias=True, dtype=self.dtype, rng=rng)),
            ("1", ACTIVATIONS[self.activation]()),
            ("head", Linear(width, PAIRS, bias=True, dtype=self.dtype, rng=rng)),
        ]))

    def training_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        inputs, labels = super().training_arrays()
        return inputs, labels // 2

    def evaluate(self, params: Mapping[str, np.ndarray]) -> dict[str, float]:
        data = self._data()
        labels = data.held_out_labels // 2
        logits = self.logits(params, data.held_out_inputs)
        loss = CrossEntropyLoss(reduction="mean")(logits, labels)
        return {"accuracy": float(np.mean(logits.argmax(axis=1) == labels)), "loss": float(loss)}
