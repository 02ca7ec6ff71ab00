"""Export a run's checkpoint as one file: ``{"model": {name: array}, "optimizer":
state_dict}`` with the optimizer state_dict in torch's layout, in one of three formats
(``FORMATS``; ``shardstep export --format``, by default from the suffix):

- ``native``: shardstep's own single-file format (``checkpoints.load``), streamed from the
  shard files;
- ``torch``: ``torch.save`` of the same dict with tensors, which ``torch.load(path,
  weights_only=True)`` opens; each param group also names its parameters (``param_names``),
  so ``optimizer.load_state_dict`` fits a fresh torch optimizer over the same model's
  ``named_parameters()`` (the ``torch`` extra);
- ``safetensors``: the parameters alone (no optimizer state: safetensors holds flat tensors),
  for ``safetensors.numpy``/``safetensors.torch`` and the Hugging Face ecosystem.

Elementwise optimizers already keep torch's per-parameter state, and the checkpoint library
streams them straight from the shard files. LBFGS keeps its vectors cut into per-parameter
pieces (``lbfgs.*`` state keys, see :mod:`shardstep.workers.shard`) and its scalars in the
coordinator's record; torch keeps one flat vector per name under parameter 0, so those are
reassembled here.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from shardstep.checkpoints import RunCheckpoint, dump
from shardstep.checkpoints.torch_files import require_torch, save_export
from shardstep.service.run_dir import checkpoint_buffers
from shardstep.workers.optim.algorithms.lbfgs.driver import STATE_KEYS, torch_scalars
from shardstep.workers.shard import LBFGS_PREFIX

_HISTORY = re.compile(r"(s|y)\.(\d+)")


FORMATS = ("native", "torch", "safetensors")
TORCH_EXPORT = "--format torch (torch.save; or use --format native or safetensors)"
# the format a file name asks for when none is given
SUFFIX_FORMATS = {".pt": "torch", ".pth": "torch", ".safetensors": "safetensors"}


def format_for(out: str, given: str | None) -> str:
    """``given``, or the format ``out``'s suffix names (native for any other)."""
    if given is not None:
        return given
    return SUFFIX_FORMATS.get(os.path.splitext(str(out))[1].lower(), "native")


def export_checkpoint(checkpoint: RunCheckpoint, out: str | os.PathLike, format: str = "native") -> None:
    """Write ``checkpoint``'s export to ``out`` (atomically) in ``format``."""
    if format not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}; got {format!r}")
    state_keys = {key for entries in checkpoint.state_schema.values() for key in entries}
    lbfgs = any(key.startswith(LBFGS_PREFIX) for key in state_keys)
    buffers = checkpoint_buffers(checkpoint)
    if format == "native" and not lbfgs and not buffers:
        checkpoint.export_file(out)
        return
    if format == "torch":
        require_torch(TORCH_EXPORT)
    params, optimizer = checkpoint.export()
    if lbfgs:
        optimizer = torch_lbfgs_state_dict(checkpoint, params, optimizer)
    # the model's state_dict: its parameters, then its buffers (BatchNorm's running statistics)
    model = {**params, **buffers}
    if format == "native":
        dump({"model": model, "optimizer": optimizer}, out)
    elif format == "safetensors":
        from shardstep.checkpoints.safetensors import write_safetensors

        _written(out, lambda path: write_safetensors(path, model, metadata={"format": "pt"}))
    else:
        # RunCheckpoint.export numbers the parameters of its param groups in order, as torch does
        by_index = [name for group in checkpoint.param_groups for name in group["params"]]
        _written(out, lambda path: save_export(model, optimizer, by_index, path))



def _written(out: Any, write: Any) -> None:
    """Run ``write(path)`` on a local path; for a URL, on a temporary file then uploaded."""
    from shardstep.checkpoints.storage import ObjectPath, location, put_object

    target = location(out)
    if not isinstance(target, ObjectPath):
        write(os.fspath(target))
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="shardstep-export-") as scratch:
        path = os.path.join(scratch, "export")
        write(path)
        with open(path, "rb") as handle:
            put_object(target, iter(lambda: handle.read(8 << 20), b""))


def torch_lbfgs_state_dict(checkpoint: RunCheckpoint, params: dict[str, np.ndarray],
                           exported: dict[str, Any]) -> dict[str, Any]:
    """torch.optim.LBFGS's state_dict from a sharded LBFGS checkpoint's export."""
    names = [spec.name for spec in checkpoint.layout.params]
    dtype = params[names[0]].dtype
    pieces = exported["state"]
    first = pieces[0]

    def vector(key: str) -> np.ndarray:
        return np.concatenate([pieces[index][LBFGS_PREFIX + key].reshape(-1) for index in range(len(names))])

    record = checkpoint.extra["coordinator"]["lbfgs"]
    state: dict[str, Any] = torch_scalars(record, dtype)
    if record["started"]:
        history = sorted({int(m.group(2)) for key in first if (m := _HISTORY.fullmatch(key[len(LBFGS_PREFIX):]))})
        state["d"] = vector("d")
        state["old_dirs"] = [vector(f"y.{i}") for i in history]
        state["old_stps"] = [vector(f"s.{i}") for i in history]
        state["prev_flat_grad"] = vector("prev_g")
    state = {key: state[key] for key in STATE_KEYS if key in state}
    return {"state": {0: state}, "param_groups": exported["param_groups"]}
