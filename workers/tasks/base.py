"""The task interface: what a training job trains, in five pure functions.

A :class:`Task` is the data, the model and the loss of a job, with no optimizer and no loop.
The local loop (:mod:`shardstep.workers.training`) and the distributed coordinator run the same task
object unchanged, so every method is pure with respect to the parameters: they arrive as a
``dict[name, ndarray]`` and are never modified or kept.

    init_params(seed)                        -> {name: ndarray}, deterministic in seed
    param_groups                             -> (ParamGroupRule, ...), optional overrides by name
    batches(seed, epoch, batch_size, rank, world_size) -> this rank's shard of every global batch
    loss_and_grad(params, batch)             -> (loss, {name: ndarray | RowSparseGrad})
    evaluate(params)                         -> {metric: float}

Sharding rule (implemented once, here; see :meth:`Task.batches`): the training examples of
an epoch are ordered by ``np.random.default_rng([seed, epoch, 0]).permutation(train_size)``;
global batch ``k`` is positions ``k*B .. (k+1)*B - 1`` of that order (the last one shorter);
rank ``r`` of ``W`` takes the contiguous slice ``n*r//W .. n*(r+1)//W - 1`` of a global
batch of ``n`` examples. Concatenating the shards of ranks 0..W-1 gives the global batch in
order, for every W. An example's data may depend on (seed, epoch, its position in the
training set) only, never on the rank, the world size or the other examples of its batch.

Summable form of the loss: ``loss_and_grad`` returns the SUM of the per-example losses of
its shard divided by ``batch.global_size`` (the number of examples in the whole global
batch), and the gradient of that. Adding the partial losses and gradients of all ranks
(:func:`combine_partials`, in rank order) gives the mean loss over the global batch and its
gradient; with one rank the partial is the mean itself. The result depends on the number of
ranks only through the order of floating-point additions.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from shardstep.checkpoints.layout import ParamSpec
from shardstep.workers.checks import is_integer, is_real
from shardstep.workers.nn.checks import float_dtype_or_none
from shardstep.workers.optim.param_groups import ParamGroupRule
from shardstep.workers.optim.parameter import RowSparseGrad

Grad = np.ndarray | RowSparseGrad

# the third entropy word of the epoch-order generator; init and task-specific streams use
# other words, so no two streams of one seed coincide
SHUFFLE_STREAM = 0


# ---------------------------------------------------------------------------------------
# the records a task exchanges with a loop


@dataclass(frozen=True, eq=False)
class Batch:
    """One rank's shard of one global batch.

    seed, epoch: the data stream it belongs to. index: the global batch's number within the
    epoch (0-based). rank, world_size: whose shard this is. examples: int64 positions in the
    training set, in global-batch order (may be empty when the global batch has fewer
    examples than ranks). global_size: the number of examples in the whole global batch, the
    denominator of the summable loss. data: the shard's arrays, as the task's
    :meth:`Task.examples` returns them (leading dimension ``len(examples)``). offset: the
    place of ``examples[0]`` within the global batch (rank r's shard starts at
    ``global_size * r // world_size``; a micro-batch further in), which keys per-example noise
    such as dropout masks to the global batch.
    """

    seed: int
    epoch: int
    index: int
    rank: int
    world_size: int
    examples: np.ndarray
    global_size: int
    data: Mapping[str, np.ndarray] = field(repr=False)
    offset: int = 0

    @property
    def size(self) -> int:
        """Examples in this shard."""
        return int(self.examples.size)


# ---------------------------------------------------------------------------------------
# argument checks shared by tasks and loops


class TaskArgumentError(ValueError):
    """A task argument refused with a message that already names its job-file key
    (``data.train``, ``model.layers[0].args``): the job check shows it as it is."""


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum]; bool and non-integral values are refused."""
    if not is_integer(value):
        raise TypeError(f"{name} must be an integer; got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        allowed = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be {allowed}; got {value}")
    return value


def check_real(name: str, value: Any, minimum: float | None = None, *, open_min: bool = False) -> float:
    """``value`` as a finite float, above ``minimum`` (strictly when ``open_min``)."""
    if not is_real(value) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number; got {value!r}")
    value = float(value)
    if minimum is not None and (value < minimum or (open_min and value == minimum)):
        raise ValueError(f"{name} must be {'>' if open_min else '>='} {minimum}; got {value}")
    return value


def check_dtype(name: str, value: Any) -> np.dtype:
    """float32 or float64, given as a dtype, a type or its name."""
    dtype = float_dtype_or_none(value)
    if dtype is None:
        raise ValueError(f"{name} must be 'float32' or 'float64'; got {value!r}")
    return dtype


def check_params(params: Any, shapes: Mapping[str, tuple[int, ...]], dtype: np.dtype, owner: str) -> None:
    """``params`` must be a dict with exactly the names of ``shapes``, each an ndarray of that
    shape and ``dtype``."""
    if not isinstance(params, Mapping):
        raise TypeError(f"{owner}: params must be a dict of name -> ndarray; got {type(params).__name__}")
    missing = [name for name in shapes if name not in params]
    unknown = [name for name in params if name not in shapes]
    if missing or unknown:
        raise ValueError(
            f"{owner}: params must have exactly the names {', '.join(shapes)}; "
            f"missing {missing or 'none'}, unknown {unknown or 'none'}"
        )
    for name, shape in shapes.items():
        array = params[name]
        if not isinstance(array, np.ndarray):
            raise TypeError(f"{owner}: params[{name!r}] must be an ndarray; got {type(array).__name__}")
        if array.shape != tuple(shape) or array.dtype != dtype:
            raise ValueError(
                f"{owner}: params[{name!r}] must have shape {tuple(shape)} and dtype {dtype}; "
                f"got shape {array.shape} and dtype {array.dtype}"
            )


def epoch_order(seed: int, epoch: int, train_size: int) -> np.ndarray:
    """The order in which an epoch visits the training examples (the sharding rule)."""
    rng = np.random.default_rng([seed, epoch, SHUFFLE_STREAM])
    return rng.permutation(train_size).astype(np.int64, copy=False)


def shard_bounds(global_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s slice [start, stop) of a global batch of ``global_size`` examples."""
    return global_size * rank // world_size, global_size * (rank + 1) // world_size


def shard_positions(order: np.ndarray, index: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """The training positions of rank ``rank``'s shard of global batch ``index`` of the epoch
    whose order is ``order`` (the sharding rule)."""
    members = order[index * batch_size:(index + 1) * batch_size]
    start, stop = shard_bounds(members.size, rank, world_size)
    return members[start:stop]


def micro_batches(batch: Batch, parts: int) -> list[Batch]:
    """``batch`` cut into ``parts`` consecutive pieces (the sharding rule's split: sizes differ
    by at most one), each with the whole global batch's ``global_size``, so their summable
    losses and gradients add up to the batch's."""
    if parts == 1:
        return [batch]
    pieces = []
    for part in range(parts):
        start, stop = shard_bounds(batch.size, part, parts)
        pieces.append(Batch(seed=batch.seed, epoch=batch.epoch, index=batch.index, rank=batch.rank,
                            world_size=batch.world_size, examples=batch.examples[start:stop],
                            global_size=batch.global_size,
                            data={key: array[start:stop] for key, array in batch.data.items()},
                            offset=batch.offset + start))
    return pieces


def accumulated_loss_and_grad(task: Task, params: Mapping[str, np.ndarray], batch: Batch,
                              parts: int) -> tuple[float, dict[str, Any]]:
    """``task.loss_and_grad`` of ``batch`` computed in ``parts`` micro-batches, one after
    another, their losses and gradients added (dense ones in place; row-sparse ones by
    concatenating their rows). The same numbers as one call up to the order of float sums;
    at most 1/parts of the activations are alive at a time."""
    if parts == 1:
        return task.loss_and_grad(params, batch)
    total_loss, total = 0.0, None
    for piece in micro_batches(batch, parts):
        loss, grads = task.loss_and_grad(params, piece)
        total_loss += float(loss)
        if total is None:
            total = {name: grad if isinstance(grad, RowSparseGrad) else np.array(grad, copy=True)
                     for name, grad in grads.items()}
            continue
        for name, grad in grads.items():
            if isinstance(grad, RowSparseGrad):
                kept = total[name]
                total[name] = RowSparseGrad(np.concatenate([kept.indices, grad.indices]),
                                            np.concatenate([kept.values, grad.values]), kept.shape)
            else:
                total[name] += grad
    return total_loss, total


def declared_for(task: Any, declarer: str, builders: Sequence[str]) -> bool:
    """Whether the shapes ``task``'s method ``declarer`` declares are those its ``builders``
    make: the class that declares them must be at least as derived as every class that
    defines a builder (a subclass that builds the model another way has other parameters)."""
    def definer(name: str) -> type:
        return next(cls for cls in type(task).__mro__ if name in vars(cls))
    return all(issubclass(definer(declarer), definer(name)) for name in builders)


# ---------------------------------------------------------------------------------------
# the interface


class Task(ABC):
    """Base class of training tasks; subclass it to train your own model.

    Implement ``train_size``, :meth:`init_params`, :meth:`examples`, :meth:`loss_and_grad`
    and :meth:`evaluate`; set ``param_groups`` if some parameters need their own
    hyperparameters. :meth:`batches` implements the sharding rule of the module docstring
    and is not meant to be overridden. A task must pickle (the coordinator ships it to its
    workers): keep derived data (loaded files, built models) in :meth:`cached`, which pickling
    leaves out and each process rebuilds on first use. One call at a time per task object.
    """

    #: registry name of a built-in task ("digits"), empty for user tasks
    name: ClassVar[str] = ""
    #: hyperparameter overrides by parameter name pattern, first match wins
    param_groups: tuple[ParamGroupRule, ...] = ()
    #: globs on the names of the parameters whose gradients :meth:`loss_and_grad` gives as
    #: RowSparseGrad (the others' are dense): a job file's check refuses an optimizer that
    #: cannot take them (Adam takes no row-sparse gradient, SparseAdam no dense one) before
    #: anything starts, instead of at the first step
    sparse_gradients: tuple[str, ...] = ()
    #: the constructor arguments that name files or directories (a data file, say): a relative
    #: one in a job file is resolved against the job file's directory, like its run_dir
    path_arguments: tuple[str, ...] = ()

    # -- what a task implements ----------------------------------------------------------

    @property
    @abstractmethod
    def train_size(self) -> int:
        """Number of training examples (positions 0 .. train_size - 1)."""

    @abstractmethod
    def init_params(self, seed: int) -> dict[str, np.ndarray]:
        """Fresh named parameters, a deterministic function of ``seed``."""

    @abstractmethod
    def examples(self, seed: int, epoch: int, positions: np.ndarray) -> dict[str, np.ndarray]:
        """The arrays of the training examples at ``positions`` (int64, any order, may be empty),
        leading dimension ``len(positions)``; a function of (seed, epoch, position) only."""

    @abstractmethod
    def loss_and_grad(self, params: Mapping[str, np.ndarray], batch: Batch) -> tuple[float, dict[str, Grad]]:
        """The summable loss of ``batch`` (sum over its examples / ``batch.global_size``) and its
        gradient: one entry per parameter, an ndarray of the parameter's shape and dtype or a
        :class:`~shardstep.workers.optim.RowSparseGrad`. An empty batch gives 0.0 and zero gradients."""

    @abstractmethod
    def evaluate(self, params: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Metrics of ``params`` on the task's held-out data."""

    # -- provided --------------------------------------------------------------------------

    def prepare(self) -> None:
        """Read and check what the task reads from storage (its data files), once, in the
        process that checks or starts the job, so a bad file fails there, before any actor
        starts. A task that keeps what it read in its own attributes (not in :meth:`cached`)
        ships it to the actors with itself. This default does nothing."""

    def serve(self) -> None:
        """Start what serves the task's data on the running Ray cluster, once, in the process
        that starts the run, before any shard or worker (Ray Data's row servers for
        ``[data] ray_data``). This default does nothing."""

    def stop_serving(self) -> None:
        """Stop what :meth:`serve` started (the run is over). This default does nothing."""

    #: whether :meth:`prefetch` does something: a gradient worker then names the positions of
    #: its coming batches a step before it needs them
    prefetches: bool = False
    #: how many coming batches a gradient worker names to :meth:`prefetch` at a time
    prefetch_batches: int = 16

    def prefetch(self, seed: int, batches: Sequence[tuple[int, np.ndarray]]) -> None:
        """The ``(epoch, positions)`` that :meth:`examples` will be asked for next, in order:
        a task that fetches its data from elsewhere starts fetching them. This default does
        nothing."""

    def metric_names(self) -> tuple[str, ...] | None:
        """The keys :meth:`evaluate` returns, when the task knows them without evaluating
        (the job check then need not evaluate); None: not known."""
        return None

    # -- model state that is not trained (BatchNorm's running statistics) ---------------
    #
    # The coordinator holds these buffers, moves them once per closure evaluation from the
    # statistics every gradient worker's pieces of the global batch report, saves them in
    # each checkpoint and hands them to the evaluating worker. A task without buffers (every
    # default below) costs nothing.

    def init_buffers(self, seed: int) -> dict[str, np.ndarray]:
        """The model's buffers at the start of training, by name (default: none)."""
        return {}

    def take_batch_statistics(self) -> dict[str, list]:
        """What the training forwards since the last call measured for the buffers, by layer,
        one entry per forward in call order (default: nothing); the gradient worker sends it
        with the loss."""
        return {}

    def advance_buffers(self, buffers: Mapping[str, np.ndarray],
                        reports: Sequence[Mapping[str, list]]) -> dict[str, np.ndarray]:
        """The buffers after one global batch, from the workers' reports in rank order
        (default: unchanged)."""
        return dict(buffers)

    def set_buffers(self, buffers: Mapping[str, np.ndarray]) -> None:
        """Use ``buffers`` in the evaluations that follow (default: a task has none)."""
        if buffers:
            raise ValueError(f"{type(self).__name__} has no buffers; got {sorted(buffers)}")

    def without_data(self) -> Task:
        """The task for a process that only initializes parameters (a shard): itself, or a copy
        that leaves behind the data :meth:`prepare` read, which such a process never uses."""
        return self

    def param_specs(self) -> tuple[ParamSpec, ...]:
        """Name, shape and dtype of every parameter :meth:`init_params` gives, in its order.

        The coordinator plans the shards from these alone and each shard initializes its own
        rows, so the coordinator never holds the model. This default builds ``init_params(0)``
        once to read them; a task with a large model overrides it with the shapes it knows."""
        return tuple(ParamSpec(name, tuple(array.shape), np.dtype(array.dtype).name)
                     for name, array in self.init_params(0).items())

    def num_batches(self, batch_size: int) -> int:
        """Global batches per epoch: ceil(train_size / batch_size)."""
        batch_size = check_int("batch_size", batch_size, 1)
        return -(-self.train_size // batch_size)

    def batch(self, seed: int, epoch: int, index: int, batch_size: int, rank: int = 0,
              world_size: int = 1) -> Batch:
        """Rank ``rank``'s shard of global batch ``index`` of ``epoch`` (the module's rule)."""
        seed = check_int("seed", seed, 0)
        epoch = check_int("epoch", epoch, 0)
        world_size = check_int("world_size", world_size, 1)
        rank = check_int("rank", rank, 0, world_size - 1)
        count = self.num_batches(batch_size)
        index = check_int("batch index", index, 0, count - 1)
        return self.batch_in_order(seed, epoch, index, batch_size, rank, world_size,
                           epoch_order(seed, epoch, self.train_size))

    def batches(self, seed: int, epoch: int, batch_size: int, rank: int = 0,
                world_size: int = 1) -> Iterator[Batch]:
        """Rank ``rank``'s shard of every global batch of ``epoch``, in order (arguments are
        checked here, before the first batch is asked for)."""
        seed = check_int("seed", seed, 0)
        epoch = check_int("epoch", epoch, 0)
        world_size = check_int("world_size", world_size, 1)
        rank = check_int("rank", rank, 0, world_size - 1)
        count = self.num_batches(batch_size)
        order = epoch_order(seed, epoch, self.train_size)
        return (self.batch_in_order(seed, epoch, index, batch_size, rank, world_size, order) for index in range(count))

    def batch_in_order(self, seed: int, epoch: int, index: int, batch_size: int, rank: int,
                       world_size: int, order: np.ndarray) -> Batch:
        """:meth:`batch` with the epoch's example order given (``epoch_order(seed, epoch,
        train_size)``, which a gradient worker computes once per epoch) and the arguments
        taken as checked."""
        members = order[index * batch_size:(index + 1) * batch_size]
        positions = shard_positions(order, index, batch_size, rank, world_size)
        data = self.examples(seed, epoch, positions)
        if not isinstance(data, Mapping):
            raise TypeError(f"{type(self).__name__}.examples must return a dict of arrays; got {type(data).__name__}")
        for key, array in data.items():
            if not isinstance(array, np.ndarray) or array.ndim < 1 or array.shape[0] != positions.size:
                shape = getattr(array, "shape", type(array).__name__)
                raise ValueError(
                    f"{type(self).__name__}.examples returned {key!r} with shape {shape}; every "
                    f"array needs leading dimension {positions.size} (one row per example)"
                )
        return Batch(seed=seed, epoch=epoch, index=index, rank=rank, world_size=world_size,
                     examples=positions, global_size=int(members.size), data=dict(data),
                     offset=shard_bounds(int(members.size), rank, world_size)[0])

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        """``build()`` once per process and task object; left out of pickles."""
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_cache", None)
        return state


# ---------------------------------------------------------------------------------------
# the one reduction of data-parallel training


def combine_partials(partials: Sequence[tuple[float, Mapping[str, Grad]]]) -> tuple[float, dict[str, Grad]]:
    """Add the summable losses and gradients of the ranks, in rank order.

    Dense gradients are added elementwise ((g0 + g1) + g2 ...); row-sparse gradients are
    concatenated (repeated rows add up when applied, as in an uncoalesced torch sparse tensor).
    """
    if not partials:
        raise ValueError("combine_partials needs at least one (loss, grads) partial")
    names = list(partials[0][1])
    loss = 0.0
    total: dict[str, Grad] = {}
    for rank, (part_loss, grads) in enumerate(partials):
        if list(grads) != names:
            raise ValueError(
                f"rank {rank} returned gradients for {sorted(grads)}; rank 0 for {sorted(names)}"
            )
        loss += float(part_loss)
        for name in names:
            grad = grads[name]
            if rank == 0:
                total[name] = grad if isinstance(grad, RowSparseGrad) else np.array(grad, copy=True)
                continue
            current = total[name]
            if isinstance(current, RowSparseGrad) != isinstance(grad, RowSparseGrad):
                raise TypeError(f"gradient {name!r} is row-sparse on some ranks and dense on others")
            if isinstance(grad, RowSparseGrad):
                total[name] = RowSparseGrad(np.concatenate([current.indices, grad.indices]),
                                            np.concatenate([current.values, grad.values]), current.shape)
            else:
                current += grad
    return loss, total
