"""Shared by the engine, command-line, submission and fine-tuning tests: the digits job they
run, its single-process reference, and bit-for-bit comparisons."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shardstep.checkpoints import open_checkpoint
from shardstep.service.coordinator import CHECKPOINT_DIR
from shardstep.workers.tasks import make_task
from shardstep.workers.training import Trainer

# a digits job: Adam with a StepLR schedule, 2 shards, 2 workers, seed 5, batch 96
DIGITS_JOB = """\
run_dir = "{run_dir}"

[task]
name = "{task}"

[optimizer]
name = "adam"
[optimizer.args]
lr = 0.01

[[schedulers]]
name = "StepLR"
[schedulers.args]
step_size = 40
gamma = 0.5

[training]
steps = {steps}
batch_size = 96
seed = 5

[resources]
shards = 2
workers = 2
backend = "{backend}"

[checkpoint]
every = {every}
"""


def digits_reference(steps: int) -> dict[str, np.ndarray]:
    """DIGITS_JOB's training in one process (the engine equals it bit for bit)."""
    trainer = Trainer(make_task("digits"), seed=5, batch_size=96, optimizer="adam", optimizer_kwargs={"lr": 0.01},
                      scheduler="StepLR", scheduler_kwargs={"step_size": 40, "gamma": 0.5}, world_size=2)
    return trainer.run(steps=steps).params


def final_params(run_dir: Path) -> dict[str, np.ndarray]:
    """The parameters of a run directory's latest committed checkpoint."""
    with open_checkpoint(run_dir / CHECKPOINT_DIR) as checkpoint:
        return checkpoint.export()[0]


def assert_same(params, reference, label=""):
    """Same names, dtypes and bits."""
    assert list(params) == list(reference)
    for name in reference:
        assert params[name].dtype == reference[name].dtype
        assert np.array_equal(params[name], reference[name]), (
            f"{label}{name}: max |difference| {np.abs(params[name] - reference[name]).max()}")


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` with its bytes (to show nothing changed)."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
