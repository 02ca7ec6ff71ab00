"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019, arXiv:1711.05101).

The update rule is Adam's (:mod:`shardstep.workers.optim.algorithms.adam`) with
``decoupled_weight_decay=True`` and torch's AdamW defaults (``weight_decay=0.01``).
"""

from __future__ import annotations

import dataclasses

from shardstep.workers.optim.algorithms import adam
from shardstep.workers.optim.optimizer import Optimizer, hyperparameters

RULE = dataclasses.replace(
    adam.RULE, name="adamw",
    defaults={**adam.ADAM_DEFAULTS, "weight_decay": 1e-2, "decoupled_weight_decay": True},
)


class AdamW(Optimizer):
    """torch.optim.AdamW: every argument and default of torch 2.13."""

    rule = RULE

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None):
        super().__init__(params, self.rule.stored_defaults(hyperparameters(locals())))
