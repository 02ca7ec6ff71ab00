"""Layers and losses in numpy with torch.nn's semantics and explicit, exact gradients.

    from shardstep.workers.nn import Linear, ReLU, Sequential, CrossEntropyLoss

    model = Sequential(Linear(64, 32, rng=rng), ReLU(), Linear(32, 10, rng=rng))
    criterion = CrossEntropyLoss()
    loss = criterion(model(x), y)            # forward caches what backward needs
    model.backward(criterion.backward())     # accumulates into each Parameter's .grad

``shardstep.workers.nn.functional`` holds the math as pure functions shared by the classes and tasks.
"""

from __future__ import annotations

from shardstep.workers.nn import functional
from shardstep.workers.nn.attention import (
    MultiheadAttention,
    PositionalEmbedding,
    Residual,
    SinusoidalPositionalEncoding,
    TransformerEncoder,
    TransformerEncoderLayer,
    causal_mask,
)
from shardstep.workers.nn.layers import (
    GELU,
    AdaptiveAvgPool1d,
    AdaptiveAvgPool2d,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv1d,
    Conv2d,
    Dropout,
    Embedding,
    Flatten,
    LayerNorm,
    Linear,
    LogSoftmax,
    MaxPool2d,
    ReLU,
    Sequential,
    Softmax,
    Tanh,
)
from shardstep.workers.nn.losses import (
    BCELoss,
    BCEWithLogitsLoss,
    CosineEmbeddingLoss,
    CrossEntropyLoss,
    HuberLoss,
    KLDivLoss,
    L1Loss,
    Loss,
    MarginRankingLoss,
    MSELoss,
    NLLLoss,
    SmoothL1Loss,
    TripletMarginLoss,
)
from shardstep.workers.nn.module import Module, accumulate_grad

__all__ = [
    "functional", "Module", "accumulate_grad",
    "Linear", "Embedding", "ReLU", "Tanh", "GELU", "Dropout", "LogSoftmax", "Softmax", "Sequential",
    "Conv2d", "MaxPool2d", "AvgPool2d", "Flatten", "LayerNorm",
    "Conv1d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "BatchNorm1d", "BatchNorm2d",
    "MultiheadAttention", "TransformerEncoderLayer", "TransformerEncoder", "PositionalEmbedding",
    "SinusoidalPositionalEncoding", "Residual", "causal_mask",
    "Loss", "NLLLoss", "CrossEntropyLoss", "TripletMarginLoss", "MSELoss", "L1Loss", "SmoothL1Loss",
    "HuberLoss", "BCELoss", "BCEWithLogitsLoss", "KLDivLoss", "MarginRankingLoss", "CosineEmbeddingLoss",
]
