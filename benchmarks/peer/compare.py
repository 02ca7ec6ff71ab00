"""shardstep against its peer, Ray Train's TorchTrainer with torch DDP and
ZeroRedundancyOptimizer(Adam), on one model, in one run.

    python benchmarks/peer/compare.py            # the published table (about 8 minutes on 2 cores)
    python benchmarks/peer/compare.py --quick    # 1 round of 10 timed steps; prints, never writes the doc

Model, data and schedule: ``common.py`` (MLP 512-2048-2048-10, Adam lr 1e-3, global batch
256, float32; 5 warm-up steps, 30 timed). Every system runs in its own child process, one
after the other, each starting and stopping its own Ray node on loopback (``shardstep_run.py``,
``ray_train_run.py``, ``torch_run.py``), so a run's Ray processes and memory are its own. The
compared systems run in three rounds, in a different order each round (the machine's speed
drifts); a row's figures are the medians over its rounds, and every round's median step is
listed.
Memory: this script reads /proc/<pid>/smaps_rollup of the child and every process below it
(Ray's GCS, raylet, agents, workers, actors) once a second while the child runs and keeps the
largest sums of PSS (shared pages divided among the processes that map them) and of RSS.
Needs torch and ray[train] (the ``peer`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peer.common import (  # noqa: E402
    CHECKPOINT_EVERY,
    GLOBAL_BATCH,
    NUM_PARAMS,
    RESULT_PREFIX,
    ROOT,
    TIMED,
    WARMUP,
    descendants,
    memory_of,
)
from benchmarks.report import machine, write_section  # noqa: E402

BEGIN, END = "<!-- peer:begin -->", "<!-- peer:end -->"
HERE = Path(__file__).resolve().parent
SAMPLE_SECONDS = 1.0
# the targets for shardstep against Ray Train + ZeRO
TARGET_STEP_RATIO = 0.6
TARGET_LAUNCH = 6.0
TARGET_CHECKPOINT = 0.15
TARGET_IMBALANCE = 1.01
TARGET_MEMORY_RATIO = 0.5


def run_child(label: str, script: str, args: list[str]) -> list[dict[str, Any]]:
    """Run one child, sample its process tree's memory, return its results with the peak sums."""
    command = [sys.executable, str(HERE / script), *args]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak = {"pss": 0, "rss": 0, "processes": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            reading = memory_of(descendants(child.pid))
            for key in peak:
                peak[key] = max(peak[key], reading[key])
            done.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = child.communicate()
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise RuntimeError(f"{label} ({' '.join(command)}) exited with {child.returncode}:\n{stderr[-4000:]}")
    results = [json.loads(line[len(RESULT_PREFIX):]) for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    leftovers = [pid for pid in descendants(child.pid) if pid != child.pid]
    for result in results:
        result.update(label=label, peak_pss=peak["pss"], peak_rss=peak["rss"], processes=peak["processes"],
                      wall=time.perf_counter() - started, leftovers=leftovers)
    print(f"  {label}: " + ", ".join(f"{r['system']} median {r['median'] * 1e3:.1f} ms" for r in results)
          + f", peak PSS {peak['pss'] / 2**30:.2f} GiB [{time.perf_counter() - started:.0f} s]", flush=True)
    return results


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def _verdict(value: float, target: float) -> str:
    return "met" if value <= target else f"missed by {value / target:.2f}x"


# the compared systems: label -> (script, arguments, description); all checkpoint every 10 steps
MAIN = {
    "shardstep": ("shardstep_run.py", ["--backend", "ray", "--shards", "2", "--workers", "2"],
                  "shardstep, ray, 2 shards, 2 workers (1 thread each)"),
    "shardstep-2x1": ("shardstep_run.py", ["--backend", "ray", "--shards", "2", "--workers", "1", "--worker-cpus", "2"],
                      "shardstep, ray, 2 shards, 1 worker (worker_cpus = 2: 2 threads)"),
    "peer": ("ray_train_run.py", [], "Ray Train TorchTrainer, 2 workers, DDP + ZeRO(Adam)"),
}
# run once, without checkpoints: where the time goes
EXTRA = {
    "object-store": ("shardstep_run.py", ["--backend", "ray", "--shards", "2", "--workers", "2",
                                          "--transport", "object_store"],
                     "shardstep, ray, 2 shards, 2 workers, object-store transport (no checkpoints)"),
    "shardstep-1x1": ("shardstep_run.py", ["--backend", "ray", "--shards", "1", "--workers", "1"],
                      "shardstep, ray, 1 shard, 1 worker (no checkpoints)"),
    "inline": ("shardstep_run.py", ["--backend", "inline", "--shards", "2", "--workers", "2"],
               "shardstep, inline, 2 shards, 2 workers (no checkpoints)"),
    "torch-module": ("shardstep_run.py", ["--backend", "ray", "--shards", "2", "--workers", "2", "--torch-module"],
                     "shardstep with the model as a torch module ([model] module), ray, 2 shards, 2 workers "
                     "(no checkpoints; torch's initialization)"),
}
# the torch adapter's targets: against the peer, and against one torch process
TARGET_TORCH_MODULE_PEER = 0.5
TARGET_TORCH_MODULE_SINGLE = 1.1
SHARDSTEP_MAIN = ("shardstep", "shardstep-2x1")


def combine(runs: list[dict]) -> dict:
    """One row from a system's rounds: medians over the rounds of the per-run figures, every
    checkpoint's figures pooled, the rest (losses, state sizes, threads) from the first run."""
    row = dict(runs[0])
    for key in ("median", "p90", "launch", "launch_from_fit", "peak_pss", "peak_rss"):
        if key in row:
            row[key] = statistics.median(r[key] for r in runs)
    for key in ("checkpoint_seconds", "next_step_excess", "checkpoint_parts"):
        if key in row:
            row[key] = [x for r in runs for x in r[key]]
    row["round_medians"] = [r["median"] for r in runs]
    row["round_pss"] = [r["peak_pss"] for r in runs]
    return row


def blocking(r: dict) -> float:
    """Median blocking time per checkpoint: shardstep's ``_checkpoint`` call plus how much
    longer the step after it took than the median step; the peer's three parts."""
    pause = statistics.median(r["checkpoint_seconds"]) if r["checkpoint_seconds"] else float("nan")
    if r.get("next_step_excess"):
        pause += statistics.median(r["next_step_excess"])
    return pause


def render(rows: dict[str, dict], torch_rows: list[dict], header: dict) -> str:
    peer = rows["peer"]
    imbalance = {k: max(r["state_elements"]) / min(r["state_elements"]) for k, r in rows.items() if k in MAIN}
    loss_gap = max(max(abs(a - b) for a, b in zip(rows[k]["losses"], peer["losses"])) for k in SHARDSTEP_MAIN)
    lines = [
        BEGIN,
        "## shardstep against Ray Train + torch DDP/ZeroRedundancyOptimizer",
        "",
        f"Machine: {header['machine']}; shared with other work (load average {header['load_before']} before, "
        f"{header['load_after']} after). Python {header['python']}, ray {header['ray']}, torch {header['torch']}, "
        f"numpy {header['numpy']}; {header['date']}, {header['minutes']:.1f} minutes.",
        f"Command: `{header['command']}` (both systems and the torch reference in this one run, each in its own "
        "process with its own Ray node on 127.0.0.1; `ray.nodes()` checked). "
        f"{header['rounds']} rounds of the three compared rows, in a rotated order each round; a row shows the "
        "medians over its rounds.",
        "",
        f"Model: MLP 512-2048-2048-10 ({NUM_PARAMS:,} parameters), ReLU, cross-entropy, float32, Adam lr 1e-3, "
        f"global batch {GLOBAL_BATCH}; the same initial parameters, data and batch order in every system "
        f"(shardstep's `synthetic-mlp` task, fed to torch as tensors). {WARMUP} warm-up steps, then "
        f"{header['timed']} timed; checkpoints every {CHECKPOINT_EVERY} steps in the three compared rows. "
        "shardstep: `Coordinator(spec).run()` with the job's defaults (shared-memory transport on one node), "
        "per-step `seconds` of the coordinator; Ray Train: `TorchTrainer`, 2 workers, DDP (gloo) + "
        "`ZeroRedundancyOptimizer(Adam)`, the slower worker's time per step measured in the train loop "
        "(zero_grad, forward, backward with the all-reduce, step).",
        "",
        "| system | ms/step median (p90) | each round's median, ms | launch to first step, s | blocking per "
        "checkpoint, s | peak memory, PSS (RSS) GiB | optimizer-state elements per shard/rank | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, launch: str, block: str) -> str:
        r = rows[label]
        described = {**MAIN, **EXTRA}[label][2]
        state = " / ".join(f"{e:,}" for e in r["state_elements"]) if "state_elements" in r else "-"
        rounds = ", ".join(_ms(m) for m in r["round_medians"])
        return (f"| {described} | {_ms(r['median'])} ({_ms(r['p90'])}) | {rounds} | {launch} | {block} | "
                f"{_gib(r['peak_pss'])} ({_gib(r['peak_rss'])}) | {state} | {r['final_loss']:.5f} |")

    for label in SHARDSTEP_MAIN:
        r = rows[label]
        lines.append(row(label, f"{r['launch']:.1f}",
                         f"{blocking(r):.3f} ({statistics.median(r['checkpoint_seconds']):.3f} + "
                         f"{statistics.median(r['next_step_excess']):.3f})"))
    lines.append(row("peer", f"{peer['launch']:.1f} ({peer['launch_from_fit']:.1f} from fit())",
                     f"{blocking(peer):.3f}"))
    for label in EXTRA:
        lines.append(row(label, f"{rows[label]['launch']:.1f}", "-"))
    for r in torch_rows:
        lines.append(f"| torch, one process, {r['threads']} threads, Adam {r['system'].split('-')[1]} | "
                     f"{_ms(r['median'])} ({_ms(r['p90'])}) | - | - | - | {_gib(r['peak_pss'])} "
                     f"({_gib(r['peak_rss'])}) | - | {r['final_loss']:.5f} |")

    step = [rows[label]["median"] / peer["median"] for label in SHARDSTEP_MAIN]
    memory = [rows[label]["peak_pss"] / peer["peak_pss"] for label in SHARDSTEP_MAIN]
    a, b = (rows[label] for label in SHARDSTEP_MAIN)
    parts = peer["checkpoint_parts"]
    lines += [
        "",
        "Targets (shardstep against Ray Train + ZeRO, measured here; 2x2 = 2 shards, 2 workers; 2x1 = 2 shards, "
        "1 worker with 2 threads):",
        "",
        "| target | shardstep 2x2 | shardstep 2x1 | peer | verdict 2x2 | verdict 2x1 |",
        "|---|---:|---:|---:|---|---|",
        f"| ms/step <= {TARGET_STEP_RATIO}x the peer's | {_ms(a['median'])} ({step[0]:.2f}x) | "
        f"{_ms(b['median'])} ({step[1]:.2f}x) | {_ms(peer['median'])} | {_verdict(step[0], TARGET_STEP_RATIO)} | "
        f"{_verdict(step[1], TARGET_STEP_RATIO)} |",
        f"| launch to first step <= {TARGET_LAUNCH:.0f} s | {a['launch']:.1f} s | {b['launch']:.1f} s | "
        f"{peer['launch']:.1f} s | {_verdict(a['launch'], TARGET_LAUNCH)} | {_verdict(b['launch'], TARGET_LAUNCH)} |",
        f"| blocking per checkpoint <= {TARGET_CHECKPOINT} s | {blocking(a):.3f} s | {blocking(b):.3f} s | "
        f"{blocking(peer):.3f} s | {_verdict(blocking(a), TARGET_CHECKPOINT)} | "
        f"{_verdict(blocking(b), TARGET_CHECKPOINT)} |",
        f"| optimizer-state imbalance (largest / smallest) <= {TARGET_IMBALANCE} | {imbalance['shardstep']:.3f} | "
        f"{imbalance['shardstep-2x1']:.3f} | {imbalance['peer']:.3f} | "
        f"{_verdict(imbalance['shardstep'], TARGET_IMBALANCE)} | {_verdict(imbalance['shardstep-2x1'], TARGET_IMBALANCE)} |",
        f"| peak memory (PSS) <= {TARGET_MEMORY_RATIO}x the peer's | {_gib(a['peak_pss'])} GiB ({memory[0]:.2f}x) | "
        f"{_gib(b['peak_pss'])} GiB ({memory[1]:.2f}x) | {_gib(peer['peak_pss'])} GiB | "
        f"{_verdict(memory[0], TARGET_MEMORY_RATIO)} | {_verdict(memory[1], TARGET_MEMORY_RATIO)} |",
        f"| torch module ([model] module) ms/step <= {TARGET_TORCH_MODULE_PEER}x the peer's | "
        f"{_ms(rows['torch-module']['median'])} ({rows['torch-module']['median'] / peer['median']:.2f}x) | - | "
        f"{_ms(peer['median'])} | {_verdict(rows['torch-module']['median'] / peer['median'], TARGET_TORCH_MODULE_PEER)}"
        f" | - |",
        f"| torch module ms/step <= {TARGET_TORCH_MODULE_SINGLE}x one torch process (Adam foreach; fused) | "
        f"{_ms(rows['torch-module']['median'])} ({rows['torch-module']['median'] / torch_rows[0]['median']:.2f}x; "
        f"{rows['torch-module']['median'] / torch_rows[-1]['median']:.2f}x) | - | "
        f"{_ms(torch_rows[0]['median'])}; {_ms(torch_rows[-1]['median'])} | "
        f"{_verdict(rows['torch-module']['median'] / torch_rows[0]['median'], TARGET_TORCH_MODULE_SINGLE)}; "
        f"{_verdict(rows['torch-module']['median'] / torch_rows[-1]['median'], TARGET_TORCH_MODULE_SINGLE)} | - |",
        "",
        "How each figure is taken. Launch: from `Coordinator.run()` (which starts Ray) / from `ray.init` before "
        "`TorchTrainer.fit()` to the end of step 1, in a fresh process. Blocking per checkpoint (median over the "
        f"checkpoints at steps {CHECKPOINT_EVERY}, {2 * CHECKPOINT_EVERY}, ... of every round): shardstep = the "
        "coordinator's `_checkpoint` call (the shards stage their slices and state, then write in the background) "
        "+ how much longer the step after it took than the median step (the background write shares the 2 cores "
        "with it; the commit rides on it); the peer = `consolidate_state_dict(to=0)` + `torch.save` on rank 0 + "
        "`ray.train.report` with the checkpoint, the slower rank (rank 0's parts, median: consolidate "
        f"{statistics.median(p['consolidate'] for p in parts):.3f} s, save {statistics.median(p['save'] for p in parts):.3f} s, "
        f"report {statistics.median(p['report'] for p in parts):.3f} s). Memory: the largest sum over a run of "
        "the child process and every process below it (all of the run's Ray processes), sampled once a second; "
        "median over the rounds. Optimizer state: Adam's exp_avg and exp_avg_sq elements a shard owns "
        "(shardstep's `Coordinator.layout`: rows split evenly across shards in every parameter) or a rank holds "
        "(`ZeroRedundancyOptimizer` assigns whole tensors). Both systems train the same numbers: their losses "
        f"differ by at most {loss_gap:.1e} over the {a['steps']} steps (float32 sums in different orders).",
        "",
        header["analysis"],
        END,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round of 10 timed steps; never writes the doc")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the compared systems (default 3)")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--raw", type=Path, default=None, help="also write every measurement to this JSON file")
    args = parser.parse_args(argv)
    import numpy
    import ray
    import torch

    timed = 10 if args.quick else TIMED
    rounds = 1 if args.quick else args.rounds
    started = time.perf_counter()
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    common = ["--timed", str(timed)]
    checkpoints = ["--checkpoint-every", str(CHECKPOINT_EVERY)]
    runs: dict[str, list[dict]] = {label: [] for label in MAIN}
    order = list(MAIN)
    for round_ in range(rounds):
        # rotated each round, so no system always runs first (or after the same neighbour)
        for label in order[round_ % len(order):] + order[:round_ % len(order)]:
            script, extra, described = MAIN[label]
            print(f"round {round_ + 1}: {described}", flush=True)
            runs[label].append(run_child(label, script, [*extra, *checkpoints, *common])[0])
    rows = {label: combine(results) for label, results in runs.items()}
    for label, (script, extra, described) in EXTRA.items():
        print(described, flush=True)
        rows[label] = combine(run_child(label, script, [*extra, *common]))
    print("torch, one process", flush=True)
    torch_rows = run_child("torch", "torch_run.py", common)
    leftovers = {k: r["leftovers"] for k, r in rows.items() if r["leftovers"]}
    header = {
        "machine": machine(), "ray": ray.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "timed": timed, "rounds": rounds,
        "command": " ".join(["python benchmarks/peer/compare.py", *(argv if argv is not None else sys.argv[1:])]),
        "load_before": load_before, "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "minutes": (time.perf_counter() - started) / 60,
        "analysis": analysis(rows, torch_rows),
    }
    section = render(rows, torch_rows, header)
    print(section)
    if leftovers:
        print(f"processes left behind by the children: {leftovers}", flush=True)
    if args.raw is not None:
        args.raw.write_text(json.dumps({"rows": rows, "torch": torch_rows, "header": header}, indent=1))
    if not args.no_write and not args.quick:
        write_section(args.doc, BEGIN, END, section)
        print(f"wrote {args.doc}")
    return 0


def analysis(rows: dict[str, dict], torch_rows: list[dict]) -> str:
    """Where each system spends its step, in words, from this run's numbers."""
    ours, single, peer = rows["shardstep"], rows["shardstep-2x1"], rows["peer"]
    store, one, inline = rows["object-store"], rows["shardstep-1x1"], rows["inline"]
    reference = torch_rows[0]
    phases = peer["phases"]
    backward = max(p["forward_backward"] for p in phases)
    update = max(p["optimizer_step"] for p in phases)
    mib = NUM_PARAMS * 4 / 2**20
    return (
        "Where the time goes. The peer: each rank's forward and backward on its 128 examples with one torch "
        f"thread, including DDP's all-reduce of the {mib:.0f} MiB gradient over gloo (TCP on loopback, its last "
        f"bucket only after the backward), took {_ms(backward)} ms (median, slower rank), and "
        f"`ZeroRedundancyOptimizer.step` {_ms(update)} ms: Adam on the rank's whole tensors (rank 0 holds "
        f"{max(peer['state_elements']) / sum(peer['state_elements']):.0%} of the state), then every parameter "
        f"broadcast by its owner, another {mib:.0f} MiB through gloo, while the other rank waits. One torch "
        f"process computes the whole step in {_ms(reference['median'])} ms, so about "
        f"{_ms(peer['median'] - reference['median'])} ms of the peer's {_ms(peer['median'])} ms go to moving "
        "data between two processes and waiting. "
        "shardstep moves no bulk data through sockets or Ray's object store on one node: the shards update "
        "their rows in place in a shared parameter region that the workers read without a copy, and each "
        "worker's gradient is one memory copy into its shared region that the shards read in place "
        f"(through Ray's object store instead, the same 2x2 run takes {_ms(store['median'])} ms: "
        f"{store['median'] / ours['median']:.2f}x); its optimizer state is split by rows, so both shards "
        "finish their Adam at the same time; the coordinator submits the next step's computation together "
        "with the update, so Ray starts it the moment the update is done. What is left: the numpy kernels "
        f"(the inline row, every actor's work in one process without Ray, takes {_ms(inline['median'])} ms, "
        f"{inline['median'] / reference['median']:.2f}x the torch process), two Ray calls per step "
        f"(compute, then reduce and apply) and, on these 2 cores, 4 actors in the 2x2 row against 3 in the 2x1 "
        f"row ({_ms(ours['median'])} vs {_ms(single['median'])} ms; 1 shard and 1 one-thread worker: "
        f"{_ms(one['median'])} ms). "
        "Checkpoints: each shard copies its slices and state (42 MiB in all) and writes its file in a "
        "background thread, against the peer's consolidation of the whole Adam state on rank 0 through gloo and "
        "a pickle. Launch: Ray's start, then actors that import numpy and the task; the peer also starts Ray "
        "Train's controller, its worker group and the torch process group."
    )


if __name__ == "__main__":
    sys.exit(main())
