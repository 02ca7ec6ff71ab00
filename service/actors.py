"""The actors of one (re)start: where they are placed, how they exchange data, waiting for
them, and stopping them.

At every start the coordinator builds a fresh :class:`ActorGroup`:

- **transport** (:func:`choose_transport`): shared memory only when every actor is pinned
  to the coordinator's node; the object store otherwise. ``auto`` pins the actors to this
  node when the cluster is this node alone and the job asks for no placement of its own,
  so a node that joins later never receives an actor that cannot map the regions.
- **placement**: ``[resources] placement`` puts every actor in one Ray placement group with
  that strategy; ``shard_resources``/``worker_resources`` add custom resources and
  ``shard_labels``/``worker_labels`` select nodes by label. Nodes that were lost during the
  run are kept out of every later placement (Ray lists a dead node as alive until its
  health checks time out, and would place new actors there).
- **waiting**: the actors are waited for with bounded waits; while some cannot start the
  run says what they need against what the cluster has free, and after ``start_timeout``
  seconds the start fails with that message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shardstep.checkpoints import ShardLayout
from shardstep.service.backend import ActorSpec, Placement
from shardstep.service.errors import UnsuitableClusterError
from shardstep.workers import shared_memory
from shardstep.workers.gradient_worker import GradientWorker
from shardstep.workers.shard import ShardActor


def user_placement(spec: Any) -> bool:
    """Whether the job says where its actors go (then ``auto`` does not pin them here)."""
    return bool(spec.placement or spec.shard_resources or spec.worker_resources or spec.shard_labels
                or spec.worker_labels)


def choose_transport(spec: Any, backend: Any, first: bool = False) -> str:
    """How this (re)start's actors exchange parameters and gradients: ``inline`` (no
    actors), ``shared_memory`` (every actor pinned to the coordinator's node) or
    ``object_store``. An explicit ``shared_memory`` the cluster cannot give at the ``first``
    start is an :class:`UnsuitableClusterError` (checked before the run directory is
    touched)."""
    if backend.name != "ray":
        return "inline"
    wanted = spec.transport
    if wanted == "object_store":
        return wanted
    possible = shared_memory.available() and not backend.client
    if wanted == "shared_memory":
        if not possible:
            why = ("the coordinator reaches the cluster through Ray Client, so it runs on another machine than the "
                   "actors" if backend.client else "this platform has no memfd_create and /proc")
            raise UnsuitableClusterError(f"resources.transport = 'shared_memory' needs every actor on the "
                                         f"coordinator's node, but {why}; use 'auto' or 'object_store'")
        if first and not backend.on_one_node():
            raise UnsuitableClusterError(
                f"resources.transport = 'shared_memory' needs every actor on the coordinator's node, but the Ray "
                f"cluster has {backend.node_count()} nodes, where actors may be placed anywhere; use 'auto' (shared "
                f"memory when the cluster is one node) or 'object_store'")
        # at a restart the actors are pinned to this node, whatever joined the cluster since
        return wanted
    return "shared_memory" if possible and not user_placement(spec) and backend.on_one_node() else "object_store"


@dataclass(frozen=True)
class StartPlan:
    """What the actors of one start are built from (besides the job's resources)."""

    layout: ShardLayout
    optimizer: str
    groups: list[dict]
    task: Any
    seed: int
    batch_size: int
    accumulate: int
    workers: int
    frozen: list[str]
    checkpoint: str | None      # a committed step directory to read from, or None: a fresh start
    init: Any                   # a fine-tuning run's InitPlan on its first start, else None
    run_dir: str
    run_id: str | None
    lost_nodes: frozenset[str]
    # what Ray's dashboard calls the actors: "<run_name>/shard-0", "<run_name>/worker-1" (a
    # restart adds "/restart-<k>": a dead actor's name is freed only once Ray has noticed),
    # in the run's own Ray namespace
    run_name: str = "run"
    namespace: str | None = None
    attempt: int = 0


class ActorGroup:
    """The shard and worker actors of one start, where they run, and the shared-memory
    regions they map (None with the object store)."""

    def __init__(self, backend: Any, shards: list[Any], workers: list[Any], transport: str,
                 shared: shared_memory.SharedMemory | None, handle: Any):
        self.backend = backend
        self.shards = shards
        self.workers = workers
        self.transport = transport
        self.shared = shared
        self._handle = handle  # the backend's record of the start (its placement group)
        self.pids: list[tuple[int, int]] = []
        # the Ray node of every shard, then of every worker (None inline), and all of them
        self.placed: list[str | None] = []
        self.nodes: set[str] = set()

    @classmethod
    def start(cls, backend: Any, spec: Any, plan: StartPlan, on_wait: Callable[[str], Any]) -> ActorGroup:
        transport = choose_transport(spec, backend)
        # fresh regions at every start: an actor killed during a recovery may still be
        # writing into the old ones
        shared = shared_memory.SharedMemory(plan.layout, plan.workers) if transport == "shared_memory" else None
        regions = None if shared is None else shared.transport
        specs = _actor_specs(spec, plan, regions, threads=spec.backend == "ray")
        pin = backend.this_node() if transport == "shared_memory" else None
        try:
            handles, handle = backend.start_all(specs, strategy=spec.placement, pin=pin, avoid=plan.lost_nodes,
                                                namespace=plan.namespace)
        except BaseException:
            if shared is not None:
                shared.close()
            raise
        group = cls(backend, handles[:spec.shards], handles[spec.shards:], transport, shared, handle)
        try:
            answers = backend.wait_started(handles, specs, handle, timeout=spec.start_timeout, on_wait=on_wait)
        except BaseException:
            group.stop()
            raise
        group.pids = [(index, pid) for index, pid, _ in answers]
        group.placed = [node for _, _, node in answers]
        group.nodes = {node for node in group.placed if node is not None}
        return group

    def stop(self) -> None:
        for actor in self.shards + self.workers:
            self.backend.kill(actor)
        self.shards, self.workers = [], []
        self.backend.release(self._handle)
        self._handle = None
        if self.shared is not None:
            # the memory itself goes when the last actor that mapped it exits
            self.shared.close()
            self.shared = None


def _actor_specs(spec: Any, plan: StartPlan, regions: Any, threads: bool) -> list[ActorSpec]:
    layout = plan.layout
    shard_threads = max(1, int(spec.shard_cpus)) if threads else None
    worker_threads = max(1, int(spec.worker_cpus)) if threads else None
    shard_placement = Placement(spec.shard_cpus, dict(spec.shard_resources), dict(spec.shard_labels))
    worker_placement = Placement(spec.worker_cpus, dict(spec.worker_resources), dict(spec.worker_labels))
    # a fine-tuning run's first start: the shards read the kept parameters themselves
    source = None
    if plan.init is not None:
        source = {"checkpoint": plan.init.checkpoint, "params": list(plan.init.loaded),
                  "state": list(plan.init.state), "model_file": plan.init.model_file}
    visible = {"run_dir": plan.run_dir, "run_id": plan.run_id}
    again = f"/restart-{plan.attempt}" if plan.attempt else ""
    specs = []
    for shard in range(spec.shards):
        kwargs: dict[str, Any] = {"threads": shard_threads, "shared": regions, "run_dir": visible,
                                  "scalar_dtype": spec.scalar_dtype}
        if plan.checkpoint is not None:
            kwargs["checkpoint"] = plan.checkpoint
        else:
            kwargs.update(init={"task": plan.task.without_data(), "seed": plan.seed}, source=source)
        specs.append(ActorSpec(ShardActor, (shard, layout, plan.optimizer, plan.groups, None), kwargs,
                               shard_placement, f"shard {shard}", f"{plan.run_name}/shard-{shard}{again}"))
    for rank in range(plan.workers):
        kwargs = {"threads": worker_threads, "shared": regions, "frozen": plan.frozen, "accumulate": plan.accumulate}
        specs.append(ActorSpec(GradientWorker, (plan.task, rank, plan.workers, plan.seed, plan.batch_size, layout),
                               kwargs, worker_placement, f"gradient worker {rank}",
                               f"{plan.run_name}/worker-{rank}{again}"))
    return specs


def describe_resources(resources: Mapping[str, float]) -> str:
    """``{"CPU": 2, "accel": 1}`` as ``2 CPU, 1 accel``; nothing as ``no resources``."""
    parts = [f"{_number(amount)} {name}" for name, amount in resources.items() if amount]
    return ", ".join(parts) or "no resources"


def _number(value: float) -> str:
    return f"{value:g}"


def pending_message(pending: Sequence[ActorSpec], total: Mapping[str, float], free: Mapping[str, float],
                    strategy: str | None) -> str:
    """What the actors that have not started need against what the cluster has: the
    message of a start that is waiting (and of its timeout)."""
    need: dict[str, float] = {}
    for actor in pending:
        for name, amount in actor.placement.demand().items():
            need[name] = need.get(name, 0.0) + amount
    names = ", ".join(actor.label for actor in pending)
    short = {name: amount for name, amount in need.items() if amount > free.get(name, 0.0) + 1e-9}
    labels = sorted({f"{k}={v}" for actor in pending for k, v in actor.placement.labels.items()})
    where = f" on nodes with {', '.join(labels)}" if labels else ""
    group = f" in one placement group ({strategy})" if strategy else ""
    if short:
        have = "; ".join(f"the cluster has {_number(free.get(name, 0.0))} of {_number(total.get(name, 0.0))} "
                         f"{name} free" for name in short)
        return (f"waiting for resources: {names} need {describe_resources(need)}{where}{group}; {have}")
    return (f"waiting for {names} to start (they need {describe_resources(need)}{where}{group}, which the cluster "
            f"has free: their processes are starting, or no node has it all in one place)")
