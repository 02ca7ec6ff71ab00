"""Attention and the Transformer encoder with torch.nn's names, numbers and initialization,
plus positional embeddings and a residual container.

- :class:`MultiheadAttention` is ``torch.nn.MultiheadAttention`` for ``kdim = vdim =
  embed_dim`` (no ``add_bias_kv``, ``add_zero_attn``): ``in_proj_weight`` (3E, E) ~ xavier
  uniform, ``in_proj_bias`` zeros, ``out_proj`` a Linear (U(-1/sqrt(E), 1/sqrt(E)) weight) with
  its bias zeroed, as torch's ``_reset_parameters``. All heads are computed at once with
  batched matmuls over (N, heads, L, head_dim).
- :class:`TransformerEncoderLayer` and :class:`TransformerEncoder` have torch's submodule
  names, so their state dicts are torch's (``self_attn.in_proj_weight``, ``linear1.weight``,
  ``norm1.weight``, ``layers.0.self_attn.in_proj_weight``, ...).
- :class:`PositionalEmbedding` (a learned table, N(0, 1) as torch's Embedding) and
  :class:`SinusoidalPositionalEncoding` (the fixed table of "Attention is all you need") add
  a position's vector to each position of a (*, L, E) input.
- :class:`Residual` is ``x + Sequential(*modules)(x)``.

Masks follow torch: a bool mask is True where attention is *not* allowed (it becomes -inf),
a float mask is added to the attention scores. A row of scores that is entirely -inf (a
query that may attend to nothing) gives NaN with ``need_weights=True`` (torch's softmax of
-inf) and zeros with ``need_weights=False`` (torch's scaled_dot_product_attention, which the
Transformer layers use): the output row is then the output projection's bias.

``MultiheadAttention.backward(grad_output)`` returns the gradient of each distinct input:
one array for self-attention (``query is key is value``: the sum of the three gradients);
otherwise the tuple ``(d_query, d_key, d_value)``, where an argument that is the same array
as an earlier one gets None and its gradient is in the earlier entry (``key is value``:
``(d_query, d_key + d_value, None)``). The attention weights returned with
``need_weights`` are a by-product: no gradient flows into them.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from shardstep.workers.nn import functional as F
from shardstep.workers.nn.checks import flag, float_array, integer, real
from shardstep.workers.nn.layers import (
    GELU,
    Dropout,
    LayerNorm,
    Linear,
    ReLU,
    Sequential,
    _grad_like,
    _size,
)
from shardstep.workers.nn.module import Module, accumulate_grad, as_generator, float_dtype
from shardstep.workers.optim.parameter import Parameter

ACTIVATIONS = {"relu": ReLU, "gelu": GELU}


# -- masks ---------------------------------------------------------------------------------------

def _mask_array(owner: str, name: str, mask, dtype: np.dtype) -> np.ndarray:
    """A bool mask (True = not allowed) as an additive float mask (-inf / 0), or a float mask
    cast to ``dtype``; anything else is refused."""
    array = np.asarray(mask)
    if array.dtype == np.bool_:
        return np.where(array, dtype.type(-np.inf), dtype.type(0))
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{owner}: {name} must be a bool array (True = not allowed) or a float array "
                        f"(added to the attention scores); got dtype {array.dtype}")
    return array.astype(dtype, copy=False)


def causal_mask(size: int, dtype=np.float32) -> np.ndarray:
    """torch's ``Transformer.generate_square_subsequent_mask``: -inf above the diagonal, 0 elsewhere."""
    return np.triu(np.full((size, size), -np.inf, dtype=np.dtype(dtype)), k=1)


def _causal(tgt_len: int, src_len: int, dtype: np.dtype) -> np.ndarray:
    """scaled_dot_product_attention's ``is_causal`` mask: query i sees keys 0..i (top-left aligned)."""
    return np.triu(np.full((tgt_len, src_len), -np.inf, dtype=dtype), k=1)


def _attention_softmax(scores: np.ndarray, safe: bool) -> np.ndarray:
    """softmax over the last axis, in place. A row that is entirely -inf gives zeros with
    ``safe`` (torch's _safe_softmax in scaled_dot_product_attention) and NaN otherwise (torch's
    softmax); NaN scores propagate."""
    top = scores.max(axis=-1, keepdims=True)
    empty = np.isneginf(top)
    if empty.any():
        top[empty] = 0
    np.subtract(scores, top, out=scores)
    np.exp(scores, out=scores)
    total = scores.sum(axis=-1, keepdims=True)
    if empty.any():
        total[empty] = 1 if safe else np.nan
    scores /= total
    return scores


# -- multi-head attention ---------------------------------------------------------------------------

class MultiheadAttention(Module):
    """torch.nn.MultiheadAttention (query, key and value of ``embed_dim`` features).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (output, weights or None)`` with torch's
    shapes: (L, N, E) (``batch_first=False``), (N, L, E) (``batch_first=True``) or (L, E)
    unbatched; key and value (S, N, E) / (N, S, E) / (S, E). ``attn_mask`` is (L, S) or
    (N * num_heads, L, S) ((num_heads, L, S) unbatched), ``key_padding_mask`` (N, S) ((S,)
    unbatched), each bool or float. ``is_causal`` needs ``attn_mask`` as in torch, and, as in
    torch, replaces it by the causal mask when there is no ``key_padding_mask`` and
    ``need_weights=False``. The weights are averaged over the heads, (N, L, S), or per head,
    (N, num_heads, L, S), with ``average_attn_weights=False``.

    In training with ``dropout > 0`` the attention weights are dropped out (the returned
    weights too, as torch's), with masks from ``rng``, or from the step's ``noise`` inside a task.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False, dtype=np.float32, rng=None):
        super().__init__()
        owner = "MultiheadAttention"
        self.embed_dim = integer(owner, "embed_dim", embed_dim)
        self.num_heads = integer(owner, "num_heads", num_heads)
        if self.embed_dim <= 0 or self.num_heads <= 0:
            raise ValueError(f"{owner}: embed_dim and num_heads must be > 0; got embed_dim={embed_dim}, "
                             f"num_heads={num_heads}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{owner}: embed_dim must be divisible by num_heads; got embed_dim={embed_dim}, "
                             f"num_heads={num_heads}")
        self.head_dim = self.embed_dim // self.num_heads
        p = real(owner, "dropout", dropout)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{owner}: dropout (the probability of an attention weight to be zeroed) must be in "
                             f"[0, 1]; got {dropout}")
        self.dropout = p
        self.bias_enabled = flag(owner, "bias", bias)
        self.batch_first = flag(owner, "batch_first", batch_first)
        dtype = float_dtype(dtype, owner)
        generator = as_generator(rng, owner)
        bound = math.sqrt(6.0 / (self.embed_dim + 3 * self.embed_dim))     # xavier_uniform_ of (3E, E)
        self.in_proj_weight = Parameter(generator.uniform(-bound, bound, (3 * self.embed_dim, self.embed_dim))
                                        .astype(dtype), name="in_proj_weight")
        self.in_proj_bias = Parameter(np.zeros(3 * self.embed_dim, dtype), name="in_proj_bias") if bias else None
        self.out_proj = Linear(self.embed_dim, self.embed_dim, bias=bias, dtype=dtype, rng=generator)
        if bias:
            self.out_proj.bias.data[...] = 0
        self.rng = generator
        self.noise = None

    # -- checks ---------------------------------------------------------------------------------

    def _inputs(self, query, key, value):
        owner = type(self).__name__
        dtype = self.in_proj_weight.dtype
        arrays = []
        for name, x in (("query", query), ("key", key), ("value", value)):
            x = float_array(owner, name, x)
            if x.dtype != dtype:
                raise TypeError(f"{owner}: {name} dtype {x.dtype} must match the layer's dtype {dtype}")
            arrays.append(x)
        query, key, value = arrays
        layout = "(N, L, E)" if self.batch_first else "(L, N, E)"
        if query.ndim not in (2, 3):
            raise ValueError(f"{owner}: query must be batched {layout} or unbatched (L, E) with "
                             f"E = embed_dim = {self.embed_dim}; got shape {query.shape}")
        for name, x in (("query", query), ("key", key), ("value", value)):
            if x.ndim != query.ndim:
                raise ValueError(f"{owner}: for a {query.ndim}-D query, {name} must be {query.ndim}-D too; "
                                 f"got shape {x.shape}")
            if x.shape[-1] != self.embed_dim:
                raise ValueError(f"{owner}: {name} must have embed_dim = {self.embed_dim} features in its last "
                                 f"axis; got shape {x.shape}")
        if key.shape != value.shape:
            raise ValueError(f"{owner}: key and value must have the same shape; got key {key.shape}, "
                             f"value {value.shape}")
        batched = query.ndim == 3
        if batched:
            batch_axis = 0 if self.batch_first else 1
            if key.shape[batch_axis] != query.shape[batch_axis]:
                raise ValueError(f"{owner}: key and value must have the query's batch size "
                                 f"{query.shape[batch_axis]} (axis {batch_axis}); got key {key.shape}")
        return query, key, value, batched

    def _merged_mask(self, attn_mask, key_padding_mask, batch: int, tgt_len: int, src_len: int, batched: bool,
                     need_weights: bool, is_causal: bool, dtype: np.dtype):
        """The additive mask, broadcastable to the scores (N, heads, L, S), or None."""
        owner = type(self).__name__
        heads = self.num_heads
        if is_causal and attn_mask is None:
            raise ValueError(f"{owner}: is_causal=True needs attn_mask (as torch: pass the causal mask, e.g. "
                             f"causal_mask(L)); got attn_mask=None")
        padding = None
        if key_padding_mask is not None:
            padding = _mask_array(owner, "key_padding_mask", key_padding_mask, dtype)
            wanted = (batch, src_len) if batched else (src_len,)
            if padding.shape != wanted:
                shape = f"(N, S) = {wanted}" if batched else f"(S,) = {wanted}"
                raise ValueError(f"{owner}: key_padding_mask must have shape {shape}; got {padding.shape}")
            padding = padding.reshape(batch, 1, 1, src_len)
        mask = None
        if attn_mask is not None:
            mask = _mask_array(owner, "attn_mask", attn_mask, dtype)
            three = (batch * heads, tgt_len, src_len) if batched else (heads, tgt_len, src_len)
            if mask.shape == (tgt_len, src_len):
                mask = mask.reshape(1, 1, tgt_len, src_len)
            elif mask.shape == three:
                mask = mask.reshape(batch, heads, tgt_len, src_len)
            else:
                what = "N * num_heads" if batched else "num_heads"
                raise ValueError(f"{owner}: attn_mask must have shape (L, S) = {(tgt_len, src_len)} or "
                                 f"({what}, L, S) = {three}; got {mask.shape}")
            if is_causal and padding is None and not need_weights:
                # torch hands the hint to scaled_dot_product_attention and drops the mask
                mask = _causal(tgt_len, src_len, dtype).reshape(1, 1, tgt_len, src_len)
        if padding is None:
            return mask
        return padding if mask is None else mask + padding

    # -- computation ------------------------------------------------------------------------------

    def _heads(self, x: np.ndarray) -> np.ndarray:
        """(N, L, E) -> (N, heads, L, head_dim), a view."""
        n, length, _ = x.shape
        return x.reshape(n, length, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def _merge(self, x: np.ndarray) -> np.ndarray:
        """(N, heads, L, head_dim) -> (N, L, E), contiguous."""
        n, _, length, _ = x.shape
        return x.transpose(0, 2, 1, 3).reshape(n, length, self.embed_dim)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True, attn_mask=None,
                average_attn_weights: bool = True, is_causal: bool = False):
        owner = type(self).__name__
        same = (query is key, key is value, query is value)
        need_weights = flag(owner, "need_weights", need_weights)
        average_attn_weights = flag(owner, "average_attn_weights", average_attn_weights)
        is_causal = flag(owner, "is_causal", is_causal)
        query, key, value, batched = self._inputs(query, key, value)
        dtype = query.dtype

        def batch_major(x):                    # -> (N, L, E)
            if not batched:
                return x[None]
            return x if self.batch_first else x.transpose(1, 0, 2)

        q_in, k_in, v_in = batch_major(query), batch_major(key), batch_major(value)
        batch, tgt_len, src_len = q_in.shape[0], q_in.shape[1], k_in.shape[1]
        mask = self._merged_mask(attn_mask, key_padding_mask, batch, tgt_len, src_len, batched, need_weights,
                                 is_causal, dtype)

        weight = self.in_proj_weight.data
        bias = None if self.in_proj_bias is None else self.in_proj_bias.data
        e = self.embed_dim

        def project(x, rows):
            return F.linear(x, weight[rows], None if bias is None else bias[rows])

        if all(same):                          # self-attention: one matmul for q, k and v
            qkv = project(q_in, slice(0, 3 * e))
            q, k, v = qkv[..., :e], qkv[..., e:2 * e], qkv[..., 2 * e:]
        elif same[1]:                          # key is value: one matmul for k and v
            q = project(q_in, slice(0, e))
            kv = project(k_in, slice(e, 3 * e))
            k, v = kv[..., :e], kv[..., e:]
        else:
            q, k, v = project(q_in, slice(0, e)), project(k_in, slice(e, 2 * e)), project(v_in, slice(2 * e, 3 * e))
        scale = dtype.type(math.sqrt(1.0 / self.head_dim))
        q_scaled = self._heads(q) * scale       # torch scales q before the product
        k_heads, v_heads = self._heads(k), self._heads(v)
        scores = np.matmul(q_scaled, k_heads.transpose(0, 1, 3, 2))
        if mask is not None:
            scores += mask
        with np.errstate(invalid="ignore"):     # inf - inf only where a row is NaN already
            probs = _attention_softmax(scores, safe=not need_weights)
        keep = None
        if self.training and self.dropout > 0.0:
            shape = probs.shape
            if self.noise is not None and batched:
                keep = self.noise.mask(shape, self.dropout, dtype)
            else:
                keep = F.dropout_mask(shape, self.dropout, dtype, self.rng)
        dropped = probs if keep is None else probs * keep
        attended = self._merge(np.matmul(dropped, v_heads))
        output = self.out_proj(attended)
        self._cache = (same, batched, (q_in, k_in, v_in), q_scaled, k_heads, v_heads, probs, keep, dropped,
                       query.shape)
        if not batched:
            output = output[0]
        elif not self.batch_first:
            output = output.transpose(1, 0, 2)
        weights = None
        if need_weights:
            weights = dropped.mean(axis=1) if average_attn_weights else dropped
            if not batched:
                weights = weights[0]
        return output, weights

    def backward(self, grad_output, need_input_grad: bool = True):
        """Accumulate the parameters' gradients; return the inputs' (see the module's docstring:
        one array for self-attention, else ``(d_query, d_key, d_value)`` with None for a repeat),
        or None if not ``need_input_grad``."""
        same, batched, inputs, q_scaled, k_heads, v_heads, probs, keep, dropped, out_shape = self._cached()
        grad = _grad_like(type(self).__name__, grad_output, out_shape, self.in_proj_weight.dtype)
        if not batched:
            grad = grad[None]
        elif not self.batch_first:
            grad = grad.transpose(1, 0, 2)
        d_attended = self._heads(self.out_proj.backward(grad))
        d_dropped = np.matmul(d_attended, v_heads.transpose(0, 1, 3, 2))
        d_v = np.matmul(dropped.transpose(0, 1, 3, 2), d_attended)
        if keep is not None:
            d_dropped *= keep
        with np.errstate(invalid="ignore"):     # NaN rows (a query with nothing to attend to) stay NaN
            d_scores = np.multiply(d_dropped, probs, out=d_dropped)              # p * dp, in place
            d_scores -= probs * d_scores.sum(axis=-1, keepdims=True)             # p * (dp - sum(p * dp))
        scale = q_scaled.dtype.type(math.sqrt(1.0 / self.head_dim))
        d_q = np.matmul(d_scores, k_heads)
        d_q *= scale
        d_k = np.matmul(d_scores.transpose(0, 1, 3, 2), q_scaled)
        d_q, d_k, d_v = self._merge(d_q), self._merge(d_k), self._merge(d_v)
        weight = self.in_proj_weight.data
        e = self.embed_dim
        q_in = inputs[0]
        if all(same):
            d_qkv = np.concatenate([d_q, d_k, d_v], axis=-1)
            rows = d_qkv.reshape(-1, 3 * e)
            accumulate_grad(self.in_proj_weight, rows.T @ q_in.reshape(-1, e))
            if self.in_proj_bias is not None:
                accumulate_grad(self.in_proj_bias, rows.sum(axis=0))
            if not need_input_grad:
                return None
            return self._layout((rows @ weight).reshape(q_in.shape), batched)
        grads = (d_q, d_k, d_v)
        d_weight = np.concatenate([g.reshape(-1, e).T @ x.reshape(-1, e) for g, x in zip(grads, inputs)], axis=0)
        accumulate_grad(self.in_proj_weight, d_weight)
        if self.in_proj_bias is not None:
            accumulate_grad(self.in_proj_bias, np.concatenate([g.reshape(-1, e).sum(axis=0) for g in grads]))
        if not need_input_grad:
            return None
        d_inputs = [(g.reshape(-1, e) @ weight[i * e:(i + 1) * e]).reshape(x.shape)
                    for i, (g, x) in enumerate(zip(grads, inputs))]
        query_is_key, key_is_value, query_is_value = same
        if key_is_value:
            d_inputs[1], d_inputs[2] = d_inputs[1] + d_inputs[2], None
        elif query_is_key:
            d_inputs[0], d_inputs[1] = d_inputs[0] + d_inputs[1], None
        elif query_is_value:
            d_inputs[0], d_inputs[2] = d_inputs[0] + d_inputs[2], None
        return tuple(None if g is None else self._layout(g, batched) for g in d_inputs)

    def _layout(self, x: np.ndarray, batched: bool) -> np.ndarray:
        """(N, L, E) back to the caller's layout."""
        if not batched:
            return x[0]
        return x if self.batch_first else x.transpose(1, 0, 2)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"bias={self.bias_enabled}, batch_first={self.batch_first}")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.extra_repr()})\n  (out_proj): " + repr(self.out_proj))


# -- the Transformer encoder ------------------------------------------------------------------------

class TransformerEncoderLayer(Module):
    """torch.nn.TransformerEncoderLayer: self-attention and a feed-forward block, each with a
    residual connection and a LayerNorm after it (``norm_first=False``, post-norm) or before
    it (``norm_first=True``, pre-norm). ``forward(src, src_mask=None, src_key_padding_mask=None,
    is_causal=False)`` calls ``self_attn`` with ``need_weights=False`` as torch does (a query
    with nothing to attend to gets zeros, not NaN). ``backward`` returns d src."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, dtype=np.float32, rng=None):
        super().__init__()
        owner = "TransformerEncoderLayer"
        if activation not in ACTIVATIONS:
            raise ValueError(f"{owner}: activation must be 'relu' or 'gelu'; got {activation!r}")
        d_model, nhead = integer(owner, "d_model", d_model), integer(owner, "nhead", nhead)
        if d_model <= 0 or nhead <= 0 or d_model % nhead:
            raise ValueError(f"{owner}: d_model must be a positive multiple of nhead (> 0); got d_model={d_model}, "
                             f"nhead={nhead}")
        dim_feedforward = _size(owner, "dim_feedforward", dim_feedforward)
        self.norm_first = flag(owner, "norm_first", norm_first)
        generator = as_generator(rng, owner)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias, batch_first=batch_first,
                                            dtype=dtype, rng=generator)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias, dtype=dtype, rng=generator)
        self.dropout = Dropout(dropout, rng=generator)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias, dtype=dtype, rng=generator)
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias, dtype=dtype)
        self.dropout1 = Dropout(dropout, rng=generator)
        self.dropout2 = Dropout(dropout, rng=generator)
        self.activation = ACTIVATIONS[activation]()
        self.activation_name = activation

    def _sa_block(self, x, src_mask, src_key_padding_mask, is_causal):
        out, _ = self.self_attn(x, x, x, attn_mask=src_mask, key_padding_mask=src_key_padding_mask,
                                need_weights=False, is_causal=is_causal)
        return self.dropout1(out)

    def _sa_block_backward(self, grad, need_input_grad=True):
        return self.self_attn.backward(self.dropout1.backward(grad), need_input_grad=need_input_grad)

    def _ff_block(self, x):
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def _ff_block_backward(self, grad):
        grad = self.linear2.backward(self.dropout2.backward(grad))
        return self.linear1.backward(self.activation.backward(self.dropout.backward(grad)))

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal: bool = False) -> np.ndarray:
        owner = type(self).__name__
        src = float_array(owner, "src", src)
        d_model = self.self_attn.embed_dim
        if src.ndim not in (2, 3) or src.shape[-1] != d_model:
            layout = "(N, L, d_model)" if self.self_attn.batch_first else "(L, N, d_model)"
            raise ValueError(f"{owner}: src must be {layout} or unbatched (L, d_model) with d_model = {d_model}; "
                             f"got shape {src.shape}")
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal))
            x = self.norm2(x + self._ff_block(x))
        self._cache = (src.shape, src.dtype)
        return x

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        shape, dtype = self._cached()
        grad = _grad_like(type(self).__name__, grad_output, shape, dtype)
        if self.norm_first:
            grad = grad + self.norm2.backward(self._ff_block_backward(grad))
            d_attention = self._sa_block_backward(grad)
            if not need_input_grad:
                self.norm1.backward(d_attention, need_input_grad=False)
                return None
            return grad + self.norm1.backward(d_attention)
        grad = self.norm2.backward(grad)
        grad = self.norm1.backward(grad + self._ff_block_backward(grad))
        d_attention = self._sa_block_backward(grad, need_input_grad)
        return None if not need_input_grad else grad + d_attention

    def extra_repr(self) -> str:
        return f"activation={self.activation_name!r}, norm_first={self.norm_first}"


def _detect_is_causal(mask: np.ndarray | None, is_causal: bool | None, size: int) -> bool:
    """torch's _detect_is_causal_mask: the hint if given, else whether ``mask`` is exactly the
    causal mask of ``size`` (-inf above the diagonal, 0 elsewhere)."""
    if is_causal is not None or mask is None:
        return is_causal is True
    return mask.shape == (size, size) and bool(np.array_equal(mask, causal_mask(size, mask.dtype)))


class TransformerEncoder(Module):
    """torch.nn.TransformerEncoder: ``num_layers`` deep copies of ``encoder_layer`` (identical
    initial parameters, as torch's clones) in ``layers`` ("layers.0.self_attn.in_proj_weight",
    ...), then ``norm`` if given. Each copy's dropout generator is spawned afresh from the
    layer's, so copies draw different masks. ``forward(src, mask=None,
    src_key_padding_mask=None, is_causal=None)``: with ``is_causal=None`` a mask equal to the
    causal mask counts as causal, as torch's. ``enable_nested_tensor`` and ``mask_check`` are
    accepted and ignored: torch's nested-tensor fast path is an evaluation-time optimization
    with the same numbers, and there is none here."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int, norm: Module | None = None,
                 enable_nested_tensor: bool = True, mask_check: bool = True):
        super().__init__()
        owner = "TransformerEncoder"
        flag(owner, "enable_nested_tensor", enable_nested_tensor)     # accepted as torch's; no nested tensors here
        flag(owner, "mask_check", mask_check)
        if not isinstance(encoder_layer, TransformerEncoderLayer):
            raise TypeError(f"{owner}: encoder_layer must be a TransformerEncoderLayer; "
                            f"got {type(encoder_layer).__name__}")
        self.num_layers = _size(owner, "num_layers", num_layers)
        if norm is not None and not isinstance(norm, Module):
            raise TypeError(f"{owner}: norm must be a Module or None; got {type(norm).__name__}")
        self.layers = Sequential(*(_clone(encoder_layer) for _ in range(self.num_layers)))
        self.norm = norm

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal: bool | None = None) -> np.ndarray:
        src = float_array("TransformerEncoder", "src", src)
        first = self.layers[0].self_attn if self.num_layers else None
        if mask is not None:
            mask = _mask_array("TransformerEncoder", "mask", mask, src.dtype)
        if first is not None and src.ndim == 3:
            seq_len = src.shape[1 if first.batch_first else 0]
        else:
            seq_len = src.shape[0] if src.ndim else 0
        is_causal = _detect_is_causal(mask, is_causal, seq_len)
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        if self.norm is not None:
            output = self.norm(output)
        self._cache = (src.shape, src.dtype)
        return output

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        shape, dtype = self._cached()
        grad = _grad_like("TransformerEncoder", grad_output, shape, dtype)
        if self.norm is not None:
            grad = self.norm.backward(grad, need_input_grad=True)
        return self.layers.backward(grad, need_input_grad=need_input_grad)


def _clone(layer: Module) -> Module:
    """A deep copy whose generators (shared ones stay shared) are spawned from the originals."""
    clone = copy.deepcopy(layer)
    spawned: dict[int, np.random.Generator] = {}
    for (_, original), (_, copied) in zip(layer.named_modules(), clone.named_modules()):
        generator = original.__dict__.get("rng")
        if isinstance(generator, np.random.Generator):
            if id(generator) not in spawned:
                spawned[id(generator)] = generator.spawn(1)[0]
            object.__setattr__(copied, "rng", spawned[id(generator)])
    return clone


# -- positions -----------------------------------------------------------------------------------------

def _positions_input(owner: str, x, num_positions: int | None, embedding_dim: int) -> np.ndarray:
    x = float_array(owner, "input", x)
    if x.ndim < 2 or x.shape[-1] != embedding_dim:
        raise ValueError(f"{owner}: input must have shape (*, L, embedding_dim={embedding_dim}); got {x.shape}")
    if num_positions is not None and x.shape[-2] > num_positions:
        raise ValueError(f"{owner}: the input's length L = {x.shape[-2]} (axis -2) exceeds the {num_positions} "
                         f"positions of the table")
    return x


class PositionalEmbedding(Module):
    """A learned position table: ``x + weight[:L]`` for an input (*, L, embedding_dim), e.g.
    (N, L, E) batch first; ``weight`` (num_positions, embedding_dim) ~ N(0, 1), torch's
    Embedding initialization. torch has no such module: its counterpart is
    ``x + torch.nn.Embedding(num_positions, embedding_dim).weight[:L]``."""

    def __init__(self, num_positions: int, embedding_dim: int, dtype=np.float32, rng=None):
        super().__init__()
        owner = "PositionalEmbedding"
        self.num_positions = _size(owner, "num_positions", num_positions)
        self.embedding_dim = _size(owner, "embedding_dim", embedding_dim)
        dtype = float_dtype(dtype, owner)
        weight = as_generator(rng, owner).standard_normal((self.num_positions, self.embedding_dim))
        self.weight = Parameter(weight.astype(dtype), name="weight")

    def forward(self, x) -> np.ndarray:
        x = _positions_input("PositionalEmbedding", x, self.num_positions, self.embedding_dim)
        if x.dtype != self.weight.dtype:
            raise TypeError(f"PositionalEmbedding: input dtype {x.dtype} must match the layer's dtype "
                            f"{self.weight.dtype}")
        self._cache = (x.shape, x.dtype)
        return x + self.weight.data[:x.shape[-2]]

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        shape, dtype = self._cached()
        grad = _grad_like("PositionalEmbedding", grad_output, shape, dtype)
        d_weight = np.zeros_like(self.weight.data)
        d_weight[:shape[-2]] = grad.reshape(-1, *shape[-2:]).sum(axis=0)
        accumulate_grad(self.weight, d_weight)
        return grad if need_input_grad else None

    def extra_repr(self) -> str:
        return f"{self.num_positions}, {self.embedding_dim}"


def sinusoidal_table(length: int, embedding_dim: int) -> np.ndarray:
    """PE[pos, 2i] = sin(pos / 10000^(2i / d)), PE[pos, 2i + 1] = cos(pos / 10000^(2i / d)),
    in float64 (an odd d has one more sine column than cosine)."""
    position = np.arange(length, dtype=np.float64)[:, None]
    frequency = np.exp(np.arange(0, embedding_dim, 2, dtype=np.float64) * (-math.log(10000.0) / embedding_dim))
    table = np.zeros((length, embedding_dim))
    table[:, 0::2] = np.sin(position * frequency)
    table[:, 1::2] = np.cos(position * frequency[:embedding_dim // 2])
    return table


class SinusoidalPositionalEncoding(Module):
    """The fixed encoding of "Attention is all you need" (:func:`sinusoidal_table`) added to
    an input (*, L, embedding_dim): ``x + PE[:L]``, the table rounded to the input's dtype. No
    parameters; L may be up to ``max_len``."""

    def __init__(self, embedding_dim: int, max_len: int = 5000):
        super().__init__()
        owner = "SinusoidalPositionalEncoding"
        self.embedding_dim = _size(owner, "embedding_dim", embedding_dim)
        self.max_len = _size(owner, "max_len", max_len)
        self._tables: dict[np.dtype, np.ndarray] = {}

    def table(self, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        if dtype not in self._tables:
            self._tables[dtype] = sinusoidal_table(self.max_len, self.embedding_dim).astype(dtype)
        return self._tables[dtype]

    def forward(self, x) -> np.ndarray:
        x = _positions_input("SinusoidalPositionalEncoding", x, self.max_len, self.embedding_dim)
        self._cache = (x.shape, x.dtype)
        return x + self.table(x.dtype)[:x.shape[-2]]

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        shape, dtype = self._cached()
        grad = _grad_like("SinusoidalPositionalEncoding", grad_output, shape, dtype)
        return grad if need_input_grad else None

    def extra_repr(self) -> str:
        return f"{self.embedding_dim}, max_len={self.max_len}"


# -- residual ----------------------------------------------------------------------------------------

class Residual(Sequential):
    """``x + Sequential(*modules)(x)``: children named "0", "1", ... (or by one mapping's keys),
    so a model's dotted names ("2.1.weight") are those of a torch module built the same way
    (a ``torch.nn.Sequential`` subclass whose forward is ``x + super().forward(x)``). The
    modules must give an output of the input's shape."""

    def forward(self, x) -> np.ndarray:
        x = float_array("Residual", "input", x)
        output = super().forward(x)
        if np.shape(output) != x.shape:
            raise ValueError(f"Residual: the modules must keep the input's shape {x.shape}; they give "
                             f"{np.shape(output)}")
        self._cache = (x.shape, x.dtype)
        return x + output

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        shape, dtype = self._cached()
        grad = _grad_like("Residual", grad_output, shape, dtype)
        inner = super().backward(grad, need_input_grad=need_input_grad)
        return grad + inner if need_input_grad else None
