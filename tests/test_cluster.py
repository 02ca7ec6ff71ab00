"""Runs on a simulated multi-node Ray cluster (tests/cluster: every node its own raylet on
127.0.0.1), each scenario in a process of its own (tests/cluster/scenarios.py): abrupt node
loss at the start, mid-run, during a checkpoint and at the last step; a cluster too small
for the actors; a node that joins after the start; placement by labels, custom resources
and a placement-group strategy. More trials: ``python -m tests.cluster.stress``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.runs import assert_same, digits_reference, final_params

ROOT = Path(__file__).resolve().parents[1]
SCENARIO_SECONDS = 420


def scenario(name: str, run_dir: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "tests.cluster.scenarios", name, "--run-dir", str(run_dir), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=SCENARIO_SECONDS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def reference() -> dict:
    """The scenarios' digits job (12 steps) in one process."""
    from tests.cluster.scenarios import STEPS

    return digits_reference(STEPS)


@pytest.mark.parametrize("when, victim", [("start", "shard"), ("5", "shard"), ("checkpoint", "worker"),
                                          ("last", "shard")])
def test_abrupt_node_loss_recovers_bit_identical_and_never_restarts_on_the_dead_node(tmp_path, when, victim):
    run_dir = tmp_path / "run"
    report = scenario("node-loss", run_dir, "--when", when, "--victim", victim)
    killed = set(report["killed"])
    assert len(killed) == 1
    assert killed <= set(report["lost_nodes"]), report
    for placed in report["starts"][1:] if when != "start" else report["starts"]:
        assert not killed & set(placed), f"a start placed actors on the lost node: {report}"
    if when == "start":
        # found lost by its raylet before anything was placed: nothing failed
        assert report["failures"] == 0 and "Recovering" not in report["states"], report
    else:
        assert report["failures"] == 1 and "Recovering" in report["states"], report
        assert any("recovering (failure 1 of at most 2; lost node(s)" in event for event in report["events"])
    assert report["result_steps"] == 12 and report["transport"] == "object_store"
    assert_same(final_params(run_dir), reference())


def test_a_cluster_too_small_says_what_it_waits_for_then_fails_and_sigterm_stops_it(tmp_path):
    report = scenario("too-small", tmp_path / "run")
    timed_out, stopped = report["timeout"], report["sigterm"]
    assert timed_out["code"] == 1, timed_out
    # two of the four fit: which two is Ray's choice
    waiting = r"waiting for resources: ((shard|gradient worker) \d(, )?){2} need 2 CPU; the cluster has 0 of 2 CPU free"
    assert re.search(rf"^shardstep: {waiting}$", timed_out["stdout"], re.MULTILINE), timed_out["stdout"]
    assert re.fullmatch(rf"shardstep run: the run failed: 2 of 4 actors did not start within resources.start_timeout "
                        rf"= 12 s: {waiting}\. The committed checkpoints in \S+ are untouched \(no checkpoint yet\); "
                        rf"give the cluster the resources, or change the job's, and run it again\n",
                        timed_out["stderr"]), timed_out["stderr"]
    assert "Traceback" not in timed_out["stderr"]
    assert stopped["code"] == 130, stopped
    assert stopped["stderr"].strip().endswith(
        f"interrupted; committed checkpoints are kept (continue with `shardstep resume {tmp_path / 'run'}-sigterm`)"), \
        stopped["stderr"]
    assert "Traceback" not in stopped["stderr"] and "SIGTERM" not in stopped["stderr"]
    for outcome in (timed_out, stopped):
        assert outcome["alive_actors"] == []
    shared = report["shared"]
    assert shared == {"code": 2, "created": False, "stderr": (
        "shardstep run: error: resources.transport = 'shared_memory' needs every actor on the coordinator's node, "
        "but the Ray cluster has 2 nodes, where actors may be placed anywhere; use 'auto' (shared memory when the "
        "cluster is one node) or 'object_store'\n")}, shared


def test_a_node_that_joins_later_never_breaks_the_run(tmp_path):
    run_dir = tmp_path / "run"
    report = scenario("late-node", run_dir)
    # first on the coordinator's node alone, through shared memory; restarted after the node
    # joined, now through the object store, wherever Ray placed the actors
    assert report["transports"] == ["shared_memory", "object_store"], report
    assert report["starts"][0] == [report["head"]] * 4
    assert report["failures"] == 1
    assert_same(final_params(run_dir), reference())


def test_labels_resources_and_strategies_place_the_actors(tmp_path):
    report = scenario("placement", tmp_path / "run")
    nodes = report["nodes"]
    (placed,) = report["labels"]["placed"]
    assert placed[:2] == [nodes["a"], nodes["a"]], report  # the shards: the node with big_memory
    assert set(placed[2:]) <= {nodes["b"], nodes["c"]}, report  # the workers: zone b
    (spread,) = report["strict_spread"]["placed"]
    assert len(spread) == len(set(spread)) == 3, report  # one shard, two workers: three nodes
