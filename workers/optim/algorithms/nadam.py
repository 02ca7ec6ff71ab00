"""NAdam: Adam with Nesterov momentum (Dozat 2016, "Incorporating Nesterov Momentum into
Adam", ICLR workshop), with torch's momentum decay schedule.

    g  = -grad if maximize else grad
    decoupled:  p = p * (1 - lr * wd)          else:  g = g + wd * p
    mu_t = beta1 * (1 - 0.5 * 0.96^(t * psi)),  mu_{t+1} likewise;  Π_t = Π_{t-1} * mu_t
    m  = lerp(m, g, 1 - beta1)                 v = beta2 * v + (1 - beta2) * g * g
    d  = sqrt(v / (1 - beta2^t)) + eps
    p  = p - lr (1 - mu_t) / (1 - Π_t) * g / d - lr mu_{t+1} / (1 - Π_t mu_{t+1}) * m / d

(psi = momentum_decay.) Π (``mu_product``) is scalar state of torch's scalar dtype (float32,
or float64 under ``set_default_dtype("float64")``) and rounds as torch's does. The operation order follows torch.optim.NAdam's single-tensor path, in the
parameter's dtype.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from shardstep.workers.optim import group_checks as check
from shardstep.workers.optim import kernels
from shardstep.workers.optim.optimizer import Optimizer, hyperparameters
from shardstep.workers.optim.rule import Rule, advance, new_scalar, new_step, store_scalar

NADAM_DEFAULTS = dict(
    lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, momentum_decay=4e-3,
    decoupled_weight_decay=False, maximize=False, foreach=None, capturable=False, differentiable=False,
)


validate = check.all_of(check.adam_family, check.non_negative("momentum_decay"),
                        check.flags("decoupled_weight_decay"))


def init_state(param: np.ndarray, group) -> dict:
    return {
        "step": new_step(),
        "mu_product": new_scalar(1.0),
        "exp_avg": np.zeros_like(param),
        "exp_avg_sq": np.zeros_like(param),
    }


@kernels.elementwise_kernel
def _nadam_kernel(param, grad, exp_avg, exp_avg_sq, maximize, weight_decay, decoupled, decay,
                  lerp_w, lerp_w_small, lerp_1mw, beta2, one_minus_beta2, bias_correction2, eps,
                  grad_coef, exp_avg_coef):
    for i in prange(param.size):
        p, g = kernels.adam_weight_decay(param[i], kernels.signed(grad[i], maximize), weight_decay, decoupled, decay)
        m, v = kernels.adam_moments(exp_avg, exp_avg_sq, i, g, lerp_w, lerp_w_small, lerp_1mw, beta2, one_minus_beta2)
        denom = math.sqrt(v / bias_correction2) + eps
        # two addcdiv_ calls: the parameter rounds after each
        p = p + grad_coef * g / denom
        param[i] = p + exp_avg_coef * m / denom


def update(param, grad, state, group) -> None:
    step = advance(state["step"])
    beta1, beta2 = group["betas"]
    lr, weight_decay, momentum_decay = group["lr"], group["weight_decay"], group["momentum_decay"]
    bias_correction2 = 1 - beta2**step
    mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * momentum_decay)))
    mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * momentum_decay)))
    # torch multiplies mu_product by mu in mu_product's own dtype (its scalar dtype). A loaded
    # state keeps the dtype it was saved with, so a resumed run continues bit-identically
    # (torch casts it to the parameter's dtype on load and then drifts from its own run)
    mu_product = state["mu_product"]
    kind = mu_product.dtype.type
    mu_product_value = store_scalar(mu_product, kind(mu_product) * kind(mu))
    mu_product_next = mu_product_value * mu_next
    grad_coef = -lr * (1.0 - mu) / (1.0 - mu_product_value)
    exp_avg_coef = (-lr * mu_next) / (1.0 - mu_product_next)
    (decay, beta2_, one_minus_beta2, bc2, eps, grad_coef_, exp_avg_coef_, wd) = kernels.scalars(
        param.dtype, 1 - lr * weight_decay, beta2, 1 - beta2, bias_correction2,
        group["eps"], grad_coef, exp_avg_coef, weight_decay,
    )
    _nadam_kernel(
        kernels.flat(param), kernels.flat(grad), kernels.flat(state["exp_avg"]), kernels.flat(state["exp_avg_sq"]),
        bool(group["maximize"]), wd, bool(group["decoupled_weight_decay"]), decay,
        *kernels.lerp_weight(param.dtype, 1 - beta1), beta2_, one_minus_beta2, bc2,
        eps, grad_coef_, exp_avg_coef_,
    )


RULE = Rule(name="nadam", defaults=NADAM_DEFAULTS, validate=validate, init_state=init_state,
            update=update, scalar_state=("step", "mu_product"))


class NAdam(Optimizer):
    """torch.optim.NAdam: every argument and default of torch 2.13."""

    rule = RULE

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, momentum_decay=4e-3,
                 decoupled_weight_decay=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False):
        super().__init__(params, self.rule.stored_defaults(hyperparameters(locals())))
