"""A torch module as the model of a job's ``[model]``: ``module = "package.module:build"``.

    [model]
    module = "convnet:build"           # a function returning a torch.nn.Module
    args = { channels = 4 }            # its keyword arguments
    input_shape = [1, 8, 8]            # one example's shape: each row of features is reshaped to it
    loss = "CrossEntropyLoss"          # a loss of torch.nn (and of shardstep.workers.nn)
    device = "cpu"                     # where forward and backward run

The gradient workers run the module's forward and backward in torch. The parameters and
the optimizer state live in shardstep's shards, like any task's: sharded, checkpointed,
resumable, fine-tunable. Each step a worker points the module's parameters at the arrays
the shards sent (``torch.from_numpy``: no copy on the CPU) and hands back the gradients
torch computed (``Tensor.numpy()``: no copy either). On another device both cross once per
step: GPU workers with CPU-resident optimizer shards, the ZeRO-Offload arrangement.

Initialization is torch's own: the module is built under ``torch.manual_seed(seed)`` (in a
forked RNG, leaving the caller's untouched), so its first parameters are those of the same
factory called after ``torch.manual_seed(seed)`` in plain torch. The parameter names are
``named_parameters()``'s. A module with buffers (BatchNorm's running statistics) is refused:
buffers change during training, and only parameters live in the shards. torch is imported
only here, when a job names a module (the ``torch`` extra).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from shardstep.checkpoints.layout import ParamSpec
from shardstep.workers.checks import is_integer
from shardstep.workers.nn.spec import LOSSES, SpecError, _entry
from shardstep.workers.runtime import thread_budget

TORCH_MODEL_KEYS = ("module", "args", "input_shape", "device", "loss")
TORCH_DTYPES = {"float32": "float32", "float64": "float64"}


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise SpecError("model.module names a torch module, which needs torch: pip install 'shardstep[torch]'") \
            from None
    return torch


class TorchModelSpec:
    """A checked ``[model]`` table that names a torch module (see the module docstring)."""

    def __init__(self, table: Mapping[str, Any], path: str = "model"):
        unknown = [key for key in table if key not in TORCH_MODEL_KEYS]
        if unknown:
            raise SpecError(f"{path} has unknown key {unknown[0]!r}; with {path}.module it takes "
                            f"{', '.join(TORCH_MODEL_KEYS)}")
        reference = table.get("module")
        if not isinstance(reference, str) or reference.count(":") != 1 or not all(reference.partition(":")[::2]):
            raise SpecError(f"{path}.module must be 'package.module:function', a function that returns a "
                            f"torch.nn.Module; got {reference!r}")
        self.reference = reference
        self.args = table.get("args", {})
        if not isinstance(self.args, Mapping):
            raise SpecError(f"{path}.args must be a table of {reference}'s keyword arguments; got {self.args!r}")
        shape = table.get("input_shape")
        if shape is not None and (isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) or not shape
                                  or not all(is_integer(d) and d >= 1
                                             for d in shape)):
            raise SpecError(f"{path}.input_shape must be a list of positive integers (one example's shape); got "
                            f"{shape!r}")
        self.input_shape = None if shape is None else tuple(int(d) for d in shape)
        self.device = table.get("device", "cpu")
        if not isinstance(self.device, str) or not self.device:
            raise SpecError(f"{path}.device must be a torch device name ('cpu', 'cuda', 'cuda:1'); got {self.device!r}")
        if table.get("loss") is None:
            raise SpecError(f"{path}.loss is required: one of {', '.join(LOSSES)}")
        self.loss = _entry(f"{path}.loss", table["loss"], LOSSES, "loss")
        torch = _torch()
        try:
            torch.device(self.device)
        except (RuntimeError, ValueError) as error:
            raise SpecError(f"{path}.device: {error}") from None
        module_name, _, function = reference.partition(":")
        try:
            self.factory = getattr(importlib.import_module(module_name), function)
        except (ImportError, AttributeError) as error:
            raise SpecError(f"{path}.module: cannot import {reference} ({error})") from error
        if not callable(self.factory):
            raise SpecError(f"{path}.module: {reference} is not callable")
        try:
            getattr(torch.nn, self.loss[0])(reduction="sum", **self.loss[1])
            self.criterion("mean")
        except (TypeError, ValueError) as error:
            raise SpecError(f"{path}.loss: {error}") from error
        probe = self._module("float32", meta=True)
        if any(True for _ in probe.buffers()):
            names = [name for name, _ in probe.named_buffers()]
            raise SpecError(f"{path}.module: {reference} has buffers ({', '.join(names[:5])}); only parameters live in "
                            f"the shards, so modules with running state (BatchNorm) are not supported")
        if not any(True for _ in probe.parameters()):
            raise SpecError(f"{path}.module: {reference} has no parameters to train")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("factory", None)  # re-imported where it is used (the job's code travels to the actors)
        state.pop("_cache", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        module_name, _, function = self.reference.partition(":")
        self.factory = getattr(importlib.import_module(module_name), function)

    # -- what the supervised task asks of a model ---------------------------------------------

    @property
    def loss_kind(self) -> str:
        return LOSSES[self.loss[0]][1]

    @property
    def in_features(self) -> int:
        if self.input_shape is None:
            raise SpecError("model.input_shape is required with model.module: one example's shape")
        return math.prod(self.input_shape)

    @property
    def out_features(self) -> int:
        cache = self.__dict__.setdefault("_cache", {})
        if "out" not in cache:
            torch = _torch()
            module = self._module("float32", meta=True)
            try:
                output = module(torch.zeros((1, *self.input_shape), device="meta"))
            except Exception as error:  # the user's module may fail any way on the shape
                raise SpecError(f"model.module: {self.reference} cannot take inputs of model.input_shape "
                                f"{list(self.input_shape)}: {type(error).__name__}: {error}") from error
            if output.ndim != 2:
                raise SpecError(f"model.module: {self.reference} returns outputs of shape "
                                f"{list(output.shape)} for one example; it must return (batch, outputs)")
            cache["out"] = int(output.shape[1])
        return cache["out"]

    def criterion(self, reduction: str = "sum") -> Any:
        """shardstep's loss of the same name (evaluation computes metrics in numpy)."""
        name, args = self.loss
        return LOSSES[name][0](**args, reduction=reduction)

    def _module(self, dtype: str, *, meta: bool = False, seed: int | None = None) -> Any:
        torch = _torch()
        kind = getattr(torch, TORCH_DTYPES[np.dtype(dtype).name])
        try:
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                if meta:
                    with torch.device("meta"):
                        module = self.factory(**self.args)
                else:
                    module = self.factory(**self.args)
        except SpecError:
            raise
        except Exception as error:
            raise SpecError(f"model.module: {self.reference}(**model.args) failed: {type(error).__name__}: "
                            f"{error}") from error
        if not isinstance(module, torch.nn.Module):
            raise SpecError(f"model.module: {self.reference} returned {type(module).__name__}, not a torch.nn.Module")
        return module.to(kind)

    def param_specs(self, dtype: Any) -> tuple[ParamSpec, ...]:
        kind = np.dtype(dtype).name
        return tuple(ParamSpec(name, tuple(parameter.shape), kind)
                     for name, parameter in self._module(kind, meta=True).named_parameters())

    def init_params(self, seed: int, dtype: Any) -> dict[str, np.ndarray]:
        module = self._module(np.dtype(dtype).name, seed=seed)
        return {name: parameter.detach().numpy().copy() for name, parameter in module.named_parameters()}

    # -- computing ----------------------------------------------------------------------------

    def _bound(self, dtype: Any, params: Mapping[str, np.ndarray]) -> Any:
        """The process's module, its parameters pointing at ``params`` (no copy on the CPU)."""
        torch = _torch()
        cache = self.__dict__.setdefault("_cache", {})
        if "module" not in cache:
            cache["module"] = self._module(np.dtype(dtype).name).to(self.device)
        module = cache["module"]
        device = torch.device(self.device)
        with warnings.catch_warnings():
            # the shards' arrays may be read-only views; torch only reads them (backward
            # writes .grad, a new tensor)
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for name, parameter in module.named_parameters():
                parameter.data = torch.from_numpy(params[name]).to(device)
                parameter.grad = None
        return module

    def _inputs(self, inputs: np.ndarray) -> Any:
        torch = _torch()
        return torch.from_numpy(np.ascontiguousarray(inputs)).reshape(-1, *self.input_shape).to(self.device)

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """torch's thread team for one computation: the actor's CPU budget, else one thread
        (the inline backend: as a Ray worker of one CPU has), the caller's setting restored.
        torch's reductions depend on the thread count, so this keeps the numbers the same on
        every backend."""
        torch = _torch()
        previous = torch.get_num_threads()
        torch.set_num_threads(thread_budget() or 1)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def loss_and_grad(self, params: Mapping[str, np.ndarray], inputs: np.ndarray, targets: np.ndarray,
                      global_size: int, dtype: Any, noise_words: tuple[int, ...] = ()) -> tuple[float, dict[str, np.ndarray]]:
        """``noise_words`` seed torch's generator for this call (the step and the piece's place
        in the global batch), inside a fork of torch's random state: the module's dropout draws
        the same masks when the step is computed again (a resumed run) and the caller's own
        torch random stream is left as it was."""
        torch = _torch()
        with self._threads(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence(list(noise_words)).generate_state(1, np.uint64)[0]))
            return self._loss_and_grad(params, inputs, targets, global_size, dtype)

    def _loss_and_grad(self, params: Mapping[str, np.ndarray], inputs: np.ndarray, targets: np.ndarray,
                       global_size: int, dtype: Any) -> tuple[float, dict[str, np.ndarray]]:
        torch = _torch()
        module = self._bound(dtype, params)
        module.train()
        if inputs.shape[0] == 0:
            return 0.0, {name: np.zeros(p.shape, np.dtype(dtype)) for name, p in module.named_parameters()}
        criterion = self.__dict__["_cache"].setdefault(
            "loss", getattr(torch.nn, self.loss[0])(reduction="sum", **self.loss[1]))
        total = criterion(module(self._inputs(inputs)), torch.from_numpy(targets).to(self.device)) / global_size
        total.backward()
        grads = {}
        for name, parameter in module.named_parameters():
            grad = parameter.grad
            grads[name] = (np.zeros(parameter.shape, np.dtype(dtype)) if grad is None
                           else grad.detach().cpu().numpy())
        return float(total.item()), grads

    def forward(self, params: Mapping[str, np.ndarray], inputs: np.ndarray, dtype: Any) -> np.ndarray:
        torch = _torch()
        module = self._bound(dtype, params)
        module.eval()
        with self._threads(), torch.no_grad():
            return module(self._inputs(inputs)).cpu().numpy()
