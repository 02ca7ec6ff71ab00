"""The coordinator: one explicit state machine that drives a sharded run.

    STARTING -> RUNNING <-> CHECKPOINTING
        |          |              |
        +------> RECOVERING <-----+      (an actor was lost: restart all, restore the latest
        |          |                      committed checkpoint, replay; at most max_failures)
        v          v
      FAILED    FINISHED

Each optimizer step is ``optimizer.step(closure)`` as in torch: the closure is ONE distributed
evaluation (every shard sends its slices, every gradient worker computes its part of the
global batch, every shard adds the workers' pieces of its slice in rank order) and returns
the global loss; the step then applies the optimizer's rule on every shard. The coordinator
submits the whole evaluation before it waits once for the losses and the shards' reports
(non-finite gradients, partial norms for clipping); the apply is not waited for: calls to an
actor run in order, so the next evaluation sees the updated parameters. LBFGS runs its
driver here on vectors that stay in the shards (:mod:`shardstep.service.sharded_lbfgs`).

Determinism: a run's parameters after ``n`` steps equal, bit for bit, those of the local loop
(:class:`shardstep.workers.training.Trainer` with ``world_size = workers``) for every number of shards,
both backends, and any resume or recovery (elementwise optimizers; LBFGS adds its dot
products over shards, so it matches to rounding).

Fine-tuning (the job's ``init``): a run directory without a committed checkpoint of its own
starts from another run's checkpoint. :func:`plan_init` checks the source against the model
(names, shapes, dtypes, the optimizer) before anything is written or started; each shard then
reads its own rows of the kept parameters (and, with ``optimizer_state``, of their state,
matched by name), and ``task.init_params(seed)`` gives the parameters the source lacks. Once
the run has a checkpoint of its own it resumes from that, never from the source again.
Frozen parameters (the job's ``frozen``) are in no param group: no state, no update.
"""

from __future__ import annotations

import enum
import fnmatch
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shardstep.checkpoints import (
    CheckpointError,
    CheckpointStore,
    RunCheckpoint,
    ShardLayout,
    committed_steps,
    latest_step,
    open_checkpoint,
)
from shardstep.checkpoints.layout import ParamSpec
from shardstep.checkpoints.run import MANIFEST
from shardstep.service.backend import make_backend
from shardstep.service.errors import ActorCallError, ActorLostError, NonFiniteError, RunFailedError
from shardstep.service.sharded_lbfgs import ShardedSpace
from shardstep.workers import shared_memory
from shardstep.workers.gradient_worker import GradientWorker
from shardstep.workers.optim import Parameter, lr_scheduler, optimizer_class
from shardstep.workers.optim.algorithms.lbfgs import LBFGS, LBFGSDriver, combine_sum
from shardstep.workers.optim.optimizer import Optimizer
from shardstep.workers.shard import ShardActor, unpack
from shardstep.workers.tasks import make_task
from shardstep.workers.tasks.base import Task
from shardstep.workers.training import build_optimizer, build_scheduler

JOB_FILE = "job.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
# a fine-tuning run's record of where its parameters came from (also in every checkpoint's extra)
INIT_FILE = "init.json"
# hyperparameter keys that are bookkeeping, not sent to the shards' rules
_NOT_HYPERPARAMETERS = ("params", "param_names")


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    CHECKPOINTING = "checkpointing"
    RECOVERING = "recovering"
    FINISHED = "finished"
    FAILED = "failed"


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.STARTING: frozenset({Phase.RUNNING, Phase.RECOVERING, Phase.FAILED}),
    Phase.RUNNING: frozenset({Phase.CHECKPOINTING, Phase.RECOVERING, Phase.FINISHED, Phase.FAILED}),
    Phase.CHECKPOINTING: frozenset({Phase.RUNNING, Phase.RECOVERING, Phase.FINISHED, Phase.FAILED}),
    Phase.RECOVERING: frozenset({Phase.RUNNING, Phase.RECOVERING, Phase.FAILED}),
    Phase.FINISHED: frozenset(),
    Phase.FAILED: frozenset(),
}


class _SkipStep(Exception):
    """The closure found a non-finite value and the job skips such steps."""


class ShardedOptimizer(Optimizer):
    """The coordinator's view of a sharded optimizer: ``param_groups`` (hyperparameters and
    parameter NAMES), ``defaults`` and ``_step_count``, so the LR schedulers of
    :mod:`shardstep.workers.optim.lr_scheduler` work unchanged; ``step(closure)`` runs the closure and
    has the shards apply the rule (``apply`` is given by the coordinator)."""

    def __init__(self, local: Optimizer, apply: Callable[[list[dict]], None],
                 driver: LBFGSDriver | None = None):
        self.defaults = dict(local.defaults)
        self.state = {}
        self._step_count = 0
        self.param_groups = []
        for group in local.param_groups:
            hyper = {k: v for k, v in group.items() if k not in _NOT_HYPERPARAMETERS}
            hyper["params"] = list(group["param_names"])
            self.param_groups.append(hyper)
        self.rule = type(local).rule
        self._apply = apply
        self.driver = driver

    def hyperparameters(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k not in _NOT_HYPERPARAMETERS} for g in self.param_groups]

    def step(self, closure: Callable[[], float]) -> float:  # type: ignore[override]
        if self.driver is not None:
            loss = self.driver.step(closure, self.hyperparameters()[0])
        else:
            loss = closure()
            self._apply(self.hyperparameters())
        self._step_count += 1
        return loss


@dataclass(frozen=True, eq=False)
class RunResult:
    """What a finished run reports: the final parameters, per-step records, evaluations,
    the final metrics, and where things stand."""

    params: dict[str, np.ndarray]
    history: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    metrics: dict[str, float]
    steps: int
    epoch: int
    batch: int
    failures: int
    run_dir: Path
    checkpoint_steps: list[int]
    init: dict[str, Any] | None = None
    # how the actors exchanged parameters and gradients: "shared_memory", "object_store" or
    # "inline" (no actors)
    transport: str = "inline"


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
    step: int
    loaded: tuple[str, ...]
    new: tuple[str, ...]
    skipped: tuple[str, ...]
    state: tuple[str, ...]
    optimizer_state: bool

    def record(self) -> dict[str, Any]:
        """The plan as plain values: ``init.json``, the checkpoints' ``extra["init"]``,
        :attr:`RunResult.init`."""
        return {"from": self.checkpoint, "run_id": self.run_id, "step": self.step, "loaded": list(self.loaded),
                "new": list(self.new), "skipped": list(self.skipped), "optimizer_state": self.optimizer_state,
                "state": list(self.state)}


def open_init_source(init: Any) -> RunCheckpoint:
    """The committed checkpoint ``init.from`` names: a ``step-<k>`` directory, or step
    ``init.step`` (default: the newest) of a run directory or of its checkpoints directory.
    Anything else is a ValueError naming the path."""
    path = Path(init.source)
    try:
        if (path / MANIFEST).is_file():
            checkpoint = RunCheckpoint(path)
            if init.step is not None and init.step != checkpoint.step:
                checkpoint.close()
                raise ValueError(f"init.step is {init.step}, but init.from is the checkpoint of step "
                                 f"{checkpoint.step} ({path}); leave init.step out when init.from is a step directory")
            return checkpoint
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise ValueError(f"init.from must be a run directory, its {CHECKPOINT_DIR} directory or a step-<k> "
                             f"checkpoint directory; {path} {what}")
        root = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        if latest_step(root) is None:
            raise ValueError(f"init.from: {path} holds no committed checkpoint (expected a run directory, its "
                             f"{CHECKPOINT_DIR} directory or a step-<k> checkpoint directory)")
        return open_checkpoint(root, init.step)
    except CheckpointError as error:
        raise ValueError(f"init.from: {error}") from error


def plan_init(source: RunCheckpoint, spec: Any, model: Mapping[str, np.ndarray],
              groups: Mapping[str, Mapping[str, Any]]) -> InitPlan:
    """Match ``source``'s parameters to the ``model``'s (name -> initial array) by name.

    Every source parameter is loaded into the model's parameter of the same name, or left
    out by a ``init.skip`` pattern; a name the model lacks, or another shape or dtype, is a
    ValueError naming every such parameter. With ``optimizer_state``, the source must have
    the job's optimizer and give, for every trainable loaded parameter that has state, the
    keys the job's hyperparameters need (``groups``: name -> its param group)."""
    init = spec.init
    where = f"{source.directory} (step {source.step})"
    specs = {param.name: param for param in source.layout.params}
    for index, pattern in enumerate(init.skip):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in specs):
            raise ValueError(f"init.skip[{index}] (pattern {pattern!r}) matches no parameter of {where}; its "
                             f"parameters: {', '.join(specs)}")
    skipped = [name for name in specs if any(fnmatch.fnmatchcase(name, pattern) for pattern in init.skip)]
    unknown = [name for name in specs if name not in model and name not in skipped]
    mismatched = [f"{name} is {specs[name].dtype} {specs[name].shape} in the source and {array.dtype.name} "
                  f"{array.shape} in the model"
                  for name, array in model.items() if name in specs and name not in skipped
                  and (specs[name].shape != array.shape or specs[name].dtype != array.dtype.name)]
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
    if init.optimizer_state:
        state = _carried_state(source, spec, loaded, model, groups, where)
    return InitPlan(checkpoint=str(source.directory), run_id=source.run_id, step=source.step, loaded=tuple(loaded),
                    new=tuple(name for name in model if name not in loaded), skipped=tuple(skipped),
                    state=tuple(state), optimizer_state=init.optimizer_state)


def _carried_state(source: RunCheckpoint, spec: Any, loaded: list[str], model: Mapping[str, np.ndarray],
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
    schema = source._manifest["state"]  # {name: {key: kind}}: what each parameter's state holds
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


class Coordinator:
    """Runs one job (a validated :class:`shardstep.service.jobspec.JobSpec`) to the end.

    ``task``: an already-built task (default: built from the spec). ``on_step(record)`` sees
    every step's record. ``resume``: continue from the run directory's latest committed
    checkpoint when there is one (``run`` on an existing directory resumes, never
    overwrites).
    """

    def __init__(self, spec: Any, *, task: Task | None = None,
                 on_step: Callable[[dict[str, Any]], Any] | None = None):
        self.spec = spec
        self.task = task if task is not None else make_task(spec.task, **dict(spec.task_args))
        self.on_step = on_step
        self.phase = Phase.STARTING
        self.phase_log: list[Phase] = [Phase.STARTING]
        self.run_dir = Path(spec.run_dir)
        self.failures = 0
        self.backend: Any = None
        self.shards: list[Any] = []
        self.workers: list[Any] = []
        self.store: CheckpointStore | None = None
        self._outstanding: list[Any] = []
        self._param_refs: list[Any] | None = None
        # an evaluation submitted ahead: ((epoch, batch), (worker outputs, shard reports or None))
        self._ahead: tuple[tuple[int, int], tuple[list, list | None]] | None = None
        self._fused = False
        self._saving: tuple[Any, dict] | None = None
        self.history: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []
        self.round_trips = 0
        self.init_plan: InitPlan | None = None
        self.init_record: dict[str, Any] | None = None
        self._initial: dict[str, np.ndarray] | None = None
        self.shared: shared_memory.SharedMemory | None = None
        self.transport = "inline"

    # -- the state machine ---------------------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        if phase not in TRANSITIONS[self.phase]:
            raise RuntimeError(f"coordinator cannot go from {self.phase.value} to {phase.value}")
        self.phase = phase
        self.phase_log.append(phase)

    # -- the run -------------------------------------------------------------------------------

    def run(self) -> RunResult:
        spec = self.spec
        try:
            self._plan_init()
            self._prepare_directory()
            self.backend = make_backend(spec.backend, spec.address)
            self.transport = self._choose_transport()
            self._start()
            self._enter(Phase.RUNNING)
            metrics = self._train()
            self._finish_saves()
            if self.last_checkpoint != self.step_count:
                self._checkpoint(wait=True)
            self._enter(Phase.FINISHED)
            params = self._gather_params()
            return RunResult(params=params, history=self.history, evaluations=self.evaluations,
                             metrics=metrics, steps=self.step_count, epoch=self.epoch, batch=self.batch_index,
                             failures=self.failures, run_dir=self.run_dir,
                             checkpoint_steps=committed_steps(self.run_dir / CHECKPOINT_DIR), init=self.init_record,
                             transport=self.transport)
        except BaseException:
            if self.phase not in (Phase.FINISHED, Phase.FAILED):
                self.phase = Phase.FAILED
                self.phase_log.append(Phase.FAILED)
            if self._saving is not None and self.store is not None:
                try:
                    self.store.abort(self._saving[0])
                except Exception:
                    pass
                self._saving = None
            raise
        finally:
            self._stop_actors()
            if self.store is not None:
                self.store.close()
            if self.backend is not None:
                self.backend.shutdown()

    def _choose_transport(self) -> str:
        """``shared_memory`` when every actor runs on this node (``auto`` on a single-node
        instance, such as the local one), else ``object_store``; the inline backend has no
        actors to connect."""
        wanted = self.spec.transport
        if self.backend.name != "ray":
            return "inline"
        if wanted == "object_store":
            return wanted
        possible = shared_memory.available()
        alone = possible and self.backend.on_one_node()
        if wanted == "shared_memory" and not alone:
            why = ("this platform has no memfd_create and /proc" if not possible
                   else "the Ray cluster has other nodes, where actors may be placed")
            raise RunFailedError(f"resources.transport = 'shared_memory' needs every actor on the coordinator's "
                                 f"node, but {why}; use 'auto' (shared memory when possible) or 'object_store'")
        return "shared_memory" if alone else "object_store"

    def _plan_init(self) -> None:
        """A fine-tuning job's source, checked against the model before anything is written
        or started (ValueError); a run directory with a committed checkpoint of its own
        resumes from that instead, and the source is not read."""
        spec = self.spec
        if spec.init is None or latest_step(self.run_dir / CHECKPOINT_DIR) is not None:
            return
        self._initial = self.task.init_params(spec.seed)
        trainable = [name for name in self._initial if not spec.is_frozen(name)]
        local = self._local_optimizer({name: self._initial[name].dtype.name for name in trainable})
        groups = {name: group for group in local.param_groups for name in group["param_names"]}
        with open_init_source(spec.init) as source:
            self.init_plan = plan_init(source, spec, self._initial, groups)
        self.init_record = self.init_plan.record()

    def _prepare_directory(self) -> None:
        """Create the run directory, or check that it belongs to this job (resume)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        job_path = self.run_dir / JOB_FILE
        if job_path.exists():
            saved = json.loads(job_path.read_text())
            self.run_id = saved["run_id"]
        else:
            self.run_id = secrets.token_hex(8)
            tmp = job_path.with_name(f".{JOB_FILE}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps({"run_id": self.run_id, "job": self.spec.to_dict()}, indent=1))
            os.replace(tmp, job_path)
        if self.init_record is not None:
            tmp = self.run_dir / f".{INIT_FILE}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(self.init_record, indent=1))
            os.replace(tmp, self.run_dir / INIT_FILE)
        self.store = CheckpointStore(self.run_dir / CHECKPOINT_DIR, run_id=self.run_id,
                                     retention=self.spec.retention())

    def _train(self) -> dict[str, float]:
        spec = self.spec
        metrics: dict[str, float] | None = None
        while ((spec.epochs is None or self.epoch < spec.epochs)
               and (spec.steps is None or self.step_count < spec.steps)):
            try:
                record = self._step()
                metrics = None
                if (spec.eval_every is not None and not record.get("skipped")
                        and self.step_count % spec.eval_every == 0):
                    metrics = self._evaluate_params()
                    record["eval"] = metrics
                    self.evaluations.append({"step": self.step_count, "epoch": self.epoch, **metrics})
                self.last_metrics = {"loss": record["loss"], **(metrics or {})}
                if (spec.checkpoint_every is not None and not record.get("skipped")
                        and self.step_count % spec.checkpoint_every == 0):
                    self._checkpoint(wait=not spec.checkpoint_async)
            except ActorLostError as error:
                metrics = None
                self._recover(error)
                continue
            self.history.append(record)
            self._log(record)
            if self.on_step is not None and self.on_step(record) is True:
                break
        if metrics is None:
            metrics = self._with_recovery(self._evaluate_params)
            self.evaluations.append({"step": self.step_count, "epoch": self.epoch, **metrics})
        self.last_metrics = {**self.last_metrics, **metrics}
        return metrics

    def _with_recovery(self, action: Callable[[], Any]) -> Any:
        while True:
            try:
                return action()
            except ActorLostError as error:
                self._recover(error)

    # -- starting and restoring ------------------------------------------------------------------

    def _start(self) -> None:
        """Build the optimizer view and the schedulers, then the actors, from the latest
        committed checkpoint or from the task's initial parameters."""
        spec, task = self.spec, self.task
        step = latest_step(self.run_dir / CHECKPOINT_DIR)
        if step is None:
            initial = self._initial if self._initial is not None else task.init_params(spec.seed)
            self._initial = None  # a recovery draws them again rather than hold a copy all run
            specs = tuple(ParamSpec(name, tuple(a.shape), a.dtype.name) for name, a in initial.items())
        else:
            initial = None
            with open_checkpoint(self.run_dir / CHECKPOINT_DIR, step) as checkpoint:
                specs = checkpoint.layout.params
                extra = checkpoint.extra
                groups = checkpoint.param_groups
        self.layout = ShardLayout(specs, spec.shards)
        self._build_optimizer()
        self.step_count = self.epoch = self.batch_index = 0
        self.epoch_losses: list[float] = []
        self.last_metrics: dict[str, float] = {}
        self.last_checkpoint: int | None = None
        self.committed_step: int | None = step
        if step is not None:
            self._restore(step, extra, groups)
        self._start_actors(initial, step)
        driver = self.optimizer.driver
        if driver is not None and step is not None and driver.started:
            # the history's Gram matrix is not saved: one batched reduction rebuilds it
            self.space._history = extra["coordinator"]["lbfgs"]["history"]
            names = driver._history_names(self.space._history)
            if names:
                driver.hist_gram = combine_sum(self.space.partial_gram(names, names))

    def _local_optimizer(self, trainable: Mapping[str, str]) -> Optimizer:
        """The job's optimizer over zero-size stand-ins of the ``trainable`` parameters (name
        -> dtype): its param groups (names and hyperparameters) are the run's. Frozen
        parameters are in none, as with torch's ``requires_grad=False``."""
        spec = self.spec
        placeholders = {name: Parameter(np.zeros(0, dtype), name=name) for name, dtype in trainable.items()}
        rules = spec.group_rules(self.task, list(trainable))
        return build_optimizer(spec.optimizer, spec.optimizer_args, placeholders, rules)

    def _build_optimizer(self) -> None:
        spec = self.spec
        local = self._local_optimizer({s.name: s.dtype for s in self.layout.params if not spec.is_frozen(s.name)})
        driver = None
        if isinstance(local, LBFGS):
            if spec.clip_grad_norm is not None:
                raise ValueError("clip_grad_norm cannot be used with LBFGS (its line search needs the true gradient)")
            dtypes = {s.dtype for s in self.layout.params}
            self.space = ShardedSpace(spec.shards, np.dtype(dtypes.pop()), self._lbfgs_call, self._wait)
            driver = LBFGSDriver(self.space)
        self.optimizer = ShardedOptimizer(local, self._apply, driver)
        # reduce and apply in one call per shard when the coordinator has nothing to decide
        # between them: no LBFGS, no clipping factor, and non-finite values stop the run
        self._fused = driver is None and spec.clip_grad_norm is None and spec.nonfinite == "stop"
        self.schedulers = [build_scheduler(s.name, s.args, self.optimizer) for s in spec.schedulers]

    def _restore(self, step: int, extra: Mapping[str, Any], groups: list[dict]) -> None:
        names = [g["params"] for g in self.optimizer.param_groups]
        saved_names = [list(g["params"]) for g in groups]
        if names != saved_names:
            raise RunFailedError(f"the checkpoint at step {step} groups the parameters as {saved_names}; this job "
                                 f"groups them as {names}: the param-group rules changed")
        for group, saved in zip(self.optimizer.param_groups, groups):
            group.clear()
            group.update(saved)
            group["params"] = list(saved["params"])
        coordinator = extra["coordinator"]
        for scheduler, state in zip(self.schedulers, coordinator["schedulers"], strict=True):
            scheduler.load_state_dict(state)
        self.step_count = coordinator["step"]
        self.epoch = coordinator["epoch"]
        self.batch_index = coordinator["batch"]
        self.epoch_losses = list(coordinator["epoch_losses"])
        self.optimizer._step_count = coordinator["optimizer_steps"]
        self.last_metrics = dict(coordinator.get("metrics", {}))
        self.last_checkpoint = step
        self.init_record = extra.get("init")
        if self.optimizer.driver is not None:
            _import_driver(self.optimizer.driver, coordinator["lbfgs"])
        self._truncate_log(step)

    def _start_actors(self, initial: Mapping[str, np.ndarray] | None, step: int | None) -> None:
        spec, backend, layout = self.spec, self.backend, self.layout
        groups = [{"params": list(g["params"])} for g in self.optimizer.param_groups]
        threads = max(1, int(spec.shard_cpus)) if spec.backend == "ray" else None
        # a fine-tuning run's first start: the shards read the kept parameters themselves
        plan = self.init_plan if initial is not None else None
        source = None if plan is None else {"checkpoint": plan.checkpoint, "params": list(plan.loaded),
                                            "state": list(plan.state)}
        shared = None
        if self.transport == "shared_memory":
            # fresh regions at every start: an actor killed during a recovery may still be
            # writing into the old ones
            self._close_shared()
            self.shared = shared_memory.SharedMemory(layout, spec.workers)
            shared = self.shared.transport
        self.shards = []
        for shard in range(spec.shards):
            if initial is not None:
                params = {}
                for s in layout.params:
                    if plan is not None and s.name in plan.loaded:
                        continue
                    start, stop = layout.slice(s.name, shard)
                    params[s.name] = initial[s.name].reshape(-1)[start:stop]
                args = (shard, layout, spec.optimizer, groups, params)
                kwargs: dict[str, Any] = {"threads": threads, "source": source, "shared": shared}
            else:
                args = (shard, layout, spec.optimizer, groups, None)
                kwargs = {"threads": threads, "shared": shared,
                          "checkpoint": str(self.run_dir / CHECKPOINT_DIR / f"step-{step:010d}")}
            self.shards.append(backend.start(ShardActor, args, kwargs, spec.shard_cpus, f"shard {shard}"))
        worker_threads = max(1, int(spec.worker_cpus)) if spec.backend == "ray" else None
        self.workers = [
            backend.start(GradientWorker, (self.task, rank, spec.workers, spec.seed, spec.batch_size, layout),
                          {"threads": worker_threads, "shared": shared,
                           "frozen": [s.name for s in layout.params if spec.is_frozen(s.name)]},
                          spec.worker_cpus, f"gradient worker {rank}")
            for rank in range(spec.workers)
        ]
        self._param_refs = None
        self._ahead = None
        self.pids = self._wait([backend.call(a, "ping") for a in self.shards + self.workers])

    def _stop_actors(self) -> None:
        if self.backend is None:
            return
        for actor in self.shards + self.workers:
            self.backend.kill(actor)
        self.shards, self.workers = [], []
        self._close_shared()

    def _close_shared(self) -> None:
        # the memory itself goes when the last actor that mapped it exits
        if self.shared is not None:
            self.shared.close()
            self.shared = None

    def _recover(self, error: ActorLostError) -> None:
        self.failures += 1
        self._enter(Phase.RECOVERING)
        if self.failures > self.spec.max_failures:
            self._enter(Phase.FAILED)
            raise RunFailedError(
                f"{error}; this is failure {self.failures} and the job allows max_failures="
                f"{self.spec.max_failures}. The committed checkpoints in {self.run_dir / CHECKPOINT_DIR} are "
                f"intact (latest: step {latest_step(self.run_dir / CHECKPOINT_DIR)}); continue with "
                f"`shardstep resume {self.run_dir}`"
            ) from error
        if self._saving is not None:
            self.store.abort(self._saving[0])
            self._saving = None
        self._stop_actors()
        self._outstanding = []
        restored = latest_step(self.run_dir / CHECKPOINT_DIR)
        self.history = [r for r in self.history if r["step"] <= (restored or 0)]
        self.evaluations = [e for e in self.evaluations if e["step"] <= (restored or 0)]
        self._start()
        self._enter(Phase.RUNNING)

    # -- one step -----------------------------------------------------------------------------------

    def _step(self) -> dict[str, Any]:
        start = time.perf_counter()
        spec = self.spec
        epoch, index = self.epoch, self.batch_index
        lr = self.optimizer.param_groups[0].get("lr")
        lrs = [_plain(group.get("lr")) for group in self.optimizer.param_groups]
        calls = 0
        self._clip_scale = None

        def closure() -> float:
            nonlocal calls
            calls += 1
            loss, reports = self._distributed_evaluation(epoch, index, norm=spec.clip_grad_norm is not None)
            if calls == 1:
                bad = sorted({name for report in reports for name in report["nonfinite"]})
                if not math.isfinite(loss) or bad:
                    what = f"training loss is {loss}" + (f" and the gradients of {', '.join(bad)} are not finite"
                                                         if bad else "")
                    where = f"{what} at step {self.step_count + 1} (epoch {epoch}, batch {index})"
                    message = (f"{where}; the run stops with its committed checkpoints as they are (shards whose "
                               "own gradients were finite applied the update)" if self._fused
                               else f"{where}, before the update; the parameters are unchanged")
                    if spec.nonfinite == "skip":
                        raise _SkipStep(message)
                    raise NonFiniteError(message + ". Lower the learning rate, clip gradients "
                                         "(clip_grad_norm), or set nonfinite = \"skip\"")
                if spec.clip_grad_norm is not None:
                    total = 0.0
                    for report in reports:
                        total += report["sumsq"]
                    norm = math.sqrt(total)
                    scale = spec.clip_grad_norm / (norm + 1e-6)
                    self._clip_scale = scale if scale < 1.0 else None
            return loss

        try:
            loss = self.optimizer.step(closure)
        except _SkipStep as skip:
            self._outstanding.extend(self.backend.call(s, "discard_grads") for s in self.shards)
            record = {"step": self.step_count, "epoch": epoch, "batch": index, "skipped": True,
                      "loss": float("nan"), "message": str(skip), "lr": _plain(lr)}
            self._advance_batch()
            record["seconds"] = time.perf_counter() - start
            return record
        record = {"step": self.step_count + 1, "epoch": epoch, "batch": index,
                  "examples": min(spec.batch_size, self.task.train_size - index * spec.batch_size),
                  "loss": float(loss), "lr": _plain(lr), "lrs": lrs}
        self.step_count += 1
        self.epoch_losses.append(record["loss"])
        if self.schedulers:
            self._tick("step", record["loss"])
        self._advance_batch()
        record["seconds"] = time.perf_counter() - start
        record["checkpoint"] = self.committed_step
        return record

    def _advance_batch(self) -> None:
        self.batch_index += 1
        if self.batch_index == self.task.num_batches(self.spec.batch_size):
            if self.schedulers and self.epoch_losses:
                self._tick("epoch", float(np.mean(self.epoch_losses)))
            self.epoch += 1
            self.batch_index = 0
            self.epoch_losses = []

    def _tick(self, interval: str, loss: float) -> None:
        evaluated: dict[str, float] | None = None
        for scheduler, scheduler_spec in zip(self.schedulers, self.spec.schedulers):
            if scheduler_spec.interval != interval:
                continue
            if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
                if scheduler_spec.monitor == "loss":
                    scheduler.step(loss)
                else:
                    evaluated = evaluated or self._evaluate_params()
                    if scheduler_spec.monitor not in evaluated:
                        raise ValueError(f"ReduceLROnPlateau monitors {scheduler_spec.monitor!r}, which the task's "
                                         f"evaluation does not report; it reports {sorted(evaluated)}")
                    scheduler.step(evaluated[scheduler_spec.monitor])
            else:
                scheduler.step()

    def _submit_compute(self, epoch: int, index: int) -> list:
        """Submit every worker's ``compute`` of batch ``index`` of ``epoch``: their outputs."""
        n = len(self.shards)
        slices = self._current_params()
        return [self.backend.call(w, "compute", epoch, index, *slices, num_returns=n + 1) for w in self.workers]

    def _submit_reduce(self, outputs: list, norm: bool) -> list:
        """Submit every shard's ``reduce`` of the workers' pieces (``reduce_apply`` with this
        step's hyperparameters when fused): the shards' reports."""
        if not self._fused:
            return [self.backend.call(shard, "reduce", *[out[1 + s] for out in outputs], norm=norm)
                    for s, shard in enumerate(self.shards)]
        hyperparameters = self.optimizer.hyperparameters()
        pairs = [self.backend.call(shard, "reduce_apply", hyperparameters, *[out[1 + s] for out in outputs],
                                   num_returns=2) for s, shard in enumerate(self.shards)]
        self._param_refs = [pair[1] for pair in pairs]
        return [pair[0] for pair in pairs]

    def _distributed_evaluation(self, epoch: int, index: int, norm: bool) -> tuple[float, list[dict]]:
        """One closure evaluation: gather, compute, reduce (and apply, when fused); one wait."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == (epoch, index):
            outputs, reports = ahead[1]
        else:
            outputs, reports = self._submit_compute(epoch, index), None
        if reports is None:
            reports = self._submit_reduce(outputs, norm)
        n = len(self.shards)
        polls = [self.backend.call(s, "saved") for s in self.shards] if self._saving is not None else []
        values = self._wait([out[0] for out in outputs] + reports + polls)
        losses, reports, polls = values[:len(outputs)], values[len(outputs):len(outputs) + n], values[len(outputs) + n:]
        if polls and all(p is not None for p in polls):
            self._commit()
        loss = 0.0
        for part in losses:
            loss += part
        return loss, reports

    def _apply(self, hyperparameters: list[dict]) -> None:
        # not waited for: the next evaluation's workers take the updated slices it returns
        # (an error surfaces there), one call and one hop fewer than fetching them. Fused,
        # the shards applied these same hyperparameters with their reduce already.
        if not self._fused:
            self._param_refs = [self.backend.call(s, "apply", hyperparameters, self._clip_scale)
                                for s in self.shards]
        # the next step's computation goes out at once, so Ray starts it the moment the updates
        # are done while this process does the step's bookkeeping (records, schedulers,
        # checkpoints: their calls reach the shards after the reduce, which only fills the
        # gradient buffer, and before the next apply). Fused, its reduce_apply waits for the
        # next step's hyperparameters.
        following = self._following_batch()
        if following is not None:
            outputs = self._submit_compute(*following)
            reports = None if self._fused else self._submit_reduce(outputs, self.spec.clip_grad_norm is not None)
            self._ahead = (following, (outputs, reports))

    def _following_batch(self) -> tuple[int, int] | None:
        """(epoch, batch) of the step after the current one, or None when the run ends with it
        or a checkpoint or an evaluation comes first (they would wait behind it)."""
        spec = self.spec
        finished = self.step_count + 1
        if spec.steps is not None and finished >= spec.steps:
            return None
        if any(every is not None and finished % every == 0 for every in (spec.checkpoint_every, spec.eval_every)):
            return None
        epoch, index = self.epoch, self.batch_index + 1
        if index == self.task.num_batches(spec.batch_size):
            epoch, index = epoch + 1, 0
        if spec.epochs is not None and epoch >= spec.epochs:
            return None
        return epoch, index

    def _current_params(self) -> list:
        """Futures of every shard's packed slices, as of the last update."""
        if self._param_refs is None:
            self._param_refs = [self.backend.call(s, "get_params") for s in self.shards]
        return self._param_refs

    def _lbfgs_call(self, shard: int, method: str, *args: Any) -> Any:
        self._param_refs = None  # LBFGS moves the parameters in place
        return self.backend.call(self.shards[shard], "lbfgs", method, *args)

    def _wait(self, refs: list) -> list:
        """Wait for ``refs`` and every fire-and-forget call made since the last wait."""
        outstanding, self._outstanding = self._outstanding, []
        self.round_trips += 1
        values = self.backend.get(outstanding + list(refs))
        return values[len(outstanding):]

    def _evaluate_params(self) -> dict[str, float]:
        return self._wait([self.backend.call(self.workers[0], "evaluate", *self._current_params())])[0]

    def _gather_params(self) -> dict[str, np.ndarray]:
        packed = self._wait(self._current_params())
        if self.shared is not None:
            # the shards' last updates are done (waited for above): copy them out of the region
            region = self.shared.params()
            return {s.name: region[s.name].reshape(s.shape).copy() for s in self.layout.params}
        return {name: np.array(array) for name, array in unpack(self.layout, packed).items()}

    # -- checkpoints ------------------------------------------------------------------------------

    def _checkpoint(self, wait: bool) -> None:
        """Every shard writes its own file (staged now, written in the background unless
        ``wait``); the commit follows once all are on disk."""
        self._enter(Phase.CHECKPOINTING)
        self._finish_saves()
        pending = self.store.begin(self.step_count, self.layout)
        try:
            self._wait([self.backend.call(s, "save", pending, wait) for s in self.shards])
        except ActorCallError:
            self.store.abort(pending)
            raise
        coordinator = {
            "step": self.step_count, "epoch": self.epoch, "batch": self.batch_index,
            "epoch_losses": list(self.epoch_losses), "optimizer_steps": self.optimizer._step_count,
            "schedulers": [s.state_dict() for s in self.schedulers], "metrics": dict(self.last_metrics),
            "lbfgs": None if self.optimizer.driver is None else _export_driver(self.optimizer.driver),
        }
        payload = {
            "param_groups": [dict(g) for g in self.optimizer.param_groups],
            "extra": {"coordinator": coordinator, "job": self.spec.to_dict(),
                      **({} if self.init_record is None else {"init": self.init_record})},
            "metrics": {k: v for k, v in self.last_metrics.items() if isinstance(v, float) and math.isfinite(v)},
        }
        self._saving = (pending, payload)
        self.last_checkpoint = self.step_count
        if wait:
            self._commit()
        self._enter(Phase.RUNNING)

    def _finish_saves(self) -> None:
        if self._saving is not None:
            self._wait([self.backend.call(s, "saved", True) for s in self.shards])
            self._commit()

    def _commit(self) -> None:
        pending, payload = self._saving
        self._saving = None
        self.store.commit(pending, **payload)
        self.committed_step = pending.step

    # -- run directory log ----------------------------------------------------------------------

    def _log(self, record: dict[str, Any]) -> None:
        with open(self.run_dir / METRICS_FILE, "a") as log:
            log.write(json.dumps(record, default=_plain) + "\n")

    def _truncate_log(self, step: int) -> None:
        """Drop log lines past the restored step (they are about to be replayed)."""
        path = self.run_dir / METRICS_FILE
        if not path.exists():
            return
        kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = path.with_name(f".{METRICS_FILE}.tmp-{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)


def _plain(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _export_driver(driver: LBFGSDriver) -> dict[str, Any]:
    """The driver's scalars (its vectors are in the shards' checkpoint files)."""
    def scalar(value: Any) -> Any:
        return None if value is None else (float(value) if isinstance(value, (np.generic, float)) else value)
    return {
        "func_evals": driver.func_evals, "n_iter": driver.n_iter, "started": driver.started,
        "t": scalar(driver.t), "ro": [scalar(r) for r in driver.ro], "h_diag": scalar(driver.h_diag),
        "prev_loss": driver.prev_loss, "al": None if driver.al is None else [scalar(a) for a in driver.al],
        "history": driver.space.history_len(),
    }


def _import_driver(driver: LBFGSDriver, state: Mapping[str, Any]) -> None:
    dt = driver.dt
    def scalar(value: Any) -> Any:
        return None if value is None else dt(value)
    driver.func_evals, driver.n_iter, driver.started = state["func_evals"], state["n_iter"], state["started"]
    driver.t = scalar(state["t"])
    driver.ro = [scalar(r) for r in state["ro"]]
    driver.h_diag = state["h_diag"] if isinstance(state["h_diag"], int) else scalar(state["h_diag"])
    driver.prev_loss = state["prev_loss"]
    driver.al = None if state["al"] is None else [scalar(a) for a in state["al"]]
