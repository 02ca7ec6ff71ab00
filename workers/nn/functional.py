"""The math of every layer and loss: pure functions, one implementation each.

Losses come in pairs: ``<loss>_forward(...) -> (output, saved)`` computes the value with
torch's semantics and returns what the gradient needs in a named tuple; and
``<loss>_backward(saved, grad_output) -> gradient(s)`` is the vector-Jacobian product for
each non-target input. The loss classes (``shardstep.workers.nn.losses``) and tasks share these::

    value, saved = cross_entropy_forward(logits, labels)       # 0-d array for 'mean'
    dlogits = cross_entropy_backward(saved, 1.0)

Outputs keep the inputs' float dtype (float32 in, float32 out). A loss reduced with 'mean'
or 'sum' is a 0-d array; with 'none' an array of the per-element losses. NaN in an input
propagates to the outputs and gradients it touches, as in torch; BCELoss is the exception,
which, like torch, rejects inputs outside [0, 1] (NaN included).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from shardstep.workers.nn import kernels
from shardstep.workers.nn.checks import (
    broadcast_weight,
    class_weight,
    flag,
    float_array,
    grad_output_array,
    integer,
    numeric_like,
    real,
    reduction_name,
    same_dtype,
    same_shape,
)
from shardstep.workers.optim.parameter import RowSparseGrad

# torch clamps BCELoss's logarithms at -100 (so log(0) is finite) and guards the gradient's
# denominator x (1 - x) from below by 1e-12 (aten/src/ATen/native/Loss.cpp).
BCE_LOG_FLOOR = -100.0
BCE_GRAD_EPSILON = 1e-12
# added to both squared magnitudes in CosineEmbeddingLoss (aten/src/ATen/native/Loss.cpp)
COSINE_EPSILON = 1e-12


# -- shared pieces ------------------------------------------------------------------------

def _reduce(losses: np.ndarray, reduction: str, mean_count=None) -> np.ndarray:
    """'none' keeps the per-element losses; 'sum' adds them; 'mean' divides the sum by
    ``mean_count`` (default: the number of elements). 0 / 0 is NaN, as in torch."""
    if reduction == "none":
        return losses
    total = np.asarray(losses.sum(dtype=losses.dtype))
    if reduction == "sum":
        return total
    count = losses.size if mean_count is None else mean_count
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.divide(total, np.asarray(count, dtype=losses.dtype)))


def _upstream(owner: str, grad_output, reduction: str, out_shape, dtype, mean_count=None):
    """The gradient reaching each unreduced loss element: ``grad_output`` itself ('none', 'sum')
    or divided by the mean's count. Broadcasts against the unreduced losses."""
    grad = grad_output_array(owner, grad_output, reduction, out_shape, dtype)
    if reduction == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            grad = np.divide(grad, np.asarray(mean_count, dtype=dtype))
    return grad


def _sign(x: np.ndarray) -> np.ndarray:
    """torch.sign for real arrays: -1, 0 or 1, and 0 for NaN (numpy's sign gives NaN)."""
    return (x > 0).astype(x.dtype) - (x < 0).astype(x.dtype)


def softmax_axis(owner: str, dim, ndim: int) -> int:
    """``dim`` checked against an ``ndim``-d input and made non-negative (a 0-d input has one axis)."""
    dim = integer(owner, "dim", dim)
    size = max(ndim, 1)
    if not -size <= dim < size:
        raise IndexError(f"{owner}: dim must be in [{-size}, {size - 1}] for a {ndim}-d input; got {dim}")
    return dim % size


def implicit_softmax_dim(ndim: int) -> int:
    """torch's legacy choice when Softmax/LogSoftmax get dim=None: 0 for 0-, 1- and 3-d
    inputs, else 1 (torch.nn.functional._get_softmax_dim)."""
    return 0 if ndim in (0, 1, 3) else 1


# -- activations ----------------------------------------------------------------------------

def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)  # NaN propagates, as torch's clamp_min


def relu_backward(grad: np.ndarray, x: np.ndarray) -> np.ndarray:
    """torch's threshold_backward: zero where x <= 0, so the gradient passes through a NaN input."""
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty_like(flat)
    kernels.relu_backward(flat, np.ascontiguousarray(grad, dtype=x.dtype).reshape(-1), out)
    return out.reshape(x.shape)


def tanh(x: np.ndarray) -> np.ndarray:
    return np.tanh(x)


def tanh_backward(grad: np.ndarray, output: np.ndarray) -> np.ndarray:
    return grad * (1 - output * output)


GELU_APPROXIMATIONS = ("none", "tanh")


def gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    flat = np.ascontiguousarray(x).reshape(-1)
    out = np.empty_like(flat)
    (kernels.gelu_erf if approximate == "none" else kernels.gelu_tanh)(flat, out)
    return out.reshape(x.shape)


def gelu_backward(grad: np.ndarray, x: np.ndarray, approximate: str = "none") -> np.ndarray:
    flat = np.ascontiguousarray(x).reshape(-1)
    grad_flat = np.ascontiguousarray(grad, dtype=x.dtype).reshape(-1)
    out = np.empty_like(flat)
    (kernels.gelu_erf_backward if approximate == "none" else kernels.gelu_tanh_backward)(flat, grad_flat, out)
    return out.reshape(x.shape)


def dropout_mask(shape, p: float, dtype, rng: np.random.Generator) -> np.ndarray:
    """torch's dropout noise: 1 / (1 - p) with probability 1 - p, else 0 (all zeros at p = 1)."""
    if p >= 1.0:
        return np.zeros(shape, dtype=dtype)
    keep = rng.random(shape, dtype=np.float64 if np.dtype(dtype) == np.float64 else np.float32) >= p
    return keep.astype(dtype) * np.asarray(1.0 / (1.0 - p), dtype=dtype)


def batch_dropout_mask(shape, p: float, dtype, words: tuple[int, ...], offset: int, total: int) -> np.ndarray:
    """Rows ``offset .. offset + shape[0] - 1`` of the dropout noise of a whole global batch of
    ``total`` rows drawn from ``default_rng(words)``: an example's mask depends on its place in
    the global batch, never on how the batch is cut into shards and micro-batches."""
    if offset < 0 or offset + shape[0] > total:
        raise ValueError(f"dropout inside a task draws one mask per example along the first axis; rows "
                         f"{offset}..{offset + shape[0] - 1} lie outside the global batch of {total} examples "
                         f"(is the batch on another axis? use batch_first=True)")
    whole = dropout_mask((total, *shape[1:]), p, dtype, np.random.default_rng(list(words)))
    return whole[offset:offset + shape[0]]


# -- softmax --------------------------------------------------------------------------------

def log_softmax(x: np.ndarray, dim: int) -> np.ndarray:
    """x - max - log(sum(exp(x - max))) along ``dim``: no overflow at any finite input."""
    if x.ndim == 0:
        return np.zeros_like(x)
    shift = x.max(axis=dim, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        shifted = x - shift
        return shifted - np.log(np.exp(shifted).sum(axis=dim, keepdims=True))


def log_softmax_backward(grad: np.ndarray, output: np.ndarray, dim: int) -> np.ndarray:
    if output.ndim == 0:
        return np.zeros_like(output)
    return grad - np.exp(output) * grad.sum(axis=dim, keepdims=True)


def softmax(x: np.ndarray, dim: int) -> np.ndarray:
    if x.ndim == 0:
        return np.ones_like(x)
    with np.errstate(invalid="ignore", over="ignore"):
        exps = np.exp(x - x.max(axis=dim, keepdims=True))
        return exps / exps.sum(axis=dim, keepdims=True)


def softmax_backward(grad: np.ndarray, output: np.ndarray, dim: int) -> np.ndarray:
    if output.ndim == 0:
        return np.zeros_like(output)
    return output * (grad - (grad * output).sum(axis=dim, keepdims=True))


# -- linear and embedding -------------------------------------------------------------------

def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """y = x W^T + b over the last axis of x; W has torch's (out_features, in_features) layout.
    Leading axes are folded into one first: numpy would otherwise run one small matmul per row
    of a (N, L, in) input (10x slower for (512, 3, 128))."""
    out = _rows(x) @ weight.T
    if x.ndim > 2:
        out = out.reshape(*x.shape[:-1], weight.shape[0])
    if bias is not None:
        out += bias
    return out


def linear_backward(grad: np.ndarray, x: np.ndarray, weight: np.ndarray, with_bias: bool,
                    need_input_grad: bool = True):
    """(d_input or None, d_weight, d_bias or None) for :func:`linear`; leading axes are batch axes."""
    grad_rows = grad.reshape(-1, weight.shape[0])
    x_rows = x.reshape(-1, weight.shape[1])
    d_weight = grad_rows.T @ x_rows
    d_bias = grad_rows.sum(axis=0) if with_bias else None
    d_input = None
    if need_input_grad:
        d_input = grad_rows @ weight if grad.ndim > 2 else grad @ weight
        d_input = d_input.reshape(*grad.shape[:-1], weight.shape[1])
    return d_input, d_weight, d_bias


def _rows(x: np.ndarray) -> np.ndarray:
    """x with its leading axes folded into one (x itself when it has at most two)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1]) if x.ndim > 2 else x


def embedding(indices: np.ndarray, weight: np.ndarray) -> np.ndarray:
    return weight[indices]


def embedding_backward(grad: np.ndarray, indices: np.ndarray, num_embeddings: int,
                       padding_idx: int | None, sparse: bool):
    """The weight's gradient: a :class:`RowSparseGrad` with one row per looked-up index
    (repeats not summed, as torch's uncoalesced sparse gradient) when ``sparse``, else dense.
    The padding row gets nothing."""
    rows = indices.reshape(-1).astype(np.int64, copy=False)
    values = grad.reshape(rows.size, -1)
    dim = values.shape[1]
    if padding_idx is not None:
        keep = rows != padding_idx
        if not keep.all():
            rows, values = rows[keep], values[keep]
    if sparse:
        return RowSparseGrad(rows, np.ascontiguousarray(values), (num_embeddings, dim))
    dense = np.zeros((num_embeddings, dim), dtype=grad.dtype)
    np.add.at(dense, rows, values)
    return dense


# -- NLLLoss and CrossEntropyLoss -----------------------------------------------------------

def _classes_last(owner: str, name: str, x: np.ndarray) -> np.ndarray:
    """(C,) -> (1, C); (N, C) as is; (N, C, d1, ...) -> (N * d1 * ..., C)."""
    if x.ndim == 0:
        raise ValueError(f"{owner}: {name} must have a class dimension, shape (C,), (N, C) or "
                         f"(N, C, d1, ...); got a 0-d array")
    class_axis = 0 if x.ndim == 1 else 1
    if x.shape[class_axis] == 0:
        raise ValueError(f"{owner}: {name} must have at least one class; got shape {x.shape}")
    if x.ndim == 1:
        return x[None, :]
    if x.ndim == 2:
        return x
    return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])


def _classes_back(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`_classes_last` for an array of the input's shape."""
    if len(shape) <= 2:
        return rows.reshape(shape)
    moved = rows.reshape(shape[0], *shape[2:], shape[1])
    return np.ascontiguousarray(np.moveaxis(moved, -1, 1))


def _batch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a class-index target (and of the 'none' output) for an input shape."""
    return () if len(shape) == 1 else (shape[0], *shape[2:])


def _class_targets(owner: str, target, input_shape, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(target rows with ignored entries set to class 0, mask of the entries not ignored)."""
    target = np.asarray(target)
    if target.dtype == np.bool_ or not np.issubdtype(target.dtype, np.integer):
        raise TypeError(
            f"{owner}: a class-index target must be an integer array; got dtype {target.dtype} "
            f"with shape {target.shape} (class probabilities must have the input's shape "
            f"{tuple(input_shape)} and a float dtype)"
        )
    expected = _batch_shape(tuple(input_shape))
    if target.shape != expected:
        raise ValueError(
            f"{owner}: a class-index target for input of shape {tuple(input_shape)} must have "
            f"shape {expected}; got {target.shape}"
        )
    classes = input_shape[0 if len(input_shape) == 1 else 1]
    rows = target.reshape(-1).astype(np.int64, copy=False)
    valid = rows != ignore_index
    out_of_range = valid & ((rows < 0) | (rows >= classes))
    if out_of_range.any():
        raise IndexError(
            f"{owner}: target class index {rows[out_of_range][0]} is out of range: allowed "
            f"[0, {classes}) or ignore_index={ignore_index}"
        )
    return np.where(valid, rows, 0), valid


class NLLSaved(NamedTuple):
    input_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    dtype: np.dtype
    reduction: str
    target: np.ndarray         # (M,) class per row, ignored rows set to 0
    valid: np.ndarray          # (M,) bool: not ignore_index
    target_weight: np.ndarray  # (M,) weight[target], 0 where ignored
    total_weight: np.ndarray   # 0-d: the 'mean' denominator


def _nll_rows(log_probs: np.ndarray, target: np.ndarray, valid: np.ndarray, weight):
    """Per-row -weight[t] * log_probs[t] (0 where ignored) and the row weights."""
    rows = np.arange(target.size)
    if weight is None:
        target_weight = valid.astype(log_probs.dtype)
    else:
        target_weight = np.where(valid, weight[target], np.zeros((), dtype=log_probs.dtype))
    picked = log_probs[rows, target]
    with np.errstate(invalid="ignore"):
        losses = np.where(valid, -target_weight * picked, np.zeros((), dtype=log_probs.dtype))
    return losses, target_weight


def nll_loss_forward(input, target, weight=None, ignore_index: int = -100, reduction: str = "mean"):
    """torch.nn.functional.nll_loss: loss_n = -weight[t_n] * input[n, t_n]; 'mean' divides by
    the sum of weight[t_n] over the entries not equal to ``ignore_index``."""
    owner = "NLLLoss"
    reduction = reduction_name(owner, reduction)
    ignore_index = integer(owner, "ignore_index", ignore_index)
    input = float_array(owner, "input", input)
    rows = _classes_last(owner, "input", input)
    weight = class_weight(owner, weight, rows.shape[1], input.dtype)
    target_rows, valid = _class_targets(owner, target, input.shape, ignore_index)
    losses, target_weight = _nll_rows(rows, target_rows, valid, weight)
    total_weight = np.asarray(target_weight.sum(dtype=input.dtype))
    out_shape = _batch_shape(input.shape)
    output = _reduce(losses.reshape(out_shape), reduction, total_weight)
    saved = NLLSaved(input.shape, out_shape, input.dtype, reduction, target_rows, valid,
                     target_weight, total_weight)
    return output, saved


def _nll_target_grad(owner: str, saved, grad_output) -> np.ndarray:
    """d loss / d input[n, t_n] for each row (the only non-zero entry of the row)."""
    grad = _upstream(owner, grad_output, saved.reduction, saved.out_shape, saved.dtype, saved.total_weight)
    grad = np.broadcast_to(grad, saved.out_shape).reshape(-1)
    with np.errstate(invalid="ignore"):
        return np.where(saved.valid, -saved.target_weight * grad, np.zeros((), dtype=saved.dtype))


def nll_loss_backward(saved: NLLSaved, grad_output=1.0) -> np.ndarray:
    target_grad = _nll_target_grad("NLLLoss", saved, grad_output)
    classes = saved.input_shape[0 if len(saved.input_shape) == 1 else 1]
    grad_rows = np.zeros((target_grad.size, classes), dtype=saved.dtype)
    grad_rows[np.arange(target_grad.size), saved.target] = target_grad
    return _classes_back(grad_rows, saved.input_shape)


class CrossEntropySaved(NamedTuple):
    input_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    dtype: np.dtype
    reduction: str
    log_probs: np.ndarray                 # (M, C)
    weight: np.ndarray | None
    label_smoothing: float
    nll: NLLSaved | None                  # class-index targets
    weighted_target: np.ndarray | None    # class-probability targets: (M, C) target * weight
    mean_count: int                       # class-probability targets: the 'mean' denominator


def cross_entropy_forward(input, target, weight=None, ignore_index: int = -100,
                          reduction: str = "mean", label_smoothing: float = 0.0):
    """torch.nn.functional.cross_entropy: log_softmax over the class axis, then

    - integer target (class indices): NLLLoss; with label smoothing ``s``,
      ``(1 - s) * nll + s / C * smooth`` where ``smooth_n = -sum_c weight[c] * logp[n, c]``
      over the rows not ignored, and 'mean' divides both parts by the NLL's denominator;
    - float target of the input's shape (class probabilities ``q``, smoothed to
      ``q (1 - s) + s / C``): ``loss_n = -sum_c weight[c] q[n, c] logp[n, c]``, and 'mean'
      divides by the number of rows N * d1 * ... (not by the weights).
    """
    owner = "CrossEntropyLoss"
    reduction = reduction_name(owner, reduction)
    ignore_index = integer(owner, "ignore_index", ignore_index)
    label_smoothing = real(owner, "label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{owner}: label_smoothing must be in [0, 1]; got {label_smoothing}")
    input = float_array(owner, "input", input)
    rows = _classes_last(owner, "input", input)
    classes = rows.shape[1]
    weight = class_weight(owner, weight, classes, input.dtype)
    log_probs = log_softmax(rows, dim=1)
    out_shape = _batch_shape(input.shape)
    target_array = np.asarray(target)

    if target_array.shape == input.shape and target_array.dtype != np.bool_:
        if not np.issubdtype(target_array.dtype, np.floating):
            raise TypeError(
                f"{owner}: a target of the input's shape {input.shape} holds class probabilities "
                f"and must have a float dtype; got {target_array.dtype}"
            )
        if ignore_index >= 0:
            raise ValueError(
                f"{owner}: ignore_index is not supported with class-probability targets; "
                f"got ignore_index={ignore_index} (allowed: any negative value)"
            )
        probs = _classes_last(owner, "target", target_array.astype(input.dtype, copy=False))
        if label_smoothing > 0:
            probs = probs * (1 - label_smoothing) + label_smoothing / classes
        weighted_target = probs if weight is None else probs * weight
        with np.errstate(invalid="ignore"):
            losses = -(log_probs * weighted_target).sum(axis=1)
        mean_count = rows.shape[0]
        output = _reduce(losses.reshape(out_shape), reduction, mean_count)
        nll = None
    else:
        target_rows, valid = _class_targets(owner, target_array, input.shape, ignore_index)
        nll_losses, target_weight = _nll_rows(log_probs, target_rows, valid, weight)
        total_weight = np.asarray(target_weight.sum(dtype=input.dtype))
        nll = NLLSaved(input.shape, out_shape, input.dtype, reduction, target_rows, valid,
                       target_weight, total_weight)
        nll_out = _reduce(nll_losses.reshape(out_shape), reduction, total_weight)
        if label_smoothing > 0:
            weighted = log_probs if weight is None else log_probs * weight
            with np.errstate(invalid="ignore"):
                smooth = np.where(valid, -weighted.sum(axis=1), np.zeros((), dtype=input.dtype))
            smooth_out = _reduce(smooth.reshape(out_shape), reduction, total_weight)
            output = (1 - label_smoothing) * nll_out + smooth_out * (label_smoothing / classes)
            output = np.asarray(output, dtype=input.dtype)
        else:
            output = nll_out
        weighted_target, mean_count = None, 0
    saved = CrossEntropySaved(input.shape, out_shape, input.dtype, reduction, log_probs, weight,
                              label_smoothing, nll, weighted_target, mean_count)
    return output, saved


def cross_entropy_backward(saved: CrossEntropySaved, grad_output=1.0) -> np.ndarray:
    """d loss / d input: the gradient with respect to the log-probabilities, then through
    log_softmax (g - softmax * sum(g))."""
    owner = "CrossEntropyLoss"
    nll = saved.nll
    dtype, log_probs = saved.dtype, saved.log_probs
    probs = np.exp(log_probs)
    if nll is None:
        grad = _upstream(owner, grad_output, saved.reduction, saved.out_shape, dtype, saved.mean_count)
        grad = np.broadcast_to(grad, saved.out_shape).reshape(-1, 1)
        with np.errstate(invalid="ignore"):
            grad_log_probs = -saved.weighted_target * grad
            grad_rows = grad_log_probs - probs * grad_log_probs.sum(axis=1, keepdims=True)
        return _classes_back(grad_rows, saved.input_shape)

    smoothing = saved.label_smoothing
    classes = log_probs.shape[1]
    # the NLL part touches only the target column of each row
    target_grad = _nll_target_grad(owner, nll, grad_output)
    if smoothing > 0:
        target_grad = target_grad * np.asarray(1 - smoothing, dtype=dtype)
    row_total = target_grad
    with np.errstate(invalid="ignore"):
        if smoothing > 0:
            grad = _upstream(owner, grad_output, nll.reduction, nll.out_shape, dtype, nll.total_weight)
            grad = np.broadcast_to(grad, nll.out_shape).reshape(-1)
            smooth_grad = np.where(nll.valid, grad, np.zeros((), dtype=dtype))
            smooth_grad = smooth_grad * np.asarray(-smoothing / classes, dtype=dtype)
            class_weights = np.ones(classes, dtype=dtype) if saved.weight is None else saved.weight
            row_total = row_total + smooth_grad * class_weights.sum(dtype=dtype)
            grad_rows = smooth_grad[:, None] * class_weights - probs * row_total[:, None]
        else:
            grad_rows = probs * -row_total[:, None]
    grad_rows[np.arange(target_grad.size), nll.target] += target_grad
    return _classes_back(grad_rows, saved.input_shape)


# -- TripletMarginLoss ----------------------------------------------------------------------

def _vector_norm(x: np.ndarray, p: float) -> np.ndarray:
    """torch.norm(x, p, dim=-1) for any real p (0 counts non-zeros; +-inf: max/min |x|)."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if p == 2.0:
            return np.sqrt((x * x).sum(axis=-1))
        magnitude = np.abs(x)
        if p == 1.0:
            return magnitude.sum(axis=-1)
        if p == np.inf:
            return magnitude.max(axis=-1)
        if p == -np.inf:
            return magnitude.min(axis=-1)
        if p == 0.0:
            return (x != 0).sum(axis=-1).astype(x.dtype)
        return (magnitude ** p).sum(axis=-1) ** (1.0 / p)


def _vector_norm_backward(x: np.ndarray, norm: np.ndarray, grad: np.ndarray, p: float) -> np.ndarray:
    """d norm / d x times ``grad`` (one per row), with torch's conventions: zero where the norm
    is zero, the gradient of a max split evenly among ties (torch's norm_backward)."""
    dtype = x.dtype
    zero = np.zeros((), dtype=dtype)
    norm, grad = norm[..., None], grad[..., None]
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if p == 0.0:
            return np.zeros_like(x)
        if p == 1.0:
            return _sign(x) * grad
        if p == 2.0:
            return grad * np.where(norm == 0, zero, x / norm)
        magnitude = np.abs(x)
        if np.isinf(p):
            mask = (magnitude == norm) | np.isnan(magnitude)
            return _sign(x) * ((grad / mask.sum(axis=-1, keepdims=True).astype(dtype)) * mask)
        if p < 1.0:
            scaled = np.where(x == 0, zero, _sign(x) * magnitude ** (p - 1))
            return scaled * grad * norm ** (1 - p)
        scale = np.where(norm == 0, zero, grad / norm ** (p - 1))
        if p < 2.0:
            return _sign(x) * magnitude ** (p - 1) * scale
        return x * magnitude ** (p - 2) * scale


class TripletSaved(NamedTuple):
    out_shape: tuple[int, ...]
    dtype: np.dtype
    reduction: str
    p: float
    diff_ap: np.ndarray      # anchor - positive + eps
    diff_an: np.ndarray      # anchor - negative + eps
    diff_pn: np.ndarray | None  # positive - negative + eps (swap)
    dist_ap: np.ndarray
    dist_an: np.ndarray
    dist_pn: np.ndarray | None
    active: np.ndarray       # margin + d(a, p) - d(a, n) >= 0: where the hinge passes gradient


def triplet_margin_loss_forward(anchor, positive, negative, margin: float = 1.0, p: float = 2.0,
                                eps: float = 1e-6, swap: bool = False, reduction: str = "mean"):
    """torch.nn.functional.triplet_margin_loss (Balntas et al. 2016):
    ``max(margin + d(a, p) - d(a, n), 0)`` with ``d(x, y) = ||x - y + eps||_p`` over the last
    axis; with ``swap``, d(a, n) is replaced by min(d(a, n), d(p, n))."""
    owner = "TripletMarginLoss"
    reduction = reduction_name(owner, reduction)
    margin = real(owner, "margin", margin)
    if margin <= 0:
        raise ValueError(f"{owner}: margin must be > 0; got {margin}")
    p = real(owner, "p", p)
    eps = real(owner, "eps", eps)
    swap = flag(owner, "swap", swap)
    names = ("anchor", "positive", "negative")
    arrays = tuple(float_array(owner, n, a) for n, a in zip(names, (anchor, positive, negative)))
    dtype = same_dtype(owner, names, arrays)
    shape = same_shape(owner, names, arrays)
    if len(shape) not in (1, 2):
        raise ValueError(f"{owner}: anchor, positive and negative must be 1-D (D,) or 2-D (N, D); "
                         f"got shape {shape}")
    if shape[-1] == 0:
        raise ValueError(f"{owner}: the embedding dimension must be at least 1; got shape {shape}")
    anchor, positive, negative = arrays
    eps_value = np.asarray(eps, dtype=dtype)
    diff_ap = anchor - positive + eps_value
    diff_an = anchor - negative + eps_value
    dist_ap = _vector_norm(diff_ap, p)
    dist_an = _vector_norm(diff_an, p)
    diff_pn = dist_pn = None
    dist_neg = dist_an
    if swap:
        diff_pn = positive - negative + eps_value
        dist_pn = _vector_norm(diff_pn, p)
        dist_neg = np.minimum(dist_an, dist_pn)
    with np.errstate(invalid="ignore"):
        hinge = margin + dist_ap - dist_neg
        active = hinge >= 0
        losses = np.maximum(hinge, 0)
    out_shape = shape[:-1]
    output = _reduce(np.asarray(losses, dtype=dtype), reduction)
    saved = TripletSaved(out_shape, dtype, reduction, p, diff_ap, diff_an, diff_pn,
                         dist_ap, dist_an, dist_pn, np.asarray(active))
    return output, saved


def triplet_margin_loss_backward(saved: TripletSaved, grad_output=1.0):
    """(d_anchor, d_positive, d_negative)."""
    dtype, zero = saved.dtype, np.zeros((), dtype=saved.dtype)
    count = int(np.prod(saved.out_shape))
    grad = _upstream("TripletMarginLoss", grad_output, saved.reduction, saved.out_shape, dtype, count)
    grad = np.where(saved.active, np.broadcast_to(grad, saved.out_shape), zero)
    grad_dist_an = -grad
    if saved.diff_pn is not None:
        # torch's minimum backward: the smaller side gets the gradient, a tie splits it evenly,
        # and with NaN on either side both get it
        half = np.asarray(0.5, dtype=dtype)
        with np.errstate(invalid="ignore"):
            tie = saved.dist_an == saved.dist_pn
            to_an = np.where(saved.dist_an > saved.dist_pn, zero, np.where(tie, grad_dist_an * half, grad_dist_an))
            to_pn = np.where(saved.dist_an < saved.dist_pn, zero, np.where(tie, grad_dist_an * half, grad_dist_an))
        grad_dist_an = to_an
    d_ap = _vector_norm_backward(saved.diff_ap, saved.dist_ap, grad, saved.p)
    d_an = _vector_norm_backward(saved.diff_an, saved.dist_an, grad_dist_an, saved.p)
    d_anchor = d_ap + d_an
    d_positive = -d_ap
    d_negative = -d_an
    if saved.diff_pn is not None:
        d_pn = _vector_norm_backward(saved.diff_pn, saved.dist_pn, to_pn, saved.p)
        d_positive = d_positive + d_pn
        d_negative = d_negative - d_pn
    return d_anchor, d_positive, d_negative


# -- elementwise regression losses ------------------------------------------------------------

class PointwiseSaved(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    reduction: str
    diff: np.ndarray   # input - target
    parameter: float   # beta (SmoothL1Loss) or delta (HuberLoss); 0 otherwise


def _input_and_target(owner: str, input, target) -> tuple[np.ndarray, np.ndarray]:
    input = float_array(owner, "input", input)
    target = numeric_like(owner, "target", target, input.dtype)
    same_shape(owner, ("input", "target"), (input, target))
    return input, target


def _pointwise(owner, input, target, reduction, parameter, losses_of):
    reduction = reduction_name(owner, reduction)
    input, target = _input_and_target(owner, input, target)
    diff = input - target
    with np.errstate(invalid="ignore", over="ignore"):
        losses = losses_of(diff)
    return _reduce(losses, reduction), PointwiseSaved(input.shape, input.dtype, reduction, diff, parameter)


def _pointwise_upstream(owner, saved: PointwiseSaved, grad_output):
    return _upstream(owner, grad_output, saved.reduction, saved.shape, saved.dtype, int(np.prod(saved.shape)))


def mse_loss_forward(input, target, reduction: str = "mean"):
    """(input - target)^2."""
    return _pointwise("MSELoss", input, target, reduction, 0.0, lambda d: d * d)


def mse_loss_backward(saved: PointwiseSaved, grad_output=1.0) -> np.ndarray:
    grad = _pointwise_upstream("MSELoss", saved, grad_output)
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(2 * saved.diff * grad, dtype=saved.dtype)


def l1_loss_forward(input, target, reduction: str = "mean"):
    """|input - target|; its gradient is sign(input - target), 0 at a tie (and at NaN, as torch)."""
    return _pointwise("L1Loss", input, target, reduction, 0.0, np.abs)


def l1_loss_backward(saved: PointwiseSaved, grad_output=1.0) -> np.ndarray:
    grad = _pointwise_upstream("L1Loss", saved, grad_output)
    return np.asarray(_sign(saved.diff) * grad, dtype=saved.dtype)


def smooth_l1_loss_forward(input, target, reduction: str = "mean", beta: float = 1.0):
    """0.5 d^2 / beta where |d| < beta, else |d| - 0.5 beta (d = input - target); beta = 0 is L1."""
    owner = "SmoothL1Loss"
    beta = real(owner, "beta", beta)
    if beta < 0:
        raise ValueError(f"{owner}: beta must be >= 0; got {beta}")

    def losses_of(diff):
        magnitude = np.abs(diff)
        if beta == 0.0:
            return magnitude
        return np.where(magnitude < beta, 0.5 * magnitude * magnitude / beta, magnitude - 0.5 * beta)

    return _pointwise(owner, input, target, reduction, beta, losses_of)


def smooth_l1_loss_backward(saved: PointwiseSaved, grad_output=1.0) -> np.ndarray:
    grad = _pointwise_upstream("SmoothL1Loss", saved, grad_output)
    beta, diff = saved.parameter, saved.diff
    if beta == 0.0:
        return np.asarray(_sign(diff) * grad, dtype=saved.dtype)
    one = np.ones((), dtype=saved.dtype)
    slope = np.where(diff < -beta, -one, np.where(diff > beta, one, diff / np.asarray(beta, saved.dtype)))
    return np.asarray(slope * grad, dtype=saved.dtype)


def huber_loss_forward(input, target, reduction: str = "mean", delta: float = 1.0):
    """0.5 d^2 where |d| < delta, else delta (|d| - 0.5 delta) (d = input - target)."""
    owner = "HuberLoss"
    delta = real(owner, "delta", delta)
    if delta <= 0:
        raise ValueError(f"{owner}: delta must be > 0; got {delta}")

    def losses_of(diff):
        magnitude = np.abs(diff)
        return np.where(magnitude < delta, 0.5 * magnitude * magnitude, delta * (magnitude - 0.5 * delta))

    return _pointwise(owner, input, target, reduction, delta, losses_of)


def huber_loss_backward(saved: PointwiseSaved, grad_output=1.0) -> np.ndarray:
    grad = _pointwise_upstream("HuberLoss", saved, grad_output)
    delta = np.asarray(saved.parameter, dtype=saved.dtype)
    diff = saved.diff
    slope = np.where(diff < -delta, -delta, np.where(diff > delta, delta, diff))
    return np.asarray(slope * grad, dtype=saved.dtype)


# -- binary cross-entropy ---------------------------------------------------------------------

class BinarySaved(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    reduction: str
    input: np.ndarray
    target: np.ndarray
    weight: np.ndarray | None
    pos_weight: np.ndarray | None


def binary_cross_entropy_forward(input, target, weight=None, reduction: str = "mean"):
    """-weight (y max(log x, -100) + (1 - y) max(log(1 - x), -100)); x and y must lie in [0, 1]."""
    owner = "BCELoss"
    reduction = reduction_name(owner, reduction)
    input, target = _input_and_target(owner, input, target)
    for name, array in (("input", input), ("target", target)):
        inside = (array >= 0) & (array <= 1)
        if not inside.all():
            bad = array[~inside][0]
            raise ValueError(f"{owner}: all elements of {name} must be in [0, 1] (probabilities); "
                             f"got {bad} (use BCEWithLogitsLoss for logits)")
    weight = broadcast_weight(owner, "weight", weight, input.shape, input.dtype)
    floor = np.asarray(BCE_LOG_FLOOR, dtype=input.dtype)
    with np.errstate(divide="ignore"):
        log_x = np.maximum(np.log(input), floor)
        log_1mx = np.maximum(np.log1p(-input), floor)
    losses = (target - 1) * log_1mx - target * log_x
    if weight is not None:
        losses = losses * weight
    saved = BinarySaved(input.shape, input.dtype, reduction, input, target, weight, None)
    return _reduce(losses, reduction), saved


def binary_cross_entropy_backward(saved: BinarySaved, grad_output=1.0) -> np.ndarray:
    """torch's form: grad (x - y) / max(x (1 - x), 1e-12), times weight."""
    grad = _upstream("BCELoss", grad_output, saved.reduction, saved.shape, saved.dtype, int(np.prod(saved.shape)))
    x, y = saved.input, saved.target
    denominator = np.maximum((1 - x) * x, np.asarray(BCE_GRAD_EPSILON, dtype=saved.dtype))
    result = grad * (x - y) / denominator
    if saved.weight is not None:
        result = result * saved.weight
    return np.asarray(result, dtype=saved.dtype)


def _log_sigmoid(x: np.ndarray) -> np.ndarray:
    """log(1 / (1 + exp(-x))) = min(x, 0) - log1p(exp(-|x|)): exact and finite for any finite x."""
    return np.minimum(x, 0) - np.log1p(np.exp(-np.abs(x)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) without overflow: exp of a non-positive number only."""
    z = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + z), z / (1 + z))


def binary_cross_entropy_with_logits_forward(input, target, weight=None, reduction: str = "mean",
                                             pos_weight=None):
    """-weight (pos_weight y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))), computed as torch:
    (1 - y) x - (1 + (pos_weight - 1) y) log_sigmoid(x)."""
    owner = "BCEWithLogitsLoss"
    reduction = reduction_name(owner, reduction)
    input, target = _input_and_target(owner, input, target)
    weight = broadcast_weight(owner, "weight", weight, input.shape, input.dtype)
    pos_weight = broadcast_weight(owner, "pos_weight", pos_weight, input.shape, input.dtype)
    with np.errstate(invalid="ignore", over="ignore"):
        log_sigmoid = _log_sigmoid(input)
        if pos_weight is not None:
            log_sigmoid = log_sigmoid * ((pos_weight - 1) * target + 1)
        losses = (1 - target) * input - log_sigmoid
        if weight is not None:
            losses = losses * weight
    saved = BinarySaved(input.shape, input.dtype, reduction, input, target, weight, pos_weight)
    return _reduce(losses, reduction), saved


def binary_cross_entropy_with_logits_backward(saved: BinarySaved, grad_output=1.0) -> np.ndarray:
    grad = _upstream("BCEWithLogitsLoss", grad_output, saved.reduction, saved.shape, saved.dtype,
                     int(np.prod(saved.shape)))
    x, y = saved.input, saved.target
    with np.errstate(invalid="ignore", over="ignore"):
        if saved.pos_weight is not None:
            scaled_target = saved.pos_weight * y
            result = (scaled_target + 1 - y) * _sigmoid(x) - scaled_target
        else:
            result = _sigmoid(x) - y
        result = result * grad
        if saved.weight is not None:
            result = result * saved.weight
    return np.asarray(result, dtype=saved.dtype)


# -- KLDivLoss ----------------------------------------------------------------------------------

KL_REDUCTIONS = ("mean", "batchmean", "sum", "none")


class KLDivSaved(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    reduction: str
    target: np.ndarray
    log_target: bool


def _kl_mean_count(reduction: str, shape) -> int:
    if reduction == "batchmean":
        return shape[0] if len(shape) else 1
    return int(np.prod(shape))


def kl_div_forward(input, target, reduction: str = "mean", log_target: bool = False):
    """torch.nn.functional.kl_div with ``input`` = log q: ``target (log target - input)`` via
    xlogy (0 where target is 0), or ``exp(target) (target - input)`` when ``log_target``.
    'batchmean' divides the sum by the batch size, 'mean' by the number of elements."""
    owner = "KLDivLoss"
    reduction = reduction_name(owner, reduction, KL_REDUCTIONS)
    log_target = flag(owner, "log_target", log_target)
    input, target = _input_and_target(owner, input, target)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if log_target:
            losses = np.exp(target) * (target - input)
        else:
            # xlogy(t, t): 0 where t == 0, NaN where t is NaN
            xlogy = np.where(target == 0, np.zeros((), dtype=input.dtype), target * np.log(target))
            losses = xlogy - target * input
    if reduction in ("mean", "batchmean"):
        output = _reduce(losses, "mean", _kl_mean_count(reduction, input.shape))
    else:
        output = _reduce(losses, reduction)
    return output, KLDivSaved(input.shape, input.dtype, reduction, target, log_target)


def kl_div_backward(saved: KLDivSaved, grad_output=1.0) -> np.ndarray:
    reduction = "mean" if saved.reduction == "batchmean" else saved.reduction
    grad = _upstream("KLDivLoss", grad_output, reduction, saved.shape, saved.dtype,
                     _kl_mean_count(saved.reduction, saved.shape))
    with np.errstate(over="ignore", invalid="ignore"):
        slope = np.exp(saved.target) if saved.log_target else saved.target
        return np.asarray(-slope * grad, dtype=saved.dtype)


# -- ranking and cosine embedding -------------------------------------------------------------

def _paired_inputs(owner: str, reduction: str, margin: float, input1, input2):
    """The checked reduction, margin, two inputs and their common dtype of a loss that compares
    ``input1`` with ``input2`` under a margin."""
    reduction = reduction_name(owner, reduction)
    margin = real(owner, "margin", margin)
    x1 = float_array(owner, "input1", input1)
    x2 = float_array(owner, "input2", input2)
    dtype = same_dtype(owner, ("input1", "input2"), (x1, x2))
    return reduction, margin, x1, x2, dtype


class MarginRankingSaved(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype
    reduction: str
    target: np.ndarray
    active: np.ndarray   # -y (x1 - x2) + margin >= 0


def margin_ranking_loss_forward(input1, input2, target, margin: float = 0.0, reduction: str = "mean"):
    """max(0, -y (x1 - x2) + margin) with y = 1 (x1 should rank higher) or -1 (torch does not
    check y's values, nor does this)."""
    owner = "MarginRankingLoss"
    reduction, margin, x1, x2, dtype = _paired_inputs(owner, reduction, margin, input1, input2)
    target = numeric_like(owner, "target", target, dtype)
    same_shape(owner, ("input1", "input2", "target"), (x1, x2, target))
    with np.errstate(invalid="ignore", over="ignore"):
        hinge = -target * (x1 - x2) + margin
        losses = np.maximum(hinge, 0)
        active = hinge >= 0
    saved = MarginRankingSaved(x1.shape, dtype, reduction, target, active)
    return _reduce(np.asarray(losses, dtype=dtype), reduction), saved


def margin_ranking_loss_backward(saved: MarginRankingSaved, grad_output=1.0):
    """(d_input1, d_input2)."""
    grad = _upstream("MarginRankingLoss", grad_output, saved.reduction, saved.shape, saved.dtype,
                     int(np.prod(saved.shape)))
    zero = np.zeros((), dtype=saved.dtype)
    with np.errstate(invalid="ignore"):
        d_input1 = np.where(saved.active, -saved.target * grad, zero)
        d_input2 = np.where(saved.active, saved.target * grad, zero)
    return np.asarray(d_input1, dtype=saved.dtype), np.asarray(d_input2, dtype=saved.dtype)


class CosineEmbeddingSaved(NamedTuple):
    out_shape: tuple[int, ...]
    dtype: np.dtype
    reduction: str
    input1: np.ndarray
    input2: np.ndarray
    squared1: np.ndarray   # |x1|^2 + 1e-12
    squared2: np.ndarray
    denominator: np.ndarray  # sqrt(squared1 * squared2)
    cosine: np.ndarray
    cosine_grad: np.ndarray  # d loss_n / d cos_n


def cosine_embedding_loss_forward(input1, input2, target, margin: float = 0.0, reduction: str = "mean"):
    """1 - cos(x1, x2) where y = 1, max(0, cos(x1, x2) - margin) where y = -1, 0 for other y
    (torch's cosine_embedding_loss, 1e-12 added to each squared norm)."""
    owner = "CosineEmbeddingLoss"
    reduction, margin, x1, x2, dtype = _paired_inputs(owner, reduction, margin, input1, input2)
    shape = same_shape(owner, ("input1", "input2"), (x1, x2))
    target = numeric_like(owner, "target", target, dtype)
    if len(shape) not in (1, 2) or target.shape != shape[:-1]:
        raise ValueError(
            f"{owner}: inputs must be (N, D) with a target of shape (N,), or (D,) with a 0-d "
            f"target; got inputs {shape} and target {target.shape}"
        )
    epsilon = np.asarray(COSINE_EPSILON, dtype=dtype)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        products = (x1 * x2).sum(axis=-1)
        squared1 = (x1 * x1).sum(axis=-1) + epsilon
        squared2 = (x2 * x2).sum(axis=-1) + epsilon
        denominator = np.sqrt(squared1 * squared2)
        cosine = products / denominator
        zero = np.zeros((), dtype=dtype)
        positive = target == 1
        negative = target == -1
        hinge = cosine - margin
        losses = np.where(positive, 1 - cosine, zero) + np.where(negative, np.maximum(hinge, 0), zero)
        cosine_grad = np.where(positive, -np.ones((), dtype=dtype),
                               np.where(negative & (hinge >= 0), np.ones((), dtype=dtype), zero))
    saved = CosineEmbeddingSaved(shape[:-1], dtype, reduction, x1, x2, squared1, squared2,
                                 denominator, np.asarray(cosine), np.asarray(cosine_grad))
    return _reduce(np.asarray(losses, dtype=dtype), reduction), saved


def cosine_embedding_loss_backward(saved: CosineEmbeddingSaved, grad_output=1.0):
    """(d_input1, d_input2) with d cos / d x1 = x2 / denominator - cos x1 / squared1."""
    count = int(np.prod(saved.out_shape))
    grad = _upstream("CosineEmbeddingLoss", grad_output, saved.reduction, saved.out_shape, saved.dtype, count)
    with np.errstate(invalid="ignore", over="ignore"):
        scale = (saved.cosine_grad * grad)[..., None]
        cosine = saved.cosine[..., None]
        denominator = saved.denominator[..., None]
        d_input1 = scale * (saved.input2 / denominator - cosine * saved.input1 / saved.squared1[..., None])
        d_input2 = scale * (saved.input1 / denominator - cosine * saved.input2 / saved.squared2[..., None])
    return np.asarray(d_input1, dtype=saved.dtype), np.asarray(d_input2, dtype=saved.dtype)


# ---------------------------------------------------------------------------------------
# 2-d convolution and pooling over (N, C, H, W): windows as strided views (im2col)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """torch's output length: floor((size + 2 padding - dilation (kernel - 1) - 1) / stride) + 1."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _windows(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int],
             out: tuple[int, int]) -> np.ndarray:
    """A read-only view (N, C, H_out, W_out, kH, kW) of the windows of a padded x."""
    n, c = x.shape[:2]
    sn, sc, sh, sw = x.strides
    return np.lib.stride_tricks.as_strided(
        x, (n, c, out[0], out[1], kernel[0], kernel[1]),
        (sn, sc, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1]), writeable=False)


def _padded(x: np.ndarray, padding: tuple[int, int], value: float = 0.0) -> np.ndarray:
    if padding == (0, 0):
        return x
    return np.pad(x, ((0, 0), (0, 0), (padding[0], padding[0]), (padding[1], padding[1])), constant_values=value)


def _scatter_windows(grad_windows: np.ndarray, shape: tuple[int, ...], stride: tuple[int, int],
                     dilation: tuple[int, int], padding: tuple[int, int]) -> np.ndarray:
    """The adjoint of :func:`_windows` (then of the padding): add every window element's
    gradient (N, C, H_out, W_out, kH, kW) back to its input position."""
    n, c, h, w = shape
    h_out, w_out, k_h, k_w = grad_windows.shape[2:]
    padded = np.zeros((n, c, h + 2 * padding[0], w + 2 * padding[1]), grad_windows.dtype)
    for i in range(k_h):
        rows = slice(i * dilation[0], i * dilation[0] + stride[0] * (h_out - 1) + 1, stride[0])
        for j in range(k_w):
            cols = slice(j * dilation[1], j * dilation[1] + stride[1] * (w_out - 1) + 1, stride[1])
            padded[:, :, rows, cols] += grad_windows[:, :, :, :, i, j]
    return padded[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + w]


def conv2d(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, stride: tuple[int, int],
           padding: tuple[int, int], dilation: tuple[int, int], groups: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's conv2d (cross-correlation) as one matmul per group over the im2col matrix;
    returns (output (N, O, H_out, W_out), the columns (G, N H_out W_out, C/G kH kW), kept for
    the backward pass)."""
    n, c, h, w = x.shape
    out_channels, per_group, k_h, k_w = weight.shape
    out = (conv_output_size(h, k_h, stride[0], padding[0], dilation[0]),
           conv_output_size(w, k_w, stride[1], padding[1], dilation[1]))
    windows = _windows(_padded(x, padding), (k_h, k_w), stride, dilation, out)
    windows = windows.reshape(n, groups, per_group, out[0], out[1], k_h, k_w)
    columns = windows.transpose(1, 0, 3, 4, 2, 5, 6).reshape(groups, n * out[0] * out[1], per_group * k_h * k_w)
    kernels = weight.reshape(groups, out_channels // groups, per_group * k_h * k_w)
    result = columns @ kernels.transpose(0, 2, 1)  # (G, N H_out W_out, O/G)
    result = result.reshape(groups, n, out[0], out[1], out_channels // groups).transpose(1, 0, 4, 2, 3)
    result = result.reshape(n, out_channels, out[0], out[1])
    if bias is not None:
        result = result + bias.reshape(1, -1, 1, 1)
    return np.ascontiguousarray(result), columns


def conv2d_backward(grad: np.ndarray, columns: np.ndarray, x_shape: tuple[int, ...], weight: np.ndarray,
                    with_bias: bool, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                    groups: int, need_input_grad: bool = True):
    """(d_input or None, d_weight, d_bias or None) for :func:`conv2d`."""
    n, out_channels, h_out, w_out = grad.shape
    _, per_group, k_h, k_w = weight.shape
    rows = grad.reshape(n, groups, out_channels // groups, h_out, w_out).transpose(1, 0, 3, 4, 2)
    rows = rows.reshape(groups, n * h_out * w_out, out_channels // groups)
    d_weight = (rows.transpose(0, 2, 1) @ columns).reshape(weight.shape)
    d_bias = grad.sum(axis=(0, 2, 3)) if with_bias else None
    d_input = None
    if need_input_grad:
        kernels = weight.reshape(groups, out_channels // groups, per_group * k_h * k_w)
        d_columns = (rows @ kernels).reshape(groups, n, h_out, w_out, per_group, k_h, k_w)
        d_windows = d_columns.transpose(1, 0, 4, 2, 3, 5, 6).reshape(n, groups * per_group, h_out, w_out, k_h, k_w)
        d_input = _scatter_windows(d_windows, x_shape, stride, dilation, padding)
    return d_input, d_weight, d_bias


def max_pool2d(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
               dilation: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """torch's max_pool2d (padding with -inf); returns (output, the flat index in each window
    of the maximum taken: the first of equal maxima, a NaN taken over any number)."""
    out = (conv_output_size(x.shape[2], kernel[0], stride[0], padding[0], dilation[0]),
           conv_output_size(x.shape[3], kernel[1], stride[1], padding[1], dilation[1]))
    windows = _windows(_padded(x, padding, -np.inf), kernel, stride, dilation, out)
    flat = windows.reshape(*windows.shape[:4], kernel[0] * kernel[1])
    chosen = flat.argmax(axis=-1)  # argmax takes the first maximum, and a NaN first of all
    return np.take_along_axis(flat, chosen[..., None], axis=-1)[..., 0], chosen


def max_pool2d_backward(grad: np.ndarray, chosen: np.ndarray, x_shape: tuple[int, ...], kernel: tuple[int, int],
                        stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> np.ndarray:
    places = np.arange(kernel[0] * kernel[1]).reshape(kernel)
    d_windows = np.where(chosen[..., None, None] == places, grad[..., None, None], np.zeros((), grad.dtype))
    return _scatter_windows(d_windows, x_shape, stride, dilation, padding)


def avg_pool2d(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
               count_include_pad: bool) -> tuple[np.ndarray, np.ndarray]:
    """torch's avg_pool2d; returns (output, the divisor of each output position)."""
    out = (conv_output_size(x.shape[2], kernel[0], stride[0], padding[0], 1),
           conv_output_size(x.shape[3], kernel[1], stride[1], padding[1], 1))
    windows = _windows(_padded(x, padding), kernel, stride, (1, 1), out)
    if count_include_pad:
        divisor = np.full(out, kernel[0] * kernel[1], x.dtype)
    else:
        ones = _padded(np.ones((1, 1, *x.shape[2:]), x.dtype), padding)
        divisor = _windows(ones, kernel, stride, (1, 1), out).sum(axis=(-2, -1))[0, 0]
    return windows.sum(axis=(-2, -1)) / divisor, divisor


def avg_pool2d_backward(grad: np.ndarray, divisor: np.ndarray, x_shape: tuple[int, ...], kernel: tuple[int, int],
                        stride: tuple[int, int], padding: tuple[int, int]) -> np.ndarray:
    share = (grad / divisor)[..., None, None]
    d_windows = np.broadcast_to(share, (*grad.shape, kernel[0], kernel[1]))
    return _scatter_windows(d_windows, x_shape, stride, (1, 1), padding)


# ---------------------------------------------------------------------------------------
# adaptive average pooling over the last axes


def adaptive_windows(size: int, out: int) -> tuple[np.ndarray, np.ndarray]:
    """torch's adaptive pooling windows: output i averages input [floor(i size / out),
    ceil((i + 1) size / out)) (aten's start_index / end_index, in integers)."""
    i = np.arange(out, dtype=np.int64)
    return (i * size) // out, -((-(i + 1) * size) // out)


def adaptive_pool_matrix(size: int, out: int, dtype) -> np.ndarray:
    """(out, size): row i is 1 / (window length) over output i's window, 0 elsewhere, so
    ``x @ matrix.T`` averages the last axis of x window by window."""
    starts, ends = adaptive_windows(size, out)
    positions = np.arange(size)
    inside = (positions >= starts[:, None]) & (positions < ends[:, None])
    return (inside / (ends - starts)[:, None]).astype(dtype)


def _along_last_axes(x: np.ndarray, matrices: list[np.ndarray]) -> np.ndarray:
    """x with ``matrices[k]`` (new size, old size) applied to its k-th of the last len(matrices)
    axes; a rectangle's mean is the product of the per-axis means, so one matmul per axis."""
    for k, matrix in enumerate(matrices):
        axis = x.ndim - len(matrices) + k
        moved = np.moveaxis(x, axis, -1)
        rows = moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1]) @ matrix.T
        x = np.moveaxis(rows.reshape(*moved.shape[:-1], matrix.shape[0]), -1, axis)
    return np.ascontiguousarray(x)


def adaptive_avg_pool(x: np.ndarray, output_size: tuple[int, ...]) -> np.ndarray:
    """torch's adaptive_avg_pool1d / 2d over the last len(output_size) axes of x."""
    sizes = x.shape[x.ndim - len(output_size):]
    return _along_last_axes(x, [adaptive_pool_matrix(size, out, x.dtype) for size, out in zip(sizes, output_size)])


def adaptive_avg_pool_backward(grad: np.ndarray, input_sizes: tuple[int, ...]) -> np.ndarray:
    """The gradient for :func:`adaptive_avg_pool`: each window's gradient shared equally by its
    elements (windows overlap when the sizes do not divide, and the shares add)."""
    outs = grad.shape[grad.ndim - len(input_sizes):]
    return _along_last_axes(grad, [adaptive_pool_matrix(size, out, grad.dtype).T
                                   for size, out in zip(input_sizes, outs)])


# ---------------------------------------------------------------------------------------
# batch normalization over the channel axis 1 of (N, C, *)


def _channel_axes(ndim: int) -> tuple[int, ...]:
    return (0, *range(2, ndim))


def _per_channel(values: np.ndarray, ndim: int) -> np.ndarray:
    return values.reshape(1, -1, *(1,) * (ndim - 2))


def batch_norm_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A batch's per-channel statistics as torch's CPU kernel computes them: the mean summed
    in float64 and rounded to x's dtype, then the squared deviations from that mean summed in
    float64. Returns (mean, x - mean, the sum of squares (float64), values per channel)."""
    count = x.size // x.shape[1]
    mean = x.mean(axis=_channel_axes(x.ndim), dtype=np.float64).astype(x.dtype)
    centered = x - _per_channel(mean, x.ndim)
    squares = (centered * centered).sum(axis=_channel_axes(x.ndim), dtype=np.float64)
    return mean, centered, squares, count


def inverse_std(variance: np.ndarray, eps: float, dtype) -> np.ndarray:
    """1 / sqrt(variance + eps), computed in float64 and rounded once to ``dtype``."""
    return (1.0 / np.sqrt(np.asarray(variance, np.float64) + eps)).astype(dtype)


def update_running_stats(running_mean: np.ndarray, running_var: np.ndarray, mean: np.ndarray,
                         squares: np.ndarray, count: int, factor: float) -> None:
    """In place, as torch: running = factor * batch + (1 - factor) * running, the variance's
    batch term unbiased (squares / (count - 1))."""
    m = running_mean.dtype.type(factor)
    running_mean[...] = m * mean + (1 - m) * running_mean
    unbiased = squares / (count - 1)
    running_var[...] = (float(m) * unbiased + np.float64(1 - m) * running_var.astype(np.float64)).astype(
        running_var.dtype)


def combine_batch_statistics(pieces) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    """The (count, mean, squares) of a batch from those of its pieces, in order (each as
    :func:`batch_norm_statistics` gives them): one piece is returned as it is, so a batch
    computed whole moves the running statistics bit for bit as the layer itself; several are
    pooled exactly in float64 (the squares about each piece's mean plus each piece's offset
    from the pooled mean), the mean rounded to the pieces' dtype."""
    pieces = [piece for piece in pieces if piece[0] > 0]
    if not pieces:
        return 0, None, None
    if len(pieces) == 1:
        return pieces[0]
    count = sum(n for n, _, _ in pieces)
    pooled = sum(n * mean.astype(np.float64) for n, mean, _ in pieces) / count
    squares = sum(s + n * (mean.astype(np.float64) - pooled) ** 2 for n, mean, s in pieces)
    return count, pooled.astype(pieces[0][1].dtype), squares


def batch_norm(centered: np.ndarray, inverse: np.ndarray, weight: np.ndarray | None,
               bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(x - mean) / sqrt(var + eps) * weight + bias per channel, from x - mean and the
    per-channel 1 / sqrt(var + eps); returns (output, the normalized x, kept for backward)."""
    normalized = centered * _per_channel(inverse, centered.ndim)
    output = normalized
    if weight is not None:
        output = output * _per_channel(weight, centered.ndim)
    if bias is not None:
        output = output + _per_channel(bias, centered.ndim)
    return output, normalized


def batch_norm_backward(grad: np.ndarray, normalized: np.ndarray, inverse: np.ndarray, weight: np.ndarray | None,
                        with_bias: bool, batch_statistics: bool, need_input_grad: bool = True):
    """(d_input or None, d_weight or None, d_bias or None) for :func:`batch_norm`. With
    ``batch_statistics`` (training) the mean and variance are functions of the batch and the
    gradient goes through them, as torch's; otherwise they are constants (eval mode)."""
    # the per-channel sums accumulate in float64, as torch's (its accscalar_t)
    axes = _channel_axes(grad.ndim)
    count = max(grad.size // grad.shape[1], 1)
    grad_sum = grad.sum(axis=axes, dtype=np.float64)
    dot = (grad * normalized).sum(axis=axes, dtype=np.float64)
    d_weight = dot.astype(grad.dtype) if weight is not None else None
    d_bias = grad_sum.astype(grad.dtype) if with_bias else None
    d_input = None
    if need_input_grad:
        scale = _per_channel(inverse * weight if weight is not None else inverse, grad.ndim)
        if batch_statistics:
            grad_mean = _per_channel((grad_sum / count).astype(grad.dtype), grad.ndim)
            projection = _per_channel((dot / count).astype(grad.dtype), grad.ndim)
            d_input = scale * (grad - grad_mean - normalized * projection)
        else:
            d_input = grad * scale
    return d_input, d_weight, d_bias


# ---------------------------------------------------------------------------------------
# layer normalization


def layer_norm(x: np.ndarray, dims: int, weight: np.ndarray | None, bias: np.ndarray | None,
               eps: float) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """torch's layer_norm over the last ``dims`` axes: (x - mean) / sqrt(var + eps) with the
    biased variance, then ``* weight + bias``; returns (output, (x_hat, 1 / sqrt(var + eps)))."""
    axes = tuple(range(x.ndim - dims, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    variance = (centered * centered).mean(axis=axes, keepdims=True)
    inverse = 1.0 / np.sqrt(variance + x.dtype.type(eps))
    normalized = centered * inverse
    output = normalized
    if weight is not None:
        output = output * weight
    if bias is not None:
        output = output + bias
    return output, (normalized, inverse)


def layer_norm_backward(grad: np.ndarray, saved: tuple[np.ndarray, np.ndarray], dims: int,
                        weight: np.ndarray | None, with_bias: bool, need_input_grad: bool = True):
    """(d_input or None, d_weight or None, d_bias or None) for :func:`layer_norm`."""
    normalized, inverse = saved
    batch_axes = tuple(range(grad.ndim - dims))
    d_weight = (grad * normalized).sum(axis=batch_axes) if weight is not None else None
    d_bias = grad.sum(axis=batch_axes) if with_bias else None
    d_input = None
    if need_input_grad:
        axes = tuple(range(grad.ndim - dims, grad.ndim))
        d_normalized = grad * weight if weight is not None else grad
        d_input = inverse * (d_normalized - d_normalized.mean(axis=axes, keepdims=True)
                             - normalized * (d_normalized * normalized).mean(axis=axes, keepdims=True))
    return d_input, d_weight, d_bias
