"""Helpers the built-in tasks share: MLPs from ``shardstep.workers.nn``, running a module on
parameters it does not own, and :class:`ModelTask`, a task built around one such module."""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from shardstep.checkpoints.layout import ParamSpec
from shardstep.workers.nn import GELU, CrossEntropyLoss, Linear, Module, ReLU, Sequential, Tanh
from shardstep.workers.nn import functional as F
from shardstep.workers.nn.layers import BatchNoise
from shardstep.workers.nn.losses import Loss
from shardstep.workers.optim.parameter import RowSparseGrad
from shardstep.workers.tasks.base import Batch, Task, check_int, check_params, declared_for

ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "gelu": GELU}

# entropy words of the generators derived from a seed (see base.SHUFFLE_STREAM)
INIT_STREAM = 1
SAMPLING_STREAM = 2
DATA_STREAM = 3
# [seed, epoch, NOISE_STREAM, batch index, layer number]: a training step's dropout masks
NOISE_STREAM = 5


def check_activation(value: Any) -> str:
    if value not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(map(repr, ACTIVATIONS))}; got {value!r}")
    return value


def check_widths(name: str, value: Any) -> tuple[int, ...]:
    """A sequence of positive layer widths (an int is one layer)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a list of positive integers; got {value!r}")
    return tuple(check_int(f"{name}[{i}]", width, 1) for i, width in enumerate(value))


def mlp(sizes: Sequence[int], activation: str, dtype: np.dtype, rng: np.random.Generator) -> Sequential:
    """Linear(sizes[0], sizes[1]), act, Linear(sizes[1], sizes[2]), act, ..., Linear(.., sizes[-1]).

    Parameter names are torch's for the same ``nn.Sequential``: ``"0.weight"``, ``"0.bias"``,
    ``"2.weight"``, ...; weights have torch's (out, in) shape and default initialization."""
    layers = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        if index:
            layers.append(ACTIVATIONS[activation]())
        layers.append(Linear(fan_in, fan_out, bias=True, dtype=dtype, rng=rng))
    return Sequential(*layers)


def mlp_specs(sizes: Sequence[int], dtype: np.dtype) -> tuple[ParamSpec, ...]:
    """The parameters :func:`mlp` makes, without making them."""
    specs = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        layer = 2 * index  # an activation sits between two Linear layers
        specs += [ParamSpec(f"{layer}.weight", (fan_out, fan_in), np.dtype(dtype).name),
                  ParamSpec(f"{layer}.bias", (fan_out,), np.dtype(dtype).name)]
    return tuple(specs)


def mlp_param_count(sizes: Sequence[int]) -> int:
    return sum(fan_in * fan_out + fan_out for fan_in, fan_out in itertools.pairwise(sizes))


class BoundModule:
    """A ``shardstep.workers.nn`` module run on caller-owned parameter arrays.

    :meth:`bind` points each module Parameter's ``.data`` at the caller's array (no copy)
    and clears its gradient; after ``forward``/``backward``, :meth:`grads` hands out the
    gradients the module accumulated. The module never writes ``.data``, so the caller's
    arrays are read, never modified.
    """

    def __init__(self, module: Any, owner: str, prefix: str = "", sparse: bool = False):
        self.module = module
        self.owner = owner
        self.sparse = sparse
        self.parameters = {prefix + name: p for name, p in module.named_parameters()}
        self.shapes = {name: p.shape for name, p in self.parameters.items()}
        dtypes = {p.dtype for p in self.parameters.values()}
        if len(dtypes) != 1:
            raise ValueError(f"{owner}: a bound module needs one parameter dtype; got {sorted(map(str, dtypes))}")
        self.dtype = dtypes.pop()
        # the module's buffers as built (BatchNorm's running statistics), set by ModelTask
        self.initial_buffers: dict[str, np.ndarray] = {}

    def init(self) -> dict[str, np.ndarray]:
        """The module's own (freshly initialized) arrays by name."""
        return {name: p.data for name, p in self.parameters.items()}

    def bind(self, params: Mapping[str, np.ndarray], check: bool = True) -> None:
        if check:
            check_params(params, self.shapes, self.dtype, self.owner)
        for name, p in self.parameters.items():
            p.data = params[name]
            p.grad = None

    def grads(self) -> dict[str, np.ndarray | RowSparseGrad]:
        """Each parameter's gradient; a parameter the backward pass did not reach gets zeros
        (dense) or an empty row-sparse gradient (when ``sparse``)."""
        out = {}
        for name, p in self.parameters.items():
            grad = p.grad
            if grad is None:
                grad = empty_sparse(p.shape, p.dtype) if self.sparse else np.zeros(p.shape, p.dtype)
            out[name] = grad
        return out


def check_bound(params: Mapping[str, np.ndarray], bound: Sequence[BoundModule], owner: str) -> None:
    """``params`` must have exactly the names of all ``bound`` modules together."""
    shapes: dict[str, tuple[int, ...]] = {}
    for module in bound:
        shapes.update(module.shapes)
    check_params(params, shapes, bound[0].dtype, owner)


def empty_sparse(shape: tuple[int, ...], dtype: np.dtype) -> RowSparseGrad:
    return RowSparseGrad(np.zeros(0, np.int64), np.zeros((0, *shape[1:]), dtype), shape)


def set_batch_noise(module: Module, batch: Batch) -> None:
    """Point every stochastic layer of ``module`` (those with a ``noise`` attribute: Dropout,
    attention with dropout) at ``batch``'s noise, numbered in ``named_modules`` order: a step's
    masks then follow from (seed, epoch, batch index) and each example's place in the global
    batch, which a checkpoint already holds."""
    number = 0
    for _, layer in module.named_modules():
        if "noise" in layer.__dict__:
            layer.noise = BatchNoise((batch.seed, batch.epoch, NOISE_STREAM, batch.index, number), batch.offset,
                                     batch.global_size)
            number += 1


def _statistics_layers(module: Module) -> list[tuple[str, Module]]:
    """The layers of ``module`` that keep running statistics (BatchNorm), by dotted name."""
    return [(name, layer) for name, layer in module.named_modules() if hasattr(type(layer), "apply_statistics")]


class ModelTask(Task):
    """A task whose model is one ``shardstep.workers.nn`` module, initialized from ``seed``'s init
    stream, and whose loss is a criterion of the module's output on the ``input_key`` array
    and the ``target_key`` array of a batch.

    Implement :meth:`build_module` and, for the provided :meth:`examples` and
    :meth:`loss_and_grad`, :meth:`training_arrays` and :meth:`make_criterion`.
    """

    input_key: ClassVar[str] = "inputs"
    target_key: ClassVar[str] = "targets"

    @abstractmethod
    def build_module(self, rng: np.random.Generator) -> Module:
        """A freshly initialized module, its parameters drawn from ``rng``."""

    def training_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The inputs and targets of the training set, one row per example."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_arrays or examples")

    def make_criterion(self) -> Loss:
        """The loss module, with ``reduction="sum"``."""
        raise NotImplementedError(f"{type(self).__name__} must implement make_criterion or loss_and_grad")

    def module_specs(self) -> tuple[ParamSpec, ...] | None:
        """The parameters :meth:`build_module` makes, without making them; None: not known."""
        return None

    def param_specs(self) -> tuple[ParamSpec, ...]:
        specs = self.module_specs()
        if specs is not None and declared_for(self, "module_specs", ("build_module", "init_params")):
            return specs
        return super().param_specs()

    def _build(self, seed: int) -> BoundModule:
        rng = np.random.default_rng([seed, 0, INIT_STREAM])
        bound = BoundModule(self.build_module(rng), self.name)
        for _, layer in _statistics_layers(bound.module):
            layer.defer_running_stats = True  # moved by advance_buffers, from the whole global batch
        # the buffers as built: init_buffers' answer, kept before set_buffers overwrites them
        bound.initial_buffers = {name: array.copy() for name, array in bound.module.named_buffers()}
        return bound

    def _model(self) -> BoundModule:
        return self.cached("model", lambda: self._build(0))

    def init_params(self, seed: int) -> dict[str, np.ndarray]:
        bound = self._build(seed)
        self.cached("model", lambda: bound)  # the first model built also serves the computations
        return bound.init()

    def examples(self, seed: int, epoch: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        inputs, targets = self.training_arrays()
        return {self.input_key: inputs[positions], self.target_key: targets[positions]}

    def loss_and_grad(self, params: Mapping[str, np.ndarray], batch: Batch):
        model = self._model()
        model.bind(params)
        if batch.size == 0:
            return 0.0, model.grads()
        criterion = self.cached("criterion", self.make_criterion)
        set_batch_noise(model.module, batch)
        total = criterion(model.module.forward(self.model_input(batch.data[self.input_key])),
                          batch.data[self.target_key])
        self._record_statistics(model.module)
        # the data needs no gradient: skip the first layer's input gradient, as torch does
        model.module.backward(criterion.backward(1.0 / batch.global_size), need_input_grad=False)
        return float(total) / batch.global_size, model.grads()

    # -- buffers: BatchNorm's running statistics ------------------------------------------
    #
    # Each forward of a training batch piece records, per BatchNorm layer, the piece's count,
    # mean and sum of squared deviations; the coordinator pools the pieces of the global batch
    # (functional.combine_batch_statistics, exact in float64) and moves the running statistics
    # once, with the layer's own rule. One piece (one worker, no micro-batches) moves them bit
    # for bit as torch's layer does on that batch; the normalization in the forward itself
    # uses each piece's own statistics, as torch's DistributedDataParallel without
    # SyncBatchNorm does.

    def _record_statistics(self, module: Module) -> None:
        recorded = self.cached("statistics", dict)
        for name, layer in _statistics_layers(module):
            if layer.last_statistics is not None:
                recorded.setdefault(name, []).append(layer.last_statistics)
                layer.last_statistics = None

    def take_batch_statistics(self) -> dict[str, list]:
        recorded = self.cached("statistics", dict)
        taken = dict(recorded)
        recorded.clear()
        return taken

    def init_buffers(self, seed: int) -> dict[str, np.ndarray]:
        # a buffer's start (BatchNorm: zeros, ones, a zero count) is the layer's constant: the
        # model this process computes with already has it, so no second model is built
        return {name: array.copy() for name, array in self._model().initial_buffers.items()}

    def set_buffers(self, buffers: Mapping[str, np.ndarray]) -> None:
        module = self._model().module
        own = dict(module.named_buffers())
        if set(buffers) != set(own):
            raise ValueError(f"{self.name or type(self).__name__}: buffers must be {sorted(own)}; got {sorted(buffers)}")
        for name, array in own.items():
            array[...] = buffers[name]

    def advance_buffers(self, buffers: Mapping[str, np.ndarray],
                        reports: Sequence[Mapping[str, list]]) -> dict[str, np.ndarray]:
        self.set_buffers(buffers)
        for name, layer in _statistics_layers(self._model().module):
            pieces = [piece for report in reports for piece in report.get(name, ())]
            if pieces:
                layer.apply_statistics(*F.combine_batch_statistics(pieces))
        return {name: array.copy() for name, array in self._model().module.named_buffers()}

    def forward(self, params: Mapping[str, np.ndarray], inputs: np.ndarray) -> np.ndarray:
        """The module's output on ``inputs`` in eval mode."""
        model = self._model()
        model.bind(params)
        model.module.eval()
        try:
            return model.module.forward(self.model_input(inputs))
        finally:
            model.module.train()

    def model_input(self, inputs: np.ndarray) -> np.ndarray:
        """What the module takes for a batch's ``input_key`` array (default: the array itself;
        a task whose examples are rows reshapes them here)."""
        return inputs


class MLPClassifierTask(ModelTask):
    """A :class:`ModelTask` whose model is ``mlp(self.sizes, self.activation, self.dtype)``
    trained with summed cross-entropy on labels, and evaluated on a held-out set (accuracy and
    mean loss). A subclass gives ``sizes``, ``activation``, ``dtype``, ``train_size`` and
    ``_data()``: the arrays ``train_inputs``, ``train_labels``, ``held_out_inputs`` and
    ``held_out_labels``."""

    target_key: ClassVar[str] = "labels"

    @abstractmethod
    def _data(self) -> Any:
        """The training and held-out arrays (see the class docstring)."""

    def module_specs(self) -> tuple[ParamSpec, ...]:
        return mlp_specs(self.sizes, self.dtype)

    def build_module(self, rng: np.random.Generator) -> Module:
        return mlp(self.sizes, self.activation, self.dtype, rng)

    def make_criterion(self) -> CrossEntropyLoss:
        return CrossEntropyLoss(reduction="sum")

    def training_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        data = self._data()
        return data.train_inputs, data.train_labels

    def logits(self, params: Mapping[str, np.ndarray], inputs: np.ndarray) -> np.ndarray:
        """The class scores of ``inputs`` (what a subclass with another head changes)."""
        return self.forward(params, inputs)

    def evaluate(self, params: Mapping[str, np.ndarray]) -> dict[str, float]:
        data = self._data()
        logits = self.logits(params, data.held_out_inputs)
        loss = CrossEntropyLoss(reduction="mean")(logits, data.held_out_labels)
        return {"accuracy": float(np.mean(logits.argmax(axis=1) == data.held_out_labels)), "loss": float(loss)}
