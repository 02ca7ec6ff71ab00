"""One training step of the digits CNN (examples/jobs/digits-cnn.toml): shardstep's loop vs the
same model in torch.

    python benchmarks/cnn_step.py              # the published table (under a minute on 2 cores)
    python benchmarks/cnn_step.py --no-write   # print only

One process, 2 threads for both (numba and BLAS through the environment before numpy loads,
``torch.set_num_threads(2)``). shardstep's step is ``Trainer.step()`` of the local loop on the
``supervised`` task of the job's ``[data]`` and ``[model]`` (Conv2d 1->32, ReLU, Conv2d
32->64, ReLU, MaxPool2d 2, Flatten, Linear 1024->64, ReLU, Linear 64->10; batch 64; Adam).
torch's step is the same ``nn.Sequential`` with the same initial weights on the same
batches: ``zero_grad``, forward, ``cross_entropy``, ``backward``, ``torch.optim.Adam(fused=True)``.
Blocks of ``BLOCK`` steps alternate (ours, torch, ...) for ``ROUNDS`` rounds; medians (p90)
over all but the first ``SETTLE`` steps of each block.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

THREADS = 2
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ[variable] = str(THREADS)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import alternate_blocks, machine, p90, write_section  # noqa: E402

BEGIN, END = "<!-- cnn-step:begin -->", "<!-- cnn-step:end -->"
JOB = ROOT / "examples" / "jobs" / "digits-cnn.toml"
ROUNDS, BLOCK, SETTLE, BATCH = 8, 30, 5, 64


def torch_model(torch, params):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(1024, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    model.load_state_dict({name: torch.from_numpy(array.copy()) for name, array in params.items()})
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    import numpy as np
    import torch

    from shardstep.service.jobspec import load_job
    from shardstep.workers.tasks import make_task
    from shardstep.workers.training import Trainer

    torch.set_num_threads(THREADS)
    spec = load_job(JOB)
    task = make_task(spec.task, **spec.task_args)
    trainer = Trainer(task, seed=0, batch_size=BATCH, optimizer="adam", optimizer_kwargs={"lr": 3e-3})
    model = torch_model(torch, task.init_params(0))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, fused=True)
    per_epoch = task.num_batches(BATCH)
    torch_step = 0

    def step_torch() -> float:
        nonlocal torch_step
        batch = task.batch(0, torch_step // per_epoch, torch_step % per_epoch, BATCH)
        torch_step += 1
        start = time.perf_counter()
        optimizer.zero_grad()
        inputs = torch.from_numpy(batch.data["inputs"]).reshape(-1, 1, 8, 8)
        torch.nn.functional.cross_entropy(model(inputs), torch.from_numpy(batch.data["targets"])).backward()
        optimizer.step()
        return time.perf_counter() - start

    ours, theirs = alternate_blocks(lambda: trainer.step()["seconds"], step_torch, ROUNDS, BLOCK, SETTLE)
    ratio = statistics.median(ours) / statistics.median(theirs)
    section = "\n".join([
        BEGIN,
        "## One training step of a CNN: shardstep's loop vs torch",
        "",
        f"Machine: {machine()}; Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}. Command: `python benchmarks/cnn_step.py`. {THREADS} threads each, "
        f"{ROUNDS} rounds of {BLOCK} steps each, alternating by block, the first {SETTLE} of each block not timed.",
        "",
        f"Model: `examples/jobs/digits-cnn.toml` (Conv2d 1->32, Conv2d 32->64, MaxPool2d, two Linear; batch {BATCH}, "
        "Adam), the same initial weights and batches in both.",
        "",
        "| system | median step (p90) |",
        "|---|---|",
        f"| shardstep `Trainer.step()` | {statistics.median(ours) * 1e3:.2f} ms ({p90(ours) * 1e3:.2f}) |",
        f"| torch, Adam fused | {statistics.median(theirs) * 1e3:.2f} ms ({p90(theirs) * 1e3:.2f}) |",
        "",
        f"Ratio: {ratio:.2f}x torch's step (target: at most 1.5x: {'met' if ratio <= 1.5 else 'missed'}).",
        END,
    ])
    print(section)
    if not args.no_write:
        write_section(args.doc, BEGIN, END, section)
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
