"""Train a small MLP classifier in numpy with shardstep's Adam and a cosine LR schedule.

    python examples/train_classifier.py [--epochs 30] [--seed 0]

The five steps: data (three interleaved spirals), model (2 -> 64 -> 3 MLP, tanh), loss
(softmax cross-entropy), optimizer (AdamW + CosineAnnealingLR), iterate (mini-batches with a
closure). It prints one line per epoch and ends with the training accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from shardstep.workers.optim import AdamW, Parameter, lr_scheduler


def spirals(n_per_class: int, classes: int, rng: np.random.Generator):
    """``classes`` interleaved noisy spirals in the plane (a classic non-linear task)."""
    radius = np.tile(np.linspace(0.05, 1.0, n_per_class), classes)
    labels = np.repeat(np.arange(classes), n_per_class)
    angle = labels * (2 * np.pi / classes) + radius * 4.0 + rng.normal(0, 0.2, radius.size)
    points = np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1)
    return points.astype(np.float32), labels


class MLP:
    """x -> tanh(x W1 + b1) W2 + b2, with its gradient written out by hand."""

    def __init__(self, inputs: int, hidden: int, outputs: int, rng: np.random.Generator):
        def uniform(fan_in, shape):  # torch.nn.Linear's default initialization bounds
            bound = 1.0 / np.sqrt(fan_in)
            return rng.uniform(-bound, bound, shape).astype(np.float32)

        self.w1 = Parameter(uniform(inputs, (inputs, hidden)), name="w1")
        self.b1 = Parameter(uniform(inputs, hidden), name="b1")
        self.w2 = Parameter(uniform(hidden, (hidden, outputs)), name="w2")
        self.b2 = Parameter(uniform(hidden, outputs), name="b2")

    def parameters(self) -> list[Parameter]:
        return [self.w1, self.b1, self.w2, self.b2]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(x @ self.w1.data + self.b1.data) @ self.w2.data + self.b2.data

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray) -> float:
        """Mean softmax cross-entropy; sets ``.grad`` on every parameter."""
        hidden = np.tanh(x @ self.w1.data + self.b1.data)
        logits = hidden @ self.w2.data + self.b2.data
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = -log_probs[np.arange(y.size), y].mean()
        dlogits = np.exp(log_probs)
        dlogits[np.arange(y.size), y] -= 1
        dlogits /= y.size
        dhidden = (dlogits @ self.w2.data.T) * (1 - hidden * hidden)
        self.w2.grad = hidden.T @ dlogits
        self.b2.grad = dlogits.sum(axis=0)
        self.w1.grad = x.T @ dhidden
        self.b1.grad = dhidden.sum(axis=0)
        return float(loss)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a numpy MLP with shardstep's optimizers.")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    x, y = spirals(300, 3, rng)                                              # 1. data
    model = MLP(2, 64, 3, rng)                                               # 2. model
    optimizer = AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)     # 4. optimizer
    steps_per_epoch = -(-len(y) // args.batch_size)
    scheduler = lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)

    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):                                  # 5. iterate
        order = rng.permutation(len(y))
        losses = []
        for first in range(0, len(y), args.batch_size):
            batch = order[first:first + args.batch_size]
            # 3. loss: the closure re-evaluates the model and sets the gradients
            loss = optimizer.step(lambda: model.loss_and_grad(x[batch], y[batch]))
            scheduler.step()
            losses.append(loss)
        accuracy = float((model.logits(x).argmax(axis=1) == y).mean())
        print(f"epoch {epoch:3d}  loss {np.mean(losses):.4f}  accuracy {accuracy:.3f}  "
              f"lr {scheduler.get_last_lr()[0]:.5f}", flush=True)
    print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.1f} s; "
          f"final training accuracy {accuracy:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
