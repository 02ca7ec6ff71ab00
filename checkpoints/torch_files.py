"""torch's file format (the ``torch`` extra): torch is imported here only when a torch file is
written or read, ``shardstep export --format torch`` and ``[init] from`` a ``.pt`` file. The
one other module that imports torch is :mod:`shardstep.workers.tasks.torch_model`, for a torch
module as a job's model (tests/test_repository.py checks that nothing else does).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shardstep.checkpoints.errors import CheckpointError, CorruptCheckpointError


class TorchMissingError(ValueError):
    """A torch file was asked for and torch is not installed."""


def require_torch(what: str) -> None:
    """torch, or a TorchMissingError naming ``what`` needs it and the extra."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise TorchMissingError(f"{what} needs torch: pip install 'shardstep[torch]'") from None


def save_export(params: dict[str, np.ndarray], optimizer: dict[str, Any], names: list[str], path: str) -> None:
    """``torch.save`` of ``{"model", "optimizer"}`` with tensors (copies: a file must not
    alias the caller's arrays), each param group naming its parameters (``names``: by
    optimizer index)."""
    import torch

    def tensors(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return torch.from_numpy(np.array(value, copy=True))
        if isinstance(value, dict):
            return {key: tensors(item) for key, item in value.items()}
        if isinstance(value, list):
            return [tensors(item) for item in value]
        return value

    index_names = dict(enumerate(names))
    groups = []
    for group in optimizer["param_groups"]:
        group = dict(group)
        if "betas" in group and isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])  # torch's own type, as its state_dict holds it
        if "etas" in group and isinstance(group["etas"], list):
            group["etas"] = tuple(group["etas"])
        if "step_sizes" in group and isinstance(group["step_sizes"], list):
            group["step_sizes"] = tuple(group["step_sizes"])
        group["param_names"] = [index_names[index] for index in group["params"]]
        groups.append(group)
    state = {int(index): tensors(entries) for index, entries in optimizer["state"].items()}
    torch.save({"model": {name: tensors(array) for name, array in params.items()},
                "optimizer": {"state": state, "param_groups": groups}}, path)


def load_state_dict(path: str) -> dict[str, Any]:
    """The state_dict of a torch file (see :mod:`shardstep.checkpoints.model_files`), read by
    torch's restricted unpickler, memory-mapped."""
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading a torch file needs torch: pip install 'shardstep[torch]'") from None
    try:
        loaded = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as error:  # torch's restricted unpickler refused it, or the zip is damaged
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CorruptCheckpointError(f"{path}: torch.load(weights_only=True) refused it, so it is not a file of "
                                     f"tensors that loads without running code: {first}") from None
    if isinstance(loaded, dict):
        for key in ("model", "state_dict"):
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not loaded or not all(isinstance(name, str) and isinstance(value, torch.Tensor)
                                                             for name, value in loaded.items()):
        raise CheckpointError(f"{path}: expected a state_dict (parameter name -> tensor), or a dict whose 'model' or "
                              f"'state_dict' entry is one; got {type(loaded).__name__}")
    return loaded


def dtype_name(tensor: Any) -> str:
    text = str(tensor.dtype).removeprefix("torch.")
    return {"float": "float32", "double": "float64"}.get(text, text)


