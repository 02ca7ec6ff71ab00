"""The distributed engine: step rate inline vs Ray, object-store traffic, coordinator overhead,
shard memory, and LBFGS round trips.

    python benchmarks/engine.py             # the published table (4 to 8 minutes on 2 cores)
    python benchmarks/engine.py --quick     # a smaller run for a quick look (under 2 minutes;
                                            # prints the section, never writes the doc)

Steps, bytes, memory and round trips come from real runs of ``Coordinator(spec).run()``
(``service/coordinator.py``) on a private single-node Ray instance that listens on loopback
only (this script starts it and stops it; the coordinator reuses it), or on the inline
backend in this process. Ray runs use the object-store transport (``resources.transport =
"object_store"``), the one a multi-node cluster uses; on one node the default is the
shared-memory transport, measured by ``benchmarks/peer``:

1. Step time, inline vs ray: ``synthetic-mlp`` at about 1M and 10M parameters, Adam, 2
   gradient workers, 1/2/4 shards. The time of a step is the coordinator's own per-step
   ``seconds``; the first ``WARMUP`` steps of every run are skipped. Runs alternate between
   the backends and configurations over several rounds; medians (p90) over the pooled steps.
2. Object-store bytes per step, in the same Ray runs: the raylet's cumulative count of bytes
   created in the object store (``store_stats.cumulative_created_bytes`` of Ray's memory-info
   reply), read in the run's ``on_step`` callback after the last warm-up step but one and
   after the last step, each time once every shard has answered a ``ping`` submitted after its
   ``apply`` (the step's apply is not waited for; its result must be in the store before the
   count is read); the difference over the steps between. Minimum: every parameter crosses once to
   the workers (each shard's ``apply`` returns its packed slices once: P bytes) and every
   worker's gradient crosses once to the shards (W x P bytes): P (1 + W).
3. Coordinator overhead per step, tiny model (``synthetic-mlp`` of about 1k parameters, 1
   shard, 1 worker): the ray step minus the actors' compute, where the compute is the same
   actor methods in the coordinator's order (``compute`` on the packed slices the previous
   ``reduce_apply`` returned, then ``reduce_apply``) called directly on plain ``ShardActor`` /
   ``GradientWorker`` objects in this process, interleaved with the runs. Reference from the
   same rounds: a no-op Ray actor method, called one at a time (sync), submitted in a batch
   and waited once (pipelined), and a step's calls with no work in them (the same two calls
   with the same dependencies, arguments passed the same way, on two no-op actors).
4. Shard memory: ``synthetic-mlp`` of about 100M float32 parameters with Adam, 1 worker, 1/2/4
   shards: VmRSS (and its anonymous and shared-memory parts) of every shard actor's process
   from ``/proc/<pid>/status``, read in ``on_step`` after step 1 once every shard has answered
   a ``ping`` submitted after its ``apply`` (so Adam's state exists and the step's gradient is
   released). Expected: 12 bytes per element the shard owns (parameter, exp_avg,
   exp_avg_sq) plus the RSS of an idle shard actor right after it started. The 1-shard run
   takes ``MEMORY_STEPS`` steps and is read after each, to show how the shared-memory part
   moves.
5. LBFGS on ``least-squares``: the coordinator's ``round_trips`` (every wait) and the sharded
   space's ``round_trips`` (reductions) per iteration, counted between the end of step 1 and
   the end of the last step, for several ``history_size`` values at a fixed ``max_iter``
   (alternating over rounds; time per iteration as medians over the steps).

Needs ``grpcio`` for item 2 (Ray's memory-info request goes through its gRPC client); the
script says so and stops when it is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# a private Ray node on loopback: without this variable Ray moves the node to the machine's
# external address
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from benchmarks.report import machine, write_section  # noqa: E402

BEGIN, END = "<!-- engine:begin -->", "<!-- engine:end -->"
WARMUP = 3
# the object-store count starts after this warm-up step: the wait that settles the store
# before a reading then delays step WARMUP, not a timed one
COUNT_FROM = WARMUP - 1
FLOAT32_BYTES = 4
ADAM_ARRAYS = 3  # parameter, exp_avg, exp_avg_sq

# what each mode runs: model sizes and shard counts of item 1, timed steps per run, rounds
MODES: dict[str, dict[str, Any]] = {
    "full": {
        "sizes": {"1M": 1_000_000, "10M": 10_000_000}, "shards": (1, 2, 4), "rounds": 3,
        "timed": {"1M": 30, "10M": 12}, "tiny_rounds": 3, "tiny_timed": 200, "echo_calls": 600,
        "memory_params": 100_000_000, "memory_shards": (1, 2, 4), "histories": (5, 20, 80), "lbfgs_steps": 6,
        "lbfgs_rounds": 2,
    },
    "quick": {
        "sizes": {"1M": 1_000_000, "10M": 10_000_000}, "shards": (1, 4), "rounds": 1,
        "timed": {"1M": 10, "10M": 4}, "tiny_rounds": 1, "tiny_timed": 60, "echo_calls": 200,
        "memory_params": 20_000_000, "memory_shards": (1, 4), "histories": (5, 80), "lbfgs_steps": 3,
        "lbfgs_rounds": 1,
    },
}
BATCH = 128
WORKERS = 2
TINY_PARAMS = 1_000
TINY_BATCH = 32
MEMORY_BATCH = 8
MEMORY_STEPS = 3
LBFGS_TASK = {"rows": 2048, "cols": 256, "condition": 1000.0}
LBFGS_MAX_ITER = 20
LBFGS_SHARDS = 2


# ---------------------------------------------------------------------------------------
# jobs and runs


def job(run_dir: str, *, task: str, task_args: dict, optimizer: str, optimizer_args: dict, steps: int,
        batch_size: int, shards: int, workers: int, backend: str):
    from shardstep.service.jobspec import JobSpec

    # the object-store transport: the one every cluster can use, and the one whose bytes this
    # benchmark counts (on one node the default is shared memory: benchmarks/peer measures it)
    return JobSpec(task=task, task_args=task_args, optimizer=optimizer, optimizer_args=optimizer_args,
                   param_groups=None, schedulers=(), steps=steps, epochs=None, batch_size=batch_size,
                   shards=shards, workers=workers, backend=backend, run_dir=run_dir,
                   transport="object_store" if backend == "ray" else "auto")


def run_job(spec_args: dict, task: Any, on_step: Callable[[Any, dict], Any] | None = None):
    """One ``Coordinator(spec).run()`` in a fresh run directory; ``on_step(coordinator,
    record)`` sees every step. Returns (coordinator, result)."""
    from shardstep.service.coordinator import Coordinator

    with tempfile.TemporaryDirectory(prefix="shardstep-engine-") as run_dir:
        spec = job(run_dir, **spec_args)
        coordinator: Any = None

        def hook(record: dict) -> None:
            if on_step is not None:
                on_step(coordinator, record)

        coordinator = Coordinator(spec, task=task, on_step=hook)
        result = coordinator.run()
    return coordinator, result


def store_created() -> tuple[int, int]:
    """(bytes, objects) created in this Ray node's object store since it started."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    stats = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
    return stats.cumulative_created_bytes, stats.cumulative_created_objects


def median_p90(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


# ---------------------------------------------------------------------------------------
# 1 and 2: step time inline vs ray, object-store bytes


def measure_scaling(mode: dict) -> list[dict]:
    from shardstep.workers.tasks import make_task

    task_args = {label: {"params": n, "eval_examples": 16} for label, n in mode["sizes"].items()}
    tasks = {label: make_task("synthetic-mlp", **args) for label, args in task_args.items()}
    configs = [(label, shards) for label in tasks for shards in mode["shards"]]
    times: dict[tuple, list[float]] = {}
    traffic: dict[tuple, list[tuple[int, int, int]]] = {}
    for round_index in range(mode["rounds"]):
        for index, (label, shards) in enumerate(configs):
            backends = ("inline", "ray") if (round_index + index) % 2 == 0 else ("ray", "inline")
            for backend in backends:
                steps = WARMUP + mode["timed"][label]
                marks: dict[int, tuple[int, int]] = {}

                def on_step(coordinator, record, backend=backend, steps=steps, marks=marks):
                    if backend == "ray" and record["step"] in (COUNT_FROM, steps):
                        # calls to an actor run in order: the ping answers once the step's apply
                        # has put its result; the wait falls on a step that is not timed
                        ray_backend = coordinator.backend
                        ray_backend.get([ray_backend.call(shard, "ping") for shard in coordinator.shards])
                        marks[record["step"]] = store_created()

                started = time.perf_counter()
                _, result = run_job(dict(task="synthetic-mlp", task_args=task_args[label], optimizer="adam",
                                         optimizer_args={"lr": 1e-3}, steps=steps, batch_size=BATCH,
                                         shards=shards, workers=WORKERS, backend=backend),
                                    tasks[label], on_step)
                seconds = [r["seconds"] for r in result.history[WARMUP:]]
                times.setdefault((label, shards, backend), []).extend(seconds)
                if backend == "ray":
                    (b0, o0), (b1, o1) = marks[COUNT_FROM], marks[steps]
                    traffic.setdefault((label, shards), []).append((b1 - b0, o1 - o0, steps - COUNT_FROM))
                print(f"  round {round_index + 1} {label:3s} shards {shards} {backend:6s} "
                      f"median {statistics.median(seconds) * 1e3:8.2f} ms  [{time.perf_counter() - started:.1f} s]",
                      flush=True)
    rows = []
    for label, shards in configs:
        task = tasks[label]
        param_bytes = task.num_params * FLOAT32_BYTES
        inline, inline_p90 = median_p90(times[(label, shards, "inline")])
        ray, ray_p90 = median_p90(times[(label, shards, "ray")])
        per_step = [b / n for b, _, n in traffic[(label, shards)]]
        objects = [o / n for _, o, n in traffic[(label, shards)]]
        rows.append({
            "model": label, "params": task.num_params, "sizes": task.sizes, "shards": shards,
            "inline": inline, "inline_p90": inline_p90, "ray": ray, "ray_p90": ray_p90,
            "steps": len(times[(label, shards, "ray")]),
            "bytes": statistics.median(per_step), "bytes_spread": (min(per_step), max(per_step)),
            "objects": statistics.median(objects), "minimum": param_bytes * (1 + WORKERS),
        })
    return rows


# ---------------------------------------------------------------------------------------
# 3: coordinator overhead on a tiny model, and Ray's own round trip


class Echo:
    """A Ray actor that does nothing: the floor under any actor call."""

    def noop(self, *args: Any, **kwargs: Any) -> None:
        return None

    def pair(self, *args: Any) -> tuple[None, None]:
        return None, None

    def threads(self) -> dict[str, str | None]:
        """The thread settings Ray gives its worker processes."""
        return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def local_compute(task: Any, timed: int) -> list[float]:
    """The actors' work of ``timed`` steps, called directly on plain objects in this process:
    the same methods, arguments and order a step of the coordinator uses (1 shard, 1 worker):
    ``compute`` on the packed slices the previous ``reduce_apply`` returned, then
    ``reduce_apply`` (``get_params`` once, before the first step, as the coordinator's first
    step does)."""
    from shardstep.checkpoints import ShardLayout
    from shardstep.checkpoints.layout import ParamSpec
    from shardstep.workers.gradient_worker import GradientWorker
    from shardstep.workers.optim.builders import optimizer_groups
    from shardstep.workers.shard import ShardActor

    initial = task.init_params(0)
    layout = ShardLayout(tuple(ParamSpec(n, tuple(a.shape), a.dtype.name) for n, a in initial.items()), 1)
    planned = optimizer_groups("adam", {"lr": 1e-3}, {n: a.dtype for n, a in initial.items()}, task.param_groups)
    groups = [{"params": list(g["params"])} for g in planned.param_groups]
    hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in planned.param_groups]
    shard = ShardActor(0, layout, "adam", groups, {n: a.reshape(-1) for n, a in initial.items()})
    worker = GradientWorker(task, 0, 1, 0, TINY_BATCH, layout)
    batches = task.num_batches(TINY_BATCH)
    seconds = []
    packed = shard.get_params()
    for step in range(WARMUP + timed):
        start = time.perf_counter()
        loss, piece = worker.compute(step // batches, step % batches, packed)
        _, packed = shard.reduce_apply(hyperparameters, piece)
        seconds.append(time.perf_counter() - start)
    shard.close()
    return seconds[WARMUP:]


def measure_overhead(mode: dict) -> dict:
    import ray

    from shardstep.workers.tasks import make_task

    task_args = {"params": TINY_PARAMS, "eval_examples": 16}
    task = make_task("synthetic-mlp", **task_args)
    echo_class = ray.remote(Echo)
    calls = mode["echo_calls"]
    series: dict[str, list[float]] = {k: [] for k in ("ray", "inline", "compute", "sync", "pipelined", "step_calls")}
    threads = None
    for round_index in range(mode["tiny_rounds"]):
        order = ("ray", "inline") if round_index % 2 == 0 else ("inline", "ray")
        for backend in order:
            _, result = run_job(dict(task="synthetic-mlp", task_args=task_args, optimizer="adam",
                                     optimizer_args={"lr": 1e-3}, steps=WARMUP + mode["tiny_timed"],
                                     batch_size=TINY_BATCH, shards=1, workers=1, backend=backend), task)
            series[backend].extend(r["seconds"] for r in result.history[WARMUP:])
        series["compute"].extend(local_compute(task, mode["tiny_timed"]))
        # the same options the Ray backend gives the engine's actors
        first, second = (echo_class.options(num_cpus=0, max_restarts=0, max_task_retries=0).remote()
                         for _ in range(2))
        ray.get([first.noop.remote(), second.noop.remote()])
        threads = ray.get(first.threads.remote())
        for _ in range(calls):
            start = time.perf_counter()
            ray.get(first.noop.remote())
            series["sync"].append(time.perf_counter() - start)
        for _ in range(5):
            start = time.perf_counter()
            ray.get([first.noop.remote() for _ in range(calls // 5)])
            series["pipelined"].append((time.perf_counter() - start) / (calls // 5))
        # a step's calls with no work in them: compute on the worker (two results) taking the
        # shard's previous reduce_apply result, reduce_apply on the shard (two results) taking
        # the worker's piece, one wait for the loss and the report; the second result is the
        # next round's compute argument (the first round takes a get_params result)
        packed = first.noop.remote()
        for _ in range(calls // 2):
            start = time.perf_counter()
            loss, piece = second.pair.options(num_returns=2).remote(0, 0, packed)
            report, packed = first.pair.options(num_returns=2).remote([{}], piece)
            ray.get([loss, report])
            series["step_calls"].append(time.perf_counter() - start)
        ray.get(packed)
        for actor in (first, second):
            ray.kill(actor)
        print(f"  round {round_index + 1} tiny: ray {statistics.median(series['ray']) * 1e3:.3f} ms, inline "
              f"{statistics.median(series['inline']) * 1e3:.3f} ms, compute "
              f"{statistics.median(series['compute']) * 1e3:.3f} ms, sync call "
              f"{statistics.median(series['sync']) * 1e3:.3f} ms", flush=True)
    out = {"params": task.num_params, "sizes": task.sizes, "actor_threads": threads}
    for key, values in series.items():
        out[key], out[key + "_p90"] = median_p90(values)
    return out


# ---------------------------------------------------------------------------------------
# 4: shard memory


STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def process_memory(pid: int) -> dict[str, int]:
    """The RSS fields of ``/proc/<pid>/status`` in bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            fields[key] = int(value.split()[0]) * 1024
    return fields


def idle_shard_memory(actors: int = 3) -> dict[str, int]:
    """The RSS of a shard actor right after it started (a 16-element parameter, Adam), as the
    Ray backend starts the engine's actors; medians over ``actors`` actors."""
    import numpy as np

    from shardstep.checkpoints import ShardLayout
    from shardstep.checkpoints.layout import ParamSpec
    from shardstep.service.backend import ActorSpec, Placement, RayBackend
    from shardstep.workers.shard import ShardActor

    backend = RayBackend()
    layout = ShardLayout((ParamSpec("weight", (16,), "float32"),), 1)
    spec = ActorSpec(ShardActor, (0, layout, "adam", [{"params": ["weight"]}], {"weight": np.zeros(16, np.float32)}),
                     {"threads": 1}, Placement(), "idle shard")
    readings = []
    for _ in range(actors):
        (actor,), _ = backend.start_all([spec], strategy=None, pin=None, avoid=frozenset())
        _, pid, _ = backend.get([backend.call(actor, "ping")])[0]
        readings.append(process_memory(pid))
        backend.kill(actor)
    return {key: int(statistics.median(r[key] for r in readings)) for key in STATUS_FIELDS}


def measure_memory(mode: dict) -> dict:
    from shardstep.workers.tasks import make_task

    baseline = idle_shard_memory()
    rows = []
    for label, params in (("~1k", TINY_PARAMS), (f"~{mode['memory_params'] // 1_000_000}M", mode["memory_params"])):
        task_args = {"params": params, "examples": 64, "eval_examples": 8}
        task = make_task("synthetic-mlp", **task_args)
        for shards in (1,) if params == TINY_PARAMS else mode["memory_shards"]:
            readings: list[dict] = []

            def on_step(coordinator, record, readings=readings):
                backend = coordinator.backend
                # calls to an actor run in order: the ping answers after the step's apply
                answers = backend.get([backend.call(s, "ping") for s in coordinator.shards])
                for shard, pid, _ in answers:
                    elements = sum(stop - start for start, stop in coordinator.layout.slices(shard).values())
                    readings.append({"step": record["step"], "shard": shard, "elements": elements,
                                     **process_memory(pid)})

            started = time.perf_counter()
            steps = MEMORY_STEPS if params != TINY_PARAMS and shards == 1 else 1
            run_job(dict(task="synthetic-mlp", task_args=task_args, optimizer="adam", optimizer_args={"lr": 1e-3},
                         steps=steps, batch_size=MEMORY_BATCH, shards=shards, workers=1, backend="ray"),
                    task, on_step)
            for reading in readings:
                reading["expected"] = ADAM_ARRAYS * FLOAT32_BYTES * reading["elements"] + baseline["VmRSS"]
                reading["expected_anon"] = ADAM_ARRAYS * FLOAT32_BYTES * reading["elements"] + baseline["RssAnon"]
            first = [r for r in readings if r["step"] == 1]
            worst = max(first, key=lambda r: abs(r["VmRSS"] / r["expected"] - 1))
            rows.append({"model": label, "params": task.num_params, "sizes": task.sizes, "shards": shards,
                         "tiny": params == TINY_PARAMS, "worst": worst,
                         "by_step": [r for r in readings if r["shard"] == worst["shard"]]})
            print(f"  memory {label} shards {shards}: " + ", ".join(
                f"step {r['step']} shard {r['shard']} VmRSS {_mib(r['VmRSS'])} MiB (anon {_mib(r['RssAnon'])}, "
                f"file {_mib(r['RssFile'])}, shmem {_mib(r['RssShmem'])}) expected {_mib(r['expected'])} MiB"
                for r in readings) + f"  [{time.perf_counter() - started:.1f} s]", flush=True)
    return {"baseline": baseline, "rows": rows}


# ---------------------------------------------------------------------------------------
# 5: LBFGS round trips


def measure_lbfgs(mode: dict) -> list[dict]:
    """Round trips and time per LBFGS iteration for every history size; the sizes alternate
    over ``lbfgs_rounds`` rounds (the counts must agree between rounds: they are exact)."""
    from shardstep.workers.tasks import make_task

    task = make_task("least-squares", **LBFGS_TASK)
    steps = mode["lbfgs_steps"]
    runs: dict[int, list[dict]] = {history: [] for history in mode["histories"]}
    for round_index in range(mode["lbfgs_rounds"]):
        order = mode["histories"] if round_index % 2 == 0 else tuple(reversed(mode["histories"]))
        for history in order:
            marks: dict[int, dict] = {}

            def on_step(coordinator, record, marks=marks):
                driver = coordinator.optimizer.driver
                marks[record["step"]] = {"trips": coordinator.round_trips, "reductions": coordinator.space.round_trips,
                                         "iterations": driver.n_iter, "evals": driver.func_evals,
                                         "history": coordinator.space.history_len(), "seconds": record["seconds"]}

            started = time.perf_counter()
            run_job(dict(task="least-squares", task_args=LBFGS_TASK, optimizer="lbfgs",
                         optimizer_args={"lr": 1, "max_iter": LBFGS_MAX_ITER, "history_size": history}, steps=steps,
                         batch_size=LBFGS_TASK["rows"], shards=LBFGS_SHARDS, workers=1, backend="ray"), task, on_step)
            first, last = marks[1], marks[steps]
            iterations = last["iterations"] - first["iterations"]
            run = {
                "iterations": iterations, "evals": last["evals"] - first["evals"],
                "trips": (last["trips"] - first["trips"]) / iterations,
                "reductions": (last["reductions"] - first["reductions"]) / iterations,
                "history_reached": max(m["history"] for m in marks.values()),
                # seconds per iteration of every step after the first
                "per_iteration": [marks[s]["seconds"] / (marks[s]["iterations"] - marks[s - 1]["iterations"])
                                  for s in range(2, steps + 1)],
            }
            runs[history].append(run)
            print(f"  round {round_index + 1} lbfgs history_size {history}: {iterations} iterations, "
                  f"{run['trips']:.2f} round trips and {run['reductions']:.2f} reductions per iteration, history "
                  f"reached {run['history_reached']}  [{time.perf_counter() - started:.1f} s]", flush=True)
    rows = []
    for history, done in runs.items():
        seconds = [value for run in done for value in run["per_iteration"]]
        median, p90 = median_p90(seconds)
        rows.append({
            "history_size": history, "runs": len(done),
            "iterations": done[0]["iterations"], "evals": done[0]["evals"],
            "history_reached": done[0]["history_reached"],
            # every run's count: a difference between rounds would show as a spread here
            "trips": [run["trips"] for run in done], "reductions": [run["reductions"] for run in done],
            "ms_per_iteration": median * 1e3, "ms_per_iteration_p90": p90 * 1e3,
        })
    return rows


# ---------------------------------------------------------------------------------------
# the section


def _ms(value: float) -> str:
    return f"{value * 1e3:.3f}" if value < 0.01 else f"{value * 1e3:.2f}" if value < 0.1 else f"{value * 1e3:.1f}"


def _mib(value: float) -> str:
    return f"{value / 2**20:.0f}"


def _mb(value: float) -> str:
    return f"{value / 1e6:.1f}"


def _counts(values: list[float]) -> str:
    """One count, or every run's when they differ."""
    distinct = sorted(set(round(v, 6) for v in values))
    return "/".join(f"{v:.2f}" for v in distinct)


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def render(scaling: list[dict], overhead: dict, memory: dict, lbfgs: list[dict], header: dict) -> str:
    o, base = overhead, memory["baseline"]
    ten = [r for r in scaling if r["model"] == "10M"]
    worst_ratio = max(r["ray"] / r["inline"] for r in ten)
    ray_overhead = o["ray"] - o["compute"]
    big = [r for r in memory["rows"] if not r["tiny"]]
    tiny = [r for r in memory["rows"] if r["tiny"]][0]["worst"]

    def deviation(r: dict, key: str, expected: str) -> float:
        return r["worst"][key] / r["worst"][expected] - 1

    worst_rss = max((deviation(r, "VmRSS", "expected") for r in big), key=abs)
    worst_anon = max((deviation(r, "RssAnon", "expected_anon") for r in big), key=abs)
    trips = [t for r in lbfgs for t in r["trips"]]
    reductions = [t for r in lbfgs for t in r["reductions"]]
    constant = max(trips) - min(trips) < 1e-9 and max(reductions) - min(reductions) < 1e-9
    lines = [
        BEGIN,
        "## The distributed engine: inline vs Ray, object-store traffic, overhead, shard memory, LBFGS round trips",
        "",
        f"Machine: {header['machine']}. Ray {header['ray']}, numpy {header['numpy']}, numba {header['numba']}, "
        f"Python {header['python']}. Measured {header['date']}; load average {header['load_before']} before, "
        f"{header['load_after']} after; {header['minutes']:.1f} minutes in all. The machine is shared with other "
        "work: read the p90s beside the medians.",
        "",
        f"Command: `{header['command']}`",
        "",
        "Steps, bytes, memory and round trips come from `Coordinator(spec).run()` on a private single-node Ray "
        "instance on loopback (the script starts it; the coordinator reuses it) or on the inline backend in the "
        "script's process. Ray runs use the object-store transport (`resources.transport = \"object_store\"`, "
        "the one a multi-node cluster uses; on one node the default is shared memory, measured in the section "
        "on the peer comparison). "
        "The engine's actors get the Ray backend's defaults (`worker_cpus = shard_cpus = 0`): numba limited to "
        f"1 thread, and Ray sets OMP_NUM_THREADS={o['actor_threads']['OMP_NUM_THREADS']} in its workers, "
        "so OpenBLAS runs 1 thread per actor; the inline backend runs every actor's work one after another in "
        "one process with the default 2 threads for numba and OpenBLAS.",
        "",
        "### Targets",
        "",
        "| target | measured | |",
        "|---|---|---|",
        "| ray step time within 1.5x of inline at 10M parameters | worst ray / inline "
        f"{worst_ratio:.2f}x (" + ", ".join(f"{r['shards']} shard(s) {r['ray'] / r['inline']:.2f}x" for r in ten)
        + f") | {_met(worst_ratio <= 1.5)} |",
        "| object-store bytes per step at the minimum P (1 + W) | measured / minimum "
        + ", ".join(f"{r['model']} {r['shards']} shard(s) {r['bytes'] / r['minimum']:.3f}" for r in scaling)
        + f" | {_met(all(r['bytes'] <= r['minimum'] * 1.01 for r in scaling))} |",
        f"| coordinator overhead <= 3 ms per step (tiny model, ray, 1 shard, 1 worker) | {_ms(ray_overhead)} ms "
        f"(ray step {_ms(o['ray'])} - compute {_ms(o['compute'])}); the same calls with no work in them take "
        f"{_ms(o['step_calls'])} ms | {_met(ray_overhead <= 0.003)} |",
        f"| shard RSS within 10% of 12 B x elements + idle actor ({big[-1]['model']} parameters, Adam) | VmRSS: "
        f"worst {worst_rss:+.1%}; its private part (RssAnon vs 12 B x elements + idle RssAnon): worst "
        f"{worst_anon:+.1%} | VmRSS {_met(abs(worst_rss) <= 0.10)}; RssAnon {_met(abs(worst_anon) <= 0.10)} |",
        "| LBFGS round trips per iteration constant in history_size | coordinator "
        + ", ".join(_counts(r["trips"]) for r in lbfgs) + "; space reductions "
        + ", ".join(_counts(r["reductions"]) for r in lbfgs) + " (history_size "
        + ", ".join(str(r["history_size"]) for r in lbfgs) + f"; every run) | {_met(constant)} |",
        "",
        f"Overhead: the two calls of a step on actors that do nothing already take {_ms(o['step_calls'])} ms "
        f"here (a sync no-op call: {_ms(o['sync'])} ms): they form one chain (the previous step's reduce_apply, "
        "the compute that takes its result, the reduce_apply that takes compute's piece, the wait for it), and "
        "every result in it goes through the driver, which owns it and sends it on. What the engine adds on "
        f"top, {_ms(ray_overhead - o['step_calls'])} ms, is moving its payloads (one flat array per dtype for a "
        "shard's slices, a dict of per-parameter arrays per gradient piece) and the actors' own call handling. "
        f"Memory: a shard's private memory (RssAnon) is within {abs(worst_anon):.1%} of its parameters and Adam "
        "state plus the idle actor's; VmRSS also counts the object-store pages the shard has touched "
        "(RssShmem: the initial slice it was started with, the packed slices it returns from the first step's "
        "get_params and from every apply, the gradient pieces it reads in place), "
        "which belong to the object store and are shared with the workers that read them (see the memory "
        "section).",
        "",
        f"### Step time, inline vs ray (Adam, {WORKERS} gradient workers, batch {BATCH})",
        "",
        f"Medians (p90) of the steps after the first {WARMUP} of every run: the coordinator's per-step "
        "`seconds`: submitting the step's compute calls (or finding them submitted with the previous step's "
        "update) and its reduce_apply calls (reduce and apply in one call per shard: no clipping, "
        "`nonfinite = \"stop\"`), and waiting once for its losses and shard reports (which includes the "
        "previous step's update: the workers' compute takes its result). Runs alternate between backends and configurations over "
        f"{header['rounds']} round(s). Models: "
        + "; ".join(f"{r['model']}: {'-'.join(map(str, r['sizes']))}"
                    for r in scaling if r["shards"] == scaling[0]["shards"])
        + ".",
        "",
        "| model | params | shards | steps | inline ms | ray ms | inline steps/s | ray steps/s | ray / inline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in scaling:
        lines.append(f"| {r['model']} | {r['params']:,} | {r['shards']} | {r['steps']} | {_ms(r['inline'])} "
                     f"({_ms(r['inline_p90'])}) | {_ms(r['ray'])} ({_ms(r['ray_p90'])}) | {1 / r['inline']:.1f} | "
                     f"{1 / r['ray']:.1f} | {r['ray'] / r['inline']:.2f} |")
    lines += [
        "",
        "### Object-store bytes per step (the same Ray runs)",
        "",
        "Measured: the raylet's count of bytes created in the object store since the node started "
        "(`store_stats.cumulative_created_bytes` of Ray's memory-info reply: every object put into shared "
        "memory, i.e. actor results and arguments above Ray's 100 KiB inline limit), read in `on_step` after "
        f"step {COUNT_FROM} and after the last step of every Ray run, each time once every shard has answered a "
        "ping submitted after its apply (the apply is not waited for, and its result must be in the store "
        f"before the count is read; step {COUNT_FROM} is a warm-up step, so this wait delays no timed step); "
        "per step = the difference / the steps between "
        "(median over the runs; the range when they differ). Results below the inline limit (losses, shard "
        "reports) travel inside Ray's messages and are not in the count. Minimum: P (1 + W), P = the "
        f"parameters' bytes (float32), W = {WORKERS}: every shard's apply returns its packed slices once for "
        "all workers, every worker puts its gradient once, cut into one piece per shard.",
        "",
        "| model | shards | MB per step | objects per step | minimum MB | measured / minimum |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in scaling:
        low, high = r["bytes_spread"]
        spread = "" if high - low < 1 else f" ({_mb(low)}-{_mb(high)})"
        lines.append(f"| {r['model']} | {r['shards']} | {_mb(r['bytes'])}{spread} | {r['objects']:.1f} | "
                     f"{_mb(r['minimum'])} | {r['bytes'] / r['minimum']:.3f} |")
    lines += [
        "",
        f"### Coordinator overhead per step (synthetic-mlp {'-'.join(map(str, o['sizes']))}, {o['params']:,} "
        f"parameters, batch {TINY_BATCH}, 1 shard, 1 worker)",
        "",
        "Compute = the actors' methods of one step in the coordinator's order (`compute` on the packed slices "
        "the previous `reduce_apply` returned, then `reduce_apply`; `get_params` once, before the first step) called "
        "directly on plain `ShardActor` / `GradientWorker` objects in the script's process, interleaved with "
        "the runs; overhead = step - compute. The reference rows use a Ray actor whose methods do nothing, "
        "started with the engine's actor options: one call waited at a time (sync); a batch of calls waited "
        "once (pipelined, per call); and a step's calls with no work in them (a two-result call on actor B "
        "taking the second result of the previous round's call on actor A, a two-result call on A taking B's "
        "second result, one wait for B's first result and A's first: the dependency shape of the coordinator's "
        "step). "
        f"Medians (p90) over {header['tiny_rounds']} round(s).",
        "",
        "| what | ms |",
        "|---|---:|",
        f"| ray step | {_ms(o['ray'])} ({_ms(o['ray_p90'])}) |",
        f"| inline step | {_ms(o['inline'])} ({_ms(o['inline_p90'])}) |",
        f"| compute (the actors' methods, in-process) | {_ms(o['compute'])} ({_ms(o['compute_p90'])}) |",
        f"| **ray overhead = ray step - compute** | **{_ms(ray_overhead)}** |",
        "| inline overhead = inline step - compute (the coordinator's own Python) | "
        f"{_ms(o['inline'] - o['compute'])} |",
        f"| no-op actor call, sync | {_ms(o['sync'])} ({_ms(o['sync_p90'])}) |",
        f"| no-op actor call, pipelined (per call) | {_ms(o['pipelined'])} ({_ms(o['pipelined_p90'])}) |",
        f"| a step's calls on no-op actors | {_ms(o['step_calls'])} ({_ms(o['step_calls_p90'])}) |",
        f"| ray overhead - the step's calls on no-op actors (payloads, serialization) | "
        f"{_ms(ray_overhead - o['step_calls'])} |",
        "",
        f"### Shard actor memory after one Adam step (1 worker, batch {MEMORY_BATCH})",
        "",
        "RSS from `/proc/<pid>/status` of every shard actor's process (its pid from `ShardActor.ping`), read "
        "in `on_step` after step 1 once every shard has answered a ping submitted after its apply; the row "
        "shows the shard furthest from its expectation. Expected = 12 B x the elements the shard owns "
        "(float32 parameter, exp_avg, exp_avg_sq) + the idle actor: a shard actor right after it started "
        f"(16 parameters, median of 3): VmRSS {_mib(base['VmRSS'])} MiB = RssAnon {_mib(base['RssAnon'])} + "
        f"RssFile {_mib(base['RssFile'])} + RssShmem {_mib(base['RssShmem'])}. RssAnon is the process's private "
        "memory, RssFile its mapped code and files, RssShmem the object-store pages it has mapped and touched "
        "(its own results, and arguments it read in place), which are shared and accounted by the "
        "object store. Models: "
        + "; ".join(f"{r['model']}: {'-'.join(map(str, r['sizes']))} ({r['params']:,} parameters)"
                    for r in memory["rows"] if r["shards"] == 1)
        + ".",
        "",
        "| model | shards | elements per shard | expected MiB | VmRSS MiB | VmRSS / expected | RssAnon MiB | "
        "RssAnon / (12 B x elements + idle RssAnon) | RssFile MiB | RssShmem MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in memory["rows"]:
        w = r["worst"]
        lines.append(f"| {r['model']} | {r['shards']} | {w['elements']:,} | {_mib(w['expected'])} | "
                     f"{_mib(w['VmRSS'])} | {w['VmRSS'] / w['expected']:.3f} | {_mib(w['RssAnon'])} | "
                     f"{w['RssAnon'] / w['expected_anon']:.3f} | "
                     f"{_mib(w['RssFile'])} | {_mib(w['RssShmem'])} |")
    one = [r for r in big if r["shards"] == 1][0]
    growth = ", ".join(f"step {r['step']}: {_mib(r['RssShmem'])} MiB (VmRSS {_mib(r['VmRSS'])})"
                       for r in one["by_step"])
    lines += [
        "",
        f"The {one['model']} 1-shard run took {MEMORY_STEPS} steps and was read after each; its shard's RssShmem: "
        f"{growth}; RssAnon stayed at " + "/".join(_mib(r["RssAnon"]) for r in one["by_step"]) + " MiB. "
        f"The ~1k row measures what a step adds to an idle actor whatever the model's size (RssAnon "
        f"{_mib(tiny['RssAnon'] - base['RssAnon'])} MiB, RssFile {_mib(tiny['RssFile'] - base['RssFile'])} MiB: "
        "the optimizer's compiled kernel and the libraries the first step loads).",
        "",
        f"### LBFGS round trips per iteration (least-squares {LBFGS_TASK['rows']} x {LBFGS_TASK['cols']}, "
        f"float64, lr 1, max_iter {LBFGS_MAX_ITER}, no line search, {LBFGS_SHARDS} shards, 1 worker, ray)",
        "",
        "Counted between the end of step 1 and the end of the last step: the coordinator's `round_trips` "
        "(every wait: closure evaluations and reductions) and `ShardedSpace.round_trips` (reductions alone), "
        "divided by the LBFGS iterations in between (the driver's `n_iter`). Time per iteration: a step's "
        "`seconds` / its iterations, median (p90) over the steps after the first; the history sizes alternate "
        f"over {header['lbfgs_rounds']} run(s) each, and the counts are every run's.",
        "",
        "| history_size | iterations | closure evaluations | history length reached | coordinator round trips "
        "/ iteration | space reductions / iteration | ms / iteration |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in lbfgs:
        lines.append(f"| {r['history_size']} | {r['iterations']} | {r['evals']} | {r['history_reached']} | "
                     f"{_counts(r['trips'])} | {_counts(r['reductions'])} | {r['ms_per_iteration']:.2f} "
                     f"({r['ms_per_iteration_p90']:.2f}) |")
    lines += [
        "",
        f"A step of {LBFGS_MAX_ITER} iterations makes 2 round trips before its loop (the closure, |g|max), then "
        "per iteration one batched Gram reduction, and on every iteration but the step's last a closure, "
        f"|g|max and |d|max: 2 + {LBFGS_MAX_ITER} + {LBFGS_MAX_ITER - 1} x 3 = "
        f"{2 + LBFGS_MAX_ITER + 3 * (LBFGS_MAX_ITER - 1)} "
        f"round trips, {(2 + LBFGS_MAX_ITER + 3 * (LBFGS_MAX_ITER - 1)) / LBFGS_MAX_ITER:.2f} per iteration, "
        "whatever the history's length; the Gram reduction carries more dot products as the history grows "
        "(3 x (2m + 3) per shard): its work grows with the history, the number of round trips does not.",
        END,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer configurations and steps; never writes the doc")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("grpc") is None:
        parser.error("the object-store byte count needs Ray's gRPC client: pip install grpcio")
    import numba
    import numpy as np
    import ray

    mode = MODES["quick" if args.quick else "full"]
    started = time.perf_counter()
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level="WARNING")
    try:
        print("step time and object-store bytes", flush=True)
        scaling = measure_scaling(mode)
        print("coordinator overhead", flush=True)
        overhead = measure_overhead(mode)
        print("shard memory", flush=True)
        memory = measure_memory(mode)
        print("LBFGS round trips", flush=True)
        lbfgs = measure_lbfgs(mode)
    finally:
        ray.shutdown()
    header = {
        "machine": machine(), "ray": ray.__version__, "numpy": np.__version__, "numba": numba.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "rounds": mode["rounds"],
        "command": " ".join(["python benchmarks/engine.py", *(argv if argv is not None else sys.argv[1:])]),
        "load_before": load_before, "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "minutes": (time.perf_counter() - started) / 60, "tiny_rounds": mode["tiny_rounds"],
        "lbfgs_rounds": mode["lbfgs_rounds"],
    }
    section = render(scaling, overhead, memory, lbfgs, header)
    print(section)
    if not args.no_write and not args.quick:
        write_section(args.doc, BEGIN, END, section)
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
