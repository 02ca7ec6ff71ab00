"""Shared test settings."""

from __future__ import annotations

import os

import pytest

# Ray reads this once, when it is first imported (ray._private.ray_constants): it must be set
# before any test module imports ray, or a Ray instance started in this process moves its node
# from 127.0.0.1 to the machine's external address
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def require_torch():
    """torch, or a skip when it is not installed; SHARDSTEP_REQUIRE_TORCH=1 (CI's live parity
    run) turns the skip into a failure so the live comparison can never silently vanish."""
    if os.environ.get("SHARDSTEP_REQUIRE_TORCH") == "1":
        import torch  # noqa: F401  (an ImportError here fails the test)

        return torch
    return pytest.importorskip("torch", reason="torch not installed: live parity needs the parity extra")


@pytest.fixture(scope="session")
def ray_address():
    """One local Ray instance for the whole test session, on loopback only, shut down at the
    end (which stops exactly the processes it started). Yields its GCS address, which a
    subprocess reaches with RAY_ADDRESS."""
    import ray
    context = ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
                       logging_level="ERROR", log_to_driver=False)
    try:
        addresses = {node["NodeManagerAddress"] for node in ray.nodes()}
        assert addresses == {"127.0.0.1"}, f"Ray left loopback: nodes at {addresses}"
        yield context.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def head():
    """A Ray head of its own on loopback (tests.ray_heads.running_head), one per test module
    that asks for it, stopped with every process it started after the module's last test."""
    from tests.ray_heads import running_head

    with running_head() as started:
        yield started


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's, on loopback, behind a relay the tests can cut)
    for the whole session, its endpoint and credentials in the environment as a user would
    set them; stopped at the end."""
    from tests.objectstore import S3Server, restore_environment, set_environment

    server = S3Server()
    previous = set_environment(server.environment())
    try:
        yield server
    finally:
        restore_environment(previous)
        server.stop()


@pytest.fixture(params=["local", "s3"])
def run_root(request, tmp_path):
    """A run directory: a local one, or a fresh prefix of the test server's bucket."""
    if request.param == "local":
        return tmp_path / "run"
    import uuid

    from shardstep.checkpoints.storage import ObjectPath
    from tests.objectstore import BUCKET

    request.getfixturevalue("s3_server")
    return ObjectPath(f"s3://{BUCKET}/runs/{uuid.uuid4().hex}")
