"""``modular-addition``: a small transformer learns ``a + b mod p``, the task of Power et al.
2022, "Grokking: Generalization beyond overfitting on small algorithmic datasets".

Data: every pair (a, b) of 0 .. p-1 as the three tokens ``a, b, =`` (``=`` is token p), its
label ``(a + b) % p``; the pairs are ordered by ``np.random.default_rng([split_seed, 0, 4])``
and the first ``floor(train_fraction * p * p)`` of that order are the training set, the rest
the held-out set (so the split is a function of ``split_seed`` alone).

Model (torch's names, so the state_dict loads into the same torch module):
``token`` Embedding(p + 1, d_model) -> ``position`` PositionalEmbedding(3, d_model) (a learned
table added to the tokens) -> ``layers.0 .. layers.{k-1}`` TransformerEncoderLayer(d_model,
nhead, dim_feedforward, dropout, batch_first, norm_first) -> ``norm`` LayerNorm(d_model) at
the ``=`` position -> ``head`` Linear(d_model, p), the logits. Loss: cross-entropy.

Metrics: held-out ``accuracy`` and ``loss``, and ``train_accuracy`` (the curve that reaches
1.0 long before the held-out one does, when the model groks).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from shardstep.workers.nn import (
    CrossEntropyLoss,
    Embedding,
    LayerNorm,
    Linear,
    Module,
    PositionalEmbedding,
    Sequential,
    TransformerEncoderLayer,
)
from shardstep.workers.tasks.base import TaskArgumentError, check_dtype, check_int, check_real
from shardstep.workers.tasks.models import ModelTask

# the third entropy word of the split's generator: the one `[data] split_seed` uses
SPLIT_STREAM = 4
TOKENS_PER_EXAMPLE = 3


@dataclass(frozen=True, eq=False)
class ModularData:
    """Token rows ``(n, 3)`` int64 and labels ``(n,)`` int64, per split."""

    train_tokens: np.ndarray
    train_labels: np.ndarray
    held_out_tokens: np.ndarray
    held_out_labels: np.ndarray


def modular_pairs(modulus: int, train_fraction: float, split_seed: int) -> ModularData:
    a, b = np.divmod(np.arange(modulus * modulus, dtype=np.int64), modulus)
    tokens = np.stack([a, b, np.full_like(a, modulus)], axis=1)
    labels = (a + b) % modulus
    order = np.random.default_rng([split_seed, 0, SPLIT_STREAM]).permutation(a.size)
    cut = math.floor(train_fraction * a.size)
    train, held_out = order[:cut], order[cut:]
    return ModularData(tokens[train], labels[train], tokens[held_out], labels[held_out])


class ModularAdditionModel(Module):
    """Tokens ``(N, 3)`` -> logits ``(N, p)``: embeddings, encoder layers, the ``=`` position's
    normalized state, a linear read-out."""

    def __init__(self, modulus: int, d_model: int, nhead: int, dim_feedforward: int, num_layers: int,
                 dropout: float, norm_first: bool, dtype: np.dtype, rng: np.random.Generator):
        super().__init__()
        self.token = Embedding(modulus + 1, d_model, dtype=dtype, rng=rng)
        self.position = PositionalEmbedding(TOKENS_PER_EXAMPLE, d_model, dtype=dtype, rng=rng)
        self.layers = Sequential(*[TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=dropout,
                                                           batch_first=True, norm_first=norm_first, dtype=dtype,
                                                           rng=rng)
                                   for _ in range(num_layers)])
        self.norm = LayerNorm(d_model, dtype=dtype, rng=rng)
        self.head = Linear(d_model, modulus, dtype=dtype, rng=rng)

    def forward(self, tokens) -> np.ndarray:
        hidden = self.layers(self.position(self.token(tokens)))
        self._cache = hidden.shape
        return self.head(self.norm(hidden[:, -1]))

    def backward(self, grad_output, need_input_grad: bool = True):
        shape = self._cached()
        last = self.norm.backward(self.head.backward(grad_output))
        grad_hidden = np.zeros(shape, last.dtype)
        grad_hidden[:, -1] = last   # only the `=` position is read out
        self.token.backward(self.position.backward(self.layers.backward(grad_hidden)), need_input_grad=False)
        return None


class ModularAdditionTask(ModelTask):
    """a + b mod ``modulus`` with a transformer (see the module docstring).

    modulus: p (default 97, the paper's). train_fraction: share of the p*p pairs trained on,
    in (0, 1) (default 0.5). split_seed: which pairs (default 0). d_model, nhead,
    dim_feedforward, num_layers, dropout, norm_first: the encoder's (defaults 128, 4, 512, 1,
    0.0, True). dtype: 'float32' (default) or 'float64'.
    """

    name = "modular-addition"
    input_key = "tokens"
    target_key = "labels"

    def __init__(self, *, modulus: int = 97, train_fraction: float = 0.5, split_seed: int = 0,
                 d_model: int = 128, nhead: int = 4, dim_feedforward: int = 512, num_layers: int = 1,
                 dropout: float = 0.0, norm_first: bool = True, dtype: str = "float32"):
        self.modulus = check_int("modulus", modulus, 2)
        self.train_fraction = check_real("train_fraction", train_fraction, 0.0, open_min=True)
        if self.train_fraction >= 1.0:
            raise TaskArgumentError(f"train_fraction must be in (0, 1) (some pairs must be held out); "
                                    f"got {train_fraction!r}")
        if math.floor(self.train_fraction * self.modulus ** 2) == 0:
            raise TaskArgumentError(f"train_fraction {train_fraction!r} of {self.modulus ** 2} pairs leaves no "
                                    f"training pair")
        self.split_seed = check_int("split_seed", split_seed, 0)
        self.d_model = check_int("d_model", d_model, 1)
        self.nhead = check_int("nhead", nhead, 1)
        if self.d_model % self.nhead:
            raise TaskArgumentError(f"nhead must divide d_model ({self.d_model}); got {self.nhead}")
        self.dim_feedforward = check_int("dim_feedforward", dim_feedforward, 1)
        self.num_layers = check_int("num_layers", num_layers, 1)
        self.dropout = check_real("dropout", dropout, 0.0)
        if self.dropout >= 1.0:
            raise TaskArgumentError(f"dropout must be in [0, 1); got {dropout!r}")
        if not isinstance(norm_first, bool):
            raise TaskArgumentError(f"norm_first must be true or false; got {norm_first!r}")
        self.norm_first = norm_first
        self.dtype = check_dtype("dtype", dtype)

    def _data(self) -> ModularData:
        return self.cached("data", lambda: modular_pairs(self.modulus, self.train_fraction, self.split_seed))

    def build_module(self, rng: np.random.Generator) -> Module:
        return ModularAdditionModel(self.modulus, self.d_model, self.nhead, self.dim_feedforward, self.num_layers,
                                    self.dropout, self.norm_first, self.dtype, rng)

    def make_criterion(self) -> CrossEntropyLoss:
        return CrossEntropyLoss(reduction="sum")

    def training_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        data = self._data()
        return data.train_tokens, data.train_labels

    @property
    def train_size(self) -> int:
        return int(self._data().train_labels.size)

    def metric_names(self) -> tuple[str, ...]:
        return ("accuracy", "loss", "train_accuracy")

    def evaluate(self, params: Mapping[str, np.ndarray]) -> dict[str, float]:
        data = self._data()
        logits = self.forward(params, data.held_out_tokens)
        loss = CrossEntropyLoss(reduction="mean")(logits, data.held_out_labels)
        train_logits = self.forward(params, data.train_tokens)
        return {"accuracy": float(np.mean(logits.argmax(axis=1) == data.held_out_labels)),
                "loss": float(loss),
                "train_accuracy": float(np.mean(train_logits.argmax(axis=1) == data.train_labels))}

    def torch_module(self):
        """The same model built from torch.nn (torch is imported here, only when asked), with
        the task model's parameter names: an exported state_dict loads into it as it is."""
        import torch
        from torch import nn

        task = self

        class Position(nn.Module):
            def __init__(self):
                super().__init__()
                self.weight = nn.Parameter(torch.randn(TOKENS_PER_EXAMPLE, task.d_model))

            def forward(self, x):
                return x + self.weight[:x.shape[1]]

        class ModularAdditionModel(nn.Module):
            def __init__(self):
                super().__init__()
                self.token = nn.Embedding(task.modulus + 1, task.d_model)
                self.position = Position()
                self.layers = nn.Sequential(*[nn.TransformerEncoderLayer(
                    task.d_model, task.nhead, task.dim_feedforward, task.dropout, batch_first=True,
                    norm_first=task.norm_first) for _ in range(task.num_layers)])
                self.norm = nn.LayerNorm(task.d_model)
                self.head = nn.Linear(task.d_model, task.modulus)

            def forward(self, tokens):
                return self.head(self.norm(self.layers(self.position(self.token(tokens)))[:, -1]))

        return ModularAdditionModel().to(getattr(torch, self.dtype.name))
