"""Multi-node runs, each in a process of its own (a Ray driver per process; the test session
has its own local Ray instance), reporting what happened as one JSON line.

    python -m tests.cluster.scenarios node-loss --run-dir DIR --when 5 --seed 0
    python -m tests.cluster.scenarios too-small --run-dir DIR
    python -m tests.cluster.scenarios late-node --run-dir DIR
    python -m tests.cluster.scenarios placement --run-dir DIR

The node-loss scenario loses a node abruptly (its raylet and every process it started
SIGKILLed, as when a machine dies) with Ray's default health checks, so the lost node stays
listed alive for 12-15 s, as on a real cluster. ``--when``: "start" (the node is lost just
before the run starts), a step number (after that step's record), "last" (after the last
step) or "checkpoint" (after a step that checkpoints, before its files are written). The
node lost is the one that holds shard 0 (or, with ``--victim worker``, gradient worker 0).

Every result names the nodes the actors of each start ran on and the nodes the coordinator
took as lost, so a test can check that no restart landed on a dead node; the run directory
holds the checkpoints, which the test compares with the single-process reference.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from shardstep.service.coordinator import Coordinator
from shardstep.service.jobspec import JobSpec
from tests.cluster import SimulatedCluster, wait_for  # sets Ray's loopback variable (shardstep imports no ray)

STEPS = 12
CHECKPOINT_EVERY = 4


def digits_job(run_dir: str, **changes) -> JobSpec:
    """The digits job of tests/runs.py (Adam, StepLR, seed 5, batch 96), on Ray."""
    from shardstep.service.jobspec import SchedulerSpec

    base = dict(task="digits", task_args={}, optimizer="adam", optimizer_args={"lr": 0.01}, param_groups=None,
                schedulers=(SchedulerSpec("StepLR", {"step_size": 40, "gamma": 0.5}),), steps=STEPS, epochs=None,
                batch_size=96, seed=5, shards=2, workers=2, backend="ray", checkpoint_every=CHECKPOINT_EVERY,
                run_dir=run_dir)
    return JobSpec(**{**base, **changes})


class Recorder:
    """The on_step and on_event hooks of a coordinator: where each start's actors ran."""

    def __init__(self):
        self.coordinator: Coordinator | None = None
        self.starts: list[list[str | None]] = []
        self.events: list[str] = []
        self.steps: list[int] = []

    def note_start(self) -> None:
        placed = list(self.coordinator.actors.placed)
        if not self.starts or self.starts[-1] != placed:
            self.starts.append(placed)

    def on_step(self, record: dict) -> None:
        self.steps.append(record["step"])
        self.note_start()

    def on_event(self, text: str) -> None:
        self.events.append(text)

    def report(self, **more) -> dict:
        coordinator = self.coordinator
        return {"states": [state.name for state in coordinator.state_log], "starts": self.starts,
                "lost_nodes": sorted(coordinator.lost_nodes), "events": self.events, "steps": self.steps,
                "failures": coordinator.failures, **more}


def node_loss(args: argparse.Namespace) -> dict:
    with SimulatedCluster(head_cpus=0) as cluster:
        for _ in range(3):
            cluster.add_node(num_cpus=2)
        spec = digits_job(args.run_dir, shard_cpus=1, worker_cpus=1, max_failures=2,
                          checkpoint_async=args.when != "checkpoint")
        recorder = Recorder()
        killed: list[str] = []
        victim = 0 if args.victim == "shard" else spec.shards

        def lose_the_victims_node() -> None:
            node = recorder.coordinator.actors.placed[victim]
            cluster.kill_node(node)
            killed.append(node)

        if args.when == "start":
            # the node that would be first in line: Ray still lists it alive for the next 12-15 s
            node = cluster.worker_nodes[0].node_id
            cluster.kill_node(node)
            killed.append(node)
        due = {"last": STEPS, "checkpoint": CHECKPOINT_EVERY * 2}.get(args.when)
        if due is None and args.when != "start":
            due = int(args.when)

        def on_step(record: dict) -> None:
            recorder.on_step(record)
            if not killed and record["step"] == due:
                lose_the_victims_node()

        coordinator = Coordinator(spec, on_step=on_step, on_event=recorder.on_event)
        recorder.coordinator = coordinator
        started = time.monotonic()
        result = coordinator.run()
        return recorder.report(killed=killed, seconds=time.monotonic() - started, result_steps=result.steps,
                               transport=result.transport)


def too_small(args: argparse.Namespace) -> dict:
    """A job that needs 4 CPUs on a cluster of 2: `shardstep run` says what it waits for,
    gives up after start_timeout with exit 1, and SIGTERM while waiting stops it with
    shardstep's own message, leaving no actor behind."""
    job = Path(args.run_dir).parent / "small.toml"
    outcome = {}
    with SimulatedCluster(head_cpus=0, connect=False) as cluster:
        cluster.add_node(num_cpus=2)
        env = {**os.environ, "RAY_ADDRESS": cluster.address, "PYTHONUNBUFFERED": "1"}
        for mode in ("timeout", "sigterm"):
            run_dir = f"{args.run_dir}-{mode}"
            job.write_text(f'run_dir = "{run_dir}"\n[task]\nname = "digits"\n[optimizer]\nname = "adam"\n'
                           f'[training]\nsteps = 5\n[resources]\nshards = 2\nworkers = 2\nshard_cpus = 1\n'
                           f'worker_cpus = 1\nstart_timeout = {12 if mode == "timeout" else 120}\n')
            process = subprocess.Popen([sys.executable, "-m", "shardstep.service.cli", "run", str(job)], env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
            readers = [threading.Thread(target=lambda s=stream, k=key: lines[k].extend(s), daemon=True)
                       for key, stream in (("stdout", process.stdout), ("stderr", process.stderr))]
            for reader in readers:
                reader.start()
            if mode == "sigterm":
                # once it has said what it waits for
                wait_for(lambda: any("waiting for resources" in line for line in lines["stdout"]), 90,
                         "the run to say what it waits for")
                process.send_signal(signal.SIGTERM)
            process.wait(timeout=120)
            for reader in readers:
                reader.join(10)
            out, err = "".join(lines["stdout"]), "".join(lines["stderr"])
            actors = cluster._cluster.global_state.actor_table(None)
            outcome[mode] = {"code": process.returncode, "stdout": out, "stderr": err,
                             "alive_actors": [a for a in actors.values() if a["State"] != "DEAD"]}
        # shared memory on a cluster of two nodes (the head and one more): refused before the
        # run directory is written
        run_dir = f"{args.run_dir}-shared"
        job.write_text(f'run_dir = "{run_dir}"\n[task]\nname = "digits"\n[optimizer]\nname = "adam"\n'
                       f'[training]\nsteps = 5\n[resources]\ntransport = "shared_memory"\n')
        done = subprocess.run([sys.executable, "-m", "shardstep.service.cli", "run", str(job)], env=env,
                              capture_output=True, text=True, timeout=120)
        outcome["shared"] = {"code": done.returncode, "stderr": done.stderr, "created": os.path.exists(run_dir)}
    return outcome


def late_node(args: argparse.Namespace) -> dict:
    """A run that starts on a cluster of one node (auto: shared memory, actors pinned to the
    coordinator's node); a node joins; a worker is killed; the restart decides again."""
    with SimulatedCluster(head_cpus=2) as cluster:
        spec = digits_job(args.run_dir, max_failures=1, checkpoint_async=False)
        recorder = Recorder()
        transports: list[str] = []

        def on_step(record: dict) -> None:
            recorder.on_step(record)
            coordinator = recorder.coordinator
            if not transports or transports[-1] != coordinator.transport:
                transports.append(coordinator.transport)
            if record["step"] == 5 and not cluster.worker_nodes:
                cluster.add_node(num_cpus=2)
                _, pid = coordinator.pids[spec.shards]  # gradient worker 0
                os.kill(pid, signal.SIGKILL)

        coordinator = Coordinator(spec, on_step=on_step, on_event=recorder.on_event)
        recorder.coordinator = coordinator
        result = coordinator.run()
        return recorder.report(transports=transports, result_transport=result.transport,
                               head=cluster.head.node_id, late=[n.node_id for n in cluster.worker_nodes])


def placement(args: argparse.Namespace) -> dict:
    """Labels and custom resources put shards and workers on the nodes that have them; a
    strict_spread placement group puts every actor on a node of its own."""
    with SimulatedCluster(head_cpus=0) as cluster:
        a = cluster.add_node(num_cpus=2, resources={"big_memory": 2}, labels={"zone": "a"})
        b = cluster.add_node(num_cpus=2, labels={"zone": "b"})
        c = cluster.add_node(num_cpus=2, labels={"zone": "b"})
        out = {"nodes": {"a": a.node_id, "b": b.node_id, "c": c.node_id}}
        for name, changes in (
                ("labels", dict(shard_resources={"big_memory": 1}, worker_labels={"zone": "b"}, shard_cpus=1,
                                worker_cpus=1)),
                ("strict_spread", dict(placement="strict_spread", shards=1, workers=2, shard_cpus=0.5,
                                       worker_cpus=0.5))):
            recorder = Recorder()
            coordinator = Coordinator(digits_job(f"{args.run_dir}-{name}", steps=3, checkpoint_every=None,
                                                 **changes), on_step=recorder.on_step)
            recorder.coordinator = coordinator
            result = coordinator.run()
            out[name] = {"placed": recorder.starts, "transport": result.transport}
        return out


SCENARIOS = {"node-loss": node_loss, "too-small": too_small, "late-node": late_node, "placement": placement}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--when", default="5")
    parser.add_argument("--victim", choices=("shard", "worker"), default="shard")
    args = parser.parse_args(argv)
    report = SCENARIOS[args.scenario](args)
    print("RESULT " + json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
