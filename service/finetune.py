"""Fine-tuning: a run whose first parameters come from another run's checkpoint.

A run directory without a committed checkpoint of its own starts from the checkpoint that
the job's ``init`` names. :func:`plan_init` checks the source against the model (names,
shapes, dtypes, the optimizer) before anything is written or started; each shard then reads
its own rows of the kept parameters (and, with ``optimizer_state``, of their state, matched
by name), and the task's initialization gives the parameters the source lacks. Once the run
has a checkpoint of its own it resumes from that, never from the source again.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardstep.checkpoints import CheckpointError, RunCheckpoint, latest_step, open_checkpoint, open_intact
from shardstep.checkpoints.layout import ParamSpec
from shardstep.checkpoints.model_files import ModelFile, open_model_file
from shardstep.checkpoints.run import MANIFEST
from shardstep.checkpoints.storage import ObjectPath, location
from shardstep.workers.optim import optimizer_class

# the checkpoints directory inside a run directory
CHECKPOINT_DIR = "checkpoints"


@dataclass(frozen=True)
class InitPlan:
    """How a fine-tuning run's first parameters are assembled, checked before anything starts.

    checkpoint: the source's committed step directory (its ``run_id`` and ``step``). loaded:
    the model's parameters read from it. new: the model's parameters it does not give (from
    ``task.init_params(seed)``). skipped: its parameters that ``init.skip`` leaves out.
    state: the parameters whose optimizer state it gives (``init.optimizer_state``).
    """

    checkpoint: str
    run_id: str
    step: int | None  # None: a model file (no run, no step)
    loaded: tuple[str, ...]
    new: tuple[str, ...]
    skipped: tuple[str, ...]
    state: tuple[str, ...]
    optimizer_state: bool
    # the source is a model file (.safetensors, .pt, an export), not a run checkpoint
    model_file: bool = False

    def record(self) -> dict[str, Any]:
        """The plan as plain values: ``init.json``, the checkpoints' ``extra["init"]``,
        :attr:`RunResult.init`."""
        return {"from": self.checkpoint, "run_id": self.run_id, "step": self.step, "loaded": list(self.loaded),
                "new": list(self.new), "skipped": list(self.skipped), "optimizer_state": self.optimizer_state,
                "state": list(self.state)}


def _verified(checkpoint: RunCheckpoint) -> None:
    try:
        checkpoint.verify()
    except BaseException:
        checkpoint.close()
        raise


def _best_of(run_dir: Any) -> int | None:
    from shardstep.service.run_dir import RunDirectoryError, result_step

    try:
        return result_step(run_dir)
    except RunDirectoryError:
        return None


def open_init_source(init: Any, warn: Callable[[str], Any] | None = None) -> RunCheckpoint:
    """The committed checkpoint ``init.from`` names: a ``step-<k>`` directory, or step
    ``init.step`` (default: the newest) of a run directory or of its checkpoints directory;
    or the model file it names (:mod:`shardstep.checkpoints.model_files`).
    Anything else is a ValueError naming the path. The checkpoint is verified (every chunk);
    without ``init.step`` it is the newest intact one, and ``warn`` hears of damaged newer ones."""
    path = location(init.source)
    try:
        if not isinstance(path, ObjectPath) and path.is_file():  # a model file: .safetensors, .pt, an export
            if init.step is not None:
                raise ValueError(f"init.step is {init.step}, but init.from is a model file ({path}), which has no "
                                 f"steps; leave init.step out")
            return open_model_file(path)
        if (path / MANIFEST).is_file():
            checkpoint = RunCheckpoint(path)
            if init.step is not None and init.step != checkpoint.step:
                checkpoint.close()
                raise ValueError(f"init.step is {init.step}, but init.from is the checkpoint of step "
                                 f"{checkpoint.step} ({path}); leave init.step out when init.from is a step directory")
            _verified(checkpoint)
            return checkpoint
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise ValueError(f"init.from must be a run directory, its {CHECKPOINT_DIR} directory or a step-<k> "
                             f"checkpoint directory; {path} {what}")
        root = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        if latest_step(root) is None:
            raise ValueError(f"init.from: {path} holds no committed checkpoint (expected a run directory, its "
                             f"{CHECKPOINT_DIR} directory or a step-<k> checkpoint directory)")
        best = None if init.step is not None or root == path else _best_of(path)
        if best is not None:  # the source's job made its best checkpoint its result
            checkpoint = open_checkpoint(root, best)
            _verified(checkpoint)
            return checkpoint
        if init.step is None:
            # the newest intact step; a damaged newer one is named (the source is not ours to set aside)
            checkpoint, damaged = open_intact(root)  # something is committed: never None here
            for newer, reason in damaged if warn is not None else ():
                warn(f"warning: init.from: step {newer} of {root} is damaged ({reason}); fine-tuning from step "
                     f"{checkpoint.step}, the newest intact one")
            return checkpoint
        checkpoint = open_checkpoint(root, init.step)
        _verified(checkpoint)
        return checkpoint
    except CheckpointError as error:
        raise ValueError(f"init.from: {error}") from error


def plan_init(source: RunCheckpoint, spec: Any, model: Mapping[str, ParamSpec],
              groups: Mapping[str, Mapping[str, Any]]) -> InitPlan:
    """Match ``source``'s parameters to the ``model``'s (name -> its spec) by name.

    Every source parameter is loaded into the model's parameter of the same name, or left
    out by a ``init.skip`` pattern; a name the model lacks, or another shape or dtype, is a
    ValueError naming every such parameter. With ``optimizer_state``, the source must have
    the job's optimizer and give, for every trainable loaded parameter that has state, the
    keys the job's hyperparameters need (``groups``: name -> its param group)."""
    init = spec.init
    where = str(source.directory) if source.step is None else f"{source.directory} (step {source.step})"
    specs = {param.name: param for param in source.layout.params}
    for index, pattern in enumerate(init.skip):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in specs):
            raise ValueError(f"init.skip[{index}] (pattern {pattern!r}) matches no parameter of {where}; its "
                             f"parameters: {', '.join(specs)}")
    skipped = [name for name in specs if any(fnmatch.fnmatchcase(name, pattern) for pattern in init.skip)]
    unknown = [name for name in specs if name not in model and name not in skipped]
    mismatched = [f"{name} is {specs[name].dtype} {specs[name].shape} in the source and {param.dtype} "
                  f"{param.shape} in the model"
                  for name, param in model.items() if name in specs and name not in skipped
                  and (specs[name].shape != param.shape or specs[name].dtype != param.dtype)]
    if mismatched or unknown:
        problems = []
        if mismatched:
            problems.append("; ".join(mismatched))
        if unknown:
            problems.append(f"the model has no parameter {', '.join(unknown)} (its parameters: {', '.join(model)})")
        raise ValueError(f"cannot start from {where}: {'; '.join(problems)}. Leave source parameters out with "
                         f"init.skip (a skipped parameter the model has is initialized afresh)")
    loaded = [name for name in model if name in specs and name not in skipped]
    if not loaded:
        raise ValueError(f"cannot start from {where}: it gives none of the model's parameters "
                         f"({', '.join(model)}); its parameters: {', '.join(specs)}")
    state: list[str] = []
    if init.optimizer_state and isinstance(source, ModelFile):
        raise ValueError(f"init.optimizer_state = true, but {where} is a model file, which holds parameters only; "
                         f"start from a run checkpoint, or set optimizer_state = false")
    if init.optimizer_state:
        state = _carried_state(source, spec, loaded, model, groups, where)
    return InitPlan(checkpoint=str(source.directory), run_id=source.run_id, step=source.step, loaded=tuple(loaded),
                    new=tuple(name for name in model if name not in loaded), skipped=tuple(skipped),
                    state=tuple(state), optimizer_state=init.optimizer_state,
                    model_file=isinstance(source, ModelFile))


def _carried_state(source: RunCheckpoint, spec: Any, loaded: list[str], model: Mapping[str, ParamSpec],
                   groups: Mapping[str, Mapping[str, Any]], where: str) -> list[str]:
    """The loaded, trainable parameters whose optimizer state the source gives."""
    job = source.extra.get("job") if isinstance(source.extra, Mapping) else None
    kind = job.get("optimizer") if isinstance(job, Mapping) else None
    if kind is None:
        raise ValueError(f"init.optimizer_state = true, but {where} does not record which optimizer wrote its "
                         f"state; set optimizer_state = false to start a fresh optimizer")
    if kind != spec.optimizer:
        raise ValueError(f"init.optimizer_state = true needs the source's kind of optimizer: {where} was trained "
                         f"with {kind!r}, this job uses {spec.optimizer!r}; use {kind!r}, or set "
                         f"optimizer_state = false to start a fresh optimizer")
    schema = source.state_schema
    rule = optimizer_class(spec.optimizer).rule
    carried, lacking = [], []
    for name in loaded:
        if name not in groups or not schema.get(name):
            continue  # frozen here, or never updated in the source: no state to carry
        needed = rule.init_state(np.zeros(0, model[name].dtype), groups[name])
        missing = [key for key in needed if key not in schema[name]]
        if missing:
            lacking.append(f"{name} lacks {', '.join(missing)} (it has {', '.join(schema[name])})")
        carried.append(name)
    if lacking:
        raise ValueError(f"init.optimizer_state: the state in {where} does not fit this job's {spec.optimizer} "
                         f"hyperparameters: {'; '.join(lacking)}; match the source's hyperparameters or set "
                         f"optimizer_state = false")
    return carried
