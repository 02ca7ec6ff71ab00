"""LBFGS beyond the parity matrix: convergence, the vector-free (Gram matrix) direction against
the textbook two-loop recursion, the slice-local interface over several slices, and errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from shardstep.workers.optim import LBFGS, Parameter, RowSparseGrad
from shardstep.workers.optim.algorithms.lbfgs import (
    LBFGS_DEFAULTS,
    LBFGSDriver,
    LocalSlices,
    VectorSpace,
    combine_sum,
    two_loop_coefficients,
)
from tests.conftest import require_torch

F64 = np.float64


# ---------------------------------------------------------------------------------------
# problems


class LeastSquares:
    """0.5 ||A x - b||^2 with x split over two Parameters (a 2x4 matrix and a 2-vector)."""

    def __init__(self, seed=0, dtype=F64):
        rng = np.random.default_rng(seed)
        self.A = rng.standard_normal((50, 10)).astype(dtype)
        self.b = rng.standard_normal(50).astype(dtype)
        self.params = [Parameter(np.zeros((2, 4), dtype), name="w"), Parameter(np.zeros(2, dtype), name="v")]

    def x(self):
        return np.concatenate([p.data.reshape(-1) for p in self.params])

    def closure(self):
        r = self.A @ self.x() - self.b
        g = self.A.T @ r
        self.params[0].grad = g[:8].reshape(2, 4).copy()
        self.params[1].grad = g[8:].copy()
        return 0.5 * float(r @ r)


class SmoothNonConvex:
    """sum log(1 + (C x - e)^2) + 0.05 |x|^2 + 0.01 sum x^4 over one Parameter of 23 elements."""

    def __init__(self, seed=3, n=23):
        rng = np.random.default_rng(seed)
        self.C = rng.standard_normal((30, n))
        self.e = rng.standard_normal(30)
        self.param = Parameter(0.5 * rng.standard_normal(n), name="x")

    def closure(self):
        x = self.param.data
        r = self.C @ x - self.e
        loss = np.sum(np.log1p(r * r)) + 0.05 * x @ x + 0.01 * np.sum(x**4)
        self.param.grad = self.C.T @ (2 * r / (1 + r * r)) + 0.1 * x + 0.04 * x**3
        return float(loss)


def _group(**kwargs):
    group = dict(LBFGS_DEFAULTS)
    group.update(kwargs)
    group["max_eval"] = kwargs.get("max_eval", group["max_iter"] * 5 // 4)
    return group


# ---------------------------------------------------------------------------------------
# convergence


def test_converges_to_the_least_squares_solution_with_strong_wolfe():
    problem = LeastSquares()
    optimizer = LBFGS(problem.params, max_iter=50, history_size=10, tolerance_grad=1e-12,
                      tolerance_change=1e-15, line_search_fn="strong_wolfe")
    for _ in range(5):
        optimizer.step(problem.closure)
    expected = np.linalg.lstsq(problem.A, problem.b, rcond=None)[0]
    got = problem.x()
    assert np.linalg.norm(got - expected) <= 1e-6 * np.linalg.norm(expected)


def test_converges_without_line_search_too():
    problem = LeastSquares(seed=1)
    optimizer = LBFGS(problem.params, lr=1, max_iter=100, tolerance_grad=1e-10, tolerance_change=1e-14)
    for _ in range(10):
        optimizer.step(problem.closure)
    expected = np.linalg.lstsq(problem.A, problem.b, rcond=None)[0]
    assert np.linalg.norm(problem.x() - expected) <= 1e-6 * np.linalg.norm(expected)


# ---------------------------------------------------------------------------------------
# the direction: Gram matrix recursion == textbook two-loop recursion


def _textbook_direction(S, Y, g, h0):
    """Nocedal & Wright, Numerical Optimization (2nd ed.), Algorithm 7.4: r = H g; the search
    direction is -r. S, Y: lists of s_i, y_i, oldest first; h0: the initial H_k^0 = h0 I."""
    q = g.copy()
    rho = [1.0 / (y @ s) for s, y in zip(S, Y)]
    alpha = [0.0] * len(S)
    for i in reversed(range(len(S))):
        alpha[i] = rho[i] * (S[i] @ q)
        q = q - alpha[i] * Y[i]
    r = h0 * q
    for i in range(len(S)):
        beta = rho[i] * (Y[i] @ r)
        r = r + S[i] * (alpha[i] - beta)
    return -r


def _random_history(rng, n, m):
    Q = rng.standard_normal((n, n))
    A = Q @ Q.T / n + np.eye(n)  # SPD, so s.y > 0
    S = [rng.standard_normal(n) for _ in range(m)]
    Y = [A @ s + 0.01 * rng.standard_normal(n) for s in S]
    return S, Y, rng.standard_normal(n)


@pytest.mark.parametrize("m", [0, 1, 2, 7])
def test_gram_direction_equals_textbook_two_loop(m):
    rng = np.random.default_rng(m)
    n = 40
    S, Y, g = _random_history(rng, n, m)
    space = LocalSlices([[(Parameter(np.zeros(n)), 0, n)]], F64)
    for s, y in zip(S, Y):
        space.load("s", s)
        space.load("y", y)
        space.push_history("s", "y")
    space.load("g", g)
    basis = [("s", i) for i in range(m)] + [("y", i) for i in range(m)] + ["g"]
    gram = combine_sum(space.partial_gram(basis, basis))
    ro = [1.0 / (s @ y) for s, y in zip(S, Y)]
    h0 = (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1]) if m else 1.0
    c, _, gtd = two_loop_coefficients(gram, ro, h0)
    space.combine("d", basis, c)
    d = space.export("d")

    expected = _textbook_direction(S, Y, g, h0)
    assert np.linalg.norm(d - expected) <= 1e-12 * np.linalg.norm(expected)
    assert gtd == pytest.approx(g @ expected, rel=1e-12)


def test_incrementally_kept_gram_matrix_gives_the_textbook_direction():
    """After steps with history drops (history_size=3), the direction in the state is the
    textbook two-loop direction of the state's own history and gradient."""
    problem = SmoothNonConvex()
    optimizer = LBFGS([problem.param], max_iter=4, history_size=3)
    for _ in range(4):
        optimizer.step(problem.closure)
        state = optimizer.state_dict()["state"][0]
        S, Y = state["old_stps"], state["old_dirs"]
        h0 = float(state["H_diag"])
        expected = _textbook_direction(S, Y, state["prev_flat_grad"], h0)
        assert np.linalg.norm(state["d"] - expected) <= 1e-12 * np.linalg.norm(expected)
    assert len(S) == 3 and state["n_iter"] == 16


# ---------------------------------------------------------------------------------------
# sharding: the same run over several slices


class NumpyPieces(VectorSpace):
    """A plain-numpy VectorSpace over one Parameter cut into pieces: the driver sees partials
    per piece, as a coordinator sees one per shard."""

    def __init__(self, param, cuts):
        self.param, self.dtype = param, param.dtype
        self.bounds = list(zip([0, *cuts], [*cuts, param.size]))
        self.vectors, self.hist_s, self.hist_y = {}, [], []
        self.temps, self.count = set(), 0
        self.partial_calls = []

    def _get(self, name):
        if isinstance(name, tuple):
            return (self.hist_s if name[0] == "s" else self.hist_y)[name[1]]
        return self.vectors[name]

    def _params(self):
        flat = self.param.data.reshape(-1)
        return [flat[lo:hi] for lo, hi in self.bounds]

    def history_len(self):
        return len(self.hist_s)

    def push_history(self, s, y):
        self.hist_s.append(self.vectors.pop(s))
        self.hist_y.append(self.vectors.pop(y))

    def pop_history(self):
        self.hist_s.pop(0)
        self.hist_y.pop(0)

    def clear_history(self):
        self.hist_s.clear()
        self.hist_y.clear()

    def new_temp(self):
        self.count += 1
        name = f"t{self.count}"
        self.vectors[name] = None
        self.temps.add(name)
        return name

    def release_temps(self, keep=()):
        for name in self.temps - set(keep):
            self.vectors.pop(name, None)
        self.temps &= set(keep)

    def snapshot_params(self, dst):
        self.vectors[dst] = [x.copy() for x in self._params()]

    def write_params(self, src):
        for x, v in zip(self._params(), self._get(src)):
            x[...] = v

    def set_params_from(self, x0, t, d):
        t = self.dtype.type(t)
        for x, a, b in zip(self._params(), self._get(x0), self._get(d)):
            x[...] = a + t * b

    def add_to_params(self, t, d):
        t = self.dtype.type(t)
        for x, b in zip(self._params(), self._get(d)):
            x += t * b

    def gather_grad(self, dst):
        g = self.param.grad.reshape(-1)
        self.vectors[dst] = [g[lo:hi].copy() for lo, hi in self.bounds]

    def copy(self, dst, src):
        self.vectors[dst] = [v.copy() for v in self._get(src)]

    def move(self, dst, src):
        if dst != src:
            self.vectors[dst] = self.vectors.pop(src)
            self.temps.discard(src)

    def sub(self, dst, a, b):
        self.vectors[dst] = [x - y for x, y in zip(self._get(a), self._get(b))]

    def scale(self, dst, src, alpha):
        alpha = self.dtype.type(alpha)
        self.vectors[dst] = [alpha * v for v in self._get(src)]

    def combine(self, dst, names, coeffs):
        pieces = []
        for k in range(len(self.bounds)):
            acc = sum(c * self._get(n)[k].astype(F64) for n, c in zip(names, coeffs))
            pieces.append(acc.astype(self.dtype))
        self.vectors[dst] = pieces

    def partial_gram(self, rows, cols):
        self.partial_calls.append((len(rows), len(cols)))
        return [np.array([[self._get(r)[k].astype(F64) @ self._get(c)[k].astype(F64) for c in cols]
                          for r in rows]) for k in range(len(self.bounds))]

    def partial_abs_max(self, name):
        return [np.abs(v).max() for v in self._get(name)]

    def partial_abs_sum(self, name):
        return [np.abs(v.astype(F64)).sum() for v in self._get(name)]

    def export(self, name):
        return np.concatenate(self._get(name))

    def load(self, name, value):
        self.vectors[name] = [np.array(value[lo:hi], dtype=self.dtype) for lo, hi in self.bounds]


@pytest.mark.parametrize("kwargs", [
    dict(max_iter=6, line_search_fn="strong_wolfe"),
    dict(max_iter=5, history_size=2),
    dict(lr=0.5, max_iter=4, history_size=3, line_search_fn="strong_wolfe"),
])
def test_three_slices_give_the_single_slice_result(kwargs):
    """The driver over 3 pieces (partials combined) follows the facade's one-slice run."""
    single, sliced, local3 = SmoothNonConvex(), SmoothNonConvex(), SmoothNonConvex()
    optimizer = LBFGS([single.param], **kwargs)
    group = _group(**kwargs)
    pieces = NumpyPieces(sliced.param, cuts=[7, 15])
    driver = LBFGSDriver(pieces)
    n = local3.param.size
    driver3 = LBFGSDriver(LocalSlices([[(local3.param, 0, 5)], [(local3.param, 5, 16)],
                                       [(local3.param, 16, n)]], F64))
    for _ in range(5):
        optimizer.step(single.closure)
        driver.step(sliced.closure, group)
        driver3.step(local3.closure, group)
        # equal up to rounding: the slices add their partial sums in another order
        expected = single.param.data
        scale = np.abs(expected).max()
        assert np.abs(sliced.param.data - expected).max() <= 1e-10 * scale
        assert np.abs(local3.param.data - expected).max() <= 1e-10 * scale
        state = optimizer.state_dict()["state"][0]
        for d in (driver, driver3):
            assert (d.func_evals, d.n_iter) == (state["func_evals"], state["n_iter"])
            np.testing.assert_allclose(d.export_state()["d"], state["d"], rtol=0,
                                       atol=1e-10 * np.abs(state["d"]).max())
    # one batched Gram reduction per iteration after the first (3 rows: new s, new y, g)
    assert any(rows == 3 for rows, _ in pieces.partial_calls)


def test_slices_may_cut_across_parameters():
    """A slice holding the end of one parameter and the start of the next."""
    one, three = LeastSquares(seed=4), LeastSquares(seed=4)
    (w1, v1), (w3, v3) = one.params, three.params
    space1 = LocalSlices([[(w1, 0, 8), (v1, 0, 2)]], F64)
    space3 = LocalSlices([[(w3, 0, 3)], [(w3, 3, 8), (v3, 0, 1)], [(v3, 1, 2)]], F64)
    d1, d3 = LBFGSDriver(space1), LBFGSDriver(space3)
    group = _group(max_iter=4, line_search_fn="strong_wolfe")
    for _ in range(3):
        d1.step(one.closure, group)
        d3.step(three.closure, group)
        np.testing.assert_allclose(three.x(), one.x(), rtol=0, atol=1e-10 * np.abs(one.x()).max())
        np.testing.assert_allclose(space3.export("d"), space1.export("d"), rtol=0,
                                   atol=1e-10 * np.abs(space1.export("d")).max())
    assert d3.n_iter == d1.n_iter == 12


# ---------------------------------------------------------------------------------------
# state


def test_state_dict_round_trip_rebuilds_the_gram_matrix():
    a, b = SmoothNonConvex(), SmoothNonConvex()
    opt_a = LBFGS([a.param], max_iter=5, history_size=4, line_search_fn="strong_wolfe")
    opt_a.step(a.closure)
    opt_a.step(a.closure)
    saved = copy.deepcopy(opt_a.state_dict())
    assert set(saved["state"]) == {0}
    assert set(saved["state"][0]) == {"func_evals", "n_iter", "al", "d", "t", "old_dirs", "old_stps",
                                      "ro", "H_diag", "prev_flat_grad", "prev_loss"}
    b.param.data[...] = a.param.data
    opt_b = LBFGS([b.param], max_iter=5, history_size=4, line_search_fn="strong_wolfe")
    opt_b.load_state_dict(saved)
    np.testing.assert_array_equal(opt_b._driver.hist_gram, opt_a._driver.hist_gram)
    opt_a.step(a.closure)
    opt_b.step(b.closure)
    np.testing.assert_array_equal(b.param.data, a.param.data)


def test_load_state_dict_refuses_bad_state_and_changes_nothing():
    a = SmoothNonConvex()
    optimizer = LBFGS([a.param], max_iter=3)
    optimizer.step(a.closure)
    good = copy.deepcopy(optimizer.state_dict())
    before = copy.deepcopy(optimizer.state_dict())
    bad = copy.deepcopy(good)
    bad["state"][0]["d"] = np.zeros(5)
    with pytest.raises(ValueError, match=r"'d' must be a flat array of shape \(23,\); got \(5,\)"):
        optimizer.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["state"][0]["ro"] = bad["state"][0]["ro"][:-1]
    with pytest.raises(ValueError, match="old_dirs, old_stps and ro must have one length"):
        optimizer.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["state"][0]["momentum"] = np.zeros(23)
    with pytest.raises(ValueError, match=r"unknown keys \['momentum'\]"):
        optimizer.load_state_dict(bad)
    after = optimizer.state_dict()
    np.testing.assert_array_equal(after["state"][0]["d"], before["state"][0]["d"])
    assert after["state"][0]["n_iter"] == before["state"][0]["n_iter"]


def test_state_under_another_parameter_is_refused():
    problem = LeastSquares()
    optimizer = LBFGS(problem.params, max_iter=2)
    optimizer.step(problem.closure)
    sd = copy.deepcopy(optimizer.state_dict())
    sd["state"] = {1: sd["state"][0]}
    with pytest.raises(ValueError, match="state under parameter 0 .* got state for parameter 1"):
        LBFGS(LeastSquares().params, max_iter=2).load_state_dict(sd)


def test_first_step_at_an_optimum_keeps_only_the_counters():
    p = Parameter(np.zeros(3))

    def closure():
        p.grad = np.zeros(3)
        return 0.0

    optimizer = LBFGS([p])
    assert optimizer.step(closure) == 0.0
    assert optimizer.state_dict()["state"] == {0: {"func_evals": 1, "n_iter": 0}}


@pytest.mark.torch_live
@pytest.mark.parametrize("kwargs", [dict(max_iter=1), dict(max_iter=4, history_size=2, line_search_fn="strong_wolfe"),
                                    dict(lr=0.5, max_iter=3, max_eval=2, line_search_fn="strong_wolfe")])
def test_counters_and_scalar_types_follow_torch(kwargs):
    """func_evals, n_iter, and which state scalars are tensors (0-d arrays here) or numbers."""
    torch = require_torch()
    ours_problem = SmoothNonConvex()
    x0 = ours_problem.param.data.copy()
    tp = torch.nn.Parameter(torch.from_numpy(x0.copy()))

    def torch_closure():
        ours_problem.param.data[...] = tp.detach().numpy()
        loss = ours_problem.closure()
        tp.grad = torch.from_numpy(ours_problem.param.grad.copy())
        return loss

    reference = torch.optim.LBFGS([tp], **kwargs)
    for _ in range(3):
        reference.step(torch_closure)
    expected = reference.state_dict()["state"][0]

    problem = SmoothNonConvex()
    optimizer = LBFGS([problem.param], **kwargs)
    for _ in range(3):
        optimizer.step(problem.closure)
    got = optimizer.state_dict()["state"][0]
    assert (got["func_evals"], got["n_iter"]) == (expected["func_evals"], expected["n_iter"])
    assert set(got) == set(expected)
    for key in ("t", "H_diag"):
        assert isinstance(got[key], np.ndarray) == isinstance(expected[key], torch.Tensor), key
    assert [a is None for a in got.get("al", [])] == [a is None for a in expected.get("al", [])]
    np.testing.assert_allclose(problem.param.data, tp.detach().numpy(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------
# errors


def _p(dtype=F64):
    return [Parameter(np.zeros(3, dtype), name="w"), Parameter(np.zeros(2, dtype), name="b")]


@pytest.mark.parametrize("kwargs,error,message", [
    ({"lr": -0.1}, ValueError, r"lr must be >= 0; got -0.1"),
    ({"lr": np.array([0.1, 0.2])}, ValueError, r"lr given as an array must have 1 element; got shape \(2,\)"),
    ({"max_iter": 0}, ValueError, r"max_iter must be an int >= 1; got 0"),
    ({"max_iter": 2.5}, TypeError, r"max_iter must be an int; got 2.5 of type float"),
    ({"max_eval": 0}, ValueError, r"max_eval must be an int >= 1; got 0"),
    ({"history_size": 0}, ValueError, r"history_size must be an int >= 1; got 0"),
    ({"history_size": True}, TypeError, r"history_size must be an int; got True of type bool"),
    ({"tolerance_grad": -1e-7}, ValueError, r"tolerance_grad must be >= 0; got -1e-07"),
    ({"tolerance_change": float("nan")}, ValueError, r"tolerance_change must not be NaN"),
    ({"line_search_fn": "armijo"}, ValueError, r"line_search_fn must be None or 'strong_wolfe'; got 'armijo'"),
    ({"line_search_fn": 1}, ValueError, r"line_search_fn must be None or 'strong_wolfe'; got 1"),
])
def test_bad_hyperparameters(kwargs, error, message):
    with pytest.raises(error, match=message):
        LBFGS(_p(), **kwargs)


def test_only_one_parameter_group():
    w, b = _p()
    with pytest.raises(ValueError, match=r"LBFGS doesn't support per-parameter options \(parameter groups\)"):
        LBFGS([{"params": [w]}, {"params": [b], "lr": 0.1}])
    optimizer = LBFGS([w])
    with pytest.raises(ValueError, match=r"doesn't support per-parameter options"):
        optimizer.add_param_group({"params": [b]})
    assert len(optimizer.param_groups) == 1


def test_parameters_must_share_a_dtype():
    with pytest.raises(ValueError, match=r"all parameters in one dtype .*float32.*float64"):
        LBFGS([Parameter(np.zeros(2, np.float32)), Parameter(np.zeros(2, np.float64))])


def test_step_needs_a_closure():
    with pytest.raises(TypeError, match="needs a closure"):
        LBFGS(_p()).step(None)


def test_sparse_gradients_are_refused():
    emb = Parameter(np.ones((4, 2)), name="emb")

    def closure():
        emb.grad = RowSparseGrad([1], np.ones((1, 2)), (4, 2))
        return 1.0

    with pytest.raises(RuntimeError, match="LBFGS does not support sparse gradients .*'emb'"):
        LBFGS([emb]).step(closure)


def test_missing_gradients_count_as_zero():
    w, b = _p()
    w.data[...] = [1.0, -2.0, 3.0]

    def closure():
        w.grad = 2 * w.data
        return float(w.data @ w.data)

    before = b.data.copy()
    LBFGS([w, b], max_iter=5, line_search_fn="strong_wolfe").step(closure)
    np.testing.assert_array_equal(b.data, before)
    assert np.abs(w.data).max() < 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lbfgs_kernels_give_the_same_bits_serial_and_multithreaded(dtype):
    """Below PARALLEL_MIN_SIZE the kernels run on the calling thread: both builds agree."""
    from shardstep.workers.optim.algorithms.lbfgs import kernels

    rng = np.random.default_rng(7)
    n = 70_001
    buf = rng.standard_normal((5, n)).astype(dtype)
    rows, cols = np.array([0, 1, 2]), np.array([1, 3, 4])
    tasks = kernels._n_tasks(n)
    grams = []
    for build in ("parallel", "serial"):
        out = np.zeros((3, 3))
        getattr(kernels._gram_kernel, build)(buf, rows, cols, tasks, out)
        combined = np.empty(n, dtype)
        getattr(kernels._combine_kernel, build)(buf, rows, np.array([0.5, -2.0, 3.0]), combined)
        axpy = np.empty(n, dtype)
        getattr(kernels._axpy_kernel, build)(axpy, buf[0], dtype(0.3), buf[1])
        grams.append((out, getattr(kernels._abs_sum_kernel, build)(buf[2], tasks),
                       getattr(kernels._abs_max_kernel, build)(buf[3], tasks), combined, axpy))
    for parallel, serial in zip(*grams):
        assert np.array_equal(parallel, serial)
