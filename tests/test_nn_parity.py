"""Every loss and layer against torch: values and gradients of each case of
tests/fixtures/make_nn_fixtures.py in float32 and float64,

- against the committed torch results (always: no torch needed),
- against torch run live in this process (when torch is installed), including randomized
  shapes and options drawn by hypothesis for CrossEntropyLoss and TripletMarginLoss.

Agreement: ``|ours - torch| <= rtol * (|torch| + scale)`` elementwise, with rtol 1e-8
(float64) and 1e-5 (float32), where ``scale`` is the array's largest magnitude and, for a
loss's gradients, also the gradient entering each loss element (``|grad_output|``, divided by
the number of elements for 'mean'). An element that is a difference of nearly equal terms (a
softmax probability minus 1, an anchor pulled equally both ways, the gradient of a 1-D
cosine, GELU far in its left tail) is exact only to the rounding of those terms, whose size
is that scale; no implementation other than a bit-identical one meets a purely elementwise
bound there. NaN and infinities must sit at the same places.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import require_torch
from tests.fixtures.make_nn_fixtures import (
    DTYPES,
    LAYER_CASES,
    LOSS_CASES,
    PATH,
    LossCase,
    build_ours,
    load,
    run_ours_layer,
    run_ours_loss,
    run_torch_layer,
    run_torch_loss,
)
from tests.parity.nn_scales import upstream_scale

RTOL = {"float32": 1e-5, "float64": 1e-8}
LOSS_MATRIX = [pytest.param(case, dtype, id=f"{case.id}-{dtype}") for case in LOSS_CASES for dtype in DTYPES]
LAYER_MATRIX = [pytest.param(case, dtype, id=f"{case.id}-{dtype}") for case in LAYER_CASES for dtype in DTYPES]


def assert_matches(ours, reference, dtype: str, what: str, scale: float = 0.0) -> None:
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape, f"{what}: shape {ours.shape} != torch's {reference.shape}"
    assert np.array_equal(np.isnan(ours), np.isnan(reference)), f"{what}: NaN at other places than torch:\n{ours}\n{reference}"
    assert np.array_equal(np.isinf(ours), np.isinf(reference)), f"{what}: infinities differ from torch:\n{ours}\n{reference}"
    finite = np.isfinite(reference)
    ours, reference = ours[finite], reference[finite]
    if reference.size == 0:
        return
    scale = max(float(np.abs(reference).max()), scale)
    tolerance = RTOL[dtype] * (np.abs(reference) + scale)
    error = np.abs(ours.astype(np.float64) - reference.astype(np.float64))
    worst = int(np.argmax(error - tolerance))
    assert np.all(error <= tolerance), (
        f"{what}: max excess at element {worst}: ours {ours[worst]!r}, torch {reference[worst]!r} "
        f"(rtol {RTOL[dtype]}, array scale {scale:.3g})")


@pytest.fixture(scope="module")
def reference():
    assert PATH.exists(), f"{PATH} is missing: run python -m tests.fixtures.make_nn_fixtures"
    return load()


def _stored(reference: dict, prefix: str) -> dict[str, np.ndarray]:
    found = {key[len(prefix):]: value for key, value in reference.items() if key.startswith(prefix)}
    assert found, f"no fixture for {prefix!r}: run python -m tests.fixtures.make_nn_fixtures"
    return found


def _check_loss(case: LossCase, dtype: str, arrays, grad_output, value, grads, ref_value, ref_grads) -> None:
    assert_matches(value, ref_value, dtype, f"{case.id} value")
    assert len(grads) == len(ref_grads) == case.n_inputs
    scale = upstream_scale(case, arrays, grad_output)
    for k, (grad, ref) in enumerate(zip(grads, ref_grads)):
        assert grad.dtype == np.dtype(dtype), f"{case.id} grad{k} dtype {grad.dtype}"
        assert_matches(grad, ref, dtype, f"{case.id} grad{k}", scale)


@pytest.mark.parametrize("case,dtype", LOSS_MATRIX)
def test_loss_matches_committed_torch_results(case, dtype, reference):
    stored = _stored(reference, f"loss|{case.id}|{dtype}|")
    arrays = {k: v for k, v in stored.items() if k.startswith("input") or k in ("target", "weight", "pos_weight")}
    value, grads, _ = run_ours_loss(case, arrays, stored["grad_output"])
    ref_grads = [stored[f"grad{k}"] for k in range(case.n_inputs)]
    _check_loss(case, dtype, arrays, stored["grad_output"], value, grads, stored["value"], ref_grads)


@pytest.mark.torch_live
@pytest.mark.parametrize("case,dtype", LOSS_MATRIX)
def test_loss_matches_live_torch(case, dtype):
    require_torch()
    arrays = case.arrays(dtype)
    value, grads, grad_output = run_ours_loss(case, arrays)
    ref_value, ref_grads, _ = run_torch_loss(case, arrays, grad_output)
    _check_loss(case, dtype, arrays, grad_output, value, grads, ref_value, ref_grads)


def _check_layer(case, dtype, ours, theirs) -> None:
    output, d_input, grads, buffers = ours
    ref_output, ref_d_input, ref_grads, ref_buffers = theirs
    assert output.dtype == np.dtype(dtype)
    assert_matches(output, ref_output, dtype, f"{case.id} output")
    if ref_d_input is None:
        assert d_input is None
    else:
        assert d_input.dtype == np.dtype(dtype)
        assert_matches(d_input, ref_d_input, dtype, f"{case.id} d_input")
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_matches(grads[name], ref_grads[name], dtype, f"{case.id} grad of {name}")
    # buffers after the forward (BatchNorm's running statistics and its count of batches)
    assert buffers.keys() == ref_buffers.keys(), f"{case.id} buffers {list(buffers)} != torch's {list(ref_buffers)}"
    for name, buffer in buffers.items():
        reference = np.asarray(ref_buffers[name])
        assert buffer.dtype == reference.dtype, f"{case.id} buffer {name}: dtype {buffer.dtype} != {reference.dtype}"
        if np.issubdtype(reference.dtype, np.integer):
            assert np.array_equal(buffer, reference), f"{case.id} buffer {name}: {buffer} != torch's {reference}"
        else:
            assert_matches(buffer, reference, dtype, f"{case.id} buffer {name}")


@pytest.mark.parametrize("case,dtype", LAYER_MATRIX)
def test_layer_matches_committed_torch_results(case, dtype, reference):
    stored = _stored(reference, f"layer|{case.id}|{dtype}|")
    params = {k[len("param|"):]: v for k, v in stored.items() if k.startswith("param|")}
    ref_grads = {k[len("grad|"):]: v for k, v in stored.items() if k.startswith("grad|")}
    ref_buffers = {k[len("buffer|"):]: v for k, v in stored.items() if k.startswith("buffer|")}
    output, d_input, grads, _, _, buffers = run_ours_layer(case, dtype, stored["input"], params,
                                                           stored["grad_output"])
    _check_layer(case, dtype, (output, d_input, grads, buffers),
                 (stored["output"], stored.get("d_input"), ref_grads, ref_buffers))


@pytest.mark.torch_live
@pytest.mark.parametrize("case,dtype", LAYER_MATRIX)
def test_layer_matches_live_torch(case, dtype):
    require_torch()
    x = case.input(dtype)
    initial = build_ours(case, dtype).state_dict()   # before the forward moves any running statistics
    output, d_input, grads, grad_output, _, buffers = run_ours_layer(case, dtype, x, initial)
    ref_output, ref_d_input, ref_grads, _, ref_buffers = run_torch_layer(case, dtype, x, initial, grad_output)
    _check_layer(case, dtype, (output, d_input, grads, buffers), (ref_output, ref_d_input, ref_grads, ref_buffers))


# -- randomized shapes and options, live ------------------------------------------------------------

@st.composite
def cross_entropy_problems(draw):
    layout = draw(st.sampled_from(["C", "NC", "NCd", "NCdd"]))
    n, c = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    extra = tuple(draw(st.lists(st.integers(1, 3), min_size=layout.count("d"), max_size=layout.count("d"))))
    shape = (c,) if layout == "C" else (n, c, *extra)
    kwargs = {"reduction": draw(st.sampled_from(["mean", "sum", "none"])),
              "label_smoothing": draw(st.sampled_from([0.0, 0.05, 0.3, 1.0]))}
    probabilities = draw(st.booleans())
    if not probabilities and draw(st.booleans()):
        kwargs["ignore_index"] = draw(st.integers(-3, c))
    weighted = draw(st.booleans())
    scale = draw(st.sampled_from([1.0, 30.0, 1e4]))
    return shape, kwargs, probabilities, weighted, scale, draw(st.integers(0, 2**31))


@pytest.mark.torch_live
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=cross_entropy_problems())
def test_cross_entropy_randomized_against_live_torch(problem, dtype):
    require_torch()
    shape, kwargs, probabilities, weighted, scale, seed = problem
    rng = np.random.default_rng(seed)
    classes = shape[0] if len(shape) == 1 else shape[1]
    arrays = {"input0": (rng.standard_normal(shape) * scale).astype(dtype)}
    if probabilities:
        arrays["target"] = rng.dirichlet(np.ones(classes), size=shape[:1] + shape[2:] if len(shape) > 1 else None)
        if len(shape) > 1:
            arrays["target"] = np.moveaxis(arrays["target"], -1, 1)
        arrays["target"] = arrays["target"].astype(dtype)
    else:
        batch = () if len(shape) == 1 else (shape[0], *shape[2:])
        arrays["target"] = rng.integers(0, classes, batch).astype(np.int64)
        if "ignore_index" in kwargs and arrays["target"].ndim:
            arrays["target"][rng.random(batch) < 0.3] = kwargs["ignore_index"]
            out_of_range = (arrays["target"] < 0) | (arrays["target"] >= classes)
            arrays["target"][out_of_range & (arrays["target"] != kwargs["ignore_index"])] = 0
    if weighted:
        arrays["weight"] = rng.uniform(0.1, 3.0, classes).astype(dtype)
    case = LossCase("CrossEntropyLoss[hypothesis]", "CrossEntropyLoss", kwargs, None, seed)
    value, grads, grad_output = run_ours_loss(case, arrays)
    ref_value, ref_grads, _ = run_torch_loss(case, arrays, grad_output)
    _check_loss(case, dtype, arrays, grad_output, value, grads, ref_value, ref_grads)


@pytest.mark.torch_live
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 8), d=st.integers(1, 8), batched=st.booleans(),
       margin=st.floats(0.01, 5.0), p=st.sampled_from([0.5, 1.0, 1.5, 2.0, 3.0, 4.5, float("inf")]),
       eps=st.sampled_from([0.0, 1e-6, 1e-2]), swap=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), seed=st.integers(0, 2**31))
def test_triplet_randomized_against_live_torch(n, d, batched, margin, p, eps, swap, reduction, seed, dtype):
    require_torch()
    rng = np.random.default_rng(seed)
    shape = (n, d) if batched else (d,)
    arrays = {f"input{k}": rng.standard_normal(shape).astype(dtype) for k in range(3)}
    kwargs = {"margin": margin, "p": p, "eps": eps, "swap": swap, "reduction": reduction}
    case = LossCase("TripletMarginLoss[hypothesis]", "TripletMarginLoss", kwargs, None, seed)
    value, grads, grad_output = run_ours_loss(case, arrays)
    ref_value, ref_grads, _ = run_torch_loss(case, arrays, grad_output)
    _check_loss(case, dtype, arrays, grad_output, value, grads, ref_value, ref_grads)
