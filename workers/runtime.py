"""Process settings for code that runs inside actors, and the thread environment every
process of a run gets (the actors, and the ``shardstep`` command's own)."""

from __future__ import annotations

import os

_THREAD_BUDGET: list[int] = []

# How idle kernel threads wait, in every process that runs shardstep's kernels: the actors,
# and the command line's own process (where the inline backend computes). numba's default
# threading layer is OpenMP, whose workers spin after each parallel kernel (libgomp: up to
# 300,000 polls) before they sleep. The spinning threads take the cores from the process's
# own OpenBLAS threads and, on a busy machine, from other jobs, and a kernel's thread team
# then waits at its barrier for a member the scheduler has not run yet. Waiting passively
# sleeps at once (measured in docs/benchmarks.md, "Under a competing job"). The OpenMP
# runtime reads the setting when it loads, so it must be in a process's environment before
# its first parallel kernel (or torch) loads the runtime.
THREAD_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}
# the variables by which a user says how OpenMP threads wait; any of them set wins
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def thread_environment() -> dict[str, str]:
    """How OpenMP threads wait in every process of a run: the wait settings of this process's
    environment when it has any (the user's choice), else :data:`THREAD_ENVIRONMENT`. The
    actors are started with these variables."""
    chosen = {name: os.environ[name] for name in WAIT_SETTINGS if name in os.environ}
    return chosen or dict(THREAD_ENVIRONMENT)


def use_thread_environment() -> None:
    """Give this process :func:`thread_environment`. The ``shardstep`` command calls it first
    thing; a library user's own process is left as it is (docs/engine.md says how to set it)."""
    os.environ.update(thread_environment())


def limit_threads(threads: int) -> None:
    """Let numba's parallel kernels use at most ``threads`` threads in this process (an actor
    given one CPU must not spin a thread team over the cores its neighbours compute on); a
    torch module built later in the process takes the same budget (:func:`thread_budget`)."""
    import numba

    budget = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(budget)
    _THREAD_BUDGET[:] = [budget]


def thread_budget() -> int | None:
    """The threads :func:`limit_threads` allowed this process, or None when it was not called."""
    return _THREAD_BUDGET[0] if _THREAD_BUDGET else None


def node_id() -> str | None:
    """The id of the Ray node this process runs on, or None outside Ray (the inline backend
    runs its actors in the coordinator's process)."""
    import sys

    ray = sys.modules.get("ray")  # a Ray worker process has imported it; nothing else needs to
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def check_run_dir_visible(run_dir: str, run_id: str | None, who: str) -> None:
    """Refuse to work on a node that does not see the run directory the coordinator made
    (checkpoints are written by every shard on its own node): ``job.json`` there must name
    this run."""
    import json
    import socket

    from shardstep.checkpoints.errors import CheckpointError
    from shardstep.checkpoints.storage import ObjectPath, get_object, location

    where = location(run_dir)
    path = where / "job.json"  # shardstep.service.run_dir.JOB_FILE
    try:
        if isinstance(where, ObjectPath):
            found = get_object(path)
            if found is None:
                raise FileNotFoundError(f"no object {path}")
            seen = json.loads(found[0]).get("run_id")
        else:
            with open(path) as file:
                seen = json.load(file).get("run_id")
    except (OSError, ValueError, CheckpointError) as error:
        seen, why = None, f"cannot read {path} ({type(error).__name__}: {error})"
    else:
        why = f"{path} belongs to run {seen!r}, not {run_id!r}"
    if seen != run_id or seen is None:
        shared = ("Every node needs the object store's endpoint and credentials in its environment "
                  "(docs/checkpoints.md, \"On object storage\")" if isinstance(where, ObjectPath) else
                  "The run directory must be on storage every node shares, at the same path")
        raise RuntimeError(f"{who} on host {socket.gethostname()} does not see the run directory {run_dir}: {why}. "
                           + shared)
