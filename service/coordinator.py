"""The coordinator: an explicit state machine that drives a sharded run.

::

    Preparing --> Starting --> Running <--> Checkpointing
        |            ^  |        |   \\            |
        |            |  |        |    `--> Finishing --> Done
        |            |  v        v             |
        |          Recovering <----------------'        (an actor or node was lost, in any
        |            |                                   state: restart every actor from the
        v            v                                   latest committed checkpoint, at
      Failed <-------'      (every state may fail)       most max_failures times)

Each state is a small object that carries its own data (:class:`Recovering` its error and
the failure's number, :class:`Done` the result); :meth:`Coordinator.run` only moves from one
to the next (``while not state.terminal: state = handler(state)``), and every move is
checked against :data:`TRANSITIONS`. One recovery policy covers every state: an
:class:`~shardstep.service.errors.ActorLostError` raised while starting, stepping,
evaluating, checkpointing or finishing leads to :class:`Recovering`, which stops the
actors, keeps lost nodes out of the next placement, waits a backoff and starts again.

Each optimizer step is ``optimizer.step(closure)`` as in torch: the closure is ONE distributed
evaluation (:mod:`shardstep.service.pipeline`), and the step then applies the optimizer's rule
on every shard. LBFGS runs its driver here on vectors that stay in the shards
(:mod:`shardstep.service.sharded_lbfgs`).

Determinism: a run's parameters after ``n`` steps equal, bit for bit, those of the local loop
(:class:`shardstep.workers.training.Trainer` with ``world_size = workers``) for every number
of shards, both backends, and any resume or recovery (elementwise optimizers; LBFGS adds its
dot products over shards, so it matches to rounding).

Driver memory: the coordinator never holds the parameters or the optimizer state. Shards
initialize their own rows (from the task and the seed) or read them from a checkpoint, and
the final parameters are read from the final checkpoint only when
:attr:`RunResult.params` is asked for.

Fine-tuning (the job's ``init``) is planned by :mod:`shardstep.service.finetune` before
anything is written or started.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from shardstep.checkpoints import (
    CheckpointError,
    CheckpointStore,
    ShardLayout,
    best_step,
    committed_steps,
    latest_step,
    open_checkpoint,
)
from shardstep.checkpoints.run import PendingCheckpoint
from shardstep.checkpoints.storage import ObjectPath
from shardstep.service import run_dir as run_files
from shardstep.service.actors import ActorGroup, StartPlan, choose_transport
from shardstep.service.backend import make_backend
from shardstep.service.errors import ActorCallError, ActorLostError, NonFiniteError, RunFailedError, StartTimeoutError
from shardstep.service.finetune import InitPlan, open_init_source, plan_init
from shardstep.service.job_code import shipped_modules, use_job_code
from shardstep.service.jobspec import mlflow_tracking_uri, prepare_task, serve_task
from shardstep.service.pipeline import StepPipeline
from shardstep.service.reporting import FAILED, FINISHED, KILLED, RayMetrics, Reporter, Reporters, RunInfo, group_labels
from shardstep.service.run_dir import CHECKPOINT_DIR, INIT_FILE, JOB_FILE, METRICS_FILE, checkpoint_buffers, plain
from shardstep.service.sharded_lbfgs import ShardedSpace
from shardstep.workers.optim import lr_scheduler
from shardstep.workers.optim.algorithms.lbfgs import LBFGS, LBFGSDriver
from shardstep.workers.optim.builders import OptimizerGroups, build_scheduler, optimizer_groups
from shardstep.workers.tasks import make_task
from shardstep.workers.tasks.base import Task
from shardstep.workers.training import TrainingOutcome

__all__ = ["CHECKPOINT_DIR", "INIT_FILE", "JOB_FILE", "METRICS_FILE", "Coordinator", "RunResult", "TRANSITIONS",
           "InitPlan"]

# hyperparameter keys that are bookkeeping, not sent to the shards' rules
_NOT_HYPERPARAMETERS = ("params", "param_names")
# Recovering waits this long before the k-th restart (doubling, capped): a node that is
# going away has time to leave, a cluster that is replacing it time to bring another up
BACKOFF_SECONDS = 0.5
BACKOFF_CAP_SECONDS = 8.0


# ---------------------------------------------------------------------------------------
# the states


class State:
    """A state of the run. ``terminal`` states end :meth:`Coordinator.run`."""

    terminal: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class Preparing(State):
    """Check what can be checked here (a fine-tuning source against the model), reach Ray,
    create or reopen the run directory. Nothing is started; a failure is final."""


@dataclass(frozen=True)
class Starting(State):
    """Start every actor from the latest committed checkpoint (or from the task's
    initialization) and wait until they run. ``attempt``: the number of earlier starts."""

    attempt: int = 0


@dataclass(frozen=True)
class Running(State):
    """Steps until a checkpoint is due or training is over."""


@dataclass(frozen=True)
class Checkpointing(State):
    """Every shard stages its file of this step (written in the background unless ``wait``);
    the commit follows once all are on disk."""

    wait: bool


@dataclass(frozen=True)
class Recovering(State):
    """An actor or its node was lost (``error``), the run's ``failure``-th failure: stop
    the actors, keep lost nodes out, wait, start again; or fail beyond max_failures."""

    error: ActorLostError
    failure: int


@dataclass(frozen=True)
class Finishing(State):
    """Training is over: the final evaluation and the final checkpoint."""


@dataclass(frozen=True)
class Failed(State):
    terminal: ClassVar[bool] = True
    error: BaseException


@dataclass(frozen=True)
class Done(State):
    terminal: ClassVar[bool] = True
    result: RunResult


# every move the run can make; each is taken in the tests (tests/test_engine.py)
TRANSITIONS: dict[type[State], frozenset[type[State]]] = {
    Preparing: frozenset({Starting, Failed}),
    Starting: frozenset({Running, Recovering, Failed}),
    Running: frozenset({Checkpointing, Finishing, Recovering, Failed}),
    Checkpointing: frozenset({Running, Recovering, Failed}),
    Recovering: frozenset({Starting, Failed}),
    Finishing: frozenset({Done, Recovering, Failed}),
    Failed: frozenset(),
    Done: frozenset(),
}


# ---------------------------------------------------------------------------------------
# what the coordinator keeps


class _SkipStep(Exception):
    """The closure found a non-finite value and the job skips such steps."""


class ShardedOptimizer:
    """The coordinator's view of a sharded optimizer: ``param_groups`` (hyperparameters and
    parameter NAMES), ``defaults`` and ``_step_count``, what the LR schedulers of
    :mod:`shardstep.workers.optim.lr_scheduler` use of an optimizer (their
    ``SchedulableOptimizer``); ``step(closure)`` runs the closure and has the shards apply
    the rule (``apply`` is given by the coordinator). It holds no parameters or state."""

    def __init__(self, groups: OptimizerGroups, apply: Callable[[list[dict]], None],
                 driver: LBFGSDriver | None = None):
        self.defaults = dict(groups.defaults)
        self._step_count = 0
        self.param_groups = []
        for group in groups.param_groups:
            hyper = {k: v for k, v in group.items() if k not in _NOT_HYPERPARAMETERS}
            hyper["params"] = list(group["params"])
            self.param_groups.append(hyper)
        self.rule = groups.rule
        self._apply = apply
        self.driver = driver

    def hyperparameters(self) -> list[dict[str, Any]]:
        return [{k: v for k, v in g.items() if k not in _NOT_HYPERPARAMETERS} for g in self.param_groups]

    def step(self, closure: Callable[[], float]) -> float:
        if self.driver is not None:
            loss = self.driver.step(closure, self.hyperparameters()[0])
        else:
            loss = closure()
            self._apply(self.hyperparameters())
        self._step_count += 1
        return loss


@dataclass
class Progress:
    """Where training stands: what a checkpoint's coordinator record holds, and what the
    run has seen since its last (re)start."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    # the last step's loss and, when it was evaluated, its metrics (a checkpoint's metrics)
    last_metrics: dict[str, float] = field(default_factory=dict)
    # (step, metrics) of the latest evaluation since the (re)start
    evaluation: tuple[int, dict[str, float]] | None = None
    last_checkpoint: int | None = None   # staged (maybe not yet committed)
    committed: int | None = None         # the latest committed
    stop_requested: bool = False
    skipped_in_a_row: int = 0            # steps skipped for non-finite values since the last update
    # early stopping: the best value of its metric so far and at which step, the evaluations
    # since without an improvement, and why training stopped (None: it did not)
    stop_best: float | None = None
    stop_best_step: int | None = None
    stop_bad: int = 0
    stopped_early: str | None = None
    # seconds spent in steps by this run and every run it resumed (the time limit's clock)
    trained_seconds: float = 0.0
    # the model's buffers (BatchNorm's running statistics), by name; empty until the first
    # evaluation of a model that has some reports its statistics
    buffers: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class InFlightSave:
    """A checkpoint whose shard files are being written in the background."""

    pending: PendingCheckpoint
    payload: dict[str, Any]
    began: float  # time.perf_counter() when the save began (the checkpoint time reported)


@dataclass(frozen=True, eq=False)
class RunResult(TrainingOutcome):
    """What a finished run reports: the outcome (per-step records, evaluations, the final
    metrics, where the data stream stands) and how the run went. :attr:`params` reads the
    final parameters from the final checkpoint when asked (the coordinator itself never
    holds them)."""

    failures: int
    run_dir: Path | ObjectPath
    checkpoint_steps: list[int]
    init: dict[str, Any] | None = None
    # how the actors exchanged parameters and gradients: "shared_memory", "object_store" or
    # "inline" (no actors)
    transport: str = "inline"
    # where the run ran: "inline", "a new local Ray instance" or "the Ray cluster at ADDRESS"
    cluster: str = "inline"
    # why early stopping ended training before steps/epochs, or None
    stopped_early: str | None = None
    # with checkpoint.load_best: the best checkpoint's step and metrics, the run's result
    best_step: int | None = None
    best_metrics: dict[str, float] | None = None

    @functools.cached_property
    def params(self) -> dict[str, np.ndarray]:
        """The parameters of the run's result, by name: the best checkpoint's with
        ``checkpoint.load_best``, else the final one's (step :attr:`steps`)."""
        step = self.steps if self.best_step is None else self.best_step
        with open_checkpoint(self.run_dir / CHECKPOINT_DIR, step) as checkpoint:
            return checkpoint.export()[0]


def first_line(error: BaseException) -> str:
    """The first line of an error's message (Ray's go on for pages)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# ---------------------------------------------------------------------------------------
# the coordinator


class Coordinator:
    """Runs one job (a validated :class:`shardstep.service.jobspec.JobSpec`) to the end.

    ``task``: an already-built task (default: built from the spec). ``on_step(record)`` sees
    every step's record (returning True stops training after that step). ``on_event(text)``
    hears what the run is waiting for and why it restarts (default: nothing). A run
    directory with committed checkpoints resumes from the latest, never overwrites.
    """

    def __init__(self, spec: Any, *, task: Task | None = None,
                 on_step: Callable[[dict[str, Any]], Any] | None = None,
                 on_event: Callable[[str], Any] | None = None,
                 on_init: Callable[[dict[str, Any]], Any] | None = None):
        self.spec = spec
        use_job_code(getattr(spec, "code_dir", None))
        self.task = task if task is not None else make_task(spec.task, **dict(spec.task_args))
        # its data read and checked once, here: the actors get it with the task
        prepare_task(self.task, spec.task)
        self.on_step = on_step
        self.on_event = on_event
        # a fine-tuning run's plan (what it loads, what is new), once checked: before training
        self.on_init = on_init
        self.run_dir = run_files.run_location(spec.run_dir)
        self.run_name = self.run_dir.name or "run"
        # the run's own Ray namespace, where its actors are named "<run_name>/shard-0", ...
        self.namespace = f"shardstep-{self.run_name}-{uuid.uuid4().hex[:8]}"
        self.reporters = Reporters([], warn=self._event)
        self.run_id: str | None = None
        self.directory: run_files.RunDirectory | None = None
        self.state: State = Preparing()
        self.state_log: list[State] = [self.state]
        self.failures = 0
        self.backend: Any = None
        self.store: CheckpointStore | None = None
        self.actors: ActorGroup | None = None
        self.pipeline: StepPipeline | None = None
        self.saving: InFlightSave | None = None
        self.layout: ShardLayout | None = None
        self.optimizer: ShardedOptimizer | None = None
        self.schedulers: list[Any] = []
        self.space: ShardedSpace | None = None
        self.progress = Progress()
        self.history: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []
        self.init_plan: InitPlan | None = None
        # a fine-tuning source's buffers, the first buffers of a run that starts from it
        self.source_buffers: dict[str, np.ndarray] = {}
        self.init_record: dict[str, Any] | None = None
        # nodes whose raylet stopped answering: kept out of every later placement
        self.lost_nodes: set[str] = set()
        self._clip_scale: float | None = None
        # the checkpoint step the actors last started from, until the first record says so
        self._started_from: int | None = None
        self._round_trips_before = 0  # pipelines replaced by recoveries

    # -- views kept for callers (tests, benchmarks) -------------------------------------------

    @property
    def shards(self) -> list[Any]:
        return [] if self.actors is None else self.actors.shards

    @property
    def pids(self) -> list[tuple[int, int]]:
        """(index, process id) of every shard, then of every worker."""
        return [] if self.actors is None else self.actors.pids

    @property
    def step_count(self) -> int:
        return self.progress.step

    @property
    def round_trips(self) -> int:
        return self._round_trips_before + (0 if self.pipeline is None else self.pipeline.round_trips)

    @property
    def transport(self) -> str:
        return "inline" if self.actors is None else self.actors.transport

    # -- the machine ---------------------------------------------------------------------------

    def run(self) -> RunResult:
        handlers: dict[type[State], Callable[[Any], State]] = {
            Preparing: self._preparing, Starting: self._starting, Running: self._running,
            Checkpointing: self._checkpointing, Recovering: self._recovering, Finishing: self._finishing,
        }
        state = self.state
        try:
            while not state.terminal:
                try:
                    following = handlers[type(state)](state)
                except ActorLostError as error:
                    # the one recovery policy, whatever the state; before the run directory
                    # exists there is nothing to recover to
                    following = Failed(error) if isinstance(state, Preparing) else Recovering(error, self.failures + 1)
                except CheckpointError as error:
                    # once running, a checkpoint that cannot be written or read (a full disk, an
                    # object store that stopped answering) fails the run; at the start it is the
                    # run directory's content, which the user must look at (exit 2)
                    following = Failed(error if isinstance(state, Preparing) else self._storage_failure(error))
                except ActorCallError as error:
                    # a shard's own write of its checkpoint file failed the same way
                    storage = not isinstance(state, Preparing) and _checkpoint_cause(error) is not None
                    following = Failed(self._storage_failure(error) if storage else error)
                except Exception as error:
                    following = Failed(error)
                self._move(following)
                state = following
        except BaseException as interruption:  # Ctrl-C, SIGTERM: stop everything, keep the checkpoints
            self._move(Failed(interruption))
            raise
        finally:
            self._finish_reports()
            self._abort_save()
            self._stop_actors()
            if self.store is not None:
                # once no actor writes any more: a save that a signal cut short anywhere (even
                # between creating its directory and recording it) leaves nothing behind
                try:
                    self.store.discard_pending()
                except (OSError, CheckpointError):
                    pass  # a checkpoints directory that cannot be listed: the next store cleans it
                self.store.close()
            if self.backend is not None:
                try:
                    self.task.stop_serving()  # the row servers of [data] ray_data, if any
                except Exception as error:  # a cluster already gone: its actors went with it
                    self._event(f"warning: stopping the task's data servers: {first_line(error)}")
                self.backend.shutdown()
            if self.directory is not None:
                try:
                    run_files.flush_records(self.run_dir)  # the records since the last checkpoint
                except run_files.RunLogError as error:
                    self._event(f"warning: {error}")
                self.directory.close()
        if isinstance(state, Failed):
            raise state.error
        return state.result

    def _finish_reports(self) -> None:
        if not self.reporters.started:
            return
        error = self.state.error if isinstance(self.state, Failed) else None
        self.reporters.finish(FINISHED if error is None else FAILED if isinstance(error, Exception) else KILLED)

    def _move(self, following: State) -> None:
        if not isinstance(following, Failed) and type(following) not in TRANSITIONS[type(self.state)]:
            raise RuntimeError(f"coordinator cannot go from {self.state.name} to {following.name}")
        self.state = following
        self.state_log.append(following)

    def _event(self, text: str) -> None:
        if self.on_event is not None:
            self.on_event(text)

    # -- Preparing -----------------------------------------------------------------------------

    def _preparing(self, state: Preparing) -> State:
        spec = self.spec
        self._plan_init()
        job = spec.to_dict()
        # the checkpoint to start from, verified before anything is written or started: the
        # newest intact one (damaged newer ones are set aside once the directory is held)
        start, damaged = run_files.starting_checkpoint(self.run_dir)
        intact = trained = extra = None
        if start is not None:
            with start:
                intact, trained, extra = start.step, run_files.position(start), start.extra
        run_files.check_saved_job(self.run_dir, job, trained)  # a different job is refused before Ray starts
        # Ray first: a job the cluster cannot run (shared memory across nodes) is refused
        # before the run directory is touched
        self.backend = make_backend(spec.backend, spec.address, code=shipped_modules(spec))
        choose_transport(spec, self.backend, first=True)
        serve_task(self.task, spec.task)  # Ray Data's row servers: bad data is refused before anything is written
        if start is not None:  # a checkpoint whose position this job cannot continue (the data's size is known now)
            self._checked_record(intact, extra)
        self.directory = run_files.open_run_dir(self.run_dir, job, self.init_record, trained)
        self.run_id = self.directory.run_id
        if self.directory.changes and trained is not None:
            changed = ", ".join(f"{key} {run_files.quoted(old)} -> {run_files.quoted(new)}"
                                for key, old, new in self.directory.changes)
            self._event(f"the job changed since step {trained[0]} ({changed}): continuing with the new values")
        self.store = CheckpointStore(self.run_dir / CHECKPOINT_DIR, run_id=self.run_id, retention=spec.retention())
        self.reporters = Reporters(self._make_reporters(), warn=self._event)
        for step, reason in damaged:
            aside = self.store.set_aside(step, reason)
            self._event(f"warning: step {step} is damaged ({reason}); set aside as {aside.name}, "
                        + (f"resuming from step {intact}" if intact is not None else "starting from the beginning"))
        # a writer killed after a commit but before its retention ran left a step too many:
        # retention runs now (the newest committed step, this run's start, is always kept)
        self.store.prune()
        return Starting()

    def _make_reporters(self) -> list[Reporter]:
        """The job's [logging] integrations (their packages were checked with the job)."""
        spec, reporters = self.spec, []
        if spec.tensorboard is not False:
            from shardstep.service.report_tensorboard import TensorBoard

            where = self.run_dir / "tensorboard" if spec.tensorboard is True else Path(spec.tensorboard)
            reporters.append(TensorBoard(where))
        if spec.mlflow:
            from shardstep.service.report_mlflow import MLflow

            reporters.append(MLflow(mlflow_tracking_uri(spec.mlflow_tracking_uri), spec.mlflow_experiment))
        if spec.ray_metrics and self.backend.name == "ray":
            reporters.append(RayMetrics())
        return reporters

    def _group_names(self) -> list[str]:
        groups = [list(group["params"]) for group in self.optimizer.param_groups]
        return group_labels(groups, self.spec.group_rules(self.task, [name for names in groups for name in names]))

    def _plan_init(self) -> None:
        """A fine-tuning job's source, checked against the model before anything is written
        or started (ValueError); a run directory with a committed checkpoint of its own
        resumes from that instead, and the source is not read."""
        spec = self.spec
        if spec.init is None or latest_step(self.run_dir / CHECKPOINT_DIR) is not None:
            return
        model = {param.name: param for param in self.task.param_specs()}
        trainable = [name for name in model if not spec.is_frozen(name)]
        planned = self._optimizer_groups({name: model[name].dtype for name in trainable})
        groups = {name: group for group in planned.param_groups for name in group["params"]}
        with open_init_source(spec.init, warn=self._event) as source:
            self.init_plan = plan_init(source, spec, model, groups)
            self.source_buffers = self._source_buffers(source)
        self.init_record = self.init_plan.record()
        if self.on_init is not None:
            self.on_init(self.init_record)

    def _source_buffers(self, source: Any) -> dict[str, np.ndarray]:
        """The buffers (BatchNorm's running statistics) a fine-tuning source gives for this
        model, those ``init.skip`` leaves out aside: every one must be the model's, of its
        shape and dtype. A model buffer the source lacks starts afresh."""
        given = checkpoint_buffers(source)
        given = {name: array for name, array in given.items()
                 if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.spec.init.skip)}
        if not given:
            return {}
        expected = self.task.init_buffers(self.spec.seed)
        wrong = [f"{name} ({array.dtype} {array.shape})" for name, array in given.items()
                 if name not in expected or expected[name].shape != array.shape or expected[name].dtype != array.dtype]
        if wrong:
            have = ", ".join(f"{n} ({a.dtype} {a.shape})" for n, a in expected.items()) or "none"
            raise ValueError(f"cannot start from {source.directory}: its buffers {', '.join(wrong)} are not this "
                             f"model's (its buffers: {have}). Leave them out with init.skip")
        return {**expected, **given}

    # -- Starting ------------------------------------------------------------------------------

    def _starting(self, state: Starting) -> State:
        """Build the optimizer view and the schedulers, then the actors, from the latest
        committed checkpoint or from the task's initialization."""
        spec = self.spec
        root = self.run_dir / CHECKPOINT_DIR
        step = latest_step(root)
        self.progress = Progress(committed=step)
        extra: Mapping[str, Any] = {}
        if step is None:
            specs = tuple(self.task.param_specs())
        else:
            with open_checkpoint(root, step) as checkpoint:
                specs, extra, groups = checkpoint.layout.params, checkpoint.extra, checkpoint.param_groups
        self.layout = ShardLayout(specs, spec.shards)
        self._build_optimizer()
        self._started_from = step
        if step is not None:
            self._restore(step, extra, groups)
        else:  # from the start: whatever an earlier attempt logged is replayed
            self.history, self.evaluations = [], []
            self.progress.buffers = {name: array.copy() for name, array in self.source_buffers.items()}
            self._truncate_log(0)
        # a node lost just before this start is still listed alive: its raylet tells
        self.lost_nodes |= self.backend.unreachable_nodes()
        plan = StartPlan(
            layout=self.layout, optimizer=spec.optimizer,
            groups=[{"params": list(g["params"])} for g in self.optimizer.param_groups],
            task=self.task, seed=spec.seed, batch_size=spec.batch_size, accumulate=spec.accumulate,
            workers=spec.workers,
            frozen=[s.name for s in self.layout.params if spec.is_frozen(s.name)],
            checkpoint=None if step is None else str(root / f"step-{step:010d}"),
            init=None if step is not None else self.init_plan,
            run_dir=str(self.run_dir), run_id=self.run_id, lost_nodes=frozenset(self.lost_nodes),
            run_name=self.run_name, namespace=self.namespace, attempt=state.attempt)

        try:
            self.actors = ActorGroup.start(self.backend, spec, plan, on_wait=self._event)
        except StartTimeoutError as error:
            latest = "no checkpoint yet" if step is None else f"latest: step {step}"
            raise StartTimeoutError(f"{error}. The committed checkpoints in {root} are untouched ({latest}); give the "
                                    f"cluster the resources, or change the job's, and run it again") from error
        self.pipeline = StepPipeline(self.backend, self.actors.shards, self.actors.workers, self._fused())
        driver = self.optimizer.driver
        if driver is not None and step is not None and driver.started:
            self.space.restore_history(extra["coordinator"]["lbfgs"]["history"])
            driver.rebuild_gram()
        if state.attempt:
            self._event(f"restarted from {'step ' + str(step) if step is not None else 'the start'} "
                        f"({self.actors.transport.replace('_', ' ')})")
        self.reporters.start(RunInfo(name=self.run_name, run_id=self.run_id or "", run_dir=str(self.run_dir),
                                     job=spec.to_dict(), start_step=self.progress.step, attempt=state.attempt,
                                     group_names=tuple(self._group_names())))
        return Running()

    def _optimizer_groups(self, trainable: Mapping[str, str]) -> OptimizerGroups:
        """The job's param groups (names and hyperparameters) over the ``trainable``
        parameters (name -> dtype), from the optimizer's rule. Frozen parameters are in none,
        as with torch's ``requires_grad=False``."""
        spec = self.spec
        rules = spec.group_rules(self.task, list(trainable))
        return optimizer_groups(spec.optimizer, spec.optimizer_args, trainable, rules)

    def _build_optimizer(self) -> None:
        spec = self.spec
        groups = self._optimizer_groups({s.name: s.dtype for s in self.layout.params if not spec.is_frozen(s.name)})
        driver = None
        self.space = None
        if groups.rule is LBFGS.rule:
            if spec.clip_grad_norm is not None:
                raise ValueError("clip_grad_norm cannot be used with LBFGS (its line search needs the true gradient)")
            dtypes = {s.dtype for s in self.layout.params}
            self.space = ShardedSpace(spec.shards, np.dtype(dtypes.pop()), self._lbfgs_call, self._wait)
            driver = LBFGSDriver(self.space)
        self.optimizer = ShardedOptimizer(groups, self._apply, driver)
        self.schedulers = [build_scheduler(s.name, s.args, self.optimizer) for s in spec.schedulers]

    def _fused(self) -> bool:
        """Reduce and apply in one call per shard when the coordinator has nothing to decide
        between them: no LBFGS, no clipping factor, and non-finite values stop the run."""
        spec = self.spec
        return self.optimizer.driver is None and spec.clip_grad_norm is None and spec.nonfinite == "stop"

    def _checked_record(self, step: int, extra: Any) -> Mapping[str, Any]:
        """The checkpoint's coordinator record, its position checked against this job: a
        record that is not the run's own (edited, or of another task) would train on batches
        that do not exist."""
        where = f"the checkpoint at step {step} in {self.run_dir / CHECKPOINT_DIR}"
        record = extra.get("coordinator") if isinstance(extra, Mapping) else None
        if not isinstance(record, Mapping):
            raise CheckpointError(f"{where} has no coordinator record (it was not written by a run)")
        batches = self.task.num_batches(self.spec.batch_size)
        limits = {"step": (step, step), "epoch": (0, None), "batch": (0, batches - 1), "optimizer_steps": (0, None)}
        for key, (low, high) in limits.items():
            value = record.get(key)
            if type(value) is not int or value < low or (high is not None and value > high):
                allowed = f"{low}" if low == high else f"an integer in [{low}, {'...' if high is None else high}]"
                raise CheckpointError(f"{where} holds coordinator {key} = {value!r}; this job allows {allowed} "
                                      f"({batches} batches of {self.spec.batch_size} per epoch)")
        losses = record.get("epoch_losses")
        if (not isinstance(losses, list) or len(losses) > batches
                or not all(isinstance(loss, (int, float)) and not isinstance(loss, bool) for loss in losses)):
            raise CheckpointError(f"{where} holds coordinator epoch_losses that are not at most {batches} numbers")
        if not isinstance(record.get("schedulers"), list) or len(record["schedulers"]) != len(self.spec.schedulers):
            raise CheckpointError(f"{where} holds the state of {len(record.get('schedulers') or [])} scheduler(s); "
                                  f"this job has {len(self.spec.schedulers)}")
        return record

    def _checked_buffers(self, step: int, saved: Any) -> dict[str, np.ndarray]:
        """The buffers of the checkpoint at ``step``: those the task's model has, by name,
        shape and dtype (an edited record is refused rather than trained on)."""
        if not saved:
            return {}
        expected = self.task.init_buffers(self.spec.seed)
        problem = None
        if not isinstance(saved, Mapping) or set(saved) != set(expected):
            problem = f"buffers {sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__}"
        else:
            for name, array in expected.items():
                value = saved[name]
                if not isinstance(value, np.ndarray) or value.shape != array.shape or value.dtype != array.dtype:
                    problem = f"buffer {name!r} as {getattr(value, 'dtype', type(value).__name__)} " \
                              f"{getattr(value, 'shape', '')}"
                    break
        if problem is not None:
            raise CheckpointError(f"the checkpoint at step {step} in {self.run_dir / CHECKPOINT_DIR} holds {problem}; "
                                  f"this job's model has buffers {', '.join(f'{n} {a.dtype} {a.shape}' for n, a in expected.items())}")
        return {name: np.array(saved[name]) for name in expected}

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
        record = self._checked_record(step, extra)
        for scheduler, state in zip(self.schedulers, record["schedulers"], strict=True):
            scheduler.load_state_dict(state)
        progress = self.progress
        progress.step, progress.epoch, progress.batch = record["step"], record["epoch"], record["batch"]
        progress.epoch_losses = list(record["epoch_losses"])
        progress.last_metrics = dict(record.get("metrics", {}))
        progress.last_checkpoint = step
        self.optimizer._step_count = record["optimizer_steps"]
        progress.buffers = self._checked_buffers(step, record.get("buffers") or {})
        trained = record.get("trained_seconds", 0.0)
        progress.trained_seconds = float(trained) if isinstance(trained, (int, float)) and trained >= 0 else 0.0
        if self.spec.time_limit is not None and progress.trained_seconds >= self.spec.time_limit:
            progress.stopped_early = (f"time limit: {progress.trained_seconds:.1f} s of training had reached "
                                      f"training.time_limit = {self.spec.time_limit:g} s at step {step}")
        watched = record.get("early_stopping")
        # what was watched before carries over while the job watches the same metric the
        # same way; a changed patience decides from the count so far
        if (isinstance(watched, Mapping) and watched.get("metric") == self.spec.stop_metric
                and self.spec.stop_metric is not None):
            progress.stop_best, progress.stop_best_step = watched.get("best"), watched.get("best_step")
            progress.stop_bad = int(watched.get("bad") or 0)
            if progress.stop_bad >= self.spec.stop_patience:
                progress.stopped_early = watched.get("stopped") or (
                    f"early stopping: {self.spec.stop_metric} did not improve in {progress.stop_bad} evaluation(s)")
        self.init_record = extra.get("init")
        if self.optimizer.driver is not None:
            self.optimizer.driver.load_scalar_state(record["lbfgs"])
        # the records past the checkpoint are about to be replayed
        self.history = [r for r in self.history if r["step"] <= step]
        self.evaluations = [e for e in self.evaluations if e["step"] <= step]
        self._truncate_log(step)

    def _truncate_log(self, step: int) -> None:
        dropped = run_files.truncate_records(self.run_dir, step)
        if dropped:
            self._event(f"dropped {dropped} line(s) of {run_files.log_location(self.run_dir)} that were not whole records "
                        f"(a torn append or garbage); the log now ends at step {step}")

    # -- Recovering ----------------------------------------------------------------------------

    def _recovering(self, state: Recovering) -> State:
        spec = self.spec
        self.failures = state.failure
        root = self.run_dir / CHECKPOINT_DIR
        if state.failure > spec.max_failures:
            details = str(state.error).strip().splitlines()[1:]
            error = RunFailedError(
                f"{first_line(state.error)}; this is failure {state.failure} and the job allows max_failures="
                f"{spec.max_failures}. The committed checkpoints in {root} are intact (latest: step "
                f"{latest_step(root)}); continue with `shardstep resume {self.run_dir}`"
                + "".join(f"\n{line}" for line in details))
            error.__cause__ = state.error
            return Failed(error)
        # the nodes of the lost actors that no longer answer stay out of every later start
        if self.actors is not None:
            lost = self.backend.unreachable_nodes(self.actors.nodes)
            self.lost_nodes |= lost
        self._abort_save()
        self._stop_actors()
        delay = min(BACKOFF_SECONDS * 2 ** (state.failure - 1), BACKOFF_CAP_SECONDS)
        self._event(f"{first_line(state.error)}; recovering (failure {state.failure} of at most {spec.max_failures}"
                    + (f"; lost node(s) {', '.join(sorted(n[:12] for n in self.lost_nodes))} kept out"
                       if self.lost_nodes else "") + f"), restarting in {delay:g} s")
        time.sleep(delay)
        return Starting(attempt=state.failure)

    # -- Running -------------------------------------------------------------------------------

    def _training_over(self) -> bool:
        spec, progress = self.spec, self.progress
        return (progress.stop_requested or progress.stopped_early is not None
                or (spec.epochs is not None and progress.epoch >= spec.epochs)
                or (spec.steps is not None and progress.step >= spec.steps))

    def _running(self, state: Running) -> State:
        spec, progress = self.spec, self.progress
        while not self._training_over():
            record = self._step()
            metrics = None
            if (spec.eval_every is not None and not record.get("skipped")
                    and progress.step % spec.eval_every == 0):
                metrics = record["eval"] = self._evaluate()
                self._watch_for_early_stop(metrics)
            progress.last_metrics = {"loss": record["loss"], **(metrics or {})}
            self.history.append(record)
            self._log(record)
            self.reporters.step(record)
            if self.on_step is not None and self.on_step(record) is True:
                progress.stop_requested = True
            if (spec.checkpoint_every is not None and not record.get("skipped")
                    and progress.step % spec.checkpoint_every == 0):
                return Checkpointing(wait=not spec.checkpoint_async)
        return Finishing()

    def _watch_for_early_stop(self, metrics: Mapping[str, float]) -> None:
        """Count the evaluations whose metric did not improve on the best by more than
        min_delta (as Lightning's EarlyStopping does); at ``patience`` of them in a row,
        training stops after this step."""
        spec, progress = self.spec, self.progress
        if spec.stop_metric is None:
            return
        value = float(metrics[spec.stop_metric])
        best = progress.stop_best
        improved = best is None or (value < best - spec.stop_min_delta if spec.stop_mode == "min"
                                    else value > best + spec.stop_min_delta)
        if improved:
            progress.stop_best, progress.stop_best_step, progress.stop_bad = value, progress.step, 0
            return
        progress.stop_bad += 1
        if progress.stop_bad >= spec.stop_patience:
            progress.stopped_early = (
                f"early stopping: {spec.stop_metric} did not improve on its best, {best:.6g} at step "
                f"{progress.stop_best_step}, by more than {spec.stop_min_delta:g} ({spec.stop_mode}) in "
                f"{progress.stop_bad} evaluation(s); stopped at step {progress.step}")
            self._event(progress.stopped_early)

    def _storage_failure(self, error: Exception) -> RunFailedError:
        """``error`` as the run's failure, with where the run can continue from."""
        root = self.run_dir / CHECKPOINT_DIR
        fix = "once the object store answers again," if isinstance(self.run_dir, ObjectPath) else "make room and"
        try:
            latest = latest_step(root)
        except (CheckpointError, OSError):
            then = f"the committed checkpoints in {root} are kept: {fix} continue with `shardstep resume {self.run_dir}`"
        else:
            then = (f"nothing was committed yet: {fix} run the job again" if latest is None else
                    f"the committed checkpoints in {root} are intact (latest: step {latest}): {fix} "
                    f"continue with `shardstep resume {self.run_dir}`")
        failure = RunFailedError(f"{error}; {then}")
        failure.__cause__ = error
        return failure

    def _log(self, record: dict[str, Any]) -> None:
        self._log_call(run_files.append_record, record)

    def _flush_log(self) -> None:
        self._log_call(run_files.flush_records)

    def _log_call(self, call: Callable[..., None], *args: Any) -> None:
        try:
            call(self.run_dir, *args)
        except run_files.RunLogError as error:
            raise self._storage_failure(error) from error

    def _evaluate(self) -> dict[str, float]:
        progress = self.progress
        metrics = self.pipeline.evaluate(progress.buffers)
        self.evaluations.append({"step": progress.step, "epoch": progress.epoch, **metrics})
        progress.evaluation = (progress.step, metrics)
        return metrics

    def _step(self) -> dict[str, Any]:
        start = time.perf_counter()
        spec, progress, pipeline = self.spec, self.progress, self.pipeline
        epoch, index = progress.epoch, progress.batch
        lr = self.optimizer.param_groups[0].get("lr")
        lrs = [plain(group.get("lr")) for group in self.optimizer.param_groups]
        calls = 0
        self._clip_scale = None
        grad_norm: float | None = None

        def closure() -> float:
            nonlocal calls, grad_norm
            calls += 1
            loss, reports = self._distributed_evaluation(epoch, index)
            if calls == 1:
                bad = sorted({name for report in reports for name in report["nonfinite"]})
                if not math.isfinite(loss) or bad:
                    what = f"training loss is {loss}" + (f" and the gradients of {', '.join(bad)} are not finite"
                                                         if bad else "")
                    where = f"{what} at step {progress.step + 1} (epoch {epoch}, batch {index})"
                    message = (f"{where}; the run stops with its committed checkpoints as they are (shards whose "
                               "own gradients were finite applied the update)" if pipeline.fused
                               else f"{where}, before the update; the parameters are unchanged")
                    if spec.nonfinite == "skip":
                        raise _SkipStep(message)
                    raise NonFiniteError(message + ". Lower the learning rate, clip gradients "
                                         "(clip_grad_norm), or set nonfinite = \"skip\"")
                # the global norm before clipping (torch's clip_grad_norm_ returns the same);
                # unknown when a shard has row-sparse gradients and nothing clips
                if all(report["sumsq"] is not None for report in reports):
                    total = 0.0
                    for report in reports:
                        total += report["sumsq"]
                    grad_norm = math.sqrt(total)
                if spec.clip_grad_norm is not None:
                    scale = spec.clip_grad_norm / (grad_norm + 1e-6)
                    self._clip_scale = scale if scale < 1.0 else None
            self._advance_buffers(pipeline.statistics)
            return loss

        try:
            loss = self.optimizer.step(closure)
        except _SkipStep as skip:
            pipeline.discard_grads()
            progress.skipped_in_a_row += 1
            if progress.skipped_in_a_row >= spec.max_skipped_steps:
                self._finish_saves()  # the checkpoint in flight is of a good step: keep it
                raise NonFiniteError(
                    f"{progress.skipped_in_a_row} steps in a row were skipped for non-finite values "
                    f"(max_skipped_steps = {spec.max_skipped_steps}), the last: {skip}; the run is diverging. Its "
                    f"committed checkpoints are kept (latest: step {progress.committed}). Lower the learning rate "
                    "or clip gradients (clip_grad_norm), and resume") from None
            record = {"step": progress.step, "epoch": epoch, "batch": index, "skipped": True,
                      "loss": float("nan"), "message": str(skip), "lr": plain(lr), "time": time.time()}
            self._advance_batch()
            record["seconds"] = time.perf_counter() - start
            return self._first_since_start(record)
        record = {"step": progress.step + 1, "epoch": epoch, "batch": index,
                  "examples": min(spec.batch_size, self.task.train_size - index * spec.batch_size),
                  "loss": float(loss), "lr": plain(lr), "lrs": lrs, "time": time.time(),
                  **({} if grad_norm is None else {"grad_norm": grad_norm})}
        progress.step += 1
        progress.skipped_in_a_row = 0
        progress.epoch_losses.append(record["loss"])
        if self.schedulers:
            self._tick("step", record["loss"])
        self._advance_batch()
        record["seconds"] = time.perf_counter() - start
        record["checkpoint"] = progress.committed
        progress.trained_seconds += record["seconds"]
        if (spec.time_limit is not None and progress.trained_seconds >= spec.time_limit
                and progress.stopped_early is None):
            progress.stopped_early = (f"time limit: {progress.trained_seconds:.1f} s of training reached "
                                      f"training.time_limit = {spec.time_limit:g} s; stopped at step {progress.step}")
            self._event(progress.stopped_early)
        return self._first_since_start(record)

    def _first_since_start(self, record: dict[str, Any]) -> dict[str, Any]:
        """The first record after a start from a checkpoint says which (``started_from``):
        the steps after it were trained again (a resume, a recovery), as a plot shows."""
        if self._started_from is not None:
            record["started_from"], self._started_from = self._started_from, None
        return record

    def _advance_buffers(self, statistics: list[dict]) -> None:
        """Move the model's buffers by one training forward of the global batch (every closure
        evaluation, as torch's BatchNorm moves with every training forward)."""
        if not statistics:
            return
        progress = self.progress
        if not progress.buffers:
            progress.buffers = self.task.init_buffers(self.spec.seed)
        progress.buffers = self.task.advance_buffers(progress.buffers, statistics)

    def _advance_batch(self) -> None:
        progress = self.progress
        progress.batch += 1
        if progress.batch == self.task.num_batches(self.spec.batch_size):
            if self.schedulers and progress.epoch_losses:
                self._tick("epoch", float(np.mean(progress.epoch_losses)))
            progress.epoch += 1
            progress.batch = 0
            progress.epoch_losses = []

    def _tick(self, interval: str, loss: float) -> None:
        evaluated: dict[str, float] | None = None
        for scheduler, scheduler_spec in zip(self.schedulers, self.spec.schedulers):
            if scheduler_spec.interval != interval:
                continue
            if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
                if scheduler_spec.monitor == "loss":
                    scheduler.step(loss)
                else:
                    evaluated = evaluated or self.pipeline.evaluate(self.progress.buffers)
                    if scheduler_spec.monitor not in evaluated:
                        raise ValueError(f"ReduceLROnPlateau monitors {scheduler_spec.monitor!r}, which the task's "
                                         f"evaluation does not report; it reports {sorted(evaluated)}")
                    scheduler.step(evaluated[scheduler_spec.monitor])
            else:
                scheduler.step()

    def _distributed_evaluation(self, epoch: int, index: int) -> tuple[float, list[dict]]:
        """One closure evaluation; an in-flight save's shards report with it (no extra wait)."""
        polls = self.pipeline.on_shards("saved") if self.saving is not None else []
        loss, reports, polled = self.pipeline.evaluation(epoch, index, self.spec.clip_grad_norm is not None,
                                                         self.optimizer.hyperparameters(), also=polls)
        if polled and all(p is not None for p in polled):
            self._commit()
        return loss, reports

    def _apply(self, hyperparameters: list[dict]) -> None:
        self.pipeline.apply(hyperparameters, self._clip_scale, self._following_batch(),
                            self.spec.clip_grad_norm is not None)

    def _following_batch(self) -> tuple[int, int] | None:
        """(epoch, batch) of the step after the current one, or None when the run ends with it
        or a checkpoint or an evaluation comes first (they would wait behind it)."""
        spec, progress = self.spec, self.progress
        finished = progress.step + 1
        if spec.steps is not None and finished >= spec.steps:
            return None
        if any(every is not None and finished % every == 0 for every in (spec.checkpoint_every, spec.eval_every)):
            return None
        epoch, index = progress.epoch, progress.batch + 1
        if index == self.task.num_batches(spec.batch_size):
            epoch, index = epoch + 1, 0
        if spec.epochs is not None and epoch >= spec.epochs:
            return None
        return epoch, index

    def _lbfgs_call(self, shard: int, method: str, *args: Any) -> Any:
        return self.pipeline.lbfgs(shard, method, *args)

    def _wait(self, refs: list) -> list:
        return self.pipeline.wait(refs)

    # -- Checkpointing -------------------------------------------------------------------------

    def _checkpointing(self, state: Checkpointing) -> State:
        self._checkpoint(state.wait)
        return Running()

    def _checkpoint(self, wait: bool) -> None:
        """Every shard writes its own file (staged now, written in the background unless
        ``wait``); the commit follows once all are on disk."""
        progress = self.progress
        self._finish_saves()
        # the log reaches this step before the checkpoint does (on object storage it is
        # written in segments): a resumed run never lacks the records of trained steps
        self._flush_log()
        began = time.perf_counter()
        pending = self.store.begin(progress.step, self.layout)
        try:
            self.pipeline.wait(self.pipeline.on_shards("save", pending, wait))
        except BaseException:
            self.store.abort(pending)
            raise
        record = {
            "step": progress.step, "epoch": progress.epoch, "batch": progress.batch,
            "epoch_losses": list(progress.epoch_losses), "optimizer_steps": self.optimizer._step_count,
            "schedulers": [s.state_dict() for s in self.schedulers], "metrics": dict(progress.last_metrics),
            "lbfgs": None if self.optimizer.driver is None else self.optimizer.driver.scalar_state(),
            "trained_seconds": progress.trained_seconds,
            "buffers": dict(progress.buffers),
            "early_stopping": {"metric": self.spec.stop_metric, "best": progress.stop_best,
                               "best_step": progress.stop_best_step, "bad": progress.stop_bad,
                               "stopped": progress.stopped_early},
        }
        payload = {
            "param_groups": [dict(g) for g in self.optimizer.param_groups],
            "extra": {"coordinator": record, "job": self.spec.to_dict(),
                      **({} if self.init_record is None else {"init": self.init_record})},
            "metrics": {k: v for k, v in progress.last_metrics.items() if isinstance(v, float) and math.isfinite(v)},
        }
        self.saving = InFlightSave(pending, payload, began)
        progress.last_checkpoint = progress.step
        if wait:
            self._commit()

    def _finish_saves(self) -> None:
        if self.saving is not None:
            self.pipeline.wait(self.pipeline.on_shards("saved", True))
            self._commit()

    def _commit(self) -> None:
        saving, self.saving = self.saving, None
        self.store.commit(saving.pending, **saving.payload)
        self.progress.committed = saving.pending.step
        self.reporters.checkpoint(saving.pending.step, time.perf_counter() - saving.began)

    def _abort_save(self) -> None:
        saving, self.saving = self.saving, None
        if saving is not None and self.store is not None:
            try:
                self.store.abort(saving.pending)
            except Exception:
                pass  # the next store removes what is left (an uncommitted step is never read)

    # -- Finishing -----------------------------------------------------------------------------

    def _finishing(self, state: Finishing) -> State:
        progress = self.progress
        if progress.evaluation is not None and progress.evaluation[0] == progress.step:
            metrics = progress.evaluation[1]
        else:
            metrics = self._evaluate()
            progress.last_metrics = {**progress.last_metrics, **metrics}
        self._finish_saves()
        if progress.last_checkpoint != progress.step:
            self._checkpoint(wait=True)
        best = best_metrics = None
        if self.spec.load_best:  # retention's keep_best has kept it
            root = self.run_dir / CHECKPOINT_DIR
            best = best_step(root, self.spec.keep_metric, self.spec.keep_mode)
            if best is not None:
                with open_checkpoint(root, best) as checkpoint:
                    best_metrics = dict(checkpoint.metrics)
        return Done(RunResult(
            history=self.history, evaluations=self.evaluations, metrics=metrics, steps=progress.step,
            epoch=progress.epoch, batch=progress.batch, failures=self.failures, run_dir=self.run_dir,
            checkpoint_steps=committed_steps(self.run_dir / CHECKPOINT_DIR), init=self.init_record,
            transport=self.transport, cluster=self.backend.description, stopped_early=progress.stopped_early,
            best_step=best, best_metrics=best_metrics))

    # -- actors ----------------------------------------------------------------------------------

    def _stop_actors(self) -> None:
        if self.pipeline is not None:
            self._round_trips_before += self.pipeline.round_trips
            self.pipeline = None
        if self.actors is not None:
            self.actors.stop()
            self.actors = None


def _checkpoint_cause(error: BaseException | None) -> CheckpointError | None:
    """The CheckpointError an actor's failure came from (inline: its cause; on Ray: the
    cause of Ray's task error), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, CheckpointError):
            return error
        error = getattr(error, "cause", None) or error.__cause__
    return None
