"""RAdam: Adam with a rectified adaptive learning rate (Liu et al. 2020, "On the Variance of
the Adaptive Learning Rate and Beyond", arXiv:1908.03265).

    g  = -grad if maximize else grad
    decoupled:  p = p * (1 - lr * wd)          else:  g = g + wd * p
    m  = lerp(m, g, 1 - beta1)                 v = beta2 * v + (1 - beta2) * g * g
    m̂  = m / (1 - beta1^t)
    rho_inf = 2 / (1 - beta2) - 1              rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)
    rho_t > 5:  r = sqrt((rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t))
                p = p - m̂ * lr * (sqrt(1 - beta2^t) / (sqrt(v) + eps)) * r
    otherwise:  p = p - m̂ * lr                 (the un-adapted, SGD-with-momentum step)

The operation order follows torch.optim.RAdam's single-tensor path, in the parameter's dtype.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from shardstep.workers.optim import group_checks as check
from shardstep.workers.optim import kernels
from shardstep.workers.optim.algorithms.adam import advance_with_bias_corrections
from shardstep.workers.optim.optimizer import Optimizer, hyperparameters
from shardstep.workers.optim.rule import Rule, new_step

RADAM_DEFAULTS = dict(
    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, maximize=False, foreach=None,
    capturable=False, decoupled_weight_decay=False, differentiable=False,
)


validate = check.all_of(check.adam_family, check.flags("decoupled_weight_decay"))


def init_state(param: np.ndarray, group) -> dict:
    return {"step": new_step(), "exp_avg": np.zeros_like(param), "exp_avg_sq": np.zeros_like(param)}


@kernels.elementwise_kernel
def _radam_kernel(param, grad, exp_avg, exp_avg_sq, maximize, weight_decay, decoupled, decay,
                  lerp_w, lerp_w_small, lerp_1mw, beta2, one_minus_beta2, bias_correction1, lr,
                  rectify, eps, one, bias_correction2_sqrt, rect):
    for i in prange(param.size):
        p, g = kernels.adam_weight_decay(param[i], kernels.signed(grad[i], maximize), weight_decay, decoupled, decay)
        m, v = kernels.adam_moments(exp_avg, exp_avg_sq, i, g, lerp_w, lerp_w_small, lerp_1mw, beta2, one_minus_beta2)
        u = m / bias_correction1 * lr
        if rectify:
            # torch: sqrt(bc2) / t is t.reciprocal() * sqrt(bc2), two roundings
            adaptive = one / (math.sqrt(v) + eps) * bias_correction2_sqrt
            u = u * adaptive * rect
        param[i] = p - u


def update(param, grad, state, group) -> None:
    step, beta1, beta2, bias_correction1, bias_correction2 = advance_with_bias_corrections(state, group)
    lr, weight_decay = group["lr"], group["weight_decay"]
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
    rectify = rho_t > 5.0
    rect = 1.0
    if rectify:
        rect = ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5
    (decay, beta2_, one_minus_beta2, bc1, lr_, eps, one, bc2_sqrt, rect_, wd) = kernels.scalars(
        param.dtype, 1 - lr * weight_decay, beta2, 1 - beta2, bias_correction1, lr,
        group["eps"], 1, bias_correction2**0.5, rect, weight_decay,
    )
    _radam_kernel(
        kernels.flat(param), kernels.flat(grad), kernels.flat(state["exp_avg"]), kernels.flat(state["exp_avg_sq"]),
        bool(group["maximize"]), wd, bool(group["decoupled_weight_decay"]), decay,
        *kernels.lerp_weight(param.dtype, 1 - beta1), beta2_, one_minus_beta2, bc1, lr_,
        bool(rectify), eps, one, bc2_sqrt, rect_,
    )


RULE = Rule(name="radam", defaults=RADAM_DEFAULTS, validate=validate, init_state=init_state, update=update)


class RAdam(Optimizer):
    """torch.optim.RAdam: every argument and default of torch 2.13."""

    rule = RULE

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 decoupled_weight_decay=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False):
        super().__init__(params, self.rule.stored_defaults(hyperparameters(locals())))
