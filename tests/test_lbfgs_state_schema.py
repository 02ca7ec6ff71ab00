"""The LBFGS driver's scalar state, declared once (``STATE_FIELDS``): torch's layout and the
sharded checkpoint's record both name exactly the declared fields, every field comes back
from each form, the record holds plain Python values, the check refuses a bad value of every
field, and the layout holds torch's keys, each field typed as torch types it."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from shardstep.workers.optim import LBFGS, Parameter
from shardstep.workers.optim.algorithms.lbfgs import STATE_KEYS, LBFGSDriver, LocalSlices, check_state
from shardstep.workers.optim.algorithms.lbfgs.driver import DTYPE_NUMBER, STATE_FIELDS
from tests.conftest import require_torch

VECTOR_KEYS = ("d", "old_dirs", "old_stps", "prev_flat_grad")
TORCH_FIELDS = [field for field in STATE_FIELDS if field.torch_key is not None]


class Quadratic:
    """0.5 x.Q x - b.x (Q symmetric positive definite) with x split over two Parameters."""

    def __init__(self, dtype=np.float64, seed=0, at_minimum=False):
        rng = np.random.default_rng(seed)
        m = rng.standard_normal((7, 7))
        self.Q = (m @ m.T + 7 * np.eye(7)).astype(dtype)
        self.b = rng.standard_normal(7).astype(dtype)
        x = np.linalg.solve(self.Q, self.b).astype(dtype) if at_minimum else np.zeros(7, dtype)
        self.params = [Parameter(x[:4].reshape(2, 2).copy(), name="w"), Parameter(x[4:].copy(), name="v")]

    def x(self):
        return np.concatenate([p.data.reshape(-1) for p in self.params])

    def gradient_and_loss(self, x):
        g = self.Q @ x - self.b
        return g, float(0.5 * x @ (self.Q @ x) - self.b @ x)

    def closure(self):
        g, loss = self.gradient_and_loss(self.x())
        self.params[0].grad = g[:4].reshape(2, 2).copy()
        self.params[1].grad = g[4:].copy()
        return loss


# (optimizer arguments, steps, dtype, start at the minimum)
CASES = {
    "at the minimum": (dict(), 1, np.float64, True),
    "one iteration": (dict(max_iter=1), 1, np.float64, False),
    "full history": (dict(max_iter=3, history_size=2), 3, np.float64, False),
    "long history": (dict(max_iter=2), 3, np.float64, False),
    "strong wolfe, float32": (dict(max_iter=4, line_search_fn="strong_wolfe", lr=0.5), 2, np.float32, False),
}


def _stepped(case):
    kwargs, steps, dtype, at_minimum = CASES[case]
    problem = Quadratic(dtype, at_minimum=at_minimum)
    optimizer = LBFGS(problem.params, **kwargs)
    for _ in range(steps):
        optimizer.step(problem.closure)
    return problem, optimizer


def _assert_identical(got, expected, where="value"):
    """Equal with the same type at every level (and the same dtype and bits for numpy)."""
    assert type(got) is type(expected), f"{where}: {type(got).__name__} != {type(expected).__name__}"
    if isinstance(expected, list):
        assert len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_identical(g, e, f"{where}[{i}]")
    elif isinstance(expected, dict):
        assert list(got) == list(expected), where
        for key in expected:
            _assert_identical(got[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, (np.ndarray, np.generic)):
        assert got.dtype == expected.dtype and got.shape == expected.shape, where
        assert np.asarray(got).tobytes() == np.asarray(expected).tobytes(), where
    else:
        assert got == expected, where


def test_the_declared_fields_have_distinct_keys_and_cover_torchs_scalars():
    for keys in ([f.attr for f in STATE_FIELDS], [f.record_key for f in STATE_FIELDS],
                 [f.torch_key for f in TORCH_FIELDS]):
        assert len(set(keys)) == len(keys), keys
    assert sorted([f.torch_key for f in TORCH_FIELDS] + list(VECTOR_KEYS)) == sorted(STATE_KEYS)
    driver = LBFGSDriver(LocalSlices([[(Parameter(np.zeros(3)), 0, 3)]], np.dtype(np.float64)))
    assert {f.attr: getattr(driver, f.attr) for f in STATE_FIELDS} == {
        "func_evals": 0, "n_iter": 0, "started": False, "t": None, "ro": [], "h_diag": 1,
        "prev_loss": None, "al": None}


@pytest.mark.parametrize("case", CASES)
def test_both_forms_name_exactly_the_declared_fields(case):
    _, optimizer = _stepped(case)
    driver = optimizer._driver
    record = driver.scalar_state()
    assert list(record) == [f.record_key for f in STATE_FIELDS] + ["history"]
    assert record["history"] == driver.space.history_len()
    expected = {
        "at the minimum": ["func_evals", "n_iter"],
        "one iteration": [k for k in STATE_KEYS if k != "al"],
    }.get(case, list(STATE_KEYS))
    assert list(driver.export_state()) == expected
    assert list(optimizer.state_dict()["state"][0]) == expected


@pytest.mark.parametrize("case", CASES)
def test_every_field_round_trips_through_torchs_layout(case):
    problem, optimizer = _stepped(case)
    saved = copy.deepcopy(optimizer.state_dict())
    twin = Quadratic(CASES[case][2])
    for p, q in zip(twin.params, problem.params):
        p.data[...] = q.data
    loaded = LBFGS(twin.params, **CASES[case][0])
    loaded.load_state_dict(saved)
    for field in STATE_FIELDS:
        _assert_identical(getattr(loaded._driver, field.attr), getattr(optimizer._driver, field.attr), field.attr)
    _assert_identical(loaded._driver.export_state(), optimizer._driver.export_state(), "state")
    optimizer.step(problem.closure)
    loaded.step(twin.closure)
    _assert_identical(twin.x(), problem.x(), "x after a step")


@pytest.mark.parametrize("case", CASES)
def test_every_field_round_trips_through_the_record(case):
    """The record onto a driver whose space already holds the vectors (as the shards' files
    give them back): every field is set from the record alone, to the same value, and the
    next step is the same to the bit."""
    problem, optimizer = _stepped(case)
    original = optimizer._driver
    twin = Quadratic(CASES[case][2])
    for p, q in zip(twin.params, problem.params):
        p.data[...] = q.data
    resumed = LBFGSDriver(LocalSlices([[(p, 0, p.size) for p in twin.params]], twin.params[0].dtype))
    resumed.import_state(original.export_state())
    unset = object()
    for field in STATE_FIELDS:
        setattr(resumed, field.attr, unset)
    resumed.load_scalar_state(copy.deepcopy(original.scalar_state()))
    for field in STATE_FIELDS:
        got, expected = getattr(resumed, field.attr), getattr(original, field.attr)
        if field.is_list and expected is not None:
            assert len(got) == len(expected), field.attr
            pairs = list(zip(got, expected))
        else:
            pairs = [(got, expected)]
        for g, e in pairs:
            assert (g is None) == (e is None) and (e is None or g == e), (field.attr, g, e)
            # the record holds no dtype, so where torch computed a Python number (t = lr)
            # a number of the dtype comes back; every other value keeps its type
            if isinstance(e, np.generic) or field.kind is not DTYPE_NUMBER:
                assert type(g) is type(e), (field.attr, g, e)
    # equal in value: a t that was the Python number lr comes back as a number of the dtype
    assert resumed.scalar_state() == original.scalar_state()
    optimizer.step(problem.closure)
    resumed.step(twin.closure, optimizer.param_groups[0])
    _assert_identical(twin.x(), problem.x(), "x after a step")


@pytest.mark.parametrize("case", CASES)
def test_the_record_holds_plain_python_values(case):
    def leaves(value):
        if isinstance(value, list):
            return [leaf for v in value for leaf in leaves(v)]
        return [value]

    _, optimizer = _stepped(case)
    for key, value in optimizer._driver.scalar_state().items():
        for leaf in leaves(value):
            assert type(leaf) in (int, float, bool, type(None)), (key, type(leaf))


@pytest.mark.parametrize("field", TORCH_FIELDS, ids=lambda field: field.torch_key)
def test_check_state_refuses_a_bad_value_of_every_declared_field(field):
    _, optimizer = _stepped("long history")
    good = optimizer.state_dict()["state"][0]
    assert None in good["al"]  # entries torch has not written yet are accepted
    state = copy.deepcopy(good)
    numel = sum(p.size for p in optimizer.param_groups[0]["params"])
    check_state(state, numel)
    if field.is_list and not field.entries_may_be_none:
        state[field.torch_key] = [None] + state[field.torch_key][1:]
        with pytest.raises(ValueError, match=rf"LBFGS state '{field.torch_key}\[0\]' must be a number; got None"):
            check_state(state, numel)
    if field.is_list:
        state[field.torch_key] = ["x"] + state[field.torch_key][1:]
        where = rf"{field.torch_key}\[0\]"
    else:
        state[field.torch_key] = "x"
        where = field.torch_key
    with pytest.raises(ValueError, match=rf"LBFGS state '{where}' must be an? (int|number); got 'x'"):
        check_state(state, numel)


@pytest.mark.torch_live
@pytest.mark.parametrize("case", CASES)
def test_torchs_layout_follows_torch_key_for_key(case):
    """The same keys (torch's order varies with the step that first wrote al; ours is
    STATE_KEYS'); each declared field a 0-d array where torch holds a 0-d tensor (of the same
    dtype) and a number of the same type where torch holds a number."""
    torch = require_torch()
    kwargs, steps, dtype, at_minimum = CASES[case]
    problem, optimizer = _stepped(case)
    mirror = Quadratic(dtype, at_minimum=at_minimum)
    tp = torch.nn.Parameter(torch.from_numpy(mirror.x()))

    def torch_closure():
        g, loss = mirror.gradient_and_loss(tp.detach().numpy())
        tp.grad = torch.from_numpy(g.copy())
        return loss

    reference = torch.optim.LBFGS([tp], **kwargs)
    for _ in range(steps):
        reference.step(torch_closure)
    expected = reference.state_dict()["state"][0]
    got = optimizer.state_dict()["state"][0]
    assert sorted(got) == sorted(expected)
    for field in TORCH_FIELDS:
        if field.torch_key not in expected:
            continue
        e, g = expected[field.torch_key], got[field.torch_key]
        pairs = list(zip(g, e, strict=True)) if field.is_list else [(g, e)]
        for ours, theirs in pairs:
            if isinstance(theirs, torch.Tensor):
                assert isinstance(ours, np.ndarray) and ours.ndim == theirs.ndim == 0, field.torch_key
                assert ours.dtype == theirs.numpy().dtype, field.torch_key
            else:
                assert type(ours) is type(theirs), (field.torch_key, ours, theirs)
    np.testing.assert_allclose(problem.x(), tp.detach().numpy(), rtol=1e-5 if dtype == np.float32 else 1e-10,
                               atol=1e-6 if dtype == np.float32 else 1e-12)
