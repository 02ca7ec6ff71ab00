"""shardstep against its peer, Ray Train's TorchTrainer with torch DDP and
ZeroRedundancyOptimizer(Adam), on one model, in one run.

    python benchmarks/peer/compare.py            # the published table (about 5 minutes on 2 cores)
    python benchmarks/peer/compare.py --quick    # 10 timed steps; prints the section, never writes the doc

Model, data and schedule: ``common.py`` (MLP 512-2048-2048-10, Adam lr 1e-3, global batch
256, float32; 5 warm-up steps, 30 timed). Every system runs in its own child process, one
after the other, each starting and stopping its own Ray node on loopback (``shardstep_run.py``,
``ray_train_run.py``, ``torch_run.py``), so a run's Ray processes and memory are its own.
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
    CHECKPOINT_EVERY, GLOBAL_BATCH, NUM_PARAMS, RESULT_PREFIX, ROOT, TIMED, WARMUP, descendants, memory_of,
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


def render(rows: dict[str, dict], torch_rows: list[dict], header: dict) -> str:
    ours, peer = rows["shardstep"], rows["peer"]
    one, inline = rows["shardstep-1x1"], rows["inline"]

    def blocking(r: dict) -> float:
        return statistics.median(r["checkpoint_seconds"]) if r["checkpoint_seconds"] else float("nan")

    ours_block = blocking(ours) + (statistics.median(ours["next_step_excess"]) if ours["next_step_excess"] else 0.0)
    imbalance = {k: max(r["state_elements"]) / min(r["state_elements"]) for k, r in (("ours", ours), ("peer", peer))}
    loss_gap = max(abs(a - b) for a, b in zip(ours["losses"], peer["losses"]))
    lines = [
        BEGIN,
        "## shardstep against Ray Train + torch DDP/ZeroRedundancyOptimizer",
        "",
        f"Machine: {header['machine']}; shared with other work (load average {header['load_before']} before, "
        f"{header['load_after']} after). Python {header['python']}, ray {header['ray']}, torch {header['torch']}, "
        f"numpy {header['numpy']}; {header['date']}, {header['minutes']:.1f} minutes.",
        f"Command: `{header['command']}` (both systems and the torch reference in this one run, one after the "
        "other, each in its own process with its own Ray node on 127.0.0.1; `ray.nodes()` checked).",
        "",
        f"Model: MLP 512-2048-2048-10 ({NUM_PARAMS:,} parameters), ReLU, cross-entropy, float32, Adam lr 1e-3, "
        f"global batch {GLOBAL_BATCH}; the same initial parameters, data and batch order in every system "
        f"(shardstep's `synthetic-mlp` task, fed to torch as tensors). {WARMUP} warm-up steps, then "
        f"{header['timed']} timed; checkpoints every {CHECKPOINT_EVERY} steps in the two main rows. "
        "shardstep: `Coordinator(spec).run()`, per-step `seconds` of the coordinator; Ray Train: `TorchTrainer`, "
        "2 workers, DDP (gloo) + `ZeroRedundancyOptimizer(Adam)`, the slower worker's time per step measured in "
        "the train loop (zero_grad, forward, backward with the all-reduce, step). One run per row.",
        "",
        "| system | ms/step median (p90) | launch to first step, s | blocking per checkpoint, s | peak memory, "
        "PSS (RSS) GiB | optimizer-state elements per shard/rank | final loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, r: dict, launch: str, block: str) -> str:
        state = " / ".join(f"{e:,}" for e in r["state_elements"]) if "state_elements" in r else "-"
        return (f"| {name} | {_ms(r['median'])} ({_ms(r['p90'])}) | {launch} | {block} | {_gib(r['peak_pss'])} "
                f"({_gib(r['peak_rss'])}) | {state} | {r['final_loss']:.5f} |")

    lines.append(row("shardstep, ray, 2 shards, 2 workers", ours, f"{ours['launch']:.1f}",
                     f"{blocking(ours):.3f} + {statistics.median(ours['next_step_excess']):.3f}"
                     if ours["next_step_excess"] else f"{blocking(ours):.3f}"))
    lines.append(row("Ray Train TorchTrainer, 2 workers, DDP + ZeRO(Adam)", peer,
                     f"{peer['launch']:.1f} ({peer['launch_from_fit']:.1f} from fit())", f"{blocking(peer):.3f}"))
    lines.append(row("shardstep, ray, 1 shard, 1 worker (no checkpoints)", one, f"{one['launch']:.1f}", "-"))
    lines.append(row("shardstep, inline, 2 shards, 2 workers (no checkpoints)", inline, f"{inline['launch']:.1f}", "-"))
    for r in torch_rows:
        lines.append(f"| torch, one process, {r['threads']} threads, Adam {r['system'].split('-')[1]} | "
                     f"{_ms(r['median'])} ({_ms(r['p90'])}) | - | - | {_gib(r['peak_pss'])} ({_gib(r['peak_rss'])}) "
                     f"| - | {r['final_loss']:.5f} |")
    parts = peer["checkpoint_parts"]
    lines += [
        "",
        "Targets (shardstep 2x2 against Ray Train + ZeRO, measured here):",
        "",
        "| target | shardstep | peer | ratio | verdict |",
        "|---|---:|---:|---:|---|",
        f"| ms/step <= {TARGET_STEP_RATIO}x the peer's | {_ms(ours['median'])} | {_ms(peer['median'])} | "
        f"{ours['median'] / peer['median']:.2f}x | {_verdict(ours['median'] / peer['median'], TARGET_STEP_RATIO)} |",
        f"| launch to first step <= {TARGET_LAUNCH:.0f} s | {ours['launch']:.1f} s | {peer['launch']:.1f} s | "
        f"{ours['launch'] / peer['launch']:.2f}x | {_verdict(ours['launch'], TARGET_LAUNCH)} |",
        f"| blocking per checkpoint <= {TARGET_CHECKPOINT} s | {ours_block:.3f} s | {blocking(peer):.3f} s | "
        f"{ours_block / blocking(peer):.2f}x | {_verdict(ours_block, TARGET_CHECKPOINT)} |",
        f"| optimizer-state imbalance (largest / smallest) <= {TARGET_IMBALANCE} | {imbalance['ours']:.3f} | "
        f"{imbalance['peer']:.3f} | - | {_verdict(imbalance['ours'], TARGET_IMBALANCE)} |",
        f"| peak memory (PSS) <= {TARGET_MEMORY_RATIO}x the peer's | {_gib(ours['peak_pss'])} GiB | "
        f"{_gib(peer['peak_pss'])} GiB | {ours['peak_pss'] / peer['peak_pss']:.2f}x | "
        f"{_verdict(ours['peak_pss'] / peer['peak_pss'], TARGET_MEMORY_RATIO)} |",
        "",
        "How each figure is taken. Launch: from `Coordinator.run()` (which starts Ray) / from `ray.init` before "
        "`TorchTrainer.fit()` to the end of step 1, in a fresh process. Blocking per checkpoint (median over the "
        f"checkpoints at steps {CHECKPOINT_EVERY}, {2 * CHECKPOINT_EVERY}, ...): shardstep = the coordinator's "
        "`_checkpoint` call (staging; the shards write in the background) + how much longer the step after it "
        "took than the median step (the commit rides on it); the peer = `consolidate_state_dict(to=0)` + "
        "`torch.save` on rank 0 + `ray.train.report` with the checkpoint, the slower rank (rank 0's parts, "
        "median: consolidate "
        f"{statistics.median(p['consolidate'] for p in parts):.3f} s, save {statistics.median(p['save'] for p in parts):.3f} s, "
        f"report {statistics.median(p['report'] for p in parts):.3f} s). Memory: the largest sum over the run of "
        "the child process and every process below it (all of the run's Ray processes), sampled once a second. "
        "Optimizer state: Adam's exp_avg and exp_avg_sq elements a shard owns (shardstep's `Coordinator.layout`: "
        "rows split evenly across shards in every parameter) or a rank holds (`ZeroRedundancyOptimizer` "
        "assigns whole tensors). Both systems train the same numbers: their losses differ by at most "
        f"{loss_gap:.1e} over the {ours['steps']} steps (float32 sums in different orders).",
        "",
        "Where shardstep loses time (evidence from this run): the inline backend runs the same actors' methods "
        f"in one process in {_ms(inline['median'])} ms/step, the Ray 1-shard 1-worker run takes "
        f"{_ms(one['median'])} ms and the 2x2 run {_ms(ours['median'])} ms, against {_ms(peer['median'])} ms for "
        f"the peer's DDP step and {_ms(torch_rows[0]['median'])} ms for one torch process (Adam foreach). "
        + header["analysis"],
        END,
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 timed steps; never writes the doc")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    parser.add_argument("--raw", type=Path, default=None, help="also write every measurement to this JSON file")
    args = parser.parse_args(argv)
    import numpy
    import ray
    import torch

    timed = 10 if args.quick else TIMED
    started = time.perf_counter()
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    common = ["--timed", str(timed)]
    checkpoints = ["--checkpoint-every", str(CHECKPOINT_EVERY)]
    rows: dict[str, dict] = {}
    print("shardstep, ray, 2 shards, 2 workers", flush=True)
    rows["shardstep"] = run_child("shardstep", "shardstep_run.py",
                                  ["--backend", "ray", "--shards", "2", "--workers", "2", *checkpoints, *common])[0]
    print("Ray Train + DDP + ZeroRedundancyOptimizer", flush=True)
    rows["peer"] = run_child("peer", "ray_train_run.py", [*checkpoints, *common])[0]
    print("shardstep, ray, 1 shard, 1 worker", flush=True)
    rows["shardstep-1x1"] = run_child("shardstep-1x1", "shardstep_run.py",
                                      ["--backend", "ray", "--shards", "1", "--workers", "1", *common])[0]
    print("shardstep, inline, 2 shards, 2 workers", flush=True)
    rows["inline"] = run_child("inline", "shardstep_run.py",
                               ["--backend", "inline", "--shards", "2", "--workers", "2", *common])[0]
    print("torch, one process", flush=True)
    torch_rows = run_child("torch", "torch_run.py", common)
    leftovers = {k: r["leftovers"] for k, r in rows.items() if r["leftovers"]}
    threads = rows["shardstep"]["threads"]
    header = {
        "machine": machine(), "ray": ray.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "timed": timed,
        "command": " ".join(["python benchmarks/peer/compare.py", *(argv if argv is not None else sys.argv[1:])]),
        "load_before": load_before, "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "minutes": (time.perf_counter() - started) / 60,
        "analysis": analysis(rows, torch_rows, threads),
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


def analysis(rows: dict[str, dict], torch_rows: list[dict], threads: dict) -> str:
    """The measured reasons, in words, from this run's numbers (ratios, not claims)."""
    ours, peer, one, inline = rows["shardstep"], rows["peer"], rows["shardstep-1x1"], rows["inline"]
    reference = torch_rows[0]
    return (
        f"(1) Compute: the inline row runs the actors' methods (numpy forward and backward of `workers.nn`, "
        f"the shards' Adam) in one process with no Ray: {inline['median'] / reference['median']:.2f}x the torch "
        "process's step (Adam foreach), so the kernels account for that ratio and no more. "
        f"(2) Ray: the 1-shard 1-worker Ray step is {one['median'] / inline['median']:.2f}x the inline 2x2 step "
        f"({(one['median'] - inline['median']) * 1e3:+.1f} ms): every step moves the parameters "
        f"({NUM_PARAMS * 4 / 2**20:.0f} MiB) from the shards to the workers and each worker's gradient back "
        "through the object store, and the coordinator waits once per step for the losses and shard reports "
        "before it sends the update, so the update, the next step's parameter transfer and the workers' "
        "compute follow each other without overlap. "
        f"(3) Two actors of each kind on 2 cores: the 2x2 Ray step is {ours['median'] / one['median']:.2f}x "
        f"the 1x1 one ({(ours['median'] - one['median']) * 1e3:+.1f} ms), where the ideal is 0.5x for the compute; "
        f"a gradient worker's process had {threads.get('worker', {}).get('threads')} threads and a shard's "
        f"{threads.get('shard', {}).get('threads')} after step 1, while each of the peer's two workers computes "
        f"on one torch thread (torch.get_num_threads() = {peer['threads']['torch']}, OMP_NUM_THREADS = "
        f"{peer['threads']['OMP_NUM_THREADS']}) and DDP overlaps its all-reduce with the backward. "
        f"(4) Launch: shardstep's 2x2 run reached its first step in {ours['launch']:.1f} s and the 1x1 run in "
        f"{one['launch']:.1f} s (Ray's start, then 2 or 4 actors that import numpy, numba and the task and build "
        "the data on 2 cores). The peer's time goes to its checkpoint (consolidating the sharded Adam state on "
        "rank 0 through gloo, pickling it, copying it to the run's storage) and its launch (the controller, the "
        "worker group, the process group)."
    )


if __name__ == "__main__":
    sys.exit(main())
