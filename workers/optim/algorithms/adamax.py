"""Adamax, Adam's infinity-norm variant (Kingma & Ba 2015, arXiv:1412.6980, section 7.1), as
torch.optim.Adamax.

    g = -grad if maximize else grad;   g = g + wd * p
    m = lerp(m, g, 1 - beta1)
    u = max(beta2 * u, |g| + eps)
    p = p - lr / (1 - beta1^t) * m / u

The operation order follows torch's single-tensor path, in the parameter's dtype.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from shardstep.workers.optim import group_checks as check
from shardstep.workers.optim import kernels
from shardstep.workers.optim.optimizer import Optimizer, hyperparameters
from shardstep.workers.optim.rule import Rule, advance, new_step

ADAMAX_DEFAULTS = dict(
    lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, foreach=None, maximize=False,
    differentiable=False, capturable=False,
)


validate = check.adam_family


def init_state(param: np.ndarray, group) -> dict:
    return {"step": new_step(), "exp_avg": np.zeros_like(param), "exp_inf": np.zeros_like(param)}


@kernels.elementwise_kernel
def _adamax_kernel(param, grad, exp_avg, exp_inf, maximize, weight_decay, lerp_w, lerp_w_small,
                   lerp_1mw, beta2, eps, neg_clr):
    for i in prange(param.size):
        p = param[i]
        g = kernels.with_weight_decay(kernels.signed(grad[i], maximize), p, weight_decay)
        m = kernels.lerp(exp_avg[i], g, lerp_w, lerp_w_small, lerp_1mw)
        exp_avg[i] = m
        # torch.maximum(exp_inf * beta2, |g| + eps), NaN-propagating like torch.maximum
        u = exp_inf[i] * beta2
        a = abs(g) + eps
        if not (u > a or u != u):
            u = a
        exp_inf[i] = u
        param[i] = p + neg_clr * m / u


def update(param, grad, state, group) -> None:
    step = advance(state["step"])
    beta1, beta2 = group["betas"]
    clr = group["lr"] / (1 - beta1**step)
    weight_decay, beta2_, eps, neg_clr = kernels.scalars(
        param.dtype, group["weight_decay"], beta2, group["eps"], -clr)
    _adamax_kernel(
        kernels.flat(param), kernels.flat(grad), kernels.flat(state["exp_avg"]), kernels.flat(state["exp_inf"]),
        bool(group["maximize"]), weight_decay, *kernels.lerp_weight(param.dtype, 1 - beta1),
        beta2_, eps, neg_clr,
    )


RULE = Rule(name="adamax", defaults=ADAMAX_DEFAULTS, validate=validate, init_state=init_state,
            update=update)


class Adamax(Optimizer):
    """torch.optim.Adamax: every argument and default of torch 2.13."""

    rule = RULE

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, foreach=None, *,
                 maximize=False, differentiable=False, capturable=False):
        super().__init__(params, self.rule.stored_defaults(hyperparameters(locals())))
