"""RMSprop (Hinton, Srivastava & Swersky 2012, "Neural Networks for Machine Learning", lecture 6e;
the centered variant from Graves 2013, arXiv:1308.0850), as torch.optim.RMSprop.

    g = -grad if maximize else grad;   g = g + wd * p
    v = alpha * v + (1 - alpha) * g * g
    centered:  m = lerp(m, g, 1 - alpha);   d = sqrt(v - m * m) + eps      else:  d = sqrt(v) + eps
    momentum > 0:  b = momentum * b + g / d;   p = p - lr * b             else:  p = p - lr * g / d

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

RMSPROP_DEFAULTS = dict(
    lr=1e-2, momentum=0, alpha=0.99, eps=1e-8, centered=False, weight_decay=0, capturable=False,
    foreach=None, maximize=False, differentiable=False,
)


validate = check.all_of(check.non_negative("lr", "eps", "momentum", "weight_decay", "alpha"),
                        check.flags("centered", "maximize"), check.device_flags)


def init_state(param: np.ndarray, group) -> dict:
    state = {"step": new_step(), "square_avg": np.zeros_like(param)}
    if group["momentum"] > 0:
        state["momentum_buffer"] = np.zeros_like(param)
    if group["centered"]:
        state["grad_avg"] = np.zeros_like(param)
    return state


@kernels.elementwise_kernel
def _rmsprop_kernel(param, grad, square_avg, grad_avg, buf, maximize, weight_decay, alpha,
                    one_minus_alpha, centered, lerp_w, lerp_w_small, lerp_1mw, eps, has_momentum,
                    momentum, neg_lr):
    for i in prange(param.size):
        p = param[i]
        g = kernels.with_weight_decay(kernels.signed(grad[i], maximize), p, weight_decay)
        v = kernels.decayed_square(square_avg[i], g, alpha, one_minus_alpha)
        square_avg[i] = v
        if centered:
            m = kernels.lerp(grad_avg[i], g, lerp_w, lerp_w_small, lerp_1mw)
            grad_avg[i] = m
            avg = math.sqrt(v - m * m) + eps
        else:
            avg = math.sqrt(v) + eps
        if has_momentum:
            b = buf[i] * momentum + g / avg
            buf[i] = b
            param[i] = p + neg_lr * b
        else:
            param[i] = p + neg_lr * g / avg


def update(param, grad, state, group) -> None:
    advance(state["step"])
    momentum, centered, alpha = group["momentum"], bool(group["centered"]), group["alpha"]
    # state for a momentum / centered setting switched on after the first step starts at zero
    # (torch would fail with a KeyError there)
    if momentum > 0 and "momentum_buffer" not in state:
        state["momentum_buffer"] = np.zeros_like(param)
    if centered and "grad_avg" not in state:
        state["grad_avg"] = np.zeros_like(param)
    square_avg = kernels.flat(state["square_avg"])
    grad_avg = kernels.flat(state["grad_avg"]) if centered else square_avg
    buf = kernels.flat(state["momentum_buffer"]) if momentum > 0 else square_avg
    (weight_decay, alpha_, one_minus_alpha, eps, momentum_, neg_lr) = kernels.scalars(
        param.dtype, group["weight_decay"], alpha, 1 - alpha, group["eps"], momentum,
        -group["lr"],
    )
    _rmsprop_kernel(
        kernels.flat(param), kernels.flat(grad), square_avg, grad_avg, buf, bool(group["maximize"]), weight_decay,
        alpha_, one_minus_alpha, centered, *kernels.lerp_weight(param.dtype, 1 - alpha),
        eps, momentum > 0, momentum_, neg_lr,
    )


RULE = Rule(name="rmsprop", defaults=RMSPROP_DEFAULTS, validate=validate, init_state=init_state,
            update=update)


class RMSprop(Optimizer):
    """torch.optim.RMSprop: every argument and default of torch 2.13."""

    rule = RULE

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False):
        super().__init__(params, self.rule.stored_defaults(hyperparameters(locals())))
