"""What both systems of the comparison share: the model, the data, the schedule, and how
results and process memory are read.

Model: MLP 512 -> 2048 -> 2048 -> 10 (5,267,466 parameters), ReLU, cross-entropy, float32;
Adam lr 1e-3; global batch 256 (128 per process with two). Data and initial parameters are
shardstep's ``synthetic-mlp`` task (teacher-labelled Gaussian inputs, torch's default Linear
initialization, parameter names of torch's ``nn.Sequential``): the peer loads the same
initial arrays and reads the same global batches in the same order, so both runs see
identical numbers and their losses can be compared step by step.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

INPUTS, HIDDEN, CLASSES = 512, (2048, 2048), 10
NUM_PARAMS = 5_267_466
GLOBAL_BATCH = 256
LR = 1e-3
SEED = 0
WARMUP = 5
TIMED = 30
CHECKPOINT_EVERY = 10
# the task's arguments: sized so that width_for gives exactly 2048 for both hidden layers
TASK_ARGS = {"params": NUM_PARAMS, "depth": len(HIDDEN), "inputs": INPUTS, "classes": CLASSES,
             "examples": 8192, "eval_examples": 256}
RESULT_PREFIX = "RESULT "


def torch_mlp():
    """The comparison's MLP as a torch module: [model] module for shardstep's torch adapter."""
    import torch

    sizes = (INPUTS, *HIDDEN, CLASSES)
    layers: list[Any] = []
    for index, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:])):
        if index:
            layers.append(torch.nn.ReLU())
        layers.append(torch.nn.Linear(fan_in, fan_out))
    return torch.nn.Sequential(*layers)


def make_task():
    """shardstep's ``synthetic-mlp`` task of exactly this model (checked)."""
    from shardstep.workers.tasks import make_task as build

    task = build("synthetic-mlp", **TASK_ARGS)
    if task.sizes != (INPUTS, *HIDDEN, CLASSES) or task.num_params != NUM_PARAMS:
        raise RuntimeError(f"synthetic-mlp gave sizes {task.sizes} ({task.num_params} parameters); "
                           f"the comparison needs {(INPUTS, *HIDDEN, CLASSES)} ({NUM_PARAMS})")
    return task


def global_batch(task: Any, step: int, rank: int = 0, world_size: int = 1) -> tuple[Any, Any]:
    """Rank ``rank``'s (inputs, labels) of the global batch of optimizer step ``step`` (1-based),
    in the coordinator's order: epoch = (step-1) // batches, index = (step-1) % batches."""
    batches = task.num_batches(GLOBAL_BATCH)
    epoch, index = divmod(step - 1, batches)
    batch = task.batch(SEED, epoch, index, GLOBAL_BATCH, rank, world_size)
    return batch.data["inputs"], batch.data[task.target_key]


def median_p90(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def emit(result: dict[str, Any]) -> None:
    """Hand a child's result to ``compare.py`` on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def loopback_environment() -> None:
    """A private Ray node on 127.0.0.1: without this variable Ray moves the node to the
    machine's external address; gloo binds to the loopback interface too."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def check_loopback() -> list[str]:
    """Every Ray node's address; refuses anything but loopback."""
    import ray

    addresses = sorted({node["NodeManagerAddress"] for node in ray.nodes()})
    if addresses != ["127.0.0.1"]:
        raise RuntimeError(f"Ray's nodes listen on {addresses}; the benchmark needs 127.0.0.1 only")
    return addresses


# ---------------------------------------------------------------------------------------
# process memory


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def descendants(root: int) -> list[int]:
    """``root`` and every process below it."""
    tree, found, todo = _children(), [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(tree.get(pid, []))
    return found


def memory_of(pids: list[int]) -> dict[str, int]:
    """Summed Pss and Rss (bytes) of ``pids`` from /proc/<pid>/smaps_rollup. PSS splits
    every shared page (object-store memory, libraries) among the processes that map it, so
    the sum counts each page once; the RSS sum counts shared pages once per process."""
    total = {"pss": 0, "rss": 0, "processes": 0}
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        values = {}
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] in ("Pss:", "Rss:"):
                values[parts[0][:-1].lower()] = int(parts[1]) * 1024
        if values:
            total["pss"] += values.get("pss", 0)
            total["rss"] += values.get("rss", 0)
            total["processes"] += 1
    return total
