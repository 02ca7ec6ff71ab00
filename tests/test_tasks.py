"""The task interface and the built-in tasks: registry, sharding rule, summable partials,
exact gradients (finite differences; torch autograd live), purity, pickling, the shipped
data file and bad input."""

from __future__ import annotations

import hashlib
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from shardstep.workers.optim import RowSparseGrad
from shardstep.workers.optim.param_groups import assign_groups
from shardstep.workers.tasks import TASK_NAMES, ParamGroupRule, Task, combine_partials, make_task, task_class
from shardstep.workers.tasks.base import epoch_order
from shardstep.workers.tasks.digits import DATA_FILE, load_digits
from shardstep.workers.tasks.digits_triplet import nearest_neighbours, sample_triplets
from shardstep.workers.tasks.synthetic_mlp import width_for
from tests.conftest import require_torch
from tests.small_tasks import SMALL, small

ROOT = Path(__file__).resolve().parents[1]


def dense(grad) -> np.ndarray:
    return grad.to_dense() if isinstance(grad, RowSparseGrad) else grad


# ---------------------------------------------------------------------------------------
# registry and arguments


def test_registry_builds_every_builtin_task_by_name():
    assert TASK_NAMES == ("digits", "digits-triplet", "ratings", "least-squares", "synthetic-mlp", "modular-addition",
                          "supervised")
    for name in TASK_NAMES:
        task = small(name)
        assert isinstance(task, Task) and task.name == name
        assert task_class(name) is type(task)


def test_every_builtin_task_has_a_small_configuration():
    """SMALL (tests/small_tasks.py) is what every per-task test here and in test_training.py
    builds: a task missing from it would fail them with a bare KeyError."""
    missing, unknown = sorted(set(TASK_NAMES) - set(SMALL)), sorted(set(SMALL) - set(TASK_NAMES))
    assert not missing and not unknown, (
        f"tests/small_tasks.py SMALL must configure exactly the built-in tasks (TASK_NAMES): add a small "
        f"configuration for {missing}; remove {unknown}")


def test_a_user_task_is_built_from_a_module_reference():
    task = make_task("tests.small_tasks:Quadratic", dim=4)
    assert type(task).__name__ == "Quadratic" and task.dim == 4


@pytest.mark.parametrize("name, message", [
    ("mnist", "unknown task 'mnist'; allowed: digits, digits-triplet, ratings, least-squares, synthetic-mlp, "
              "modular-addition, supervised"),
    ("tests.no_such_module:Task", "cannot import module 'tests.no_such_module'"),
    ("tests.small_tasks:small", "'small' in 'tests.small_tasks' is not a Task subclass"),
])
def test_unknown_task_names_are_refused(name, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_task(name)


def test_unknown_task_arguments_are_refused_with_the_allowed_ones():
    with pytest.raises(TypeError, match=re.escape("task 'digits' got unknown argument 'hiden'; "
                                                  "allowed: hidden, activation, dtype")):
        make_task("digits", hiden=[64])
    with pytest.raises(TypeError, match="unknown arguments 'lr', 'epochs'"):
        make_task("least-squares", lr=0.1, epochs=3)


@pytest.mark.parametrize("name, kwargs, error, message", [
    ("digits", {"hidden": [64, 0]}, ValueError, "hidden[1] must be >= 1; got 0"),
    ("digits", {"hidden": "64"}, TypeError, "hidden must be a list of positive integers; got '64'"),
    ("digits", {"activation": "sigmoid"}, ValueError, "activation must be one of 'relu', 'tanh', 'gelu'; got 'sigmoid'"),
    ("digits", {"dtype": "int8"}, ValueError, "dtype must be 'float32' or 'float64'; got 'int8'"),
    ("digits-triplet", {"margin": -1.0}, ValueError, "margin must be >= 0.0; got -1.0"),
    ("digits-triplet", {"dim": 2.5}, TypeError, "dim must be an integer; got 2.5"),
    ("ratings", {"density": 1.5}, ValueError, "density must be in (0, 1]; got 1.5"),
    ("ratings", {"users": 3, "items": 3, "density": 0.5}, ValueError, "at least 20 observed ratings"),
    ("ratings", {"noise": float("nan")}, TypeError, "noise must be a finite real number; got nan"),
    ("least-squares", {"rows": 10, "cols": 10}, ValueError, "rows must exceed cols for a unique solution; got rows=10, cols=10"),
    ("least-squares", {"condition": 0.5}, ValueError, "condition must be >= 1.0; got 0.5"),
    ("synthetic-mlp", {"params": 100}, ValueError, "params must be >= 283; got 100"),
    ("synthetic-mlp", {"depth": 0}, ValueError, "depth must be >= 1; got 0"),
    ("synthetic-mlp", {"data_seed": -1}, ValueError, "data_seed must be >= 0; got -1"),
])
def test_bad_task_arguments_name_the_argument_the_value_and_what_is_allowed(name, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        make_task(name, **kwargs)


# ---------------------------------------------------------------------------------------
# the sharding rule


@pytest.mark.parametrize("name", TASK_NAMES)
def test_the_shards_of_every_world_size_concatenate_to_the_global_batch(name):
    task = small(name)
    batch_size = 23  # divides no train_size here: the last global batch is shorter
    for epoch in (0, 1):
        reference = list(task.batches(seed=5, epoch=epoch, batch_size=batch_size))
        assert len(reference) == task.num_batches(batch_size) == -(-task.train_size // batch_size)
        visited = np.concatenate([b.examples for b in reference])
        np.testing.assert_array_equal(np.sort(visited), np.arange(task.train_size))  # each example once
        for world_size in (1, 2, 3, 4):
            ranks = [list(task.batches(5, epoch, batch_size, rank, world_size)) for rank in range(world_size)]
            for index, whole in enumerate(reference):
                shards = [ranks[rank][index] for rank in range(world_size)]
                assert [s.rank for s in shards] == list(range(world_size))
                assert all(s.global_size == whole.size and s.index == index for s in shards)
                assert max(s.size for s in shards) - min(s.size for s in shards) <= 1
                np.testing.assert_array_equal(np.concatenate([s.examples for s in shards]), whole.examples)
                for key, array in whole.data.items():
                    np.testing.assert_array_equal(np.concatenate([s.data[key] for s in shards]), array)


def test_the_epoch_order_is_the_documented_permutation():
    task = small("digits")
    expected = np.random.default_rng([7, 3, 0]).permutation(task.train_size)
    np.testing.assert_array_equal(epoch_order(7, 3, task.train_size), expected)
    first = task.batch(seed=7, epoch=3, index=0, batch_size=50)
    np.testing.assert_array_equal(first.examples, expected[:50])
    last = task.batch(seed=7, epoch=3, index=task.num_batches(50) - 1, batch_size=50, rank=1, world_size=2)
    tail = expected[(task.num_batches(50) - 1) * 50:]
    np.testing.assert_array_equal(last.examples, tail[tail.size // 2:])
    assert not np.array_equal(epoch_order(7, 4, task.train_size), expected)
    assert not np.array_equal(epoch_order(8, 3, task.train_size), expected)


def test_a_global_batch_smaller_than_the_world_leaves_ranks_empty():
    task = small("least-squares")  # 90 examples; batch 89 leaves a last batch of 1
    shards = [task.batch(0, 0, 1, 89, rank, 3) for rank in range(3)]
    assert [s.size for s in shards] == [0, 0, 1]
    assert all(s.global_size == 1 for s in shards)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"rank": 2, "world_size": 2}, ValueError, "rank must be in [0, 1]; got 2"),
    ({"world_size": 0}, ValueError, "world_size must be >= 1; got 0"),
    ({"seed": -1}, ValueError, "seed must be >= 0; got -1"),
    ({"batch_size": 0}, ValueError, "batch_size must be >= 1; got 0"),
    ({"index": 29}, ValueError, "batch index must be in [0, 28]; got 29"),
    ({"epoch": 1.0}, TypeError, "epoch must be an integer; got 1.0"),
])
def test_bad_batch_requests_are_refused(kwargs, error, message):
    task = small("digits")
    request = {"seed": 0, "epoch": 0, "index": 0, "batch_size": 50, **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        task.batch(**request)
    if "index" not in kwargs:  # batches() checks the same arguments when called, not when iterated
        del request["index"]
        with pytest.raises(error, match=re.escape(message)):
            task.batches(**request)


# ---------------------------------------------------------------------------------------
# parameters, gradients and the summable loss


@pytest.mark.parametrize("name", TASK_NAMES)
def test_init_params_is_a_deterministic_function_of_the_seed(name):
    first, again, other = small(name).init_params(3), small(name).init_params(3), small(name).init_params(4)
    assert list(first) == list(again)
    for key in first:
        assert first[key].tobytes() == again[key].tobytes()
    assert any(not np.array_equal(first[k], other[k]) for k in first if np.any(first[k]))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_partial_losses_and_gradients_add_up_to_the_global_batch(name):
    task = small(name)
    params = task.init_params(1)
    whole = task.batch(seed=2, epoch=1, index=1, batch_size=40)
    loss, grads = task.loss_and_grad(params, whole)
    assert isinstance(loss, float) and set(grads) == set(params)
    for world_size in (2, 3, 4):
        partials = [task.loss_and_grad(params, task.batch(2, 1, 1, 40, rank, world_size))
                    for rank in range(world_size)]
        total_loss, total = combine_partials(partials)
        assert total_loss == pytest.approx(loss, rel=1e-13)
        for key in params:
            np.testing.assert_allclose(dense(total[key]), dense(grads[key]), rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_gradients_match_central_finite_differences(name):
    task = small(name)
    params = task.init_params(0)
    batch = task.batch(seed=0, epoch=0, index=0, batch_size=32)
    _, grads = task.loss_and_grad(params, batch)
    rng = np.random.default_rng(11)
    for key in params:
        direction = {k: np.zeros_like(v) for k, v in params.items()}
        direction[key] = rng.standard_normal(params[key].shape)
        step = 1e-6
        plus = task.loss_and_grad({k: params[k] + step * direction[k] for k in params}, batch)[0]
        minus = task.loss_and_grad({k: params[k] - step * direction[k] for k in params}, batch)[0]
        numeric = (plus - minus) / (2 * step)
        analytic = float(np.sum(dense(grads[key]) * direction[key]))
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9), key


def test_an_empty_shard_gives_zero_loss_and_zero_gradients():
    for name in TASK_NAMES:
        task = small(name)
        params = task.init_params(0)
        empty = task.batch(0, 0, 0, 2, rank=0, world_size=3)
        assert empty.size == 0
        loss, grads = task.loss_and_grad(params, empty)
        assert loss == 0.0
        for key, grad in grads.items():
            assert not np.any(dense(grad)) and dense(grad).shape == params[key].shape


def test_ratings_gradients_are_row_sparse_and_touch_only_the_batch():
    task = small("ratings")
    params = task.init_params(0)
    batch = task.batch(0, 0, 0, 25)
    _, grads = task.loss_and_grad(params, batch)
    assert all(isinstance(g, RowSparseGrad) for g in grads.values())
    assert set(grads["user.weight"].indices) == set(batch.data["users"])
    assert set(grads["item_bias.weight"].indices) == set(batch.data["items"])


@pytest.mark.parametrize("name", TASK_NAMES)
def test_tasks_never_modify_or_need_to_write_the_parameters(name):
    task = small(name)
    params = task.init_params(0)
    saved = {k: v.copy() for k, v in params.items()}
    for array in params.values():
        array.flags.writeable = False
    task.loss_and_grad(params, task.batch(0, 0, 0, 16))
    task.evaluate(params)
    for key in params:
        np.testing.assert_array_equal(params[key], saved[key])


@pytest.mark.parametrize("name", TASK_NAMES)
def test_tasks_pickle_small_and_compute_the_same_after_a_round_trip(name):
    task = small(name)
    params = task.init_params(0)
    batch = task.batch(0, 0, 0, 16)
    loss, grads = task.loss_and_grad(params, batch)
    blob = pickle.dumps(task)
    if name == "supervised":  # a job's own data travels with the task (no node needs the file), the model does not
        arrays = task._data()
        data_bytes = sum(a.nbytes for a in (arrays.train_inputs, arrays.train_targets, arrays.valid_inputs,
                                            arrays.valid_targets))
        assert data_bytes < len(blob) < data_bytes + 3000
    else:
        assert len(blob) < 2000  # data and model are rebuilt, not shipped
    copy = pickle.loads(blob)
    loss_copy, grads_copy = copy.loss_and_grad(params, batch)
    assert loss_copy == loss
    for key in grads:
        np.testing.assert_array_equal(dense(grads_copy[key]), dense(grads[key]))
    assert copy.evaluate(params) == task.evaluate(params)


def test_parameters_of_the_wrong_names_shapes_or_dtypes_are_refused():
    task = small("digits")
    params = task.init_params(0)
    batch = task.batch(0, 0, 0, 8)
    missing = {k: v for k, v in params.items() if k != "2.bias"}
    with pytest.raises(ValueError, match=re.escape("digits: params must have exactly the names 0.weight, 0.bias, "
                                                   "2.weight, 2.bias; missing ['2.bias'], unknown none")):
        task.loss_and_grad(missing, batch)
    with pytest.raises(ValueError, match=re.escape("params['0.bias'] must have shape (16,) and dtype float64; "
                                                   "got shape (16,) and dtype float32")):
        task.evaluate({**params, "0.bias": params["0.bias"].astype(np.float32)})
    with pytest.raises(ValueError, match=re.escape("params['0.weight'] must have shape (16, 64)")):
        task.loss_and_grad({**params, "0.weight": params["0.weight"].T.copy()}, batch)
    with pytest.raises(TypeError, match=re.escape("params['2.bias'] must be an ndarray; got list")):
        task.loss_and_grad({**params, "2.bias": [0.0] * 10}, batch)


# ---------------------------------------------------------------------------------------
# the shipped data and task-specific rules


def test_the_digits_file_is_the_documented_one():
    readme = (DATA_FILE.parent / "README.md").read_text()
    digest = hashlib.sha256(DATA_FILE.read_bytes()).hexdigest()
    assert digest in readme
    assert "CC BY 4.0" in readme and "10.24432/C50P49" in readme
    assert (DATA_FILE.parent / "LICENSE").exists()
    with np.load(DATA_FILE, allow_pickle=False) as archive:
        images, labels, held_out = archive["images"], archive["labels"], archive["held_out"]
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8 and images.max() == 16
    assert np.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # the held-out rule re-derived: every fifth example of each digit, from the fifth on
    expected = np.zeros(1797, bool)
    for digit in range(10):
        expected[np.flatnonzero(labels == digit)[4::5]] = True
    np.testing.assert_array_equal(held_out, expected)
    data = load_digits(np.dtype(np.float32))
    assert data.train_inputs.shape == (1442, 64) and data.held_out_inputs.shape == (355, 64)
    assert data.train_inputs.max() == 1.0 and data.train_inputs.dtype == np.float32


def test_triplets_pair_each_anchor_with_its_own_digit_and_another():
    labels = np.repeat(np.arange(4), [3, 5, 2, 7])
    positive, negative = sample_triplets(labels, np.random.default_rng(0))
    anchors = np.arange(labels.size)
    assert np.all(labels[positive] == labels) and np.all(positive != anchors)
    assert np.all(labels[negative] != labels)
    # over many draws every other member of the class is a positive, every outsider a negative
    rng = np.random.default_rng(1)
    seen_pos, seen_neg = set(), set()
    for _ in range(200):
        p, n = sample_triplets(labels, rng)
        seen_pos.add((0, int(p[0])))
        seen_neg.add(int(n[0]))
    assert seen_pos == {(0, 1), (0, 2)} and seen_neg == set(range(3, 17))
    with pytest.raises(ValueError, match="two or more examples"):
        sample_triplets(np.array([0, 0, 1]), rng)


def test_triplet_data_depends_on_seed_and_epoch_not_on_the_batch():
    task = small("digits-triplet")
    positions = np.array([5, 900, 17])
    one = task.examples(3, 2, positions)
    together = task.examples(3, 2, np.array([17, 5, 900, 41]))
    np.testing.assert_array_equal(one["positive"][0], together["positive"][1])
    np.testing.assert_array_equal(one["negative"][2], together["negative"][0])
    other_epoch = task.examples(3, 3, positions)
    assert not np.array_equal(one["positive"], other_epoch["positive"])


def test_nearest_neighbours_against_a_brute_force_search():
    rng = np.random.default_rng(4)
    reference, queries = rng.standard_normal((700, 5)), rng.standard_normal((1100, 5))
    brute = np.linalg.norm(queries[:, None, :] - reference[None, :, :], axis=2).argmin(axis=1)
    np.testing.assert_array_equal(nearest_neighbours(queries, reference), brute)


def test_least_squares_solution_is_the_closed_form():
    task = small("least-squares")
    data = task._data()
    design = np.hstack([data.inputs, np.ones((task.rows, 1))])
    theta = np.linalg.solve(design.T @ design, design.T @ data.targets[:, 0])  # normal equations
    solution = task.solution()
    np.testing.assert_allclose(solution["weight"][0], theta[:-1], rtol=1e-10)
    np.testing.assert_allclose(solution["bias"], theta[-1:], rtol=1e-10)
    full = task.batch(0, 0, 0, task.train_size)
    _, grads = task.loss_and_grad(solution, full)
    assert max(np.abs(g).max() for g in grads.values()) < 1e-13
    assert task.evaluate(solution)["relative_error"] == 0.0


def test_synthetic_mlp_width_gives_the_nearest_parameter_count():
    for target in (10**6, 10**7, 10**8, 3 * 10**8):
        width = width_for(target, 4, 256, 10)

        def count(w):
            return 256 * w + w + 3 * (w * w + w) + 10 * w + 10

        assert abs(count(width) - target) <= min(abs(count(width - 1) - target), abs(count(width + 1) - target))
        assert abs(count(width) - target) / target < 1e-3
    task = make_task("synthetic-mlp", params=10**6)
    assert task.sizes == (256, 534, 534, 534, 534, 10) and task.num_params == 999_658


def test_ratings_baselines_are_ordered_and_as_documented():
    task = make_task("ratings")
    assert task.noise_rmse < task.bias_rmse < task.baseline_rmse
    assert round(task.baseline_rmse, 2) == 1.30 and round(task.bias_rmse, 2) == 1.09
    assert round(task.noise_rmse, 2) == 0.49


# ---------------------------------------------------------------------------------------
# param group rules and the data-parallel reduction


def test_param_group_rules_assign_first_match_default_group_first():
    names = ["0.weight", "0.bias", "2.weight", "2.bias"]
    rules = [ParamGroupRule("*.bias", {"weight_decay": 0.0}), ParamGroupRule("2.*", {"lr": 0.1})]
    groups = assign_groups(names, rules)
    assert groups == [(None, ["0.weight"]), (rules[0], ["0.bias", "2.bias"]), (rules[1], ["2.weight"])]
    with pytest.raises(ValueError, match=re.escape("param group rule 'embed*' matches no parameter")):
        assign_groups(names, [ParamGroupRule("embed*", {"lr": 1.0})])
    with pytest.raises(ValueError, match="'params' is chosen by the pattern"):
        ParamGroupRule("*", {"params": []})
    with pytest.raises(ValueError, match="pattern must be a non-empty string"):
        ParamGroupRule("", {})


def test_combine_partials_adds_dense_and_concatenates_sparse_in_rank_order():
    sparse = [RowSparseGrad([1, 2], np.ones((2, 2)), (4, 2)), RowSparseGrad([2], np.full((1, 2), 3.0), (4, 2))]
    loss, total = combine_partials([(0.5, {"w": np.ones(3), "e": sparse[0]}),
                                    (0.25, {"w": np.full(3, 2.0), "e": sparse[1]})])
    assert loss == 0.75
    np.testing.assert_array_equal(total["w"], [3.0, 3.0, 3.0])
    np.testing.assert_array_equal(total["e"].indices, [1, 2, 2])
    np.testing.assert_array_equal(total["e"].to_dense(), [[0, 0], [1, 1], [4, 4], [0, 0]])
    with pytest.raises(ValueError, match="rank 1 returned gradients for"):
        combine_partials([(0.0, {"w": np.ones(3)}), (0.0, {"v": np.ones(3)})])
    with pytest.raises(TypeError, match="row-sparse on some ranks and dense on others"):
        combine_partials([(0.0, {"e": sparse[0]}), (0.0, {"e": np.ones((4, 2))})])
    with pytest.raises(ValueError, match="at least one"):
        combine_partials([])


def test_the_documented_user_task_example_runs_as_written():
    text = (ROOT / "docs" / "tasks.md").read_text()
    block = re.search(r"## Your own model: a complete example\n\n```python\n(.*?)\n```", text, flags=re.S).group(1)
    namespace: dict = {"__name__": "docs_example"}
    exec(compile(block, "docs/tasks.md", "exec"), namespace)
    assert namespace["result"].metrics["accuracy"] >= 0.95
    promised = re.search(r"# \{'accuracy': ([0-9.]+)\}", block).group(1)
    assert namespace["result"].metrics["accuracy"] == pytest.approx(float(promised), abs=1e-3)


# ---------------------------------------------------------------------------------------
# the composed models against torch autograd


def _torch_loss(torch, name, task, params, batch):
    """The task's loss on ``batch`` written in torch, and torch's parameter tensors."""
    tensors = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    data = {k: torch.from_numpy(v) for k, v in batch.data.items()}
    functional = torch.nn.functional

    def mlp(x, layers):
        for index in range(layers):
            x = x @ tensors[f"{2 * index}.weight"].T + tensors[f"{2 * index}.bias"]
            if index < layers - 1:
                x = torch.relu(x)
        return x

    if name in ("digits", "synthetic-mlp"):
        layers = len(task.sizes) - 1
        total = functional.cross_entropy(mlp(data["inputs"], layers), data["labels"], reduction="sum")
    elif name == "digits-triplet":
        embed = [mlp(data[k], 2) for k in ("anchor", "positive", "negative")]
        total = functional.triplet_margin_loss(*embed, margin=task.margin, p=2.0, reduction="sum")
    elif name == "supervised":  # Linear, Tanh, Linear
        hidden = torch.tanh(data["inputs"] @ tensors["0.weight"].T + tensors["0.bias"])
        logits = hidden @ tensors["2.weight"].T + tensors["2.bias"]
        total = functional.cross_entropy(logits, data["targets"], reduction="sum")
    elif name == "modular-addition":  # the task's own torch.nn twin, on the same parameters
        model = task.torch_module()
        model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()})
        tensors.update(model.named_parameters())
        total = functional.cross_entropy(model(data["tokens"]), data["labels"], reduction="sum")
    elif name == "ratings":
        users, items = data["users"], data["items"]
        prediction = ((tensors["user.weight"][users] * tensors["item.weight"][items]).sum(dim=1)
                      + tensors["user_bias.weight"][users, 0] + tensors["item_bias.weight"][items, 0]
                      + task.mean_rating)
        total = ((prediction - data["ratings"]) ** 2).sum()
    else:
        prediction = data["inputs"] @ tensors["weight"].T + tensors["bias"]
        total = ((prediction - data["targets"]) ** 2).sum()
    return total / batch.global_size, tensors


@pytest.mark.torch_live
@pytest.mark.parametrize("name", TASK_NAMES)
def test_losses_and_gradients_match_torch_autograd(name):
    torch = require_torch()
    task = small(name)
    params = task.init_params(2)
    batch = task.batch(seed=1, epoch=0, index=0, batch_size=48, rank=1, world_size=2)
    loss, grads = task.loss_and_grad(params, batch)
    reference, tensors = _torch_loss(torch, name, task, params, batch)
    reference.backward()
    assert loss == pytest.approx(reference.item(), rel=1e-10)
    for key in params:
        np.testing.assert_allclose(dense(grads[key]), tensors[key].grad.numpy(), rtol=1e-8, atol=1e-12)
