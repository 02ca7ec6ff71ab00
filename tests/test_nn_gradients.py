"""Gradients checked without torch: central finite differences in float64 for every smooth
loss and layer case of tests/fixtures/make_nn_fixtures.py, and numerical stability (no
floating-point warnings, finite results) at extreme inputs.

Finite differences: the derivative of ``sum(grad_output * output)`` with respect to each
input element and parameter element, step ``h = 1e-6 * max(1, |x|)``, must match backward to
``1e-6 * (|analytic| + scale)`` where scale is the array's largest magnitude and the gradient
entering each loss element. The central difference's own error is O(h^2) from truncation
plus O(1e-16 |f| / h) from rounding, about 1e-9 here.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from shardstep.workers import nn
from shardstep.workers.optim import RowSparseGrad
from tests.fixtures.make_nn_fixtures import (
    DTYPES,
    LAYER_CASES,
    LOSS_CASES,
    LossCase,
    build_ours,
    call_layer,
    loss_inputs,
    loss_kwargs,
    run_ours_layer,
    run_ours_loss,
)
from tests.parity.nn_scales import upstream_scale

FD_RTOL = 1e-6
SMOOTH_LOSSES = [pytest.param(c, id=c.id) for c in LOSS_CASES if c.smooth]
SMOOTH_LAYERS = [pytest.param(c, id=c.id) for c in LAYER_CASES if c.smooth]


def central_differences(objective, x: np.ndarray) -> np.ndarray:
    """d objective / d x, with x perturbed in place and restored."""
    flat = x.reshape(-1)
    grad = np.zeros(x.size)
    for i in range(x.size):
        original = flat[i]
        step = 1e-6 * max(1.0, abs(original))
        flat[i] = original + step
        up = objective()
        flat[i] = original - step
        down = objective()
        flat[i] = original
        grad[i] = (up - down) / (2 * step)
    return grad.reshape(x.shape)


def assert_close_to_differences(analytic, numeric, what: str, scale: float = 0.0) -> None:
    analytic = np.asarray(analytic, dtype=np.float64)
    assert analytic.shape == numeric.shape, what
    bound = FD_RTOL * (np.abs(analytic) + max(float(np.abs(analytic).max(initial=0.0)), scale))
    error = np.abs(analytic - numeric)
    worst = int(np.argmax(error - bound)) if error.size else 0
    assert np.all(error <= bound), (f"{what}: backward {analytic.reshape(-1)[worst]!r} vs finite differences "
                                    f"{numeric.reshape(-1)[worst]!r} at element {worst}")


@pytest.mark.parametrize("case", SMOOTH_LOSSES)
def test_loss_gradient_matches_finite_differences(case):
    arrays = {k: v.copy() for k, v in case.arrays("float64").items()}
    _, grads, grad_output = run_ours_loss(case, arrays)
    criterion = getattr(nn, case.loss)(**loss_kwargs(case, arrays))
    inputs = loss_inputs(case, arrays)
    args = [*inputs, arrays["target"]] if "target" in arrays else inputs

    def objective():
        return float(np.sum(np.asarray(criterion(*args)) * grad_output))

    scale = upstream_scale(case, arrays, grad_output)
    for k, x in enumerate(inputs):
        assert_close_to_differences(grads[k], central_differences(objective, x), f"{case.id} input{k}", scale)


@pytest.mark.parametrize("case", SMOOTH_LAYERS)
def test_layer_gradient_matches_finite_differences(case):
    x = case.input("float64").copy()
    _, d_input, grads, grad_output, model, _ = run_ours_layer(case, "float64", x)
    probe = build_ours(case, "float64")
    probe.load_state_dict(model.state_dict())
    params = dict(probe.named_parameters())

    def objective():
        return float(np.sum(call_layer(case, probe, x) * grad_output))

    if np.issubdtype(x.dtype, np.floating):
        assert_close_to_differences(d_input, central_differences(objective, x), f"{case.id} input")
    for name, param in params.items():
        numeric = central_differences(objective, param.data)
        module = probe[int(name.split(".")[0])] if case.sequential else probe
        padding_idx = getattr(module, "padding_idx", None)
        if padding_idx is not None:
            # by definition (torch's), the padding row gets no gradient though the output uses it
            assert np.all(grads[name][padding_idx] == 0)
            numeric[padding_idx] = 0
        assert_close_to_differences(grads[name], numeric, f"{case.id} {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in LOSS_CASES if "NaN" not in c.id])
def test_loss_raises_no_floating_point_warning(case, dtype):
    """Every case without NaN inputs (extreme logits, probabilities 0 and 1, zero vectors
    included) runs with numpy's overflow/invalid/divide warnings turned into errors (underflow
    to 0, as exp(-1e4), is the right answer and stays silent)."""
    arrays = case.arrays(dtype)
    with warnings.catch_warnings(), np.errstate(all="raise", under="ignore"):
        warnings.simplefilter("error")
        value, grads, _ = run_ours_loss(case, arrays)
    if "target ignored" in case.id and case.kwargs["reduction"] == "mean":
        assert np.isnan(value)   # 0 / 0, as torch
    else:
        assert np.all(np.isfinite(value)), case.id
    for grad in grads:
        assert np.all(np.isfinite(grad)), case.id


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in LAYER_CASES if "NaN" not in c.id])
def test_layer_raises_no_floating_point_warning(case, dtype):
    x = case.input(dtype)
    with warnings.catch_warnings(), np.errstate(all="raise", under="ignore"):
        warnings.simplefilter("error")
        output, d_input, grads, _, _, _ = run_ours_layer(case, dtype, x)
    assert np.all(np.isfinite(output))
    assert d_input is None or np.all(np.isfinite(d_input))
    assert all(np.all(np.isfinite(g)) for g in grads.values())


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_at_extreme_logits_is_exact(dtype):
    """At logits +-1e4 the softmax is exactly one-hot: the loss is 0 for the winning class and
    2e4 for a class 2e4 below, and the gradient is softmax - onehot (0 or +-1)."""
    logits = np.array([[1e4, -1e4], [1e4, -1e4]], dtype)
    criterion = nn.CrossEntropyLoss(reduction="none")
    losses = criterion(logits, np.array([0, 1]))
    np.testing.assert_array_equal(losses, np.array([0.0, 2e4], dtype))
    np.testing.assert_array_equal(criterion.backward(np.ones(2, dtype)), np.array([[0, 0], [1, -1]], dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_bce_clamps_log_at_minus_100(dtype):
    criterion = nn.BCELoss(reduction="none")
    losses = criterion(np.array([0.0, 1.0, 0.0, 1.0], dtype), np.array([1.0, 0.0, 0.0, 1.0], dtype))
    np.testing.assert_array_equal(losses, np.array([100.0, 100.0, 0.0, 0.0], dtype))
    grad = criterion.backward(np.ones(4, dtype))
    # torch's gradient: (x - y) / max(x (1 - x), 1e-12)
    np.testing.assert_allclose(grad, np.array([-1e12, 1e12, 0.0, 0.0]), rtol=1e-6)


def test_sparse_embedding_gradient_lists_every_lookup():
    layer = nn.Embedding(5, 2, padding_idx=0, sparse=True, rng=0)
    layer(np.array([[3, 0, 3], [1, 4, 0]]))
    layer.backward(np.arange(12, dtype=np.float32).reshape(2, 3, 2))
    grad = layer.weight.grad
    assert isinstance(grad, RowSparseGrad)
    np.testing.assert_array_equal(grad.indices, [3, 3, 1, 4])      # padding row 0 dropped, repeats kept
    np.testing.assert_array_equal(grad.values, [[0, 1], [4, 5], [6, 7], [8, 9]])
    dense = nn.Embedding(5, 2, padding_idx=0, rng=0)
    dense(np.array([[3, 0, 3], [1, 4, 0]]))
    dense.backward(np.arange(12, dtype=np.float32).reshape(2, 3, 2))
    np.testing.assert_array_equal(dense.weight.grad, grad.to_dense())
    np.testing.assert_array_equal(dense.weight.grad[0], [0, 0])


def test_finite_differences_catch_a_wrong_gradient():
    """The check itself can fail: a gradient off by 1e-4 relative is rejected."""
    case = next(c for c in LOSS_CASES if c.loss == "MSELoss" and c.smooth)
    arrays = case.arrays("float64")
    _, grads, grad_output = run_ours_loss(case, arrays)
    criterion = nn.MSELoss(**case.kwargs)
    x = arrays["input0"].copy()
    numeric = central_differences(lambda: float(np.sum(np.asarray(criterion(x, arrays["target"])) * grad_output)), x)
    assert_close_to_differences(grads[0], numeric, "exact")
    with pytest.raises(AssertionError):
        assert_close_to_differences(grads[0] * (1 + 1e-4), numeric, "perturbed")


# layers of shardstep.workers.nn without a case of their own in LAYER_CASES, and why
NOT_LAYER_CASES = {
    "Sequential": "the container: cases with several modules run in one (LayerCase.sequential)",
    "Dropout": "random masks; compared with torch in tests/test_nn_modules.py",
}


def _registry_classes(base: type) -> set[str]:
    """The classes shardstep.workers.nn exports (its __all__) that derive from ``base``."""
    exported = {name: getattr(nn, name) for name in nn.__all__}
    return {name for name, value in exported.items()
            if isinstance(value, type) and issubclass(value, base) and value not in (nn.Module, nn.Loss)}


def test_loss_case_ids_cover_every_loss():
    """LOSS_CASES and LAYER_CASES (tests/fixtures/make_nn_fixtures.py) are written by hand;
    every loss and layer shardstep.workers.nn exports needs cases there, or the parity and
    gradient tests leave it out."""
    registry_losses = _registry_classes(nn.Loss)
    registry_layers = _registry_classes(nn.Module) - registry_losses
    # the registry as it stood when this was written: an export dropped by mistake shows here
    assert registry_losses >= {"CrossEntropyLoss", "NLLLoss", "TripletMarginLoss", "MSELoss", "L1Loss", "SmoothL1Loss",
                               "HuberLoss", "BCELoss", "BCEWithLogitsLoss", "KLDivLoss", "MarginRankingLoss",
                               "CosineEmbeddingLoss"}
    assert registry_layers >= {"Linear", "Embedding", "ReLU", "Tanh", "GELU", "LogSoftmax", "Softmax", "Conv2d",
                               "MaxPool2d", "AvgPool2d", "Flatten", "LayerNorm", "MultiheadAttention",
                               "TransformerEncoderLayer", "TransformerEncoder", "PositionalEmbedding",
                               "SinusoidalPositionalEncoding", "Residual", "Conv1d", "AdaptiveAvgPool2d",
                               "AdaptiveAvgPool1d", "BatchNorm1d", "BatchNorm2d", *NOT_LAYER_CASES}
    losses = {c.loss for c in LOSS_CASES}
    assert losses == registry_losses, (
        f"tests/fixtures/make_nn_fixtures.py LOSS_CASES: add cases for {sorted(registry_losses - losses)} (then "
        f"python -m tests.fixtures.make_nn_fixtures); not losses of shardstep.workers.nn: {sorted(losses - registry_losses)}")
    layers = {name for c in LAYER_CASES for name, _ in c.modules}
    expected = registry_layers - set(NOT_LAYER_CASES)
    assert layers == expected, (
        f"tests/fixtures/make_nn_fixtures.py LAYER_CASES: add cases for {sorted(expected - layers)} (then "
        f"python -m tests.fixtures.make_nn_fixtures), or say in NOT_LAYER_CASES why not; not layers of "
        f"shardstep.workers.nn (or listed in NOT_LAYER_CASES): {sorted(layers - expected)}")
    assert isinstance(LOSS_CASES[0], LossCase)
