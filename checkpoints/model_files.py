"""Single files of model parameters as fine-tuning sources: ``[init] from = "model.pt"``.

    with open_model_file("model.safetensors") as weights:
        weights.layout.params            # ParamSpec per tensor, in the file's order
        weights.read("0.weight", 0, 64)  # elements 0 .. 63 of the flattened parameter

Three kinds, by suffix:

- ``.safetensors``: read here (:mod:`shardstep.checkpoints.safetensors`), only the byte range
  asked for.
- ``.pt``, ``.pth``: a torch file, read by ``torch.load(weights_only=True, mmap=True)`` (the
  ``torch`` extra): torch's restricted unpickler, which refuses a pickle that would build
  anything but tensors and plain containers, so loading never runs the file's code. It holds
  a state_dict (``torch.save(model.state_dict())``), or a dict whose ``"model"`` or
  ``"state_dict"`` entry is one (``shardstep export --format torch``, most training scripts).
- anything else: a shardstep export (``shardstep export``, ``checkpoints.dump``), its
  ``"model"`` entry.

A model file holds parameters only. It has no optimizer state, no run id and no step, so
``init.optimizer_state`` needs a run checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardstep.checkpoints.errors import CheckpointError
from shardstep.checkpoints.layout import ParamSpec
from shardstep.checkpoints.safetensors import SafetensorsFile
from shardstep.checkpoints.torch_files import dtype_name, load_state_dict

TORCH_SUFFIXES = (".pt", ".pth")
SAFETENSORS_SUFFIXES = (".safetensors",)
PARAM_DTYPES = ("float32", "float64")


# the last part of the names torch gives BatchNorm's buffers
BUFFER_NAMES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass(frozen=True)
class FileLayout:
    params: tuple[ParamSpec, ...]


class ModelFile:
    """A model file opened for reading parameters (see the module docstring). It answers what
    a fine-tuning plan asks of a source (``directory``, ``step``, ``run_id``, ``extra``,
    ``state_schema``, ``layout``), as a run checkpoint does."""

    step = None
    run_id = ""
    extra: dict[str, Any] = {}
    state_schema: dict[str, Any] = {}

    def __init__(self, path: str | os.PathLike):
        self.directory = os.fspath(path)
        self.kind = kind_of(self.directory)
        self._safetensors: SafetensorsFile | None = None
        self._arrays: dict[str, Any] = {}
        if self.kind == "safetensors":
            self._safetensors = SafetensorsFile(self.directory)
            entries = self._safetensors.specs
        elif self.kind == "torch":
            self._arrays = load_state_dict(self.directory)
            entries = {name: (dtype_name(tensor), tuple(tensor.shape))
                       for name, tensor in self._arrays.items()}
        else:
            self._arrays = _native_model(self.directory)
            entries = {name: (array.dtype.name, tuple(array.shape)) for name, array in self._arrays.items()}
        # torch's BatchNorm buffers are model state, not parameters: kept apart (see buffers())
        self.buffer_names = tuple(name for name in entries if name.rsplit(".", 1)[-1] in BUFFER_NAMES)
        for name, (dtype, _) in entries.items():
            if dtype not in PARAM_DTYPES and name not in self.buffer_names:
                self.close()
                raise CheckpointError(f"{self.directory}: parameter {name!r} is {dtype}; a model's parameters are "
                                      f"float32 or float64")
        self.layout = FileLayout(tuple(ParamSpec(name, shape, dtype) for name, (dtype, shape) in entries.items()
                                       if name not in self.buffer_names))

    def buffers(self) -> dict[str, np.ndarray]:
        """The file's buffers (BatchNorm's ``running_mean``, ``running_var``,
        ``num_batches_tracked``), whole, by name."""
        out = {}
        for name in self.buffer_names:
            if self._safetensors is not None:
                out[name] = self._safetensors.read(name).reshape(self._safetensors.specs[name][1])
            elif self.kind == "torch":
                out[name] = self._arrays[name].detach().clone().numpy()
            else:
                out[name] = np.array(self._arrays[name])
        return out

    def read(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements ``start .. stop - 1`` of the flattened parameter ``name`` (a copy)."""
        if self._safetensors is not None:
            return self._safetensors.read(name, start, stop)
        value = self._arrays[name]
        if self.kind == "torch":
            return value.detach().reshape(-1)[start:stop].clone().numpy()
        return np.array(value.reshape(-1)[start:stop])

    def close(self) -> None:
        if self._safetensors is not None:
            self._safetensors.close()
        self._arrays = {}

    def __enter__(self) -> ModelFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def kind_of(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    return "native"


def open_model_file(path: str | os.PathLike) -> ModelFile:
    return ModelFile(path)


def _native_model(path: str) -> dict[str, np.ndarray]:
    from shardstep.checkpoints.format import load

    try:
        loaded = load(path, mmap=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    model = loaded.get("model") if isinstance(loaded, dict) else None
    if not isinstance(model, dict) or not all(isinstance(value, np.ndarray) for value in model.values()):
        raise CheckpointError(f"{path}: a shardstep export holds {{'model': {{name: array}}, ...}}; this file does "
                              f"not (use a run directory, a step directory, a .safetensors or a .pt file)")
    return model
