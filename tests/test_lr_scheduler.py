"""shardstep.workers.optim.lr_scheduler against torch 2.13's torch.optim.lr_scheduler.

CONFIGS (tests/parity/scheduler_cases.py) is the one list of scheduler configurations;
tests/fixtures/make_scheduler_fixtures.py imports it to record torch's trajectories into
tests/fixtures/scheduler_trajectories.json, and the tests here replay it with our schedulers.

Tolerance: none. torch computes every learning rate and momentum of these schedulers with
plain Python float arithmetic (math.cos, **, * and /), and we evaluate the same formulas in
the same operation order, so every value is compared for exact (bit-for-bit) equality, both
against the fixture and against torch live. There is no rtol anywhere in this file.
"""

from __future__ import annotations

import copy
import json
import math
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import pytest

from shardstep.workers.optim import lr_scheduler
from shardstep.workers.optim.algorithms.sgd import SGD
from shardstep.workers.optim.optimizer import Optimizer
from shardstep.workers.optim.parameter import Parameter
from tests.conftest import require_torch
from tests.parity.scheduler_cases import (
    CONFIG_IDS,
    CONFIGS,
    MODULE,
    CountingFactor,
    HalvingAmplitude,
    OursAPI,
    build_scheduler,
    canonical,
    decaying_amplitude,
    every_third_decay,
    momenta,
    step_scheduler,
    torch_trajectory,
    trajectory_of,
    warmup_then_decay,
)

FIXTURE_PATH = Path(__file__).parent / "fixtures" / "scheduler_trajectories.json"

# our schedulers must not warn in normal use (step(epoch) warns by design; the runner hides it)
pytestmark = pytest.mark.filterwarnings("error::UserWarning")


# ---------------------------------------------------------------------------------------
# comparing trajectories


def assert_identical_trajectories(got, expected, label):
    for key in ("lr", "momentum"):
        assert len(got[key]) == len(expected[key]), (
            f"{label}: {key} has {len(got[key])} ticks, expected {len(expected[key])}")
        for tick, (ours, theirs) in enumerate(zip(got[key], expected[key])):
            same = len(ours) == len(theirs) and all(float(a).hex() == float(b).hex() for a, b in zip(ours, theirs))
            assert same, (
                f"{label}: {key} differs at tick {tick}: ours {ours!r}, expected {theirs!r}, "
                f"difference {[float(a) - float(b) for a, b in zip(ours, theirs)]}"
            )


# ---------------------------------------------------------------------------------------
# parity with torch: committed fixture, and live when torch is importable


@pytest.fixture(scope="module")
def fixture_cases():
    data = json.loads(FIXTURE_PATH.read_text())
    return data["cases"]


@pytest.fixture(scope="session")
def torch():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return require_torch()


def test_fixture_covers_exactly_the_configs(fixture_cases):
    assert sorted(fixture_cases) == sorted(CONFIG_IDS), (
        "tests/fixtures/scheduler_trajectories.json is stale; regenerate it with "
        "python tests/fixtures/make_scheduler_fixtures.py"
    )


def _scheduler_names(spec):
    yield spec["name"]
    for child in spec.get("schedulers", ()):
        yield from _scheduler_names(child)


def test_configs_cover_every_scheduler():
    """CONFIGS is written by hand; every scheduler shardstep.workers.optim.lr_scheduler
    exports (its __all__, the names a job file may use) needs configurations there, or the
    parity, restore and state tests leave it out."""
    registry = {name for name in lr_scheduler.__all__ if isinstance(getattr(lr_scheduler, name), type)
                and issubclass(getattr(lr_scheduler, name), lr_scheduler.LRScheduler) and name != "LRScheduler"}
    used = {name for config in CONFIGS for name in _scheduler_names(config["scheduler"])}
    assert used == registry, (
        f"tests/parity/scheduler_cases.py CONFIGS: add configurations for {sorted(registry - used)} (then "
        f"python tests/fixtures/make_scheduler_fixtures.py); not schedulers of lr_scheduler: {sorted(used - registry)}")


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_matches_torch_fixture(config, fixture_cases):
    expected = fixture_cases[config["id"]]
    assert expected["spec"] == canonical(config), (
        f"fixture for {config['id']} was made from another configuration; regenerate it with "
        "python tests/fixtures/make_scheduler_fixtures.py"
    )
    assert_identical_trajectories(trajectory_of(OursAPI(), config), expected, config["id"])


@pytest.mark.torch_live
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_matches_torch_live(config, torch, fixture_cases):
    theirs = torch_trajectory(torch, config)
    assert_identical_trajectories(trajectory_of(OursAPI(), config), theirs, f"{config['id']} vs live torch")
    # and the committed fixture is what this torch produces
    assert_identical_trajectories(fixture_cases[config["id"]], theirs, f"{config['id']} fixture vs live torch")


@pytest.mark.torch_live
def test_torch_is_the_fixture_version(torch):
    data = json.loads(FIXTURE_PATH.read_text())
    assert torch.__version__.split("+")[0] == data["torch_version"]


# ---------------------------------------------------------------------------------------
# restore mid-run, in every order, continues bit-identically


RESTORE_ORDERS = ("optimizer_then_scheduler", "scheduler_then_optimizer", "scheduler_built_after_optimizer")


def pack(value) -> bytes:
    return msgpack.packb(value)


def unpack(data: bytes):
    return msgpack.unpackb(data, strict_map_key=False)


def groups_bytes(optimizer) -> bytes:
    """Every param-group entry but the parameters, as bytes: equal bytes, identical floats."""
    return pack([{k: v for k, v in group.items() if k not in ("params", "param_names")}
                 for group in optimizer.param_groups])


@dataclass
class Snapshot:
    scheduler_state: bytes
    optimizer_state: dict
    params: list


@dataclass
class Run:
    records: list = field(default_factory=list)
    snapshots: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)


def record(optimizer, scheduler):
    return ([float(v).hex() for v in scheduler.get_last_lr()], groups_bytes(optimizer))


def checkpoints_of(config):
    ticks = config["ticks"]
    return (0, 1, ticks // 3, 2 * ticks // 3 + 1)


def finish(run, optimizer, scheduler, params):
    run.final = {
        "scheduler": pack(scheduler.state_dict()),
        "groups": groups_bytes(optimizer),
        "params": [p.data.copy() for p in params],
        "state": copy.deepcopy(optimizer.state_dict()["state"]),
    }


_REFERENCE_RUNS: dict[tuple[str, bool], Run] = {}


def reference_run(config, gradients=False) -> Run:
    """The uninterrupted run, with snapshots (msgpack'd scheduler state) at the checkpoints."""
    key = (config["id"], gradients)
    if key in _REFERENCE_RUNS:
        return _REFERENCE_RUNS[key]
    api, run, checkpoints = OursAPI(gradients), Run(), checkpoints_of(config)
    optimizer, params = api.optimizer(config["optimizer"])
    scheduler = build_scheduler(config["scheduler"], optimizer, api)
    for tick in range(config["ticks"] + 1):
        if tick:
            optimizer.step()
            step_scheduler(scheduler, config, tick)
        run.records.append(record(optimizer, scheduler))
        if tick in checkpoints:
            run.snapshots[tick] = Snapshot(
                pack(scheduler.state_dict()), copy.deepcopy(optimizer.state_dict()), [p.data.copy() for p in params])
    finish(run, optimizer, scheduler, params)
    _REFERENCE_RUNS[key] = run
    return run


def resumed_run(config, snapshot: Snapshot, start: int, order: str, gradients=False) -> Run:
    api, run = OursAPI(gradients), Run()
    optimizer, params = api.optimizer(config["optimizer"])
    for p, saved in zip(params, snapshot.params):
        p.data[...] = saved
    scheduler_state = unpack(snapshot.scheduler_state)
    optimizer_state = copy.deepcopy(snapshot.optimizer_state)
    if order == "optimizer_then_scheduler":
        scheduler = build_scheduler(config["scheduler"], optimizer, api)
        optimizer.load_state_dict(optimizer_state)
        scheduler.load_state_dict(scheduler_state)
    elif order == "scheduler_then_optimizer":
        scheduler = build_scheduler(config["scheduler"], optimizer, api)
        scheduler.load_state_dict(scheduler_state)
        optimizer.load_state_dict(optimizer_state)
    else:
        optimizer.load_state_dict(optimizer_state)
        scheduler = build_scheduler(config["scheduler"], optimizer, api)
        scheduler.load_state_dict(scheduler_state)
    run.records.append(record(optimizer, scheduler))
    for tick in range(start + 1, config["ticks"] + 1):
        optimizer.step()
        step_scheduler(scheduler, config, tick)
        run.records.append(record(optimizer, scheduler))
    finish(run, optimizer, scheduler, params)
    return run


@pytest.mark.parametrize("order", RESTORE_ORDERS)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_restore_in_any_order_continues_identically(config, order):
    check_restores(config, order, gradients=False)


WITH_UPDATES = [c for c in CONFIGS
                if c["id"] in ("cyclic_triangular", "onecycle_adam_betas", "sequential_warmup_cosine")]


@pytest.mark.parametrize("order", RESTORE_ORDERS)
@pytest.mark.parametrize("config", WITH_UPDATES, ids=[c["id"] for c in WITH_UPDATES])
def test_restore_with_real_updates_ends_with_identical_parameters(config, order):
    check_restores(config, order, gradients=True)


def check_restores(config, order, gradients):
    reference = reference_run(config, gradients)
    if gradients:
        assert reference.final["state"], "the optimizer should have state after real updates"
    for start, snapshot in reference.snapshots.items():
        resumed = resumed_run(config, snapshot, start, order, gradients)
        # pytest.fail rather than assert: pytest's own diff of long byte strings is slow
        for offset, (got, expected) in enumerate(zip(resumed.records, reference.records[start:])):
            if got[0] != expected[0]:
                pytest.fail(f"restored at tick {start}: get_last_lr differs at tick {start + offset}: "
                            f"{got[0]} vs {expected[0]} (float.hex)")
            if got[1] != expected[1]:
                pytest.fail(f"restored at tick {start}: param_groups differ at tick {start + offset}: "
                            f"{unpack(got[1])} vs {unpack(expected[1])}")
        assert len(resumed.records) == len(reference.records) - start
        if resumed.final["scheduler"] != reference.final["scheduler"]:
            pytest.fail(f"restored at tick {start}: final state_dict differs: "
                        f"{unpack(resumed.final['scheduler'])} vs {unpack(reference.final['scheduler'])}")
        if resumed.final["groups"] != reference.final["groups"]:
            pytest.fail(f"restored at tick {start}: final param_groups differ")
        for got, expected in zip(resumed.final["params"], reference.final["params"]):
            assert np.array_equal(got, expected), f"restored at tick {start}: parameters differ at the end"
        for index, state in reference.final["state"].items():
            for name, value in state.items():
                assert np.array_equal(resumed.final["state"][index][name], value)


def _only_plain_types(value, path="state"):
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for index, item in enumerate(value):
            _only_plain_types(item, f"{path}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            assert isinstance(key, str), f"{path} has a non-string key {key!r}"
            _only_plain_types(item, f"{path}[{key!r}]")
        return
    raise AssertionError(f"{path} is a {type(value).__name__}, not plain data")


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_is_plain_data(config):
    reference = reference_run(config)
    saved = [snapshot.scheduler_state for snapshot in reference.snapshots.values()] + [reference.final["scheduler"]]
    for data in saved:
        state = unpack(data)
        _only_plain_types(state)
        assert pack(state) == data


# the entries of a state_dict besides a scheduler's declared fields (see lr_scheduler.LRScheduler)
COMMON_KEYS = ("last_epoch", "step_count", "base_lrs", "last_lr")
MOMENTUM_KEYS = ("momentum_key", "last_momentum")
# entries a scheduler keeps in code rather than in its fields (see the class)
ENTRIES_IN_CODE = {"LambdaLR": ("lr_lambdas",), "MultiplicativeLR": ("lr_lambdas",)}


def declared_keys(scheduler):
    """The state_dict keys, in order, that the scheduler's class declares."""
    momentum = MOMENTUM_KEYS if scheduler._momentum_key is not None else ()
    fields = [field.name for field in type(scheduler).fields]
    if isinstance(scheduler, (lr_scheduler.SequentialLR, lr_scheduler.ChainedScheduler)):
        return ["scheduler", "last_lr", *momentum, "schedulers", *fields]
    if isinstance(scheduler, lr_scheduler.ReduceLROnPlateau):
        return ["scheduler", *fields]  # its last_epoch and last_lr are fields of its own
    return ["scheduler", *COMMON_KEYS, *momentum, *fields, *ENTRIES_IN_CODE.get(type(scheduler).__name__, ())]


def assert_declared_keys(scheduler, state, label):
    assert list(state) == declared_keys(scheduler), label
    children = zip(getattr(scheduler, "_schedulers", ()), state.get("schedulers", ()), strict=True)
    for index, (child, child_state) in enumerate(children):
        assert_declared_keys(child, child_state, f"{label}: schedulers[{index}]")


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_keys_are_the_declared_fields(config):
    """A state_dict holds the common entries and the fields its class declares, in the
    declared order, and nothing else: no entry is written outside the declaration."""
    optimizer, _ = OursAPI().optimizer(config["optimizer"])
    scheduler = build_scheduler(config["scheduler"], optimizer, OursAPI())
    for tick in range(1, 6):
        optimizer.step()
        step_scheduler(scheduler, config, tick)
    assert_declared_keys(scheduler, scheduler.state_dict(), config["id"])


def test_state_dict_round_trips_through_msgpack_unchanged():
    config = next(c for c in CONFIGS if c["id"] == "sequential_cyclic_then_step")
    optimizer, _ = OursAPI().optimizer(config["optimizer"])
    scheduler = build_scheduler(config["scheduler"], optimizer, OursAPI())
    for _ in range(13):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    _only_plain_types(state)
    assert unpack(pack(state)) == state
    assert state["scheduler"] == "SequentialLR"
    assert [child["scheduler"] for child in state["schedulers"]] == ["CyclicLR", "StepLR"]
    assert state["last_lr"] == scheduler.get_last_lr()
    assert state["last_momentum"] == momenta(optimizer)


# ---------------------------------------------------------------------------------------
# API details


def two_group_sgd(momentum=0.9):
    return SGD([{"params": [Parameter(np.zeros(2))], "lr": 0.1},
                {"params": [Parameter(np.zeros(2))], "lr": 0.05}], lr=0.1, momentum=momentum)


class PlainOptimizer(Optimizer):
    """An optimizer with neither momentum nor betas (its rule is irrelevant here)."""

    def __init__(self, params, lr=0.1):
        super().__init__(params, {"lr": lr})


def test_public_attributes_and_initial_lr():
    optimizer = two_group_sgd()
    scheduler = lr_scheduler.StepLR(optimizer, step_size=2)
    assert scheduler.last_epoch == 0
    assert scheduler.base_lrs == [0.1, 0.05]
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.1, 0.05]
    lrs = scheduler.get_last_lr()
    lrs[0] = 99.0  # a copy: callers cannot corrupt the scheduler
    assert scheduler.get_last_lr() == [0.1, 0.05]


class HalvingSchedule(lr_scheduler.LRScheduler):
    """A user-defined scheduler: only get_lr, the rest comes from the base class."""

    def get_lr(self):
        return [base_lr * 0.5 ** (self.last_epoch // 4) for base_lr in self.base_lrs]


def test_user_subclass_of_the_base_class_steps_and_restores():
    optimizer = two_group_sgd()
    scheduler = HalvingSchedule(optimizer)
    run_ticks(optimizer, scheduler, 9)
    assert scheduler.last_epoch == 9
    assert scheduler.get_last_lr() == [0.1 * 0.25, 0.05 * 0.25]
    state = unpack(pack(scheduler.state_dict()))
    assert state == {"scheduler": "HalvingSchedule", "last_epoch": 9, "step_count": 10,
                     "base_lrs": [0.1, 0.05], "last_lr": [0.025, 0.0125]}
    expected = run_ticks(optimizer, scheduler, 8)
    fresh = two_group_sgd()
    restored = HalvingSchedule(fresh)
    restored.load_state_dict(state)
    assert run_ticks(fresh, restored, 8) == expected


def test_resuming_without_initial_lr_raises_key_error():
    with pytest.raises(KeyError, match=re.escape(
            "param_groups[0] has no 'initial_lr'; CosineAnnealingLR with last_epoch=5 resumes a schedule")):
        lr_scheduler.CosineAnnealingLR(two_group_sgd(), T_max=10, last_epoch=5)


def test_onecycle_resuming_without_bounds_raises_key_error():
    optimizer = two_group_sgd()
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    with pytest.raises(KeyError, match=re.escape("param_groups[0] has no 'max_lr', 'min_lr', 'max_momentum'")):
        lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=10, last_epoch=3)


def _exponential_lrs(steps, gamma=0.9):
    """two_group_sgd's learning rates after ``steps`` ExponentialLR steps (torch's chained form)."""
    lrs = [0.1, 0.05]
    for _ in range(steps):
        lrs = [lr * gamma for lr in lrs]
    return lrs


def test_step_before_optimizer_step_warns():
    """As torch: the first scheduler.step() before any optimizer.step() warns, once, and
    later steps do not warn again even while the optimizer still has not stepped; in the
    right order nothing warns, construction included. The schedule is the same either way."""
    optimizer = two_group_sgd()
    scheduler = lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    with pytest.warns(UserWarning) as early:
        scheduler.step()
        scheduler.step()  # the optimizer has still not stepped: not a second warning
        optimizer.step()
        scheduler.step()
    assert [str(warning.message) for warning in early] == [lr_scheduler.STEP_ORDER_WARNING]
    assert scheduler.last_epoch == 3 and scheduler.get_last_lr() == _exponential_lrs(3)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer = two_group_sgd()
        scheduler = lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
        optimizer.step()
        scheduler.step()
        scheduler.step()  # after the first step, with no optimizer.step() in between
    assert [str(warning.message) for warning in caught] == []
    assert scheduler.last_epoch == 2 and scheduler.get_last_lr() == _exponential_lrs(2)
    assert [group["lr"] for group in optimizer.param_groups] == _exponential_lrs(2)


def test_optimizer_step_is_not_wrapped():
    optimizer = two_group_sgd()
    step = optimizer.step
    lr_scheduler.StepLR(optimizer, step_size=3)
    assert optimizer.step == step
    assert "step" not in vars(optimizer)


def test_step_with_epoch_warns_and_uses_the_closed_form():
    optimizer = two_group_sgd()
    scheduler = lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.5)
    optimizer.step()
    with pytest.warns(UserWarning, match="passing an epoch to scheduler.step"):
        scheduler.step(25)
    assert scheduler.last_epoch == 25
    assert scheduler.get_last_lr() == [0.1 * 0.5**2, 0.05 * 0.5**2]


def test_cyclic_and_onecycle_need_momentum_or_betas():
    for build in (lambda opt: lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.1),
                  lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)):
        optimizer = PlainOptimizer([Parameter(np.zeros(2))])
        with pytest.raises(ValueError, match=r"^(CyclicLR|OneCycleLR): cycle_momentum=True needs an optimizer with "
                                             r"'momentum' or 'betas' in its defaults; PlainOptimizer has neither "
                                             r"\(pass cycle_momentum=False\)$"):
            build(optimizer)
    optimizer = PlainOptimizer([Parameter(np.zeros(2))])
    scheduler = lr_scheduler.CyclicLR(optimizer, base_lr=0.01, max_lr=0.1, step_size_up=4, cycle_momentum=False)
    optimizer.step()
    scheduler.step()
    assert scheduler.get_last_lr() == [0.01 + (0.1 - 0.01) * (1 / 4) * 1.0]


def test_onecycle_past_total_steps_raises():
    optimizer = two_group_sgd()
    scheduler = lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=3)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    optimizer.step()
    with pytest.raises(ValueError, match=r"^OneCycleLR was stepped to step 4, past total_steps=3$"):
        scheduler.step()


def test_load_rejects_another_schedulers_state():
    optimizer = two_group_sgd()
    state = lr_scheduler.StepLR(optimizer, step_size=3).state_dict()
    scheduler = lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    with pytest.raises(ValueError, match=r"^ExponentialLR.load_state_dict\(\) got the state of a 'StepLR' scheduler$"):
        scheduler.load_state_dict(state)


def test_load_rejects_wrong_group_count_and_changes_nothing():
    optimizer = two_group_sgd()
    scheduler = lr_scheduler.SequentialLR(optimizer, [
        lr_scheduler.LinearLR(optimizer, total_iters=4), lr_scheduler.ExponentialLR(optimizer, gamma=0.9)], [4])
    optimizer.step()
    scheduler.step()
    before, groups_before = pack(scheduler.state_dict()), groups_bytes(optimizer)
    state = scheduler.state_dict()
    state["schedulers"][1]["last_lr"] = [0.1]
    with pytest.raises(ValueError,
                       match=r"^ExponentialLR: state 'last_lr' has 1 values; the optimizer has 2 param groups$"):
        scheduler.load_state_dict(state)
    assert pack(scheduler.state_dict()) == before
    assert groups_bytes(optimizer) == groups_before


def test_load_writes_learning_rates_and_momenta_into_the_optimizer():
    optimizer = two_group_sgd()
    scheduler = lr_scheduler.OneCycleLR(optimizer, max_lr=[0.1, 0.2], total_steps=50)
    for _ in range(20):
        optimizer.step()
        scheduler.step()
    state = unpack(pack(scheduler.state_dict()))
    fresh = two_group_sgd()
    restored = lr_scheduler.OneCycleLR(fresh, max_lr=[0.5, 0.5], total_steps=50)  # other bounds: the state wins
    restored.load_state_dict(state)
    assert groups_bytes(fresh) == groups_bytes(optimizer)
    assert restored.get_last_lr() == scheduler.get_last_lr()


# Records every attempt to import torch, found or not, so that the check holds whether or not
# torch is installed (the torch-free CI stage runs it; the torch stage runs only torch_live).
# Runs every configuration with our schedulers, restores each, then imports torch itself to
# show the recorder sees an import.
NO_TORCH_PROBE = """
import json, sys


class Recorder:
    attempts = []

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            Recorder.attempts.append(name)
        return None


sys.meta_path.insert(0, Recorder())
from tests.parity.scheduler_cases import CONFIGS, OursAPI, build_scheduler, step_scheduler

for config in CONFIGS:
    api = OursAPI(gradients=True)
    optimizer, _ = api.optimizer(config["optimizer"])
    scheduler = build_scheduler(config["scheduler"], optimizer, api)
    for tick in range(1, config["ticks"] + 1):
        optimizer.step()
        step_scheduler(scheduler, config, tick)
    scheduler.load_state_dict(scheduler.state_dict())
found = {"attempts": list(Recorder.attempts), "loaded": "torch" in sys.modules}
try:
    import torch
except ImportError:
    pass
found["probe_saw_torch"] = "torch" in Recorder.attempts[len(found["attempts"]):]
print(json.dumps(found))
"""


def test_product_code_does_not_import_torch():
    """Building, stepping and restoring every scheduler configuration never tries to import
    torch (not at the top of lr_scheduler, and not inside its functions either)."""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", NO_TORCH_PROBE], cwd=Path(__file__).parents[1],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["attempts"] == [] and not found["loaded"], found
    assert found["probe_saw_torch"], "the probe did not see its own import of torch: it cannot see any"


# ---------------------------------------------------------------------------------------
# lambdas and callable objects across state_dict


def lambda_state(scheduler):
    return unpack(pack(scheduler.state_dict()))["lr_lambdas"]


def run_ticks(optimizer, scheduler, ticks):
    lrs = []
    for _ in range(ticks):
        optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr())
    return lrs


def test_string_reference_is_stored_and_restored():
    optimizer = two_group_sgd()
    scheduler = lr_scheduler.LambdaLR(optimizer, f"{MODULE}:warmup_then_decay")
    run_ticks(optimizer, scheduler, 12)
    assert lambda_state(scheduler) == [{"reference": f"{MODULE}:warmup_then_decay"}, {"same_as": 0}]
    state = unpack(pack(scheduler.state_dict()))
    expected = run_ticks(optimizer, scheduler, 20)

    fresh = two_group_sgd()
    restored = lr_scheduler.LambdaLR(fresh, lambda epoch: 1.0)  # replaced by the stored reference
    restored.load_state_dict(state)
    assert restored.lr_lambdas[0] is warmup_then_decay
    assert restored.lr_lambdas[1] is restored.lr_lambdas[0]
    assert run_ticks(fresh, restored, 20) == expected


def test_module_level_function_becomes_a_reference():
    optimizer = two_group_sgd()
    scheduler = lr_scheduler.MultiplicativeLR(optimizer, [every_third_decay, math.exp])
    assert lambda_state(scheduler) == [{"reference": f"{MODULE}:every_third_decay"}, {"reference": "math:exp"}]


def test_callable_object_state_is_its_class_and_attributes():
    optimizer = two_group_sgd()
    counting = CountingFactor(0.9)
    scheduler = lr_scheduler.MultiplicativeLR(optimizer, counting)
    run_ticks(optimizer, scheduler, 5)
    assert lambda_state(scheduler) == [
        {"class": f"{MODULE}:CountingFactor", "attributes": {"factor": 0.9, "calls": 10}}, {"same_as": 0}]
    state = unpack(pack(scheduler.state_dict()))
    expected = run_ticks(optimizer, scheduler, 10)

    fresh = two_group_sgd()
    restored = lr_scheduler.MultiplicativeLR(fresh, CountingFactor(0.5))  # replaced by the stored object
    restored.load_state_dict(state)
    loaded = restored.lr_lambdas[0]
    assert type(loaded) is CountingFactor and loaded is not counting and vars(loaded) == {"factor": 0.9, "calls": 10}
    assert restored.lr_lambdas[1] is loaded  # still one object shared by both groups
    assert run_ticks(fresh, restored, 10) == expected


@pytest.mark.parametrize("make, message", [
    (lambda: lambda epoch: 1.0,
     "LambdaLR: lr_lambda for group 0 is a lambda and cannot be serialized; "
     "pass 'module:function' or a callable object"),
    (lambda: _local_function(),
     "LambdaLR: lr_lambda for group 0 is a local function (_local_function.<locals>.factor) and cannot be "
     "serialized; pass 'module:function' or a callable object"),
])
def test_lambdas_and_local_functions_cannot_be_serialized(make, message):
    optimizer = two_group_sgd()
    scheduler = lr_scheduler.LambdaLR(optimizer, make())
    run_ticks(optimizer, scheduler, 3)  # they work for training
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        scheduler.state_dict()


def _local_function():
    def factor(epoch):
        return 1.0

    return factor


def test_error_names_the_group_of_the_lambda():
    scheduler = lr_scheduler.MultiplicativeLR(two_group_sgd(), [every_third_decay, lambda epoch: 0.9])
    with pytest.raises(ValueError,
                       match=r"^MultiplicativeLR: lr_lambda for group 1 is a lambda and cannot be serialized"):
        scheduler.state_dict()


def test_cyclic_scale_fn_follows_the_same_rules():
    optimizer = two_group_sgd()
    scheduler = lr_scheduler.CyclicLR(optimizer, 0.01, 0.1, scale_fn=lambda x: 1.0)
    with pytest.raises(ValueError, match=r"^CyclicLR: scale_fn is a lambda and cannot be serialized; "
                                         r"pass 'module:function' or a callable object$"):
        scheduler.state_dict()
    scheduler = lr_scheduler.CyclicLR(two_group_sgd(), 0.01, 0.1, scale_fn=HalvingAmplitude(0.2))
    assert scheduler.state_dict()["scale_fn"] == {"class": f"{MODULE}:HalvingAmplitude", "attributes": {"floor": 0.2}}


class _Unplain:
    def __init__(self):
        self.table = np.ones(3)

    def __call__(self, epoch):
        return 1.0


def test_callable_object_with_non_plain_attributes_cannot_be_serialized():
    scheduler = lr_scheduler.LambdaLR(two_group_sgd(), _Unplain())
    with pytest.raises(ValueError, match=r"^LambdaLR: lr_lambda for group 0 is a callable _Unplain object whose "
                                         r"attribute 'table' holds a ndarray; only None, bool, int, float, str and "
                                         r"lists/dicts of them can be serialized$"):
        scheduler.state_dict()


@pytest.mark.parametrize("reference, error, message", [
    ("warmup_then_decay", ValueError,
     "lr_lambda must be a callable or a 'package.module:function' reference; got 'warmup_then_decay'"),
    ("math:nope", ValueError, "lr_lambda reference 'math:nope': module 'math' has no attribute 'nope'"),
    ("math:pi", TypeError, "lr_lambda reference 'math:pi' names a float, which is not callable"),
])
def test_bad_references_fail_at_construction(reference, error, message):
    with pytest.raises(error, match="^" + re.escape(message) + "$"):
        lr_scheduler.LambdaLR(two_group_sgd(), reference)


def test_unimportable_reference_fails_at_construction():
    with pytest.raises(ValueError,
                       match=r"^lr_lambda reference 'no_such_module_xyz:f': cannot import 'no_such_module_xyz'"):
        lr_scheduler.LambdaLR(two_group_sgd(), "no_such_module_xyz:f")


# ---------------------------------------------------------------------------------------
# argument validation: exact messages


def _other_optimizer_sequential():
    optimizer, other = two_group_sgd(), two_group_sgd()
    children = [lr_scheduler.LinearLR(optimizer), lr_scheduler.ExponentialLR(other, 0.9)]
    return lr_scheduler.SequentialLR(optimizer, children, [5])


def _plateau_in_chain():
    optimizer = two_group_sgd()
    children = [lr_scheduler.ExponentialLR(optimizer, 0.9), lr_scheduler.ReduceLROnPlateau(optimizer)]
    return lr_scheduler.ChainedScheduler(children)


def _composite_after_milestone():
    optimizer = two_group_sgd()
    inner = lr_scheduler.ChainedScheduler([lr_scheduler.ExponentialLR(optimizer, 0.9)])
    return lr_scheduler.SequentialLR(optimizer, [lr_scheduler.LinearLR(optimizer), inner], [5])


def _sequential(milestones, count=2):
    optimizer = two_group_sgd()
    children = [lr_scheduler.ExponentialLR(optimizer, 0.9) for _ in range(count)]
    return lr_scheduler.SequentialLR(optimizer, children, milestones)


S = lr_scheduler
BAD_ARGUMENTS = [
    ("not_an_optimizer", lambda: S.StepLR("sgd", 3), TypeError,
     "optimizer must be a shardstep.workers.optim Optimizer; got 'sgd' of type str"),
    ("last_epoch", lambda: S.StepLR(two_group_sgd(), 3, last_epoch=-2), ValueError,
     "last_epoch must be an integer >= -1; got -2"),
    ("step_size_zero", lambda: S.StepLR(two_group_sgd(), 0), ValueError, "step_size must be a positive integer; got 0"),
    ("step_size_float", lambda: S.StepLR(two_group_sgd(), 2.5), ValueError,
     "step_size must be a positive integer; got 2.5"),
    ("step_size_bool", lambda: S.StepLR(two_group_sgd(), True), ValueError,
     "step_size must be a positive integer; got True"),
    ("gamma_zero", lambda: S.StepLR(two_group_sgd(), 3, gamma=0), ValueError,
     "gamma must be a positive real number; got 0"),
    ("gamma_type", lambda: S.ExponentialLR(two_group_sgd(), "0.9"), TypeError,
     "gamma must be a real number; got '0.9' of type str"),
    ("gamma_nan", lambda: S.ExponentialLR(two_group_sgd(), math.nan), ValueError,
     "gamma must be a positive real number; got nan"),
    ("milestones_order", lambda: S.MultiStepLR(two_group_sgd(), [10, 5]), ValueError,
     "milestones must be non-decreasing; got [10, 5]"),
    ("milestones_negative", lambda: S.MultiStepLR(two_group_sgd(), [-1, 5]), ValueError,
     "milestones must be non-negative integers; got [-1, 5]"),
    ("milestones_type", lambda: S.MultiStepLR(two_group_sgd(), 5), TypeError,
     "milestones must be a list of integers; got 5"),
    ("constant_factor", lambda: S.ConstantLR(two_group_sgd(), factor=1.5), ValueError,
     "factor must be in (0, 1]; got 1.5"),
    ("constant_factor_zero", lambda: S.ConstantLR(two_group_sgd(), factor=0), ValueError,
     "factor must be in (0, 1]; got 0"),
    ("constant_total_iters", lambda: S.ConstantLR(two_group_sgd(), total_iters=0), ValueError,
     "total_iters must be a positive integer; got 0"),
    ("linear_start_factor", lambda: S.LinearLR(two_group_sgd(), start_factor=0), ValueError,
     "start_factor must be in (0, 1]; got 0"),
    ("linear_end_factor", lambda: S.LinearLR(two_group_sgd(), end_factor=1.5), ValueError,
     "end_factor must be in [0, 1]; got 1.5"),
    ("linear_total_iters", lambda: S.LinearLR(two_group_sgd(), total_iters=-3), ValueError,
     "total_iters must be a positive integer; got -3"),
    ("polynomial_power", lambda: S.PolynomialLR(two_group_sgd(), power=-1), ValueError,
     "power must be a non-negative real number; got -1"),
    ("polynomial_total_iters", lambda: S.PolynomialLR(two_group_sgd(), total_iters=0), ValueError,
     "total_iters must be a positive integer; got 0"),
    ("cosine_t_max", lambda: S.CosineAnnealingLR(two_group_sgd(), T_max=0), ValueError,
     "T_max must be a positive integer; got 0"),
    ("cosine_eta_min", lambda: S.CosineAnnealingLR(two_group_sgd(), 10, eta_min=-0.1), ValueError,
     "eta_min must be a non-negative real number; got -0.1"),
    ("warm_t_0", lambda: S.CosineAnnealingWarmRestarts(two_group_sgd(), T_0=0), ValueError,
     "T_0 must be a positive integer; got 0"),
    ("warm_t_0_float", lambda: S.CosineAnnealingWarmRestarts(two_group_sgd(), T_0=2.5), ValueError,
     "T_0 must be a positive integer; got 2.5"),
    ("warm_t_mult", lambda: S.CosineAnnealingWarmRestarts(two_group_sgd(), T_0=5, T_mult=0), ValueError,
     "T_mult must be a positive integer; got 0"),
    ("warm_eta_min_type", lambda: S.CosineAnnealingWarmRestarts(two_group_sgd(), T_0=5, eta_min="0"), TypeError,
     "eta_min must be a real number; got '0' of type str"),
    ("warm_negative_epoch", lambda: S.CosineAnnealingWarmRestarts(two_group_sgd(), T_0=5).step(-1), ValueError,
     "epoch must be >= 0; got -1"),
    ("plateau_factor", lambda: S.ReduceLROnPlateau(two_group_sgd(), factor=1.0), ValueError,
     "factor must be in [0, 1); got 1.0"),
    ("plateau_mode", lambda: S.ReduceLROnPlateau(two_group_sgd(), mode="avg"), ValueError,
     "mode must be one of 'min', 'max'; got 'avg'"),
    ("plateau_threshold_mode", lambda: S.ReduceLROnPlateau(two_group_sgd(), threshold_mode="pct"), ValueError,
     "threshold_mode must be one of 'rel', 'abs'; got 'pct'"),
    ("plateau_patience", lambda: S.ReduceLROnPlateau(two_group_sgd(), patience=-1), ValueError,
     "patience must be a non-negative integer; got -1"),
    ("plateau_cooldown", lambda: S.ReduceLROnPlateau(two_group_sgd(), cooldown=1.5), ValueError,
     "cooldown must be a non-negative integer; got 1.5"),
    ("plateau_min_lr_length", lambda: S.ReduceLROnPlateau(two_group_sgd(), min_lr=[0.1, 0.2, 0.3]), ValueError,
     "min_lr must be a number or a list of 2 numbers (one per param group); got a list of 3"),
    ("plateau_min_lr_negative", lambda: S.ReduceLROnPlateau(two_group_sgd(), min_lr=[0.1, -0.2]), ValueError,
     "min_lr[1] must be a non-negative real number; got -0.2"),
    ("plateau_eps", lambda: S.ReduceLROnPlateau(two_group_sgd(), eps=-1e-8), ValueError,
     "eps must be a non-negative real number; got -1e-08"),
    ("lambda_count", lambda: S.LambdaLR(two_group_sgd(), [every_third_decay] * 3), ValueError,
     "lr_lambda must be one function or a list of 2 (one per param group); got a list of 3"),
    ("lambda_type", lambda: S.MultiplicativeLR(two_group_sgd(), 3), TypeError,
     "lr_lambda must be a callable or a 'package.module:function' reference; got 3 of type int"),
    ("cyclic_mode", lambda: S.CyclicLR(two_group_sgd(), 0.01, 0.1, mode="sine"), ValueError,
     "mode must be one of 'triangular', 'triangular2', 'exp_range'; got 'sine'"),
    ("cyclic_scale_mode",
     lambda: S.CyclicLR(two_group_sgd(), 0.01, 0.1, scale_fn=decaying_amplitude, scale_mode="epoch"), ValueError,
     "scale_mode must be one of 'cycle', 'iterations'; got 'epoch'"),
    ("cyclic_step_size_up", lambda: S.CyclicLR(two_group_sgd(), 0.01, 0.1, step_size_up=0), ValueError,
     "step_size_up must be a positive real number; got 0"),
    ("cyclic_step_size_down", lambda: S.CyclicLR(two_group_sgd(), 0.01, 0.1, step_size_down=-4), ValueError,
     "step_size_down must be a positive real number; got -4"),
    ("cyclic_base_lr_length", lambda: S.CyclicLR(two_group_sgd(), [0.01], 0.1), ValueError,
     "base_lr must be a number or a list of 2 numbers (one per param group); got a list of 1"),
    ("cyclic_max_momentum_length", lambda: S.CyclicLR(two_group_sgd(), 0.01, 0.1, max_momentum=[0.9, 0.9, 0.9]),
     ValueError, "max_momentum must be a number or a list of 2 numbers (one per param group); got a list of 3"),
    ("cyclic_cycle_momentum_type", lambda: S.CyclicLR(two_group_sgd(), 0.01, 0.1, cycle_momentum="yes"), TypeError,
     "cycle_momentum must be a bool; got 'yes' of type str"),
    ("onecycle_total_steps", lambda: S.OneCycleLR(two_group_sgd(), 0.1, total_steps=0), ValueError,
     "total_steps must be a positive integer; got 0"),
    ("onecycle_total_steps_float", lambda: S.OneCycleLR(two_group_sgd(), 0.1, total_steps=10.0), ValueError,
     "total_steps must be a positive integer; got 10.0"),
    ("onecycle_no_length", lambda: S.OneCycleLR(two_group_sgd(), 0.1, epochs=10), ValueError,
     "OneCycleLR needs total_steps, or both epochs and steps_per_epoch; got total_steps=None, epochs=10, "
     "steps_per_epoch=None"),
    ("onecycle_epochs", lambda: S.OneCycleLR(two_group_sgd(), 0.1, epochs=0, steps_per_epoch=10), ValueError,
     "epochs must be a positive integer; got 0"),
    ("onecycle_steps_per_epoch", lambda: S.OneCycleLR(two_group_sgd(), 0.1, epochs=3, steps_per_epoch=2.5), ValueError,
     "steps_per_epoch must be a positive integer; got 2.5"),
    ("onecycle_pct_start", lambda: S.OneCycleLR(two_group_sgd(), 0.1, total_steps=10, pct_start=1.5), ValueError,
     "pct_start must be in [0, 1]; got 1.5"),
    ("onecycle_anneal_strategy", lambda: S.OneCycleLR(two_group_sgd(), 0.1, total_steps=10, anneal_strategy="exp"),
     ValueError, "anneal_strategy must be one of 'cos', 'linear'; got 'exp'"),
    ("onecycle_div_factor", lambda: S.OneCycleLR(two_group_sgd(), 0.1, total_steps=10, div_factor=0), ValueError,
     "div_factor must be a positive real number; got 0"),
    ("onecycle_max_lr", lambda: S.OneCycleLR(two_group_sgd(), [0.1, 0.0], total_steps=10), ValueError,
     "max_lr[1] must be a positive real number; got 0.0"),
    ("sequential_milestone_count", lambda: _sequential([5, 10]), ValueError,
     "milestones must have one entry fewer than schedulers (1); got 2 milestones for 2 schedulers"),
    ("sequential_milestone_order", lambda: _sequential([10, 10], count=3), ValueError,
     "milestones must be increasing; got [10, 10]"),
    ("sequential_empty", lambda: S.SequentialLR(two_group_sgd(), [], []), ValueError,
     "SequentialLR needs at least one scheduler; got none"),
    ("sequential_other_optimizer", _other_optimizer_sequential, ValueError,
     "SequentialLR: schedulers[1] (ExponentialLR) drives a different optimizer; all schedulers must drive the "
     "optimizer given to SequentialLR"),
    ("sequential_composite_after_milestone", _composite_after_milestone, ValueError,
     "SequentialLR: schedulers[1] is a ChainedScheduler, which cannot start at a milestone; only the first "
     "scheduler may be a composite"),
    ("chained_empty", lambda: S.ChainedScheduler([]), ValueError,
     "ChainedScheduler needs at least one scheduler; got none"),
    ("chained_plateau", _plateau_in_chain, ValueError,
     "ChainedScheduler: schedulers[1] is a ReduceLROnPlateau, which ChainedScheduler cannot step because its "
     "step() needs a metric"),
    ("chained_not_a_scheduler", lambda: S.ChainedScheduler(["StepLR"]), TypeError,
     "ChainedScheduler: schedulers[0] must be a shardstep.workers.optim.lr_scheduler scheduler; got 'StepLR' of type str"),
]


@pytest.mark.parametrize("build, error, message", [entry[1:] for entry in BAD_ARGUMENTS],
                         ids=[entry[0] for entry in BAD_ARGUMENTS])
def test_bad_arguments(build, error, message):
    with pytest.raises(error, match="^" + re.escape(message) + "$"):
        build()
