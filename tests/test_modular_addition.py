"""The modular-addition task (grokking): its split, its transformer's loss and gradients
against the same model in torch, and a short run on Ray with 2 shards and 2 workers,
bit-identical to inline, and the reproduction itself: the example job on Ray (2 shards, 2
workers) fits its training half long before the held-out half, then reaches >= 99% held-out
(about 90 s on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardstep.workers.tasks import make_task
from shardstep.workers.tasks.modular_addition import modular_pairs
from tests.conftest import require_torch
from tests.runs import assert_same, final_params

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"modulus": 11, "d_model": 16, "nhead": 4, "dim_feedforward": 24, "num_layers": 2, "dtype": "float64"}


def test_the_split_holds_every_pair_once_and_follows_the_split_seed():
    data = modular_pairs(97, 0.5, 0)
    assert data.train_labels.size == 4704 and data.held_out_labels.size == 9409 - 4704
    tokens = np.concatenate([data.train_tokens, data.held_out_tokens])
    pairs = tokens[:, 0] * 97 + tokens[:, 1]
    assert np.array_equal(np.sort(pairs), np.arange(9409))
    assert np.all(tokens[:, 2] == 97)                                # the `=` token
    labels = np.concatenate([data.train_labels, data.held_out_labels])
    assert np.array_equal(labels, (tokens[:, 0] + tokens[:, 1]) % 97)
    again, other = modular_pairs(97, 0.5, 0), modular_pairs(97, 0.5, 1)
    assert np.array_equal(again.train_tokens, data.train_tokens)
    assert not np.array_equal(other.train_tokens, data.train_tokens)


@pytest.mark.parametrize("args, message", [
    ({"train_fraction": 1.0}, "train_fraction must be in (0, 1)"),
    ({"train_fraction": 0.0}, "train_fraction must be > 0.0"),
    ({"modulus": 5, "train_fraction": 0.01}, "leaves no training pair"),
    ({"d_model": 10, "nhead": 4}, "nhead must divide d_model (10); got 4"),
    ({"dropout": 1.0}, "dropout must be in [0, 1)"),
    ({"norm_first": "yes"}, "norm_first must be true or false; got 'yes'"),
])
def test_bad_arguments_are_refused_by_name(args, message):
    with pytest.raises((TypeError, ValueError)) as error:
        make_task("modular-addition", **args)
    assert message in str(error.value)


@pytest.mark.torch_live
@pytest.mark.parametrize("norm_first", [True, False])
def test_loss_and_gradients_match_the_same_model_in_torch(norm_first):
    require_torch()
    import torch

    task = make_task("modular-addition", **SMALL, norm_first=norm_first)
    params = task.init_params(0)
    batch = next(iter(task.batches(0, 0, 32)))
    loss, grads = task.loss_and_grad(params, batch)
    model = task.torch_module()
    model.load_state_dict({name: torch.from_numpy(array.copy()) for name, array in params.items()})
    torch_loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(batch.data["tokens"])),
                                                   torch.from_numpy(batch.data["labels"]))
    torch_loss.backward()
    assert abs(loss - torch_loss.item()) <= 1e-12 * abs(torch_loss.item())
    named = dict(model.named_parameters())
    assert set(named) == set(grads)
    for name, grad in grads.items():
        dense = grad.to_dense() if hasattr(grad, "to_dense") else grad
        np.testing.assert_allclose(dense, named[name].grad.numpy(), rtol=1e-9, atol=1e-12, err_msg=name)


def shardstep(*args: str, ray_address: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardstep.service.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "RAY_ADDRESS": ray_address},
                          stdin=subprocess.DEVNULL)


def test_the_example_groks_on_ray_past_99_percent_held_out(tmp_path, ray_address):
    """Power et al.'s result: the training accuracy reaches 99% first, the held-out accuracy
    hundreds of steps later, then stays above 99%."""
    out = shardstep("run", "examples/jobs/modular-addition.toml", "--run-dir", str(tmp_path / "run"), "--backend",
                    "ray", "--quiet", ray_address=ray_address)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    history = [(record["step"], record["eval"]) for record in records if "eval" in record]
    fitted = next(step for step, metrics in history if metrics["train_accuracy"] >= 0.99)
    grokked = next(step for step, metrics in history if metrics["accuracy"] >= 0.99)
    assert grokked >= fitted + 500, history
    assert history[-1][1]["accuracy"] >= 0.99 and history[-1][0] == 3000, history


def test_a_short_run_on_ray_with_2_shards_and_2_workers_equals_inline(tmp_path, ray_address):
    text = (ROOT / "examples" / "jobs" / "modular-addition.toml").read_text()
    text = text.replace("modulus = 97", "modulus = 23").replace("d_model = 128", "d_model = 32")
    text = text.replace("dim_feedforward = 512", "dim_feedforward = 64").replace("steps = 3000", "steps = 12")
    text = text.replace("batch_size = 512", "batch_size = 64").replace("eval_every = 100", "eval_every = 6")
    text = text.replace("every = 500", "every = 6")
    job = tmp_path / "job.toml"
    job.write_text(text)
    for backend in ("ray", "inline"):
        out = shardstep("run", str(job), "--run-dir", str(tmp_path / backend), "--backend", backend, "--quiet",
                        ray_address=ray_address)
        assert out.returncode == 0, out.stderr
    assert_same(final_params(tmp_path / "ray"), final_params(tmp_path / "inline"))
    initial = make_task("modular-addition", modulus=23, d_model=32, nhead=4, dim_feedforward=64).init_params(0)
    assert any(not np.array_equal(initial[name], value) for name, value in final_params(tmp_path / "ray").items())
