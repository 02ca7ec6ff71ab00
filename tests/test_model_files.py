"""Model files in and out: `shardstep export --format torch|safetensors` writes files torch
(`torch.load(weights_only=True)`) and safetensors load directly, and `[init] from` takes a
`.safetensors` file, a torch file (`torch.save` of a state_dict, or an export) or a native
export, matched by parameter name; a torch pickle that would run code is refused without
running it. The torch tests need the parity extra (skipped without it, run by CI's second
stage); the safetensors ones run everywhere (the reader and writer are shardstep's own)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from shardstep.checkpoints import open_checkpoint
from shardstep.checkpoints.safetensors import SafetensorsFile, write_safetensors
from shardstep.service import cli
from tests.conftest import require_torch
from tests.runs import assert_same, final_params

HIDDEN = 16
JOB = """\
run_dir = "{run_dir}"

[task]
name = "digits"
[task.args]
hidden = [{hidden}]

[optimizer]
name = "adam"
[optimizer.args]
lr = {lr}

[training]
steps = {steps}
batch_size = 64
seed = 3

[resources]
shards = 2
workers = 2
backend = "inline"
{init}"""


def run(tmp_path: Path, capsys, name: str, *, steps: int = 8, lr: float = 0.01, init: str = "",
        hidden: int = HIDDEN) -> tuple[int, str, str]:
    job = tmp_path / f"{name}.toml"
    job.write_text(JOB.format(run_dir=tmp_path / name, steps=steps, lr=lr, hidden=hidden,
                              init=f'\n[init]\nfrom = "{init}"\n' if init else ""))
    code = cli.main(["run", str(job), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def export(run_dir: Path, out: Path, capsys, *extra: str) -> str:
    assert cli.main(["export", str(run_dir), "--out", str(out), *extra]) == 0
    return capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# safetensors: no dependency


def test_the_safetensors_export_loads_with_the_safetensors_library(tmp_path, capsys):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    assert run(tmp_path, capsys, "run")[0] == 0
    out = export(tmp_path / "run", tmp_path / "model.safetensors", capsys)
    assert "parameters, safetensors format of step 8" in out
    loaded = safetensors_numpy.load_file(str(tmp_path / "model.safetensors"))
    assert_same(dict(sorted(loaded.items())), dict(sorted(final_params(tmp_path / "run").items())))
    with SafetensorsFile(tmp_path / "model.safetensors") as weights:
        assert weights.metadata == {"format": "pt"}
        assert np.array_equal(weights.read("0.weight", 5, 70), final_params(tmp_path / "run")["0.weight"].reshape(-1)[5:70])


def test_the_safetensors_reader_refuses_damaged_and_hostile_headers(tmp_path):
    from shardstep.checkpoints.errors import CorruptCheckpointError

    write_safetensors(tmp_path / "good.safetensors", {"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
    good = (tmp_path / "good.safetensors").read_bytes()
    length = int.from_bytes(good[:8], "little")
    header = json.loads(good[8:8 + length])
    cases = {
        "truncated": good[:-4],
        "huge header length": (10**12).to_bytes(8, "little") + good[8:],
        "offsets past the data": None,
        "shape and bytes disagree": None,
    }
    wrong = dict(header, w={**header["w"], "data_offsets": [0, 10**6]})
    text = json.dumps(wrong).encode()
    cases["offsets past the data"] = len(text).to_bytes(8, "little") + text + good[8 + length:]
    wrong = dict(header, w={**header["w"], "shape": [3, 3]})
    text = json.dumps(wrong).encode()
    cases["shape and bytes disagree"] = len(text).to_bytes(8, "little") + text + good[8 + length:]
    for name, data in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(CorruptCheckpointError, match="is not a valid safetensors file"):
            with SafetensorsFile(path) as weights:
                weights.read("w")


def test_fine_tuning_from_a_safetensors_file_loads_it_by_name(tmp_path, capsys):
    assert run(tmp_path, capsys, "base")[0] == 0
    export(tmp_path / "base", tmp_path / "model.safetensors", capsys)
    # lr 0: the fine-tuned run's parameters stay the loaded ones
    code, out, err = run(tmp_path, capsys, "tuned", steps=1, lr=0.0, init=str(tmp_path / "model.safetensors"))
    assert code == 0, err
    assert_same(final_params(tmp_path / "tuned"), final_params(tmp_path / "base"))
    saved = json.loads((tmp_path / "tuned" / "init.json").read_text())
    assert saved["from"] == str(tmp_path / "model.safetensors") and saved["step"] is None
    assert saved["loaded"] == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_a_model_file_that_does_not_fit_is_refused_before_anything_starts(tmp_path, capsys):
    assert run(tmp_path, capsys, "base")[0] == 0
    export(tmp_path / "base", tmp_path / "model.safetensors", capsys)
    code, out, err = run(tmp_path, capsys, "wider", steps=1, hidden=32, init=str(tmp_path / "model.safetensors"))
    assert code == 2 and err.count("\n") == 1, err
    assert "0.weight is float32 (16, 64) in the source and float32 (32, 64) in the model" in err
    assert not (tmp_path / "wider").exists()
    write_safetensors(tmp_path / "other.safetensors", {"encoder.weight": np.zeros((16, 64), np.float32)})
    code, out, err = run(tmp_path, capsys, "other", steps=1, init=str(tmp_path / "other.safetensors"))
    assert code == 2 and "the model has no parameter encoder.weight" in err, err
    job = tmp_path / "state.toml"
    job.write_text(JOB.format(run_dir=tmp_path / "state", steps=1, lr=0.01, hidden=HIDDEN, init="")
                   + f'\n[init]\nfrom = "{tmp_path / "model.safetensors"}"\noptimizer_state = true\n')
    assert cli.main(["run", str(job)]) == 2
    assert "is a model file, which holds parameters only" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# torch (the parity extra)


def torch_mlp(torch, params: dict[str, np.ndarray]):
    model = torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))
    model.load_state_dict({name: torch.from_numpy(np.array(array)) for name, array in params.items()})
    return model


@pytest.mark.torch_live
def test_the_torch_export_loads_weights_only_and_continues_in_torch_like_shardstep(tmp_path, capsys):
    torch = require_torch()
    from shardstep.workers.tasks import make_task

    assert run(tmp_path, capsys, "run", steps=6)[0] == 0
    out = export(tmp_path / "run", tmp_path / "model.pt", capsys)
    assert "torch format of step 6" in out and "torch.load(" in out
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    model = torch_mlp(torch, {name: tensor.numpy() for name, tensor in saved["model"].items()})
    optimizer = torch.optim.Adam(model.named_parameters(), lr=0.01)
    optimizer.load_state_dict(saved["optimizer"])
    assert optimizer.param_groups[0]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]

    # shardstep trains on to step 10; torch takes the same 4 global batches from the export
    assert run(tmp_path, capsys, "run", steps=10)[0] == 0
    task = make_task("digits", hidden=[HIDDEN])
    per_epoch = task.num_batches(64)
    for step in range(6, 10):
        batch = task.batch(3, step // per_epoch, step % per_epoch, 64)
        optimizer.zero_grad()
        logits = model(torch.from_numpy(batch.data["inputs"]))
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch.data["labels"])).backward()
        optimizer.step()
    ours = final_params(tmp_path / "run")
    worst = max(float(np.max(np.abs(ours[name] - tensor.detach().numpy()))) for name, tensor in
                model.state_dict().items())
    # the same Adam, different gradient code (numpy vs autograd): float32 rounding only
    assert worst < 1e-5, worst  # measured: 2.2e-8


@pytest.mark.torch_live
def test_the_safetensors_export_loads_into_torch(tmp_path, capsys):
    torch = require_torch()
    safetensors_torch = pytest.importorskip("safetensors.torch")
    assert run(tmp_path, capsys, "run", steps=3)[0] == 0
    export(tmp_path / "run", tmp_path / "model.safetensors", capsys)
    model = torch.nn.Sequential(torch.nn.Linear(64, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 10))
    model.load_state_dict(safetensors_torch.load_file(str(tmp_path / "model.safetensors")))
    assert_same({name: tensor.detach().numpy() for name, tensor in model.state_dict().items()},
                final_params(tmp_path / "run"))


@pytest.mark.torch_live
def test_fine_tuning_from_torch_files(tmp_path, capsys):
    torch = require_torch()
    assert run(tmp_path, capsys, "base")[0] == 0
    base = final_params(tmp_path / "base")
    export(tmp_path / "base", tmp_path / "export.pt", capsys)
    torch.save(torch_mlp(torch, base).state_dict(), tmp_path / "state_dict.pth")  # what a torch script saves
    for source in ("export.pt", "state_dict.pth"):
        name = source.partition(".")[0]
        code, out, err = run(tmp_path, capsys, name, steps=1, lr=0.0, init=str(tmp_path / source))
        assert code == 0, err
        assert_same(final_params(tmp_path / name), base, f"{source}: ")


class RunsCode:
    """Pickled as a call of os.system: loading it with full unpickling would run the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.torch_live
def test_a_torch_file_that_would_run_code_is_refused_without_running_it(tmp_path, capsys):
    torch = require_torch()
    marker = tmp_path / "ran"
    torch.save({"model": {"0.weight": torch.zeros(16, 64)}, "payload": RunsCode(marker)}, tmp_path / "hostile.pt")
    code, out, err = run(tmp_path, capsys, "tuned", steps=1, init=str(tmp_path / "hostile.pt"))
    assert code == 2 and err.count("\n") == 1, err
    assert "torch.load(weights_only=True) refused it" in err
    assert not marker.exists() and not (tmp_path / "tuned").exists()


def test_export_to_torch_without_torch_names_the_extra(tmp_path, capsys, monkeypatch):
    assert run(tmp_path, capsys, "run", steps=2)[0] == 0
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    assert cli.main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "model.pt")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"needs torch: pip install 'shardstep\[torch\]'", err), err
    assert not (tmp_path / "model.pt").exists()
    with open_checkpoint(tmp_path / "run" / "checkpoints") as checkpoint:
        assert checkpoint.step == 2
