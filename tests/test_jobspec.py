"""The job file: every key parsed, every mistake refused with the key, the value and what is
allowed, relative run directories, the dict round trip, overrides, and the example jobs."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import re
from pathlib import Path

import msgpack
import numpy as np
import pytest

from shardstep.checkpoints.run import Retention
from shardstep.service.jobspec import (
    BACKENDS,
    NONFINITE_POLICIES,
    InitSpec,
    JobSpec,
    JobSpecError,
    SchedulerSpec,
    load_job,
    parse_job,
)
from shardstep.workers.optim import Parameter
from shardstep.workers.optim.builders import build_optimizer, build_scheduler
from shardstep.workers.optim.registry import NAMES, rule
from shardstep.workers.tasks import TASK_NAMES
from shardstep.workers.tasks.base import ParamGroupRule
from shardstep.workers.tasks.digits import DigitsTask

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "jobs"


# ---------------------------------------------------------------------------------------
# writing job files from dicts (the cases below are edits of one small valid job)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (datetime.date, datetime.datetime)):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def _toml_table(header: str, table: dict, lines: list[str]) -> None:
    """Plain keys of ``table`` under ``header``, then its sub-tables (``args``)."""
    plain = {k: v for k, v in table.items() if not isinstance(v, dict)}
    nested = {k: v for k, v in table.items() if isinstance(v, dict)}
    lines.append(header)
    lines.extend(f"{k} = {_toml_value(v)}" for k, v in plain.items())
    name = header.strip("[]")
    for key, sub in nested.items():
        lines.append(f"[{name}.{key}]")
        lines.extend(f"{k} = {_toml_value(v)}" for k, v in sub.items())


def to_toml(document: dict) -> str:
    lines = [f"{k} = {_toml_value(v)}" for k, v in document.items()
             if not isinstance(v, dict) and not (isinstance(v, list) and v and all(isinstance(i, dict) for i in v))]
    for key, value in document.items():
        if isinstance(value, dict):
            _toml_table(f"[{key}]", value, lines)
        elif isinstance(value, list) and value and all(isinstance(i, dict) for i in value):
            for item in value:
                _toml_table(f"[[{key}]]", item, lines)
    return "\n".join(lines) + "\n"


BASE = {
    "run_dir": "runs/base",
    "task": {"name": "least-squares", "args": {"rows": 64, "cols": 4}},
    "optimizer": {"name": "sgd", "args": {"lr": 0.1}},
    "training": {"steps": 10},
}


def write_job(tmp_path: Path, document: dict, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(to_toml(document))
    return path


def edited(**sections) -> dict:
    """BASE with whole top-level entries replaced (None removes one)."""
    document = copy.deepcopy(BASE)
    for key, value in sections.items():
        if value is None:
            document.pop(key, None)
        else:
            document[key] = value
    return document


def with_(section: str, **keys) -> dict:
    """BASE with ``keys`` set in table ``section`` (created when absent)."""
    document = copy.deepcopy(BASE)
    document.setdefault(section, {}).update(keys)
    return document


DIGITS = {"name": "digits", "args": {"hidden": [8]}}


class RuledDigitsTask(DigitsTask):
    """A task of one's own with param-group rules of its own (named by module and class)."""

    param_groups = (ParamGroupRule("*.bias", {"lr": 0.01}),)


def failing_lambda(epoch: int) -> float:
    """An lr_lambda with a bug of the user's (it fails at epoch 0, the constructor's step)."""
    return 1.0 / epoch


NOT_CALLABLE = 0.5
SCHEDULE_CALLS: list[int] = []


def recorded_lambda(epoch: int) -> float:
    """An lr_lambda that records its calls."""
    SCHEDULE_CALLS.append(epoch)
    return 1.0


# ---------------------------------------------------------------------------------------
# a complete file: every key set, away from its default


FULL = """
run_dir = "runs/full"
frozen = ["0.*"]

[[param_groups]]
pattern = "*.bias"
weight_decay = 0.0

[init]
from = "runs/base"
step = 50
optimizer_state = true
skip = ["4.*"]

[task]
name = "digits"
[task.args]
hidden = [16, 8]
activation = "tanh"

[optimizer]
name = "AdamW"
[optimizer.args]
lr = 2e-3
betas = [0.9, 0.95]
weight_decay = 0.05

[[schedulers]]
name = "sequentiallr"
interval = "step"
[schedulers.args]
schedulers = [["LinearLR", { start_factor = 0.1, total_iters = 5 }], ["CosineAnnealingLR", { T_max = 95 }]]
milestones = [5]

[[schedulers]]
name = "ReduceLROnPlateau"
interval = "epoch"
monitor = "accuracy"
[schedulers.args]
mode = "max"
patience = 2

[training]
steps = 100
epochs = 4
batch_size = 32
seed = 7
eval_every = 20
clip_grad_norm = 1.5
nonfinite = "skip"
max_skipped_steps = 5
time_limit = 3600.0
accumulate = 2
scalar_dtype = "float64"

[resources]
shards = 3
workers = 2
backend = "ray"
address = "ray://head:10001"
max_failures = 2
worker_cpus = 1
shard_cpus = 0.5
transport = "object_store"
start_timeout = 120
placement = "spread"
shard_resources = { big_memory = 1 }
worker_resources = { accelerator = 0.5 }
shard_labels = { zone = "us-east-1a" }
worker_labels = { "ray.io/market-type" = "!in(spot)" }

[checkpoint]
every = 25
async = false
keep_last = 2
keep_every = 50
keep_best = 1
metric = "accuracy"
mode = "max"
load_best = true

[early_stopping]
metric = "accuracy"
patience = 4
min_delta = 0.01
mode = "max"

[logging]
tensorboard = "board"
mlflow = true
mlflow_tracking_uri = "http://127.0.0.1:5000"
mlflow_experiment = "digits"
ray_metrics = false
"""


def test_a_complete_file_sets_every_field(tmp_path):
    path = tmp_path / "full.toml"
    path.write_text(FULL)
    spec = load_job(path)
    assert spec == JobSpec(
        task="digits", task_args={"hidden": [16, 8], "activation": "tanh"},
        optimizer="adamw", optimizer_args={"lr": 2e-3, "betas": [0.9, 0.95], "weight_decay": 0.05},
        param_groups=(ParamGroupRule("*.bias", {"weight_decay": 0.0}),),
        schedulers=(
            SchedulerSpec("SequentialLR", {"schedulers": [["LinearLR", {"start_factor": 0.1, "total_iters": 5}],
                                                          ["CosineAnnealingLR", {"T_max": 95}]],
                                           "milestones": [5]}),
            SchedulerSpec("ReduceLROnPlateau", {"mode": "max", "patience": 2}, interval="epoch", monitor="accuracy"),
        ),
        steps=100, epochs=4, batch_size=32, seed=7, eval_every=20, clip_grad_norm=1.5, nonfinite="skip",
        max_skipped_steps=5, time_limit=3600.0, accumulate=2, scalar_dtype="float64",
        shards=3, workers=2, backend="ray", address="ray://head:10001", max_failures=2, worker_cpus=1.0,
        shard_cpus=0.5, transport="object_store", start_timeout=120.0, placement="spread",
        shard_resources={"big_memory": 1.0}, worker_resources={"accelerator": 0.5},
        shard_labels={"zone": "us-east-1a"}, worker_labels={"ray.io/market-type": "!in(spot)"}, checkpoint_every=25, checkpoint_async=False, keep_last=2, keep_every=50, keep_best=1,
        keep_metric="accuracy", keep_mode="max", load_best=True, stop_metric="accuracy", stop_patience=4,
        stop_min_delta=0.01, stop_mode="max", tensorboard=str(tmp_path / "board"), mlflow=True,
        mlflow_tracking_uri="http://127.0.0.1:5000", mlflow_experiment="digits", ray_metrics=False,
        run_dir=str(tmp_path / "runs" / "full"),
        frozen=("0.*",),
        init=InitSpec(str(tmp_path / "runs" / "base"), step=50, optimizer_state=True, skip=("4.*",)),
        code_dir=str(tmp_path),
    )
    # every field but backend differs from its default, so none was silently left at it
    # (an address needs backend "ray", the default)
    defaults = {f.name: f.default for f in dataclasses.fields(JobSpec) if f.default is not dataclasses.MISSING}
    assert [name for name, default in defaults.items() if getattr(spec, name) == default] == ["backend"]
    assert isinstance(spec.worker_cpus, float)
    assert spec.retention() == Retention(keep_last=2, keep_every=50, keep_best=1, metric="accuracy", mode="max")


def test_the_dict_round_trips_through_json_and_msgpack(tmp_path):
    path = tmp_path / "full.toml"
    path.write_text(FULL)
    spec = load_job(path)
    data = spec.to_dict()
    assert data["param_groups"] == [{"pattern": "*.bias", "options": {"weight_decay": 0.0}}]
    assert data["schedulers"][1] == {"name": "ReduceLROnPlateau", "args": {"mode": "max", "patience": 2},
                                     "interval": "epoch", "monitor": "accuracy"}
    assert JobSpec.from_dict(data) == spec
    assert JobSpec.from_dict(json.loads(json.dumps(data))) == spec
    assert JobSpec.from_dict(msgpack.unpackb(msgpack.packb(data))) == spec
    # the dict is a copy: changing it leaves the spec alone
    data["task_args"]["hidden"].append(4)
    assert spec.task_args["hidden"] == [16, 8]


def test_defaults(tmp_path):
    spec = load_job(write_job(tmp_path, BASE))
    assert spec.param_groups is None and spec.schedulers == ()
    assert (spec.steps, spec.epochs) == (10, None)
    training = (spec.batch_size, spec.seed, spec.eval_every, spec.clip_grad_norm, spec.nonfinite)
    assert training == (64, 0, None, None, "stop")
    assert (spec.shards, spec.workers, spec.backend, spec.address, spec.max_failures) == (1, 1, "ray", None, 0)
    assert (spec.worker_cpus, spec.shard_cpus) == (0.0, 0.0)
    assert (spec.checkpoint_every, spec.checkpoint_async) == (None, True)
    retention = (spec.keep_last, spec.keep_every, spec.keep_best, spec.keep_metric, spec.keep_mode)
    assert retention == (None, None, None, None, "min")
    assert spec.retention() is None
    assert (BACKENDS, NONFINITE_POLICIES) == (("ray", "inline"), ("stop", "skip"))


def test_empty_param_groups_mean_one_group_and_names_take_any_case(tmp_path):
    document = edited(optimizer={"name": "SPARSEADAM"}, task={"name": "ratings", "args": {"users": 20, "items": 10}})
    text = "param_groups = []\n" + to_toml(document)
    text += '[[schedulers]]\nname = "cosineannealinglr"\n[schedulers.args]\nT_max = 10\n'
    spec = parse_job(text, base_dir=tmp_path)
    assert spec.param_groups == ()
    assert spec.optimizer == "sparse_adam"
    assert spec.schedulers == (SchedulerSpec("CosineAnnealingLR", {"T_max": 10}),)


def test_a_task_of_ones_own_by_module_and_class(tmp_path):
    task = {"name": "shardstep.workers.tasks.digits:DigitsTask", "args": {"hidden": 4}}
    spec = load_job(write_job(tmp_path, edited(task=task)))
    assert spec.task == "shardstep.workers.tasks.digits:DigitsTask"


def test_the_tasks_own_rules_apply_unless_the_job_sets_param_groups(tmp_path):
    task = {"name": "tests.test_jobspec:RuledDigitsTask", "args": {"hidden": [4]}}
    with pytest.raises(JobSpecError) as caught:
        load_job(write_job(tmp_path, edited(task=task, optimizer={"name": "lbfgs"})))
    assert ("task 'tests.test_jobspec:RuledDigitsTask''s param_groups[0] (pattern '*.bias'): LBFGS doesn't "
            "support per-parameter options") in str(caught.value)
    assert str(caught.value).endswith("; set param_groups = [] in the job for one group of all parameters")
    text = "param_groups = []\n" + to_toml(edited(task=task, optimizer={"name": "lbfgs"}))
    assert parse_job(text, base_dir=tmp_path).param_groups == ()
    assert load_job(write_job(tmp_path, edited(task=task, optimizer={"name": "adamw"}))).param_groups is None


def test_relative_run_dir_is_resolved_against_the_job_files_directory(tmp_path, monkeypatch):
    (tmp_path / "jobs").mkdir()
    spec = load_job(write_job(tmp_path / "jobs", edited(run_dir="../runs/a")))
    assert spec.run_dir == str(tmp_path.resolve() / "runs" / "a")
    absolute = tmp_path / "elsewhere" / "b"
    assert load_job(write_job(tmp_path / "jobs", edited(run_dir=str(absolute)))).run_dir == str(absolute.resolve())
    # text without a file: against base_dir, else the current directory
    spec = parse_job(to_toml(BASE), base_dir=tmp_path / "jobs")
    assert spec.run_dir == str(tmp_path.resolve() / "jobs" / "runs" / "base")
    monkeypatch.chdir(tmp_path)
    assert parse_job(to_toml(BASE)).run_dir == str(tmp_path.resolve() / "runs" / "base")


def test_a_metric_of_the_task_may_be_monitored_and_kept(tmp_path):
    document = edited(task=DIGITS, checkpoint={"keep_best": 2, "metric": "accuracy", "mode": "max"},
                      schedulers=[{"name": "ReduceLROnPlateau", "monitor": "accuracy", "args": {"mode": "max"}}])
    spec = load_job(write_job(tmp_path, document))
    assert spec.schedulers[0].monitor == "accuracy" and spec.keep_metric == "accuracy"
    # the training loss needs no evaluation and is always there
    assert load_job(write_job(tmp_path, with_("checkpoint", keep_best=1, metric="loss"))).keep_metric == "loss"


# ---------------------------------------------------------------------------------------
# mistakes: each case is a job document and the fragments its message must contain


BAD_INPUTS = [
    ("unknown top-level key", {**BASE, "trainig": {"steps": 3}},
     ["unknown key trainig (did you mean 'training'?)", "allowed at the top level: run_dir, task, data, model, optimizer"]),
    ("unknown training key", with_("training", step=3),
     ["unknown key training.step (did you mean 'steps'?)", "allowed in [training]: steps, epochs, batch_size"]),
    ("unknown scheduler key", edited(schedulers=[{"name": "StepLR", "arg": {"step_size": 2}}]),
     ["unknown key schedulers[0].arg (did you mean 'args'?)", "name, interval, monitor, args"]),
    ("backend", with_("resources", backend="cuda"),
     ["resources.backend must be one of 'ray', 'inline'; got 'cuda'"]),
    ("negative steps", with_("training", steps=-3), ["training.steps must be an integer >= 0; got -3"]),
    ("fractional steps", with_("training", steps=2.5), ["training.steps must be an integer >= 0; got 2.5 (float)"]),
    ("no steps or epochs", edited(training={"batch_size": 8}),
     ["training.steps or training.epochs is required"]),
    ("batch size", with_("training", batch_size=0), ["training.batch_size must be an integer >= 1; got 0"]),
    ("eval_every", with_("training", eval_every="10"),
     ["training.eval_every must be an integer >= 1; got '10' (string)"]),
    ("clip norm", with_("training", clip_grad_norm=0), ["training.clip_grad_norm must be a finite number > 0; got 0"]),
    ("nonfinite", with_("training", nonfinite="ignore"),
     ["training.nonfinite must be one of 'stop', 'skip'; got 'ignore'"]),
    ("scalar_dtype", with_("training", scalar_dtype="float16"),
     ["training.scalar_dtype must be one of 'float32', 'float64'; got 'float16'"]),
    ("training not a table", edited(training=None) | {"training": 5},
     ["training must be a table ([training]); got 5 (integer)"]),
    ("shards", with_("resources", shards=0), ["resources.shards must be an integer >= 1; got 0"]),
    ("workers", with_("resources", workers=True), ["resources.workers must be an integer >= 1; got True (boolean)"]),
    ("max_failures", with_("resources", max_failures=-1), ["resources.max_failures must be an integer >= 0; got -1"]),
    ("cpus", with_("resources", worker_cpus=-0.5), ["resources.worker_cpus must be a finite number >= 0; got -0.5"]),
    ("transport", with_("resources", transport="shm"),
     ["resources.transport must be one of 'auto', 'shared_memory', 'object_store'; got 'shm'"]),
    ("transport without ray", with_("resources", backend="inline", transport="shared_memory"),
     ["resources.transport chooses how Ray actors exchange data, used only by backend 'ray'", "backend 'inline'"]),
    ("start timeout", with_("resources", start_timeout=0),
     ["resources.start_timeout must be a finite number > 0; got 0"]),
    ("placement", with_("resources", placement="spready", shard_cpus=1, worker_cpus=1),
     ["resources.placement must be one of 'pack', 'spread', 'strict_pack', 'strict_spread'; got 'spready' "
      "(did you mean 'spread'?)"]),
    ("placement without resources", with_("resources", placement="spread"),
     ["resources.placement = 'spread' places one bundle of resources per actor, but the shards ask for none; set "
      "resources.shard_cpus > 0 (or shard_resources)"]),
    ("placement with shared memory", with_("resources", placement="pack", shard_cpus=1, worker_cpus=1,
                                           transport="shared_memory"),
     ["resources.transport = 'shared_memory' pins every actor to the coordinator's node, which resources.placement "
      "contradicts; use transport 'auto' or 'object_store' to place the actors"]),
    ("reserved resource", with_("resources", shard_resources={"CPU": 1}),
     ["resources.shard_resources.CPU: CPU is not a custom resource (it is set by resources.shard_cpus); allowed: "
      "any name but CPU, GPU, memory, object_store_memory"]),
    ("zero resource", with_("resources", worker_resources={"accelerator": 0}),
     ["resources.worker_resources.accelerator must be a finite number > 0; got 0"]),
    ("labels not a table", with_("resources", shard_labels=5),
     ["resources.shard_labels must be a table of Ray node labels, name = value or selector (e.g. { zone = "
      "\"us-east-1a\" }); got 5 (integer)"]),
    ("label value", with_("resources", worker_labels={"zone": 3}),
     ["resources.worker_labels.zone must be a label value or a selector such as 'in(a,b)'; got 3 (integer)"]),
    ("labels without ray", with_("resources", backend="inline", shard_labels={"zone": "a"}),
     ["resources.shard_labels places Ray actors, used only by backend 'ray'; got shard_labels = {'zone': 'a'} "
      "with backend 'inline'"]),
    ("address without ray", with_("resources", backend="inline", address="auto"),
     ["resources.address is a Ray cluster address, used only by backend 'ray'", "backend 'inline'"]),
    ("checkpoint every", with_("checkpoint", every=0), ["checkpoint.every must be an integer >= 1; got 0"]),
    ("checkpoint async", with_("checkpoint", **{"async": "yes"}),
     ["checkpoint.async must be true or false; got 'yes' (string)"]),
    ("keep_last", with_("checkpoint", keep_last=0), ["checkpoint.keep_last must be an integer >= 1; got 0"]),
    ("keep_best without metric", with_("checkpoint", keep_best=2),
     ["checkpoint.keep_best and checkpoint.metric go together", "keep_best = 2, metric = None"]),
    ("mode", with_("checkpoint", keep_best=1, metric="loss", mode="best"),
     ["checkpoint.mode must be one of 'min', 'max'; got 'best'"]),
    ("unknown kept metric", with_("checkpoint", keep_best=1, metric="rmse"),
     ["checkpoint.metric must be 'loss' or a metric of task 'least-squares' (loss, relative_error); got 'rmse'"]),
    ("run_dir missing", edited(run_dir=None), ["run_dir is required"]),
    ("task missing", edited(task=None), ["[task] is required"]),
    ("task name missing", edited(task={"args": {"rows": 8}}),
     ["task.name is required: a built-in task (digits, digits-triplet, ratings, least-squares, synthetic-mlp, "
      "modular-addition, supervised)"]),
    ("unknown task", edited(task={"name": "digit"}),
     ["task.name: unknown task 'digit'; allowed: digits, digits-triplet", "(did you mean 'digits'?)"]),
    ("unknown task argument", edited(task={"name": "digits", "args": {"hiden": 8}}),
     ["task.args: task 'digits' got unknown argument 'hiden'; allowed: hidden, activation, dtype"]),
    ("bad task argument", edited(task={"name": "least-squares", "args": {"rows": 4, "cols": 4}}),
     ["task.args: rows must exceed cols for a unique solution; got rows=4, cols=4"]),
    ("date as an argument", edited(task={"name": "least-squares", "args": {"when": datetime.date(2024, 1, 2)}}),
     ["task.args.when must be a string, number, boolean, array or table; got datetime.date(2024, 1, 2) (date)"]),
    ("unknown optimizer", edited(optimizer={"name": "adamm"}),
     ["optimizer.name must be one of 'sgd', 'adagrad'", "got 'adamm' (did you mean 'adam'?)"]),
    ("optimizer argument", edited(optimizer={"name": "sgd", "args": {"lr": -1}}),
     ["optimizer.args: lr must be >= 0; got -1"]),
    ("unknown optimizer argument", edited(optimizer={"name": "sgd", "args": {"betas": [0.9, 0.99]}}),
     ["optimizer.args: optimizer SGD got unknown argument 'betas'; allowed: lr, momentum"]),
    ("pattern matching nothing", edited(param_groups=[{"pattern": "encoder.*", "lr": 0.01}]),
     ["param_groups[0] (pattern 'encoder.*'): param group rule 'encoder.*' matches no parameter",
      "parameters: weight, bias"]),
    ("group option the optimizer lacks", edited(param_groups=[{"pattern": "bias", "betas": [0.9, 0.9]}]),
     ["param_groups[0] (pattern 'bias'):", "sets 'betas', which SGD does not take; allowed: lr"]),
    ("group option value", edited(param_groups=[{"pattern": "bias", "weight_decay": -1.0}]),
     ["param_groups[0] (pattern 'bias'): weight_decay must be >= 0; got -1.0"]),
    ("group without pattern", edited(param_groups=[{"lr": 0.01}]), ["param_groups[0].pattern is required"]),
    ("groups for LBFGS", edited(optimizer={"name": "lbfgs"}, param_groups=[{"pattern": "bias", "lr": 0.5}]),
     ["param_groups[0] (pattern 'bias'): LBFGS doesn't support per-parameter options"]),
    ("unknown scheduler", edited(schedulers=[{"name": "Cosine"}]),
     ["schedulers[0].name must be one of 'LambdaLR'", "got 'Cosine'"]),
    ("scheduler without its required argument", edited(schedulers=[{"name": "CosineAnnealingLR"}]),
     ["schedulers[0].args: CosineAnnealingLR requires T_max; got no arguments"]),
    ("scheduler argument", edited(schedulers=[{"name": "StepLR", "args": {"step_size": 2}},
                                              {"name": "CosineAnnealingLR", "args": {"T_max": -1}}]),
     ["schedulers[1].args: T_max must be a positive integer; got -1"]),
    ("composite child", edited(schedulers=[{"name": "ChainedScheduler", "args": {
        "schedulers": [["LinearLR", {}], ["ReduceLROnPlateau", {}]]}}]),
     ["schedulers[0].args: ChainedScheduler: schedulers[1] is a ReduceLROnPlateau"]),
    ("resumed scheduler", edited(schedulers=[{"name": "StepLR", "args": {"step_size": 2, "last_epoch": 3}}]),
     ["schedulers[0].args: param_groups[0] has no 'initial_lr'; StepLR with last_epoch=3 resumes a schedule"]),
    ("lr_lambda not callable", edited(schedulers=[{"name": "LambdaLR",
                                                   "args": {"lr_lambda": "tests.test_jobspec:NOT_CALLABLE"}}]),
     [("schedulers[0].args.lr_lambda: lr_lambda reference 'tests.test_jobspec:NOT_CALLABLE' names a float, which "
       "is not callable")]),
    ("lr_lambda not importable", edited(schedulers=[{"name": "StepLR", "args": {"step_size": 2}}, {
        "name": "SequentialLR", "args": {"milestones": [2], "schedulers": [
            ["StepLR", {"step_size": 2}], ["LambdaLR", {"lr_lambda": ["tests.no_such_module:f"]}]]}}]),
     [("schedulers[1].args.schedulers[1][1].lr_lambda[0]: lr_lambda reference 'tests.no_such_module:f': cannot "
       "import 'tests.no_such_module'")]),
    ("max_skipped_steps", with_("training", nonfinite="skip", max_skipped_steps=0),
     ["training.max_skipped_steps must be an integer >= 1; got 0"]),
    ("max_skipped_steps type", with_("training", max_skipped_steps="5"),
     ["training.max_skipped_steps must be an integer >= 1; got '5' (string)"]),
    ("infinite lr", edited(optimizer={"name": "sgd", "args": {"lr": float("inf")}}),
     ["optimizer.args.lr must be a finite number; got inf"]),
    ("sparse optimizer on dense gradients", edited(optimizer={"name": "sparse_adam"}),
     [("optimizer.name: SparseAdam takes only row-sparse gradients, but task 'least-squares' gives dense "
       "gradients (weight, bias); allowed with dense gradients: sgd, adagrad, rmsprop")]),
    ("interval", edited(schedulers=[{"name": "StepLR", "interval": "batch", "args": {"step_size": 2}}]),
     ["schedulers[0].interval must be one of 'step', 'epoch'; got 'batch'"]),
    ("monitor on another scheduler",
     edited(schedulers=[{"name": "StepLR", "monitor": "loss", "args": {"step_size": 2}}]),
     ["schedulers[0].monitor applies only to ReduceLROnPlateau; got monitor = 'loss' on StepLR"]),
    ("unknown monitored metric",
     edited(task=DIGITS, schedulers=[{"name": "ReduceLROnPlateau", "monitor": "accurracy"}]),
     ["schedulers[0].monitor must be 'loss' or a metric of task 'digits' (accuracy, loss); got 'accurracy'",
      "(did you mean 'accuracy'?)"]),
]


@pytest.mark.parametrize("document, fragments", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_names_the_key_the_value_and_what_is_allowed(tmp_path, document, fragments):
    path = write_job(tmp_path, document)
    with pytest.raises(JobSpecError) as caught:
        load_job(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_every_bad_input_case_differs_from_a_valid_job_only_by_its_mistake(tmp_path):
    # the base the cases edit loads, so each case fails for its own reason
    assert load_job(write_job(tmp_path, BASE)).task == "least-squares"


def test_a_top_level_key_below_a_table_header_is_explained(tmp_path):
    text = to_toml(BASE) + "param_groups = []\n"   # lands in [training]
    refusal = re.escape("unknown key training.param_groups; allowed in [training]")
    with pytest.raises(JobSpecError, match=refusal) as caught:
        parse_job(text, source="job.toml")
    explanation = "param_groups is a top-level key: in TOML every key after a [table] header belongs to that table"
    assert explanation in str(caught.value)
    # inside an args table, the optimizer refuses it and the hint says why it is there
    text = to_toml(edited(training=None)).replace("[optimizer.args]\nlr = 0.1\n",
                                                  "[optimizer.args]\nlr = 0.1\nparam_groups = []\n")
    text += "[training]\nsteps = 1\n"
    with pytest.raises(JobSpecError) as caught:
        parse_job(text, source="job.toml")
    assert str(caught.value).startswith("job.toml: optimizer.args: optimizer SGD got unknown argument 'param_groups'")
    assert "write param_groups before the first header" in str(caught.value)


def test_toml_syntax_errors_name_the_file_line_and_column(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('run_dir = "x"\n[task]\nname = digits\n')
    with pytest.raises(JobSpecError, match=r"^.*broken\.toml: TOML syntax error: .*\(at line 3, column 8\)$"):
        load_job(path)


def test_a_missing_or_unreadable_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(JobSpecError, match=f"^job file not found: {re.escape(str(missing))}$"):
        load_job(missing)
    with pytest.raises(JobSpecError, match=f"^cannot read job file {re.escape(str(tmp_path))}: "):
        load_job(tmp_path)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'run_dir = "\xff"\n')
    with pytest.raises(JobSpecError, match=r"binary\.toml: a job file must be UTF-8 text; byte 11 is not"):
        load_job(binary)


def test_parse_job_prefixes_its_source():
    with pytest.raises(JobSpecError, match=r"^<job>: training\.steps must be an integer >= 0; got -1$"):
        parse_job(to_toml(with_("training", steps=-1)))


# ---------------------------------------------------------------------------------------
# dicts and overrides


def _spec(tmp_path, document=BASE) -> JobSpec:
    return load_job(write_job(tmp_path, document))


def test_replace_checks_again(tmp_path):
    spec = _spec(tmp_path, with_("resources", address="auto"))
    changed = spec.replace(shards=4, workers=3)
    assert (changed.shards, changed.workers) == (4, 3) and (spec.shards, spec.workers) == (1, 1)
    assert dataclasses.replace(changed, shards=1, workers=1) == spec
    with pytest.raises(JobSpecError, match=r"^resources\.shards must be an integer >= 1; got 0$"):
        spec.replace(shards=0)
    with pytest.raises(JobSpecError, match=r"^resources\.backend must be one of 'ray', 'inline'; got 'local'$"):
        spec.replace(backend="local")
    with pytest.raises(JobSpecError, match=r"resources\.address is a Ray cluster address, used only by backend 'ray'"):
        spec.replace(backend="inline")
    assert spec.replace(backend="inline", address=None).backend == "inline"
    with pytest.raises(JobSpecError, match=r"^unknown field 'shard' \(did you mean 'shards'\?\); allowed: task, "):
        spec.replace(shard=2)
    # fields the task and optimizer checks depend on are checked by building them again
    with pytest.raises(JobSpecError, match=r"^task\.args: task 'least-squares' got unknown argument 'row'"):
        spec.replace(task_args={"row": 8})
    with pytest.raises(JobSpecError, match=r"^optimizer\.args: optimizer Adam got unknown argument 'momentum'"):
        spec.replace(optimizer="adam", optimizer_args={"momentum": 0.9})
    with pytest.raises(JobSpecError, match=r"^checkpoint\.metric must be 'loss' or a metric of task 'least-squares'"):
        spec.replace(keep_best=1, keep_metric="accuracy")


def test_from_dict_refuses_unknown_and_missing_fields(tmp_path):
    data = _spec(tmp_path).to_dict()
    with pytest.raises(JobSpecError, match=r"^unknown field 'epoch' \(did you mean 'epochs'\?\)"):
        JobSpec.from_dict({**data, "epoch": 3})
    del data["schedulers"]
    with pytest.raises(JobSpecError, match=r"needs the fields task, .*; missing schedulers$"):
        JobSpec.from_dict(data)
    data = _spec(tmp_path).to_dict()
    data["param_groups"] = [{"pattern": "bias"}]
    with pytest.raises(JobSpecError, match=r"^param_groups\[0\] must be a dict with exactly the keys 'pattern' and"):
        JobSpec.from_dict(data)
    data["param_groups"] = [{"pattern": "bias", "options": {"lr": -1.0}}]
    with pytest.raises(JobSpecError, match=r"^param_groups\[0\] \(pattern 'bias'\): lr must be >= 0; got -1\.0$"):
        JobSpec.from_dict(data)
    data = _spec(tmp_path).to_dict() | {"run_dir": "runs/relative"}
    with pytest.raises(JobSpecError, match=r"^run_dir must be an absolute path here .*; got 'runs/relative'$"):
        JobSpec.from_dict(data)


def test_max_skipped_steps_has_a_default_that_old_job_dicts_load_with(tmp_path):
    spec = _spec(tmp_path)
    assert spec.max_skipped_steps == 20
    data = spec.to_dict()
    assert data["max_skipped_steps"] == 20
    del data["max_skipped_steps"]  # a job.json written before the key existed
    assert JobSpec.from_dict(data) == spec
    assert _spec(tmp_path, with_("training", nonfinite="skip", max_skipped_steps=3)).max_skipped_steps == 3
    with pytest.raises(JobSpecError, match=r"^training\.max_skipped_steps must be an integer >= 1; got 0$"):
        spec.replace(max_skipped_steps=0)


def test_schedule_functions_are_imported_but_called_only_when_training_builds_the_scheduler(tmp_path):
    SCHEDULE_CALLS.clear()
    references = ["tests.test_jobspec:recorded_lambda", "tests.test_jobspec:failing_lambda"]
    schedulers = [{"name": "LambdaLR", "args": {"lr_lambda": reference}} for reference in references]
    schedulers.append({"name": "SequentialLR", "args": {"milestones": [2], "schedulers": [
        ["MultiplicativeLR", {"lr_lambda": references[1]}], ["LambdaLR", {"lr_lambda": [references[1]]}]]}})
    schedulers.append({"name": "CyclicLR", "args": {"base_lr": 0.01, "max_lr": 0.1, "cycle_momentum": False,
                                                    "scale_fn": references[1]}})
    spec = load_job(write_job(tmp_path, edited(schedulers=schedulers)))
    assert SCHEDULE_CALLS == []  # and failing_lambda, which fails at epoch 0, was not called either
    assert spec.schedulers[0].args == {"lr_lambda": references[0]}  # the spec keeps the job's references
    optimizer = build_optimizer("sgd", {"lr": 0.1}, {"w": Parameter(np.zeros(2), name="w")}, ())
    build_scheduler(spec.schedulers[0].name, spec.schedulers[0].args, optimizer)
    assert SCHEDULE_CALLS == [0]  # training's scheduler calls the job's function, at its initial step
    with pytest.raises(ZeroDivisionError):
        build_scheduler(spec.schedulers[1].name, spec.schedulers[1].args, optimizer)


def test_the_optimizer_must_take_the_tasks_kind_of_gradient(tmp_path):
    ratings = {"name": "ratings", "args": {"users": 20, "items": 10, "dim": 2}}
    sparse = [name for name in NAMES if rule(name).accepts_sparse]  # from the registry: sgd, adagrad, sparse_adam
    assert {"sgd", "adagrad", "sparse_adam"} <= set(sparse)
    for name in sparse:
        assert load_job(write_job(tmp_path, edited(task=ratings, optimizer={"name": name}))).optimizer == name
    # a frozen parameter's gradient is the optimizer's concern no more; the trainable ones still are
    document = edited(task=ratings, optimizer={"name": "adam"}, frozen=["user.*", "item.*", "item_bias.*"])
    with pytest.raises(JobSpecError, match=r"Adam takes only dense gradients, but task 'ratings' gives row-sparse "
                                           r"gradients \(user_bias\.weight\); allowed with row-sparse gradients: "
                                           + re.escape(", ".join(sparse)) + "$"):
        load_job(write_job(tmp_path, document))


def test_infinity_only_where_torch_gives_it_a_meaning(tmp_path):
    rprop = edited(optimizer={"name": "rprop", "args": {"step_sizes": [1e-6, float("inf")]}})
    assert load_job(write_job(tmp_path, rprop)).optimizer_args["step_sizes"] == [1e-6, float("inf")]
    assert load_job(write_job(tmp_path, edited(optimizer={"name": "asgd", "args": {"t0": float("inf")}}))).optimizer
    with pytest.raises(JobSpecError, match=r"optimizer\.args\.t0 must be a finite number \(\+inf is allowed only at "
                                           r"step_sizes\[1\]\); got inf$"):
        load_job(write_job(tmp_path, edited(optimizer={"name": "rprop", "args": {"t0": float("inf")}})))
    with pytest.raises(JobSpecError, match=r"optimizer\.args\.t0 must be a finite number \(\+inf is allowed only at "
                                           r"t0\); got -inf$"):
        load_job(write_job(tmp_path, edited(optimizer={"name": "asgd", "args": {"t0": float("-inf")}})))
    with pytest.raises(JobSpecError, match=r"^scheduler\.args\.eta_min must be a finite number; got nan$"):
        SchedulerSpec("CosineAnnealingLR", {"T_max": 2, "eta_min": float("nan")})


def test_constructing_a_spec_checks_its_values():
    fields = {"task": "digits", "task_args": {}, "optimizer": "adam", "optimizer_args": {}, "param_groups": None,
              "schedulers": (), "steps": None, "epochs": 2, "run_dir": "/tmp/run"}
    assert JobSpec(**fields).epochs == 2
    with pytest.raises(JobSpecError, match=r"^training\.epochs must be an integer >= 0; got -2$"):
        JobSpec(**fields | {"epochs": -2})
    with pytest.raises(JobSpecError, match=r"^task\.args\.f must be a string, number, boolean, array or table; got "):
        JobSpec(**fields | {"task_args": {"f": print}})
    with pytest.raises(JobSpecError, match=r"^scheduler\.name must be one of 'LambdaLR'.*; got 'warmup'$"):
        SchedulerSpec("warmup", {})
    with pytest.raises(JobSpecError, match=r"^scheduler\.monitor applies only to ReduceLROnPlateau; got monitor = "
                                           r"'accuracy' on StepLR$"):
        SchedulerSpec("steplr", {"step_size": 1}, monitor="accuracy")
    # tuples become lists, so the dict round trip gives back an equal spec
    spec = JobSpec(**fields | {"task_args": {"hidden": (8, 4)}})
    assert spec.task_args == {"hidden": [8, 4]}


# ---------------------------------------------------------------------------------------
# the example jobs and the reference's example


def test_every_example_job_parses():
    paths = sorted(EXAMPLES.glob("*.toml"))
    # one job per built-in task, and the jobs of [data] + [model] (the supervised task)
    data_jobs = ["digits-cnn", "digits-csv", "sensors-parquet"]
    assert sorted(path.stem for path in paths) == sorted([n for n in TASK_NAMES if n != "supervised"] + data_jobs)
    for path in paths:
        spec = load_job(path)
        assert spec.task == ("supervised" if path.stem in data_jobs else path.stem)
        assert spec.run_dir == str(ROOT / "runs" / path.stem)
        assert (spec.shards, spec.workers) == (2, 2)
        assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_the_reference_example_parses(tmp_path):
    text = (ROOT / "docs" / "jobs.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, flags=re.DOTALL)
    assert blocks
    for block in blocks:
        spec = parse_job(block, source="docs/jobs.md", base_dir=tmp_path)
        assert spec.run_dir.startswith(str(tmp_path.resolve()))
