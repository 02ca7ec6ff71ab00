"""shardstep's step time with another job on the machine, against the same step on a quiet one.

    python benchmarks/contention.py            # the published table (about 15 minutes on 2 cores)
    python benchmarks/contention.py --quick    # 1 round of 10 timed steps; prints, never writes the doc

The configurations are the peer comparison's (``benchmarks/peer``: MLP 512-2048-2048-10,
Adam, global batch 256, float32, 5 warm-up steps): Ray with 2 shards and 2 workers, 2 shards
and 1 two-thread worker, 1 shard and 1 worker, and the inline backend with 2 shards and 2
workers; and, as the machine's yardstick, one torch process with 2 threads (the peer's
reference, ``benchmarks/peer/torch_run.py``). Each is timed quiet and under one competing
job: this script started again with ``--compete``, training the same model with plain torch
(2 threads, torch's own settings) without pause in its own process, from 3 s before the
measured run until it ends. A job the user runs beside shardstep is not under shardstep's
control, so the competitor keeps torch's defaults in every row.

Every shardstep configuration runs under two thread environments:
- shardstep's (``shardstep.workers.runtime.THREAD_ENVIRONMENT``: OpenMP threads wait
  passively), as the ``shardstep`` command and the actors it starts have it. The measured
  process calls ``use_thread_environment()`` as the command does, since the inline backend
  computes in it.
- OpenMP's defaults: ``GOMP_SPINCOUNT=300000``, libgomp's own spin count, given explicitly
  so that shardstep leaves the environment alone.
Rounds rotate the order of the runs; a cell is the median over the rounds of each run's
median step (the coordinator's per-step ``seconds``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peer.common import RESULT_PREFIX, TIMED  # noqa: E402
from benchmarks.report import machine, write_section  # noqa: E402

BEGIN, END = "<!-- contention:begin -->", "<!-- contention:end -->"
PEER = ROOT / "benchmarks" / "peer"
# the target: no configuration more than this much slower under one competing job than quiet
TARGET_RATIO = 1.3
# how long the competitor trains before the measured run starts (its threads and caches warm)
COMPETITOR_SETTLE = 3.0
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# calls of an empty actor method timed for the round-trip row
ROUND_TRIPS = 300

CONFIGURATIONS = {
    "ray-2x2": (["--backend", "ray", "--shards", "2", "--workers", "2"], "ray, 2 shards, 2 workers (1 thread each)"),
    "ray-2x1": (["--backend", "ray", "--shards", "2", "--workers", "1", "--worker-cpus", "2"],
                "ray, 2 shards, 1 worker (worker_cpus = 2: 2 threads)"),
    "ray-1x1": (["--backend", "ray", "--shards", "1", "--workers", "1"], "ray, 1 shard, 1 worker"),
    "inline-2x2": (["--backend", "inline", "--shards", "2", "--workers", "2"], "inline, 2 shards, 2 workers"),
}
# thread environment -> variables given to the measured process (after removing WAIT_VARIABLES)
ENVIRONMENTS = {"shardstep": {}, "openmp-default": {"GOMP_SPINCOUNT": "300000"},
                # the alternatives for the inline backend, whose one process runs every actor's work:
                # numba's own thread pool instead of OpenMP, and one thread for numba and OpenBLAS
                "workqueue": {"NUMBA_THREADING_LAYER": "workqueue"},
                "one-thread": {"NUMBA_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}}
ENVIRONMENT_NAMES = {"shardstep": "shardstep's (passive)", "openmp-default": "OpenMP's defaults (spin)",
                     "workqueue": "numba's workqueue layer instead of OpenMP",
                     "one-thread": "shardstep's, 1 numba and 1 OpenBLAS thread"}
# the thread environments each configuration runs under
INLINE_ONLY = ("workqueue", "one-thread")


def environments_of(configuration: str) -> list[str]:
    return [e for e in ENVIRONMENTS if configuration.startswith("inline") or e not in INLINE_ONLY]


def compete() -> None:
    """The competing job: the comparison's model trained by plain torch, 2 threads, until killed."""
    import torch

    from benchmarks.peer.common import CLASSES, INPUTS, LR, torch_mlp

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = torch_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    inputs, labels = torch.randn(256, INPUTS), torch.randint(0, CLASSES, (256,))
    while True:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()


def ray_round_trips(calls: int) -> None:
    """The latency under every step's Ray calls: the median time of one call of an empty actor
    method, on a private Ray node on loopback (a RESULT line, as the peer children print)."""
    from benchmarks.peer.common import check_loopback, emit, loopback_environment

    loopback_environment()
    import ray

    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, logging_level="ERROR",
             log_to_driver=False)
    try:
        check_loopback()

        @ray.remote(num_cpus=0)
        class Echo:
            def ping(self) -> None:
                return None

        echo = Echo.remote()
        ray.get(echo.ping.remote())
        seconds = []
        for _ in range(calls):
            start = time.perf_counter()
            ray.get(echo.ping.remote())
            seconds.append(time.perf_counter() - start)
        emit({"system": "ray-round-trip", "calls": calls, "median": statistics.median(seconds)})
    finally:
        ray.shutdown()


def _environment(extra: dict[str, str]) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in WAIT_VARIABLES}
    environment.update(extra)
    return environment


def measure(script: str, args: list[str], environment: dict[str, str], loaded: bool) -> list[dict[str, Any]]:
    """One run of a peer benchmark child (its RESULT lines), alone or beside the competitor."""
    competitor = None
    if loaded:
        # torch's own thread settings: the user's job is not shardstep's to tune
        competitor = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--compete"],
                                      env=_environment({}), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(COMPETITOR_SETTLE)
        if competitor.poll() is not None:
            raise RuntimeError(f"the competing job exited with {competitor.returncode}")
    try:
        program = Path(__file__).resolve() if script == "contention.py" else PEER / script
        child = subprocess.run([sys.executable, str(program), *args], env=environment, cwd=ROOT,
                               capture_output=True, text=True, timeout=1800)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if child.returncode != 0:
        raise RuntimeError(f"{script} {' '.join(args)} exited with {child.returncode}:\n{child.stderr[-4000:]}")
    return [json.loads(line[len(RESULT_PREFIX):]) for line in child.stdout.splitlines()
            if line.startswith(RESULT_PREFIX)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round of 10 timed steps; never writes the doc")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--raw", type=Path, default=None, help="also write every measurement to this JSON file")
    parser.add_argument("--compete", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--round-trips", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compete:
        compete()
        return 0
    if args.round_trips is not None:
        ray_round_trips(args.round_trips)
        return 0
    import numpy
    import ray
    import torch

    timed = 10 if args.quick else TIMED
    rounds = 1 if args.quick else args.rounds
    started = time.perf_counter()
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    runs: list[tuple[str, str, bool]] = [(configuration, environment, loaded) for configuration in CONFIGURATIONS
                                         for environment in environments_of(configuration)
                                         for loaded in (False, True)]
    runs += [(reference, "torch-defaults", loaded) for reference in ("torch", "round-trip") for loaded in (False, True)]
    medians: dict[tuple[str, str, bool], list[float]] = {run: [] for run in runs}
    for round_ in range(rounds):
        shift = round_ * len(runs) // rounds
        for configuration, environment, loaded in runs[shift:] + runs[:shift]:
            condition = "loaded" if loaded else "quiet"
            if configuration == "torch":
                results = measure("torch_run.py", ["--timed", str(timed)], _environment({}), loaded)
                value = next(r["median"] for r in results if r["system"] == "torch-foreach")
            elif configuration == "round-trip":
                results = measure("contention.py", ["--round-trips", str(ROUND_TRIPS)], _environment({}), loaded)
                value = results[0]["median"]
            else:
                extra = CONFIGURATIONS[configuration][0]
                results = measure("shardstep_run.py", [*extra, "--timed", str(timed), "--thread-environment"],
                                  _environment(ENVIRONMENTS[environment]), loaded)
                value = results[0]["median"]
            medians[(configuration, environment, loaded)].append(value)
            print(f"round {round_ + 1}: {configuration} {environment} {condition}: {value * 1e3:.1f} ms "
                  f"[{(time.perf_counter() - started) / 60:.1f} min]", flush=True)
    header = {
        "machine": machine(), "ray": ray.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "timed": timed, "rounds": rounds,
        "command": " ".join(["python benchmarks/contention.py", *(argv if argv is not None else sys.argv[1:])]),
        "load_before": load_before, "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "minutes": (time.perf_counter() - started) / 60,
    }
    section = render(medians, header)
    print(section)
    if args.raw is not None:
        args.raw.write_text(json.dumps({"medians": {" ".join(map(str, k)): v for k, v in medians.items()},
                                        "header": header}, indent=1))
    if not args.no_write and not args.quick:
        write_section(args.doc, BEGIN, END, section)
        print(f"wrote {args.doc}")
    return 0


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def render(medians: dict[tuple[str, str, bool], list[float]], header: dict[str, Any]) -> str:
    def cell(configuration: str, environment: str, loaded: bool) -> float:
        return statistics.median(medians[(configuration, environment, loaded)])

    def rounds_of(configuration: str, environment: str, loaded: bool) -> str:
        return ", ".join(_ms(v) for v in medians[(configuration, environment, loaded)])

    lines = [
        BEGIN,
        "## Under a competing job",
        "",
        f"Machine: {header['machine']}; load average {header['load_before']} before, {header['load_after']} after. "
        f"Python {header['python']}, ray {header['ray']}, torch {header['torch']}, numpy {header['numpy']}; "
        f"{header['date']}, {header['minutes']:.1f} minutes.",
        f"Command: `{header['command']}`. {header['rounds']} rounds in a rotated order, {header['timed']} timed "
        "steps per run; a cell is the median over the rounds of each run's median step, ms (each round's value "
        "in brackets). The competing job: the same model trained by plain torch (2 threads, torch's defaults) "
        "in another process, without pause, from 3 s before the run until it ends.",
        "",
        "| configuration | threads wait | quiet, ms | under one competing job, ms | slowdown | target <= "
        f"{TARGET_RATIO}x |",
        "|---|---|---:|---:|---:|---|",
    ]
    for configuration, (_, described) in CONFIGURATIONS.items():
        for environment in environments_of(configuration):
            quiet, loaded = cell(configuration, environment, False), cell(configuration, environment, True)
            ratio = loaded / quiet
            verdict = "met" if ratio <= TARGET_RATIO else f"missed by {ratio / TARGET_RATIO:.2f}x"
            lines.append(
                f"| shardstep, {described} | {ENVIRONMENT_NAMES[environment]} | {_ms(quiet)} "
                f"({rounds_of(configuration, environment, False)}) | {_ms(loaded)} "
                f"({rounds_of(configuration, environment, True)}) | {ratio:.2f}x | {verdict} |")
    quiet, loaded = cell("torch", "torch-defaults", False), cell("torch", "torch-defaults", True)
    lines.append(f"| torch, one process, 2 threads, Adam foreach (the yardstick) | torch's defaults | {_ms(quiet)} "
                 f"({rounds_of('torch', 'torch-defaults', False)}) | {_ms(loaded)} "
                 f"({rounds_of('torch', 'torch-defaults', True)}) | {loaded / quiet:.2f}x | - |")
    quiet, loaded = cell("round-trip", "torch-defaults", False), cell("round-trip", "torch-defaults", True)
    lines.append(f"| one Ray actor call of an empty method (median of {ROUND_TRIPS}) | - | {quiet * 1e3:.2f} "
                 f"| {loaded * 1e3:.2f} | {loaded / quiet:.2f}x | - |")
    lines += ["", analysis(cell), END]
    return "\n".join(lines)


def _alternatives(inline: dict[str, tuple[float, float]]) -> str:
    """How the inline backend's other thread environments compare with shardstep's, quiet and loaded."""
    chosen_quiet, chosen_loaded = inline["shardstep"]
    words = []
    for environment in INLINE_ONLY:
        quiet, loaded = inline[environment]
        verdict = ("slower both quiet and loaded" if quiet > chosen_quiet and loaded > chosen_loaded else
                   "faster both quiet and loaded" if quiet < chosen_quiet and loaded < chosen_loaded else
                   "faster " + ("quiet" if quiet < chosen_quiet else "loaded") + " but slower " +
                   ("loaded" if quiet < chosen_quiet else "quiet"))
        words.append(f"{ENVIRONMENT_NAMES[environment]} takes {_ms(quiet)} ms quiet and {_ms(loaded)} ms loaded "
                     f"({verdict})")
    return "; ".join(words)


def analysis(cell: Any) -> str:
    """What the table says, in words, from this run's numbers."""
    yardstick = cell("torch", "torch-defaults", True) / cell("torch", "torch-defaults", False)
    inline = {environment: (cell("inline-2x2", environment, False), cell("inline-2x2", environment, True))
              for environment in environments_of("inline-2x2")}
    ray_ratios = [cell(c, e, True) / cell(c, e, False) for c in CONFIGURATIONS if c.startswith("ray")
                  for e in environments_of(c)]
    ray_effects = [cell(c, "shardstep", loaded) / cell(c, "openmp-default", loaded) for c in CONFIGURATIONS
                   if c.startswith("ray") for loaded in (False, True)]
    trip_quiet, trip_loaded = cell("round-trip", "torch-defaults", False), cell("round-trip", "torch-defaults", True)
    (passive_quiet, passive_loaded), (spin_quiet, spin_loaded) = inline["shardstep"], inline["openmp-default"]
    return (
        f"Reading the table. One torch process with 2 threads, the yardstick, is {yardstick:.2f}x slower beside "
        "the competing job: on 2 cores a job that keeps both cores busy gets about half of them while another "
        f"does the same, so no configuration that computes on both cores can stay within {TARGET_RATIO}x here, "
        "shardstep's or torch's. Passive waiting pays where numba's and OpenBLAS's threads share one process: "
        f"the inline backend's step takes {_ms(passive_quiet)} ms instead of {_ms(spin_quiet)} ms quiet "
        f"({spin_quiet / passive_quiet:.2f}x faster) and {_ms(passive_loaded)} instead of {_ms(spin_loaded)} ms "
        f"beside the competitor. The alternatives for that process: {_alternatives(inline)}. The Ray "
        "configurations, whose actors run one thread each (two in the 2x1 row), take "
        f"{min(ray_effects):.2f}x to {max(ray_effects):.2f}x the time with passive waiting that they take with "
        "spinning threads (quiet and loaded), and lose far more than the yardstick "
        f"({min(ray_ratios):.1f}x to {max(ray_ratios):.1f}x): one call of an empty actor method takes "
        f"{trip_loaded * 1e3:.2f} ms instead of {trip_quiet * 1e3:.2f} ms beside the competitor, whose threads are "
        "always runnable, so every thread a call wakes (the caller's, Ray's I/O threads in both processes, the "
        "actor's) waits for a core; a step of the engine is a chain of such calls and object transfers between "
        "the coordinator, the workers and the shards (compute, then reduce and apply). Thread settings cannot "
        "shorten that chain; fewer hand-offs per step would."
    )


if __name__ == "__main__":
    sys.exit(main())
