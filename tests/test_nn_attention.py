"""MultiheadAttention, the Transformer encoder, positions and Residual beyond the parity
matrix (tests/fixtures/make_nn_fixtures.py): parameter names and state dicts shared with
torch, initialization, the backward's return convention, attention dropout, and torch's
is_causal and fully-masked-row behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from shardstep.workers import nn
from shardstep.workers.nn.layers import BatchNoise
from tests.conftest import require_torch

f32, f64 = np.float32, np.float64


def test_parameter_names_are_torchs():
    attention = nn.MultiheadAttention(8, 2, rng=0)
    assert [(n, p.shape) for n, p in attention.named_parameters()] == [
        ("in_proj_weight", (24, 8)), ("in_proj_bias", (24,)), ("out_proj.weight", (8, 8)), ("out_proj.bias", (8,))]
    assert [n for n, _ in nn.MultiheadAttention(8, 2, bias=False, rng=0).named_parameters()] == [
        "in_proj_weight", "out_proj.weight"]
    layer = nn.TransformerEncoderLayer(8, 2, 16, rng=0)
    assert list(layer.state_dict()) == [
        "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
        "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias", "norm1.weight", "norm1.bias",
        "norm2.weight", "norm2.bias"]
    encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8))
    names = list(encoder.state_dict())
    assert names[0] == "layers.0.self_attn.in_proj_weight" and names[12] == "layers.1.self_attn.in_proj_weight"
    assert names[-2:] == ["norm.weight", "norm.bias"]
    model = nn.Sequential(nn.Linear(4, 8, rng=0), nn.ReLU(), nn.Residual(nn.LayerNorm(8), nn.Linear(8, 8, rng=1)))
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "2.0.weight", "2.0.bias",
                                                        "2.1.weight", "2.1.bias"]


@pytest.mark.torch_live
def test_state_dicts_move_between_torch_and_shardstep():
    torch = require_torch()
    torch.manual_seed(0)
    theirs = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, dtype=torch.float64),
                                         2, norm=torch.nn.LayerNorm(8, dtype=torch.float64), enable_nested_tensor=False)
    ours = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, dtype=f64, rng=0), 2,
                                 norm=nn.LayerNorm(8, dtype=f64))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    x = np.random.default_rng(1).standard_normal((5, 3, 8))
    np.testing.assert_allclose(ours(x), theirs(torch.tensor(x)).detach().numpy(), rtol=1e-10, atol=1e-12)
    fresh = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, dtype=f64, rng=5), 2,
                                  norm=nn.LayerNorm(8, dtype=f64))
    theirs.load_state_dict({k: torch.tensor(v) for k, v in fresh.state_dict().items()})
    np.testing.assert_allclose(fresh(x), theirs(torch.tensor(x)).detach().numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [f32, f64])
def test_initialization(dtype):
    attention = nn.MultiheadAttention(64, 4, dtype=dtype, rng=0)
    weight = attention.in_proj_weight.data
    bound = np.sqrt(6.0 / (64 + 3 * 64))             # xavier_uniform_ of (3E, E)
    assert weight.dtype == dtype and np.abs(weight).max() <= bound and np.abs(weight).max() > 0.95 * bound
    assert abs(weight.std() - bound / np.sqrt(3)) < 0.05 * bound
    assert np.all(attention.in_proj_bias.data == 0) and np.all(attention.out_proj.bias.data == 0)
    out = attention.out_proj.weight.data
    assert np.abs(out).max() <= 1 / 8 and np.abs(out).max() > 0.95 / 8   # Linear's U(-1/sqrt(E), 1/sqrt(E))
    table = nn.PositionalEmbedding(256, 64, dtype=dtype, rng=0).weight.data
    assert abs(table.mean()) < 0.02 and abs(table.std() - 1) < 0.02
    again = nn.MultiheadAttention(64, 4, dtype=dtype, rng=0)
    np.testing.assert_array_equal(again.in_proj_weight.data, weight)


def test_encoder_copies_start_equal_and_draw_their_own_dropout():
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.5, rng=0), 2)
    first, second = encoder.layers[0], encoder.layers[1]
    for (_, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        np.testing.assert_array_equal(a.data, b.data)
        assert a is not b
    assert first.dropout.rng is first.dropout1.rng is first.self_attn.rng    # shared within a copy
    assert first.dropout.rng is not second.dropout.rng
    ones = np.ones((4, 8), f32)
    assert not np.array_equal(first.dropout(ones), second.dropout(ones))


def test_backward_returns_one_gradient_per_distinct_input():
    rng = np.random.default_rng(0)
    attention = nn.MultiheadAttention(8, 2, dtype=f64, rng=0)
    x, y, z = (rng.standard_normal((s, 2, 8)) for s in (3, 5, 5))
    grad = rng.standard_normal((3, 2, 8))
    attention(x, x, x)
    d_self = attention.backward(grad)
    assert isinstance(d_self, np.ndarray) and d_self.shape == x.shape
    attention(x, x.copy(), x.copy())
    d_all = attention.backward(grad)
    np.testing.assert_allclose(d_self, d_all[0] + d_all[1] + d_all[2], rtol=1e-12, atol=1e-14)
    attention(x, y, y)
    d_query, d_key_value, none = attention.backward(grad)
    assert none is None and d_key_value.shape == y.shape
    attention(x, y, y.copy())
    d_separate = attention.backward(grad)
    np.testing.assert_allclose(d_key_value, d_separate[1] + d_separate[2], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(d_query, d_separate[0], rtol=1e-12)
    attention.zero_grad()
    attention(x, y, z)
    assert attention.backward(grad, need_input_grad=False) is None
    assert attention.in_proj_weight.grad is not None


def test_attention_dropout_in_training_only():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8)).astype(f32)
    attention = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True, rng=0)
    _, weights = attention(x, x, x, average_attn_weights=False)
    kept = weights[weights != 0]
    assert 0 < kept.size < weights.size and np.all(kept > 0)
    # the kept weights are scaled by 1 / (1 - p) = 2, half are dropped: rows sum to 1 on average
    assert abs(weights.sum(-1).mean() - 1.0) < 0.5
    d_input = attention.backward(np.ones_like(x))
    assert np.all(np.isfinite(d_input))
    same = nn.MultiheadAttention(8, 2, dropout=0.5, batch_first=True, rng=0)
    np.testing.assert_array_equal(same(x, x, x, average_attn_weights=False)[1], weights)   # a function of the seed
    attention.eval()
    _, weights = attention(x, x, x)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    attention.train()
    attention.noise = BatchNoise((1, 2, 3), offset=0, total=2)
    first = attention(x, x, x, average_attn_weights=False)[1]
    attention.noise = BatchNoise((1, 2, 3), offset=0, total=2)
    np.testing.assert_array_equal(attention(x, x, x, average_attn_weights=False)[1], first)


def test_unbatched_inputs_give_unbatched_outputs():
    rng = np.random.default_rng(0)
    attention = nn.MultiheadAttention(8, 2, dtype=f64, rng=0)
    x = rng.standard_normal((3, 8))
    output, weights = attention(x, x, x)
    batched, batched_weights = attention(x[:, None], x[:, None], x[:, None])
    assert output.shape == (3, 8) and weights.shape == (3, 3)
    np.testing.assert_allclose(output, batched[:, 0], rtol=1e-12)
    np.testing.assert_allclose(weights, batched_weights[0], rtol=1e-12)


@pytest.mark.torch_live
@pytest.mark.parametrize("need_weights", [True, False])
def test_is_causal_follows_torch(need_weights):
    """torch drops attn_mask for the causal hint when there is no key_padding_mask and
    need_weights=False, and uses attn_mask otherwise; a wrong hint then gives what torch gives."""
    torch = require_torch()
    rng = np.random.default_rng(0)
    ours = nn.MultiheadAttention(8, 2, dtype=f64, rng=0)
    theirs = torch.nn.MultiheadAttention(8, 2, dtype=torch.float64)
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    x = rng.standard_normal((4, 2, 8))
    wrong = rng.standard_normal((4, 4))
    output, _ = ours(x, x, x, attn_mask=wrong, is_causal=True, need_weights=need_weights)
    expected, _ = theirs(*[torch.tensor(x)] * 3, attn_mask=torch.tensor(wrong), is_causal=True,
                         need_weights=need_weights)
    np.testing.assert_allclose(output, expected.detach().numpy(), rtol=1e-10, atol=1e-12)
    causal, _ = ours(x, x, x, attn_mask=nn.causal_mask(4, f64), need_weights=need_weights)
    assert np.allclose(output, causal) == (not need_weights)


def test_fully_masked_queries():
    """A query that may attend to nothing: NaN with need_weights=True, as torch's softmax;
    the output projection's bias with need_weights=False, as torch's scaled_dot_product_attention."""
    rng = np.random.default_rng(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=True, dtype=f64, rng=0)
    attention.out_proj.bias.data[...] = np.arange(8)
    x = rng.standard_normal((2, 3, 8))
    padding = np.array([[False, False, False], [True, True, True]])
    output, weights = attention(x, x, x, key_padding_mask=padding)
    assert np.all(np.isnan(output[1])) and np.all(np.isnan(weights[1])) and np.all(np.isfinite(output[0]))
    with np.errstate(all="raise"):
        output, _ = attention(x, x, x, key_padding_mask=padding, need_weights=False)
        d_input = attention.backward(np.ones_like(x))
    np.testing.assert_array_equal(output[1], np.broadcast_to(np.arange(8.0), (3, 8)))
    assert np.all(np.isfinite(d_input)) and np.all(np.isfinite(output))


def test_transformer_encoder_detects_a_causal_mask():
    rng = np.random.default_rng(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, dtype=f64, rng=0), 2)
    x = rng.standard_normal((4, 2, 8))
    as_float = encoder(x, mask=nn.causal_mask(4, f64))
    as_bool = encoder(x, mask=np.triu(np.ones((4, 4), bool), k=1))
    np.testing.assert_allclose(as_float, as_bool, rtol=1e-12)
    np.testing.assert_array_equal(nn.causal_mask(3), np.array([[0, -np.inf, -np.inf], [0, 0, -np.inf], [0, 0, 0]],
                                                              f32))


def test_sinusoidal_table_is_the_papers():
    table = nn.SinusoidalPositionalEncoding(6, max_len=10).table(f64)
    pos, i = 7, 1
    assert table[pos, 2 * i] == pytest.approx(np.sin(pos / 10000 ** (2 * i / 6)), rel=1e-12)
    assert table[pos, 2 * i + 1] == pytest.approx(np.cos(pos / 10000 ** (2 * i / 6)), rel=1e-12)
    encoding = nn.SinusoidalPositionalEncoding(6, max_len=10)
    x = np.zeros((2, 4, 6), f32)
    np.testing.assert_array_equal(encoding(x)[1], table[:4].astype(f32))
    assert encoding.parameters() == [] and encoding.state_dict() == {}


def test_residual_and_positions_backward():
    rng = np.random.default_rng(0)
    block = nn.Residual(nn.Linear(4, 4, dtype=f64, rng=0))
    x, grad = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    np.testing.assert_allclose(block(x), x + block[0](x), rtol=1e-12)
    np.testing.assert_allclose(block.backward(grad), grad + grad @ block[0].weight.data, rtol=1e-12)
    assert block.backward(grad, need_input_grad=False) is None
    positions = nn.PositionalEmbedding(5, 4, dtype=f64, rng=0)
    positions(rng.standard_normal((2, 3, 4)))
    positions.backward(np.ones((2, 3, 4)))
    np.testing.assert_array_equal(positions.weight.grad, np.array([[2.0] * 4] * 3 + [[0.0] * 4] * 2))
