"""The optimizer matrix: every case of tests/parity/optim_cases.py x float32/float64.

- against the committed torch trajectories (always: no torch needed),
- against torch.optim run live in this process (when torch is installed),
- a state_dict taken mid-run and loaded into fresh objects continues bit-identically,
- state_dicts move torch -> shardstep and shardstep -> torch and training continues as in torch.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require_torch
from tests.parity.optim_cases import CASES, DTYPES
from tests.parity.runners import (
    OursRun,
    TorchRun,
    assert_trajectories_close,
    numpy_to_torch,
    torch_to_numpy,
)

FIXTURES = Path(__file__).parent / "fixtures" / "optim_trajectories.npz"
MATRIX = [pytest.param(case, dtype, id=f"{case.id}-{dtype}") for case in CASES for dtype in DTYPES]


@pytest.fixture(scope="module")
def fixtures():
    with np.load(FIXTURES, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def _sizes(run) -> list[int]:
    return [p.size for p in run.params]


@pytest.mark.parametrize("case,dtype", MATRIX)
def test_matches_committed_torch_trajectory(case, dtype, fixtures):
    key = f"{case.id}|{dtype}"
    assert key in fixtures, f"no fixture for {key}: run python -m tests.fixtures.make_optim_fixtures"
    run = OursRun(case, dtype)
    ours = run.trajectory()
    reference = fixtures[key]
    assert ours.dtype == reference.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(ours[0], reference[0])
    assert_trajectories_close(ours, reference, case, dtype, _sizes(run))


@pytest.mark.torch_live
@pytest.mark.parametrize("case,dtype", MATRIX)
def test_matches_live_torch(case, dtype):
    require_torch()
    run = OursRun(case, dtype)
    assert_trajectories_close(run.trajectory(), TorchRun(case, dtype).trajectory(), case, dtype, _sizes(run))


@pytest.mark.parametrize("case,dtype", MATRIX)
def test_resume_from_state_dict_is_bit_identical(case, dtype):
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
@pytest.mark.parametrize("case,dtype", MATRIX)
def test_torch_state_dict_loads_here(case, dtype):
    require_torch()
    reference = TorchRun(case, dtype)
    source = TorchRun(case, dtype)
    ours = OursRun(case, dtype)
    half = _continue_both(case, dtype, source, ours, torch_to_numpy)
    expected = np.stack(reference.advance(case.steps)[half - 1:])
    got = np.stack([ours.flat(), *ours.advance(case.steps - half)])
    assert_trajectories_close(got, expected, case, dtype, _sizes(ours))


@pytest.mark.torch_live
@pytest.mark.parametrize("case,dtype", MATRIX)
def test_state_dict_loads_into_torch(case, dtype):
    require_torch()
    ours = OursRun(case, dtype)
    target = TorchRun(case, dtype)
    half = _continue_both(case, dtype, ours, target, numpy_to_torch)
    reference = OursRun(case, dtype)
    expected = np.stack(reference.advance(case.steps)[half - 1:])
    got = np.stack([target.flat(), *target.advance(case.steps - half)])
    assert_trajectories_close(got, expected, case, dtype, _sizes(ours))
