"""Where the actors run: ``ray`` (actors in their own processes, on a local instance or a
cluster) or ``inline`` (plain objects in this process, for debugging and fast tests).

Both backends create the same classes (:class:`~shardstep.workers.shard.ShardActor`,
:class:`~shardstep.workers.gradient_worker.GradientWorker`) and offer one interface: ``call`` submits
a method call and returns futures at once (Ray's object refs, or already-computed inline
results), futures may be passed as arguments of later calls, and ``get`` waits. Calls to
one actor run in the order they were made, so the coordinator submits a whole step before
it waits once.

Errors: an actor that died (its process was killed, its node lost) becomes
:class:`ActorLostError`; an exception raised inside a method becomes :class:`ActorCallError`
carrying the original message. The coordinator recovers from the first, never the second.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from shardstep.service.errors import ActorCallError, ActorLostError


class InlineRef:
    """An inline call's outcome: its value, or the exception it raised."""

    __slots__ = ("value", "error")

    def __init__(self, value: Any = None, error: BaseException | None = None):
        self.value = value
        self.error = error


class InlineBackend:
    """Every actor is a plain object in this process; calls run when they are made."""

    name = "inline"

    def start(self, cls: type, args: tuple, kwargs: dict, cpus: float, label: str) -> Any:
        try:
            return cls(*args, **kwargs)
        except Exception as error:
            raise ActorCallError(f"{label} failed to start: {error}") from error

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
    None and no ``RAY_ADDRESS`` is set, starts a local single-node instance on the loopback
    interface and stops it again in :meth:`shutdown`."""

    name = "ray"

    def __init__(self, address: str | None = None):
        import ray

        self.ray = ray
        self.started_here = False
        # through Ray Client the coordinator's calls run on the cluster, not on this machine
        self.client = (address or os.environ.get("RAY_ADDRESS") or "").startswith("ray://")
        if not ray.is_initialized():
            options: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True,
                                       "configure_logging": True}
            target = address or os.environ.get("RAY_ADDRESS")
            if target is None:
                # a private single-node instance that listens on loopback only; without this
                # variable Ray moves the node to the machine's external address. Ray's
                # processes read it from the environment; this process read it when ray was
                # first imported, so the constant is set too in case that happened earlier
                os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
                from ray._private import ray_constants

                ray_constants.ENABLE_RAY_CLUSTER = False
                options.update(_node_ip_address="127.0.0.1", include_dashboard=False)
            else:
                options["address"] = target
            try:
                ray.init(**options)
            except Exception as error:
                raise ActorLostError(f"cannot start or reach Ray at {target or 'a new local instance'}: "
                                     f"{error}") from error
            self.started_here = True
        self._classes: dict[type, Any] = {}

    def on_one_node(self) -> bool:
        """Whether the cluster is this process's node alone, so every actor runs here."""
        if self.client:
            return False
        try:
            nodes = [node for node in self.ray.nodes() if node.get("Alive")]
            here = self.ray.get_runtime_context().get_node_id()
        except Exception as error:
            raise ActorLostError(f"cannot read the Ray cluster's nodes: {error}") from error
        return len(nodes) == 1 and nodes[0].get("NodeID") == here

    def start(self, cls: type, args: tuple, kwargs: dict, cpus: float, label: str) -> Any:
        remote = self._classes.get(cls)
        if remote is None:
            remote = self._classes[cls] = self.ray.remote(cls)
        # no restarts by Ray itself: the coordinator restores a consistent state instead
        return remote.options(num_cpus=cpus, max_restarts=0, max_task_retries=0,
                              name=None).remote(*args, **kwargs)

    def call(self, actor: Any, method: str, *args: Any, num_returns: int = 1, **kwargs: Any) -> Any:
        return getattr(actor, method).options(num_returns=num_returns).remote(*args, **kwargs)

    def get(self, refs: Sequence[Any]) -> list[Any]:
        from ray import exceptions

        try:
            return self.ray.get(list(refs))
        except exceptions.RayTaskError as error:
            cause = error.cause if getattr(error, "cause", None) is not None else error
            if isinstance(cause, (exceptions.RayActorError, exceptions.ObjectLostError)):
                raise ActorLostError(f"an actor was lost: {cause}") from error
            raise ActorCallError(str(cause)) from error
        except (exceptions.RayActorError, exceptions.ObjectLostError, exceptions.WorkerCrashedError,
                exceptions.OwnerDiedError) as error:
            raise ActorLostError(f"an actor was lost: {type(error).__name__}: {error}") from error

    def kill(self, actor: Any) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:
            pass

    def shutdown(self) -> None:
        if self.started_here:
            self.ray.shutdown()
            self.started_here = False


def make_backend(name: str, address: str | None = None) -> InlineBackend | RayBackend:
    if name == "inline":
        return InlineBackend()
    if name == "ray":
        return RayBackend(address)
    raise ValueError(f"backend must be 'ray' or 'inline'; got {name!r}")
