"""The gradient scale in the tolerances of the loss tests, shared by the torch parity tests
(test_nn_parity.py) and the finite-difference tests (test_nn_gradients.py): a loss
element's gradient is exact only to the rounding of the gradient entering it."""

from __future__ import annotations

import numpy as np

from tests.fixtures.make_nn_fixtures import LossCase, run_ours_loss


def upstream_scale(case: LossCase, arrays: dict, grad_output) -> float:
    """The size of the gradient entering each unreduced loss element."""
    magnitude = float(np.abs(grad_output).max()) if np.size(grad_output) else 0.0
    if case.kwargs.get("reduction", "mean") in ("mean", "batchmean"):
        unreduced = LossCase(case.id, case.loss, {**case.kwargs, "reduction": "none"}, None, case.seed)
        magnitude /= max(np.size(run_ours_loss(unreduced, arrays, None)[0]), 1)
    return magnitude
