"""What counts as a number, for every check of an argument, a hyperparameter or a job key.

Python's bool is an int (``True == 1``), so ``isinstance(True, numbers.Integral)`` holds; a
flag passed where a count or a rate belongs is a mistake, never a value. numpy's scalars are
registered with :mod:`numbers` (``np.int64`` is Integral, ``np.float32`` is Real) and count
as numbers; ``np.bool_`` is registered with neither. Each check module words its own
messages (a job file names keys, a layer names its arguments) on top of these predicates.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def is_integer(value: Any) -> bool:
    """An int or numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """An int, float or numpy number (NaN and infinities included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_flag(value: Any) -> bool:
    """A bool or numpy bool."""
    return isinstance(value, (bool, np.bool_))
