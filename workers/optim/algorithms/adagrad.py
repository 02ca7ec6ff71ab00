"""Adagrad (Duchi, Hazan & Singer 2011, "Adaptive Subgradient Methods for Online Learning and
Stochastic Optimization", JMLR 12:2121-2159), as torch.optim.Adagrad.

    g   = -grad if maximize else grad;     g = g + wd * p
    clr = lr / (1 + (t - 1) * lr_decay)
    s   = s + g * g                        (s starts at initial_accumulator_value)
    p   = p - clr * g / (sqrt(s) + eps)

Row-sparse gradients (embeddings) update ``s`` and ``p`` only at the gradient's rows, as torch's
sparse path does; weight decay is refused for them, as in torch (it would touch every row).
The operation order follows torch's single-tensor path, in the parameter's dtype.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from shardstep.workers.optim import group_checks as check
from shardstep.workers.optim import kernels
from shardstep.workers.optim.optimizer import Optimizer, hyperparameters
from shardstep.workers.optim.rule import Rule, advance, new_step

ADAGRAD_DEFAULTS = dict(
    lr=1e-2, lr_decay=0, eps=1e-10, weight_decay=0, initial_accumulator_value=0, foreach=None,
    maximize=False, differentiable=False, fused=None,
)


validate = check.all_of(
    check.non_negative("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps"),
    check.flags("maximize"), check.device_flags,
)


def init_state(param: np.ndarray, group) -> dict:
    return {"step": new_step(), "sum": np.full_like(param, group["initial_accumulator_value"])}


@kernels.elementwise_kernel
def _adagrad_kernel(param, grad, state_sum, maximize, weight_decay, eps, neg_clr):
    for i in prange(param.size):
        p = param[i]
        g = kernels.with_weight_decay(kernels.signed(grad[i], maximize), p, weight_decay)
        s = state_sum[i] + g * g
        state_sum[i] = s
        # torch's addcdiv: p + value * g / std
        param[i] = p + neg_clr * g / (math.sqrt(s) + eps)


@njit(parallel=True, cache=True, nogil=True)
def _adagrad_rows_kernel(param, rows, values, state_sum, maximize, eps, neg_clr):
    for k in prange(rows.size):
        r = rows[k]
        for j in range(param.shape[1]):
            g = kernels.signed(values[k, j], maximize)
            s = state_sum[r, j] + g * g
            state_sum[r, j] = s
            # torch's sparse path: p.add_(g / std, alpha=-clr)
            param[r, j] = param[r, j] + neg_clr * (g / (math.sqrt(s) + eps))


def _neg_clr(group, step: float) -> float:
    return -(group["lr"] / (1 + (step - 1) * group["lr_decay"]))


def update(param, grad, state, group) -> None:
    step = advance(state["step"])
    weight_decay, eps, neg_clr = kernels.scalars(param.dtype, group["weight_decay"], group["eps"],
                                         _neg_clr(group, step))
    _adagrad_kernel(kernels.flat(param), kernels.flat(grad), kernels.flat(state["sum"]), bool(group["maximize"]),
                    weight_decay, eps, neg_clr)


def update_rows(param, rows, values, state, group) -> None:
    if group["weight_decay"] != 0:
        raise RuntimeError(
            "weight_decay option is not compatible with sparse gradients; got "
            f"weight_decay={group['weight_decay']}, allowed with sparse gradients: 0"
        )
    step = advance(state["step"])
    eps, neg_clr = kernels.scalars(param.dtype, group["eps"], _neg_clr(group, step))
    state_sum = kernels.flat(state["sum"]).reshape(param.shape)
    _adagrad_rows_kernel(param, rows, values, state_sum, bool(group["maximize"]), eps, neg_clr)


RULE = Rule(name="adagrad", defaults=ADAGRAD_DEFAULTS, validate=validate, init_state=init_state,
            update=update, update_rows=update_rows)


class Adagrad(Optimizer):
    """torch.optim.Adagrad: every argument and default of torch 2.13.

    As in torch, state ('step' and 'sum') exists for every parameter from construction on.
    """

    rule = RULE

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None):
        super().__init__(params, self.rule.stored_defaults(hyperparameters(locals())))
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p].update(RULE.init_state(p.data, group))
