"""``optimizer_groups`` computes an optimizer's param groups from its rule alone: the job
checks and the coordinator use it instead of building optimizers over stand-in parameters.
It must give exactly what the torch-style constructor gives (values, key order, defaults)
and refuse exactly what the constructor refuses, with the same exception and message."""

from __future__ import annotations

import numpy as np
import pytest

from shardstep.workers.optim import Parameter
from shardstep.workers.optim.builders import build_optimizer, build_scheduler, optimizer_groups
from shardstep.workers.optim.param_groups import ParamGroupRule
from shardstep.workers.optim.registry import NAMES, rule
from tests.parity.optim_error_cases import ERROR_CASES

DTYPES = {"embed.weight": np.float32, "0.weight": np.float32, "0.bias": np.float32, "2.bias": np.float32}
# the first option of each rule that takes a real number, set per group
BIAS_RULE = ParamGroupRule("*.bias", {"lr": 0.5})


def _built(name, kwargs, dtypes, rules):
    params = {n: Parameter(np.zeros(0, dtype), name=n) for n, dtype in dtypes.items()}
    return build_optimizer(name, kwargs, params, rules)


def _outcome(make):
    """What ``make()`` gives: ("ok", result) or ("raised", exception type, message)."""
    try:
        return ("ok", make())
    except Exception as error:  # the comparison is of whatever either path raises
        return ("raised", type(error), str(error))


def _groups_of(optimizer):
    """The constructor's groups as optimizer_groups spells them: names in "params", the
    hyperparameters in the constructor's key order."""
    return [{"params": list(group["param_names"]),
             **{k: v for k, v in group.items() if k not in ("params", "param_names")}}
            for group in optimizer.param_groups]


def _assert_same(name, kwargs, dtypes, rules):
    built = _outcome(lambda: _built(name, kwargs, dtypes, rules))
    computed = _outcome(lambda: optimizer_groups(name, kwargs, dtypes, rules))
    if built[0] == "raised" or computed[0] == "raised":
        assert computed == built, f"{name} {kwargs}: the constructor gave {built}, optimizer_groups {computed}"
        return built
    optimizer, groups = built[1], computed[1]
    assert groups.rule is type(optimizer).rule
    assert list(groups.defaults.items()) == list(optimizer.defaults.items())
    expected = _groups_of(optimizer)
    assert [list(g.items()) for g in groups.param_groups] == [list(g.items()) for g in expected]
    return built


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rules", [(), (BIAS_RULE,)], ids=["one-group", "bias-rule"])
def test_groups_match_the_constructors(name, rules):
    outcome = _assert_same(name, {}, DTYPES, rules)
    # every optimizer takes per-group options but LBFGS, which steps one concatenated vector
    assert (outcome[0] == "ok") == (name != "lbfgs" or not rules)


@pytest.mark.parametrize("name", NAMES)
def test_arguments_as_a_job_file_gives_them(name):
    """TOML has no tuples: pairs arrive as lists, every default given explicitly."""
    kwargs = {key: list(value) if isinstance(value, tuple) else value for key, value in rule(name).defaults.items()
              if key != "decoupled_weight_decay" or name != "adamw"}
    if name == "lbfgs":
        kwargs.pop("max_eval")
        kwargs["max_iter"] = 8   # torch's max_eval: 8 * 5 // 4 = 10
    assert _assert_same(name, kwargs, DTYPES, ())[0] == "ok"
    if name == "lbfgs":
        assert optimizer_groups(name, kwargs, DTYPES, ()).defaults["max_eval"] == 10


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda case: f"{case[0]}-{'-'.join(case[1])}")
def test_bad_hyperparameters_are_refused_alike(case):
    name, kwargs, exception, _ = case
    outcome = _assert_same(name, kwargs, DTYPES, ())
    assert outcome[:2] == ("raised", exception)
    # the same value set by a group's rule is refused alike
    if name != "lbfgs":
        _assert_same(name, {}, DTYPES, (ParamGroupRule("*.bias", dict(kwargs)),))


@pytest.mark.parametrize("kwargs, dtypes, rules", [
    ({"momentum": 0.9}, DTYPES, ()),                                        # not an LBFGS argument
    ({}, {}, ()),                                                           # no parameters
    ({}, {"a": np.float32, "b": np.float64}, ()),                            # mixed dtypes
    ({}, DTYPES, (ParamGroupRule("*.weight", {"history_size": 5}),)),       # a second group
    ({}, DTYPES, (ParamGroupRule("nothing.*", {"lr": 0.1}),)),             # a rule matching nothing
    ({}, DTYPES, (ParamGroupRule("*", {"line_search_fn": "armijo"}),)),      # one group, a bad option
], ids=["unknown-argument", "no-parameters", "mixed-dtypes", "second-group", "unmatched-rule", "bad-option"])
def test_lbfgs_refusals_are_the_constructors(kwargs, dtypes, rules):
    outcome = _assert_same("lbfgs", kwargs, dtypes, rules)
    assert outcome[0] == "raised"


def test_schedulers_are_built_on_computed_groups_as_on_an_optimizer():
    """A scheduler writes initial_lr and steps lr in the groups it is given, whichever they are."""
    groups = optimizer_groups("sgd", {"lr": 0.1}, DTYPES, (BIAS_RULE,))
    optimizer = _built("sgd", {"lr": 0.1}, DTYPES, (BIAS_RULE,))
    schedulers = [build_scheduler("StepLR", {"step_size": 2, "gamma": 0.5}, target) for target in (groups, optimizer)]
    for _ in range(5):
        for target, scheduler in zip((groups, optimizer), schedulers):
            target._step_count += 1
            scheduler.step()
    assert [g["lr"] for g in groups.param_groups] == [g["lr"] for g in optimizer.param_groups] == [0.025, 0.125]
    assert [g["initial_lr"] for g in groups.param_groups] == [0.1, 0.5]
