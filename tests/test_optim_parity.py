"""The optimizer matrix: every case of tests/parity/optim_cases.py x float32/float64
parameters x torch's default dtype float32/float64 (which decides the scalar state's dtype).

- against the committed torch trajectories (always: no torch needed),
- against torch.optim run live in this process (when torch is installed),
- a state_dict taken mid-run and loaded into fresh objects continues bit-identically,
- state_dicts move torch -> shardstep and shardstep -> torch and training continues as in torch.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from shardstep.workers.optim.registry import NAMES, rule
from tests.conftest import require_torch
from tests.parity.optim_cases import CASES, DEFAULT_DTYPES, DTYPES
from tests.parity.runners import (
    OursRun,
    TorchRun,
    assert_trajectories_close,
    default_dtype,
    fixture_path,
    numpy_to_torch,
    torch_to_numpy,
)


def _id(case, dtype, default) -> str:
    return f"{case.id}-{dtype}" + ("" if default == "float32" else f"-default_{default}")


MATRIX = [pytest.param(case, dtype, default, id=_id(case, dtype, default))
          for default in DEFAULT_DTYPES for case in CASES for dtype in DTYPES]


def test_every_optimizer_has_cases():
    """CASES is written by hand (tests/parity/optim_cases.py); every optimizer of the
    registry needs configurations there, or the whole matrix leaves it out."""
    covered = {case.optimizer for case in CASES}
    missing, unknown = [name for name in NAMES if name not in covered], sorted(covered - set(NAMES))
    assert not missing and not unknown, (
        f"tests/parity/optim_cases.py CASES: add configurations for {missing} (and regenerate the fixtures "
        f"with python -m tests.fixtures.make_optim_fixtures); {unknown} are not in shardstep.workers.optim.registry")


@pytest.fixture(scope="module")
def fixtures():
    trajectories = {}
    for default in DEFAULT_DTYPES:
        with np.load(fixture_path(default), allow_pickle=False) as data:
            trajectories.update({(default, key): data[key] for key in data.files})
    return trajectories


@pytest.fixture
def live_torch():
    """torch, imported before a test sets its default dtype."""
    return require_torch()


def _sizes(run) -> list[int]:
    return [p.size for p in run.params]


@pytest.mark.parametrize("case,dtype,default", MATRIX)
def test_matches_committed_torch_trajectory(case, dtype, default, fixtures):
    key = (default, f"{case.id}|{dtype}")
    assert key in fixtures, f"no fixture for {key}: run python -m tests.fixtures.make_optim_fixtures {default}"
    with default_dtype(default):
        run = OursRun(case, dtype)
        ours = run.trajectory()
    reference = fixtures[key]
    assert ours.dtype == reference.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(ours[0], reference[0])
    assert_trajectories_close(ours, reference, case, dtype, _sizes(run))


@pytest.mark.torch_live
@pytest.mark.parametrize("case,dtype,default", MATRIX)
def test_matches_live_torch(case, dtype, default, live_torch):
    with default_dtype(default):
        run = OursRun(case, dtype)
        ours, reference = run.trajectory(), TorchRun(case, dtype).trajectory()
    assert_trajectories_close(ours, reference, case, dtype, _sizes(run))


@pytest.mark.parametrize("case,dtype,default", MATRIX)
def test_resume_from_state_dict_is_bit_identical(case, dtype, default):
    with default_dtype(default):
        _resume_from_state_dict_is_bit_identical(case, dtype)


def _resume_from_state_dict_is_bit_identical(case, dtype):
    half = case.steps // 2
    uninterrupted = OursRun(case, dtype)
    expected = uninterrupted.advance(case.steps)[-1]

    first = OursRun(case, dtype)
    first.advance(half)
    saved = copy.deepcopy(first.optimizer.state_dict())
    saved_params = [p.data.copy() for p in first.params]
    del first

    resumed = OursRun(case, dtype)
    for p, data in zip(resumed.params, saved_params):
        p.data[...] = data
    resumed.optimizer.load_state_dict(saved)
    resumed.step_index = half
    got = resumed.advance(case.steps - half)[-1]
    np.testing.assert_array_equal(got, expected)


def _continue_both(case, dtype, source, target, convert):
    """Load ``source``'s mid-run state (params and optimizer) into fresh ``target`` objects."""
    half = case.steps // 2
    source.advance(half)
    for dst, src in zip(target.params, source.params):
        data = src.detach().numpy() if hasattr(src, "detach") else src.data
        if hasattr(dst, "detach"):
            dst.data.copy_(numpy_to_torch(np.array(data)))
        else:
            dst.data[...] = data
    target.optimizer.load_state_dict(convert(source.optimizer.state_dict()))
    target.step_index = half
    return half


@pytest.mark.torch_live
@pytest.mark.parametrize("case,dtype,default", MATRIX)
def test_torch_state_dict_loads_here(case, dtype, default, live_torch):
    with default_dtype(default):
        reference = TorchRun(case, dtype)
        source = TorchRun(case, dtype)
        ours = OursRun(case, dtype)
        half = _continue_both(case, dtype, source, ours, torch_to_numpy)
        expected = np.stack(reference.advance(case.steps)[half - 1:])
        got = np.stack([ours.flat(), *ours.advance(case.steps - half)])
    assert_trajectories_close(got, expected, case, dtype, _sizes(ours))


@pytest.mark.torch_live
@pytest.mark.parametrize("case,dtype,default", MATRIX)
def test_state_dict_loads_into_torch(case, dtype, default, live_torch):
    with default_dtype(default):
        ours = OursRun(case, dtype)
        target = TorchRun(case, dtype)
        half = _continue_both(case, dtype, ours, target, numpy_to_torch)
        reference = OursRun(case, dtype)
        expected = np.stack(reference.advance(case.steps)[half - 1:])
        got = np.stack([target.flat(), *target.advance(case.steps - half)])
    assert_trajectories_close(got, expected, case, dtype, _sizes(ours))


@pytest.mark.torch_live
@pytest.mark.parametrize("case,dtype,default", MATRIX)
def test_state_has_torchs_keys_and_dtypes(case, dtype, default, live_torch):
    """Step counters and scalar factors take torch's scalar dtype under either default."""
    with default_dtype(default):
        ours, theirs = OursRun(case, dtype), TorchRun(case, dtype)
        ours.advance(2)
        theirs.advance(2)
    ours_state = ours.optimizer.state_dict()["state"]
    torch_state = torch_to_numpy(theirs.optimizer.state_dict()["state"])
    assert ours_state.keys() == torch_state.keys()
    for index, entries in torch_state.items():
        assert ours_state[index].keys() == entries.keys(), index
        for name, value in entries.items():
            mine = ours_state[index][name]
            assert type(mine) is type(value), (index, name, type(mine), type(value))
            if isinstance(value, np.ndarray):
                assert (mine.dtype, mine.shape) == (value.dtype, value.shape), (index, name)


# the optimizers whose scalar state goes beyond the step counter (NAdam's mu_product, ASGD's eta and mu)
EXTRA_SCALAR_STATE = [name for name in NAMES if set(rule(name).scalar_state) - {"step"}]
SCALAR_CASES = [case for case in CASES if case.optimizer in EXTRA_SCALAR_STATE and case.second_group is None]


@pytest.mark.parametrize("case", SCALAR_CASES, ids=lambda case: case.id)
def test_loaded_scalar_state_keeps_its_dtype_under_another_default(case):
    """State saved under the float64 default and loaded under float32 keeps float64 scalars
    and continues exactly as the uninterrupted float64-default run (torch would cast them to
    the parameter's dtype; for float32 parameters that would change the numbers)."""
    dtype, half = "float32", case.steps // 2
    with default_dtype("float64"):
        expected = OursRun(case, dtype).advance(case.steps)[-1]
        first = OursRun(case, dtype)
        first.advance(half)
        saved = copy.deepcopy(first.optimizer.state_dict())
        params = [p.data.copy() for p in first.params]
    resumed = OursRun(case, dtype)   # under the float32 default
    for p, data in zip(resumed.params, params):
        p.data[...] = data
    resumed.optimizer.load_state_dict(saved)
    resumed.step_index = half
    scalars = {name: value.dtype for state in resumed.optimizer.state.values() for name, value in state.items()
               if isinstance(value, np.ndarray) and value.ndim == 0}
    assert scalars and set(scalars.values()) == {np.dtype(np.float64)}, scalars
    np.testing.assert_array_equal(resumed.advance(case.steps - half)[-1], expected)


def test_scalar_state_of_another_float_dtype_is_refused():
    case = SCALAR_CASES[0]
    run = OursRun(case, "float32")
    run.advance(1)
    state = run.optimizer.state_dict()
    entry = next(iter(state["state"].values()))
    scalar = next(name for name, value in entry.items() if isinstance(value, np.ndarray) and value.ndim == 0
                  and name != "step")
    entry[scalar] = entry[scalar].astype(np.float16)
    before = {p: copy.deepcopy(entries) for p, entries in run.optimizer.state.items()}
    with pytest.raises(ValueError, match=f"state '{scalar}' of parameter 0 is float16; scalar state is float32 "
                                         f"or float64"):
        run.optimizer.load_state_dict(state)
    assert run.optimizer.state.keys() == before.keys()
    for p, entries in before.items():
        for name, value in entries.items():
            np.testing.assert_array_equal(run.optimizer.state[p][name], value)
            assert run.optimizer.state[p][name].dtype == value.dtype


@pytest.mark.parametrize("value", ["float16", "int64", np.int32, "cuda", None, 64])
def test_set_default_dtype_takes_float32_or_float64(value):
    from shardstep.workers.optim import get_default_dtype, set_default_dtype

    with pytest.raises(TypeError, match=r"the default dtype must be one of float32, float64; got "):
        set_default_dtype(value)
    assert get_default_dtype() == np.float32


def test_set_default_dtype_accepts_numpy_and_torch_spellings():
    from shardstep.workers.optim import get_default_dtype, set_default_dtype
    from shardstep.workers.optim.rule import new_step

    class TorchStyle:  # what torch.float64 prints as, without importing torch
        def __str__(self):
            return "torch.float64"

    try:
        for spelling in ("float64", np.float64, np.dtype("float64"), TorchStyle()):
            set_default_dtype("float32")
            set_default_dtype(spelling)
            assert get_default_dtype() == np.float64 and new_step().dtype == np.float64, spelling
    finally:
        set_default_dtype("float32")
    assert new_step().dtype == np.float32
