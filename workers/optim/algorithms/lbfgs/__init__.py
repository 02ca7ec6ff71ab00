"""L-BFGS (Liu & Nocedal 1989) with torch.optim.LBFGS's step loop and strong-Wolfe line search,
in vector-free form (Chen, Wang & Zhou 2014, "Large-scale L-BFGS using MapReduce", NeurIPS).

One ``step(closure)`` runs up to ``max_iter`` iterations of::

    d = -H g                      H: the L-BFGS inverse-Hessian estimate from the pairs
                                  s_i = t_i d_i (steps) and y_i = g_{i+1} - g_i (gradient changes)
    t = min(1, 1/|g|_1) lr on the very first iteration, lr afterwards (or the strong-Wolfe t)
    x = x + t d

with torch 2.13's termination tests (|g|_inf <= tolerance_grad, g.d > -tolerance_change,
|t d|_inf <= tolerance_change, |f - f_prev| < tolerance_change, max_iter, max_eval).

Vector-free two-loop recursion. Torch computes ``H g`` with the two-loop recursion (Nocedal &
Wright, Algorithm 7.4), which needs 2m dot products one after another, each on a vector the
previous one changed. Every vector that recursion ever forms is a linear combination of the
basis ``b = [s_0..s_{m-1}, y_0..y_{m-1}, g]``, so it can run on coefficient vectors ``c``
(length 2m+1, ``q = sum_j c_j b_j``) given the Gram matrix ``G[i, j] = b_i . b_j``::

    c = -e_g                                   (q = -g)
    for i = m-1 .. 0:   al_i = ro_i (G[s_i] . c);   c[y_i] -= al_i
    c = H_diag c                               (H_diag = s.y / y.y of the newest pair)
    for i = 0 .. m-1:   be_i = ro_i (G[y_i] . c);   c[s_i] += al_i - be_i
    d = sum_j c_j b_j,   g.d = G[g] . c,   ro_i = 1 / (s_i . y_i)

Only G's entries with the newest vectors change per iteration: the dot products of the new s,
the new y and the current g with every basis vector, ONE batched reduction of 3 x (2m+3)
partial dot products; the older entries are kept (and shifted when the oldest pair drops out).
Each dot product and |x|_1 is a sum over elements and |x|_inf a max, so a vector split into
slices (the shards of a sharded run) reduces to per-slice partials that a coordinator adds (or
maxes); ``d`` is formed slice by slice from the 2m+1 coefficients.

Layout: :class:`LBFGSDriver` holds the scalar logic (the step loop, the termination tests, the
strong-Wolfe line search, the recursion on coefficients) and never touches a vector; a
:class:`VectorSpace` owns the vectors (parameters, gradient, direction, history) and offers the
slice-local operations. :class:`LocalSlices` is that space over one or more slices in this
process; the :class:`LBFGS` facade uses one slice, the concatenation of all parameters.

Arithmetic: vectors stay in the parameter dtype; dot products accumulate in float64 and the
recursion on coefficients runs in float64. Scalars follow torch's types: where torch holds a
0-d tensor (g.d, ro, H_diag, |g|_1, a line-search t) we hold a numpy scalar of the parameter
dtype, where torch holds a Python number (the loss, lr) we hold one, so float32 line-search
arithmetic and comparisons round as torch's do (numpy 2 scalars promote like torch tensors).

Modules: :mod:`.hyperparameters` (defaults, checks, ``RULE``), :mod:`.kernels` (the numba
kernels, the recursion on coefficients, the partials' combination), :mod:`.vectors`
(``VectorSpace``, ``LocalSlices``), :mod:`.driver` (``LBFGSDriver``, the state's layout and
check) and :mod:`.facade` (the torch-style ``LBFGS``).
"""

from __future__ import annotations

from shardstep.workers.optim.algorithms.lbfgs.driver import STATE_KEYS, LBFGSDriver, check_state
from shardstep.workers.optim.algorithms.lbfgs.facade import LBFGS
from shardstep.workers.optim.algorithms.lbfgs.hyperparameters import (
    LBFGS_DEFAULTS,
    LINE_SEARCH_FNS,
    RULE,
    init_state,
    validate,
)
from shardstep.workers.optim.algorithms.lbfgs.kernels import combine_max, combine_sum, two_loop_coefficients
from shardstep.workers.optim.algorithms.lbfgs.vectors import LocalSlices, Name, VectorSpace

__all__ = [
    "LBFGS",
    "LBFGSDriver",
    "LBFGS_DEFAULTS",
    "LINE_SEARCH_FNS",
    "RULE",
    "STATE_KEYS",
    "LocalSlices",
    "Name",
    "VectorSpace",
    "check_state",
    "combine_max",
    "combine_sum",
    "init_state",
    "two_loop_coefficients",
    "validate",
]
