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
]


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
