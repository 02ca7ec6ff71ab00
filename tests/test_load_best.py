"""The best checkpoint as a run's result ([checkpoint] load_best): at the end the run names its
best checkpoint by the retention metric, its result parameters are that step's, and `export`
and a fine-tuning job's `init.from` of the run directory take it unless told a step; a resumed
run finds the same best; the key needs keep_best and metric."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from shardstep.checkpoints import best_step, committed_steps, load, open_checkpoint
from shardstep.service import cli
from shardstep.service.coordinator import Coordinator
from shardstep.service.jobspec import JobSpecError, load_job, parse_job
from tests.runs import assert_same

# SGD with a large step on digits: the held-out accuracy rises, peaks at step 30 and falls
# (0.456, 0.490, 0.538, 0.504, 0.403, 0.324 at steps 10 .. 60), so best and last differ
JOB = """\
run_dir = "{run_dir}"

[task]
name = "digits"
[task.args]
hidden = [32]

[optimizer]
name = "sgd"
[optimizer.args]
lr = 0.9
momentum = 0.9

[training]
steps = 60
batch_size = 32
seed = 1
eval_every = 10

[resources]
shards = {shards}
workers = 2
backend = "inline"

[checkpoint]
every = 10
keep_last = 1
keep_best = 1
metric = "accuracy"
mode = "max"
load_best = true
"""


def write_job(tmp_path: Path, name: str = "run", shards: int = 2) -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(JOB.format(run_dir=tmp_path / name, shards=shards))
    return path


def accuracies(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record["eval"]["accuracy"] for record in records if "eval" in record}


def test_the_run_result_is_its_best_checkpoint_at_any_shard_count(tmp_path):
    results = {}
    for shards in (1, 2):
        run_dir = tmp_path / f"run-{shards}"
        result = Coordinator(load_job(write_job(tmp_path, f"run-{shards}", shards))).run()
        seen = accuracies(run_dir)
        best = max(seen, key=lambda step: (seen[step], step))
        assert best == 30 and result.steps == 60
        assert result.best_step == best and result.best_metrics["accuracy"] == seen[best]
        assert committed_steps(run_dir / "checkpoints") == [30, 60]  # keep_best kept it, keep_last the last
        with open_checkpoint(run_dir / "checkpoints", 30) as at_best, open_checkpoint(run_dir / "checkpoints",
                                                                                        60) as last:
            assert_same(result.params, at_best.export()[0])
            assert not np.array_equal(result.params["0.weight"], last.export()[0]["0.weight"])
        results[shards] = result.params
    assert_same(results[1], results[2])


def test_export_and_init_from_take_the_best_unless_told_a_step(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli.main(["run", str(write_job(tmp_path)), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "result: the best checkpoint, step 30 by accuracy (max): loss" in out
    with open_checkpoint(run_dir / "checkpoints", 30) as at_best, open_checkpoint(run_dir / "checkpoints",
                                                                                    60) as last:
        best_params, last_params = at_best.export()[0], last.export()[0]

    assert cli.main(["export", str(run_dir), "--out", str(tmp_path / "best.ckpt")]) == 0
    assert "of step 30 (the run's best checkpoint: its job sets checkpoint.load_best)" in capsys.readouterr().out
    assert_same(load(tmp_path / "best.ckpt")["model"], best_params)
    assert cli.main(["export", str(run_dir), "--step", "60", "--out", str(tmp_path / "last.ckpt")]) == 0
    assert re.search(r"of step 60; load with", capsys.readouterr().out)
    assert_same(load(tmp_path / "last.ckpt")["model"], last_params)

    tuned = tmp_path / "tune.toml"
    tuned.write_text(JOB.format(run_dir=tmp_path / "tuned", shards=2).replace("steps = 60", "steps = 1")
                     .replace("lr = 0.9", "lr = 0.0").replace("momentum = 0.9", "momentum = 0.0")
                     + f'\n[init]\nfrom = "{run_dir}"\n')
    result = Coordinator(load_job(tuned)).run()
    assert result.init["step"] == 30
    with open_checkpoint(tmp_path / "tuned" / "checkpoints", 1) as tuned_checkpoint:
        assert_same(tuned_checkpoint.export()[0], best_params)  # lr 0: the loaded parameters unchanged


def test_a_resumed_run_finds_the_same_best(tmp_path):
    job = write_job(tmp_path)
    finished = Coordinator(load_job(job)).run()
    run_dir = tmp_path / "run"
    shutil.rmtree(run_dir / "checkpoints" / "step-0000000060")  # as if stopped after step 30
    resumed = Coordinator(load_job(job)).run()
    assert resumed.best_step == finished.best_step == 30
    assert_same(resumed.params, finished.params)
    assert best_step(run_dir / "checkpoints", "accuracy", "max") == 30
    assert best_step(run_dir / "checkpoints", "accuracy", "min") == 60  # of the two kept


def test_load_best_needs_keep_best_and_metric(tmp_path):
    text = JOB.format(run_dir=tmp_path / "run", shards=1)
    text = text.replace('keep_best = 1\nmetric = "accuracy"\nmode = "max"\n', "")
    with pytest.raises(JobSpecError, match=re.escape("checkpoint.load_best = true makes the best checkpoint the "
                                                     "run's result, so it needs checkpoint.keep_best and "
                                                     "checkpoint.metric")):
        parse_job(text)
    with pytest.raises(JobSpecError, match=re.escape("checkpoint.load_best must be true or false; got 'yes'")):
        parse_job(JOB.format(run_dir=tmp_path / "run", shards=1).replace("load_best = true", 'load_best = "yes"'))
