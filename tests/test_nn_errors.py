"""Bad input gets a clear error naming what was wrong, the value received and what is allowed,
raised before any state changes; and the documented NaN behaviour."""

from __future__ import annotations

import numpy as np
import pytest

from shardstep.workers import nn

f32 = np.float32
LOGITS = np.zeros((4, 3), f32)
LABELS = np.array([0, 1, 2, 1])
EMBEDDINGS = np.ones((4, 5), f32)


def _forward(criterion, *args):
    return lambda: criterion(*args)


ERROR_CASES = [
    # -- targets: dtype, shape, range --
    ("ce float labels", _forward(nn.CrossEntropyLoss(), LOGITS, LABELS.astype(f32)), TypeError,
     r"class-index target must be an integer array; got dtype float32 with shape \(4,\) \(class probabilities must have the input's shape \(4, 3\)"),
    ("ce bool labels", _forward(nn.CrossEntropyLoss(), LOGITS, LABELS > 0), TypeError,
     r"class-index target must be an integer array; got dtype bool"),
    ("ce integer probabilities", _forward(nn.CrossEntropyLoss(), LOGITS, np.zeros((4, 3), np.int64)), TypeError,
     r"target of the input's shape \(4, 3\) holds class probabilities and must have a float dtype; got int64"),
    ("ce target shape", _forward(nn.CrossEntropyLoss(), LOGITS, LABELS[:3]), ValueError,
     r"class-index target for input of shape \(4, 3\) must have shape \(4,\); got \(3,\)"),
    ("ce target shape nd", _forward(nn.CrossEntropyLoss(), np.zeros((2, 3, 5), f32), np.zeros((2, 3), np.int64)),
     ValueError, r"must have shape \(2, 5\); got \(2, 3\)"),
    ("ce class too large", _forward(nn.CrossEntropyLoss(), LOGITS, np.array([0, 3, 1, 1])), IndexError,
     r"target class index 3 is out of range: allowed \[0, 3\) or ignore_index=-100"),
    ("ce negative class", _forward(nn.CrossEntropyLoss(), LOGITS, np.array([0, -1, 1, 1])), IndexError,
     r"target class index -1 is out of range"),
    ("ce ignore_index not the bad value", _forward(nn.CrossEntropyLoss(ignore_index=-1), LOGITS, np.array([0, -2, 1, -1])),
     IndexError, r"target class index -2 is out of range: allowed \[0, 3\) or ignore_index=-1"),
    ("ce ignore_index with probabilities", _forward(nn.CrossEntropyLoss(ignore_index=0), LOGITS, np.full((4, 3), 1 / 3, f32)),
     ValueError, r"ignore_index is not supported with class-probability targets; got ignore_index=0 \(allowed: any negative value\)"),
    ("ce 0-d input", _forward(nn.CrossEntropyLoss(), np.float32(1.0), np.array(0)), ValueError,
     r"input must have a class dimension, shape \(C,\), \(N, C\) or \(N, C, d1, ...\); got a 0-d array"),
    ("ce no classes", _forward(nn.CrossEntropyLoss(), np.zeros((4, 0), f32), LABELS), ValueError,
     r"input must have at least one class; got shape \(4, 0\)"),
    ("ce integer logits", _forward(nn.CrossEntropyLoss(), LOGITS.astype(np.int64), LABELS), TypeError,
     r"CrossEntropyLoss: input must be a float32 or float64 array; got dtype int64"),
    ("ce weight length", _forward(nn.CrossEntropyLoss(weight=np.ones(2, f32)), LOGITS, LABELS), ValueError,
     r"weight must be a 1-D array with one entry per class, shape \(3,\); got shape \(2,\)"),
    ("nll float target", _forward(nn.NLLLoss(), LOGITS, LABELS.astype(np.float64)), TypeError,
     r"NLLLoss: a class-index target must be an integer array; got dtype float64"),
    ("nll class out of range", _forward(nn.NLLLoss(), LOGITS, np.array([0, 1, 2, 7])), IndexError,
     r"NLLLoss: target class index 7 is out of range"),
    # -- mismatched shapes and dtypes --
    ("mse shapes", _forward(nn.MSELoss(), np.zeros(3, f32), np.zeros((3, 1), f32)), ValueError,
     r"MSELoss: input, target must have the same shape; got input \(3,\), target \(3, 1\)"),
    ("l1 bool target", _forward(nn.L1Loss(), np.zeros(3, f32), np.zeros(3, bool)), TypeError,
     r"L1Loss: target must be an integer or float array; got dtype bool"),
    ("triplet shapes", _forward(nn.TripletMarginLoss(), EMBEDDINGS, EMBEDDINGS, EMBEDDINGS[:3]), ValueError,
     r"anchor, positive, negative must have the same shape; got anchor \(4, 5\), positive \(4, 5\), negative \(3, 5\)"),
    ("triplet dtypes", _forward(nn.TripletMarginLoss(), EMBEDDINGS, EMBEDDINGS.astype(np.float64), EMBEDDINGS),
     TypeError, r"must have the same dtype; got anchor=float32, positive=float64, negative=float32"),
    ("triplet 3-d", _forward(nn.TripletMarginLoss(), *[np.zeros((2, 3, 4), f32)] * 3), ValueError,
     r"must be 1-D \(D,\) or 2-D \(N, D\); got shape \(2, 3, 4\)"),
    ("ranking shapes", _forward(nn.MarginRankingLoss(), np.zeros(3, f32), np.zeros(3, f32), np.ones(4, f32)), ValueError,
     r"input1, input2, target must have the same shape"),
    ("cosine target shape", _forward(nn.CosineEmbeddingLoss(), EMBEDDINGS, EMBEDDINGS, np.ones(3)), ValueError,
     r"inputs must be \(N, D\) with a target of shape \(N,\), or \(D,\) with a 0-d target; got inputs \(4, 5\) and target \(3,\)"),
    ("bce input range", _forward(nn.BCELoss(), np.array([0.5, 1.5], f32), np.ones(2, f32)), ValueError,
     r"BCELoss: all elements of input must be in \[0, 1\] \(probabilities\); got 1.5 \(use BCEWithLogitsLoss for logits\)"),
    ("bce target range", _forward(nn.BCELoss(), np.array([0.5, 0.5], f32), np.array([0.0, -1.0], f32)), ValueError,
     r"all elements of target must be in \[0, 1\]"),
    ("bce NaN input", _forward(nn.BCELoss(), np.array([0.5, np.nan], f32), np.ones(2, f32)), ValueError,
     r"all elements of input must be in \[0, 1\] \(probabilities\); got nan"),
    ("bce weight shape", _forward(nn.BCELoss(weight=np.ones(3, f32)), np.full((2, 2), 0.5, f32), np.ones((2, 2), f32)),
     ValueError, r"BCELoss: weight of shape \(3,\) must broadcast to the input's shape \(2, 2\)"),
    ("bce-logits pos_weight shape", _forward(nn.BCEWithLogitsLoss(pos_weight=np.ones(4, f32)), np.zeros((2, 3), f32),
                                             np.ones((2, 3), f32)), ValueError,
     r"pos_weight of shape \(4,\) must broadcast to the input's shape \(2, 3\)"),
    # -- constructor arguments --
    ("reduction", lambda: nn.MSELoss(reduction="avg"), ValueError,
     r"MSELoss: reduction must be one of 'mean', 'sum', 'none'; got 'avg'"),
    ("batchmean only for KL", lambda: nn.L1Loss(reduction="batchmean"), ValueError, r"got 'batchmean'"),
    ("label_smoothing", lambda: nn.CrossEntropyLoss(label_smoothing=1.5), ValueError,
     r"label_smoothing must be in \[0, 1\]; got 1.5"),
    ("ignore_index type", lambda: nn.CrossEntropyLoss(ignore_index=1.0), TypeError,
     r"ignore_index must be an int; got 1.0 of type float"),
    ("triplet margin", lambda: nn.TripletMarginLoss(margin=0.0), ValueError, r"margin must be > 0; got 0.0"),
    ("triplet p NaN", lambda: nn.TripletMarginLoss(p=float("nan")), ValueError, r"p must not be NaN; got nan"),
    ("triplet swap type", lambda: nn.TripletMarginLoss(swap=1), TypeError, r"swap must be a bool; got 1 of type int"),
    ("smooth l1 beta", lambda: nn.SmoothL1Loss(beta=-1.0), ValueError, r"beta must be >= 0; got -1.0"),
    ("huber delta", lambda: nn.HuberLoss(delta=0.0), ValueError, r"delta must be > 0; got 0.0"),
    ("kl log_target type", lambda: nn.KLDivLoss(log_target="yes"), TypeError, r"log_target must be a bool; got 'yes'"),
    ("margin type", lambda: nn.MarginRankingLoss(margin="1"), TypeError, r"margin must be a real number; got '1' of type str"),
    ("legacy size_average", lambda: nn.MSELoss(size_average=True), TypeError, r"unexpected keyword argument 'size_average'"),
    ("weight dtype", lambda: nn.CrossEntropyLoss(weight=np.ones(3, np.int64)), TypeError,
     r"CrossEntropyLoss: weight must be a float32 or float64 array; got dtype int64"),
    # -- layers --
    ("linear last dim", lambda: nn.Linear(4, 2, rng=0)(np.zeros((3, 5), f32)), ValueError,
     r"Linear: input must have shape \(\*, in_features=4\); got \(3, 5\)"),
    ("linear dtype", lambda: nn.Linear(4, 2, rng=0)(np.zeros((3, 4))), TypeError,
     r"Linear: input dtype float64 must match the layer's dtype float32"),
    ("linear integer input", lambda: nn.Linear(4, 2, rng=0)(np.zeros((3, 4), np.int64)), TypeError,
     r"Linear: input must be a float32 or float64 array; got dtype int64"),
    ("linear negative size", lambda: nn.Linear(-1, 2), ValueError, r"Linear: in_features must be >= 0; got -1"),
    ("linear float size", lambda: nn.Linear(4.0, 2), TypeError, r"in_features must be an int; got 4.0"),
    ("linear dtype arg", lambda: nn.Linear(4, 2, dtype=np.int32), TypeError, r"dtype must be float32 or float64; got"),
    ("linear bad rng", lambda: nn.Linear(4, 2, rng="seed"), TypeError,
     r"rng must be a numpy Generator, a non-negative int seed or None; got 'seed'"),
    ("embedding float indices", lambda: nn.Embedding(5, 2, rng=0)(np.array([1.0, 2.0])), TypeError,
     r"Embedding: indices must be an integer array; got dtype float64"),
    ("embedding index range", lambda: nn.Embedding(5, 2, rng=0)(np.array([1, 5])), IndexError,
     r"Embedding: index 5 is out of range \[0, 5\)"),
    ("embedding negative index", lambda: nn.Embedding(5, 2, rng=0)(np.array([-1, 2])), IndexError,
     r"index -1 is out of range \[0, 5\)"),
    ("embedding padding_idx", lambda: nn.Embedding(5, 2, padding_idx=5), ValueError,
     r"padding_idx must be in \[-5, 5\); got 5"),
    ("dropout p", lambda: nn.Dropout(1.5), ValueError,
     r"Dropout: p \(the probability of an element to be zeroed\) must be in \[0, 1\]; got 1.5"),
    ("gelu approximate", lambda: nn.GELU("fast"), ValueError, r"GELU: approximate must be 'none' or 'tanh'; got 'fast'"),
    ("softmax dim", lambda: nn.LogSoftmax(dim=2)(np.zeros((3, 4), f32)), IndexError,
     r"LogSoftmax: dim must be in \[-2, 1\] for a 2-d input; got 2"),
    ("sequential item", lambda: nn.Sequential(nn.ReLU(), "tanh"), TypeError,
     r"Sequential: item '1' must be a Module; got str"),
    ("layer grad shape", lambda: _layer_backward(nn.Tanh(), np.zeros((2, 3), f32), np.zeros((3, 2), f32)), ValueError,
     r"Tanh.backward: grad_output must have the output's shape \(2, 3\); got \(3, 2\)"),
    # -- Conv1d, adaptive pooling, batch normalization, buffers --
    ("conv1d channels", lambda: nn.Conv1d(3, 4, 2, rng=0)(np.zeros((2, 5, 7), f32)), ValueError,
     r"Conv1d: input must have shape \(N, C=3, L\) or \(C=3, L\); got \(2, 5, 7\)"),
    ("conv1d 4-d input", lambda: nn.Conv1d(3, 4, 2, rng=0)(np.zeros((2, 3, 7, 1), f32)), ValueError,
     r"Conv1d: input must have shape \(N, C=3, L\) or \(C=3, L\); got \(2, 3, 7, 1\)"),
    ("conv1d too short", lambda: nn.Conv1d(3, 4, 5, dilation=2, rng=0)(np.zeros((3, 6), f32)), ValueError,
     r"Conv1d: input of spatial size \(6,\) is smaller than the kernel \(5,\) \(dilation \(2,\), padding \(0,\)\)"),
    ("conv1d dtype", lambda: nn.Conv1d(3, 4, 2, rng=0)(np.zeros((3, 6))), TypeError,
     r"Conv1d: input dtype float64 must match the layer's dtype float32"),
    ("conv1d kernel pair", lambda: nn.Conv1d(3, 4, (2, 2)), ValueError,
     r"Conv1d: kernel_size must be an int or a tuple of 1 int; got \(2, 2\)"),
    ("conv1d stride", lambda: nn.Conv1d(3, 4, 2, stride=0), ValueError, r"Conv1d: stride must be >= 1; got 0"),
    ("conv1d groups", lambda: nn.Conv1d(3, 4, 2, groups=2), ValueError,
     r"Conv1d: groups must be >= 1 and divide in_channels \(3\) and out_channels \(4\); got 2"),
    ("conv1d padding_mode", lambda: nn.Conv1d(3, 4, 2, padding_mode="reflect"), ValueError,
     r"Conv1d: padding_mode must be 'zeros' \(the only one provided\); got 'reflect'"),
    ("conv1d padding string", lambda: nn.Conv1d(3, 4, 2, padding="full"), ValueError,
     r"Conv1d: padding must be 'valid', 'same', an int or a tuple of 1 ints; got 'full'"),
    ("conv2d same strided", lambda: nn.Conv2d(3, 4, 3, stride=(1, 2), padding="same"), ValueError,
     r"Conv2d: padding='same' is not supported for strided convolutions; got stride \(1, 2\)"),
    ("conv1d unbatched grad shape", lambda: _layer_backward(nn.Conv1d(3, 4, 2, rng=0), np.zeros((3, 5), f32),
                                                            np.zeros((4, 3), f32)), ValueError,
     r"Conv1d.backward: grad_output must have the output's shape \(4, 4\); got \(4, 3\)"),
    ("adaptive 2d output_size", lambda: nn.AdaptiveAvgPool2d((2, -1)), ValueError,
     r"AdaptiveAvgPool2d: output_size must be an int >= 0, None \(the input's size\) or a pair of them; "
     r"got \(2, -1\)"),
    ("adaptive 2d output_size length", lambda: nn.AdaptiveAvgPool2d((2, 2, 2)), ValueError,
     r"AdaptiveAvgPool2d: output_size must be .* a pair of them; got \(2, 2, 2\)"),
    ("adaptive 2d output_size type", lambda: nn.AdaptiveAvgPool2d(2.5), TypeError,
     r"AdaptiveAvgPool2d: output_size must be an int; got 2.5 of type float"),
    ("adaptive 1d None", lambda: nn.AdaptiveAvgPool1d(None), ValueError,
     r"AdaptiveAvgPool1d: output_size must be an int >= 0 or a tuple of one; got None"),
    ("adaptive 2d input ndim", lambda: nn.AdaptiveAvgPool2d(2)(np.zeros((4, 5), f32)), ValueError,
     r"AdaptiveAvgPool2d: input must have shape \(N, C, H, W\) or \(C, H, W\), no size 0 but N's; got \(4, 5\)"),
    ("adaptive 2d empty", lambda: nn.AdaptiveAvgPool2d(2)(np.zeros((2, 3, 0, 4), f32)), ValueError,
     r"no size 0 but N's; got \(2, 3, 0, 4\)"),
    ("adaptive 1d input ndim", lambda: nn.AdaptiveAvgPool1d(2)(np.zeros((1, 2, 3, 4), f32)), ValueError,
     r"AdaptiveAvgPool1d: input must have shape \(N, C, L\) or \(C, L\), no size 0 but N's; got \(1, 2, 3, 4\)"),
    ("batchnorm1d channels", lambda: nn.BatchNorm1d(4)(np.zeros((5, 3), f32)), ValueError,
     r"BatchNorm1d: input must have shape \(N, C=4\) or \(N, C=4, L\); got \(5, 3\)"),
    ("batchnorm1d 1-d input", lambda: nn.BatchNorm1d(4)(np.zeros(4, f32)), ValueError,
     r"BatchNorm1d: input must have shape \(N, C=4\) or \(N, C=4, L\); got \(4,\)"),
    ("batchnorm2d 3-d input", lambda: nn.BatchNorm2d(3)(np.zeros((2, 3, 4), f32)), ValueError,
     r"BatchNorm2d: input must have shape \(N, C=3, H, W\); got \(2, 3, 4\)"),
    ("batchnorm one value per channel", lambda: nn.BatchNorm2d(3)(np.zeros((1, 3, 1, 1), f32)), ValueError,
     r"BatchNorm2d: Expected more than 1 value per channel when training, got input size \(1, 3, 1, 1\)"),
    ("batchnorm untracked eval one value", lambda: nn.BatchNorm1d(2, track_running_stats=False).eval()(
        np.zeros((1, 2), f32)), ValueError, r"Expected more than 1 value per channel when training"),
    ("batchnorm dtype", lambda: nn.BatchNorm1d(2)(np.zeros((3, 2))), TypeError,
     r"BatchNorm1d: input dtype float64 must match the layer's dtype float32"),
    ("batchnorm integer input", lambda: nn.BatchNorm1d(2)(np.zeros((3, 2), np.int64)), TypeError,
     r"BatchNorm1d: input must be a float32 or float64 array; got dtype int64"),
    ("batchnorm num_features", lambda: nn.BatchNorm1d(0), ValueError,
     r"BatchNorm1d: num_features \(the number of channels\) must be >= 1; got 0"),
    ("batchnorm momentum", lambda: nn.BatchNorm2d(3, momentum=1.5), ValueError,
     r"BatchNorm2d: momentum must be in \[0, 1\], or None for a cumulative average; got 1.5"),
    ("batchnorm momentum type", lambda: nn.BatchNorm2d(3, momentum="0.1"), TypeError,
     r"BatchNorm2d: momentum must be a real number; got '0.1' of type str"),
    ("batchnorm eps", lambda: nn.BatchNorm1d(3, eps=-1e-5), ValueError, r"BatchNorm1d: eps must be >= 0; got -1e-05"),
    ("batchnorm affine type", lambda: nn.BatchNorm1d(3, affine=1), TypeError,
     r"BatchNorm1d: affine must be a bool; got 1"),
    ("batchnorm rng", lambda: nn.BatchNorm1d(3, rng=0), TypeError, r"unexpected keyword argument 'rng'"),
    ("batchnorm grad shape", lambda: _layer_backward(nn.BatchNorm1d(2), np.ones((3, 2), f32), np.ones((2, 3), f32)),
     ValueError, r"BatchNorm1d.backward: grad_output must have the output's shape \(3, 2\); got \(2, 3\)"),
    ("buffer name", lambda: nn.Module().register_buffer("a.b", np.zeros(1)), ValueError,
     r"Module.register_buffer: name must be a non-empty string without '.'; got 'a.b'"),
    ("buffer not an array", lambda: nn.Module().register_buffer("table", [1.0]), TypeError,
     r"Module.register_buffer: buffer 'table' must be an ndarray or None; got list"),
    ("buffer over a parameter", lambda: nn.Linear(2, 2, rng=0).register_buffer("weight", np.zeros(1)), KeyError,
     r"Linear.register_buffer: attribute 'weight' already exists"),
    ("buffer assignment", lambda: setattr(nn.BatchNorm1d(2), "running_mean", 0.0), TypeError,
     r"cannot assign float to buffer 'running_mean' of BatchNorm1d: an ndarray or None is expected"),
    # -- attention (query (L=3, N=2, E=8), 2 heads) --
    ("mha heads", lambda: nn.MultiheadAttention(10, 3), ValueError,
     r"MultiheadAttention: embed_dim must be divisible by num_heads; got embed_dim=10, num_heads=3"),
    ("mha dropout", lambda: nn.MultiheadAttention(8, 2, dropout=1.5), ValueError,
     r"dropout \(the probability of an attention weight to be zeroed\) must be in \[0, 1\]; got 1.5"),
    ("mha query features", lambda: _attend(np.zeros((3, 2, 6), f32)), ValueError,
     r"MultiheadAttention: query must have embed_dim = 8 features in its last axis; got shape \(3, 2, 6\)"),
    ("mha key features", lambda: _attend(QUERY, key=np.zeros((5, 2, 4), f32), value=np.zeros((5, 2, 4), f32)),
     ValueError, r"key must have embed_dim = 8 features in its last axis; got shape \(5, 2, 4\)"),
    ("mha key value shapes", lambda: _attend(QUERY, key=np.zeros((5, 2, 8), f32), value=np.zeros((4, 2, 8), f32)),
     ValueError, r"key and value must have the same shape; got key \(5, 2, 8\), value \(4, 2, 8\)"),
    ("mha batch sizes", lambda: _attend(QUERY, key=np.zeros((5, 3, 8), f32), value=np.zeros((5, 3, 8), f32)),
     ValueError, r"key and value must have the query's batch size 2 \(axis 1\); got key \(5, 3, 8\)"),
    ("mha query ndim", lambda: _attend(np.zeros((1, 3, 2, 8), f32)), ValueError,
     r"query must be batched \(L, N, E\) or unbatched \(L, E\) with E = embed_dim = 8; got shape \(1, 3, 2, 8\)"),
    ("mha key ndim", lambda: _attend(QUERY, key=np.zeros((5, 8), f32), value=np.zeros((5, 8), f32)), ValueError,
     r"for a 3-D query, key must be 3-D too; got shape \(5, 8\)"),
    ("mha dtype", lambda: _attend(QUERY.astype(np.float64)), TypeError,
     r"MultiheadAttention: query dtype float64 must match the layer's dtype float32"),
    ("mha attn_mask shape", lambda: _attend(QUERY, attn_mask=np.zeros((3, 4), bool)), ValueError,
     r"attn_mask must have shape \(L, S\) = \(3, 3\) or \(N \* num_heads, L, S\) = \(4, 3, 3\); got \(3, 4\)"),
    ("mha attn_mask 3-d shape", lambda: _attend(QUERY, attn_mask=np.zeros((2, 3, 3), f32)), ValueError,
     r"attn_mask must have shape .* or \(N \* num_heads, L, S\) = \(4, 3, 3\); got \(2, 3, 3\)"),
    ("mha attn_mask dtype", lambda: _attend(QUERY, attn_mask=np.zeros((3, 3), np.int64)), TypeError,
     (r"attn_mask must be a bool array \(True = not allowed\) or a float array \(added to the attention scores\); "
      r"got dtype int64")),
    ("mha key_padding_mask shape", lambda: _attend(QUERY, key_padding_mask=np.zeros((2, 4), bool)), ValueError,
     r"key_padding_mask must have shape \(N, S\) = \(2, 3\); got \(2, 4\)"),
    ("mha unbatched key_padding_mask", lambda: _attend(QUERY[:, 0], key_padding_mask=np.zeros((1, 3), bool)),
     ValueError, r"key_padding_mask must have shape \(S,\) = \(3,\); got \(1, 3\)"),
    ("mha key_padding_mask dtype", lambda: _attend(QUERY, key_padding_mask=np.zeros((2, 3), np.uint8)), TypeError,
     r"key_padding_mask must be a bool array \(True = not allowed\) or a float array .*; got dtype uint8"),
    ("mha is_causal without a mask", lambda: _attend(QUERY, is_causal=True), ValueError,
     r"is_causal=True needs attn_mask .*; got attn_mask=None"),
    ("mha need_weights type", lambda: _attend(QUERY, need_weights=1), TypeError,
     r"need_weights must be a bool; got 1 of type int"),
    ("encoder layer heads", lambda: nn.TransformerEncoderLayer(10, 3), ValueError,
     r"TransformerEncoderLayer: d_model must be a positive multiple of nhead \(> 0\); got d_model=10, nhead=3"),
    ("encoder layer activation", lambda: nn.TransformerEncoderLayer(8, 2, activation="tanh"), ValueError,
     r"TransformerEncoderLayer: activation must be 'relu' or 'gelu'; got 'tanh'"),
    ("encoder layer src", lambda: nn.TransformerEncoderLayer(8, 2, 16, rng=0)(np.zeros((3, 2, 6), f32)), ValueError,
     r"src must be \(L, N, d_model\) or unbatched \(L, d_model\) with d_model = 8; got shape \(3, 2, 6\)"),
    ("encoder layer src_mask", lambda: nn.TransformerEncoderLayer(8, 2, 16, rng=0)(QUERY, src_mask=np.zeros((2, 2), bool)),
     ValueError, r"MultiheadAttention: attn_mask must have shape \(L, S\) = \(3, 3\)"),
    ("encoder layers", lambda: nn.TransformerEncoder(nn.Linear(2, 2), 2), TypeError,
     r"TransformerEncoder: encoder_layer must be a TransformerEncoderLayer; got Linear"),
    ("positions too long", lambda: nn.PositionalEmbedding(4, 5, rng=0)(np.zeros((2, 6, 5), f32)), ValueError,
     r"PositionalEmbedding: the input's length L = 6 \(axis -2\) exceeds the 4 positions of the table"),
    ("positions width", lambda: nn.SinusoidalPositionalEncoding(6)(np.zeros((2, 3, 5), f32)), ValueError,
     r"SinusoidalPositionalEncoding: input must have shape \(\*, L, embedding_dim=6\); got \(2, 3, 5\)"),
    ("residual shape", lambda: nn.Residual(nn.Linear(4, 3, rng=0))(np.zeros((2, 4), f32)), ValueError,
     r"Residual: the modules must keep the input's shape \(2, 4\); they give \(2, 3\)"),
]
QUERY = np.zeros((3, 2, 8), f32)


def _attend(query, key=None, value=None, **kwargs):
    attention = nn.MultiheadAttention(8, 2, rng=0)
    key = query if key is None else key
    return attention(query, key, query if value is None else value, **kwargs)


def _layer_backward(layer, x, grad):
    layer(x)
    return layer.backward(grad)


@pytest.mark.parametrize("make_call,error,message", [pytest.param(c, e, m, id=i) for i, c, e, m in ERROR_CASES])
def test_bad_input_gets_a_clear_error(make_call, error, message):
    with pytest.raises(error, match=message):
        make_call()


@pytest.mark.parametrize("criterion,args,grad,message", [
    (nn.MSELoss(reduction="none"), (np.zeros(3, f32), np.ones(3, f32)), 1.0,
     r"grad_output for reduction='none' must have the output's shape \(3,\); got \(\)"),
    (nn.MSELoss(), (np.zeros(3, f32), np.ones(3, f32)), np.ones(3),
     r"grad_output for reduction='mean' must be a scalar; got shape \(3,\)"),
    (nn.TripletMarginLoss(reduction="none"), (EMBEDDINGS, EMBEDDINGS, EMBEDDINGS), np.ones(5),
     r"must have the output's shape \(4,\); got \(5,\)"),
])
def test_bad_grad_output_is_rejected(criterion, args, grad, message):
    criterion(*args)
    with pytest.raises(ValueError, match=message):
        criterion.backward(grad)


def test_backward_before_forward_is_an_error():
    with pytest.raises(RuntimeError, match=r"CrossEntropyLoss.backward called before the loss was computed"):
        nn.CrossEntropyLoss().backward()
    with pytest.raises(RuntimeError, match=r"Linear.backward called before forward"):
        nn.Linear(2, 2, rng=0).backward(np.zeros((1, 2), f32))


def test_a_failed_call_leaves_nothing_for_backward():
    criterion = nn.CrossEntropyLoss()
    criterion(LOGITS, LABELS)
    with pytest.raises(IndexError):
        criterion(LOGITS, np.array([0, 9, 1, 1]))
    with pytest.raises(RuntimeError, match="before the loss was computed"):
        criterion.backward()
    layer = nn.Linear(3, 2, rng=0)
    layer(np.zeros((1, 3), f32))
    with pytest.raises(ValueError):
        layer(np.zeros((1, 4), f32))
    with pytest.raises(RuntimeError, match="before forward"):
        layer.backward(np.zeros((1, 2), f32))
    assert layer.weight.grad is None


def test_nan_inputs_propagate_as_in_torch():
    """NaN in a row of logits makes that row's loss and gradient NaN and leaves the others
    alone; 'mean' is then NaN. (Checked element by element against torch in the parity suite.)"""
    logits = np.array([[np.nan, 1.0, 2.0], [0.0, 1.0, 2.0]], f32)
    criterion = nn.CrossEntropyLoss(reduction="none")
    losses = criterion(logits, np.array([1, 2]))
    grad = criterion.backward(np.ones(2, f32))
    assert np.isnan(losses[0]) and np.isfinite(losses[1])
    assert np.all(np.isnan(grad[0])) and np.all(np.isfinite(grad[1]))
    assert np.isnan(nn.CrossEntropyLoss()(logits, np.array([1, 2])))
    # ReLU passes the gradient through a NaN input (torch's threshold_backward: zero only where x <= 0)
    relu = nn.ReLU()
    out = relu(np.array([np.nan, -1.0, 0.0, 2.0], f32))
    assert np.isnan(out[0])
    np.testing.assert_array_equal(relu.backward(np.ones(4, f32)), [1, 0, 0, 1])
    # L1's gradient at NaN is 0: torch's sign(NaN) is 0
    l1 = nn.L1Loss(reduction="sum")
    assert np.isnan(l1(np.array([np.nan, 2.0], f32), np.zeros(2, f32)))
    np.testing.assert_array_equal(l1.backward(), [0, 1])


def test_load_state_dict_errors_name_the_parameter_and_change_nothing():
    model = nn.Sequential(nn.Linear(3, 4, rng=0), nn.ReLU(), nn.Linear(4, 2, rng=1))
    before = model.state_dict()
    good = model.state_dict()

    missing = {k: v for k, v in good.items() if k != "2.bias"}
    with pytest.raises(ValueError, match=r"missing parameters: 2.bias"):
        model.load_state_dict(missing)
    unexpected = {**good, "3.weight": np.zeros((2, 2))}
    with pytest.raises(ValueError, match=r"unexpected parameters: 3.weight \(this model has: 0.weight, 0.bias, 2.weight, 2.bias\)"):
        model.load_state_dict(unexpected)
    shapes = {**{k: v + 1 for k, v in good.items()}, "0.weight": np.zeros((3, 4))}
    with pytest.raises(ValueError, match=r"size mismatch for parameter '0.weight': the model has shape \(4, 3\), "
                                         r"the state_dict has shape \(3, 4\)"):
        model.load_state_dict(shapes)
    with pytest.raises(ValueError, match=r"parameter '2.bias' must be a real-valued array; got dtype <U1"):
        model.load_state_dict({**good, "2.bias": np.array(["a", "b"])})
    with pytest.raises(TypeError, match=r"load_state_dict expects a mapping of name -> array; got list"):
        model.load_state_dict(list(good.values()))
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])   # nothing was copied by the failed loads


def test_load_state_dict_errors_name_the_buffer_and_change_nothing():
    model = nn.Sequential(nn.Linear(3, 2, rng=0), nn.BatchNorm1d(2))
    good = model.state_dict()
    before = model.state_dict()
    with pytest.raises(ValueError, match=r"missing buffers: 1.running_var, 1.num_batches_tracked$"):
        model.load_state_dict({k: v for k, v in good.items() if k not in ("1.running_var", "1.num_batches_tracked")})
    with pytest.raises(ValueError, match=r"missing parameters: 1.bias; missing buffers: 1.running_mean"):
        model.load_state_dict({k: v for k, v in good.items() if k not in ("1.bias", "1.running_mean")})
    with pytest.raises(ValueError, match=r"size mismatch for buffer '1.running_mean': the model has shape \(2,\), "
                                         r"the state_dict has shape \(3,\)"):
        model.load_state_dict({**{k: v + 1 for k, v in good.items()}, "1.running_mean": np.zeros(3)})
    with pytest.raises(ValueError, match=r"buffer '1.num_batches_tracked' holds integers \(int64\); "
                                         r"got non-integer values"):
        model.load_state_dict({**good, "1.num_batches_tracked": np.array(2.5)})
    with pytest.raises(ValueError, match=r"buffer '1.running_var' must be a real-valued array; got dtype bool"):
        model.load_state_dict({**good, "1.running_var": np.ones(2, bool)})
    with pytest.raises(ValueError, match=r"unexpected parameters: 1.extra \(this model has: 0.weight, 0.bias, "
                                         r"1.weight, 1.bias, 1.running_mean, 1.running_var, 1.num_batches_tracked\)"):
        model.load_state_dict({**good, "1.extra": np.zeros(1)})
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, before[name])


def test_a_failed_batch_norm_call_counts_no_batch():
    """torch adds the batch to num_batches_tracked before its one-value check raises; here a
    call that fails changes nothing."""
    norm = nn.BatchNorm1d(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        norm(np.zeros((1, 3), f32))
    assert int(norm.num_batches_tracked) == 0
    np.testing.assert_array_equal(norm.running_var, np.ones(3))
