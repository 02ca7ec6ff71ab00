"""The peer: Ray Train's ``TorchTrainer``, 2 workers, torch DDP (gloo on loopback) with
``ZeroRedundancyOptimizer(Adam)`` (a child process of ``compare.py``).

    python benchmarks/peer/ray_train_run.py --checkpoint-every 10

The same model, initial parameters, data and batch order as the shardstep runs (see
``common.py``): each worker takes its 128 rows of every global batch of 256; DDP averages
the two workers' mean-loss gradients, which is the gradient of the global batch's mean loss.
Step time: measured inside the train loop on each worker (zero_grad, forward, backward with
DDP's all-reduce, the optimizer step), the slower worker's per step. Launch: wall time from
``ray.init`` (and, separately, from ``fit()``) to the end of step 1. Checkpoint every
``--checkpoint-every`` steps, Ray Train's documented way for this optimizer:
``consolidate_state_dict(to=0)`` on every rank, ``torch.save`` of the model and optimizer
state on rank 0, ``ray.train.report`` with the checkpoint on rank 0 (metrics only on the
others: it is a barrier); blocking time = the slower rank's wall time for the three.
Optimizer-state elements per rank: the parameters ``ZeroRedundancyOptimizer`` assigned to
it (``_partition_parameters``) times Adam's two per-element tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peer.common import (  # noqa: E402
    LR,
    ROOT,
    SEED,
    TIMED,
    WARMUP,
    check_loopback,
    emit,
    loopback_environment,
    median_p90,
)

loopback_environment()
WORKERS = 2


def train_loop(config: dict) -> None:
    """One Ray Train worker's loop; writes its measurements to ``config["out"]``."""
    sys.path.insert(0, config["root"])
    import ray.train
    import torch
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from benchmarks.peer.common import CLASSES, HIDDEN, INPUTS, global_batch, make_task

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    task = make_task()
    initial = task.init_params(SEED)
    sizes = (INPUTS, *HIDDEN, CLASSES)
    layers: list[torch.nn.Module] = []
    for index in range(len(sizes) - 1):
        if index:
            layers.append(torch.nn.ReLU())
        layers.append(torch.nn.Linear(sizes[index], sizes[index + 1]))
    model = torch.nn.Sequential(*layers)
    model.load_state_dict({name: torch.from_numpy(array.copy()) for name, array in initial.items()})
    ddp = DistributedDataParallel(model)
    optimizer = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.Adam, lr=LR)
    partition = optimizer._partition_parameters()
    param_elements = [sum(p.numel() for group in groups for p in group["params"]) for groups in partition]
    criterion = torch.nn.CrossEntropyLoss()
    batches = [global_batch(task, step, rank, world) for step in range(1, config["steps"] + 1)]
    batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]
    seconds, losses, checkpoints, phases = [], [], [], []
    first_step_end = None
    for step in range(1, config["steps"] + 1):
        inputs, labels = batches[step - 1]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(ddp(inputs), labels)
        loss.backward()  # DDP's all-reduce of the gradient buckets runs during it and ends with it
        backward_end = time.perf_counter()
        optimizer.step()  # ZeRO: Adam on this rank's tensors, then every tensor broadcast by its owner
        seconds.append(time.perf_counter() - start)
        phases.append({"forward_backward": backward_end - start, "optimizer_step": seconds[-1] - (backward_end - start)})
        losses.append(loss.item())
        if step == 1:
            first_step_end = time.time()
        if config["checkpoint_every"] and step % config["checkpoint_every"] == 0 and step < config["steps"]:
            marks = [time.perf_counter()]
            optimizer.consolidate_state_dict(to=0)
            marks.append(time.perf_counter())
            with tempfile.TemporaryDirectory(prefix="peer-ckpt-") as directory:
                if rank == 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                               os.path.join(directory, "checkpoint.pt"))
                marks.append(time.perf_counter())
                checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
                ray.train.report({"step": step, "loss": losses[-1]}, checkpoint=checkpoint)
                marks.append(time.perf_counter())
            checkpoints.append({"consolidate": marks[1] - marks[0], "save": marks[2] - marks[1],
                                "report": marks[3] - marks[2], "total": marks[3] - marks[0]})
    dist.barrier()
    with open(os.path.join(config["out"], f"rank-{rank}.json"), "w") as out:
        json.dump({"rank": rank, "seconds": seconds, "phases": phases, "losses": losses, "first_step_end": first_step_end,
                   "checkpoints": checkpoints, "param_elements": param_elements, "pid": os.getpid(),
                   "threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-every", type=int, default=None)
    parser.add_argument("--timed", type=int, default=TIMED)
    args = parser.parse_args()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    steps = WARMUP + args.timed
    with tempfile.TemporaryDirectory(prefix="peer-") as scratch:
        out = os.path.join(scratch, "out")
        os.makedirs(out)
        started = time.time()
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level="WARNING")
        try:
            addresses = check_loopback()
            trainer = TorchTrainer(
                train_loop,
                train_loop_config={"steps": steps, "checkpoint_every": args.checkpoint_every, "out": out,
                                   "root": str(ROOT)},
                scaling_config=ScalingConfig(num_workers=WORKERS, use_gpu=False),
                run_config=RunConfig(storage_path=os.path.join(scratch, "storage"), name="peer"),
                torch_config=TorchConfig(backend="gloo"),
            )
            fit_called = time.time()
            trainer.fit()
            finished = time.time()
        finally:
            ray.shutdown()
        ranks = [json.load(open(os.path.join(out, f"rank-{r}.json"))) for r in range(WORKERS)]
    per_step = [max(r["seconds"][i] for r in ranks) for i in range(steps)]
    timed = per_step[WARMUP:]
    median, p90 = median_p90(timed)
    first = max(r["first_step_end"] for r in ranks)
    checkpoints = [max(r["checkpoints"][i]["total"] for r in ranks) for i in range(len(ranks[0]["checkpoints"]))]
    losses = [sum(r["losses"][i] for r in ranks) / WORKERS for i in range(steps)]
    param_elements = ranks[0]["param_elements"]
    # each rank's median of its timed steps' phases (the ranks wait for each other inside both)
    phases = [{name: statistics.median(p[name] for p in r["phases"][WARMUP:]) for name in r["phases"][0]}
              for r in ranks]
    emit({
        "system": "ray-train", "workers": WORKERS, "steps": steps, "timed": len(timed), "median": median, "p90": p90,
        "seconds": timed, "launch": first - started, "launch_from_fit": first - fit_called,
        "total": finished - started, "checkpoint_every": args.checkpoint_every, "checkpoint_seconds": checkpoints,
        "checkpoint_parts": ranks[0]["checkpoints"], "param_elements": param_elements, "phases": phases,
        "state_elements": [2 * e for e in param_elements], "losses": losses, "final_loss": losses[-1],
        "addresses": addresses, "threads": {"torch": ranks[0]["threads"], "OMP_NUM_THREADS": ranks[0]["OMP_NUM_THREADS"]},
        "pid": os.getpid(),
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
