"""One shardstep run of the comparison's model (a child process of ``compare.py``).

    python benchmarks/peer/shardstep_run.py --backend ray --shards 2 --workers 2 --checkpoint-every 10

``Coordinator(spec).run()`` on a private Ray node on loopback (the coordinator starts it and
stops it) or the inline backend. Step time: the coordinator's per-step ``seconds`` of the
steps after the warm-up. Launch: wall time from the call of ``run()`` (which starts Ray) to
the end of step 1. Checkpoint blocking: the wall time of each of the coordinator's
``_checkpoint`` calls during training (staging and the start of the shards' background
writes) plus how much longer the next step takes than the median step (the commit, once the
files are on disk, rides on that step's evaluation).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peer.common import (  # noqa: E402
    GLOBAL_BATCH,
    INPUTS,
    LR,
    ROOT,
    SEED,
    TASK_ARGS,
    TIMED,
    WARMUP,
    check_loopback,
    emit,
    loopback_environment,
    make_task,
    median_p90,
)

loopback_environment()


def thread_settings(pid: int) -> dict[str, object]:
    """A process's thread count (/proc/<pid>/status)."""
    try:
        threads = int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                           if line.startswith("Threads:")))
    except OSError:
        return {"threads": None}
    return {"threads": threads}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=("ray", "inline"), required=True)
    parser.add_argument("--shards", type=int, required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--worker-cpus", type=float, default=0.0,
                        help="CPUs per gradient worker (Ray sets its BLAS threads to this)")
    parser.add_argument("--transport", choices=("auto", "shared_memory", "object_store"), default="auto")
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--timed", type=int, default=TIMED)
    parser.add_argument("--torch-module", action="store_true",
                        help="the model as a torch module ([model] module: common.torch_mlp) on the task's data")
    parser.add_argument("--thread-environment", action="store_true",
                        help="give this process shardstep's thread environment first, as the shardstep command does")
    args = parser.parse_args()
    if args.thread_environment:
        from shardstep.workers.runtime import use_thread_environment

        use_thread_environment()

    import numpy as np

    from shardstep.service.coordinator import Coordinator
    from shardstep.service.jobspec import JobSpec

    task = make_task()
    steps = WARMUP + args.timed
    with tempfile.TemporaryDirectory(prefix="shardstep-peer-") as scratch:
        run_dir = os.path.join(scratch, "run")
        task_name, task_args, code_dir = "synthetic-mlp", dict(TASK_ARGS), None
        if args.torch_module:
            # the same examples in a file; the module is torch's, initialized by torch
            inputs, labels = task.training_arrays()
            np.savez(os.path.join(scratch, "data.npz"), x=inputs, y=labels)
            task_name, code_dir = "supervised", str(ROOT)
            task_args = {"data": {"train": os.path.join(scratch, "data.npz"), "features": "x", "label": "y"},
                         "model": {"module": "benchmarks.peer.common:torch_mlp", "input_shape": [INPUTS],
                                   "loss": "CrossEntropyLoss"}}
            task = None
        spec = JobSpec(task=task_name, task_args=task_args, optimizer="adam", optimizer_args={"lr": LR},
                       param_groups=None, schedulers=(), steps=steps, epochs=None, batch_size=GLOBAL_BATCH,
                       seed=SEED, shards=args.shards, workers=args.workers, backend=args.backend,
                       worker_cpus=args.worker_cpus, transport=args.transport,
                       checkpoint_every=args.checkpoint_every, run_dir=run_dir, code_dir=code_dir)
        marks: dict[str, float] = {}
        checkpoint_seconds: list[float] = []
        addresses: list[str] = []
        threads: dict[str, dict] = {}
        coordinator: Coordinator | None = None

        def on_step(record: dict) -> None:
            if record["step"] == 1:
                marks["first_step"] = time.perf_counter()
                if args.backend == "ray":
                    addresses.extend(check_loopback())
                    # coordinator.pids: (index, pid) of the shards, then of the workers
                    threads["shard"] = thread_settings(coordinator.pids[0][1])
                    threads["worker"] = thread_settings(coordinator.pids[len(coordinator.shards)][1])

        coordinator = Coordinator(spec, task=task, on_step=on_step)
        original = coordinator._checkpoint

        def timed_checkpoint(wait: bool) -> None:
            start = time.perf_counter()
            original(wait)
            if coordinator.step_count < steps:  # the final checkpoint after training is not a pause
                checkpoint_seconds.append(time.perf_counter() - start)

        coordinator._checkpoint = timed_checkpoint  # measured, not changed: the same call, timed
        marks["run"] = time.perf_counter()
        result = coordinator.run()
        marks["finished"] = time.perf_counter()
        layout = coordinator.layout
        elements = [sum(stop - start for start, stop in layout.slices(s).values()) for s in range(args.shards)]
        history = result.history
        seconds = [r["seconds"] for r in history[WARMUP:]]
        median, p90 = median_p90(seconds)
        after_checkpoint = [r["seconds"] - median for r in history[WARMUP:]
                            if args.checkpoint_every and (r["step"] - 1) % args.checkpoint_every == 0 and r["step"] > 1]
        emit({
            "system": "shardstep", "torch_module": args.torch_module, "backend": args.backend, "shards": args.shards, "workers": args.workers,
            "worker_cpus": args.worker_cpus, "transport": result.transport,
            "steps": steps, "timed": len(seconds), "median": median, "p90": p90, "seconds": seconds,
            "launch": marks["first_step"] - marks["run"], "total": marks["finished"] - marks["run"],
            "checkpoint_every": args.checkpoint_every, "checkpoint_seconds": checkpoint_seconds,
            "next_step_excess": after_checkpoint,
            "param_elements": elements, "state_elements": [2 * e for e in elements],
            "losses": [r["loss"] for r in history], "final_loss": history[-1]["loss"],
            "addresses": addresses, "threads": threads, "pid": os.getpid(),
        })
    return 0


if __name__ == "__main__":
    sys.exit(main())
