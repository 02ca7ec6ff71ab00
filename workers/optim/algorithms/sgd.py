"""SGD with momentum, dampening and Nesterov momentum (Sutskever et al. 2013), as torch.optim.SGD.

    g = -grad if maximize else grad;   g = g + wd * p
    b = g on the first step, else momentum * b + (1 - dampening) * g
    g = g + momentum * b if nesterov else b            (when momentum != 0)
    p = p - lr * g

Row-sparse gradients (embeddings) are accepted without momentum and weight decay, as in torch
(whose sparse momentum buffer would grow dense; use Adagrad or SparseAdam for those).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from shardstep.workers.optim import group_checks as check
from shardstep.workers.optim import kernels
from shardstep.workers.optim.optimizer import Optimizer, hyperparameters
from shardstep.workers.optim.rule import Rule

SGD_DEFAULTS = dict(lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, maximize=False,
                    foreach=None, differentiable=False, fused=None)


def _check_nesterov(group) -> None:
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            "nesterov momentum requires momentum > 0 and dampening = 0; got "
            f"momentum={group['momentum']}, dampening={group['dampening']}"
        )


# torch checks no range for dampening
validate = check.all_of(check.non_negative("lr", "momentum", "weight_decay"), check.numbers("dampening"),
                        check.flags("nesterov", "maximize"), _check_nesterov, check.device_flags)


def init_state(param: np.ndarray, group) -> dict:
    # torch creates the momentum buffer from the first gradient, and no state without momentum
    return {}


@kernels.elementwise_kernel
def _sgd_kernel(param, grad, buf, maximize, weight_decay, has_momentum, first, momentum,
                one_minus_dampening, nesterov, neg_lr):
    for i in prange(param.size):
        p = param[i]
        g = kernels.with_weight_decay(kernels.signed(grad[i], maximize), p, weight_decay)
        if has_momentum:
            if first:
                b = g
            else:
                b = buf[i] * momentum + one_minus_dampening * g
            buf[i] = b
            if nesterov:
                g = g + momentum * b
            else:
                g = b
        param[i] = p + neg_lr * g


def update(param, grad, state, group) -> None:
    momentum = group["momentum"]
    first = False
    if momentum != 0 and "momentum_buffer" not in state:
        state["momentum_buffer"] = np.empty_like(param)
        first = True
    param, grad = kernels.flat(param), kernels.flat(grad)
    buf = kernels.flat(state["momentum_buffer"]) if momentum != 0 else param
    weight_decay, momentum_, one_minus_dampening, neg_lr = kernels.scalars(
        param.dtype, group["weight_decay"], momentum, 1 - group["dampening"], -group["lr"])
    _sgd_kernel(param, grad, buf, bool(group["maximize"]), weight_decay, momentum != 0, first,
                momentum_, one_minus_dampening, bool(group["nesterov"]), neg_lr)


def update_rows(param, rows, values, state, group) -> None:
    if group["momentum"] != 0 or group["weight_decay"] != 0:
        raise RuntimeError(
            "SGD with sparse gradients needs momentum=0 and weight_decay=0; got "
            f"momentum={group['momentum']}, weight_decay={group['weight_decay']}"
        )
    neg_lr = param.dtype.type(-group["lr"])
    if group["maximize"]:
        values = -values
    param[rows] += neg_lr * values


RULE = Rule(name="sgd", defaults=SGD_DEFAULTS, validate=validate, init_state=init_state,
            update=update, update_rows=update_rows, scalar_state=())


class SGD(Optimizer):
    """torch.optim.SGD: every argument and default of torch 2.13."""

    rule = RULE

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None):
        super().__init__(params, self.rule.stored_defaults(hyperparameters(locals())))
