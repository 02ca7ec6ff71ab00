"""A torch module as a job's model (``[model] module = "nets:build"``): the gradient workers
run forward and backward in torch, the parameters and Adam's state live in shardstep's shards.
An MLP and a small conv net trained on Ray (2 shards, 2 workers) follow plain torch with
torch.optim.Adam on the same batches within float32 rounding, bit-identical across shard
counts and backends; the module beside the job file reaches the actors without PYTHONPATH.
Needs the parity extra (torch): skipped without it, run by CI's second stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require_torch
from tests.runs import assert_same, final_params

pytestmark = pytest.mark.torch_live

ROOT = Path(__file__).resolve().parents[1]
NETS = '''\
import torch


def mlp(hidden=32):
    return torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


def convnet(channels=4):
    return torch.nn.Sequential(torch.nn.Conv2d(1, channels, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(channels * 6 * 6, 10))


def with_dropout(p=0.5):
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(p), torch.nn.Linear(32, 10))


def with_buffers():
    return torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 10))
'''
MODELS = {"mlp": ('module = "nets:mlp"\nargs = { hidden = 32 }\ninput_shape = [64]', None),
          "convnet": ('module = "nets:convnet"\nargs = { channels = 4 }\ninput_shape = [1, 8, 8]', (1, 8, 8))}
STEPS, BATCH, LR, SEED = 12, 64, 0.01, 4
JOB = """\
run_dir = "runs/{name}"

[data]
train = "{data}/digits-train.csv"
validation = "{data}/digits-test.csv"
label = "digit"

[model]
{model}
loss = "CrossEntropyLoss"

[optimizer]
name = "adam"
[optimizer.args]
lr = {lr}

[training]
steps = {steps}
batch_size = {batch}
seed = {seed}

[resources]
shards = {shards}
workers = 2
backend = "{backend}"
"""


def project(tmp_path: Path, model: str, shards: int, backend: str) -> Path:
    folder = tmp_path / "project"
    folder.mkdir(exist_ok=True)
    (folder / "nets.py").write_text(NETS)
    name = f"{model}-{backend}-{shards}"
    (folder / f"{name}.toml").write_text(JOB.format(
        name=name, data=ROOT / "examples" / "data", model=MODELS[model][0], lr=LR, steps=STEPS, batch=BATCH,
        seed=SEED, shards=shards, backend=backend))
    return folder / f"{name}.toml"


def shardstep(job: Path, ray_address: str) -> subprocess.CompletedProcess:
    """The command line from another directory, no PYTHONPATH: nets.py beside the job travels."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(RAY_ADDRESS=ray_address, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    return subprocess.run([sys.executable, "-m", "shardstep.service.cli", "run", str(job), "--quiet"],
                          capture_output=True, text=True, cwd=job.parents[1], env=env, timeout=600)


def plain_torch(torch, folder: Path, model: str) -> tuple[dict[str, np.ndarray], list[float]]:
    """The same module trained by torch alone: torch.manual_seed, torch.optim.Adam, the mean
    cross-entropy of the same global batches (the task's sharding rule gives them)."""
    from shardstep.workers.tasks import make_task

    sys.path.insert(0, str(folder))
    try:
        import nets
    finally:
        sys.path.remove(str(folder))
    task = make_task("supervised", data={"train": str(ROOT / "examples" / "data" / "digits-train.csv"),
                                         "label": "digit"},
                     model={"layers": [{"name": "Linear", "args": {"in_features": 64, "out_features": 10}}],
                            "loss": "CrossEntropyLoss"})
    torch.manual_seed(SEED)
    module = nets.mlp(32) if model == "mlp" else nets.convnet(4)
    optimizer = torch.optim.Adam(module.parameters(), lr=LR)
    per_epoch, losses = task.num_batches(BATCH), []
    shape = MODELS[model][1] or (64,)
    for step in range(STEPS):
        batch = task.batch(SEED, step // per_epoch, step % per_epoch, BATCH)
        optimizer.zero_grad()
        inputs = torch.from_numpy(batch.data["inputs"]).reshape(-1, *shape)
        loss = torch.nn.functional.cross_entropy(module(inputs), torch.from_numpy(batch.data["targets"]))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    sys.modules.pop("nets", None)
    return {name: p.detach().numpy().copy() for name, p in module.named_parameters()}, losses


def losses_of(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", list(MODELS))
def test_a_torch_module_trains_like_plain_torch_and_bit_identically_across_shards(tmp_path, ray_address, model):
    torch = require_torch()
    runs = {}
    for backend, shards in (("ray", 2), ("inline", 1), ("inline", 3)):
        job = project(tmp_path, model, shards, backend)
        out = shardstep(job, ray_address)
        assert out.returncode == 0, out.stderr[-3000:]
        runs[(backend, shards)] = job.parent / "runs" / job.stem
    reference = final_params(runs[("ray", 2)])
    for key, run_dir in runs.items():
        assert_same(final_params(run_dir), reference, f"{key}: ")  # shard counts and backends: bit for bit
    ours_losses = losses_of(runs[("ray", 2)])
    theirs, their_losses = plain_torch(torch, tmp_path / "project", model)
    assert list(theirs) == list(reference)
    worst = max(float(np.max(np.abs(reference[name] - theirs[name]))) for name in theirs)
    worst_loss = max(abs(a - b) for a, b in zip(ours_losses, their_losses, strict=True))
    # the same Adam; the gradient is summed from 2 workers' halves instead of one mean
    # measured after 12 steps: parameters 4.5e-8 (both models), losses 1.2e-7 (mlp), 2.4e-7 (convnet)
    assert worst < 1e-5 and worst_loss < 1e-5, (worst, worst_loss)


def test_the_first_parameters_are_torchs_own_initialization(tmp_path):
    torch = require_torch()
    from shardstep.workers.tasks import make_task

    (tmp_path / "nets.py").write_text(NETS)
    sys.path.insert(0, str(tmp_path))
    try:
        task = make_task("supervised", data={"train": str(ROOT / "examples" / "data" / "digits-train.csv"),
                                             "label": "digit"},
                         model={"module": "nets:convnet", "input_shape": [1, 8, 8], "loss": "CrossEntropyLoss"})
        import nets

        torch.manual_seed(7)
        module = nets.convnet()
        ours = task.init_params(7)
        assert list(ours) == [name for name, _ in module.named_parameters()]
        for name, parameter in module.named_parameters():
            assert np.array_equal(ours[name], parameter.detach().numpy()), name
        assert [(s.name, s.shape) for s in task.param_specs()] == [(n, tuple(p.shape)) for n, p in
                                                                   module.named_parameters()]
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("nets", None)


def test_a_torch_modules_dropout_draws_the_steps_masks_and_leaves_torchs_stream_alone(tmp_path):
    """The same batch computed again (a resumed step) gives the same gradient; another batch,
    other masks; the caller's torch generator is where it was."""
    torch = require_torch()
    from shardstep.workers.tasks import make_task

    (tmp_path / "nets.py").write_text(NETS)
    sys.path.insert(0, str(tmp_path))
    try:
        tasks = {p: make_task("supervised", data={"train": str(ROOT / "examples" / "data" / "digits-train.csv"),
                                                  "label": "digit"},
                              model={"module": "nets:with_dropout", "args": {"p": p}, "input_shape": [64],
                                     "loss": "CrossEntropyLoss"}) for p in (0.5, 0.0)}
        params = tasks[0.5].init_params(3)
        first, second = list(tasks[0.5].batches(3, 0, 32))[:2]
        torch.manual_seed(11)
        state = torch.random.get_rng_state()
        grad = tasks[0.5].loss_and_grad(params, first)[1]["0.weight"]
        assert torch.equal(torch.random.get_rng_state(), state)
        again = tasks[0.5].loss_and_grad(params, first)[1]["0.weight"]
        assert np.array_equal(grad, again)
        assert not np.array_equal(grad, tasks[0.0].loss_and_grad(params, first)[1]["0.weight"])
        other = tasks[0.5].loss_and_grad(params, second)[1]["0.weight"]
        assert not np.array_equal(other, tasks[0.0].loss_and_grad(params, second)[1]["0.weight"])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("nets", None)


@pytest.mark.parametrize("model, fragment", [
    ('module = "nets:with_buffers"\ninput_shape = [64]', "has buffers (1.running_mean"),
    ('module = "nets:convnet"\ninput_shape = [64]', "cannot take inputs of model.input_shape [64]"),
    ('module = "nets:missing"\ninput_shape = [64]', "model.module: cannot import nets:missing"),
    ('module = "nets:mlp"\ninput_shape = [32]', "(64,) features per example, but model.input_shape [32] takes 32"),
    ('module = "nets:mlp"\ninput_shape = [64]\nlayers = []', "model has unknown key 'layers'"),
])
def test_a_torch_model_that_does_not_fit_is_refused_before_anything_starts(tmp_path, capsys, model, fragment):
    require_torch()
    from shardstep.service.cli import main

    (tmp_path / "nets.py").write_text(NETS)
    job = tmp_path / "job.toml"
    job.write_text(JOB.format(name="bad", data=ROOT / "examples" / "data", model=model, lr=LR, steps=1, batch=BATCH,
                              seed=SEED, shards=1, backend="inline"))
    try:
        code = main(["run", str(job)])
    finally:
        sys.modules.pop("nets", None)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert fragment in err, err
    assert not (tmp_path / "runs").exists()
