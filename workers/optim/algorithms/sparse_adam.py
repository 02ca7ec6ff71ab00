"""SparseAdam: Adam restricted to the rows a row-sparse gradient touches (Kingma & Ba 2015,
arXiv:1412.6980), as torch.optim.SparseAdam (for embedding tables).

For every row r in the (coalesced) gradient, and only those rows:

    g  = -grad if maximize else grad
    m  = m + (g - m) * (1 - beta1)             v = v + (g * g - v) * (1 - beta2)
    p  = p - lr * sqrt(1 - beta2^t) / (1 - beta1^t) * (m / (sqrt(v) + eps))

Rows without a gradient keep their parameter and moments. The step counter counts every
step the parameter had a gradient (even an empty one) and is a Python int, as in torch.
Dense gradients are refused (use Adam). The operation order follows torch's
``torch.optim._functional.sparse_adam``, in the parameter's dtype.
"""

from __future__ import annotations

import math

import numpy as np
from numba import prange

from shardstep.workers.optim import group_checks as check
from shardstep.workers.optim import kernels
from shardstep.workers.optim.optimizer import Optimizer, hyperparameters
from shardstep.workers.optim.rule import Rule

SPARSE_ADAM_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False)


def _check_positive(name: str, value) -> None:
    value = check.number(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0; got {value}")


def validate(group) -> None:
    _check_positive("lr", group["lr"])
    _check_positive("eps", group["eps"])
    check.betas(group)
    check.boolean("maximize", group["maximize"])


def init_state(param: np.ndarray, group) -> dict:
    # torch's SparseAdam counts steps in a Python int (not a float32 tensor)
    return {"step": 0, "exp_avg": np.zeros_like(param), "exp_avg_sq": np.zeros_like(param)}


@kernels.elementwise_kernel
def _sparse_adam_kernel(param, rows, values, exp_avg, exp_avg_sq, maximize, one_minus_beta1,
                        one_minus_beta2, eps, neg_step_size):
    # rows are unique, so rows update independently
    for k in prange(rows.size):
        r = rows[k]
        for j in range(param.shape[1]):
            g = kernels.signed(values[k, j], maximize)
            m_old = exp_avg[r, j]
            m_update = (g - m_old) * one_minus_beta1
            exp_avg[r, j] = m_old + m_update
            v_old = exp_avg_sq[r, j]
            v_update = (g * g - v_old) * one_minus_beta2
            exp_avg_sq[r, j] = v_old + v_update
            numer = m_update + m_old
            denom = math.sqrt(v_update + v_old) + eps
            param[r, j] = param[r, j] + neg_step_size * (numer / denom)


def update_rows(param, rows, values, state, group) -> None:
    state["step"] += 1
    if values.size == 0:
        return  # torch skips an empty gradient, after counting the step
    step = state["step"]
    beta1, beta2 = group["betas"]
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1
    one_minus_beta1, one_minus_beta2, eps, neg_step_size = kernels.scalars(
        param.dtype, 1 - beta1, 1 - beta2, group["eps"], -step_size)
    _sparse_adam_kernel(
        param, rows, values, kernels.flat(state["exp_avg"]).reshape(param.shape),
        kernels.flat(state["exp_avg_sq"]).reshape(param.shape), bool(group["maximize"]),
        one_minus_beta1, one_minus_beta2, eps, neg_step_size,
    )


RULE = Rule(name="sparse_adam", defaults=SPARSE_ADAM_DEFAULTS, validate=validate,
            init_state=init_state, update=None, update_rows=update_rows)


class SparseAdam(Optimizer):
    """torch.optim.SparseAdam: every argument and default of torch 2.13.

    torch's constructor also refuses sparse and complex parameters; a shardstep Parameter is
    always a dense float32/float64 array, so neither can occur.
    """

    rule = RULE

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, maximize=False):
        super().__init__(params, self.rule.stored_defaults(hyperparameters(locals())))
