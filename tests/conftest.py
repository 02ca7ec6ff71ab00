"""Shared test settings."""

from __future__ import annotations

import os

import pytest


def require_torch():
    """torch, or a skip when it is not installed; SHARDSTEP_REQUIRE_TORCH=1 (CI's live parity
    run) turns the skip into a failure so the live comparison can never silently vanish."""
    if os.environ.get("SHARDSTEP_REQUIRE_TORCH") == "1":
        import torch  # noqa: F401  (an ImportError here fails the test)

        return torch
    return pytest.importorskip("torch", reason="torch not installed: live parity needs the parity extra")
