"""shardstep.workers.optim.lr_scheduler against torch 2.13's torch.optim.lr_scheduler.

CONFIGS below is the one list of scheduler configurations; tests/fixtures/
make_scheduler_fixtures.py imports it to record torch's trajectories into
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
from shardstep.workers.optim.algorithms.adam import Adam
from shardstep.workers.optim.algorithms.sgd import SGD
from shardstep.workers.optim.optimizer import Optimizer
from shardstep.workers.optim.parameter import Parameter
from tests.conftest import require_torch

FIXTURE_PATH = Path(__file__).parent / "fixtures" / "scheduler_trajectories.json"
MODULE = __name__  # the importable name of this module, for "module:function" references

# our schedulers must not warn in normal use (step(epoch) warns by design; the runner hides it)
pytestmark = pytest.mark.filterwarnings("error::UserWarning")


# ---------------------------------------------------------------------------------------
# schedule functions used by the configurations (module level, so they can be referenced)


def warmup_then_decay(epoch):
    return (epoch + 1) / 10 if epoch < 9 else 0.97 ** (epoch - 9)


def step_quarter(epoch):
    return 0.5 ** (epoch // 25)


def every_third_decay(epoch):
    return 0.95 if epoch % 3 == 0 else 1.0


def decaying_amplitude(x):
    return 1 / (1.0 + 0.02 * x)


class WarmupPower:
    """lr factor: linear warmup over ``warmup`` epochs times ``rate ** epoch``."""

    def __init__(self, warmup, rate):
        self.warmup = warmup
        self.rate = rate

    def __call__(self, epoch):
        return min(1.0, (epoch + 1) / self.warmup) * self.rate**epoch


class CountingFactor:
    """A stateful factor: its output depends on how often it was called, so a restore that
    loses its state would change the trajectory."""

    def __init__(self, factor):
        self.factor = factor
        self.calls = 0

    def __call__(self, epoch):
        self.calls += 1
        return self.factor ** (1 + self.calls % 2)


class HalvingAmplitude:
    def __init__(self, floor):
        self.floor = floor

    def __call__(self, x):
        return max(self.floor, 0.5 ** (x - 1))


# ---------------------------------------------------------------------------------------
# configurations: plain data, shared with the fixture generator

OPTIMIZERS = {
    "sgd": {"class": "SGD", "defaults": {"lr": 0.1, "momentum": 0.9}, "groups": [{"lr": 0.1}, {"lr": 0.025}]},
    "adam": {"class": "Adam", "defaults": {"lr": 0.01, "betas": [0.9, 0.999]},
             "groups": [{"lr": 0.01}, {"lr": 0.0025}]},
    # a schedule resumed with last_epoch=10: the groups carry the initial_lr of its first run
    "sgd_resumed": {
        "class": "SGD",
        "defaults": {"lr": 0.1, "momentum": 0.9},
        "groups": [{"lr": 0.07, "initial_lr": 0.1}, {"lr": 0.02, "initial_lr": 0.025}],
    },
}


def sched(name, **kwargs):
    return {"name": name, "kwargs": kwargs}


def sequential(schedulers, milestones):
    return {"name": "SequentialLR", "schedulers": schedulers, "milestones": milestones}


def chained(schedulers, pass_optimizer=False):
    return {"name": "ChainedScheduler", "schedulers": schedulers, "pass_optimizer": pass_optimizer}


def function(name, as_="reference"):
    """A module-level function; ``as_`` says how our scheduler receives it ("reference": as
    the string "module:name", "function": as the function object). torch gets the function."""
    return {"$function": name, "as": as_}


def instance(class_name, **kwargs):
    return {"$object": class_name, "kwargs": kwargs}


def jumps(ticks, epochs_at):
    """Per-tick step() arguments: an explicit epoch at the given ticks, None elsewhere."""
    return [epochs_at.get(tick) for tick in range(1, ticks + 1)]


def noise(t, scale):
    return ((t * 37) % 11 - 5) * scale


def case(case_id, scheduler, *, optimizer="sgd", ticks=120, metrics=None, epochs=None):
    return {"id": case_id, "optimizer": OPTIMIZERS[optimizer], "scheduler": scheduler, "ticks": ticks,
            "metrics": metrics, "epochs": epochs}


def _plateau_metrics():
    falling_then_flat = [
        (1.0 / (1 + 0.1 * t) if t < 30 else 0.25 + noise(t, 1e-3)) if t != 70 else 0.1
        for t in range(120)
    ]
    rising_accuracy = [0.5 + 0.4 * (1 - math.exp(-t / 20)) + noise(t, 0.01) for t in range(120)]
    with_nan_and_inf = [1.0 - 0.004 * t + noise(t, 2e-3) for t in range(120)]
    with_nan_and_inf[17] = math.nan
    with_nan_and_inf[18] = math.inf
    with_nan_and_inf[55] = math.nan
    flat_for_ever = [0.5 + noise(t, 1e-6) for t in range(120)]
    return falling_then_flat, rising_accuracy, with_nan_and_inf, flat_for_ever


def _build_configs():
    falling_then_flat, rising_accuracy, with_nan_and_inf, flat_for_ever = _plateau_metrics()
    fractional = [(t // 5) + (t % 5) / 5 for t in range(1, 121)]
    return [
        # -- LambdaLR / MultiplicativeLR
        case("lambda_reference_shared", sched("LambdaLR", lr_lambda=function("warmup_then_decay"))),
        case("lambda_per_group_function_and_object", sched(
            "LambdaLR",
            lr_lambda=[function("step_quarter", "function"), instance("WarmupPower", warmup=8, rate=0.98)])),
        case("lambda_epoch_jumps", sched("LambdaLR", lr_lambda=function("warmup_then_decay")),
             epochs=jumps(120, {20: 40, 21: 5, 60: 100})),
        case("multiplicative_reference", sched("MultiplicativeLR", lr_lambda=function("every_third_decay"))),
        case("multiplicative_stateful_object",
             sched("MultiplicativeLR", lr_lambda=instance("CountingFactor", factor=0.99))),
        case("multiplicative_per_group", sched("MultiplicativeLR", lr_lambda=[
            function("every_third_decay", "function"), instance("WarmupPower", warmup=1, rate=0.999)])),
        case("multiplicative_resumed",
             sched("MultiplicativeLR", lr_lambda=function("every_third_decay"), last_epoch=10),
             optimizer="sgd_resumed"),
        # -- StepLR / MultiStepLR
        case("step_7_half", sched("StepLR", step_size=7, gamma=0.5)),
        case("step_30_default_gamma", sched("StepLR", step_size=30)),
        case("step_closed_form", sched("StepLR", step_size=10, gamma=0.7),
             epochs=jumps(120, {15: 33, 16: 34, 50: 12, 90: 95})),
        case("step_resumed", sched("StepLR", step_size=10, gamma=0.5, last_epoch=10), optimizer="sgd_resumed"),
        case("multistep_duplicates", sched("MultiStepLR", milestones=[10, 25, 25, 60], gamma=0.5)),
        case("multistep_closed_form", sched("MultiStepLR", milestones=[30, 80]),
             epochs=jumps(120, {10: 31, 11: 32, 40: 85, 41: 2})),
        # -- ConstantLR / LinearLR
        case("constant_default", sched("ConstantLR")),
        case("constant_half_40", sched("ConstantLR", factor=0.5, total_iters=40)),
        case("constant_resumed", sched("ConstantLR", factor=0.5, total_iters=12, last_epoch=10),
             optimizer="sgd_resumed"),
        case("constant_closed_form", sched("ConstantLR", factor=0.25, total_iters=30),
             epochs=jumps(120, {10: 29, 11: 45, 60: 3})),
        case("linear_default", sched("LinearLR")),
        case("linear_warmup_20", sched("LinearLR", start_factor=0.25, total_iters=20)),
        case("linear_decay_100", sched("LinearLR", start_factor=1.0, end_factor=0.05, total_iters=100)),
        case("linear_resumed", sched("LinearLR", start_factor=0.5, total_iters=30, last_epoch=10),
             optimizer="sgd_resumed"),
        case("linear_closed_form", sched("LinearLR", start_factor=0.1, end_factor=0.9, total_iters=50),
             epochs=jumps(120, {10: 20, 30: 70, 31: 7})),
        # -- ExponentialLR / PolynomialLR
        case("exponential_097", sched("ExponentialLR", gamma=0.97)),
        case("exponential_growth", sched("ExponentialLR", gamma=1.02), ticks=100),
        case("exponential_closed_form", sched("ExponentialLR", gamma=0.95), epochs=jumps(120, {5: 50, 6: 51, 70: 10})),
        case("exponential_resumed", sched("ExponentialLR", gamma=0.9, last_epoch=10), optimizer="sgd_resumed"),
        case("polynomial_square_80", sched("PolynomialLR", total_iters=80, power=2.0)),
        case("polynomial_default", sched("PolynomialLR")),
        case("polynomial_resumed", sched("PolynomialLR", total_iters=50, power=3.0, last_epoch=10),
             optimizer="sgd_resumed"),
        case("polynomial_sqrt_closed_form", sched("PolynomialLR", total_iters=100, power=0.5),
             epochs=jumps(120, {20: 60, 21: 61, 80: 30, 100: 150})),
        # -- CosineAnnealingLR / CosineAnnealingWarmRestarts
        case("cosine_past_t_max", sched("CosineAnnealingLR", T_max=30, eta_min=1e-3)),
        case("cosine_100", sched("CosineAnnealingLR", T_max=100)),
        case("cosine_closed_form", sched("CosineAnnealingLR", T_max=40, eta_min=5e-4),
             epochs=jumps(120, {10: 20, 11: 39, 50: 80, 51: 81})),
        case("cosine_resumed", sched("CosineAnnealingLR", T_max=50, eta_min=1e-4, last_epoch=10),
             optimizer="sgd_resumed"),
        case("warm_restarts_t_mult_2", sched("CosineAnnealingWarmRestarts", T_0=10, T_mult=2, eta_min=1e-4)),
        case("warm_restarts_t_0_7", sched("CosineAnnealingWarmRestarts", T_0=7)),
        case("warm_restarts_fractional_epochs", sched("CosineAnnealingWarmRestarts", T_0=3, T_mult=2, eta_min=1e-5),
             epochs=fractional),
        case("warm_restarts_integer_jumps", sched("CosineAnnealingWarmRestarts", T_0=12, eta_min=2e-3),
             epochs=jumps(120, {10: 30, 11: 31, 70: 5})),
        case("warm_restarts_resumed", sched("CosineAnnealingWarmRestarts", T_0=9, T_mult=2, last_epoch=10),
             optimizer="sgd_resumed"),
        # -- ReduceLROnPlateau
        case("plateau_min_rel_cooldown_min_lr", sched(
            "ReduceLROnPlateau", factor=0.5, patience=3, cooldown=2, threshold=1e-2, min_lr=1e-3),
            metrics=falling_then_flat),
        case("plateau_max_abs_patience_0_min_lr_list", sched(
            "ReduceLROnPlateau", mode="max", factor=0.3, patience=0, threshold=0.05, threshold_mode="abs",
            min_lr=[0.002, 0.0005]), metrics=rising_accuracy),
        case("plateau_min_abs_eps_nan_inf", sched(
            "ReduceLROnPlateau", factor=0.9, patience=5, cooldown=4, threshold=0.01, threshold_mode="abs", eps=1e-3),
            metrics=with_nan_and_inf),
        case("plateau_max_rel", sched("ReduceLROnPlateau", mode="max", threshold=0.01, patience=4, factor=0.7),
             metrics=rising_accuracy),
        case("plateau_defaults_adam", sched("ReduceLROnPlateau"), optimizer="adam", metrics=flat_for_ever),
        # -- CyclicLR
        case("cyclic_triangular", sched("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=10)),
        case("cyclic_triangular2_lists", sched(
            "CyclicLR", base_lr=[0.01, 0.002], max_lr=[0.1, 0.02], step_size_up=8, step_size_down=4,
            mode="triangular2", base_momentum=[0.8, 0.85], max_momentum=[0.9, 0.95])),
        case("cyclic_exp_range",
             sched("CyclicLR", base_lr=0.001, max_lr=0.05, step_size_up=12, mode="exp_range", gamma=0.99)),
        case("cyclic_scale_fn_reference_iterations", sched(
            "CyclicLR", base_lr=0.01, max_lr=0.08, step_size_up=9, scale_fn=function("decaying_amplitude"),
            scale_mode="iterations")),
        case("cyclic_scale_fn_object_cycle", sched(
            "CyclicLR", base_lr=0.005, max_lr=0.05, step_size_up=6, step_size_down=10,
            scale_fn=instance("HalvingAmplitude", floor=0.1))),
        case("cyclic_adam_betas", sched(
            "CyclicLR", base_lr=0.001, max_lr=0.01, step_size_up=10, mode="triangular2", base_momentum=0.85,
            max_momentum=0.95), optimizer="adam"),
        case("cyclic_no_momentum", sched("CyclicLR", base_lr=0.02, max_lr=0.2, step_size_up=15, cycle_momentum=False)),
        case("cyclic_resumed", sched("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=8, mode="triangular2",
                                     last_epoch=10), optimizer="sgd_resumed"),
        case("cyclic_epoch_jumps", sched("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=7),
             epochs=jumps(120, {30: 3, 31: 60})),
        # -- OneCycleLR
        case("onecycle_cos", sched("OneCycleLR", max_lr=0.1, total_steps=120)),
        case("onecycle_three_phase_linear", sched(
            "OneCycleLR", max_lr=[0.1, 0.05], epochs=10, steps_per_epoch=12, pct_start=0.25,
            anneal_strategy="linear", three_phase=True)),
        case("onecycle_three_phase_cos_momentum_lists", sched(
            "OneCycleLR", max_lr=0.2, total_steps=130, three_phase=True, base_momentum=[0.8, 0.85],
            max_momentum=[0.9, 0.97])),
        case("onecycle_adam_betas", sched(
            "OneCycleLR", max_lr=0.01, total_steps=120, pct_start=0.4, div_factor=10.0, final_div_factor=100.0),
            optimizer="adam"),
        case("onecycle_no_momentum", sched("OneCycleLR", max_lr=0.3, total_steps=150, cycle_momentum=False)),
        # -- SequentialLR / ChainedScheduler
        case("sequential_warmup_cosine", sequential(
            [sched("LinearLR", start_factor=0.1, total_iters=10), sched("CosineAnnealingLR", T_max=110)], [10])),
        case("sequential_three", sequential(
            [sched("ConstantLR", factor=0.5, total_iters=10), sched("ExponentialLR", gamma=0.97),
             sched("StepLR", step_size=15, gamma=0.5)], [20, 60])),
        case("sequential_cyclic_then_step", sequential(
            [sched("CyclicLR", base_lr=0.01, max_lr=0.1, step_size_up=10), sched("StepLR", step_size=10, gamma=0.5)],
            [40])),
        case("sequential_linear_then_onecycle", sequential(
            [sched("LinearLR", start_factor=0.5, total_iters=20), sched("OneCycleLR", max_lr=0.1, total_steps=100)],
            [20])),
        case("sequential_chained_first", sequential(
            [chained([sched("ConstantLR", factor=0.5, total_iters=5), sched("ExponentialLR", gamma=0.98)]),
             sched("PolynomialLR", total_iters=60, power=1.5)], [50])),
        case("chained_constant_exponential", chained(
            [sched("ConstantLR", factor=0.1, total_iters=2), sched("ExponentialLR", gamma=0.9)]), ticks=100),
        case("chained_warm_restarts_multistep", chained(
            [sched("CosineAnnealingWarmRestarts", T_0=15), sched("MultiStepLR", milestones=[40, 80], gamma=0.5)])),
        case("chained_cyclic_adam_exponential", chained(
            [sched("CyclicLR", base_lr=0.001, max_lr=0.01, step_size_up=10),
             sched("ExponentialLR", gamma=0.995)], pass_optimizer=True), optimizer="adam"),
        case("chained_with_sequential_and_lambda", chained(
            [sequential([sched("LinearLR", start_factor=0.2, total_iters=10), sched("CosineAnnealingLR", T_max=50)],
                        [10]),
             sched("MultiplicativeLR", lr_lambda=function("every_third_decay"))])),
    ]


CONFIGS = _build_configs()
CONFIG_IDS = [config["id"] for config in CONFIGS]
assert len(set(CONFIG_IDS)) == len(CONFIG_IDS)
assert all(config["ticks"] >= 100 for config in CONFIGS)


def canonical(config) -> str:
    """The configuration as canonical JSON, stored in the fixture to detect stale fixtures."""
    return json.dumps(config, sort_keys=True)


# ---------------------------------------------------------------------------------------
# running a configuration with either library


class OursAPI:
    name = "ours"
    schedulers = lr_scheduler

    def __init__(self, gradients=False):
        # without gradients optimizer.step() only counts steps, which is all a schedule sees;
        # with them the parameters really move (a few tests check they end bit-identical)
        self.gradients = gradients

    def optimizer(self, spec):
        params = [Parameter(np.linspace(-1.0, 1.0, 3)), Parameter(np.linspace(0.5, 2.0, 4).reshape(2, 2))]
        if self.gradients:
            for p in params:
                p.grad = np.full(p.shape, 0.25)
        groups = [{"params": [p], **group} for p, group in zip(params, spec["groups"])]
        cls = {"SGD": SGD, "Adam": Adam}[spec["class"]]
        return cls(groups, **_defaults(spec)), params

    def function(self, name, as_):
        return f"{MODULE}:{name}" if as_ == "reference" else globals()[name]


class TorchAPI:
    name = "torch"

    def __init__(self, torch):
        self.torch = torch
        self.schedulers = torch.optim.lr_scheduler

    def optimizer(self, spec):
        torch = self.torch
        params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)),
                  torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))]
        groups = [{"params": [p], **group} for p, group in zip(params, spec["groups"])]
        return getattr(torch.optim, spec["class"])(groups, **_defaults(spec)), params

    def function(self, name, as_):
        return globals()[name]


def _defaults(spec):
    defaults = dict(spec["defaults"])
    if "betas" in defaults:
        defaults["betas"] = tuple(defaults["betas"])
    return defaults


def materialize(value, api):
    if isinstance(value, dict) and "$function" in value:
        return api.function(value["$function"], value["as"])
    if isinstance(value, dict) and "$object" in value:
        return globals()[value["$object"]](**value["kwargs"])
    if isinstance(value, list):
        return [materialize(item, api) for item in value]
    return value


def build_scheduler(spec, optimizer, api):
    cls = getattr(api.schedulers, spec["name"])
    if spec["name"] == "SequentialLR":
        children = [build_scheduler(child, optimizer, api) for child in spec["schedulers"]]
        with warnings.catch_warnings():
            # a ChainedScheduler as first child steps its children again during construction,
            # before any optimizer.step(): torch warns about the step order there, and so do we
            warnings.filterwarnings("ignore", message=re.escape(lr_scheduler.STEP_ORDER_WARNING))
            return cls(optimizer, children, spec["milestones"])
    if spec["name"] == "ChainedScheduler":
        children = [build_scheduler(child, optimizer, api) for child in spec["schedulers"]]
        return cls(children, optimizer) if spec["pass_optimizer"] else cls(children)
    return cls(optimizer, **{key: materialize(value, api) for key, value in spec["kwargs"].items()})


def step_scheduler(scheduler, config, tick):
    if config["metrics"] is not None:
        scheduler.step(config["metrics"][tick - 1])
        return
    epoch = config["epochs"][tick - 1] if config["epochs"] is not None else None
    if epoch is None:
        scheduler.step()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the deprecation warning of step(epoch)
            scheduler.step(epoch)


def momenta(optimizer):
    return [group["betas"][0] if "betas" in group else group["momentum"] for group in optimizer.param_groups]


def trajectory_of(api, config):
    """Per tick (0 = after construction): get_last_lr() and each group's momentum / betas[0]."""
    optimizer, _ = api.optimizer(config["optimizer"])
    scheduler = build_scheduler(config["scheduler"], optimizer, api)
    lrs, moms = [list(scheduler.get_last_lr())], [momenta(optimizer)]
    for tick in range(1, config["ticks"] + 1):
        optimizer.step()
        step_scheduler(scheduler, config, tick)
        lrs.append(list(scheduler.get_last_lr()))
        moms.append(momenta(optimizer))
    return {"lr": lrs, "momentum": moms}


def torch_trajectory(torch, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trajectory_of(TorchAPI(torch), config)


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


def test_step_before_optimizer_step_warns():
    optimizer = two_group_sgd()
    scheduler = lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    with pytest.warns(UserWarning, match=re.escape(lr_scheduler.STEP_ORDER_WARNING)):
        scheduler.step()
    # and not when the optimizer stepped first, and not after the first step
    optimizer = two_group_sgd()
    scheduler = lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    optimizer.step()
    scheduler.step()
    scheduler.step()


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


def test_product_code_does_not_import_torch():
    code = "import sys, shardstep.workers.optim.lr_scheduler; sys.exit(sys.modules.get('torch') is not None)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


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
