"""The errors a run reports. Each names what happened, where, and what is left on disk."""

from __future__ import annotations


class ShardstepError(Exception):
    """Base class of the service's errors."""


class ActorLostError(ShardstepError):
    """An actor's process or node is gone (killed, crashed, out of memory). Recoverable: the
    coordinator restarts the actors from the latest committed checkpoint."""


class ActorCallError(ShardstepError):
    """A method raised inside an actor (a bug or bad input in the task, a non-finite value):
    not retried, since the same inputs raise again."""


class NonFiniteError(ShardstepError, FloatingPointError):
    """A non-finite loss or gradient; names the step and the parameters."""


class RunFailedError(ShardstepError):
    """The run stopped: more failures than ``max_failures``, or an error it cannot recover
    from. Its committed checkpoints are intact."""


class StartTimeoutError(RunFailedError):
    """The actors could not all start within ``resources.start_timeout`` (the cluster lacks
    the resources, or the nodes that have them). Names what they need and what was free."""


class UnsuitableClusterError(ShardstepError):
    """The job asks for something this cluster cannot give (shared memory across nodes):
    bad input, refused before the run directory is touched."""
