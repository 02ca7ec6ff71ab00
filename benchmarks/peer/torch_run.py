"""The reference: plain torch in one process, 2 threads, Adam (foreach, then fused), the
comparison's model, data and batch (a child process of ``compare.py``).

    python benchmarks/peer/torch_run.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.peer.common import (  # noqa: E402
    CLASSES,
    HIDDEN,
    INPUTS,
    LR,
    SEED,
    TIMED,
    WARMUP,
    emit,
    global_batch,
    make_task,
    median_p90,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timed", type=int, default=TIMED)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    task = make_task()
    initial = task.init_params(SEED)
    steps = WARMUP + args.timed
    batches = [tuple(map(torch.from_numpy, global_batch(task, step))) for step in range(1, steps + 1)]
    sizes = (INPUTS, *HIDDEN, CLASSES)
    for variant in ("foreach", "fused"):
        layers = []
        for index in range(len(sizes) - 1):
            if index:
                layers.append(torch.nn.ReLU())
            layers.append(torch.nn.Linear(sizes[index], sizes[index + 1]))
        model = torch.nn.Sequential(*layers)
        model.load_state_dict({name: torch.from_numpy(array.copy()) for name, array in initial.items()})
        optimizer = torch.optim.Adam(model.parameters(), lr=LR, **{variant: True})
        criterion = torch.nn.CrossEntropyLoss()
        seconds, losses = [], []
        for inputs, labels in batches:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(inputs), labels)
            loss.backward()
            optimizer.step()
            seconds.append(time.perf_counter() - start)
            losses.append(loss.item())
        median, p90 = median_p90(seconds[WARMUP:])
        emit({"system": f"torch-{variant}", "threads": args.threads, "steps": steps, "timed": len(seconds) - WARMUP,
              "median": median, "p90": p90, "seconds": seconds[WARMUP:], "losses": losses, "final_loss": losses[-1]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
