"""Module bookkeeping (names, state_dict, modes, gradient accumulation), initialization
distributions and determinism, Dropout, the loss call/backward contract, and a short training
run with shardstep.workers.optim."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from shardstep.workers import nn
from shardstep.workers.nn import functional as F
from shardstep.workers.optim import SGD, Adam, Parameter, RowSparseGrad, SparseAdam
from tests.conftest import require_torch

f32, f64 = np.float32, np.float64


def mlp(seed=0, dtype=f32):
    rng = np.random.default_rng(seed)
    return nn.Sequential(nn.Linear(5, 8, dtype=dtype, rng=rng), nn.Tanh(), nn.Linear(8, 3, dtype=dtype, rng=rng))


# -- names and state_dict --------------------------------------------------------------------------

def test_parameter_names_are_dotted_and_stable():
    assert [n for n, _ in nn.Linear(3, 2, rng=0).named_parameters()] == ["weight", "bias"]
    assert [n for n, _ in nn.Linear(3, 2, bias=False, rng=0).named_parameters()] == ["weight"]
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4, rng=0), nn.ReLU()), nn.Dropout(0.1, rng=0),
                          nn.Linear(4, 2, rng=1), nn.Embedding(3, 2, rng=2))
    assert [n for n, _ in model.named_parameters()] == ["0.0.weight", "0.0.bias", "2.weight", "2.bias", "3.weight"]
    assert [p.shape for p in model.parameters()] == [(4, 3), (4,), (2, 4), (2,), (3, 2)]
    assert list(model.state_dict()) == [n for n, _ in model.named_parameters()]
    named = nn.Sequential(OrderedDict([("encoder", nn.Linear(2, 2, rng=0)), ("act", nn.GELU())]))
    assert [n for n, _ in named.named_parameters()] == ["encoder.weight", "encoder.bias"]
    assert named.encoder is named[0]


def test_shared_parameter_is_listed_once_but_saved_under_each_name():
    first, second = nn.Linear(3, 3, rng=0), nn.Linear(3, 3, rng=1)
    second.weight = first.weight
    model = nn.Sequential(first, second)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "1.bias"]
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    with pytest.raises(TypeError, match=r"cannot assign ndarray to parameter 'bias' of Linear"):
        second.bias = np.zeros(3)
    second.bias = None
    assert [n for n, _ in second.named_parameters()] == ["weight"] and second.bias is None


def test_state_dict_is_a_copy_and_loading_is_in_place_with_a_cast():
    model = mlp()
    state = model.state_dict()
    state["0.weight"][...] = 7.0
    assert not np.any(model[0].weight.data == 7.0)
    data_before = model[0].weight.data
    loaded = {k: np.full(v.shape, 0.25, f64) for k, v in state.items()}
    result = model.load_state_dict(loaded)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert model[0].weight.data is data_before            # optimizers holding the array stay valid
    assert model[0].weight.dtype == f32 and np.all(model[0].weight.data == 0.25)


def test_non_strict_loading_reports_names():
    model = mlp()
    partial = {"0.weight": np.zeros((8, 5)), "extra": np.zeros(1)}
    result = model.load_state_dict(partial, strict=False)
    assert result.missing_keys == ["0.bias", "2.weight", "2.bias"]
    assert result.unexpected_keys == ["extra"]
    assert np.all(model[0].weight.data == 0)


def test_same_seed_same_parameters_and_different_seed_different():
    first, again, other = mlp(seed=3).state_dict(), mlp(seed=3).state_dict(), mlp(seed=4).state_dict()
    assert first.keys() == again.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.array_equal(first[name], other[name])
    # an int seed and a Generator seeded alike give the same layer
    np.testing.assert_array_equal(nn.Linear(4, 3, rng=5).weight.data,
                                  nn.Linear(4, 3, rng=np.random.default_rng(5)).weight.data)


@pytest.mark.torch_live
def test_state_dicts_move_between_torch_and_shardstep():
    torch = require_torch()
    ours = mlp(seed=1, dtype=f64)
    theirs = torch.nn.Sequential(torch.nn.Linear(5, 8, dtype=torch.float64), torch.nn.Tanh(),
                                 torch.nn.Linear(8, 3, dtype=torch.float64))
    assert [(n, tuple(p.shape)) for n, p in theirs.named_parameters()] == \
           [(n, p.shape) for n, p in ours.named_parameters()]
    x = np.random.default_rng(0).standard_normal((6, 5))
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    np.testing.assert_allclose(ours(x), theirs(torch.tensor(x)).detach().numpy(), rtol=1e-12)
    torch.manual_seed(0)
    fresh = torch.nn.Sequential(torch.nn.Linear(5, 8, dtype=torch.float64), torch.nn.Tanh(),
                                torch.nn.Linear(8, 3, dtype=torch.float64))
    ours.load_state_dict({k: v.numpy() for k, v in fresh.state_dict().items()})
    np.testing.assert_allclose(ours(x), fresh(torch.tensor(x)).detach().numpy(), rtol=1e-12)


# -- buffers (BatchNorm's running statistics) ---------------------------------------------------------

def bn_mlp(dtype=f64, momentum=0.1):
    rng = np.random.default_rng(0)
    return nn.Sequential(nn.Linear(4, 3, dtype=dtype, rng=rng), nn.BatchNorm1d(3, momentum=momentum, dtype=dtype),
                         nn.ReLU(), nn.Linear(3, 2, dtype=dtype, rng=rng))


def test_buffers_follow_each_modules_parameters_in_the_state_dict():
    model = bn_mlp()
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean",
                                        "1.running_var", "1.num_batches_tracked", "3.weight", "3.bias"]
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight",
                                                        "3.bias"]
    assert [n for n, _ in model.named_buffers()] == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    assert len(model.buffers()) == 3 and len(model.parameters()) == 6
    norm = model[1]
    np.testing.assert_array_equal(norm.running_mean, np.zeros(3))
    np.testing.assert_array_equal(norm.running_var, np.ones(3))
    assert norm.num_batches_tracked.dtype == np.int64 and norm.num_batches_tracked.shape == ()
    assert norm.running_mean is model.buffers()[0]             # the module's own array, as torch's
    state = model.state_dict()
    assert state["1.running_mean"] is not norm.running_mean     # state_dict copies
    assert state["1.num_batches_tracked"].dtype == np.int64
    untracked = nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    assert untracked.state_dict() == {} and untracked.named_buffers() == []
    assert untracked.running_mean is None and untracked.num_batches_tracked is None


def test_register_buffer_replace_delete_and_non_persistent():
    module = nn.Module()
    module.register_buffer("table", np.arange(3.0))
    module.register_buffer("scratch", np.zeros(2), persistent=False)
    module.register_buffer("empty", None)
    assert list(module.state_dict()) == ["table"]
    assert [n for n, _ in module.named_buffers()] == ["table", "scratch"]
    module.table = np.ones(4)                                   # an array replaces it, in place in the order
    np.testing.assert_array_equal(module.state_dict()["table"], np.ones(4))
    with pytest.raises(TypeError, match=r"cannot assign list to buffer 'table' of Module: an ndarray or None"):
        module.table = [1.0]
    module.table = None
    assert module.state_dict() == {} and module.table is None
    del module.scratch
    assert module.named_buffers() == [] and not hasattr(module, "scratch")
    module.scratch = np.zeros(1)                                # now a plain attribute, not a buffer
    assert module.named_buffers() == []


def test_load_state_dict_loads_buffers_in_place_and_keeps_their_dtype():
    model = bn_mlp(dtype=f32)
    norm = model[1]
    running_mean = norm.running_mean
    state = {k: v.astype(f64) for k, v in model.state_dict().items()}
    state["1.running_mean"] = np.array([1.0, 2.0, 3.0])
    state["1.num_batches_tracked"] = np.array(7.0)             # float but integral: cast as torch's copy_
    model.load_state_dict(state)
    assert norm.running_mean is running_mean and running_mean.dtype == f32
    np.testing.assert_array_equal(running_mean, [1, 2, 3])
    assert norm.num_batches_tracked.dtype == np.int64 and int(norm.num_batches_tracked) == 7
    partial = {k: v for k, v in state.items() if k != "1.running_var"}
    assert model.load_state_dict(partial, strict=False).missing_keys == ["1.running_var"]


@pytest.mark.torch_live
def test_batch_norm_state_dicts_move_between_torch_and_shardstep():
    torch = require_torch()
    ours = bn_mlp()
    double = torch.float64
    theirs = torch.nn.Sequential(torch.nn.Linear(4, 3, dtype=double), torch.nn.BatchNorm1d(3, dtype=double),
                                 torch.nn.ReLU(), torch.nn.Linear(3, 2, dtype=double))
    assert list(theirs.state_dict()) == list(ours.state_dict())
    assert [n for n, _ in theirs.named_buffers()] == [n for n, _ in ours.named_buffers()]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 4))
    state = ours.state_dict()
    state.update({"1.running_mean": rng.standard_normal(3), "1.running_var": rng.uniform(0.5, 2.0, 3),
                  "1.num_batches_tracked": np.array(5, np.int64)})
    ours.load_state_dict(state)
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    assert theirs[1].num_batches_tracked.dtype == torch.int64 and int(theirs[1].num_batches_tracked) == 5
    ours.eval(), theirs.eval()
    np.testing.assert_allclose(ours(x), theirs(torch.tensor(x)).detach().numpy(), rtol=1e-12)
    theirs.train()
    for _ in range(3):
        theirs(torch.tensor(rng.standard_normal((6, 4))))
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    assert int(ours[1].num_batches_tracked) == 8 and ours[1].num_batches_tracked.dtype == np.int64
    theirs.eval()
    np.testing.assert_allclose(ours(x), theirs(torch.tensor(x)).detach().numpy(), rtol=1e-12)


@pytest.mark.torch_live
@pytest.mark.parametrize("dtype", [f32, f64])
@pytest.mark.parametrize("name,shape", [("BatchNorm1d", (8, 3)), ("BatchNorm1d", (4, 3, 5)),
                                        ("BatchNorm2d", (4, 3, 3, 2))])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_after_training_steps_equal_torchs(name, shape, momentum, dtype):
    torch = require_torch()
    torch_dtype = torch.float32 if dtype == f32 else torch.float64
    ours = getattr(nn, name)(3, momentum=momentum, dtype=dtype)
    theirs = getattr(torch.nn, name)(3, momentum=momentum, dtype=torch_dtype)
    rng = np.random.default_rng(2)
    rtol = 1e-5 if dtype == f32 else 1e-12
    for _ in range(6):
        x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
        out = ours(x)
        ours.backward(np.ones_like(out))
        theirs(torch.tensor(x)).sum().backward()
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 6
    for buffer in ("running_mean", "running_var"):
        np.testing.assert_allclose(getattr(ours, buffer), getattr(theirs, buffer).numpy(), rtol=rtol)
        assert getattr(ours, buffer).dtype == dtype
    np.testing.assert_allclose(ours.weight.grad, theirs.weight.grad.numpy(), rtol=rtol, atol=rtol)
    ours.eval(), theirs.eval()
    x = (rng.standard_normal(shape) * 2 + 3).astype(dtype)
    np.testing.assert_allclose(ours(x), theirs(torch.tensor(x)).detach().numpy(), rtol=rtol, atol=rtol)


def test_batch_norm_train_and_eval_modes():
    rng = np.random.default_rng(3)
    norm = nn.BatchNorm1d(2, dtype=f64)
    x = rng.standard_normal((50, 2)) * [1.0, 4.0] + [2.0, -1.0]
    out = norm(x)
    np.testing.assert_allclose(out.mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(out.var(axis=0), 1 / (1 + 1e-5 / x.var(axis=0)), rtol=1e-12)   # biased variance
    np.testing.assert_allclose(norm.running_mean, 0.1 * x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(norm.running_var, 0.9 + 0.1 * x.var(axis=0, ddof=1), rtol=1e-12)  # unbiased
    assert int(norm.num_batches_tracked) == 1
    norm.eval()
    before = norm.state_dict()
    eval_out = norm(x)
    np.testing.assert_allclose(eval_out, (x - norm.running_mean) / np.sqrt(norm.running_var + 1e-5), rtol=1e-12)
    for name, value in norm.state_dict().items():
        np.testing.assert_array_equal(value, before[name])         # eval mode moves no statistic
    # eval mode's gradient treats the statistics as constants: one scale per channel
    np.testing.assert_allclose(norm.backward(np.ones_like(x)), np.ones_like(x) / np.sqrt(norm.running_var + 1e-5),
                               rtol=1e-12)
    norm.train()
    norm(x)
    assert int(norm.num_batches_tracked) == 2
    cumulative = nn.BatchNorm1d(2, momentum=None, dtype=f64)
    batches = [rng.standard_normal((5, 2)) for _ in range(3)]
    for batch in batches:
        cumulative(batch)
    np.testing.assert_allclose(cumulative.running_mean, np.mean([b.mean(axis=0) for b in batches], axis=0),
                               rtol=1e-12)
    # without running statistics, eval mode normalizes by the batch's own
    untracked = nn.BatchNorm1d(2, track_running_stats=False, dtype=f64).eval()
    np.testing.assert_allclose(untracked(x), out, rtol=1e-12)


def test_batch_norm_empty_batch_counts_the_batch_and_changes_no_statistic():
    norm = nn.BatchNorm2d(3, dtype=f32)
    out = norm(np.zeros((0, 3, 2, 2), f32))
    assert out.shape == (0, 3, 2, 2) and int(norm.num_batches_tracked) == 1
    np.testing.assert_array_equal(norm.running_mean, np.zeros(3))
    assert norm.backward(np.zeros((0, 3, 2, 2), f32)).shape == (0, 3, 2, 2)
    np.testing.assert_array_equal(norm.weight.grad, np.zeros(3))


def test_conv1d_adaptive_pool_and_batch_norm_train_with_adam():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 64)
    signal = np.sin(np.linspace(0, 4 * np.pi, 16)) * (2 * labels[:, None] - 1)
    x = (signal[:, None, :] + 0.5 * rng.standard_normal((64, 1, 16))).astype(f32)
    model = nn.Sequential(nn.Conv1d(1, 4, 5, padding="same", bias=False, rng=rng), nn.BatchNorm1d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool1d(4), nn.Flatten(), nn.Linear(16, 2, rng=rng))
    criterion = nn.CrossEntropyLoss()
    optimizer = Adam(model.parameters(), lr=0.05)

    def closure():
        model.zero_grad()
        loss = criterion(model(x), labels)
        model.backward(criterion.backward(), need_input_grad=False)
        return loss

    first = closure()
    for _ in range(40):
        last = optimizer.step(closure)
    model.eval()
    assert last < first / 4 and np.mean(model(x).argmax(axis=1) == labels) > 0.95


# -- gradients accumulate ------------------------------------------------------------------------------

def test_backward_accumulates_until_zero_grad():
    model = mlp(dtype=f64)
    x = np.random.default_rng(0).standard_normal((4, 5))
    grad_out = np.ones((4, 3))
    model(x)
    model.backward(grad_out)
    once = {n: p.grad.copy() for n, p in model.named_parameters()}
    model(x)
    model.backward(grad_out)
    for name, param in model.named_parameters():
        np.testing.assert_allclose(param.grad, 2 * once[name], rtol=1e-15)
    model.zero_grad(set_to_none=False)
    assert all(np.all(p.grad == 0) for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_sparse_gradients_concatenate_and_mix_with_dense():
    layer = nn.Embedding(6, 2, sparse=True, rng=0)
    layer(np.array([1, 3]))
    layer.backward(np.ones((2, 2), f32))
    layer(np.array([3, 5]))
    layer.backward(np.full((2, 2), 2.0, f32))
    grad = layer.weight.grad
    assert isinstance(grad, RowSparseGrad)
    np.testing.assert_array_equal(grad.indices, [1, 3, 3, 5])
    np.testing.assert_array_equal(grad.to_dense()[[1, 3, 5]], [[1, 1], [3, 3], [2, 2]])
    # a dense gradient already present absorbs the sparse rows
    layer.weight.grad = np.ones((6, 2), f32)
    layer(np.array([0, 0]))
    layer.backward(np.ones((2, 2), f32))
    np.testing.assert_array_equal(layer.weight.grad[:, 0], [3, 1, 1, 1, 1, 1])
    layer.zero_grad(set_to_none=False)
    assert np.all(layer.weight.grad == 0)
    layer.weight.grad = RowSparseGrad([2], np.ones((1, 2), f32), (6, 2))
    layer.zero_grad(set_to_none=False)
    assert isinstance(layer.weight.grad, RowSparseGrad) and layer.weight.grad.indices.size == 0


def test_frozen_parameter_gets_no_gradient():
    layer = nn.Linear(3, 2, rng=0)
    layer.weight.requires_grad = False
    layer(np.ones((1, 3), f32))
    layer.backward(np.ones((1, 2), f32))
    assert layer.weight.grad is None and layer.bias.grad is not None


# -- modes and Dropout -------------------------------------------------------------------------------

def test_train_and_eval_reach_every_module():
    model = nn.Sequential(nn.Linear(2, 2, rng=0), nn.Sequential(nn.Dropout(0.5, rng=0)))
    assert model.eval() is model
    assert all(not m.training for _, m in model.named_modules())
    model.train()
    assert all(m.training for _, m in model.named_modules())


@pytest.mark.parametrize("dtype", [f32, f64])
def test_dropout_masks_scale_and_determinism(dtype):
    x = np.random.default_rng(0).standard_normal((400, 500)).astype(dtype)
    p = 0.3
    layer = nn.Dropout(p, rng=11)
    out = layer(x)
    assert out.dtype == dtype
    kept = out != 0
    scale = np.asarray(1 / (1 - p), dtype)
    np.testing.assert_array_equal(out[kept], x[kept] * scale)
    # binomial: 200k draws, standard error of the kept share ~1e-3
    assert abs(kept.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / x.size)
    grad = layer.backward(np.full_like(x, 2.0))
    np.testing.assert_array_equal(grad, np.where(kept, 2 * scale, 0).astype(dtype))
    np.testing.assert_array_equal(nn.Dropout(p, rng=11)(x), out)          # same seed, same mask
    assert not np.array_equal(layer(x), out)                               # the next call draws anew
    layer.eval()
    assert layer(x) is x and layer.backward(np.ones_like(x)).sum() == x.size
    np.testing.assert_array_equal(nn.Dropout(0.0, rng=0)(x), x)
    zeroed = nn.Dropout(1.0, rng=0)
    assert np.all(zeroed(x) == 0) and np.all(zeroed.backward(np.ones_like(x)) == 0)


@pytest.mark.torch_live
def test_dropout_scales_kept_elements_as_torch():
    torch = require_torch()
    for dtype in (f32, f64):
        ones = np.ones(10_000, dtype)
        for p in (0.1, 0.3, 0.7, 0.9, 1 / 3):
            ours = np.unique(nn.Dropout(p, rng=0)(ones))
            theirs = np.unique(torch.nn.functional.dropout(torch.tensor(ones), p).numpy())
            np.testing.assert_array_equal(ours, theirs)     # {0, 1 / (1 - p)} rounded alike


# -- initialization ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [f32, f64])
def test_linear_init_is_uniform_within_torch_bounds(dtype):
    fan_in = 1000
    layer = nn.Linear(fan_in, 1000, dtype=dtype, rng=0)
    weight = layer.weight.data.astype(f64).ravel()
    bound = 1 / np.sqrt(fan_in)
    assert layer.weight.dtype == dtype and layer.weight.shape == (1000, fan_in)
    assert np.abs(weight).max() <= dtype(bound)
    assert np.abs(weight).max() > 0.999 * bound
    n = weight.size
    assert abs(weight.mean()) < 5 * bound / np.sqrt(3 * n)
    # variance of U(-b, b) is b^2 / 3; the sample variance's standard error is sqrt(4 / 45) b^2 / sqrt(n)
    assert abs(weight.var() - bound**2 / 3) < 5 * np.sqrt(4 / 45) * bound**2 / np.sqrt(n)
    counts, _ = np.histogram(weight, bins=20, range=(-bound, bound))
    chi_square = ((counts - n / 20) ** 2 / (n / 20)).sum()
    assert chi_square < 70          # 19 degrees of freedom: P(chi2 > 70) < 1e-7
    assert np.abs(layer.bias.data).max() <= dtype(bound)


@pytest.mark.parametrize("dtype", [f32, f64])
def test_embedding_init_is_standard_normal(dtype):
    layer = nn.Embedding(1000, 1000, padding_idx=7, dtype=dtype, rng=0)
    weight = np.delete(layer.weight.data.astype(f64), 7, axis=0).ravel()
    n = weight.size
    assert np.all(layer.weight.data[7] == 0)
    assert abs(weight.mean()) < 5 / np.sqrt(n)
    assert abs(weight.var() - 1) < 5 * np.sqrt(2 / n)
    standardized = (weight - weight.mean()) / weight.std()
    assert abs(np.mean(standardized**3)) < 5 * np.sqrt(6 / n)
    assert abs(np.mean(standardized**4) - 3) < 5 * np.sqrt(24 / n)


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(a, grid, side="right") / a.size
                        - np.searchsorted(b, grid, side="right") / b.size).max())


@pytest.mark.torch_live
def test_init_distributions_match_torch():
    """Two-sample Kolmogorov-Smirnov between our and torch's default initializations; with
    n = m samples the statistic exceeds 2.2 sqrt(2 / n) with probability below 1e-4."""
    torch = require_torch()
    torch.manual_seed(0)
    cases = [(nn.Linear(512, 256, rng=0).weight.data, torch.nn.Linear(512, 256).weight),
             (nn.Linear(512, 256, rng=0).bias.data, torch.nn.Linear(512, 256).bias),
             (nn.Embedding(512, 256, rng=0).weight.data, torch.nn.Embedding(512, 256).weight)]
    for ours, theirs in cases:
        theirs = theirs.detach().numpy().ravel()
        assert _ks_statistic(ours.ravel(), theirs) < 2.2 * np.sqrt(2 / theirs.size)


# -- containers ----------------------------------------------------------------------------------------

def test_sequential_container():
    model = mlp()
    assert len(model) == 3 and isinstance(model[1], nn.Tanh)
    head = model[:2]
    assert isinstance(head, nn.Sequential) and head[0] is model[0]
    assert [n for n, _ in head.named_parameters()] == ["0.weight", "0.bias"]
    model.append(nn.LogSoftmax(dim=1))
    assert [type(m).__name__ for m in model] == ["Linear", "Tanh", "Linear", "LogSoftmax"]
    assert repr(model).startswith("Sequential(\n  (0): Linear(in_features=5, out_features=8, bias=True)")
    assert model.children()[3] is model[3]


def test_sequential_backward_chains_layers():
    model = mlp(dtype=f64)
    x = np.random.default_rng(1).standard_normal((3, 5))
    out = model(x)
    grad = np.random.default_rng(2).standard_normal(out.shape)
    d_x = model.backward(grad)
    hidden = np.tanh(x @ model[0].weight.data.T + model[0].bias.data)
    d_hidden = (grad @ model[2].weight.data) * (1 - hidden**2)
    np.testing.assert_allclose(d_x, d_hidden @ model[0].weight.data, rtol=1e-12)
    np.testing.assert_allclose(model[2].weight.grad, grad.T @ hidden, rtol=1e-12)


def test_skipping_the_input_gradient_leaves_parameter_gradients_unchanged():
    x = np.random.default_rng(1).standard_normal((3, 5))
    grads = []
    for need_input_grad in (True, False):
        model = nn.Sequential(nn.Linear(5, 4, dtype=f64, rng=0), nn.ReLU(), nn.Linear(4, 2, dtype=f64, rng=1))
        out = model(x)
        d_x = model.backward(np.ones_like(out), need_input_grad=need_input_grad)
        assert (d_x is None) == (not need_input_grad)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name in grads[0]:
        np.testing.assert_array_equal(grads[0][name], grads[1][name])
    relu = nn.ReLU()
    relu(x)
    assert relu.backward(np.ones_like(x), need_input_grad=False) is None


# -- the loss contract ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [f32, f64])
def test_loss_values_and_gradient_types(dtype):
    logits = np.random.default_rng(0).standard_normal((4, 3)).astype(dtype)
    labels = np.array([0, 2, 1, 1])
    mean = nn.CrossEntropyLoss()
    value = mean(logits, labels)
    assert type(value) is float
    grad = mean.backward()
    assert isinstance(grad, np.ndarray) and grad.dtype == dtype and grad.shape == logits.shape
    per_row = nn.CrossEntropyLoss(reduction="none")
    losses = per_row(logits, labels)
    assert isinstance(losses, np.ndarray) and losses.dtype == dtype and losses.shape == (4,)
    np.testing.assert_allclose(per_row.backward(np.full(4, 0.25, dtype)), grad, rtol=1e-6)
    triplet = nn.TripletMarginLoss()
    triplet(logits, logits[::-1].copy(), logits + 1)
    grads = triplet.backward(2.0)
    assert isinstance(grads, tuple) and len(grads) == 3 and all(g.dtype == dtype for g in grads)
    ranking = nn.MarginRankingLoss(margin=0.1)
    ranking(logits[:, 0], logits[:, 1], np.array([1, -1, 1, -1]))
    assert len(ranking.backward()) == 2
    output, saved = F.cross_entropy_forward(logits, labels)
    assert output.shape == () and output.dtype == dtype
    np.testing.assert_array_equal(F.cross_entropy_backward(saved, 1.0), grad)


def test_kl_div_batchmean_divides_by_batch():
    rng = np.random.default_rng(0)
    log_q = np.log(rng.dirichlet(np.ones(4), size=5))
    p = rng.dirichlet(np.ones(4), size=5)
    total = nn.KLDivLoss(reduction="sum")(log_q, p)
    np.testing.assert_allclose(nn.KLDivLoss(reduction="batchmean")(log_q, p), total / 5, rtol=1e-14)
    np.testing.assert_allclose(nn.KLDivLoss(reduction="mean")(log_q, p), total / 20, rtol=1e-14)


# -- with the optimizers ----------------------------------------------------------------------------------

def test_mlp_trains_with_adam():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 5)) * 3
    labels = rng.integers(0, 3, 300)
    x = (centers[labels] + rng.standard_normal((300, 5))).astype(f32)
    model = mlp(seed=2)
    criterion = nn.CrossEntropyLoss()
    optimizer = Adam(model.parameters(), lr=0.05)

    def closure():
        model.zero_grad()
        loss = criterion(model(x), labels)
        model.backward(criterion.backward())
        return loss

    first = closure()
    for _ in range(60):
        last = optimizer.step(closure)
    model.eval()
    accuracy = np.mean(model(x).argmax(axis=1) == labels)
    assert last < first / 5 and accuracy > 0.95


def test_sparse_embedding_feeds_sparse_optimizers():
    layer = nn.Embedding(10, 4, sparse=True, rng=0)
    before = layer.weight.data.copy()
    optimizer = SparseAdam(layer.parameters(), lr=0.1)
    criterion = nn.MSELoss()
    indices = np.array([[1, 2], [2, 7]])
    criterion(layer(indices), np.zeros((2, 2, 4), f32))
    layer.backward(criterion.backward())
    assert isinstance(layer.weight.grad, RowSparseGrad)
    optimizer.step()
    changed = np.any(layer.weight.data != before, axis=1)
    np.testing.assert_array_equal(np.flatnonzero(changed), [1, 2, 7])
    plain = nn.Embedding(10, 4, rng=0)
    SGD(plain.parameters(), lr=0.1)
    assert isinstance(plain.weight, Parameter)
