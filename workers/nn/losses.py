"""Losses with torch.nn's constructor arguments and values, and an explicit backward.

    criterion = CrossEntropyLoss(label_smoothing=0.1)
    value = criterion(logits, labels)       # a Python float ('mean'/'sum') or an ndarray ('none')
    dlogits = criterion.backward()          # grad_output=1.0

``backward(grad_output)`` returns the gradient with respect to each non-target input: one
array for one input, a tuple for several (TripletMarginLoss: (d_anchor, d_positive,
d_negative); MarginRankingLoss and CosineEmbeddingLoss: (d_input1, d_input2)). With
reduction='none', ``grad_output`` is an array of the output's shape. The math lives in
:mod:`shardstep.workers.nn.functional`.

Arguments that torch takes positionally before its deprecated ``size_average``/``reduce``
are positional here too; the rest are keyword-only (``size_average`` and ``reduce`` are not
accepted: use ``reduction``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from shardstep.workers.nn import functional as F
from shardstep.workers.nn.checks import (
    REDUCTIONS,
    flag,
    float_array,
    integer,
    real,
    reduction_name,
)


class Loss:
    """Base class: ``__call__(*inputs, target)`` runs the functional forward and keeps its saved
    state; ``backward(grad_output=1.0)`` runs the functional backward on it."""

    reductions: ClassVar[tuple[str, ...]] = REDUCTIONS
    # (saved, grad_output) -> the gradient of each non-target input: the functional backward
    # that goes with what the subclass's forward saved
    _backward_function: ClassVar[Callable[[Any, Any], Any] | None] = None

    def __init__(self, reduction: str = "mean"):
        self.reduction = reduction_name(type(self).__name__, reduction, self.reductions)
        self._saved = None

    def __call__(self, *args):
        self._saved = None  # a call that fails leaves nothing for backward to reuse
        return self.forward(*args)

    def forward(self, *args):
        raise NotImplementedError

    def _finish(self, output: np.ndarray, saved) -> Any:
        self._saved = saved
        if self.reduction == "none":
            return output
        return float(output)

    def _saved_state(self):
        if self._saved is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before the loss was computed")
        return self._saved

    def backward(self, grad_output=1.0):
        if self._backward_function is None:
            raise NotImplementedError
        return self._backward_function(self._saved_state(), grad_output)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"


def _optional_float_array(owner: str, name: str, value):
    return None if value is None else float_array(owner, name, value)


class NLLLoss(Loss):
    """Negative log-likelihood of class indices given log-probabilities (torch.nn.NLLLoss)."""

    _backward_function = staticmethod(F.nll_loss_backward)

    def __init__(self, weight=None, *, ignore_index: int = -100, reduction: str = "mean"):
        super().__init__(reduction)
        self.weight = _optional_float_array("NLLLoss", "weight", weight)
        self.ignore_index = integer("NLLLoss", "ignore_index", ignore_index)

    def forward(self, input, target):
        return self._finish(*F.nll_loss_forward(input, target, self.weight, self.ignore_index, self.reduction))


class CrossEntropyLoss(Loss):
    """LogSoftmax over the class axis followed by NLLLoss (class-index targets) or the
    cross-entropy with class-probability targets, with optional label smoothing."""

    _backward_function = staticmethod(F.cross_entropy_backward)

    def __init__(self, weight=None, *, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0):
        super().__init__(reduction)
        owner = "CrossEntropyLoss"
        self.weight = _optional_float_array(owner, "weight", weight)
        self.ignore_index = integer(owner, "ignore_index", ignore_index)
        self.label_smoothing = real(owner, "label_smoothing", label_smoothing)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"{owner}: label_smoothing must be in [0, 1]; got {self.label_smoothing}")

    def forward(self, input, target):
        return self._finish(*F.cross_entropy_forward(input, target, self.weight, self.ignore_index,
                                                     self.reduction, self.label_smoothing))


class TripletMarginLoss(Loss):
    """max(margin + d(a, p) - d(a, n), 0) with d the p-norm distance (torch.nn.TripletMarginLoss)."""

    _backward_function = staticmethod(F.triplet_margin_loss_backward)

    def __init__(self, margin: float = 1.0, p: float = 2.0, eps: float = 1e-6, swap: bool = False, *,
                 reduction: str = "mean"):
        super().__init__(reduction)
        owner = "TripletMarginLoss"
        self.margin = real(owner, "margin", margin)
        if self.margin <= 0:
            raise ValueError(f"{owner}: margin must be > 0; got {self.margin}")
        self.p = real(owner, "p", p)
        self.eps = real(owner, "eps", eps)
        self.swap = flag(owner, "swap", swap)

    def forward(self, anchor, positive, negative):
        return self._finish(*F.triplet_margin_loss_forward(anchor, positive, negative, self.margin, self.p,
                                                           self.eps, self.swap, self.reduction))


class MSELoss(Loss):
    _backward_function = staticmethod(F.mse_loss_backward)

    def __init__(self, *, reduction: str = "mean"):
        super().__init__(reduction)

    def forward(self, input, target):
        return self._finish(*F.mse_loss_forward(input, target, self.reduction))


class L1Loss(Loss):
    _backward_function = staticmethod(F.l1_loss_backward)

    def __init__(self, *, reduction: str = "mean"):
        super().__init__(reduction)

    def forward(self, input, target):
        return self._finish(*F.l1_loss_forward(input, target, self.reduction))


class SmoothL1Loss(Loss):
    _backward_function = staticmethod(F.smooth_l1_loss_backward)

    def __init__(self, *, reduction: str = "mean", beta: float = 1.0):
        super().__init__(reduction)
        self.beta = real("SmoothL1Loss", "beta", beta)
        if self.beta < 0:
            raise ValueError(f"SmoothL1Loss: beta must be >= 0; got {self.beta}")

    def forward(self, input, target):
        return self._finish(*F.smooth_l1_loss_forward(input, target, self.reduction, self.beta))


class HuberLoss(Loss):
    _backward_function = staticmethod(F.huber_loss_backward)

    def __init__(self, reduction: str = "mean", delta: float = 1.0):
        super().__init__(reduction)
        self.delta = real("HuberLoss", "delta", delta)
        if self.delta <= 0:
            raise ValueError(f"HuberLoss: delta must be > 0; got {self.delta}")

    def forward(self, input, target):
        return self._finish(*F.huber_loss_forward(input, target, self.reduction, self.delta))


class BCELoss(Loss):
    """Binary cross-entropy of probabilities in [0, 1]; logs clamped at -100 as in torch."""

    _backward_function = staticmethod(F.binary_cross_entropy_backward)

    def __init__(self, weight=None, *, reduction: str = "mean"):
        super().__init__(reduction)
        self.weight = _optional_float_array("BCELoss", "weight", weight)

    def forward(self, input, target):
        return self._finish(*F.binary_cross_entropy_forward(input, target, self.weight, self.reduction))


class BCEWithLogitsLoss(Loss):
    """Sigmoid + binary cross-entropy in one stable expression, with per-element ``weight`` and
    per-class ``pos_weight`` (both broadcast to the input's shape)."""

    _backward_function = staticmethod(F.binary_cross_entropy_with_logits_backward)

    def __init__(self, weight=None, *, reduction: str = "mean", pos_weight=None):
        super().__init__(reduction)
        self.weight = _optional_float_array("BCEWithLogitsLoss", "weight", weight)
        self.pos_weight = _optional_float_array("BCEWithLogitsLoss", "pos_weight", pos_weight)

    def forward(self, input, target):
        return self._finish(*F.binary_cross_entropy_with_logits_forward(
            input, target, self.weight, self.reduction, self.pos_weight))


class KLDivLoss(Loss):
    """KL divergence with the input as log-probabilities; reduction also takes 'batchmean'."""

    reductions = F.KL_REDUCTIONS
    _backward_function = staticmethod(F.kl_div_backward)

    def __init__(self, *, reduction: str = "mean", log_target: bool = False):
        super().__init__(reduction)
        self.log_target = flag("KLDivLoss", "log_target", log_target)

    def forward(self, input, target):
        return self._finish(*F.kl_div_forward(input, target, self.reduction, self.log_target))


class MarginRankingLoss(Loss):
    _backward_function = staticmethod(F.margin_ranking_loss_backward)

    def __init__(self, margin: float = 0.0, *, reduction: str = "mean"):
        super().__init__(reduction)
        self.margin = real("MarginRankingLoss", "margin", margin)

    def forward(self, input1, input2, target):
        return self._finish(*F.margin_ranking_loss_forward(input1, input2, target, self.margin, self.reduction))


class CosineEmbeddingLoss(Loss):
    _backward_function = staticmethod(F.cosine_embedding_loss_backward)

    def __init__(self, margin: float = 0.0, *, reduction: str = "mean"):
        super().__init__(reduction)
        self.margin = real("CosineEmbeddingLoss", "margin", margin)

    def forward(self, input1, input2, target):
        return self._finish(*F.cosine_embedding_loss_forward(input1, input2, target, self.margin, self.reduction))
