"""One training step of the modular-addition transformer (examples/jobs/modular-addition.toml):
shardstep's loop vs the same model in torch.

    python benchmarks/transformer_step.py              # the published table (about a minute on 2 cores)
    python benchmarks/transformer_step.py --no-write   # print only

One process, 2 threads for both (BLAS through the environment before numpy loads,
``torch.set_num_threads(2)``). shardstep's step is ``Trainer.step()`` of the local loop on the
``modular-addition`` task (token and position embeddings, one pre-norm TransformerEncoderLayer
d_model 128, 4 heads, feed-forward 512, LayerNorm, Linear 128->97 at the ``=`` position;
batch 512; AdamW). torch's step is the same module built from torch.nn with the same initial
weights on the same batches: ``zero_grad``, forward, ``cross_entropy``, ``backward``,
``torch.optim.AdamW(fused=True)``. Blocks of ``BLOCK`` steps alternate (ours, torch, ...)
for ``ROUNDS`` rounds; medians (p90) over all but the first ``SETTLE`` steps of each block.
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

BEGIN, END = "<!-- transformer-step:begin -->", "<!-- transformer-step:end -->"
JOB = ROOT / "examples" / "jobs" / "modular-addition.toml"
ROUNDS, BLOCK, SETTLE = 6, 25, 5


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
    batch_size = spec.batch_size
    options = dict(spec.optimizer_args)
    trainer = Trainer(task, seed=0, batch_size=batch_size, optimizer="adamw", optimizer_kwargs=options)
    model = task.torch_module()
    model.load_state_dict({name: torch.from_numpy(array.copy()) for name, array in task.init_params(0).items()})
    optimizer = torch.optim.AdamW(model.parameters(), **{**options, "betas": tuple(options["betas"])}, fused=True)
    per_epoch = task.num_batches(batch_size)
    torch_step = 0

    def step_torch() -> float:
        nonlocal torch_step
        batch = task.batch(0, torch_step // per_epoch, torch_step % per_epoch, batch_size)
        torch_step += 1
        start = time.perf_counter()
        optimizer.zero_grad()
        logits = model(torch.from_numpy(batch.data["tokens"]))
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch.data["labels"])).backward()
        optimizer.step()
        return time.perf_counter() - start

    ours, theirs = alternate_blocks(lambda: trainer.step()["seconds"], step_torch, ROUNDS, BLOCK, SETTLE)
    ratio = statistics.median(ours) / statistics.median(theirs)
    section = "\n".join([
        BEGIN,
        "## One training step of a transformer: shardstep's loop vs torch",
        "",
        f"Machine: {machine()}; Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}. Command: `python benchmarks/transformer_step.py`. {THREADS} threads each, "
        f"{ROUNDS} rounds of {BLOCK} steps each, alternating by block, the first {SETTLE} of each block not timed.",
        "",
        f"Model: `examples/jobs/modular-addition.toml` (embeddings, one pre-norm TransformerEncoderLayer d_model "
        f"{task.d_model}, {task.nhead} heads, feed-forward {task.dim_feedforward}, LayerNorm, Linear; 3 tokens, batch "
        f"{batch_size}, AdamW), the same initial weights and batches in both.",
        "",
        "| system | median step (p90) |",
        "|---|---|",
        f"| shardstep `Trainer.step()` | {statistics.median(ours) * 1e3:.2f} ms ({p90(ours) * 1e3:.2f}) |",
        f"| torch, AdamW fused | {statistics.median(theirs) * 1e3:.2f} ms ({p90(theirs) * 1e3:.2f}) |",
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
