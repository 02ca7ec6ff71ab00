"""Rprop: resilient backpropagation (Riedmiller & Braun 1993, "A Direct Adaptive Method for
Faster Backpropagation Learning: The RPROP Algorithm", IEEE ICNN), as torch.optim.Rprop.

    g  = -grad if maximize else grad
    s  = sign(g * prev)
    f  = etaplus if s > 0, etaminus if s < 0, 1 if s == 0
    step_size = clamp(step_size * f, step_size_min, step_size_max)
    g  = 0 where f == etaminus            (after a sign change, skip this step)
    p  = p - sign(g) * step_size;         prev = g

step_size starts at lr everywhere. The operation order follows torch.optim.Rprop's
single-tensor path, in the parameter's dtype (including torch's sign(NaN) = 0).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from shardstep.workers.optim import group_checks as check
from shardstep.workers.optim import kernels
from shardstep.workers.optim.optimizer import Optimizer, hyperparameters
from shardstep.workers.optim.rule import Rule, advance, new_step

RPROP_DEFAULTS = dict(
    lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), foreach=None, maximize=False,
    differentiable=False, capturable=False,
)


def _check_etas(group) -> None:
    etaminus, etaplus = check.pair("etas", group["etas"])
    etaminus = check.number("etas[0]", etaminus)
    etaplus = check.number("etas[1]", etaplus)
    if not 0.0 < etaminus < 1.0 < etaplus:
        raise ValueError(f"etas must satisfy 0 < etas[0] < 1 < etas[1]; got ({etaminus}, {etaplus})")


def _check_step_sizes(group) -> None:
    # torch does not check step_sizes; they must at least be a pair of numbers
    low, high = check.pair("step_sizes", group["step_sizes"])
    check.number("step_sizes[0]", low)
    check.number("step_sizes[1]", high)


validate = check.all_of(check.non_negative("lr"), _check_etas, _check_step_sizes, check.flags("maximize"),
                        check.device_flags)


def init_state(param: np.ndarray, group) -> dict:
    return {
        "step": new_step(),
        "prev": np.zeros_like(param),
        "step_size": np.full_like(param, group["lr"]),
    }


@kernels.elementwise_kernel
def _rprop_kernel(param, grad, prev, step_size, maximize, etaminus, etaplus, step_size_min,
                  step_size_max, zero, one):
    for i in prange(param.size):
        g = kernels.signed(grad[i], maximize)
        product = g * prev[i]
        # torch: sign = product.sign() (0 for NaN), then sign -> etaplus / etaminus / 1
        if product > zero:
            factor = etaplus
        elif product < zero:
            factor = etaminus
        else:
            factor = one
        size = step_size[i] * factor
        # torch's clamp_(min, max): NaN stays NaN, max wins when min > max
        if size < step_size_min:
            size = step_size_min
        if size > step_size_max:
            size = step_size_max
        step_size[i] = size
        if factor == etaminus:
            g = zero
        sign_g = zero
        if g > zero:
            sign_g = one
        elif g < zero:
            sign_g = -one
        param[i] = param[i] + -sign_g * size
        prev[i] = g


def update(param, grad, state, group) -> None:
    advance(state["step"])
    etaminus, etaplus = group["etas"]
    step_size_min, step_size_max = group["step_sizes"]
    values = kernels.scalars(param.dtype, etaminus, etaplus, step_size_min, step_size_max, 0, 1)
    _rprop_kernel(kernels.flat(param), kernels.flat(grad), kernels.flat(state["prev"]),
                  kernels.flat(state["step_size"]), bool(group["maximize"]), *values)


RULE = Rule(name="rprop", defaults=RPROP_DEFAULTS, validate=validate, init_state=init_state, update=update)


class Rprop(Optimizer):
    """torch.optim.Rprop: every argument and default of torch 2.13."""

    rule = RULE

    def __init__(self, params, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), *, capturable=False,
                 foreach=None, maximize=False, differentiable=False):
        super().__init__(params, self.rule.stored_defaults(hyperparameters(locals())))
