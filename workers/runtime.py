"""Process settings for code that runs inside actors."""

from __future__ import annotations


def limit_threads(threads: int) -> None:
    """Let numba's parallel kernels use at most ``threads`` threads in this process (an actor
    given one CPU must not spin a thread team over the cores its neighbours compute on)."""
    import numba

    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
