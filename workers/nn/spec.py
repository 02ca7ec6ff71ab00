"""Models and losses described as data: the layer list and loss of a job file's ``[model]``.

    layers = [{"name": "Linear", "args": {"in_features": 64, "out_features": 256}},
              {"name": "ReLU"},
              {"name": "Linear", "args": {"in_features": 256, "out_features": 10}}]
    model = ModelSpec.parse(layers, "CrossEntropyLoss")
    module = model.build(np.float32, rng)     # Sequential: "0.weight", "0.bias", "2.weight", ...
    model.param_specs(np.float32)             # the same names and shapes, nothing allocated

The layers are the ones of this package whose behaviour is a function of their arguments
and input, and of the batch for Dropout (the task keys its masks to the step:
``shardstep.workers.tasks.models.set_batch_noise``); the losses are those that compare one
output with one target.
Every refusal is a :class:`SpecError` whose message names the key (``model.layers[2].args``),
the value and what is allowed.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardstep.checkpoints.layout import ParamSpec
from shardstep.workers.checks import is_integer
from shardstep.workers.nn import layers as nn_layers
from shardstep.workers.nn import losses as nn_losses
from shardstep.workers.nn.layers import Linear, Sequential
from shardstep.workers.nn.losses import Loss

# layer name (its class's name) -> class; Linear and the convolutions have weights, and every
# layer's input shape must be what the layers before it give (checked from model.input_shape,
# one example's shape)
LAYERS: dict[str, type] = {cls.__name__: cls for cls in (
    nn_layers.Linear, nn_layers.Conv1d, nn_layers.Conv2d, nn_layers.ReLU, nn_layers.Tanh, nn_layers.GELU,
    nn_layers.LogSoftmax, nn_layers.Softmax, nn_layers.MaxPool2d, nn_layers.AvgPool2d, nn_layers.AdaptiveAvgPool1d,
    nn_layers.AdaptiveAvgPool2d, nn_layers.Flatten, nn_layers.LayerNorm, nn_layers.BatchNorm1d,
    nn_layers.BatchNorm2d, nn_layers.Dropout)}
# the layers built with the run's dtype and generator; a model needs a Linear or a convolution
PARAMETRIC = ("Linear", "Conv1d", "Conv2d", "LayerNorm")
# built with the run's dtype only (constant initialization)
DTYPED = ("BatchNorm1d", "BatchNorm2d")
WEIGHTED = ("Linear", "Conv1d", "Conv2d")
CONVOLUTIONS = ("Conv1d", "Conv2d")
# the layers of (channels, *spatial) examples, by the number of spatial axes
SPATIAL_LAYERS = {"Conv1d": 1, "AdaptiveAvgPool1d": 1, "Conv2d": 2, "MaxPool2d": 2, "AvgPool2d": 2,
                  "AdaptiveAvgPool2d": 2}
# loss name (its class's name) -> (class, kind): "classes" losses take class indices, "values"
# losses take float targets of the output's shape, "binary" losses take 0/1 targets of the
# output's shape
LOSSES: dict[str, tuple[type[Loss], str]] = {cls.__name__: (cls, kind) for cls, kind in (
    (nn_losses.CrossEntropyLoss, "classes"), (nn_losses.NLLLoss, "classes"), (nn_losses.MSELoss, "values"),
    (nn_losses.L1Loss, "values"), (nn_losses.SmoothL1Loss, "values"), (nn_losses.HuberLoss, "values"),
    (nn_losses.BCEWithLogitsLoss, "binary"))}
# arguments the spec chooses itself: the dtype and generator of the run, the reduction the
# summable loss needs (see shardstep.workers.tasks.base)
CHOSEN_ARGS = {"dtype": "the data's dtype (data.dtype)", "rng": "the run's seed",
               "reduction": "'sum' (the engine divides by the global batch size)"}
ENTRY_KEYS = ("name", "args")


class SpecError(ValueError):
    """A model description that cannot be built; the message names the key."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _entry(path: str, value: Any, registry: Mapping[str, Any], what: str) -> tuple[str, dict[str, Any]]:
    """A ``{name, args}`` table (or a bare name) of ``registry``."""
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, Mapping):
        raise SpecError(f"{path} must be a {what} name or a table {{name = ..., args = {{...}}}}; got {_shown(value)}")
    unknown = [key for key in value if key not in ENTRY_KEYS]
    if unknown:
        raise SpecError(f"{path} has unknown key {unknown[0]!r}; allowed: name, args (the {what}'s arguments go "
                        f"in args)")
    name = value.get("name")
    if name not in registry:
        raise SpecError(f"{path}.name must be one of {', '.join(registry)}; got {_shown(name)}")
    args = value.get("args", {})
    if not isinstance(args, Mapping):
        raise SpecError(f"{path}.args must be a table of {name}'s arguments; got {_shown(args)}")
    cls = registry[name][0] if isinstance(registry[name], tuple) else registry[name]
    parameters = inspect.signature(cls).parameters
    for key in args:
        if key in CHOSEN_ARGS:
            raise SpecError(f"{path}.args.{key} is not set in the job: it is {CHOSEN_ARGS[key]}")
        if key not in parameters:
            allowed = [n for n in parameters if n not in CHOSEN_ARGS]
            raise SpecError(f"{path}.args: {name} has no argument {key!r}; allowed: {', '.join(allowed) or 'none'}")
    missing = [n for n, p in parameters.items() if p.default is inspect.Parameter.empty and n not in args
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        raise SpecError(f"{path}.args: {name} requires {', '.join(missing)}")
    return name, dict(args)


@dataclass(frozen=True)
class ModelSpec:
    """A checked layer list and loss (see the module docstring). ``input_shape``: one
    example's shape (a row of features is reshaped to it); by default the first Linear
    layer's ``(in_features,)``."""

    layers: tuple[tuple[str, Mapping[str, Any]], ...]
    loss: tuple[str, Mapping[str, Any]]
    input_shape: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()

    @classmethod
    def parse(cls, layers: Any, loss: Any, input_shape: Any = None, path: str = "model") -> ModelSpec:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
            raise SpecError(f"{path}.layers must be a non-empty list of layers ({{name = 'Linear', args = {{...}}}}); "
                            f"got {_shown(layers)}")
        checked = tuple(_entry(f"{path}.layers[{i}]", layer, LAYERS, "layer") for i, layer in enumerate(layers))
        for index, (name, args) in enumerate(checked):
            keys = ("in_features", "out_features") if name == "Linear" else (
                ("in_channels", "out_channels") if name in CONVOLUTIONS else ())
            for key in keys:
                value = args[key]
                if not is_integer(value) or value < 1:
                    raise SpecError(f"{path}.layers[{index}].args.{key} must be an integer >= 1; got {_shown(value)}")
            if "bias" in args and not isinstance(args["bias"], bool):
                raise SpecError(f"{path}.layers[{index}].args.bias must be true or false; got {_shown(args['bias'])}")
        if not any(name in WEIGHTED for name, _ in checked):
            raise SpecError(f"{path}.layers has no Linear, Conv1d or Conv2d layer, so nothing to train; got "
                            f"{', '.join(name for name, _ in checked)}")
        if input_shape is None:
            first, args = next((name, args) for name, args in checked if name in WEIGHTED)
            if first != "Linear":
                raise SpecError(f"{path}.input_shape is required when the first layer with parameters is {first}: "
                                f"one example's shape, such as [1, 8, 8] ([channels, length] for Conv1d)")
            input_shape = [args["in_features"]]
        if (isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) or not input_shape
                or not all(is_integer(d) and d >= 1
                           for d in input_shape)):
            raise SpecError(f"{path}.input_shape must be a list of positive integers (one example's shape); got "
                            f"{_shown(input_shape)}")
        if loss is None:
            raise SpecError(f"{path}.loss is required: one of {', '.join(LOSSES)}")
        loss_entry = _entry(f"{path}.loss", loss, LOSSES, "loss")
        try:  # the arguments' values: the classes' own checks, on miniatures (the model is never built here)
            modules = [_miniature(name, args) for name, args in checked]
            LOSSES[loss_entry[0]][0](**loss_entry[1], reduction="sum")
        except (TypeError, ValueError) as error:
            raise SpecError(f"{path}: {error}") from error
        shape = tuple(int(d) for d in input_shape)
        start = shape
        for index, ((name, args), module) in enumerate(zip(checked, modules)):
            shape = _layer_output(f"{path}.layers[{index}]", name, args, module, shape)
        if len(shape) != 1:
            raise SpecError(f"{path}.layers end in outputs of shape {list(shape)} per example; the loss takes one "
                            f"vector per example (end with Flatten and a Linear layer)")
        return cls(checked, loss_entry, start, shape)

    @property
    def in_features(self) -> int:
        """Numbers per example in (a row of features)."""
        return math.prod(self.input_shape)

    @property
    def out_features(self) -> int:
        return self.output_shape[0]

    @property
    def loss_kind(self) -> str:
        return LOSSES[self.loss[0]][1]

    def build(self, dtype: Any, rng: np.random.Generator) -> Sequential:
        """The layers, Linear ones drawing their initial weights from ``rng`` in order (as
        torch's ``nn.Sequential`` of the same layers does from its generator)."""
        modules = []
        for name, args in self.layers:
            if name in PARAMETRIC:
                modules.append(LAYERS[name](**args, dtype=dtype, rng=rng))
            elif name in DTYPED:
                modules.append(LAYERS[name](**args, dtype=dtype))
            else:
                modules.append(LAYERS[name](**args))
        return Sequential(*modules)

    def param_specs(self, dtype: Any) -> tuple[ParamSpec, ...]:
        """The parameters :meth:`build` makes, by name, shape and dtype, without making them."""
        kind = np.dtype(dtype).name
        specs = []
        for index, (name, args) in enumerate(self.layers):
            if name == "Linear":
                weight, out = (args["out_features"], args["in_features"]), args["out_features"]
            elif name == "LayerNorm":
                if not args.get("elementwise_affine", True):
                    continue
                size = args["normalized_shape"]
                shape = tuple(size) if isinstance(size, (list, tuple)) else (size,)
                specs.append(ParamSpec(f"{index}.weight", shape, kind))
                if args.get("bias", True):
                    specs.append(ParamSpec(f"{index}.bias", shape, kind))
                continue
            elif name in DTYPED:
                if args.get("affine", True):
                    specs.append(ParamSpec(f"{index}.weight", (args["num_features"],), kind))
                    if args.get("bias", True):
                        specs.append(ParamSpec(f"{index}.bias", (args["num_features"],), kind))
                continue
            elif name in CONVOLUTIONS:
                kernel = args["kernel_size"]
                kernel = tuple(kernel) if isinstance(kernel, (list, tuple)) else (kernel,) * SPATIAL_LAYERS[name]
                weight = (args["out_channels"], args["in_channels"] // args.get("groups", 1), *kernel)
                out = args["out_channels"]
            else:
                continue
            specs.append(ParamSpec(f"{index}.weight", weight, kind))
            if args.get("bias", True):
                specs.append(ParamSpec(f"{index}.bias", (out,), kind))
        return tuple(specs)

    def criterion(self, reduction: str = "sum") -> Loss:
        name, args = self.loss
        return LOSSES[name][0](**args, reduction=reduction)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [{"name": name, "args": dict(args)} for name, args in self.layers],
                "loss": {"name": self.loss[0], "args": dict(self.loss[1])}, "input_shape": list(self.input_shape)}


def _miniature(name: str, args: Mapping[str, Any]) -> Any:
    """Layer ``name`` with ``args`` checked by its own constructor, but as small as it can be:
    a Linear of 1 x 1 and a Conv2d of one channel per group carry the same options (bias,
    kernel, stride, padding, dilation, groups) without the job check allocating the model."""
    if name == "Linear":
        return Linear(1, 1, bias=args.get("bias", True), dtype=np.float32, rng=0)
    if name in CONVOLUTIONS:
        groups = args.get("groups", 1)
        for key in ("in_channels", "out_channels"):
            if isinstance(groups, int) and groups >= 1 and args[key] % groups:
                raise ValueError(f"{name}: groups must divide {key} ({args[key]}); got {groups}")
        options = {key: value for key, value in args.items() if key not in ("in_channels", "out_channels")}
        return LAYERS[name](groups, groups, **options, dtype=np.float32, rng=0)
    if name in PARAMETRIC:
        return LAYERS[name](**args, dtype=np.float32, rng=0)
    if name in DTYPED:
        return LAYERS[name](**args, dtype=np.float32)
    return LAYERS[name](**args)


def _layer_output(path: str, name: str, args: Mapping[str, Any], module: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    """One example's shape after layer ``name``, given its shape before; a layer that cannot
    take that shape is a SpecError naming it."""
    if name == "Linear":
        if shape[-1] != args["in_features"]:
            raise SpecError(f"{path}.args.in_features must be {shape[-1]}, the size the layers before it give "
                            f"(shape {list(shape)} per example); got {args['in_features']}")
        return (*shape[:-1], args["out_features"])
    if name in SPATIAL_LAYERS:
        axes = SPATIAL_LAYERS[name]
        if len(shape) != axes + 1:
            what, example = (("images (channels, height, width)", "[1, 8, 8]") if axes == 2
                             else ("sequences (channels, length)", "[1, 64]"))
            raise SpecError(f"{path}: {name} takes {what} per example; the layers before it give shape "
                            f"{list(shape)} (set model.input_shape, e.g. {example})")
        if name in CONVOLUTIONS and shape[0] != args["in_channels"]:
            raise SpecError(f"{path}.args.in_channels must be {shape[0]}, the channels the layers before it give; got "
                            f"{args['in_channels']}")
        if name.startswith("Adaptive"):
            out = (shape[0], *(size if wanted is None else wanted for size, wanted in zip(shape[1:], module._sizes)))
        else:
            out = module.output_shape(shape)
        if name in CONVOLUTIONS:  # the miniature has other channels: the layer's own give the output's
            out = (args["out_channels"], *out[1:])
        if min(out[1:]) < 1:
            raise SpecError(f"{path}: {name} cannot take inputs of {'x'.join(map(str, shape[1:]))} (its kernel, "
                            f"padding or output size leave nothing)")
        return tuple(out)
    if name in DTYPED:
        axes = (0, 1) if name == "BatchNorm1d" else (2,)
        if len(shape) - 1 not in axes or shape[0] != args["num_features"]:
            what = "(num_features,) or (num_features, length)" if name == "BatchNorm1d" else \
                "(num_features, height, width)"
            raise SpecError(f"{path}: {name} takes {what} per example with num_features = {args['num_features']}; "
                            f"the layers before it give shape {list(shape)}")
        return shape
    if name == "LayerNorm":
        normalized = module.normalized_shape
        if shape[len(shape) - len(normalized):] != normalized:
            raise SpecError(f"{path}.args.normalized_shape must be the last axes of what the layers before it give "
                            f"(shape {list(shape)} per example); got {list(normalized)}")
        return shape
    if name == "Flatten":
        full = (1, *shape)  # the batch axis too: start_dim counts it, as torch's does
        start, end = module.start_dim % len(full), module.end_dim % len(full)
        if start > end or start == 0:
            raise SpecError(f"{path}: Flatten must keep the batch axis (start_dim >= 1) and have start_dim <= "
                            f"end_dim; got start_dim {module.start_dim}, end_dim {module.end_dim}")
        return (*full[1:start], math.prod(full[start:end + 1]), *full[end + 1:])
    return shape
