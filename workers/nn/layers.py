"""Layers with torch.nn's constructor arguments, default initializations and parameter names.

Initialization draws from a numpy Generator (``rng``: a Generator, an int seed, or None for
fresh entropy) with torch's default distributions, not torch's random stream:

- Linear: weight and bias ~ U(-1/sqrt(in_features), 1/sqrt(in_features)) (torch's
  kaiming_uniform_(a=sqrt(5)) for the weight); the weight has torch's (out, in) layout.
- Embedding: weight ~ N(0, 1), the padding row zero.
- Conv1d and Conv2d: like Linear with fan_in = in_channels / groups * the kernel's size.
- LayerNorm and BatchNorm: weight ones, bias zeros; BatchNorm's buffers running_mean zeros,
  running_var ones, num_batches_tracked 0.

Passing one Generator to the layers of a model in order makes its named parameters a
function of one seed.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping

import numpy as np

from shardstep.workers.nn import functional as F
from shardstep.workers.nn.checks import float_array, integer, real
from shardstep.workers.nn.module import Module, accumulate_grad, as_generator, float_dtype
from shardstep.workers.optim.parameter import Parameter


def _grad_like(owner: str, grad, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The gradient arriving at a layer's output: real-valued, of the output's shape, in its dtype."""
    array = np.asarray(grad)
    if array.dtype == np.bool_ or not (np.issubdtype(array.dtype, np.floating)
                                       or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(f"{owner}.backward: grad_output must be a real-valued array; got dtype {array.dtype}")
    if array.shape != tuple(shape):
        raise ValueError(f"{owner}.backward: grad_output must have the output's shape {tuple(shape)}; "
                         f"got {array.shape}")
    return array.astype(dtype, copy=False)


def _size(owner: str, name: str, value) -> int:
    value = integer(owner, name, value)
    if value < 0:
        raise ValueError(f"{owner}: {name} must be >= 0; got {value}")
    return value


def _fan_in_parameters(generator: np.random.Generator, fan_in: int, weight_shape: tuple[int, ...], bias: bool,
                       dtype: np.dtype) -> tuple[Parameter, Parameter | None]:
    """torch's default weight and bias of Linear and Conv2d: both U(-1/sqrt(fan_in),
    1/sqrt(fan_in)) (kaiming_uniform_(a=sqrt(5)) for the weight), the weight drawn first."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    weight = Parameter(generator.uniform(-bound, bound, weight_shape).astype(dtype), name="weight")
    if not bias:
        return weight, None
    return weight, Parameter(generator.uniform(-bound, bound, weight_shape[0]).astype(dtype), name="bias")


def _accumulate_affine(layer: Module, d_weight, d_bias) -> None:
    """A normalization layer's affine gradients into its weight and bias, those it has."""
    if layer.weight is not None:
        accumulate_grad(layer.weight, d_weight)
    if layer.bias is not None:
        accumulate_grad(layer.bias, d_bias)


class Linear(Module):
    """y = x W^T + b over the last axis; input (*, in_features) -> (*, out_features)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype=np.float32, rng=None):
        super().__init__()
        owner = "Linear"
        self.in_features = _size(owner, "in_features", in_features)
        self.out_features = _size(owner, "out_features", out_features)
        if not isinstance(bias, bool):
            raise TypeError(f"{owner}: bias must be a bool; got {bias!r}")
        dtype = float_dtype(dtype, owner)
        self.weight, self.bias = _fan_in_parameters(as_generator(rng, owner), self.in_features,
                                                    (self.out_features, self.in_features), bias, dtype)

    def forward(self, x) -> np.ndarray:
        x = float_array("Linear", "input", x)
        if x.dtype != self.weight.dtype:
            raise TypeError(f"Linear: input dtype {x.dtype} must match the layer's dtype {self.weight.dtype}")
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"Linear: input must have shape (*, in_features={self.in_features}); got {x.shape}")
        self._cache = x
        return F.linear(x, self.weight.data, None if self.bias is None else self.bias.data)

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        x = self._cached()
        grad = _grad_like("Linear", grad_output, (*x.shape[:-1], self.out_features), x.dtype)
        d_input, d_weight, d_bias = F.linear_backward(grad, x, self.weight.data, self.bias is not None,
                                                      need_input_grad)
        accumulate_grad(self.weight, d_weight)
        if self.bias is not None:
            accumulate_grad(self.bias, d_bias)
        return d_input

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _ints(owner: str, name: str, value, dims: int, minimum: int) -> tuple[int, ...]:
    """An int or a tuple of ``dims`` ints (torch's ``_single`` / ``_pair``), each >= ``minimum``."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims
    if len(values) != dims:
        what = "a pair of ints" if dims == 2 else f"a tuple of {dims} int" + ("s" if dims > 1 else "")
        raise ValueError(f"{owner}: {name} must be an int or {what}; got {value!r}")
    ints = tuple(integer(owner, name, item) for item in values)
    if min(ints) < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}; got {value!r}")
    return ints


def _pair(owner: str, name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (torch's ``_pair``), each >= ``minimum``."""
    return _ints(owner, name, value, 2, minimum)


def _image(owner: str, x, channels: int | None = None) -> np.ndarray:
    x = float_array(owner, "input", x)
    if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
        wanted = "(N, C, H, W)" if channels is None else f"(N, C={channels}, H, W)"
        raise ValueError(f"{owner}: input must have shape {wanted}; got {x.shape}")
    return x


def _conv_padding(owner: str, padding, kernel: tuple[int, ...], stride: tuple[int, ...],
                  dilation: tuple[int, ...]) -> tuple[str | tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(padding as torch keeps it, the zeros on both sides of each axis, the extra zeros after
    its end). ``'valid'`` is no padding; ``'same'`` pads dilation (kernel - 1) zeros in all,
    half before, the odd one after (torch's _conv_padding_same), and needs stride 1."""
    dims = len(kernel)
    if isinstance(padding, str):
        if padding == "valid":
            return padding, (0,) * dims, (0,) * dims
        if padding == "same":
            if max(stride) != 1:
                raise ValueError(f"{owner}: padding='same' is not supported for strided convolutions; "
                                 f"got stride {stride}")
            totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return padding, tuple(t // 2 for t in totals), tuple(t % 2 for t in totals)
        raise ValueError(f"{owner}: padding must be 'valid', 'same', an int or a tuple of {dims} ints; "
                         f"got {padding!r}")
    symmetric = _ints(owner, "padding", padding, dims, 0)
    return symmetric, symmetric, (0,) * dims


class _ConvNd(Module):
    """Conv1d and Conv2d: cross-correlation with stride, zero padding, dilation and groups,
    computed by :func:`functional.conv2d` (a 1-d convolution is a 2-d one of height 1)."""

    dims = 2
    spatial = "H, W"

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                 padding_mode, dtype, rng):
        super().__init__()
        owner = type(self).__name__
        self.in_channels = _size(owner, "in_channels", in_channels)
        self.out_channels = _size(owner, "out_channels", out_channels)
        self.kernel_size = _ints(owner, "kernel_size", kernel_size, self.dims, 1)
        self.stride = _ints(owner, "stride", stride, self.dims, 1)
        self.dilation = _ints(owner, "dilation", dilation, self.dims, 1)
        self.padding, self._pad, self._extra = _conv_padding(owner, padding, self.kernel_size, self.stride,
                                                             self.dilation)
        self.groups = integer(owner, "groups", groups)
        if self.groups < 1 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(f"{owner}: groups must be >= 1 and divide in_channels ({self.in_channels}) and "
                             f"out_channels ({self.out_channels}); got {groups}")
        if not isinstance(bias, bool):
            raise TypeError(f"{owner}: bias must be a bool; got {bias!r}")
        if padding_mode != "zeros":
            raise ValueError(f"{owner}: padding_mode must be 'zeros' (the only one provided); got {padding_mode!r}")
        self.padding_mode = padding_mode
        dtype = float_dtype(dtype, owner)
        fan_in = self.in_channels // self.groups * math.prod(self.kernel_size)
        shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        self.weight, self.bias = _fan_in_parameters(as_generator(rng, owner), fan_in, shape, bias, dtype)

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """(C, *spatial) of one example out for ``shape`` (C, *spatial) in."""
        return (self.out_channels, *(F.conv_output_size(size + e, k, s, p, d) for size, e, k, s, p, d in
                                     zip(shape[1:], self._extra, self.kernel_size, self.stride, self._pad,
                                         self.dilation)))

    def _input(self, x) -> np.ndarray:
        """x as (N, C, *spatial); an unbatched Conv1d input (C, L) gets N = 1."""
        owner = type(self).__name__
        x = float_array(owner, "input", x)
        if x.ndim != self.dims + 2 or x.shape[1] != self.in_channels:
            wanted = f"(N, C={self.in_channels}, {self.spatial})"
            raise ValueError(f"{owner}: input must have shape {wanted}; got {x.shape}")
        if x.dtype != self.weight.dtype:
            raise TypeError(f"{owner}: input dtype {x.dtype} must match the layer's dtype {self.weight.dtype}")
        if min(self.output_shape(x.shape[1:])[1:]) < 1:
            raise ValueError(f"{owner}: input of spatial size {x.shape[2:]} is smaller than the kernel "
                             f"{self.kernel_size} (dilation {self.dilation}, padding {self.padding})")
        return x

    def _forward(self, x: np.ndarray) -> np.ndarray:
        shape = x.shape
        if any(self._extra):
            x = np.pad(x, ((0, 0), (0, 0), *((0, e) for e in self._extra)))
        x4, weight = x, self.weight.data
        if self.dims == 1:
            x4, weight = x[:, :, None, :], weight[:, :, None, :]
        output, columns = F.conv2d(x4, weight, None if self.bias is None else self.bias.data,
                                   *self._as_2d(), self.groups)
        self._cache = (columns, shape, x4.shape)
        return output[:, :, 0, :] if self.dims == 1 else output

    def _as_2d(self):
        if self.dims == 2:
            return self.stride, self._pad, self.dilation
        return (1, *self.stride), (0, *self._pad), (1, *self.dilation)

    def _backward(self, grad_output, need_input_grad: bool) -> np.ndarray | None:
        columns, shape, shape4 = self._cached()
        out_shape = (shape[0], *self.output_shape(shape[1:]))
        grad = _grad_like(type(self).__name__, grad_output, out_shape, self.weight.dtype)
        weight = self.weight.data
        if self.dims == 1:
            grad, weight = grad[:, :, None, :], weight[:, :, None, :]
        d_input, d_weight, d_bias = F.conv2d_backward(grad, columns, shape4, weight, self.bias is not None,
                                                      *self._as_2d(), self.groups, need_input_grad)
        accumulate_grad(self.weight, d_weight.reshape(self.weight.shape))
        if self.bias is not None:
            accumulate_grad(self.bias, d_bias)
        if d_input is None:
            return None
        if self.dims == 1:
            d_input = d_input[:, :, 0, :]
        return np.ascontiguousarray(d_input[(slice(None), slice(None), *(slice(0, n) for n in shape[2:]))])

    def extra_repr(self) -> str:
        padding = repr(self.padding) if isinstance(self.padding, str) else self.padding
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}")


class Conv2d(_ConvNd):
    """torch.nn.Conv2d: cross-correlation over (N, C, H, W) with stride, zero padding (an int,
    a pair, ``'valid'`` or ``'same'``), dilation and groups; weight (out_channels, in_channels /
    groups, kH, kW) and bias drawn like torch's (U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in =
    in_channels / groups * kH * kW). Computed as one matmul per group over the im2col matrix."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", dtype=np.float32, rng=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, dtype, rng)

    def forward(self, x) -> np.ndarray:
        return self._forward(self._input(x))

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        return self._backward(grad_output, need_input_grad)


class Conv1d(_ConvNd):
    """torch.nn.Conv1d over (N, C, L), or one unbatched example (C, L): Conv2d's computation on
    a height of 1 (the same im2col and matmuls); weight (out_channels, in_channels / groups, k),
    fan_in = in_channels / groups * k."""

    dims = 1
    spatial = "L"

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", dtype=np.float32, rng=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, dtype, rng)

    def forward(self, x) -> np.ndarray:
        x = float_array("Conv1d", "input", x)
        unbatched = x.ndim == 2
        if x.ndim not in (2, 3) or x.shape[-2] != self.in_channels:
            raise ValueError(f"Conv1d: input must have shape (N, C={self.in_channels}, L) or (C={self.in_channels}, "
                             f"L); got {x.shape}")
        output = self._forward(self._input(x[None] if unbatched else x))
        self._unbatched = unbatched
        return output[0] if unbatched else output

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        _, shape, _ = self._cached()
        if self._unbatched:
            grad_output = _grad_like("Conv1d", grad_output, self.output_shape(shape[1:]), self.weight.dtype)[None]
        d_input = self._backward(grad_output, need_input_grad)
        return d_input[0] if d_input is not None and self._unbatched else d_input


class _Pool2d(Module):
    def __init__(self, owner: str, kernel_size, stride, padding, dilation=1):
        super().__init__()
        self.kernel_size = _pair(owner, "kernel_size", kernel_size, 1)
        self.stride = self.kernel_size if stride is None else _pair(owner, "stride", stride, 1)
        self.padding = _pair(owner, "padding", padding, 0)
        self.dilation = _pair(owner, "dilation", dilation, 1)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(f"{owner}: padding must be at most half the kernel size; got padding {self.padding}, "
                             f"kernel_size {self.kernel_size}")

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0], *(F.conv_output_size(size, k, s, p, d) for size, k, s, p, d in
                            zip(shape[1:], self.kernel_size, self.stride, self.padding, self.dilation)))

    def _input(self, x) -> np.ndarray:
        x = _image(type(self).__name__, x)
        if min(self.output_shape(x.shape[1:])[1:]) < 1:
            raise ValueError(f"{type(self).__name__}: input of spatial size {x.shape[2:]} is smaller than the "
                             f"kernel {self.kernel_size}")
        return x


class MaxPool2d(_Pool2d):
    """torch.nn.MaxPool2d (ceil_mode=False): the maximum of each window; the gradient goes to
    the first maximum of each window, as torch's CPU kernel chooses it."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1):
        super().__init__("MaxPool2d", kernel_size, stride, padding, dilation)

    def forward(self, x) -> np.ndarray:
        x = self._input(x)
        output, chosen = F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation)
        self._cache = (chosen, x.shape, x.dtype)
        return output

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        chosen, shape, dtype = self._cached()
        grad = _grad_like("MaxPool2d", grad_output, chosen.shape, dtype)
        if not need_input_grad:
            return None
        return F.max_pool2d_backward(grad, chosen, shape, self.kernel_size, self.stride, self.padding, self.dilation)


class AvgPool2d(_Pool2d):
    """torch.nn.AvgPool2d (ceil_mode=False, no divisor_override): the mean of each window,
    zero padding counted in the divisor unless ``count_include_pad=False``."""

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad: bool = True):
        super().__init__("AvgPool2d", kernel_size, stride, padding)
        if not isinstance(count_include_pad, bool):
            raise TypeError(f"AvgPool2d: count_include_pad must be a bool; got {count_include_pad!r}")
        self.count_include_pad = count_include_pad

    def forward(self, x) -> np.ndarray:
        x = self._input(x)
        output, divisor = F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.count_include_pad)
        self._cache = (divisor, x.shape, output.shape, x.dtype)
        return output

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        divisor, shape, out_shape, dtype = self._cached()
        grad = _grad_like("AvgPool2d", grad_output, out_shape, dtype)
        if not need_input_grad:
            return None
        return F.avg_pool2d_backward(grad, divisor, shape, self.kernel_size, self.stride, self.padding)


class _AdaptiveAvgPool(Module):
    """The mean over torch's adaptive windows along the last ``dims`` axes: output i of an
    axis of size n cut into m averages [floor(i n / m), ceil((i + 1) n / m)), so the windows
    cover the input whether or not m divides n (overlapping when it does not)."""

    dims = 2
    spatial = "H, W"

    def __init__(self, output_size):
        super().__init__()
        owner = type(self).__name__
        values = tuple(output_size) if isinstance(output_size, (tuple, list)) else (output_size,) * self.dims
        allowed = ("an int >= 0, None (the input's size) or a pair of them" if self.dims == 2
                   else "an int >= 0 or a tuple of one")
        if len(values) != self.dims or (self.dims == 1 and values[0] is None):
            raise ValueError(f"{owner}: output_size must be {allowed}; got {output_size!r}")
        sizes = []
        for value in values:
            if value is not None:
                value = integer(owner, "output_size", value)
                if value < 0:
                    raise ValueError(f"{owner}: output_size must be {allowed}; got {output_size!r}")
            sizes.append(value)
        self.output_size = tuple(sizes) if isinstance(output_size, (tuple, list)) else sizes[0]
        self._sizes = tuple(sizes)

    def forward(self, x) -> np.ndarray:
        owner = type(self).__name__
        x = float_array(owner, "input", x)
        if x.ndim not in (self.dims + 1, self.dims + 2) or 0 in x.shape[x.ndim - self.dims - 1:]:
            raise ValueError(f"{owner}: input must have shape (N, C, {self.spatial}) or (C, {self.spatial}), "
                             f"no size 0 but N's; got {x.shape}")
        inner = x.shape[x.ndim - self.dims:]
        out = tuple(size if wanted is None else wanted for size, wanted in zip(inner, self._sizes))
        output = F.adaptive_avg_pool(x, out)
        self._cache = (x.shape, x.dtype, output.shape)
        return output

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        shape, dtype, out_shape = self._cached()
        grad = _grad_like(type(self).__name__, grad_output, out_shape, dtype)
        if not need_input_grad:
            return None
        return F.adaptive_avg_pool_backward(grad, shape[len(shape) - self.dims:])

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class AdaptiveAvgPool2d(_AdaptiveAvgPool):
    """torch.nn.AdaptiveAvgPool2d: (N, C, H, W) or (C, H, W) -> output_size (an int, a pair,
    None keeping the input's size), each output the mean of its adaptive window."""


class AdaptiveAvgPool1d(_AdaptiveAvgPool):
    """torch.nn.AdaptiveAvgPool1d: (N, C, L) or (C, L) -> length output_size."""

    dims = 1
    spatial = "L"


class LayerNorm(Module):
    """torch.nn.LayerNorm: normalizes over the last ``len(normalized_shape)`` axes with the
    biased variance; ``weight`` (ones) and ``bias`` (zeros) of ``normalized_shape`` when
    ``elementwise_affine`` (``bias=False`` leaves the bias out). ``rng`` is accepted like the
    other layers' and unused: the initialization is constant."""

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 dtype=np.float32, rng=None):
        super().__init__()
        owner = "LayerNorm"
        shape = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) else (normalized_shape,)
        self.normalized_shape = tuple(_size(owner, "normalized_shape", size) for size in shape)
        if not self.normalized_shape or min(self.normalized_shape) < 1:
            raise ValueError(f"{owner}: normalized_shape must be positive sizes; got {normalized_shape!r}")
        self.eps = real(owner, "eps", eps)
        if self.eps < 0:
            raise ValueError(f"{owner}: eps must be >= 0; got {eps}")
        for name, value in (("elementwise_affine", elementwise_affine), ("bias", bias)):
            if not isinstance(value, bool):
                raise TypeError(f"{owner}: {name} must be a bool; got {value!r}")
        dtype = float_dtype(dtype, owner)
        as_generator(rng, owner)
        self.weight = Parameter(np.ones(self.normalized_shape, dtype), name="weight") if elementwise_affine else None
        self.bias = (Parameter(np.zeros(self.normalized_shape, dtype), name="bias")
                     if elementwise_affine and bias else None)

    def forward(self, x) -> np.ndarray:
        x = float_array("LayerNorm", "input", x)
        dims = len(self.normalized_shape)
        if x.shape[x.ndim - dims:] != self.normalized_shape or x.ndim < dims:
            raise ValueError(f"LayerNorm: input must end in normalized_shape {self.normalized_shape}; got {x.shape}")
        if self.weight is not None and x.dtype != self.weight.dtype:
            raise TypeError(f"LayerNorm: input dtype {x.dtype} must match the layer's dtype {self.weight.dtype}")
        output, saved = F.layer_norm(x, dims, None if self.weight is None else self.weight.data,
                                     None if self.bias is None else self.bias.data, self.eps)
        self._cache = (saved, x.shape, x.dtype)
        return output

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        saved, shape, dtype = self._cached()
        grad = _grad_like("LayerNorm", grad_output, shape, dtype)
        d_input, d_weight, d_bias = F.layer_norm_backward(grad, saved, len(self.normalized_shape),
                                                          None if self.weight is None else self.weight.data,
                                                          self.bias is not None, need_input_grad)
        _accumulate_affine(self, d_weight, d_bias)
        return d_input

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.weight is not None}"


class _BatchNorm(Module):
    """torch's BatchNorm: per channel (axis 1), (x - mean) / sqrt(var + eps) * weight + bias.

    In training mode mean and var are the batch's (the biased variance) and the running
    statistics move toward them: running = (1 - momentum) running + momentum batch, with the
    batch's unbiased variance for running_var; ``momentum=None`` is the cumulative average,
    momentum 1 / num_batches_tracked. In eval mode the running statistics normalize (the
    batch's when ``track_running_stats=False``, which keeps none). The batch statistics are
    summed in float64 and rounded to the layer's dtype, as torch's CPU kernel."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, dtype=np.float32, *, bias: bool = True):
        super().__init__()
        owner = type(self).__name__
        self.num_features = integer(owner, "num_features", num_features)
        if self.num_features < 1:
            raise ValueError(f"{owner}: num_features (the number of channels) must be >= 1; got {num_features}")
        self.eps = real(owner, "eps", eps)
        if self.eps < 0:
            raise ValueError(f"{owner}: eps must be >= 0; got {eps}")
        if momentum is not None:
            momentum = real(owner, "momentum", momentum)
            if not 0.0 <= momentum <= 1.0:
                raise ValueError(f"{owner}: momentum must be in [0, 1], or None for a cumulative average; "
                                 f"got {momentum}")
        self.momentum = momentum
        for name, value in (("affine", affine), ("track_running_stats", track_running_stats), ("bias", bias)):
            if not isinstance(value, bool):
                raise TypeError(f"{owner}: {name} must be a bool; got {value!r}")
        self.affine, self.track_running_stats = affine, track_running_stats
        self._dtype = float_dtype(dtype, owner)
        shape = (self.num_features,)
        self.weight = Parameter(np.ones(shape, self._dtype), name="weight") if affine else None
        self.bias = Parameter(np.zeros(shape, self._dtype), name="bias") if affine and bias else None
        tracked = track_running_stats
        self.register_buffer("running_mean", np.zeros(shape, self._dtype) if tracked else None)
        self.register_buffer("running_var", np.ones(shape, self._dtype) if tracked else None)
        self.register_buffer("num_batches_tracked", np.zeros((), np.int64) if tracked else None)
        # inside a task the engine moves the running statistics once per step from the whole
        # global batch's: the layer then only records its piece's (see apply_statistics)
        self.defer_running_stats = False
        self.last_statistics: tuple[int, np.ndarray, np.ndarray] | None = None

    def _input(self, x) -> np.ndarray:
        raise NotImplementedError

    def apply_statistics(self, count: int, mean: np.ndarray | None, squares: np.ndarray | None) -> None:
        """Count a training batch and move the running statistics toward its ``mean`` and
        ``squares / (count - 1)`` (the sum of squared deviations from that mean, float64), as
        a training forward does; nothing moves for an empty batch but the count."""
        if not self.track_running_stats or self.num_batches_tracked is None:
            return
        self.num_batches_tracked += 1
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        if count > 0 and self.running_mean is not None and self.running_var is not None:
            F.update_running_stats(self.running_mean, self.running_var, mean, squares, count, factor)

    def forward(self, x) -> np.ndarray:
        owner = type(self).__name__
        x = self._input(float_array(owner, "input", x))
        if (self.weight is not None or self.running_mean is not None) and x.dtype != self._dtype:
            raise TypeError(f"{owner}: input dtype {x.dtype} must match the layer's dtype {self._dtype}")
        update = self.training and self.track_running_stats
        batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        count = x.size // self.num_features
        if batch_statistics and count == 1:
            raise ValueError(f"{owner}: Expected more than 1 value per channel when training, got input size "
                             f"{x.shape}")
        statistics: tuple[int, np.ndarray | None, np.ndarray | None] = (0, None, None)
        if not batch_statistics:
            centered = x - self.running_mean.reshape(1, -1, *(1,) * (x.ndim - 2))
            inverse = F.inverse_std(self.running_var, self.eps, x.dtype)
        elif count == 0:    # an empty batch, as torch: nothing to normalize, the statistics unchanged
            centered, inverse = x, np.ones(self.num_features, x.dtype)
        else:
            mean, centered, squares, count = F.batch_norm_statistics(x)
            inverse = F.inverse_std(squares / count, self.eps, x.dtype)
            statistics = (count, mean, squares)
        if update:
            if self.defer_running_stats:
                self.last_statistics = statistics
            else:
                self.apply_statistics(*statistics)
        output, normalized = F.batch_norm(centered, inverse, None if self.weight is None else self.weight.data,
                                          None if self.bias is None else self.bias.data)
        self._cache = (normalized, inverse, batch_statistics, x.shape, x.dtype)
        return output

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        normalized, inverse, batch_statistics, shape, dtype = self._cached()
        grad = _grad_like(type(self).__name__, grad_output, shape, dtype)
        d_input, d_weight, d_bias = F.batch_norm_backward(grad, normalized, inverse,
                                                          None if self.weight is None else self.weight.data,
                                                          self.bias is not None, batch_statistics, need_input_grad)
        _accumulate_affine(self, d_weight, d_bias)
        return d_input

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """torch.nn.BatchNorm1d over (N, C) or (N, C, L): statistics per channel over N (and L)."""

    def _input(self, x: np.ndarray) -> np.ndarray:
        if x.ndim not in (2, 3) or x.shape[1] != self.num_features:
            c = self.num_features
            raise ValueError(f"BatchNorm1d: input must have shape (N, C={c}) or (N, C={c}, L); got {x.shape}")
        return x


class BatchNorm2d(_BatchNorm):
    """torch.nn.BatchNorm2d over (N, C, H, W): statistics per channel over N, H and W."""

    def _input(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"BatchNorm2d: input must have shape (N, C={self.num_features}, H, W); got {x.shape}")
        return x


class Flatten(Module):
    """torch.nn.Flatten: dimensions ``start_dim`` .. ``end_dim`` as one."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim = integer("Flatten", "start_dim", start_dim)
        self.end_dim = integer("Flatten", "end_dim", end_dim)

    def forward(self, x) -> np.ndarray:
        x = float_array("Flatten", "input", x)
        start, end = self.start_dim % max(x.ndim, 1), self.end_dim % max(x.ndim, 1)
        if x.ndim == 0 or start > end:
            raise ValueError(f"Flatten: start_dim {self.start_dim} must not come after end_dim {self.end_dim} for "
                             f"an input of shape {x.shape}")
        self._cache = x.shape
        return x.reshape(*x.shape[:start], -1, *x.shape[end + 1:])

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        shape = self._cached()
        grad = np.asarray(grad_output)
        if grad.size != math.prod(shape):
            raise ValueError(f"Flatten.backward: grad_output of shape {grad.shape} does not match the input's "
                             f"{shape}")
        return grad.reshape(shape) if need_input_grad else None


class Embedding(Module):
    """A lookup table: integer indices of any shape -> (*indices.shape, embedding_dim).

    With ``sparse=True`` the weight's gradient is a RowSparseGrad (one row per looked-up index,
    for SparseAdam / sparse Adagrad); otherwise dense. The ``padding_idx`` row is initialized
    to zero and never receives a gradient. ``backward`` returns None: indices have no gradient.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 sparse: bool = False, dtype=np.float32, rng=None):
        super().__init__()
        owner = "Embedding"
        self.num_embeddings = _size(owner, "num_embeddings", num_embeddings)
        self.embedding_dim = _size(owner, "embedding_dim", embedding_dim)
        if padding_idx is not None:
            padding_idx = integer(owner, "padding_idx", padding_idx)
            if not -self.num_embeddings <= padding_idx < self.num_embeddings:
                raise ValueError(f"{owner}: padding_idx must be in [{-self.num_embeddings}, "
                                 f"{self.num_embeddings}); got {padding_idx}")
            padding_idx %= self.num_embeddings
        self.padding_idx = padding_idx
        if not isinstance(sparse, bool):
            raise TypeError(f"{owner}: sparse must be a bool; got {sparse!r}")
        self.sparse = sparse
        dtype = float_dtype(dtype, owner)
        weight = as_generator(rng, owner).standard_normal((self.num_embeddings, self.embedding_dim))
        if padding_idx is not None:
            weight[padding_idx] = 0
        self.weight = Parameter(weight.astype(dtype), name="weight")

    def forward(self, indices) -> np.ndarray:
        indices = np.asarray(indices)
        if indices.dtype == np.bool_ or not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"Embedding: indices must be an integer array; got dtype {indices.dtype}")
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_embeddings):
            bad = indices[(indices < 0) | (indices >= self.num_embeddings)].flat[0]
            raise IndexError(f"Embedding: index {bad} is out of range [0, {self.num_embeddings})")
        self._cache = indices
        return F.embedding(indices, self.weight.data)

    def backward(self, grad_output, need_input_grad: bool = True) -> None:
        indices = self._cached()
        grad = _grad_like("Embedding", grad_output, (*indices.shape, self.embedding_dim), self.weight.dtype)
        accumulate_grad(self.weight, F.embedding_backward(grad, indices, self.num_embeddings,
                                                          self.padding_idx, self.sparse))

    def extra_repr(self) -> str:
        extra = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{extra}" + (", sparse=True" if self.sparse else "")


class _Elementwise(Module):
    """An activation: same shape in and out, any float dtype."""

    def _input(self, x) -> np.ndarray:
        return float_array(type(self).__name__, "input", x)

    def _grad(self, grad_output, like: np.ndarray) -> np.ndarray:
        return _grad_like(type(self).__name__, grad_output, like.shape, like.dtype)


class ReLU(_Elementwise):
    """max(x, 0); the gradient is 0 where x <= 0 (torch's threshold_backward)."""

    def forward(self, x) -> np.ndarray:
        x = self._input(x)
        self._cache = x
        return F.relu(x)

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        x = self._cached()
        grad = self._grad(grad_output, x)
        return F.relu_backward(grad, x) if need_input_grad else None


class Tanh(_Elementwise):
    def forward(self, x) -> np.ndarray:
        output = F.tanh(self._input(x))
        self._cache = output
        return output

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        output = self._cached()
        grad = self._grad(grad_output, output)
        return F.tanh_backward(grad, output) if need_input_grad else None


class GELU(_Elementwise):
    """x * Phi(x) (``approximate='none'``) or its tanh approximation (``'tanh'``)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        if approximate not in F.GELU_APPROXIMATIONS:
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh'; got {approximate!r}")
        self.approximate = approximate

    def forward(self, x) -> np.ndarray:
        x = self._input(x)
        self._cache = x
        return F.gelu(x, self.approximate)

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        x = self._cached()
        grad = self._grad(grad_output, x)
        return F.gelu_backward(grad, x, self.approximate) if need_input_grad else None

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class BatchNoise:
    """Where a stochastic layer draws its noise within one training batch: the entropy words
    of the batch's generator (the task's seed, epoch, batch and the layer's number) and the
    place of this piece's rows in the global batch. A task sets it before each forward, so a
    step's masks are a function of the step alone: a resumed run, any number of gradient
    workers and any number of micro-batches draw the very same masks, and nothing about the
    generator needs to be saved."""

    __slots__ = ("words", "offset", "total", "calls")

    def __init__(self, words: tuple[int, ...], offset: int, total: int):
        self.words, self.offset, self.total = tuple(int(w) for w in words), int(offset), int(total)
        self.calls = 0

    def mask(self, shape, p: float, dtype) -> np.ndarray:
        # a layer called twice in one forward (a shared module) draws a second mask
        words, self.calls = (*self.words, self.calls), self.calls + 1
        return F.batch_dropout_mask(shape, p, dtype, words, self.offset, self.total)


class Dropout(_Elementwise):
    """In training, zero each element with probability ``p`` and scale the rest by 1 / (1 - p);
    the identity in eval mode. The masks come from ``rng`` (a Generator or seed), so a seeded
    run draws the same masks every time; inside a task, from the step's :class:`BatchNoise`
    (``noise``) instead, by rows along the first axis (the batch)."""

    def __init__(self, p: float = 0.5, rng=None):
        super().__init__()
        p = real("Dropout", "p", p)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p (the probability of an element to be zeroed) must be in [0, 1]; got {p}")
        self.p = p
        self.rng = as_generator(rng, "Dropout")
        self.noise: BatchNoise | None = None

    def forward(self, x) -> np.ndarray:
        x = self._input(x)
        if not self.training or self.p == 0.0:
            self._cache = (x, None)
            return x
        if self.noise is not None and x.ndim > 0:
            mask = self.noise.mask(x.shape, self.p, x.dtype)
        else:
            mask = F.dropout_mask(x.shape, self.p, x.dtype, self.rng)
        self._cache = (x, mask)
        return x * mask

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        x, mask = self._cached()
        grad = self._grad(grad_output, x)
        if not need_input_grad:
            return None
        return grad if mask is None else grad * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _SoftmaxBase(_Elementwise):
    """A normalization along ``dim`` whose gradient needs only its output: ``_function(x, axis)``
    and ``_backward_function(grad, output, axis)`` are the subclass's pair from functional."""

    _function: Callable[[np.ndarray, int], np.ndarray]
    _backward_function: Callable[[np.ndarray, np.ndarray, int], np.ndarray]

    def __init__(self, dim: int | None = None):
        super().__init__()
        self.dim = None if dim is None else integer(type(self).__name__, "dim", dim)

    def _axis(self, ndim: int) -> int:
        dim = F.implicit_softmax_dim(ndim) if self.dim is None else self.dim
        return F.softmax_axis(type(self).__name__, dim, ndim)

    def forward(self, x) -> np.ndarray:
        x = self._input(x)
        axis = self._axis(x.ndim)
        output = self._function(x, axis)
        self._cache = (output, axis)
        return output

    def backward(self, grad_output, need_input_grad: bool = True) -> np.ndarray | None:
        output, axis = self._cached()
        grad = self._grad(grad_output, output)
        return self._backward_function(grad, output, axis) if need_input_grad else None

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class LogSoftmax(_SoftmaxBase):
    """log softmax along ``dim``, computed as x - max - log(sum(exp(x - max))): finite for any
    finite input. ``dim=None`` picks torch's legacy implicit dimension."""

    _function = staticmethod(F.log_softmax)
    _backward_function = staticmethod(F.log_softmax_backward)


class Softmax(_SoftmaxBase):
    _function = staticmethod(F.softmax)
    _backward_function = staticmethod(F.softmax_backward)


class Sequential(Module):
    """Modules applied in order; children are named "0", "1", ... (or by the keys of one
    mapping), so parameters are "0.weight", "0.bias", "2.weight", ... as in torch."""

    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], Mapping):
            items = list(modules[0].items())
        else:
            items = [(str(i), m) for i, m in enumerate(modules)]
        for name, module in items:
            if not isinstance(module, Module):
                raise TypeError(f"Sequential: item {name!r} must be a Module; got {type(module).__name__}")
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(f"Sequential: module names must be non-empty strings without '.'; got {name!r}")
            setattr(self, name, module)

    def append(self, module: Module) -> Sequential:
        if not isinstance(module, Module):
            raise TypeError(f"Sequential.append: expected a Module; got {type(module).__name__}")
        setattr(self, str(len(self._modules)), module)
        return self

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __getitem__(self, index):
        modules = list(self._modules.items())
        if isinstance(index, slice):
            return Sequential(OrderedDict(modules[index]))
        return modules[index][1]

    def forward(self, x):
        for module in self._modules.values():
            x = module(x)
        return x

    def backward(self, grad_output, need_input_grad: bool = True):
        """Back through the modules in reverse order; the first module computes its input's
        gradient only if ``need_input_grad`` (a model's data needs none)."""
        grad = grad_output
        modules = list(self._modules.values())
        for index in range(len(modules) - 1, -1, -1):
            grad = modules[index].backward(grad, need_input_grad=need_input_grad or index > 0)
        return grad
