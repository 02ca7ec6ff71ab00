"""The local training loop: the built-in tasks trained end to end to measured targets, then
determinism, data-parallel equivalence, param groups, schedulers, evaluation, callbacks and
bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardstep.workers.optim import RowSparseGrad
from shardstep.workers.tasks import ParamGroupRule, Task, make_task
from shardstep.workers.training import Trainer, train
from tests.small_tasks import Quadratic, small

# ---------------------------------------------------------------------------------------
# end to end: the targets docs/tasks.md states


def test_digits_with_adam_reaches_97_percent_held_out_accuracy():
    task = make_task("digits")
    epochs, batch_size = 20, 64
    result = train(task, seed=0, epochs=epochs, batch_size=batch_size, optimizer="adam",
                   optimizer_kwargs={"lr": 3e-3}, scheduler="CosineAnnealingLR",
                   scheduler_kwargs={"T_max": epochs * task.num_batches(batch_size)})
    assert result.steps == epochs * 23 and len(result.history) == result.steps
    assert result.metrics["accuracy"] >= 0.97, result.metrics
    first_epoch = np.mean([r["loss"] for r in result.history[:23]])
    last_epoch = np.mean([r["loss"] for r in result.history[-23:]])
    assert last_epoch < first_epoch / 10


def test_digits_triplet_embedding_reaches_97_percent_nearest_neighbour_accuracy():
    task = make_task("digits-triplet")
    epochs, batch_size = 30, 128
    steps_per_epoch = task.num_batches(batch_size)
    result = train(task, seed=0, epochs=epochs, batch_size=batch_size, optimizer="adam",
                   optimizer_kwargs={"lr": 3e-3}, scheduler="CosineAnnealingLR",
                   scheduler_kwargs={"T_max": epochs * steps_per_epoch}, eval_every=10 * steps_per_epoch)
    initial = task.evaluate(task.init_params(0))
    assert result.metrics["nn_accuracy"] >= 0.97, (initial, result.evaluations)
    assert result.metrics["loss"] < initial["loss"] / 4


def test_least_squares_with_lbfgs_strong_wolfe_reaches_the_closed_form():
    task = make_task("least-squares")
    result = train(task, seed=0, steps=1, batch_size=task.train_size, optimizer="lbfgs",
                   optimizer_kwargs={"line_search_fn": "strong_wolfe", "max_iter": 100,
                                     "tolerance_grad": 1e-10, "tolerance_change": 1e-15})
    assert result.metrics["relative_error"] <= 1e-6, result.metrics
    solution = task.solution()
    for key in solution:
        np.testing.assert_allclose(result.params[key], solution[key], rtol=0, atol=1e-5)


def test_ratings_with_sparse_adam_beats_the_baselines():
    task = make_task("ratings")
    result = train(task, seed=0, epochs=6, batch_size=1024, optimizer="SparseAdam",
                   optimizer_kwargs={"lr": 5e-2}, eval_every=2 * task.num_batches(1024))
    rmse = result.metrics["rmse"]
    # below predicting the mean rating, and below the true biases without interaction: the
    # factors learned the user-item structure
    assert rmse < task.baseline_rmse and rmse < task.bias_rmse, (rmse, task.baseline_rmse, task.bias_rmse)
    assert [e["rmse"] for e in result.evaluations] == sorted((e["rmse"] for e in result.evaluations), reverse=True)


def test_ratings_trains_with_sparse_adagrad_too():
    task = small("ratings", dtype="float32")
    result = train(task, seed=0, epochs=15, batch_size=64, optimizer="adagrad", optimizer_kwargs={"lr": 0.1})
    assert result.metrics["rmse"] < task.baseline_rmse


# ---------------------------------------------------------------------------------------
# determinism and the data-parallel equivalence


def test_same_seed_gives_bit_identical_parameters_and_losses():
    def run(seed):
        return train(make_task("digits", hidden=[32]), seed=seed, epochs=2, batch_size=50, optimizer="adamw",
                     scheduler="StepLR", scheduler_kwargs={"step_size": 10, "gamma": 0.5})

    first, again, other = run(4), run(4), run(5)
    for key in first.params:
        assert first.params[key].tobytes() == again.params[key].tobytes()
    assert [r["loss"] for r in first.history] == [r["loss"] for r in again.history]
    assert first.metrics == again.metrics
    assert not np.array_equal(first.params["0.weight"], other.params["0.weight"])


@pytest.mark.parametrize("name, optimizer, kwargs", [
    ("digits", "adam", {"lr": 1e-2}),
    ("ratings", "sparse_adam", {"lr": 1e-2}),
])
def test_training_over_several_ranks_matches_one_rank_up_to_rounding(name, optimizer, kwargs):
    results = [train(small(name), seed=1, epochs=2, batch_size=37, optimizer=optimizer, optimizer_kwargs=kwargs,
                     world_size=world_size) for world_size in (1, 3)]
    one, three = results
    np.testing.assert_allclose([r["loss"] for r in three.history], [r["loss"] for r in one.history], rtol=1e-9)
    for key in one.params:
        np.testing.assert_allclose(three.params[key], one.params[key], rtol=1e-7, atol=1e-10)


# ---------------------------------------------------------------------------------------
# optimizer groups, schedulers, evaluation, callbacks


def test_param_group_rules_become_named_optimizer_groups():
    rules = [ParamGroupRule("*.bias", {"lr": 0.0})]
    trainer = Trainer(small("digits"), seed=0, batch_size=64, optimizer="adam", optimizer_kwargs={"lr": 1e-2},
                      param_groups=rules)
    groups = trainer.optimizer.param_groups
    assert [g["param_names"] for g in groups] == [["0.weight", "2.weight"], ["0.bias", "2.bias"]]
    assert [g["lr"] for g in groups] == [1e-2, 0.0]
    before = {k: p.data.copy() for k, p in trainer.params.items()}
    trainer.run(steps=5)
    assert np.array_equal(trainer.params["0.bias"].data, before["0.bias"])
    assert not np.array_equal(trainer.params["0.weight"].data, before["0.weight"])


def test_the_tasks_own_rules_apply_unless_overridden():
    task = Quadratic()
    default = Trainer(task, optimizer="sgd", optimizer_kwargs={"lr": 0.5}, batch_size=5)
    assert [g["param_names"] for g in default.optimizer.param_groups] == [["w"], ["offset"]]
    assert default.optimizer.param_groups[1]["lr"] == 0.0
    single = Trainer(task, optimizer="sgd", optimizer_kwargs={"lr": 0.5}, batch_size=5, param_groups=())
    assert len(single.optimizer.param_groups) == 1
    assert single.run(steps=2).params["offset"][0] == 0.25  # without the rule: 1 -> 0.5 -> 0.25
    full_batch = Trainer(task, optimizer="sgd", optimizer_kwargs={"lr": 0.5}, batch_size=10)
    result = full_batch.run(epochs=40)
    assert result.metrics["distance"] < 1e-9  # gradient descent to the mean of the points
    assert np.array_equal(result.params["offset"], np.ones(1))  # the rule's lr 0 held it


def test_schedulers_by_name_step_per_step_or_per_epoch():
    task = Quadratic()  # 10 examples, batch 5: two steps per epoch
    per_step = train(task, optimizer="sgd", optimizer_kwargs={"lr": 1.0}, batch_size=5, steps=6,
                     scheduler="steplr", scheduler_kwargs={"step_size": 2, "gamma": 0.5})
    assert [r["lr"] for r in per_step.history] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    per_epoch = train(task, optimizer="sgd", optimizer_kwargs={"lr": 1.0}, batch_size=5, steps=6,
                      scheduler="ExponentialLR", scheduler_kwargs={"gamma": 0.5}, scheduler_interval="epoch")
    assert [r["lr"] for r in per_epoch.history] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    warmup = train(task, optimizer="sgd", optimizer_kwargs={"lr": 1.0}, batch_size=5, steps=5,
                   scheduler="SequentialLR",
                   scheduler_kwargs={"schedulers": [["LinearLR", {"start_factor": 0.25, "total_iters": 3}],
                                                    ["ConstantLR", {"factor": 0.1, "total_iters": 10}]],
                                     "milestones": [3]})
    assert [r["lr"] for r in warmup.history] == pytest.approx([0.25, 0.5, 0.75, 0.1, 0.1])
    chained = train(task, optimizer="sgd", optimizer_kwargs={"lr": 1.0}, batch_size=10, steps=4,
                    scheduler="ChainedScheduler",
                    scheduler_kwargs={"schedulers": [["ConstantLR", {"factor": 0.5, "total_iters": 2}],
                                                     ["ExponentialLR", {"gamma": 0.9}]]})
    assert [r["lr"] for r in chained.history] == pytest.approx([0.5, 0.45, 0.81, 0.729])


def test_reduce_lr_on_plateau_is_given_the_training_loss():
    trainer = Trainer(Quadratic(), optimizer="sgd", optimizer_kwargs={"lr": 0.1}, batch_size=10,
                      scheduler="ReduceLROnPlateau", scheduler_kwargs={"mode": "max", "patience": 0, "factor": 0.5})
    result = trainer.run(steps=4)
    # the loss falls every step, so in "max" mode it never improves after the first
    assert [r["lr"] for r in result.history] == [0.1, 0.1, 0.05, 0.025]
    assert trainer.scheduler.best == result.history[0]["loss"]


def test_evaluation_cadence_callback_and_stopping():
    seen = []

    def callback(record):
        seen.append(record)
        return record["step"] == 7

    result = train(Quadratic(), optimizer="sgd", optimizer_kwargs={"lr": 0.1}, batch_size=3, epochs=10,
                   eval_every=3, callback=callback)
    assert result.steps == 7 and [r["step"] for r in seen] == list(range(1, 8))
    assert [e["step"] for e in result.evaluations] == [3, 6, 7]
    assert "eval" in seen[2] and "eval" not in seen[3]
    assert result.metrics == {"distance": result.evaluations[-1]["distance"]}
    # 10 examples in batches of 3: four batches per epoch, the last of one example
    assert [(r["epoch"], r["batch"], r["examples"]) for r in seen[:5]] == [
        (0, 0, 3), (0, 1, 3), (0, 2, 3), (0, 3, 1), (1, 0, 3)]
    assert (result.epoch, result.batch) == (1, 3)


def test_epochs_and_steps_are_totals_and_the_first_reached_stops():
    trainer = Trainer(Quadratic(), optimizer="sgd", batch_size=4)  # three steps per epoch
    assert trainer.run(epochs=2, steps=100).steps == 6
    assert trainer.run(epochs=100, steps=8).steps == 8
    assert trainer.run(epochs=3).steps == 9 and trainer.epoch == 3


def test_initial_params_are_copied_not_modified():
    start = {"w": np.full(3, 5.0), "offset": np.ones(1)}
    result = train(Quadratic(), params=start, optimizer="sgd", batch_size=10, steps=3)
    assert np.array_equal(start["w"], np.full(3, 5.0))
    assert not np.array_equal(result.params["w"], start["w"])


# ---------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("kwargs, error, message", [
    ({"optimizer": "adamm"}, ValueError, "unknown optimizer 'adamm'; allowed: sgd, adagrad"),
    ({"optimizer_kwargs": {"lrr": 0.1}}, TypeError, "optimizer Adam got unknown argument 'lrr'; allowed: lr, betas"),
    ({"optimizer_kwargs": {"betas": (1.0, 0.9)}}, ValueError, "betas[0] must be in [0, 1); got 1.0"),
    ({"scheduler": "cosine"}, ValueError, "unknown scheduler 'cosine'; allowed: LambdaLR"),
    ({"scheduler": "StepLR", "scheduler_kwargs": {"step": 3}}, TypeError,
     "scheduler StepLR got unknown argument 'step'; allowed: step_size, gamma, last_epoch"),
    ({"scheduler_kwargs": {"T_max": 3}}, ValueError, "scheduler_kwargs given without a scheduler"),
    ({"scheduler": "StepLR", "scheduler_kwargs": {"step_size": 2}, "scheduler_interval": "batch"}, ValueError,
     "scheduler_interval must be one of 'step', 'epoch'; got 'batch'"),
    ({"scheduler": "SequentialLR", "scheduler_kwargs": {"schedulers": ["StepLR"], "milestones": []}}, TypeError,
     "SequentialLR: schedulers[0] must be a [name, kwargs] pair; got 'StepLR'"),
    ({"param_groups": [ParamGroupRule("*", {"momentum": 0.9})]}, ValueError,
     "param group rule '*' sets 'momentum', which Adam does not take"),
    ({"param_groups": [ParamGroupRule("*.gamma", {"lr": 0.1})]}, ValueError,
     "param group rule '*.gamma' matches no parameter"),
    ({"param_groups": [("*.bias", {"lr": 0.1})]}, TypeError, "param_groups must be ParamGroupRule objects; got tuple"),
    ({"optimizer": "lbfgs", "param_groups": [ParamGroupRule("*.bias", {"lr": 0.1})]}, ValueError,
     "LBFGS doesn't support per-parameter options"),
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1; got 0"),
    ({"world_size": 0}, ValueError, "world_size must be >= 1; got 0"),
    ({"seed": -3}, ValueError, "seed must be >= 0; got -3"),
    ({"params": {"0.weight": np.zeros((4, 4), np.int64)}}, TypeError,
     "params: every entry must be a str name -> float32/float64 ndarray; got '0.weight' -> ndarray of dtype int64"),
])
def test_bad_trainer_arguments_are_refused_before_training(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        Trainer(small("digits"), **kwargs)


def test_bad_run_and_train_arguments_are_refused():
    trainer = Trainer(Quadratic())
    with pytest.raises(ValueError, match=re.escape("give epochs or steps")):
        trainer.run()
    with pytest.raises(ValueError, match=re.escape("eval_every must be >= 1; got 0")):
        trainer.run(steps=1, eval_every=0)
    with pytest.raises(TypeError, match=re.escape("callback must be callable; got int")):
        trainer.run(steps=1, callback=3)
    with pytest.raises(TypeError, match=re.escape("train() got unknown argument 'epoch'; allowed: epochs, steps")):
        train(Quadratic(), epoch=3)
    with pytest.raises(TypeError, match=re.escape("task must be a shardstep.workers.tasks.Task; got str")):
        train("digits", epochs=1)
    assert trainer.step_count == 0


def test_dense_optimizers_refuse_row_sparse_gradients_by_parameter_name():
    with pytest.raises(RuntimeError, match=re.escape("Adam does not support sparse gradients (parameter 'user.weight')")):
        train(small("ratings"), optimizer="adam", steps=1)


class Misbehaving(Quadratic):
    """Quadratic with a chosen fault in loss_and_grad."""

    def __init__(self, fault: str):
        super().__init__()
        self.fault = fault

    def loss_and_grad(self, params, batch):
        loss, grads = super().loss_and_grad(params, batch)
        if self.fault == "missing":
            del grads["offset"]
        elif self.fault == "shape":
            grads["w"] = np.zeros(2)
        elif self.fault == "type":
            grads["w"] = list(grads["w"])
        elif self.fault == "nan":
            loss = float("nan")
        elif self.fault == "write":
            params["w"][0] = 1.0
        return loss, grads


@pytest.mark.parametrize("fault, error, message", [
    ("missing", ValueError, "Misbehaving.loss_and_grad must return a gradient for every parameter; "
                            "expected ['offset', 'w'], got ['w']"),
    ("shape", ValueError, "grad for parameter w must have shape (3,); got (2,)"),
    ("type", TypeError, "Misbehaving.loss_and_grad: gradient 'w' must be an ndarray or a RowSparseGrad; got list"),
    ("nan", FloatingPointError, "training loss is nan at step 1 (epoch 0, batch 0), before the update"),
    ("write", ValueError, "read-only"),
])
def test_a_task_breaking_the_contract_gets_a_clear_error(fault, error, message):
    with pytest.raises(error, match=re.escape(message)):
        train(Misbehaving(fault), optimizer="sgd", batch_size=5, steps=2)


def test_a_user_task_may_return_row_sparse_gradients():
    class SparseRows(Task):
        @property
        def train_size(self):
            return 6

        def init_params(self, seed):
            return {"table": np.ones((6, 2))}

        def examples(self, seed, epoch, positions):
            return {"rows": positions}

        def loss_and_grad(self, params, batch):
            rows = batch.data["rows"]
            values = params["table"][rows] / batch.global_size
            loss = 0.5 * float(np.sum(params["table"][rows] ** 2)) / batch.global_size
            return loss, {"table": RowSparseGrad(rows, values, params["table"].shape)}

        def evaluate(self, params):
            return {"norm": float(np.linalg.norm(params["table"]))}

    result = train(SparseRows(), optimizer="sparse_adam", optimizer_kwargs={"lr": 0.1}, batch_size=4,
                   epochs=20, world_size=2)
    assert result.metrics["norm"] < 0.5 * np.sqrt(12)


def test_the_documented_loop_example_runs_as_written():
    text = (Path(__file__).resolve().parents[1] / "docs" / "tasks.md").read_text()
    block = re.search(r"## The local loop\n\n```python\n(.*?)\n```", text, flags=re.S).group(1)
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(block, "docs/tasks.md", "exec"), namespace)
    result = namespace["result"]
    assert [e["step"] for e in result.evaluations] == [100, 200, 300, 400, 460]
    assert result.metrics["accuracy"] >= 0.97


def test_the_example_script_trains_a_task_by_name():
    out = subprocess.run(
        [sys.executable, "examples/train_task.py", "least-squares", "--optimizer", "lbfgs", "--steps", "1",
         "--full-batch", "--optimizer-arg", "line_search_fn=strong_wolfe", "--optimizer-arg", "max_iter=100",
         "--optimizer-arg", "tolerance_grad=1e-10", "--optimizer-arg", "tolerance_change=1e-15"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True, timeout=300)
    error = float(re.search(r"final loss \S+  relative_error (\S+)", out.stdout).group(1))
    assert error <= 1e-6, out.stdout


def test_a_failed_step_leaves_parameters_state_and_data_position_unchanged():
    class FailsOnce(Quadratic):
        failures = 0

        def loss_and_grad(self, params, batch):
            if batch.index == 1 and self.failures == 0:
                self.failures += 1
                return float("inf"), {}
            return super().loss_and_grad(params, batch)

    trainer = Trainer(FailsOnce(), optimizer="adam", batch_size=3)
    trainer.step()
    before = {k: p.data.copy() for k, p in trainer.params.items()}
    state = {k: v.copy() for k, v in trainer.optimizer.state[trainer.params["w"]].items()}
    with pytest.raises(FloatingPointError, match="training loss is inf at step 2 .* the parameters are unchanged"):
        trainer.step()
    assert all(np.array_equal(trainer.params[k].data, before[k]) for k in before)
    assert all(np.array_equal(v, state[k]) for k, v in trainer.optimizer.state[trainer.params["w"]].items())
    assert (trainer.step_count, trainer.batch_index) == (1, 1)
    record = trainer.step()  # retries batch 1, which now succeeds
    assert (record["step"], record["batch"], record["examples"]) == (2, 1, 3)
    reference = Trainer(Quadratic(), optimizer="adam", batch_size=3)
    reference.step()
    reference.step()
    assert all(np.array_equal(trainer.params[k].data, reference.params[k].data) for k in before)
