"""Tasks that fail on purpose, for the coordinator's state-machine tests; importable by the
actors (named in jobs as ``"tests.fault_tasks:..."``).

- ``DiesOnFirstStart``: the digits task, but the first actor process to receive it (by
  unpickling, which only an actor does) SIGKILLs itself: a process lost while the run starts.
  ``marker`` is a file that records that it happened (created exclusively: one death only).
- ``NoInitialParameters``: its shapes are known, but building its parameters fails (in the
  shards, which initialize their own rows).
- ``NaNAtStep``: the loss is NaN on global batch ``batch`` of epoch 0.
- ``DivergesFrom``: the loss is infinite on every batch from step ``step`` on.
- ``SlowDigits``: every gradient computation takes at least ``seconds``.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from shardstep.workers.tasks.digits import DigitsTask


class DiesOnFirstStart(DigitsTask):
    def __init__(self, *, marker: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.marker = marker

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        os.kill(os.getpid(), signal.SIGKILL)


class NoInitialParameters(DigitsTask):
    def module_specs(self):
        return super().module_specs()

    def init_params(self, seed: int):
        raise RuntimeError("the initial parameters cannot be built here")


class NaNAtStep(DigitsTask):
    def __init__(self, *, batch: int = 1, **kwargs: Any):
        super().__init__(**kwargs)
        self.batch_with_nan = batch

    def loss_and_grad(self, params, batch):
        loss, grads = super().loss_and_grad(params, batch)
        if batch.epoch == 0 and batch.index == self.batch_with_nan:
            loss = float("nan")
        return loss, grads


class DivergesFrom(DigitsTask):
    """The loss is infinite on every batch from batch ``step`` (1-based) of epoch 0 on: a
    run that has diverged for good."""

    def __init__(self, *, step: int = 3, **kwargs: Any):
        super().__init__(**kwargs)
        self.diverged_from = step

    def loss_and_grad(self, params, batch):
        loss, grads = super().loss_and_grad(params, batch)
        if batch.epoch > 0 or batch.index + 1 >= self.diverged_from:
            loss = float("inf")
        return loss, grads


class SlowDigits(DigitsTask):
    """The digits task with each gradient computation taking at least ``seconds``."""

    def __init__(self, *, seconds: float = 0.02, **kwargs: Any):
        super().__init__(**kwargs)
        self.seconds = seconds

    def loss_and_grad(self, params, batch):
        import time

        time.sleep(self.seconds)
        return super().loss_and_grad(params, batch)
