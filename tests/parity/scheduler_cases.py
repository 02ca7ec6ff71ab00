"""The learning-rate scheduler test database: the one list of scheduler configurations
(``CONFIGS``) and the code that runs one with either library, shardstep's
shardstep.workers.optim.lr_scheduler or torch's torch.optim.lr_scheduler.

tests/fixtures/make_scheduler_fixtures.py runs every configuration with torch and records
the trajectories in tests/fixtures/scheduler_trajectories.json; tests/test_lr_scheduler.py
replays them with our schedulers. The schedule functions the configurations name live here,
at module level, so that ``"module:function"`` references (``MODULE``) reach them.
"""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np

from shardstep.workers.optim import lr_scheduler
from shardstep.workers.optim.algorithms.adam import Adam
from shardstep.workers.optim.algorithms.sgd import SGD
from shardstep.workers.optim.parameter import Parameter

MODULE = __name__  # the importable name of this module, for "module:function" references


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
