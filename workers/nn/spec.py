"""Models and losses described as data: the layer list and loss of a job file's ``[model]``.

    layers = [{"name": "Linear", "args": {"in_features": 64, "out_features": 256}},
              {"name": "ReLU"},
              {"name": "Linear", "args": {"in_features": 256, "out_features": 10}}]
    model = ModelSpec.parse(layers, "CrossEntropyLoss")
    module = model.build(np.float32, rng)     # Sequential: "0.weight", "0.bias", "2.weight", ...
    model.param_specs(np.float32)             # the same names and shapes, nothing allocated

The layers are the ones of this package whose behaviour is a function of their arguments
and input alone (Dropout draws a mask per call and is left out until its masks are a
function of the batch); the losses are those that compare one output with one target.
Every refusal is a :class:`SpecError` whose message names the key (``model.layers[2].args``),
the value and what is allowed.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardstep.checkpoints.layout import ParamSpec
from shardstep.workers.nn.layers import GELU, Linear, LogSoftmax, ReLU, Sequential, Softmax, Tanh
from shardstep.workers.nn.losses import (
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    HuberLoss,
    L1Loss,
    Loss,
    MSELoss,
    NLLLoss,
    SmoothL1Loss,
)

# layer name -> class; Linear is the one with parameters (its in/out widths chain the list)
LAYERS: dict[str, type] = {"Linear": Linear, "ReLU": ReLU, "Tanh": Tanh, "GELU": GELU, "LogSoftmax": LogSoftmax,
                           "Softmax": Softmax}
# loss name -> (class, kind): "classes" losses take class indices, "values" losses take
# float targets of the output's shape, "binary" losses take 0/1 targets of the output's shape
LOSSES: dict[str, tuple[type[Loss], str]] = {
    "CrossEntropyLoss": (CrossEntropyLoss, "classes"), "NLLLoss": (NLLLoss, "classes"),
    "MSELoss": (MSELoss, "values"), "L1Loss": (L1Loss, "values"), "SmoothL1Loss": (SmoothL1Loss, "values"),
    "HuberLoss": (HuberLoss, "values"), "BCEWithLogitsLoss": (BCEWithLogitsLoss, "binary"),
}
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
    """A checked layer list and loss (see the module docstring)."""

    layers: tuple[tuple[str, Mapping[str, Any]], ...]
    loss: tuple[str, Mapping[str, Any]]

    @classmethod
    def parse(cls, layers: Any, loss: Any, path: str = "model") -> ModelSpec:
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not layers:
            raise SpecError(f"{path}.layers must be a non-empty list of layers ({{name = 'Linear', args = {{...}}}}); "
                            f"got {_shown(layers)}")
        checked = tuple(_entry(f"{path}.layers[{i}]", layer, LAYERS, "layer") for i, layer in enumerate(layers))
        width = None
        for index, (name, args) in enumerate(checked):
            if name != "Linear":
                continue
            for key in ("in_features", "out_features"):
                value = args[key]
                if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                    raise SpecError(f"{path}.layers[{index}].args.{key} must be an integer >= 1; got {_shown(value)}")
            if "bias" in args and not isinstance(args["bias"], bool):
                raise SpecError(f"{path}.layers[{index}].args.bias must be true or false; got {_shown(args['bias'])}")
            if width is not None and args["in_features"] != width:
                raise SpecError(f"{path}.layers[{index}].args.in_features must be {width}, the out_features of the "
                                f"Linear layer before it; got {args['in_features']}")
            width = args["out_features"]
        if width is None:
            raise SpecError(f"{path}.layers has no Linear layer, so nothing to train; got "
                            f"{', '.join(name for name, _ in checked)}")
        if loss is None:
            raise SpecError(f"{path}.loss is required: one of {', '.join(LOSSES)}")
        loss_entry = _entry(f"{path}.loss", loss, LOSSES, "loss")
        spec = cls(checked, loss_entry)
        try:  # the arguments' values: the classes' own checks, on a throwaway build
            spec.build(np.float64, np.random.default_rng(0))
            spec.criterion()
        except (TypeError, ValueError) as error:
            raise SpecError(f"{path}: {error}") from error
        return spec

    @property
    def in_features(self) -> int:
        return next(args["in_features"] for name, args in self.layers if name == "Linear")

    @property
    def out_features(self) -> int:
        return [args["out_features"] for name, args in self.layers if name == "Linear"][-1]

    @property
    def loss_kind(self) -> str:
        return LOSSES[self.loss[0]][1]

    def build(self, dtype: Any, rng: np.random.Generator) -> Sequential:
        """The layers, Linear ones drawing their initial weights from ``rng`` in order (as
        torch's ``nn.Sequential`` of the same layers does from its generator)."""
        modules = []
        for name, args in self.layers:
            if name == "Linear":
                modules.append(Linear(**args, dtype=dtype, rng=rng))
            else:
                modules.append(LAYERS[name](**args))
        return Sequential(*modules)

    def param_specs(self, dtype: Any) -> tuple[ParamSpec, ...]:
        """The parameters :meth:`build` makes, by name, shape and dtype, without making them."""
        kind = np.dtype(dtype).name
        specs = []
        for index, (name, args) in enumerate(self.layers):
            if name != "Linear":
                continue
            specs.append(ParamSpec(f"{index}.weight", (args["out_features"], args["in_features"]), kind))
            if args.get("bias", True):
                specs.append(ParamSpec(f"{index}.bias", (args["out_features"],), kind))
        return tuple(specs)

    def criterion(self, reduction: str = "sum") -> Loss:
        name, args = self.loss
        return LOSSES[name][0](**args, reduction=reduction)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [{"name": name, "args": dict(args)} for name, args in self.layers],
                "loss": {"name": self.loss[0], "args": dict(self.loss[1])}}
