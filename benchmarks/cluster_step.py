"""The step across nodes: time per step and the bytes Ray moves between nodes per step, on a
cluster simulated on this machine, against the same job on one node.

    python -m benchmarks.cluster_step            # the published table (about 5 minutes on 2 cores)
    python -m benchmarks.cluster_step --quick    # one round, fewer steps (about 2 minutes)

Run from the repository root (it uses the simulated cluster of ``tests/cluster``). The job:
``synthetic-mlp`` at about 4M float32 parameters, Adam, 2 shards, 2 gradient workers, every
actor with 1 CPU, batch 64. Configurations:

- ``1 node, shared memory`` / ``1 node, object store``: one raylet with 4 CPUs that also holds
  the coordinator; the two transports of docs/engine.md.
- ``2 nodes`` / ``4 nodes``: a head raylet with no CPUs (the coordinator) and 2 nodes of 2
  CPUs or 4 nodes of 1 CPU, ``placement = "spread"``: the transport is the object store and
  every step's parameters and gradient pieces cross nodes. On 2 nodes each node holds a shard
  and a worker; on 4 nodes every actor has a node of its own.

Each node is its own raylet, object store and worker processes, all on 127.0.0.1: a transfer
between nodes is a real object-manager transfer (chunked, over TCP on loopback), but no
network limits it, and every node shares the same 2 cores. Every configuration is a fresh
cluster in a process of its own; rounds rotate the order. The time of a step is the
coordinator's per-step ``seconds``, the first ``WARMUP`` steps skipped; medians over the pooled
steps of every round. The bytes between nodes are the sum over the nodes of Ray's
``ray_object_manager_bytes{Type="Received"}`` (each raylet's metrics endpoint), read after a
run of ``WARMUP`` steps and after a run of ``WARMUP + steps`` on the same cluster: the
difference over ``steps`` is what one step moves, against the least any placement of these
actors must move (every worker needs every slice held on another node, every shard every
worker's piece computed on another node).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARAMS = 4_000_000
WARMUP = 5
CONFIGURATIONS = ("1 node, shared memory", "1 node, object store", "2 nodes", "4 nodes")
# each measurement's cluster (the two one-node rows share one): its own process
CLUSTERS = {"1 node": ("1 node, shared memory", "1 node, object store"), "2 nodes": ("2 nodes",),
            "4 nodes": ("4 nodes",)}
# raylets report their metrics this often (Ray's default is 10 s)
METRICS_INTERVAL_MS = 500
OBJECT_STORE_BYTES = 512 * 1024 * 1024
MEASURE_TIMEOUT_S = 900


def received_bytes(cluster) -> float:
    """Bytes every node's object manager has received from other nodes so far, once the
    readings have settled (a raylet publishes its counters every METRICS_INTERVAL_MS)."""

    def read() -> float:
        total = 0.0
        for node in [cluster.head, *cluster.worker_nodes]:
            url = f"http://127.0.0.1:{node.metrics_export_port}/metrics"
            with urllib.request.urlopen(url, timeout=10) as response:
                for line in response.read().decode().splitlines():
                    if line.startswith("ray_object_manager_bytes{") and 'Type="Received"' in line:
                        total += float(line.rsplit(" ", 1)[1])
        return total

    previous = read()
    while True:
        time.sleep(3 * METRICS_INTERVAL_MS / 1000)
        current = read()
        if current == previous:
            return current
        previous = current


def least_bytes(coordinator, placed: list[str | None]) -> int:
    """What any data path must move between nodes per step for these actors where they are:
    each worker pulls the slices of shards on other nodes, each shard the pieces of workers on
    other nodes (float32: 4 bytes an element)."""
    layout = coordinator.layout
    shards = coordinator.spec.shards
    sizes = [4 * sum(stop - start for start, stop in layout.slices(s).values()) for s in range(shards)]
    shard_nodes, worker_nodes = placed[:shards], placed[shards:]
    total = 0
    for worker_node in worker_nodes:
        for shard, shard_node in enumerate(shard_nodes):
            if worker_node != shard_node:
                total += 2 * sizes[shard]  # its slice to the worker, the worker's piece back
    return total


def measure(cluster_name: str, steps: int) -> list[dict]:
    from shardstep.service.coordinator import Coordinator
    from shardstep.service.jobspec import JobSpec
    from tests.cluster import SimulatedCluster

    system_config = {"metrics_report_interval_ms": METRICS_INTERVAL_MS}
    nodes = {"1 node": 0, "2 nodes": 2, "4 nodes": 4}[cluster_name]
    head_cpus = 4 if nodes == 0 else 0
    rows = []
    with SimulatedCluster(head_cpus=head_cpus, system_config=system_config,
                          object_store_memory=OBJECT_STORE_BYTES) as cluster, \
            tempfile.TemporaryDirectory(prefix="cluster-step-") as directory:
        for _ in range(nodes):
            cluster.add_node(num_cpus=4 // nodes)
        for name in CLUSTERS[cluster_name]:
            transport = "shared_memory" if name.endswith("shared memory") else (
                "object_store" if nodes == 0 else "auto")
            readings = []
            for run, run_steps in enumerate((WARMUP, WARMUP + steps)):
                spec = JobSpec(task="synthetic-mlp", task_args={"params": PARAMS, "depth": 2, "examples": 2048,
                                                                "eval_examples": 64},
                               optimizer="adam", optimizer_args={"lr": 1e-3}, param_groups=None, schedulers=(),
                               steps=run_steps, epochs=None, batch_size=64, seed=0, shards=2, workers=2,
                               backend="ray", transport=transport, shard_cpus=1, worker_cpus=1,
                               placement=None if nodes == 0 else "spread",
                               run_dir=os.path.join(directory, f"{name}-{run}".replace(" ", "-").replace(",", "")))
                seconds: list[float] = []
                placed: list[str | None] = []

                def on_step(record: dict) -> None:
                    seconds.append(record["seconds"])
                    placed[:] = coordinator.actors.placed

                coordinator = Coordinator(spec, on_step=on_step)
                before = received_bytes(cluster)
                result = coordinator.run()
                readings.append(received_bytes(cluster) - before)
            rows.append({"configuration": name, "transport": result.transport, "params": coordinator.task.num_params,
                         "placed": placed, "step_seconds": seconds[WARMUP:],
                         "bytes_per_step": (readings[1] - readings[0]) / steps,
                         "least_bytes_per_step": least_bytes(coordinator, placed)})
    return rows


def run_round(order: list[str], steps: int) -> list[dict]:
    rows = []
    for cluster_name in order:
        command = [sys.executable, "-m", "benchmarks.cluster_step", "--measure", cluster_name, "--steps", str(steps)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=MEASURE_TIMEOUT_S,
                              env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        if done.returncode != 0:
            raise RuntimeError(f"measuring {cluster_name!r} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
        rows.extend(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def table(rows: list[dict]) -> str:
    pooled: dict[str, list[float]] = {}
    moved: dict[str, list[float]] = {}
    least: dict[str, int] = {}
    for row in rows:
        pooled.setdefault(row["configuration"], []).extend(row["step_seconds"])
        moved.setdefault(row["configuration"], []).append(row["bytes_per_step"])
        least[row["configuration"]] = row["least_bytes_per_step"]
    reference = statistics.median(pooled["1 node, shared memory"])
    lines = ["| configuration | ms/step (median) | p90 | ratio to 1 node, shared memory | MB between nodes per step "
             "(median) | least possible MB |", "|---|---:|---:|---:|---:|---:|"]
    for name in CONFIGURATIONS:
        values = sorted(pooled[name])
        median = statistics.median(values)
        p90 = values[int(0.9 * (len(values) - 1))]
        lines.append(f"| {name} | {1000 * median:.1f} | {1000 * p90:.1f} | {median / reference:.2f}x | "
                     f"{statistics.median(moved[name]) / 1e6:.1f} | {least[name] / 1e6:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round of 15 steps")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--measure", choices=sorted(CLUSTERS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.steps)), flush=True)
        return 0
    rounds, steps = (1, 15) if args.quick else (args.rounds, args.steps)
    names = list(CLUSTERS)
    rows = []
    for index in range(rounds):
        order = names[index % len(names):] + names[:index % len(names)]
        rows.extend(run_round(order, steps))
        print(f"round {index + 1} of {rounds} done ({', '.join(order)})", file=sys.stderr, flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
