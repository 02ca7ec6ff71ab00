"""The Optimizer facade's torch.optim API: construction, groups, zero_grad, step(closure),
state_dict layout and validation, and bad hyperparameters."""

from __future__ import annotations

import numpy as np
import pytest

from shardstep.workers.optim import SGD, Adam, Parameter, RowSparseGrad, optimizer_class
from shardstep.workers.optim.registry import NAMES, rule
from tests.conftest import require_torch
from tests.parity.optim_error_cases import ERROR_CASES

# from the registry, so a new optimizer is in every test of its kind
DENSE = [name for name in NAMES if rule(name).accepts_dense]      # elementwise rules: all but sparse_adam, lbfgs
SPARSE = [name for name in NAMES if rule(name).accepts_sparse]    # row-sparse gradients: sgd, adagrad, sparse_adam


def _params(dtype=np.float32):
    rng = np.random.default_rng(0)
    return [Parameter(rng.standard_normal((3, 2)).astype(dtype), name="w"),
            Parameter(rng.standard_normal(2).astype(dtype), name="b")]


def _error_id(case):
    name, kwargs, _, _ = case
    return f"{name}-" + ",".join(f"{k}={v!r}" for k, v in kwargs.items())


def test_every_optimizer_has_bad_hyperparameter_cases():
    covered = {name for name, _, _, _ in ERROR_CASES}
    missing, unknown = [name for name in NAMES if name not in covered], sorted(covered - set(NAMES))
    assert not missing and not unknown, (
        f"tests/parity/optim_error_cases.py ERROR_CASES: add cases for {missing} (one per check its "
        f"constructor makes); {unknown} are not in shardstep.workers.optim.registry")


@pytest.mark.parametrize("case", ERROR_CASES, ids=[_error_id(c) for c in ERROR_CASES])
def test_bad_hyperparameters_name_argument_and_value(case):
    name, kwargs, error, message = case
    with pytest.raises(error, match=message):
        optimizer_class(name)(_params(), **kwargs)


@pytest.mark.parametrize("case", ERROR_CASES, ids=[_error_id(c) for c in ERROR_CASES])
def test_bad_hyperparameters_bad_in_add_param_group_too(case):
    name, kwargs, error, message = case
    optimizer = optimizer_class(name)(_params()[:1])
    with pytest.raises(error, match=message):
        optimizer.add_param_group({"params": _params()[1:], **kwargs})
    assert len(optimizer.param_groups) == 1


def test_params_must_be_an_ordered_iterable_of_parameters():
    with pytest.raises(TypeError, match="iterable of Parameters or dicts, but got Parameter"):
        SGD(_params()[0])
    with pytest.raises(TypeError, match="ordered collections"):
        SGD(set(_params()))
    with pytest.raises(ValueError, match="empty parameter list"):
        SGD([])
    with pytest.raises(TypeError, match=r"params\[1\] is a ndarray"):
        SGD([_params()[0], np.zeros(3)])


def test_a_parameter_in_two_groups_is_refused():
    w, b = _params()
    optimizer = SGD([w], lr=0.1)
    with pytest.raises(ValueError, match="more than one parameter group"):
        optimizer.add_param_group({"params": [b, w]})
    assert len(optimizer.param_groups) == 1


def test_groups_take_defaults_and_their_own_values():
    w, b = _params()
    optimizer = Adam([{"params": [w]}, {"params": [b], "lr": 0.5, "betas": (0.5, 0.6)}], lr=0.01)
    assert optimizer.param_groups[0]["lr"] == 0.01 and optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    assert optimizer.param_groups[1]["lr"] == 0.5 and optimizer.param_groups[1]["betas"] == (0.5, 0.6)
    assert optimizer.defaults["lr"] == 0.01


def test_step_returns_the_closure_loss_and_counts_steps():
    w, b = _params()
    optimizer = SGD([w, b], lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        w.grad, b.grad = 2 * w.data, 2 * b.data
        return float((w.data**2).sum() + (b.data**2).sum())

    before = w.data.copy()
    loss = optimizer.step(closure)
    assert loss == pytest.approx(float((before**2).sum() + (b.data / 0.8) @ (b.data / 0.8)), rel=1e-6)
    np.testing.assert_allclose(w.data, before * 0.8, rtol=1e-6)
    assert calls == [1] and optimizer._step_count == 1
    assert optimizer.step() is None and optimizer._step_count == 2


def test_parameters_without_grad_are_untouched_and_get_no_state():
    w, b = _params()
    optimizer = Adam([w, b])
    w.grad = np.ones_like(w.data)
    before = b.data.copy()
    optimizer.step()
    np.testing.assert_array_equal(b.data, before)
    assert b not in optimizer.state and set(optimizer.state[w]) == {"step", "exp_avg", "exp_avg_sq"}


def test_zero_grad():
    w, b = _params()
    optimizer = SGD([w, b], lr=0.1)
    w.grad, b.grad = np.ones_like(w.data), np.ones_like(b.data)
    grad = w.grad
    optimizer.zero_grad(set_to_none=False)
    assert w.grad is grad and not grad.any()
    optimizer.zero_grad()
    assert w.grad is None and b.grad is None


def test_state_dict_has_torch_layout():
    w, b = _params()
    optimizer = Adam([{"params": [w]}, {"params": [b], "lr": 0.1}], amsgrad=True)
    w.grad, b.grad = np.ones_like(w.data), np.ones_like(b.data)
    optimizer.step()
    sd = optimizer.state_dict()
    assert set(sd) == {"state", "param_groups"}
    assert [g["params"] for g in sd["param_groups"]] == [[0], [1]]
    assert set(sd["state"]) == {0, 1}
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    step = sd["state"][0]["step"]
    assert isinstance(step, np.ndarray) and step.shape == () and step.dtype == np.float32 and step == 1
    assert sd["state"][1]["exp_avg"].shape == b.shape
    assert sd["param_groups"][1]["lr"] == 0.1
    assert set(sd["param_groups"][0]) == {
        "lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
        "differentiable", "fused", "decoupled_weight_decay", "params"}


def test_named_parameters_record_param_names():
    w, b = _params()
    optimizer = SGD([("layer.weight", w), ("layer.bias", b)], lr=0.1)
    sd = optimizer.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["layer.weight", "layer.bias"]


def test_load_state_dict_rejects_mismatches_and_changes_nothing():
    w, b = _params()
    optimizer = Adam([w, b], lr=0.1)
    w.grad, b.grad = np.ones_like(w.data), np.ones_like(b.data)
    optimizer.step()
    good = optimizer.state_dict()
    snapshot = {k: v.copy() for k, v in optimizer.state[w].items()}

    with pytest.raises(ValueError, match="different number of parameter groups: 2, this optimizer has 1"):
        optimizer.load_state_dict({"state": {}, "param_groups": [good["param_groups"][0]] * 2})
    bad_shape = {"state": {0: {**good["state"][0], "exp_avg": np.zeros(5, np.float32)}, 1: good["state"][1]},
                 "param_groups": good["param_groups"]}
    with pytest.raises(ValueError, match=r"state 'exp_avg' of parameter 0 has shape \(5,\); the parameter has shape \(3, 2\)"):
        optimizer.load_state_dict(bad_shape)
    bad_group = {"state": good["state"], "param_groups": [{**good["param_groups"][0], "lr": -1.0}]}
    with pytest.raises(ValueError, match="lr must be >= 0; got -1.0"):
        optimizer.load_state_dict(bad_group)
    with pytest.raises(ValueError, match="exactly the keys 'param_groups' and 'state'"):
        optimizer.load_state_dict({"state": {}})
    assert optimizer.param_groups[0]["lr"] == 0.1
    for key, value in snapshot.items():
        np.testing.assert_array_equal(optimizer.state[w][key], value)


def test_load_state_dict_copies_and_casts_to_the_parameter_dtype():
    w, b = _params(np.float64)
    optimizer = Adam([w, b])
    w.grad, b.grad = np.ones_like(w.data), np.ones_like(b.data)
    optimizer.step()
    sd = optimizer.state_dict()
    sd32 = {"param_groups": sd["param_groups"],
            "state": {k: {n: (v.astype(np.float32) if n != "step" else v) for n, v in s.items()}
                      for k, s in sd["state"].items()}}
    fresh = Adam(_params(np.float64))
    fresh.load_state_dict(sd32)
    loaded = fresh.state[fresh.param_groups[0]["params"][0]]
    assert loaded["exp_avg"].dtype == np.float64 and loaded["step"].dtype == np.float32
    assert not np.shares_memory(loaded["exp_avg"], sd32["state"][0]["exp_avg"])


def test_dense_optimizer_rejects_sparse_gradients_and_sparse_adam_dense_ones():
    emb = Parameter(np.zeros((4, 2), np.float32), name="emb")
    emb.grad = RowSparseGrad([1], np.ones((1, 2), np.float32), (4, 2))
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients .*'emb'"):
        Adam([emb]).step()


@pytest.mark.parametrize("name", SPARSE)
def test_an_empty_sparse_gradient_changes_no_parameter(name):
    emb = Parameter(np.ones((4, 3), np.float32), name="emb")
    optimizer = optimizer_class(name)([emb], lr=0.1)
    emb.grad = RowSparseGrad([1], np.ones((1, 3), np.float32), (4, 3))
    optimizer.zero_grad(set_to_none=False)
    assert emb.grad.indices.size == 0
    before = emb.data.copy()
    optimizer.step()
    np.testing.assert_array_equal(emb.data, before)


def test_sparse_adagrad_refuses_weight_decay_and_keeps_its_state():
    emb = Parameter(np.ones((4, 3), np.float32), name="emb")
    optimizer = optimizer_class("adagrad")([emb], lr=0.1, weight_decay=0.1)
    emb.grad = RowSparseGrad([1], np.ones((1, 3), np.float32), (4, 3))
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible with sparse gradients; got weight_decay=0.1"):
        optimizer.step()
    assert optimizer.state[emb]["step"] == 0
    np.testing.assert_array_equal(emb.data, np.ones((4, 3), np.float32))


def test_grad_shape_and_dtype_are_checked():
    w = _params()[0]
    with pytest.raises(ValueError, match=r"grad for parameter w must have shape \(3, 2\); got \(2, 3\)"):
        w.grad = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match="must have dtype float32; got float64"):
        w.grad = np.zeros((3, 2), np.float64)


def test_row_sparse_grad_coalesces_repeated_rows():
    grad = RowSparseGrad([2, 0, 2], np.array([[1.0], [2.0], [3.0]], np.float32), (3, 1))
    coalesced = grad.coalesce()
    np.testing.assert_array_equal(coalesced.indices, [0, 2])
    np.testing.assert_array_equal(coalesced.values, [[2.0], [4.0]])
    np.testing.assert_array_equal(grad.to_dense(), [[2.0], [0.0], [4.0]])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 3\); got values from 0 to 3"):
        RowSparseGrad([0, 3], np.zeros((2, 1), np.float32), (3, 1))


# device-only flags torch accepts and shardstep refuses by design are not compared
TORCH_ALSO_REFUSES = [c for c in ERROR_CASES
                      if c[2] is ValueError and not set(c[1]) & {"capturable", "differentiable"}]


@pytest.mark.torch_live
@pytest.mark.parametrize("case", TORCH_ALSO_REFUSES, ids=[_error_id(c) for c in TORCH_ALSO_REFUSES])
def test_torch_rejects_the_same_hyperparameters(case):
    """Each ValueError case is bad input for torch as well, so our checks are not invented."""
    torch = require_torch()
    name, kwargs, _, _ = case
    cls = getattr(torch.optim, optimizer_class(name).__name__)
    with pytest.raises((ValueError, RuntimeError, TypeError, IndexError)):
        cls([torch.nn.Parameter(torch.zeros(3))], **kwargs)


@pytest.mark.parametrize("name", DENSE)
def test_serial_and_multithreaded_kernels_agree_bit_for_bit(name):
    """Small parameters update on the calling thread, large ones on numba's threads; the
    same source compiled both ways must give the same bits."""
    from shardstep.workers.optim.kernels import PARALLEL_MIN_SIZE

    rng = np.random.default_rng(5)
    size = PARALLEL_MIN_SIZE + 3
    data = rng.standard_normal(size).astype(np.float32)
    grads = [rng.standard_normal(size).astype(np.float32) for _ in range(3)]
    big = Parameter(data.copy())
    pieces = [Parameter(part.copy()) for part in np.array_split(data, 3)]  # each below the threshold
    assert all(p.size < PARALLEL_MIN_SIZE for p in pieces)
    big_opt = optimizer_class(name)([big], lr=0.01)
    small_opt = optimizer_class(name)(pieces, lr=0.01)
    for grad in grads:
        big.grad = grad
        for p, part in zip(pieces, np.array_split(grad, 3)):
            p.grad = part.copy()
        big_opt.step()
        small_opt.step()
    np.testing.assert_array_equal(big.data, np.concatenate([p.data for p in pieces]))


# where torch's signature and its stored defaults differ on purpose: AdamW fixes
# decoupled_weight_decay=True (no argument); LBFGS's max_eval=None means max_iter * 5 // 4
DERIVED_DEFAULTS = {"adamw": {"decoupled_weight_decay"}, "lbfgs": {"max_eval"}}


@pytest.mark.parametrize("name", NAMES)
def test_constructor_signature_spells_the_rules_defaults(name):
    """torch's defaults are written twice per optimizer: the rule's (which the shards and the
    job checks use) and the torch-style signature users call. They must agree key for key,
    and an optimizer built with no arguments stores exactly the rule's defaults."""
    import inspect

    cls = optimizer_class(name)
    derived = DERIVED_DEFAULTS.get(name, set())
    arguments = {key: parameter.default for key, parameter in inspect.signature(cls.__init__).parameters.items()
                 if key not in ("self", "params")}
    defaults = dict(cls.rule.defaults)
    differ = {key: (arguments.get(key, "no argument"), defaults.get(key, "no default"))
              for key in set(arguments) | set(defaults)
              if key not in derived and arguments.get(key, "no argument") != defaults.get(key, "no default")}
    assert not differ, f"{cls.__name__}: (signature, RULE.defaults) disagree: {differ}"
    group = cls([Parameter(np.zeros(2, np.float32))]).param_groups[0]
    assert {key: value for key, value in group.items() if key not in ("params", "param_names")} == defaults
