"""Adam and AdamW (Kingma & Ba 2015, arXiv:1412.6980; Loshchilov & Hutter 2019, arXiv:1711.05101).

    g  = -grad if maximize else grad
    decoupled:  p = p * (1 - lr * wd)          else:  g = g + wd * p
    m  = lerp(m, g, 1 - beta1)                 v = beta2 * v + (1 - beta2) * g * g
    v̂  = max(v̂, v) if amsgrad else v
    p  = p - lr / (1 - beta1^t) * m / (sqrt(v̂) / sqrt(1 - beta2^t) + eps)

The operation order follows torch.optim.Adam's single-tensor path, in the parameter's dtype.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from shardstep.workers.optim import group_checks as check
from shardstep.workers.optim import kernels
from shardstep.workers.optim.optimizer import Optimizer, hyperparameters
from shardstep.workers.optim.rule import Rule, advance, new_step

ADAM_DEFAULTS = dict(
    lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, maximize=False,
    foreach=None, capturable=False, differentiable=False, fused=None, decoupled_weight_decay=False,
)


validate = check.all_of(check.adam_family, check.flags("amsgrad", "decoupled_weight_decay"))


def init_state(param: np.ndarray, group) -> dict:
    state = {"step": new_step(), "exp_avg": np.zeros_like(param), "exp_avg_sq": np.zeros_like(param)}
    if group["amsgrad"]:
        state["max_exp_avg_sq"] = np.zeros_like(param)
    return state


@kernels.elementwise_kernel
def _adam_kernel(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, maximize, amsgrad,
                 weight_decay, decoupled, decay, lerp_w, lerp_w_small, lerp_1mw,
                 beta2, one_minus_beta2, bias_correction2_sqrt, eps, neg_step_size):
    for i in prange(param.size):
        p, g = kernels.adam_weight_decay(param[i], kernels.signed(grad[i], maximize), weight_decay, decoupled, decay)
        m, v = kernels.adam_moments(exp_avg, exp_avg_sq, i, g, lerp_w, lerp_w_small, lerp_1mw, beta2, one_minus_beta2)
        if amsgrad:
            v = max(max_exp_avg_sq[i], v)
            max_exp_avg_sq[i] = v
        denom = math.sqrt(v) / bias_correction2_sqrt + eps
        param[i] = p + neg_step_size * m / denom


def advance_with_bias_corrections(state, group) -> tuple[float, float, float, float, float]:
    """Count the step and return ``(step, beta1, beta2, 1 - beta1**step, 1 - beta2**step)`` as
    torch's single-tensor Adam and RAdam compute them, in Python floats."""
    step = advance(state["step"])
    beta1, beta2 = group["betas"]
    return step, beta1, beta2, 1 - beta1**step, 1 - beta2**step


def update(param, grad, state, group) -> None:
    _, beta1, beta2, bias_correction1, bias_correction2 = advance_with_bias_corrections(state, group)
    lr, weight_decay = group["lr"], group["weight_decay"]
    exp_avg_sq = kernels.flat(state["exp_avg_sq"])
    max_exp_avg_sq = kernels.flat(state["max_exp_avg_sq"]) if group["amsgrad"] else exp_avg_sq
    (decay, beta2_, one_minus_beta2, bc2_sqrt, eps, neg_step_size, wd) = kernels.scalars(
        param.dtype, 1 - lr * weight_decay, beta2, 1 - beta2, bias_correction2**0.5,
        group["eps"], -(lr / bias_correction1), weight_decay,
    )
    _adam_kernel(
        kernels.flat(param), kernels.flat(grad), kernels.flat(state["exp_avg"]), exp_avg_sq, max_exp_avg_sq,
        bool(group["maximize"]), bool(group["amsgrad"]), wd, bool(group["decoupled_weight_decay"]),
        decay, *kernels.lerp_weight(param.dtype, 1 - beta1),
        beta2_, one_minus_beta2, bc2_sqrt, eps, neg_step_size,
    )


RULE = Rule(name="adam", defaults=ADAM_DEFAULTS, validate=validate, init_state=init_state, update=update)


class Adam(Optimizer):
    """torch.optim.Adam: every argument and default of torch 2.13."""

    rule = RULE

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False, *,
                 foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False):
        super().__init__(params, self.rule.stored_defaults(hyperparameters(locals())))
