"""Fine-tuning: a job that starts from another run's checkpoint (parameters, optionally the
optimizer state by name), param groups with their own learning rates, frozen parameters,
mismatches refused before anything starts, and exact resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

from shardstep.checkpoints import committed_steps, open_checkpoint
from shardstep.service.coordinator import CHECKPOINT_DIR, INIT_FILE, Coordinator
from shardstep.service.jobspec import InitSpec, JobSpec, JobSpecError, SchedulerSpec, parse_job
from shardstep.workers.tasks import make_task
from shardstep.workers.tasks.base import ParamGroupRule
from shardstep.workers.training import Trainer
from tests.finetune_tasks import DigitsPairsTask
from tests.runs import assert_same

PAIRS = "tests.finetune_tasks:DigitsPairsTask"
HIDDEN = [32]
BODY = ["0.weight", "0.bias"]
HEAD = ["head.weight", "head.bias"]
BODY_LR, HEAD_LR = 1e-3, 0.05
SEED = 5
SOURCE_STEPS = 150


def job(run_dir, **fields) -> JobSpec:
    # three workers: with two, the reduction order could not matter (a + b == b + a)
    values = dict(task="digits", task_args={"hidden": HIDDEN}, optimizer="adam", optimizer_args={"lr": 1e-2},
                  param_groups=None, schedulers=(), steps=10, epochs=None, batch_size=128, seed=SEED,
                  shards=2, workers=3, backend="inline", run_dir=str(run_dir))
    values.update(fields)
    return JobSpec(**values)


def pairs_job(run_dir, **fields) -> JobSpec:
    """The new model with a small learning rate for the body and a large one for the head."""
    values = dict(task=PAIRS, optimizer_args={"lr": HEAD_LR}, param_groups=(ParamGroupRule("0.*", {"lr": BODY_LR}),))
    values.update(fields)
    return job(run_dir, **values)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A `digits` run (one hidden layer of 32, head `2.*` of 10 classes): 150 Adam steps."""
    run_dir = tmp_path_factory.mktemp("source") / "run"
    result = Coordinator(job(run_dir, steps=SOURCE_STEPS, seed=3)).run()
    assert result.metrics["accuracy"] > 0.95
    with open_checkpoint(run_dir / CHECKPOINT_DIR) as checkpoint:
        params, optimizer = checkpoint.export()
    return {"run_dir": run_dir, "params": params, "optimizer": optimizer,
            "state": {name: optimizer["state"][index] for index, name in enumerate(params)}}




def rms(a, b) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


def starting_params(source, seed=SEED) -> dict[str, np.ndarray]:
    """What a fine-tuning run of the pairs model starts from: the source's body, a fresh head."""
    fresh = DigitsPairsTask(hidden=HIDDEN).init_params(seed)
    return {name: (source["params"][name] if name in BODY else fresh[name]).copy() for name in fresh}


def local_run(spec: JobSpec, params, state=None, rules=None) -> dict[str, np.ndarray]:
    """The single-process loop from ``params``, its optimizer state set by name from ``state``."""
    trainer = Trainer(make_task(spec.task, **spec.task_args), seed=spec.seed, batch_size=spec.batch_size,
                      optimizer=spec.optimizer, optimizer_kwargs=spec.optimizer_args,
                      param_groups=spec.param_groups if rules is None else rules, world_size=spec.workers,
                      params=params)
    for name, entries in (state or {}).items():
        trainer.optimizer.state[trainer.params[name]] = {key: np.array(value, copy=True)
                                                         for key, value in entries.items()}
    return trainer.run(steps=spec.steps).params


def manifest_groups(run_dir) -> list[dict]:
    with open_checkpoint(Path(run_dir) / CHECKPOINT_DIR) as checkpoint:
        return checkpoint.param_groups


# ---------------------------------------------------------------------------------------
# the job file


INIT_JOB = """
run_dir = "runs/tuned"
frozen = ["0.*"]

[init]
from = "runs/base"
step = 60
optimizer_state = true
skip = ["2.*"]

[task]
name = "tests.finetune_tasks:DigitsPairsTask"

[optimizer]
name = "adam"

[training]
steps = 5
"""


def test_the_job_file_reads_init_and_frozen(tmp_path):
    spec = parse_job(INIT_JOB, base_dir=tmp_path)
    assert spec.init == InitSpec(str(tmp_path / "runs" / "base"), step=60, optimizer_state=True, skip=("2.*",))
    assert spec.frozen == ("0.*",)
    assert [name for name in ("0.weight", "0.bias", "head.weight") if spec.is_frozen(name)] == BODY
    data = spec.to_dict()
    assert data["init"] == {"from": str(tmp_path / "runs" / "base"), "step": 60, "optimizer_state": True,
                            "skip": ["2.*"]}
    assert data["frozen"] == ["0.*"]
    for copy in (data, json.loads(json.dumps(data)), msgpack.unpackb(msgpack.packb(data))):
        assert JobSpec.from_dict(copy) == spec
    # the defaults: no init, nothing frozen; an [init] needs only `from`
    plain = parse_job(INIT_JOB.replace('frozen = ["0.*"]', "").replace(
        'step = 60\noptimizer_state = true\nskip = ["2.*"]\n', ""), base_dir=tmp_path)
    assert plain.frozen == () and plain.init == InitSpec(str(tmp_path / "runs" / "base"))
    assert (plain.init.step, plain.init.optimizer_state, plain.init.skip) == (None, False, ())


BAD_JOBS = [
    ("unknown init key", ("optimizer_state = true", "optimizer_sate = true"),
     ("unknown key init.optimizer_sate (did you mean 'optimizer_state'?); allowed in [init]: from, step, "
      "optimizer_state, skip")),
    ("init without from", ('from = "runs/base"\n', ""), "init.from is required"),
    ("from not a string", ('from = "runs/base"', "from = 3"), "init.from must be a directory path; got 3 (integer)"),
    ("negative step", ("step = 60", "step = -1"), "init.step must be an integer >= 0; got -1"),
    ("optimizer_state not a boolean", ("optimizer_state = true", 'optimizer_state = "yes"'),
     "init.optimizer_state must be true or false; got 'yes' (string)"),
    ("skip not an array", ('skip = ["2.*"]', 'skip = "2.*"'),
     'init.skip must be an array of glob patterns on parameter names such as ["0.*"]; got \'2.*\' (string)'),
    ("empty skip pattern", ('skip = ["2.*"]', 'skip = [""]'),
     "init.skip[0] must be a glob pattern on parameter names such as '0.*'; got '' (string)"),
    ("init inside the run directory", ('from = "runs/base"', 'from = "runs/tuned/checkpoints"'),
     "init.from must be another run's checkpoint, outside this job's run_dir"),
    ("frozen not an array", ('frozen = ["0.*"]', 'frozen = "0.*"'),
     "frozen must be an array of glob patterns on parameter names"),
    ("frozen pattern matching nothing", ('frozen = ["0.*"]', 'frozen = ["body.*"]'),
     ("frozen[0] (pattern 'body.*') matches no parameter of task 'tests.finetune_tasks:DigitsPairsTask'; "
      "parameters: 0.weight, 0.bias, head.weight, head.bias")),
    ("everything frozen", ('frozen = ["0.*"]', 'frozen = ["0.*", "head.*"]'),
     ("frozen matches every parameter of task 'tests.finetune_tasks:DigitsPairsTask' (0.weight, 0.bias, "
      "head.weight, head.bias): nothing would be trained")),
    ("a group of frozen parameters only",
     ('frozen = ["0.*"]', 'frozen = ["0.*"]\n[[param_groups]]\npattern = "0.b*"\nlr = 0.1'),
     ("param_groups[0] (pattern '0.b*') matches only frozen parameters (0.bias); frozen parameters are in no "
      "param group")),
    ("frozen with LBFGS", ('name = "adam"', 'name = "lbfgs"'),
     "frozen cannot be used with LBFGS (its direction and history span every parameter); got frozen = ['0.*']"),
    ("optimizer state with LBFGS", (('frozen = ["0.*"]', ""), ('name = "adam"', 'name = "lbfgs"')),
     "init.optimizer_state = true cannot be used with LBFGS"),
    ("frozen below a header", (('frozen = ["0.*"]', ""), ("steps = 5", 'steps = 5\nfrozen = ["0.*"]')),
     "unknown key training.frozen; allowed in [training]"),
]


@pytest.mark.parametrize("edits, fragment", [case[1:] for case in BAD_JOBS], ids=[case[0] for case in BAD_JOBS])
def test_bad_init_and_frozen_keys_name_the_key_and_the_value(tmp_path, edits, fragment):
    text = INIT_JOB
    for old, new in (edits if isinstance(edits[0], tuple) else (edits,)):
        assert old in text
        text = text.replace(old, new, 1)
    with pytest.raises(JobSpecError) as caught:
        parse_job(text, source="job.toml", base_dir=tmp_path)
    assert str(caught.value).startswith("job.toml: ") and fragment in str(caught.value), str(caught.value)


# ---------------------------------------------------------------------------------------
# a new head with its own learning rate


def test_fine_tuning_a_new_head_with_its_own_learning_rate(source, tmp_path):
    spec = pairs_job(tmp_path / "tuned", steps=20, init=InitSpec(str(source["run_dir"]), skip=("2.*",)))
    result = Coordinator(spec).run()

    # where the parameters came from: returned, in the run directory and in every checkpoint
    with open_checkpoint(source["run_dir"] / CHECKPOINT_DIR) as checkpoint:
        origin = {"from": str(checkpoint.directory), "run_id": checkpoint.run_id, "step": SOURCE_STEPS}
    expected = {**origin, "loaded": BODY, "new": HEAD, "skipped": ["2.weight", "2.bias"], "optimizer_state": False,
                "state": []}
    assert result.init == expected
    assert json.loads((tmp_path / "tuned" / INIT_FILE).read_text()) == expected
    with open_checkpoint(tmp_path / "tuned" / CHECKPOINT_DIR) as checkpoint:
        assert checkpoint.extra["init"] == expected

    # the groups as configured: the default group (the head) at the optimizer's lr, the body at its own
    groups = manifest_groups(tmp_path / "tuned")
    assert [(g["params"], g["lr"]) for g in groups] == [(HEAD, HEAD_LR), (BODY, BODY_LR)]

    # the run is the local loop started from the source's body and a fresh head, bit for bit
    start = starting_params(source)
    assert_same(result.params, local_run(spec, start))
    # the body moved by less than the head
    body = max(rms(result.params[name], start[name]) for name in BODY)
    head = min(rms(result.params[name], start[name]) for name in HEAD)
    assert 0 < body < head / 5, (body, head)

    # and it beats the same job started from scratch (a random body) after the same steps
    scratch = Coordinator(pairs_job(tmp_path / "scratch", steps=20)).run()
    assert result.metrics["accuracy"] > scratch.metrics["accuracy"] + 0.05, (result.metrics, scratch.metrics)
    assert result.metrics["loss"] < scratch.metrics["loss"] - 0.2, (result.metrics, scratch.metrics)


# ---------------------------------------------------------------------------------------
# frozen parameters


def test_frozen_parameters_never_move_and_have_no_state(source, tmp_path):
    spec = pairs_job(tmp_path / "frozen", steps=12, param_groups=None, frozen=("0.*",), checkpoint_every=6,
                     init=InitSpec(str(source["run_dir"]), skip=("2.*",)))
    result = Coordinator(spec).run()
    for name in BODY:
        assert np.array_equal(result.params[name], source["params"][name]), name
    # in no param group, no optimizer state, in every checkpoint
    root = tmp_path / "frozen" / CHECKPOINT_DIR
    assert committed_steps(root) == [6, 12]
    for step in (6, 12):
        with open_checkpoint(root, step) as checkpoint:
            assert [g["params"] for g in checkpoint.param_groups] == [HEAD]
            params, optimizer = checkpoint.export()
        assert sorted(optimizer["state"]) == [0, 1]  # the head's, numbered as torch numbers its optimizer's
        assert all(np.array_equal(params[name], source["params"][name]) for name in BODY)
    # the head trains exactly as with a body that the optimizer leaves in place (lr 0)
    held = local_run(spec, starting_params(source), rules=(ParamGroupRule("0.*", {"lr": 0.0}),))
    assert_same(result.params, held)
    # stopped at step 6 and resumed: the same parameters
    stopped = spec.replace(run_dir=str(tmp_path / "stopped"), steps=6)
    Coordinator(stopped).run()
    assert_same(Coordinator(spec.replace(run_dir=stopped.run_dir)).run().params, result.params)

    # a new head on the frozen pretrained body beats one on a frozen random body
    scratch = Coordinator(spec.replace(init=None, run_dir=str(tmp_path / "scratch"))).run()
    assert result.metrics["accuracy"] > scratch.metrics["accuracy"] + 0.1, (result.metrics, scratch.metrics)
    assert result.metrics["loss"] < scratch.metrics["loss"] - 0.3, (result.metrics, scratch.metrics)


def test_frozen_gradients_are_left_out_of_clipping(tmp_path):
    """SGD with lr 1 and a tiny max norm moves the trainable parameters by exactly the max
    norm: the frozen body's gradient is not part of the global norm (torch: it has none)."""
    spec = job(tmp_path / "clipped", optimizer="sgd", optimizer_args={"lr": 1.0}, clip_grad_norm=1e-3, steps=1,
               shards=3, frozen=("0.*",))
    initial = make_task("digits", hidden=HIDDEN).init_params(SEED)
    result = Coordinator(spec).run()
    moved = math.sqrt(sum(float(np.sum((result.params[n].astype(np.float64) - initial[n]) ** 2)) for n in initial))
    assert moved == pytest.approx(1e-3, rel=1e-4)
    assert all(np.array_equal(result.params[name], initial[name]) for name in BODY)


# ---------------------------------------------------------------------------------------
# optimizer state


def test_optimizer_state_carried_over_continues_the_source_run(source, tmp_path):
    """Fine-tuning the same model with its optimizer state is the source run continued: the
    local loop from the source's parameters and state_dict (the data restart at epoch 0)."""
    init = InitSpec(str(source["run_dir"]), optimizer_state=True)
    spec = job(tmp_path / "continued", steps=5, init=init)
    result = Coordinator(spec).run()
    assert result.init["state"] == list(source["params"])

    trainer = Trainer(make_task("digits", hidden=HIDDEN), seed=SEED, batch_size=spec.batch_size, optimizer="adam",
                      optimizer_kwargs=spec.optimizer_args, world_size=spec.workers, params=source["params"])
    trainer.optimizer.load_state_dict(source["optimizer"])
    continued = trainer.run(steps=5).params
    assert_same(result.params, continued)
    # every step count went on from the source's
    with open_checkpoint(tmp_path / "continued" / CHECKPOINT_DIR) as checkpoint:
        _, optimizer = checkpoint.export()
    assert all(float(state["step"]) == SOURCE_STEPS + 5 for state in optimizer["state"].values())

    # parameters only: a fresh optimizer, which moves differently
    fresh = Coordinator(job(tmp_path / "fresh", steps=5, init=InitSpec(str(source["run_dir"])))).run()
    assert_same(fresh.params, local_run(spec, source["params"]))
    assert not np.array_equal(fresh.params["0.weight"], result.params["0.weight"])


def test_optimizer_state_is_matched_by_name_never_by_position(source, tmp_path):
    """The body rule puts the head first in the optimizer's order (the default group leads):
    by position, the head would get the source's `0.*` state. By name, the body gets its own
    state and the head starts fresh."""
    init = InitSpec(str(source["run_dir"]), optimizer_state=True, skip=("2.*",))
    untouched = Coordinator(pairs_job(tmp_path / "zero", steps=0, init=init)).run()
    assert untouched.init["state"] == BODY
    with open_checkpoint(tmp_path / "zero" / CHECKPOINT_DIR) as checkpoint:
        assert checkpoint.step == 0
        assert [g["params"] for g in checkpoint.param_groups] == [HEAD, BODY]
        params, optimizer = checkpoint.export()
    assert_same(params, starting_params(source))
    by_name = {name: optimizer["state"][index] for index, name in enumerate(HEAD + BODY) if index in optimizer["state"]}
    assert sorted(by_name) == sorted(BODY)
    for name in BODY:
        assert sorted(by_name[name]) == sorted(source["state"][name])
        for key, value in source["state"][name].items():
            assert np.array_equal(by_name[name][key], value), (name, key)

    # a few steps on: the local loop with the body's state set by name
    spec = pairs_job(tmp_path / "tuned", steps=4, init=init)
    result = Coordinator(spec).run()
    expected = local_run(spec, starting_params(source), state={name: source["state"][name] for name in BODY})
    assert_same(result.params, expected)


# ---------------------------------------------------------------------------------------
# mismatches: one clear error before anything starts, nothing written


def _missing(source, tmp_path):
    return job(tmp_path / "run", init=InitSpec(str(tmp_path / "nowhere")))


MISMATCHES = [
    ("shape", lambda source, tmp_path: job(tmp_path / "run", task_args={"hidden": [16]},
                                           init=InitSpec(str(source["run_dir"]))),
     ["cannot start from", f"step {SOURCE_STEPS}",
      "0.weight is float32 (32, 64) in the source and float32 (16, 64) in the model",
      "0.bias is float32 (32,) in the source and float32 (16,) in the model",
      "2.weight is float32 (10, 32) in the source and float32 (10, 16) in the model"]),
    ("dtype", lambda source, tmp_path: job(tmp_path / "run", task_args={"hidden": HIDDEN, "dtype": "float64"},
                                           init=InitSpec(str(source["run_dir"]))),
     ["0.weight is float32 (32, 64) in the source and float64 (32, 64) in the model"]),
    ("name the model lacks", lambda source, tmp_path: pairs_job(tmp_path / "run",
                                                                 init=InitSpec(str(source["run_dir"]))),
     ["the model has no parameter 2.weight, 2.bias (its parameters: 0.weight, 0.bias, head.weight, head.bias)",
      "Leave source parameters out with init.skip"]),
    ("skip matching nothing", lambda source, tmp_path: pairs_job(tmp_path / "run", init=InitSpec(
        str(source["run_dir"]), skip=("2.*", "head.*"))),
     ["init.skip[1] (pattern 'head.*') matches no parameter of", "its parameters: 0.weight, 0.bias, 2.weight, 2.bias"]),
    ("nothing shared", lambda source, tmp_path: pairs_job(tmp_path / "run", init=InitSpec(
        str(source["run_dir"]), skip=("*",))),
     ["gives none of the model's parameters (0.weight, 0.bias, head.weight, head.bias)"]),
    ("another optimizer", lambda source, tmp_path: job(tmp_path / "run", optimizer="sgd", optimizer_args={"lr": 0.1},
                                                       init=InitSpec(str(source["run_dir"]), optimizer_state=True)),
     ["init.optimizer_state = true needs the source's kind of optimizer",
      "was trained with 'adam', this job uses 'sgd'", "set optimizer_state = false"]),
    ("state the hyperparameters need", lambda source, tmp_path: job(
        tmp_path / "run", optimizer_args={"lr": 1e-2, "amsgrad": True},
        init=InitSpec(str(source["run_dir"]), optimizer_state=True)),
     [("does not fit this job's adam hyperparameters: 0.weight lacks max_exp_avg_sq (it has step, exp_avg, "
       "exp_avg_sq)")]),
    ("a step that is not committed", lambda source, tmp_path: job(
        tmp_path / "run", init=InitSpec(str(source["run_dir"]), step=7)),
     ["init.from: step 7 is not committed in", f"committed: [{SOURCE_STEPS}]"]),
    ("a step directory of another step", lambda source, tmp_path: job(
        tmp_path / "run", init=InitSpec(str(source["run_dir"] / CHECKPOINT_DIR / f"step-{SOURCE_STEPS:010d}"), step=7)),
     [f"init.step is 7, but init.from is the checkpoint of step {SOURCE_STEPS}"]),
    ("a path that does not exist", _missing,
     ["init.from must be a run directory, its checkpoints directory or a step-<k> checkpoint directory",
      "nowhere does not exist"]),
    ("a directory without checkpoints", lambda source, tmp_path: job(tmp_path / "run",
                                                                      init=InitSpec(str(tmp_path))),
     ["holds no committed checkpoint"]),
]


@pytest.mark.parametrize("make, fragments", [case[1:] for case in MISMATCHES], ids=[case[0] for case in MISMATCHES])
def test_a_mismatch_is_one_error_before_anything_starts(source, tmp_path, make, fragments):
    spec = make(source, tmp_path)
    run_dir = Path(spec.run_dir)
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    coordinator = Coordinator(spec)
    with pytest.raises(ValueError) as caught:
        coordinator.run()
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)
    assert coordinator.backend is None and coordinator.shards == []  # no actor was started
    assert os.listdir(run_dir) == ["notes.txt"] and (run_dir / "notes.txt").read_text() == "mine"
    assert coordinator.state.name == "Failed"
    # and a run directory that did not exist is not created
    fresh = spec.replace(run_dir=str(tmp_path / "fresh"))
    with pytest.raises(ValueError):
        Coordinator(fresh).run()
    assert not (tmp_path / "fresh").exists()


def test_the_command_line_exits_2_and_writes_nothing(source, tmp_path):
    path = tmp_path / "job.toml"
    path.write_text(f"""
run_dir = "run"
[init]
from = "{source['run_dir']}"
[task]
name = "digits"
[task.args]
hidden = [16]
[optimizer]
name = "adam"
[training]
steps = 3
[resources]
backend = "inline"
""")
    done = subprocess.run([sys.executable, "-m", "shardstep.service.cli", "run", str(path), "--quiet"], check=False,
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shardstep run: error: cannot start from"), done.stderr
    assert "0.weight is float32 (32, 64) in the source and float32 (16, 64) in the model" in lines[0]
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------
# resume


def test_a_fine_tuning_run_resumes_from_its_own_checkpoints_bit_identical(source, tmp_path):
    """Stopped at a checkpoint and resumed (with another shard count), a fine-tuning run ends
    with the uninterrupted run's parameters; the source is not read again (it is gone)."""
    copy = tmp_path / "source"
    shutil.copytree(source["run_dir"], copy)
    schedulers = (SchedulerSpec("StepLR", {"step_size": 3, "gamma": 0.5}),)
    base = pairs_job(tmp_path / "full", steps=12, checkpoint_every=4, schedulers=schedulers,
                     init=InitSpec(str(copy), optimizer_state=True, skip=("2.*",)))
    uninterrupted = Coordinator(base).run()

    stopped = base.replace(run_dir=str(tmp_path / "stopped"), steps=4)
    first = Coordinator(stopped).run()
    shutil.rmtree(copy)
    resumed = Coordinator(base.replace(run_dir=str(tmp_path / "stopped"), shards=3)).run()
    assert resumed.steps == 12
    assert_same(resumed.params, uninterrupted.params)
    assert resumed.metrics == uninterrupted.metrics
    assert resumed.init == first.init == uninterrupted.init  # the record comes from the run's own checkpoint


# ---------------------------------------------------------------------------------------
# Ray: the same fine-tuning, and an actor lost before the first checkpoint


def test_fine_tuning_on_ray_recovers_from_the_source_and_matches_inline(source, tmp_path, ray_address):
    """A shard killed before the run's first checkpoint: the run starts again from the
    source, and ends with the inline run's parameters."""
    spec = pairs_job(tmp_path / "inline", steps=8, frozen=("0.*",), param_groups=None,
                     init=InitSpec(str(source["run_dir"]), optimizer_state=True, skip=("2.*",)))
    reference = Coordinator(spec).run()
    box: dict = {}

    def kill_a_shard(record):
        if record["step"] == 3 and "killed" not in box:
            _, pid = box["coordinator"].pids[0]
            os.kill(pid, signal.SIGKILL)
            box["killed"] = pid

    on_ray = spec.replace(backend="ray", shards=3, checkpoint_every=5, max_failures=1, run_dir=str(tmp_path / "ray"))
    coordinator = Coordinator(on_ray, on_step=kill_a_shard)
    box["coordinator"] = coordinator
    result = coordinator.run()
    assert box["killed"] and result.failures == 1 and "Recovering" in [state.name for state in coordinator.state_log]
    assert_same(result.params, reference.params)
    assert result.init == reference.init
