"""Where the actors run: ``ray`` (actors in their own processes, on a local instance or a
cluster) or ``inline`` (plain objects in this process, for debugging and fast tests).

Both backends create the same classes (:class:`~shardstep.workers.shard.ShardActor`,
:class:`~shardstep.workers.gradient_worker.GradientWorker`) and offer one interface: ``call`` submits
a method call and returns futures at once (Ray's object refs, or already-computed inline
results), futures may be passed as arguments of later calls, and ``get`` waits. Calls to
one actor run in the order they were made, so the coordinator submits a whole step before
it waits once.

Starting: :meth:`start_all` creates a start's actors together (in one placement group when
the job names a strategy) and :meth:`wait_started` waits for them with bounded waits, saying
what they need while the cluster cannot place them, up to a time limit.

Errors: an actor that died (its process was killed, its node lost) becomes
:class:`ActorLostError`; an exception raised inside a method becomes :class:`ActorCallError`
carrying the original message. The coordinator recovers from the first, never the second.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from shardstep.service.errors import ActorCallError, ActorLostError, StartTimeoutError
from shardstep.workers.runtime import thread_environment

# a start that is waiting says so after this long, then whenever what it waits for changes
# (and at least every REPEAT_SECONDS)
FIRST_REPORT_SECONDS = 5.0
REPEAT_SECONDS = 30.0
# a raylet that does not accept a connection within this long is taken as lost
PROBE_SECONDS = 1.0
# the label every Ray node carries with its node id (Ray's default labels)
NODE_ID_LABEL = "ray.io/node-id"


@dataclass(frozen=True)
class Placement:
    """What one actor asks of the node it runs on: CPUs, custom resources, node labels
    (Ray label selectors: ``{"zone": "us-east-1a"}``, ``{"zone": "in(a,b)"}``, ``{"gpu": "!in(x)"}``)."""

    cpus: float = 0.0
    resources: Mapping[str, float] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)

    def demand(self) -> dict[str, float]:
        """The resources the actor holds while it runs (those that are not zero)."""
        return {name: float(amount) for name, amount in {"CPU": self.cpus, **self.resources}.items() if amount}


@dataclass(frozen=True)
class ActorSpec:
    """One actor of a start: its class, constructor arguments, placement, a label for
    messages ("shard 0", "gradient worker 1") and the name Ray's dashboard and state API show
    ("digits/shard-0"; None: unnamed)."""

    cls: type
    args: tuple
    kwargs: dict
    placement: Placement
    label: str
    name: str | None = None


class InlineRef:
    """An inline call's outcome: its value, or the exception it raised."""

    __slots__ = ("value", "error")

    def __init__(self, value: Any = None, error: BaseException | None = None):
        self.value = value
        self.error = error


class InlineBackend:
    """Every actor is a plain object in this process; calls run when they are made."""

    name = "inline"
    client = False
    description = "inline"

    def start_all(self, specs: Sequence[ActorSpec], strategy: str | None, pin: str | None,
                  avoid: frozenset[str], namespace: str | None = None) -> tuple[list[Any], None]:
        actors = []
        for spec in specs:
            try:
                actors.append(spec.cls(*spec.args, **spec.kwargs))
            except Exception as error:
                for actor in actors:
                    self.kill(actor)
                raise ActorCallError(f"{spec.label} failed to start: {error}") from error
        return actors, None

    def wait_started(self, actors: Sequence[Any], specs: Sequence[ActorSpec], handle: Any, timeout: float,
                     on_wait: Callable[[str], Any]) -> list[tuple[int, int, str | None]]:
        return self.get([self.call(actor, "ping") for actor in actors])

    def this_node(self) -> str | None:
        return None

    def unreachable_nodes(self, nodes: set[str] | None = None) -> set[str]:
        return set()

    def release(self, handle: Any) -> None:
        pass

    def call(self, actor: Any, method: str, *args: Any, num_returns: int = 1, **kwargs: Any) -> Any:
        try:
            # an argument whose call failed fails this call too, as with Ray's object refs
            args = tuple(self._resolve(a) for a in args)
            result = getattr(actor, method)(*args, **kwargs)
        except Exception as error:
            if num_returns == 1:
                return InlineRef(error=error)
            return [InlineRef(error=error) for _ in range(num_returns)]
        if num_returns == 1:
            return InlineRef(result)
        return [InlineRef(item) for item in result]

    def _resolve(self, value: Any) -> Any:
        if isinstance(value, InlineRef):
            if value.error is not None:
                raise value.error
            return value.value
        return value

    def get(self, refs: Sequence[InlineRef]) -> list[Any]:
        values = []
        for ref in refs:
            if ref.error is not None:
                raise ActorCallError(str(ref.error)) from ref.error
            values.append(ref.value)
        return values

    def kill(self, actor: Any) -> None:
        close = getattr(actor, "close", None)
        if close is not None:
            try:
                close()
            except Exception:
                pass

    def shutdown(self) -> None:
        pass


class RayBackend:
    """Actors as Ray actors. Connects to ``address`` (a cluster, or "auto"), or, when it is
    None and no ``RAY_ADDRESS`` is set, starts a private single-node instance on the loopback
    interface (never another cluster that happens to run on this machine) and stops it again
    in :meth:`shutdown`."""

    name = "ray"

    def __init__(self, address: str | None = None, code: Sequence[str] = ()):
        import ray

        self.ray = ray
        self.started_here = False
        target = address or os.environ.get("RAY_ADDRESS")
        # through Ray Client the coordinator's calls run on the cluster, not on this machine
        self.client = (target or "").startswith("ray://")
        if ray.is_initialized():
            self.description = f"the Ray cluster at {self._gcs_address()} (joined before the run)"
        else:
            options: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True,
                                       "configure_logging": True}
            if target is None:
                # Ray's "local": always a new instance, where a plain ray.init() would join the
                # cluster of the machine's last `ray start`. It listens on loopback only; without
                # this variable Ray moves the node to the machine's external address. Ray's
                # processes read it from the environment; this process read it when ray was
                # first imported, so the constant is set too in case that happened earlier
                os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
                from ray._private import ray_constants

                ray_constants.ENABLE_RAY_CLUSTER = False
                options.update(address="local", _node_ip_address="127.0.0.1", include_dashboard=False)
            else:
                options["address"] = target
            # the job's own modules (beside its job file) travel to every actor, on this machine
            # and on a cluster alike; a driver that Ray Jobs started (`shardstep submit`) has
            # them in its job's runtime_env already, which a second py_modules would conflict with
            if code and "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
                options["runtime_env"] = {"py_modules": list(code)}
            # Ray's init replaces the SIGTERM handler with one that exits at once; the caller's
            # (shardstep's own: stop like Ctrl-C) is put back
            previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
            # a new private instance (loopback only, stopped with the run) gets token
            # authentication by default, and Ray warns on every start that it chose so: the
            # notice is about a cluster others could reach, which this one is not
            quiet_auth = target is None and "RAY_AUTH_MODE" not in os.environ
            auth_logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
            auth_level = auth_logger.level
            if quiet_auth:
                auth_logger.setLevel(logging.ERROR)
            try:
                ray.init(**options)
            except Exception as error:
                raise ActorLostError(f"cannot start or reach Ray at {target or 'a new local instance'}: "
                                     f"{error}") from error
            except SystemExit as exit:
                # SIGTERM while Ray's own handler was in place: stop what init started and
                # end like Ctrl-C
                if exit.code != signal.SIGTERM:
                    raise
                ray.shutdown()
                raise KeyboardInterrupt from None
            except KeyboardInterrupt:
                ray.shutdown()
                raise
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
                if quiet_auth:
                    auth_logger.setLevel(auth_level)
            self.started_here = True
            # what the summary names: where this process actually is now, not what was asked
            if target is None:
                self.description = f"a new local Ray instance ({self._gcs_address()})"
            else:
                self.description = f"the Ray cluster at {target}"
        self._classes: dict[type, Any] = {}

    # -- the cluster -------------------------------------------------------------------------

    def _gcs_address(self) -> str:
        try:
            return self.ray.get_runtime_context().gcs_address
        except Exception:  # Ray Client: the cluster's address is the one it was given
            return os.environ.get("RAY_ADDRESS", "?")

    def _alive_nodes(self) -> list[dict[str, Any]]:
        try:
            return [node for node in self.ray.nodes() if node.get("Alive")]
        except Exception as error:
            raise ActorLostError(f"cannot read the Ray cluster's nodes: {error}") from error

    def on_one_node(self) -> bool:
        """Whether the cluster is this process's node alone, so every actor runs here."""
        if self.client:
            return False
        nodes = self._alive_nodes()
        return len(nodes) == 1 and nodes[0].get("NodeID") == self.this_node()

    def node_count(self) -> int:
        return len(self._alive_nodes())

    def this_node(self) -> str | None:
        return None if self.client else self.ray.get_runtime_context().get_node_id()

    def unreachable_nodes(self, nodes: set[str] | None = None) -> set[str]:
        """Those of ``nodes`` (None: every node listed alive) that are gone: listed dead, or
        whose raylet does not accept a connection (Ray lists a lost node as alive until its
        health checks time out, 15 s by default, and places new actors there meanwhile)."""
        try:
            known = {node["NodeID"]: node for node in self.ray.nodes()}
        except Exception as error:
            raise ActorLostError(f"cannot read the Ray cluster's nodes: {error}") from error
        wanted = {n for n, node in known.items() if node.get("Alive")} if nodes is None else set(nodes)
        lost = {n for n in wanted if n not in known or not known[n].get("Alive")}
        here = self.this_node()
        probe = [] if self.client else [known[n] for n in wanted - lost if n != here]

        def refuses(node: dict[str, Any]) -> bool:
            try:
                socket.create_connection((node["NodeManagerAddress"], node["NodeManagerPort"]),
                                         timeout=PROBE_SECONDS).close()
                return False
            except OSError:
                return True

        if probe:
            with ThreadPoolExecutor(max_workers=min(32, len(probe))) as pool:
                lost |= {node["NodeID"] for node, gone in zip(probe, pool.map(refuses, probe)) if gone}
        return lost

    # -- starting ----------------------------------------------------------------------------

    def start_all(self, specs: Sequence[ActorSpec], strategy: str | None, pin: str | None,
                  avoid: frozenset[str], namespace: str | None = None) -> tuple[list[Any], Any]:
        """Create every actor of a start: in one placement group with ``strategy`` (Ray's
        PACK, SPREAD, STRICT_PACK, STRICT_SPREAD), pinned to node ``pin``, or placed by Ray;
        never on the nodes in ``avoid``. Named actors are named in ``namespace`` (one per
        run, so two runs' names never collide). Returns the handles and the placement group."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

        keep_out = {NODE_ID_LABEL: f"!in({','.join(sorted(avoid))})"} if avoid else {}
        group = None
        if strategy is not None:
            group = placement_group([spec.placement.demand() for spec in specs], strategy=strategy.upper(),
                                    bundle_label_selector=[{**spec.placement.labels, **keep_out} for spec in specs])
        handles = []
        for index, spec in enumerate(specs):
            remote = self._classes.get(spec.cls)
            if remote is None:
                remote = self._classes[spec.cls] = self.ray.remote(spec.cls)
            # no restarts by Ray itself: the coordinator restores a consistent state instead
            options: dict[str, Any] = {"num_cpus": spec.placement.cpus, "max_restarts": 0, "max_task_retries": 0}
            if spec.placement.resources:
                options["resources"] = dict(spec.placement.resources)
            # in the actor's environment from its start, before its OpenMP runtime (numba's,
            # torch's) loads; Ray merges these with the job's own env_vars
            options["runtime_env"] = {"env_vars": thread_environment()}
            if spec.name is not None:
                options["name"] = spec.name
                if namespace is not None:
                    options["namespace"] = namespace
            if group is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=index)
            elif pin is not None:
                options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(pin, soft=False)
            elif spec.placement.labels or keep_out:
                options["label_selector"] = {**spec.placement.labels, **keep_out}
            handles.append(remote.options(**options).remote(*spec.args, **spec.kwargs))
        return handles, group

    def wait_started(self, actors: Sequence[Any], specs: Sequence[ActorSpec], group: Any, timeout: float,
                     on_wait: Callable[[str], Any]) -> list[tuple[int, int, str | None]]:
        """Every actor's ``ping`` answer, waiting at most ``timeout`` seconds in all; while
        some cannot start, ``on_wait`` hears what they need and what the cluster has free.
        Past the limit: :class:`StartTimeoutError` with that message."""
        from shardstep.service.actors import pending_message

        started = time.monotonic()
        deadline = started + timeout
        refs = [self.call(actor, "ping") for actor in actors]
        waiting = list(range(len(refs)))
        answers: dict[int, Any] = {}
        reported, reported_at = "", started
        while waiting:
            now = time.monotonic()
            ready, _ = self.ray.wait([refs[i] for i in waiting], num_returns=len(waiting),
                                     timeout=max(0.0, min(1.0, deadline - now)))
            done = [i for i in waiting if refs[i] in set(ready)]
            for i, value in zip(done, self.get([refs[i] for i in done])):
                answers[i] = value
            waiting = [i for i in waiting if i not in answers]
            if not waiting:
                break
            now = time.monotonic()
            if now - started < FIRST_REPORT_SECONDS and now < deadline:
                continue
            message = pending_message([specs[i] for i in waiting], self.ray.cluster_resources(),
                                      self.ray.available_resources(), None if group is None else "placement group")
            if now >= deadline:
                raise StartTimeoutError(f"{len(waiting)} of {len(refs)} actors did not start within "
                                        f"resources.start_timeout = {timeout:g} s: {message}")
            if message != reported or now - reported_at >= REPEAT_SECONDS:
                on_wait(message)
                reported, reported_at = message, now
        return [answers[i] for i in range(len(refs))]

    def release(self, group: Any) -> None:
        if group is not None:
            try:
                self.ray.util.remove_placement_group(group)
            except Exception:
                pass  # a cluster that is going away takes its placement groups with it

    # -- calls -------------------------------------------------------------------------------

    def call(self, actor: Any, method: str, *args: Any, num_returns: int = 1, **kwargs: Any) -> Any:
        return getattr(actor, method).options(num_returns=num_returns).remote(*args, **kwargs)

    def get(self, refs: Sequence[Any]) -> list[Any]:
        from ray import exceptions

        try:
            return self.ray.get(list(refs))
        except exceptions.RayTaskError as error:
            cause = error.cause if getattr(error, "cause", None) is not None else error
            if isinstance(cause, (exceptions.RayActorError, exceptions.ObjectLostError)):
                raise ActorLostError(lost_actor_message(cause)) from error
            raise ActorCallError(str(cause)) from error
        except exceptions.RayActorError as error:
            if error.actor_init_failed:
                # its constructor raised: the same arguments raise again, so this is not a loss.
                # Ray's message ends with the original exception's line
                lines = [line.strip() for line in str(error).splitlines() if line.strip()]
                raise ActorCallError(f"an actor failed to start: {lines[-1] if lines else error}") from error
            raise ActorLostError(lost_actor_message(error)) from error
        except (exceptions.ObjectLostError, exceptions.WorkerCrashedError, exceptions.OwnerDiedError,
                exceptions.NodeDiedError) as error:
            raise ActorLostError(lost_actor_message(error)) from error

    def kill(self, actor: Any) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:
            pass

    def shutdown(self) -> None:
        if self.started_here:
            self.ray.shutdown()
            self.started_here = False


def lost_actor_message(error: BaseException) -> str:
    """One line that says which actor was lost, where and why, then Ray's own text. Ray's
    message starts with a generic sentence and the actor's fields (class_name, pid, ip, one
    per line) before the reason."""
    text = str(error).strip()
    fields, reason = {}, None
    for line in text.splitlines()[1:]:
        key, colon, value = line.strip().partition(": ")
        if line.startswith("\t") and colon and key in ("class_name", "pid", "ip"):
            fields[key] = value.strip()
        elif line.strip() and reason is None and not line.startswith("\t"):
            reason = line.strip()
    if not fields:
        first = text.splitlines()[0] if text else ""
        return f"an actor was lost: {type(error).__name__}: {first}" + (f"\n{text}" if "\n" in text else "")
    who = fields.get("class_name", "an actor")
    where = ", ".join(part for part in (f"pid {fields['pid']}" if "pid" in fields else "",
                                        f"node {fields['ip']}" if "ip" in fields else "") if part)
    summary = f"an actor was lost: {who}" + (f" ({where})" if where else "") + (f": {reason}" if reason else "")
    return f"{summary}\n{text}"


def make_backend(name: str, address: str | None = None, code: Sequence[str] = ()) -> InlineBackend | RayBackend:
    """``code``: the job's own modules, for the actors (Ray's ``py_modules``)."""
    if name == "inline":
        return InlineBackend()
    if name == "ray":
        return RayBackend(address, code)
    raise ValueError(f"backend must be 'ray' or 'inline'; got {name!r}")
