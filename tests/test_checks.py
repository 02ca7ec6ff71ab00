"""What counts as a number in every check: ints and floats and numpy's scalars, never a bool."""

from __future__ import annotations

import fractions
import math

import numpy as np
import pytest

from shardstep.workers.checks import is_flag, is_integer, is_real

# value, is_integer, is_real, is_flag
CASES = [
    (3, True, True, False),
    (-1, True, True, False),
    (np.int64(7), True, True, False),
    (np.uint8(7), True, True, False),
    (2.5, False, True, False),
    (math.nan, False, True, False),
    (math.inf, False, True, False),
    (np.float32(0.5), False, True, False),
    (fractions.Fraction(1, 3), False, True, False),
    (True, False, False, True),
    (False, False, False, True),
    (np.bool_(True), False, False, True),
    ("1", False, False, False),
    (None, False, False, False),
    (1 + 2j, False, False, False),
    (np.array(3), False, False, False),
    ([1], False, False, False),
]


@pytest.mark.parametrize("value, integer, real, flag", CASES, ids=[repr(case[0]) for case in CASES])
def test_what_counts_as_a_number(value, integer, real, flag):
    assert (is_integer(value), is_real(value), is_flag(value)) == (integer, real, flag)
