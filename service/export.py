"""Export a run's checkpoint as one file: ``{"model": {name: array}, "optimizer":
state_dict}`` with the optimizer state_dict in torch's layout, ready for
``torch.optim.X.load_state_dict`` after converting arrays to tensors.

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
from shardstep.workers.shard import LBFGS_PREFIX

_HISTORY = re.compile(r"(s|y)\.(\d+)")


def export_checkpoint(checkpoint: RunCheckpoint, out: str | os.PathLike) -> None:
    """Write ``checkpoint``'s export to ``out`` (atomically)."""
    state_keys = {key for entries in checkpoint.state_schema.values() for key in entries}
    if not any(key.startswith(LBFGS_PREFIX) for key in state_keys):
        checkpoint.export_file(out)
        return
    params, optimizer = checkpoint.export()
    dump({"model": params, "optimizer": torch_lbfgs_state_dict(checkpoint, params, optimizer)}, out)


def torch_lbfgs_state_dict(checkpoint: RunCheckpoint, params: dict[str, np.ndarray],
                           exported: dict[str, Any]) -> dict[str, Any]:
    """torch.optim.LBFGS's state_dict from a sharded LBFGS checkpoint's export."""
    names = [spec.name for spec in checkpoint.layout.params]
    dtype = params[names[0]].dtype
    pieces = exported["state"]
    first = pieces[0]

    def vector(key: str) -> np.ndarray:
        return np.concatenate([pieces[index][LBFGS_PREFIX + key].reshape(-1) for index in range(len(names))])

    def scalar(value: Any) -> Any:
        return None if value is None else np.array(value, dtype=dtype)

    scalars = checkpoint.extra["coordinator"]["lbfgs"]
    state: dict[str, Any] = {"func_evals": scalars["func_evals"], "n_iter": scalars["n_iter"]}
    if scalars["al"] is not None:
        state["al"] = [scalar(a) for a in scalars["al"]]
    if scalars["started"]:
        history = sorted({int(m.group(2)) for key in first if (m := _HISTORY.fullmatch(key[len(LBFGS_PREFIX):]))})
        state["d"] = vector("d")
        state["t"] = scalar(scalars["t"])
        state["old_dirs"] = [vector(f"y.{i}") for i in history]
        state["old_stps"] = [vector(f"s.{i}") for i in history]
        state["ro"] = [scalar(r) for r in scalars["ro"]]
        state["H_diag"] = scalar(scalars["h_diag"])
        state["prev_flat_grad"] = vector("prev_g")
        state["prev_loss"] = scalars["prev_loss"]
    return {"state": {0: state}, "param_groups": exported["param_groups"]}
