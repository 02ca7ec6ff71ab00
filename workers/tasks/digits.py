"""``digits``: an MLP classifier on the UCI optical handwritten digits (8x8, 1,797 images).

Data: ``data/digits.npz`` (source, licence and the held-out rule in ``data/README.md``):
1,442 training and 355 held-out images; a pixel count 0..16 becomes the input ``count / 16``.
Model: Linear(64, h1), activation, ..., Linear(hk, 10) (``hidden=[h1, ..., hk]``), torch's
default initialization. Loss: cross-entropy (``shardstep.workers.nn.CrossEntropyLoss``) over the
logits. Metrics: held-out ``accuracy`` and mean ``loss``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardstep.workers.tasks.base import check_dtype
from shardstep.workers.tasks.models import MLPClassifierTask, check_activation, check_widths

DATA_FILE = Path(__file__).resolve().parent / "data" / "digits.npz"
IMAGES, PIXELS, CLASSES, MAX_COUNT = 1797, 64, 10, 16


@dataclass(frozen=True, eq=False)
class DigitsData:
    """The images as float inputs in [0, 1] (``(n, 64)``), their labels, per split."""

    train_inputs: np.ndarray
    train_labels: np.ndarray
    held_out_inputs: np.ndarray
    held_out_labels: np.ndarray


def load_digits(dtype: np.dtype) -> DigitsData:
    """Read and check ``data/digits.npz``; inputs are ``count / 16`` in ``dtype``."""
    with np.load(DATA_FILE, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    expected = {"images": ((IMAGES, 8, 8), np.uint8), "labels": ((IMAGES,), np.uint8),
                "held_out": ((IMAGES,), np.bool_)}
    for key, (shape, kind) in expected.items():
        array = arrays.get(key)
        if array is None or array.shape != shape or array.dtype != kind:
            got = None if array is None else (array.shape, str(array.dtype))
            raise ValueError(f"{DATA_FILE} is damaged: {key!r} must be {np.dtype(kind)} of shape {shape}; got {got}")
    images, labels, held_out = arrays["images"], arrays["labels"], arrays["held_out"]
    if images.max() > MAX_COUNT or labels.max() >= CLASSES:
        raise ValueError(f"{DATA_FILE} is damaged: pixel counts must be <= 16 and labels < 10")
    inputs = images.reshape(IMAGES, PIXELS).astype(dtype) / dtype.type(MAX_COUNT)
    labels = labels.astype(np.int64)
    return DigitsData(inputs[~held_out], labels[~held_out], inputs[held_out], labels[held_out])


class DigitsTask(MLPClassifierTask):
    """Classify 8x8 handwritten digits with an MLP and cross-entropy.

    hidden: widths of the hidden layers (default one layer of 256). activation: 'relu',
    'tanh' or 'gelu'. dtype: 'float32' (default) or 'float64'.
    """

    name = "digits"

    def __init__(self, *, hidden: int | Sequence[int] = (256,), activation: str = "relu",
                 dtype: str = "float32"):
        self.hidden = check_widths("hidden", hidden)
        self.activation = check_activation(activation)
        self.dtype = check_dtype("dtype", dtype)

    @property
    def sizes(self) -> tuple[int, ...]:
        return (PIXELS, *self.hidden, CLASSES)

    def _data(self) -> DigitsData:
        return self.cached("data", lambda: load_digits(self.dtype))

    @property
    def train_size(self) -> int:
        return int(self._data().train_labels.size)
