"""The shard actor: whole rows of every parameter, their optimizer state and their gradient.

Shard ``s`` of ``N`` owns rows ``layout.row_range(name, s)`` of every parameter (the rule of
:mod:`shardstep.checkpoints.layout`) as flat 1-D slices, and the optimizer state of exactly those
elements. It applies the same :class:`~shardstep.workers.optim.rule.Rule` the torch-style optimizer
applies to whole parameters; elementwise rules give the same bits slice by slice, so a
sharded run equals a single-process one.

One step, as the coordinator drives it::

    get_params()              -> packed slices        gathered by every gradient worker
    reduce(partial_0, ..., partial_{W-1})             gradient slices of the W workers, added
                              -> report               in rank order (the fixed reduction order)
    apply(hyperparameters, clip_scale)                the rule on every slice
                              -> packed slices        the next step's parameters

or ``reduce_apply(hyperparameters, partial_0, ...)``, both in one call, when the coordinator
has nothing to decide between them.

With the shared-memory transport (:mod:`shardstep.workers.shared_memory`) the slices are views of
the coordinator's parameter region, the workers' dense gradients are read from their
gradient regions, and ``get_params``/``apply`` return None: their results only order the
next step's calls.

The same class runs as a Ray actor (``ray.remote(ShardActor)``) and as a plain object in the
inline backend; nothing here knows which.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from shardstep.checkpoints import AsyncSaver, PendingCheckpoint, RunCheckpoint, ShardLayout, write_shard
from shardstep.checkpoints.model_files import ModelFile
from shardstep.workers.optim import Parameter, RowSparseGrad, optimizer_class
from shardstep.workers.optim.algorithms.lbfgs import LocalSlices
from shardstep.workers.optim.optimizer import apply_rule
from shardstep.workers.optim.rule import using_default_dtype
from shardstep.workers.runtime import check_run_dir_visible, limit_threads, node_id
from shardstep.workers.shared_memory import SharedGrad, SharedTransport


@functools.lru_cache(maxsize=256)  # a pure function of (layout, shard): computed once, not every step
def packed_places(layout: ShardLayout, shard: int) -> tuple[dict[str, tuple[str, int, int]], dict[str, int]]:
    """Where each parameter's slice lies in shard ``shard``'s packed buffers: ``{name: (dtype,
    start, stop)}``, and each buffer's length ``{dtype: size}``; parameters in table order."""
    places: dict[str, tuple[str, int, int]] = {}
    sizes: dict[str, int] = {}
    for spec in layout.params:
        start, stop = layout.slice(spec.name, shard)
        at = sizes.get(spec.dtype, 0)
        places[spec.name] = (spec.dtype, at, at + stop - start)
        sizes[spec.dtype] = at + stop - start
    return places, sizes


def unpack(layout: ShardLayout, packed: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Whole parameters from every shard's packed buffers (shard order): read-only, a view
    when there is one shard, one concatenation otherwise."""
    places = [packed_places(layout, shard)[0] for shard in range(layout.num_shards)]
    params = {}
    for spec in layout.params:
        pieces = []
        for shard, buffers in enumerate(packed):
            dtype, start, stop = places[shard][spec.name]
            pieces.append(buffers[dtype][start:stop])
        flat = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        array = flat.reshape(spec.shape)
        if array.flags.writeable:
            array = array.view()
            array.flags.writeable = False
        params[spec.name] = array
    return params


def own_rows(task: Any, seed: int, layout: ShardLayout, shard: int, skip: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Shard ``shard``'s 1-D slices of the task's initial parameters for ``seed`` (all but
    ``skip``): the same bits as slicing the whole model, which exists only here, only
    while this runs. A parameter that is not what the layout says is an error naming it."""
    owner = type(task).__name__
    initial = task.init_params(seed)
    wanted = {spec.name: spec for spec in layout.params}
    if not isinstance(initial, Mapping) or set(initial) != set(wanted):
        got = sorted(initial) if isinstance(initial, Mapping) else type(initial).__name__
        raise ValueError(f"{owner}.init_params({seed}) gives {got}; its param_specs() name {sorted(wanted)}")
    rows = {}
    for name, spec in wanted.items():
        if name in skip:
            continue
        array = initial[name]
        if not isinstance(array, np.ndarray) or array.shape != spec.shape or array.dtype != np.dtype(spec.dtype):
            raise ValueError(f"{owner}.init_params({seed}) gives {name!r} as {getattr(array, 'dtype', type(array))} "
                             f"{getattr(array, 'shape', '')}; its param_specs() say {spec.dtype} {spec.shape}")
        start, stop = layout.slice(name, shard)
        rows[name] = array.reshape(-1)[start:stop]  # copied into the shard's buffer
    return rows


# state keys of LBFGS's vectors, cut into per-parameter pieces for the checkpoint
LBFGS_PREFIX = "lbfgs."


class ShardActor:
    """Shard ``shard`` of ``layout``: parameter slices, optimizer state, gradient buffer.

    optimizer: a registry name; groups: ``[{"params": [names], ...}]`` (hyperparameters are
    sent with every :meth:`apply`, so scheduler changes reach the shard with the next step).
    A parameter that no group lists is frozen (torch's ``requires_grad=False``): its gradient
    pieces are neither added nor applied, and it has no optimizer state.
    params: this shard's 1-D slice of every parameter (copied). state: its optimizer state,
    as :meth:`state_slices` returns it (e.g. from a checkpoint's ``load_shard``), or None.
    checkpoint: a committed checkpoint directory of this run to read both from instead.
    init: ``{"task": task, "seed": seed}``: a fresh start, where the shard takes its rows of
    ``task.init_params(seed)`` itself (the coordinator never builds the model).
    source: a fine-tuning run's first start, ``{"checkpoint": directory, "params": [names],
    "state": [names], "model_file": bool}``: those parameters (and those parameters'
    optimizer state) are read from another run's checkpoint, or from a model file
    (``model_file``: parameters only), ``params`` or ``init`` give the rest.
    shared: the run's shared-memory regions; the slices then live in the parameter region.
    run_dir: ``{"run_dir": path, "run_id": id}``: the run directory this shard writes its
    checkpoint files into, checked to be the coordinator's (storage every node shares).
    scalar_dtype: the dtype new state's step counters and scalar factors take ("float32", or
    "float64" as torch under its float64 default dtype); loaded state keeps its own.
    """

    def __init__(self, shard: int, layout: ShardLayout, optimizer: str, groups: Sequence[Mapping[str, Any]],
                 params: Mapping[str, np.ndarray] | None, state: Mapping[str, Mapping[str, Any]] | None = None,
                 threads: int | None = None, checkpoint: str | None = None,
                 source: Mapping[str, Any] | None = None, shared: SharedTransport | None = None,
                 init: Mapping[str, Any] | None = None, run_dir: Mapping[str, Any] | None = None,
                 scalar_dtype: str = "float32"):
        if threads is not None:
            limit_threads(threads)
        if run_dir is not None:
            check_run_dir_visible(run_dir["run_dir"], run_dir["run_id"], f"shard {shard}")
        if init is not None:
            params = own_rows(init["task"], init["seed"], layout, shard,
                              skip=() if source is None else source["params"])
        if checkpoint is not None:
            # every shard reads its own rows of the committed files (any earlier shard count)
            with RunCheckpoint(checkpoint) as committed:
                loaded = committed.load_shard(shard, layout.num_shards)
            params, state = loaded["params"], loaded["state"]
        if source is not None and source.get("model_file"):
            # a model file: this shard's range of each kept parameter, read from the file alone
            with ModelFile(source["checkpoint"]) as weights:
                read = {name: weights.read(name, *layout.slice(name, shard)) for name in source["params"]}
            params, state = {**(params or {}), **read}, {}
        elif source is not None:
            # a parameter's rows depend only on its shape and the shard count, so the source's
            # slices of a kept parameter are this run's, whatever else differs between the models
            with RunCheckpoint(source["checkpoint"]) as committed:
                loaded = committed.load_shard(shard, layout.num_shards)
            params = {**(params or {}), **{name: loaded["params"][name] for name in source["params"]}}
            state = {name: loaded["state"][name] for name in source["state"]}
        self.shard = shard
        self.layout = layout
        # the dtype of the state's step counters and scalar factors (training.scalar_dtype)
        self.scalar_dtype = scalar_dtype
        self.rule = optimizer_class(optimizer).rule
        self.owner = optimizer_class(optimizer).__name__   # what errors call the optimizer: "Adam"
        self.group_of: dict[str, int] = {}
        for index, group in enumerate(groups):
            for name in group["params"]:
                self.group_of[name] = index
        # the slices live in one flat buffer per dtype (table order): sending the parameters
        # is one array, not one per parameter; with shared memory they are the rows this
        # shard owns in the run's parameter region, and nothing is sent
        places, sizes = packed_places(layout, shard)
        if shared is None:
            self.buffers: dict[str, np.ndarray] | None = {dtype: np.empty(size, dtype)
                                                          for dtype, size in sizes.items()}
            self.worker_grads: list[dict[str, np.ndarray]] = []
        else:
            self.buffers = None
            region = shared.param_arrays()
            self.worker_grads = [shared.grad_arrays(rank) for rank in range(len(shared.grads))]
        self.params: dict[str, Parameter] = {}
        self.rows: dict[str, tuple[int, int]] = {}
        for spec in layout.params:
            dtype, start, stop = places[spec.name]
            given = np.asarray(params[spec.name])
            if given.shape != (stop - start,):
                raise ValueError(f"shard {shard}: slice of {spec.name!r} has shape {given.shape}; "
                                 f"the layout gives it {stop - start} elements")
            if shared is None:
                view = self.buffers[dtype][start:stop]
            else:
                view = region[spec.name][slice(*layout.slice(spec.name, shard))]
            view[...] = given
            self.params[spec.name] = Parameter(view, name=spec.name)
            self.rows[spec.name] = layout.row_range(spec.name, shard)
        # the parameters this shard trains, in table order; the others are frozen
        self.trainable = [name for name in self.params if name in self.group_of]
        self.state: dict[str, dict[str, Any]] = {name: {} for name in self.params}
        self.grads: dict[str, np.ndarray | RowSparseGrad | None] = {name: None for name in self.params}
        self.saver = AsyncSaver()
        self.saving_step: int | None = None
        self.space: LocalSlices | None = None
        if state:
            vectors = {}
            for name, entries in state.items():
                for key, value in entries.items():
                    if key.startswith(LBFGS_PREFIX):
                        vectors.setdefault(key, {})[name] = value
                    else:
                        self.state[name][key] = np.array(value, copy=True) if isinstance(value, np.ndarray) else value
            if vectors:
                self._load_vectors(vectors)

    # -- the step ----------------------------------------------------------------------------

    def ping(self) -> tuple[int, int, str | None]:
        """(shard, process id, Ray node id): proves the actor is up and says where it runs."""
        return self.shard, os.getpid(), node_id()

    def get_params(self) -> dict[str, np.ndarray] | None:
        """This shard's packed slices: one flat array per dtype (see :func:`packed_places`);
        None with shared memory, where the workers read the parameter region."""
        return self.buffers

    def reduce(self, *partials: Mapping[str, Any], norm: bool = False) -> dict[str, Any]:
        """Add the workers' gradient slices in rank order into this shard's gradient.

        Dense slices add elementwise, ``(g_0 + g_1) + g_2 ...`` (as
        :func:`~shardstep.workers.tasks.combine_partials`); row-sparse ones concatenate in rank order
        (repeated rows add up when applied). Returns ``{"nonfinite": [names], "sumsq":
        partial squared norm or None}``: the coordinator adds the shards' partials for
        global-norm clipping and the gradient norm it logs. A dense slice's square is the dot
        product the finiteness check takes anyway; a row-sparse one's needs its rows
        coalesced, so it is counted only for clipping (``norm``), else ``sumsq`` is None.
        Frozen parameters' pieces are ignored: they
        are not checked, not counted in the norm and not applied, as in torch, where a frozen
        parameter has no gradient."""
        nonfinite: list[str] = []
        sumsq: float | None = 0.0
        for name in self.trainable:
            grads = [partial[name] for partial in partials]
            shared = any(isinstance(grad, SharedGrad) for grad in grads)
            if shared:
                # this shard's rows of each worker's gradient, in the workers' shared regions
                rows = slice(*self.layout.slice(name, self.shard))
                grads = [self.worker_grads[rank][name][rows] for rank in range(len(grads))]
            total: Any = grads[0]
            if isinstance(total, RowSparseGrad):
                for grad in grads[1:]:
                    total = RowSparseGrad(np.concatenate([total.indices, grad.indices]),
                                          np.concatenate([total.values, grad.values]), total.shape)
            elif len(grads) == 1:
                # a worker's region rows are the gradient as they are (nothing writes them
                # before the next step); an object-store piece is read-only: copied
                total = total if shared else np.array(total, copy=True)
            else:
                # the first two in one pass (the same float additions as a copy and +=); the sum
                # lives until apply, so between steps a shard holds no gradient (as torch's
                # zero_grad(set_to_none=True))
                total = np.add(grads[0], grads[1])
                for grad in grads[2:]:
                    total += grad
            self.grads[name] = total
            values = total.values.reshape(-1) if isinstance(total, RowSparseGrad) else total
            if values.size:
                # a dot product is one fast pass; only when it is not finite do we look closer
                # (a huge but finite gradient can overflow the square)
                square = float(np.dot(values, values))
                if not math.isfinite(square) and not np.isfinite(values).all():
                    nonfinite.append(name)
                elif isinstance(total, RowSparseGrad):
                    if norm:
                        sumsq += float(np.dot(*(2 * [total.coalesce().values.reshape(-1)])))
                    else:
                        sumsq = None
                elif sumsq is not None:
                    sumsq += square
        return {"nonfinite": nonfinite, "sumsq": sumsq}

    def apply(self, hyperparameters: Sequence[Mapping[str, Any]],
              clip_scale: float | None = None) -> dict[str, np.ndarray] | None:
        """One optimizer step on every slice with its group's hyperparameters; gradients
        are multiplied by ``clip_scale`` first when given (global-norm clipping). Returns the
        updated packed slices, which the next step's workers read (no separate fetch), or
        None with shared memory (the slices were updated in place there)."""
        # state created here takes the run's scalar dtype, not the process's (inline: the driver's)
        with using_default_dtype(self.scalar_dtype):
            for name, p in self.params.items():
                grad = self.grads[name]
                if grad is None:
                    continue
                first, stop = self.rows[name]
                apply_rule(self.rule, self.owner, repr(name), p.data, grad, self.state[name],
                           hyperparameters[self.group_of[name]], rows=stop - first, scale=clip_scale)
                self.grads[name] = None
        return self.buffers

    def reduce_apply(self, hyperparameters: Sequence[Mapping[str, Any]],
                     *partials: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
        """:meth:`reduce` then :meth:`apply` in one call, for steps that need no decision of
        the coordinator between them (no clipping, and non-finite values stop the run): the
        update is applied unless this shard's own gradients are not finite. Returns (the
        report, what :meth:`apply` returns)."""
        report = self.reduce(*partials)
        if report["nonfinite"]:
            self.discard_grads()
            return report, self.buffers
        return report, self.apply(hyperparameters)

    def discard_grads(self) -> None:
        """Drop the reduced gradient (a skipped step)."""
        for name in self.grads:
            self.grads[name] = None

    # -- LBFGS: the shard's slices of every vector ------------------------------------------

    def _space(self) -> LocalSlices:
        if self.space is None:
            dtypes = {p.dtype for p in self.params.values()}
            pieces = [(p, 0, p.size) for p in self.params.values()]
            self.space = LocalSlices([pieces], dtypes.pop())
        return self.space

    def lbfgs(self, method: str, *args: Any) -> Any:
        """Run one :class:`~shardstep.workers.optim.algorithms.lbfgs.VectorSpace` operation on this
        shard's slices (one slice: its pieces of every parameter, in table order)."""
        self._space()
        if method == "gather_grad":
            for name, p in self.params.items():
                grad = self.grads[name]
                p.grad = grad.to_dense().reshape(-1) if isinstance(grad, RowSparseGrad) else grad
        return getattr(self.space, method)(*args)

    # -- checkpoints ---------------------------------------------------------------------------

    def state_slices(self) -> dict[str, dict[str, Any]]:
        """The optimizer state of this shard, by parameter name (non-empty entries). LBFGS's
        vectors are cut into per-parameter pieces: ``lbfgs.d``, ``lbfgs.prev_g`` and the
        history pairs ``lbfgs.s.<i>`` / ``lbfgs.y.<i>`` (oldest first)."""
        if self.space is not None:
            return self._vector_state()
        return {name: dict(entries) for name, entries in self.state.items() if entries}

    def _vector_state(self) -> dict[str, dict[str, Any]]:
        space = self.space
        vectors: list[tuple[str, Any]] = [(f"{LBFGS_PREFIX}{v}", v) for v in ("d", "prev_g") if v in space]
        for i in range(space.history_len()):
            vectors += [(f"{LBFGS_PREFIX}s.{i}", ("s", i)), (f"{LBFGS_PREFIX}y.{i}", ("y", i))]
        state: dict[str, dict[str, Any]] = {name: {} for name in self.params}
        for key, vector in vectors:
            whole = space.export(vector)
            offset = 0
            for name, p in self.params.items():
                state[name][key] = whole[offset:offset + p.size]
                offset += p.size
        return {name: entries for name, entries in state.items() if entries}

    def _load_vectors(self, vectors: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        space = self._space()
        def whole(key: str) -> np.ndarray:
            return np.concatenate([np.asarray(vectors[key][name]).reshape(-1) for name in self.params])
        for name in ("d", "prev_g"):
            if f"{LBFGS_PREFIX}{name}" in vectors:
                space.load(name, whole(f"{LBFGS_PREFIX}{name}"))
        i = 0
        while f"{LBFGS_PREFIX}s.{i}" in vectors:
            space.load("s", whole(f"{LBFGS_PREFIX}s.{i}"))
            space.load("y", whole(f"{LBFGS_PREFIX}y.{i}"))
            space.push_history("s", "y")
            i += 1

    def save(self, pending: PendingCheckpoint, wait: bool = False) -> None:
        """Write this shard's file of ``pending``: staged now, written in the background
        (reported by :meth:`saved`), or before returning when ``wait``."""
        params = {name: p.data for name, p in self.params.items()}
        bad = [name for name, array in params.items() if not np.isfinite(array).all()]
        bad += [f"{name} ({key})" for name, entries in self.state.items() for key, value in entries.items()
                if isinstance(value, np.ndarray) and np.issubdtype(value.dtype, np.floating)
                and not np.isfinite(value).all()]
        if bad:
            raise FloatingPointError(f"shard {self.shard}: refusing to checkpoint step {pending.step}: "
                                     f"non-finite values in {', '.join(bad)}")
        if wait:
            self.saver.wait()
            write_shard(pending, self.shard, params, self.state_slices())
            self.saving_step = None
            return
        self.saver.write_shard(pending, self.shard, params, self.state_slices())
        self.saving_step = pending.step

    def saved(self, wait: bool = False) -> int | None:
        """The step of the background save if it is finished (raising if it failed), else
        None; with ``wait`` block until it is."""
        if self.saving_step is None or (self.saver.busy and not wait):
            return None
        step, self.saving_step = self.saving_step, None
        self.saver.wait()
        return step

    def close(self) -> None:
        self.saver.close()
