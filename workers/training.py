"""The local training loop: one process, no Ray, any :class:`~shardstep.workers.tasks.Task`.

    from shardstep.workers.tasks import make_task
    from shardstep.workers.training import train

    result = train(make_task("digits"), seed=0, epochs=10, batch_size=64,
                   optimizer="adam", optimizer_kwargs={"lr": 1e-3},
                   scheduler="CosineAnnealingLR", scheduler_kwargs={"T_max": 230},
                   eval_every=50)
    result.metrics        # {"accuracy": ..., "loss": ...} of the final parameters
    result.history        # one dict per optimizer step

Each step takes the next global batch (the task's sharding rule, :mod:`shardstep.workers.tasks.base`),
computes every rank's partial loss and gradient with ``task.loss_and_grad`` and adds them in
rank order (:func:`~shardstep.workers.tasks.combine_partials`; ``world_size=1`` is plain training),
all inside the optimizer's closure, so LBFGS re-evaluates the same batch as often as it
needs. The distributed coordinator follows the same rules with the ranks on Ray actors.

Determinism: the parameters after ``n`` steps are a function of the task, the arguments and
the seed, bit for bit, as long as the BLAS library and its thread count stay the same.
"""

from __future__ import annotations

import inspect
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shardstep.workers.optim import Parameter, RowSparseGrad, lr_scheduler
from shardstep.workers.optim.builders import build_optimizer, build_scheduler
from shardstep.workers.tasks.base import Batch, ParamGroupRule, Task, check_int, combine_partials

SCHEDULER_INTERVALS = ("step", "epoch")

# a function called with each step's record; returning True stops training after that step
Callback = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True, eq=False)
class TrainingOutcome:
    """What a training ends with, in this process (:class:`TrainingResult`) or on a cluster
    (the coordinator's ``RunResult``).

    history: one record per step, in order (see :meth:`Trainer.step`). evaluations:
    ``{"step", "epoch", **metrics}`` for every evaluation. metrics: the evaluation of the
    final parameters. steps: optimizer steps taken. epoch, batch: where the data stream
    stands (the next batch to train on).
    """

    history: list[dict[str, Any]]
    evaluations: list[dict[str, Any]]
    metrics: dict[str, float]
    steps: int
    epoch: int
    batch: int


@dataclass(frozen=True, eq=False)
class TrainingResult(TrainingOutcome):
    """What :func:`train` returns: the outcome and the final parameters (copies, by name)."""

    params: dict[str, np.ndarray]


class Trainer:
    """A task, its parameters, an optimizer and a scheduler, stepping through the data.

    task: a :class:`~shardstep.workers.tasks.Task`. seed: initial parameters (``task.init_params``) and
    the data order. batch_size: examples per global batch. optimizer, optimizer_kwargs: a
    name of ``shardstep.workers.optim`` (``"adam"`` or ``"Adam"``) and its arguments. scheduler,
    scheduler_kwargs: a class name of ``shardstep.workers.optim.lr_scheduler`` (or None) and its
    arguments without the optimizer; SequentialLR and ChainedScheduler take their
    ``schedulers`` as ``[name, kwargs]`` pairs. scheduler_interval: ``"step"`` (after every
    optimizer step) or ``"epoch"`` (after every epoch); ReduceLROnPlateau is given the
    training loss of the step, or the mean over the epoch. param_groups: rules that
    override the task's ``param_groups`` (None: the task's; ``()``: one group). world_size:
    ranks whose partial gradients are added per step (1: plain training). params: initial
    parameters instead of ``task.init_params(seed)`` (copied).
    """

    def __init__(self, task: Task, *, seed: int = 0, batch_size: int = 64, optimizer: str = "adam",
                 optimizer_kwargs: Mapping[str, Any] | None = None, scheduler: str | None = None,
                 scheduler_kwargs: Mapping[str, Any] | None = None, scheduler_interval: str = "step",
                 param_groups: Sequence[ParamGroupRule] | None = None, world_size: int = 1,
                 params: Mapping[str, np.ndarray] | None = None):
        if not isinstance(task, Task):
            raise TypeError(f"task must be a shardstep.workers.tasks.Task; got {type(task).__name__} "
                            f"(build one by name with workers.tasks.make_task)")
        self.task = task
        self.seed = check_int("seed", seed, 0)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.world_size = check_int("world_size", world_size, 1)
        if scheduler_interval not in SCHEDULER_INTERVALS:
            raise ValueError(f"scheduler_interval must be one of {', '.join(map(repr, SCHEDULER_INTERVALS))}; "
                             f"got {scheduler_interval!r}")
        self.scheduler_interval = scheduler_interval
        self.batches_per_epoch = task.num_batches(self.batch_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{type(task).__name__} has no training examples (train_size is {task.train_size})")

        initial = _initial_params(task, self.seed, params)
        self.params = {name: Parameter(array, name=name) for name, array in initial.items()}
        # what the task sees: read-only views of the live arrays (optimizers update in place)
        self._views = {name: _read_only(p.data) for name, p in self.params.items()}
        rules = task.param_groups if param_groups is None else param_groups
        self.optimizer = build_optimizer(optimizer, optimizer_kwargs or {}, self.params, rules)
        self.scheduler = None if scheduler is None else build_scheduler(scheduler, scheduler_kwargs or {},
                                                                        self.optimizer)
        if scheduler is None and scheduler_kwargs:
            raise ValueError("scheduler_kwargs given without a scheduler")

        self.step_count = 0
        self.epoch = 0
        self.batch_index = 0
        self._epoch_losses: list[float] = []
        self._stream: Any = None
        # the model's buffers (BatchNorm's running statistics): moved after every forward of
        # a global batch from the statistics of all its pieces, as the coordinator does
        self.buffers: dict[str, np.ndarray] = {}

    # -- data ------------------------------------------------------------------------------

    def _next_shards(self) -> list[Batch]:
        if self._stream is None:
            self._stream = zip(*(self.task.batches(self.seed, self.epoch, self.batch_size, rank, self.world_size)
                                 for rank in range(self.world_size)))
            # after a failed step the stream restarts at the batch that failed
            for _ in range(self.batch_index):
                next(self._stream)
        return list(next(self._stream))

    # -- one step -----------------------------------------------------------------------------

    def step(self) -> dict[str, Any]:
        """One optimizer step on the next global batch. Returns its record: ``step`` (1-based
        count), ``epoch``, ``batch`` (index within the epoch), ``examples`` (in the global
        batch), ``loss`` (its mean loss before the update; LBFGS: at the step's start),
        ``lr`` (group 0's learning rate used) and ``seconds`` (wall time)."""
        start = time.perf_counter()
        shards = self._next_shards()
        lr = self.optimizer.param_groups[0].get("lr")
        calls = 0

        def closure() -> float:
            nonlocal calls
            if len(shards) == 1:
                loss, grads = self.task.loss_and_grad(self._views, shards[0])
            else:
                loss, grads = combine_partials([self.task.loss_and_grad(self._views, shard) for shard in shards])
            loss = float(loss)
            calls += 1
            statistics = self.task.take_batch_statistics()
            if statistics:
                self.buffers = self.task.advance_buffers(self.buffers or self.task.init_buffers(self.seed),
                                                         [statistics])
            # the first evaluation is at the current parameters: refuse it before any update (LBFGS's
            # later trial points may be non-finite; its line search backs off from them)
            if calls == 1 and not math.isfinite(loss):
                raise FloatingPointError(
                    f"training loss is {loss} at step {self.step_count + 1} (epoch {self.epoch}, batch "
                    f"{self.batch_index}), before the update; the parameters are unchanged. Lower the "
                    f"learning rate or check the task's gradients"
                )
            self._set_grads(grads)
            return loss

        try:
            loss = self.optimizer.step(closure)
        except BaseException:
            self._stream = None  # the next step retries this batch
            raise
        record = {"step": self.step_count + 1, "epoch": self.epoch, "batch": self.batch_index,
                  "examples": shards[0].global_size, "loss": float(loss), "lr": _plain(lr)}
        self.step_count += 1
        self._epoch_losses.append(record["loss"])
        if self.scheduler is not None and self.scheduler_interval == "step":
            self._step_scheduler(record["loss"])
        self.batch_index += 1
        if self.batch_index == self.batches_per_epoch:
            if self.scheduler is not None and self.scheduler_interval == "epoch":
                self._step_scheduler(float(np.mean(self._epoch_losses)))
            self.epoch += 1
            self.batch_index = 0
            self._epoch_losses = []
            self._stream = None
        record["seconds"] = time.perf_counter() - start
        return record

    def _set_grads(self, grads: Any) -> None:
        if not isinstance(grads, Mapping) or set(grads) != set(self.params):
            got = sorted(grads) if isinstance(grads, Mapping) else type(grads).__name__
            raise ValueError(
                f"{type(self.task).__name__}.loss_and_grad must return a gradient for every parameter; "
                f"expected {sorted(self.params)}, got {got}"
            )
        for name, p in self.params.items():
            grad = grads[name]
            if not isinstance(grad, (np.ndarray, RowSparseGrad)):
                raise TypeError(
                    f"{type(self.task).__name__}.loss_and_grad: gradient {name!r} must be an ndarray or a "
                    f"RowSparseGrad; got {type(grad).__name__}"
                )
            p.grad = grad

    def _step_scheduler(self, loss: float) -> None:
        if isinstance(self.scheduler, lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(loss)
        else:
            self.scheduler.step()

    # -- evaluation and the run ---------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """The task's metrics of the current parameters."""
        if self.buffers:
            self.task.set_buffers(self.buffers)
        metrics = self.task.evaluate(self._views)
        if not isinstance(metrics, Mapping):
            raise TypeError(f"{type(self.task).__name__}.evaluate must return a dict of metrics; "
                            f"got {type(metrics).__name__}")
        return {str(key): float(value) for key, value in metrics.items()}

    def run(self, *, epochs: int | None = None, steps: int | None = None, eval_every: int | None = None,
            callback: Callback | None = None) -> TrainingResult:
        """Train until ``epochs`` epochs or ``steps`` steps have been completed in total
        (whichever comes first; at least one is required), evaluating every ``eval_every``
        steps and at the end. ``callback(record)`` sees each step's record (with an ``"eval"``
        entry when that step was evaluated) and stops training by returning True."""
        if epochs is None and steps is None:
            raise ValueError("give epochs or steps (or both: training stops at whichever comes first)")
        epochs = None if epochs is None else check_int("epochs", epochs, 0)
        steps = None if steps is None else check_int("steps", steps, 0)
        eval_every = None if eval_every is None else check_int("eval_every", eval_every, 1)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable; got {type(callback).__name__}")

        history: list[dict[str, Any]] = []
        evaluations: list[dict[str, Any]] = []
        metrics: dict[str, float] | None = None
        while (epochs is None or self.epoch < epochs) and (steps is None or self.step_count < steps):
            record = self.step()
            metrics = None
            if eval_every is not None and self.step_count % eval_every == 0:
                metrics = self.evaluate()
                record["eval"] = metrics
                evaluations.append({"step": self.step_count, "epoch": self.epoch, **metrics})
            history.append(record)
            if callback is not None and callback(record) is True:
                break
        if metrics is None:
            metrics = self.evaluate()
            evaluations.append({"step": self.step_count, "epoch": self.epoch, **metrics})
        params = {name: p.data.copy() for name, p in self.params.items()}
        return TrainingResult(params=params, history=history, evaluations=evaluations, metrics=metrics,
                              steps=self.step_count, epoch=self.epoch, batch=self.batch_index)


def train(task: Task, *, epochs: int | None = None, steps: int | None = None, eval_every: int | None = None,
          callback: Callback | None = None, **trainer_kwargs: Any) -> TrainingResult:
    """Build a :class:`Trainer` from ``trainer_kwargs`` and :meth:`~Trainer.run` it."""
    allowed = [name for name in inspect.signature(Trainer).parameters if name != "task"]
    unknown = [key for key in trainer_kwargs if key not in allowed]
    if unknown:
        raise TypeError(f"train() got unknown argument{'s' if len(unknown) > 1 else ''} "
                        f"{', '.join(map(repr, unknown))}; allowed: epochs, steps, eval_every, callback, "
                        f"{', '.join(allowed)}")
    return Trainer(task, **trainer_kwargs).run(epochs=epochs, steps=steps, eval_every=eval_every, callback=callback)


# ---------------------------------------------------------------------------------------
# helpers


def _initial_params(task: Task, seed: int, given: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    owner = type(task).__name__
    if given is None:
        params = task.init_params(seed)
        source = f"{owner}.init_params"
    else:
        if not isinstance(given, Mapping):
            raise TypeError(f"params must be a dict of name -> ndarray; got {type(given).__name__}")
        params = {name: np.array(array, copy=True) for name, array in given.items()}
        source = "params"
    if not isinstance(params, Mapping) or not params:
        raise ValueError(f"{source} must give a non-empty dict of name -> ndarray; got {params!r:.80}")
    for name, array in params.items():
        if not isinstance(name, str) or not isinstance(array, np.ndarray) or array.dtype not in (np.float32, np.float64):
            raise TypeError(
                f"{source}: every entry must be a str name -> float32/float64 ndarray; got {name!r} -> "
                f"{type(array).__name__}{'' if not isinstance(array, np.ndarray) else ' of dtype ' + str(array.dtype)}"
            )
    return dict(params)


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def _plain(value: Any) -> Any:
    return float(value) if isinstance(value, (int, float, np.floating, np.integer)) else value
