"""Gradient accumulation (training.accumulate = k): each worker computes its share of the
global batch in k micro-batches and adds them, so a step is the same step as without, up to
the order of float sums (docs/jobs.md gives the measured bounds checked here); with k fixed
it is bit-identical across shard counts, and row-sparse gradients add up too."""

from __future__ import annotations

import numpy as np
import pytest

from shardstep.service import cli
from shardstep.service.coordinator import Coordinator
from shardstep.service.jobspec import JobSpec
from shardstep.workers.tasks import make_task
from shardstep.workers.tasks.base import accumulated_loss_and_grad, epoch_order, micro_batches
from tests.runs import DIGITS_JOB, assert_same


def run(tmp_path, name: str, *, accumulate: int, shards: int = 2, task: str = "digits",
        optimizer: str = "adam") -> dict[str, np.ndarray]:
    spec = JobSpec(task=task, task_args={}, optimizer=optimizer, optimizer_args={"lr": 0.01}, param_groups=None,
                   schedulers=(), steps=20, epochs=None, batch_size=96, seed=5, shards=shards, workers=2,
                   backend="inline", run_dir=str(tmp_path / name), accumulate=accumulate)
    return Coordinator(spec).run().params


def test_micro_batches_tile_the_batch_and_their_gradients_add_up():
    task = make_task("digits")
    params = task.init_params(0)
    batch = task.batch_in_order(0, 0, 0, 96, 1, 2, epoch_order(0, 0, task.train_size))
    pieces = micro_batches(batch, 5)
    assert [p.size for p in pieces] == [9, 10, 9, 10, 10]
    assert np.array_equal(np.concatenate([p.examples for p in pieces]), batch.examples)
    assert all(p.global_size == batch.global_size for p in pieces)
    loss, grads = task.loss_and_grad(params, batch)
    accumulated_loss, accumulated = accumulated_loss_and_grad(task, params, batch, 5)
    assert accumulated_loss == pytest.approx(loss, rel=1e-6)  # float32 sums in another order
    for name, grad in grads.items():
        # float32 sums in another order: within 1e-6 of the gradient's largest entry (8 ulps)
        assert np.abs(accumulated[name] - grad).max() <= 1e-6 * np.abs(grad).max(), name


def test_a_run_with_accumulation_follows_the_run_without_and_is_bit_identical_across_shards(tmp_path):
    plain = run(tmp_path, "plain", accumulate=1)
    three = run(tmp_path, "three", accumulate=3)
    for name in plain:  # 20 Adam steps of float32: measured 1.2e-6 at most, on parameters up to 0.3
        assert np.abs(three[name] - plain[name]).max() <= 1e-5 * np.abs(plain[name]).max(), name
    assert_same(run(tmp_path, "three-one-shard", accumulate=3, shards=1), three)


def test_row_sparse_gradients_accumulate(tmp_path):
    plain = run(tmp_path, "plain", accumulate=1, task="ratings", optimizer="sparse_adam")
    four = run(tmp_path, "four", accumulate=4, task="ratings", optimizer="sparse_adam")
    for name in plain:
        assert np.abs(four[name] - plain[name]).max() <= 1e-5 * np.abs(plain[name]).max(), name


@pytest.mark.parametrize(("value", "message"), [
    ("0", "training.accumulate must be an integer >= 1; got 0"),
    ("97", "training.accumulate = 97 micro-batches cannot be cut from training.batch_size = 96 examples; give at "
           "most 96"),
    ("2.5", "training.accumulate must be an integer >= 1"),
])
def test_bad_accumulate_is_refused_before_anything_is_written(tmp_path, capsys, value, message):
    job = tmp_path / "job.toml"
    job.write_text(DIGITS_JOB.format(run_dir=tmp_path / "run", task="digits", steps=5, backend="inline", every=5)
                   .replace("seed = 5\n", f"seed = 5\naccumulate = {value}\n", 1))
    assert cli.main(["run", str(job)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "run").exists()
