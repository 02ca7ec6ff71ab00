"""Adadelta (Zeiler 2012, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701), as
torch.optim.Adadelta.

    g = -grad if maximize else grad;   g = g + wd * p
    v = rho * v + (1 - rho) * g * g
    d = sqrt(u + eps) / sqrt(v + eps) * g
    u = rho * u + (1 - rho) * d * d
    p = p - lr * d

The operation order follows torch's single-tensor path, in the parameter's dtype.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from shardstep.workers.optim import group_checks as check
from shardstep.workers.optim import kernels
from shardstep.workers.optim.optimizer import Optimizer, hyperparameters
from shardstep.workers.optim.rule import Rule, advance, new_step

ADADELTA_DEFAULTS = dict(
    lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, maximize=False, capturable=False, foreach=None,
    differentiable=False,
)


validate = check.all_of(check.non_negative("lr"), check.within("rho", 0.0, 1.0, closed_high=True),
                        check.non_negative("eps", "weight_decay"), check.flags("maximize"), check.device_flags)


def init_state(param: np.ndarray, group) -> dict:
    return {"step": new_step(), "square_avg": np.zeros_like(param), "acc_delta": np.zeros_like(param)}


@kernels.elementwise_kernel
def _adadelta_kernel(param, grad, square_avg, acc_delta, maximize, weight_decay, rho,
                     one_minus_rho, eps, neg_lr):
    for i in prange(param.size):
        p = param[i]
        g = kernels.with_weight_decay(kernels.signed(grad[i], maximize), p, weight_decay)
        v = kernels.decayed_square(square_avg[i], g, rho, one_minus_rho)
        square_avg[i] = v
        u = acc_delta[i]
        delta = math.sqrt(u + eps) / math.sqrt(v + eps) * g
        acc_delta[i] = u * rho + one_minus_rho * delta * delta
        param[i] = p + neg_lr * delta


def update(param, grad, state, group) -> None:
    advance(state["step"])
    rho = group["rho"]
    weight_decay, rho_, one_minus_rho, eps, neg_lr = kernels.scalars(
        param.dtype, group["weight_decay"], rho, 1 - rho, group["eps"], -group["lr"])
    _adadelta_kernel(kernels.flat(param), kernels.flat(grad), kernels.flat(state["square_avg"]),
                     kernels.flat(state["acc_delta"]), bool(group["maximize"]), weight_decay, rho_,
                     one_minus_rho, eps, neg_lr)


RULE = Rule(name="adadelta", defaults=ADADELTA_DEFAULTS, validate=validate, init_state=init_state,
            update=update)


class Adadelta(Optimizer):
    """torch.optim.Adadelta: every argument and default of torch 2.13."""

    rule = RULE

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *,
                 capturable=False, maximize=False, differentiable=False):
        super().__init__(params, self.rule.stored_defaults(hyperparameters(locals())))
