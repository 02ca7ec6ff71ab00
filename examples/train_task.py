"""Train a built-in task with the local loop and print its metrics as it goes.

    python examples/train_task.py digits --epochs 20 --batch-size 64 --lr 3e-3
    python examples/train_task.py ratings --optimizer sparse_adam --lr 5e-2 --batch-size 1024 --epochs 6
    python examples/train_task.py least-squares --optimizer lbfgs --steps 1 --full-batch \\
        --optimizer-arg line_search_fn=strong_wolfe --optimizer-arg max_iter=100

Tasks: digits, digits-triplet, ratings, least-squares, synthetic-mlp (``--task-arg
params=10000000`` sizes the last one). The learning rate follows a cosine schedule over the
whole run unless ``--constant-lr`` is given (or the optimizer is LBFGS).
"""

from __future__ import annotations

import argparse
import ast
import sys
import time

from shardstep.workers.tasks import TASK_NAMES, make_task
from shardstep.workers.training import train


def key_value(text: str) -> tuple[str, object]:
    """``name=value``; the value is a Python literal when it parses as one, else a string."""
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected name=value; got {text!r}")
    try:
        return name, ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return name, raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=TASK_NAMES)
    parser.add_argument("--task-arg", type=key_value, action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--optimizer-arg", type=key_value, action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--full-batch", action="store_true", help="one batch of the whole training set")
    parser.add_argument("--constant-lr", action="store_true")
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs is None and args.steps is None:
        args.epochs = 10

    task = make_task(args.task, **dict(args.task_arg))
    batch_size = task.train_size if args.full_batch else args.batch_size
    optimizer_kwargs = dict(args.optimizer_arg)
    if args.lr is not None:
        optimizer_kwargs["lr"] = args.lr
    schedule = {}
    if not args.constant_lr and args.optimizer.lower() != "lbfgs":
        total = args.steps if args.epochs is None else args.epochs * task.num_batches(batch_size)
        if args.steps is not None:
            total = min(total, args.steps)
        schedule = {"scheduler": "CosineAnnealingLR", "scheduler_kwargs": {"T_max": max(1, total)}}
    eval_every = args.eval_every or task.num_batches(batch_size)

    def report(record):
        if "eval" in record:
            metrics = "  ".join(f"{k} {v:.4f}" for k, v in record["eval"].items())
            print(f"step {record['step']:6d}  epoch {record['epoch']:3d}  loss {record['loss']:.4f}  "
                  f"lr {record['lr']:.2e}  {metrics}", flush=True)

    start = time.perf_counter()
    result = train(task, seed=args.seed, epochs=args.epochs, steps=args.steps, batch_size=batch_size,
                   optimizer=args.optimizer, optimizer_kwargs=optimizer_kwargs, eval_every=eval_every,
                   callback=report, **schedule)
    metrics = "  ".join(f"{k} {v:.6g}" for k, v in result.metrics.items())
    print(f"{args.task}: {result.steps} steps in {time.perf_counter() - start:.1f} s; final {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
