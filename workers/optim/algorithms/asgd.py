"""ASGD: averaged stochastic gradient descent (Polyak & Juditsky 1992, "Acceleration of
Stochastic Approximation by Averaging", SIAM J. Control Optim. 30(4)), as torch.optim.ASGD.

    g  = -grad if maximize else grad;   g = g + wd * p
    p  = p * (1 - lambd * eta) - eta * g
    ax = ax + mu * (p - ax)   if mu != 1, else  ax = p
    then, with the new step t:
    eta = lr / (1 + lambd * lr * t)^alpha      mu = 1 / max(1, t - t0)

eta and mu are scalar state of torch's scalar dtype (float32, or float64 under
``set_default_dtype("float64")``), rounded once from the float64 formula, and the update
reads eta back from its stored value. The operation order follows
torch.optim.ASGD's single-tensor path, in the parameter's dtype.
"""

from __future__ import annotations

import numpy as np
from numba import prange

from shardstep.workers.optim import group_checks as check
from shardstep.workers.optim import kernels
from shardstep.workers.optim.optimizer import Optimizer, hyperparameters
from shardstep.workers.optim.rule import Rule, advance, new_scalar, new_step, store_scalar

ASGD_DEFAULTS = dict(
    lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0, foreach=None, maximize=False,
    differentiable=False, capturable=False,
)


# torch checks neither lambd, alpha nor t0; they must at least be numbers
validate = check.all_of(check.non_negative("lr", "weight_decay"), check.numbers("lambd", "alpha", "t0"),
                        check.flags("maximize"), check.device_flags)


def init_state(param: np.ndarray, group) -> dict:
    return {
        "step": new_step(),
        "eta": new_scalar(group["lr"]),
        "mu": new_scalar(1.0),
        "ax": np.zeros_like(param),
    }


@kernels.elementwise_kernel
def _asgd_kernel(param, grad, ax, maximize, weight_decay, decay, neg_eta, average, mu):
    for i in prange(param.size):
        p = param[i]
        g = kernels.with_weight_decay(kernels.signed(grad[i], maximize), p, weight_decay)
        p = p * decay
        p = p + neg_eta * g
        param[i] = p
        if average:
            a = ax[i]
            ax[i] = a + (p - a) * mu
        else:
            ax[i] = p


def update(param, grad, state, group) -> None:
    step = advance(state["step"])
    lr, lambd, alpha, t0 = group["lr"], group["lambd"], group["alpha"], group["t0"]
    eta_value = float(state["eta"])
    mu_value = float(state["mu"])
    decay, neg_eta, wd, mu = kernels.scalars(param.dtype, 1 - lambd * eta_value, -eta_value,
                                     group["weight_decay"], mu_value)
    _asgd_kernel(kernels.flat(param), kernels.flat(grad), kernels.flat(state["ax"]), bool(group["maximize"]), wd, decay,
                 neg_eta, mu_value != 1, mu)
    # torch writes torch.as_tensor of the Python float (its scalar dtype) into eta and mu
    store_scalar(state["eta"], lr / ((1 + lambd * lr * step) ** alpha))
    store_scalar(state["mu"], 1 / max(1, step - t0))


RULE = Rule(name="asgd", defaults=ASGD_DEFAULTS, validate=validate, init_state=init_state,
            update=update, scalar_state=("step", "eta", "mu"))


class ASGD(Optimizer):
    """torch.optim.ASGD: every argument and default of torch 2.13."""

    rule = RULE

    def __init__(self, params, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0, foreach=None,
                 maximize=False, differentiable=False, capturable=False):
        super().__init__(params, self.rule.stored_defaults(hyperparameters(locals())))
