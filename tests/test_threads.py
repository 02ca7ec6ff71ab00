"""How kernel threads wait in a run's processes: the actors start with shardstep's thread
environment (OpenMP threads wait passively) or with the user's own wait settings, and the
``shardstep`` command gives its own process the same before anything computes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardstep.service.coordinator import Coordinator
from shardstep.service.jobspec import JobSpec
from shardstep.workers.runtime import THREAD_ENVIRONMENT, WAIT_SETTINGS, thread_environment

ROOT = Path(__file__).resolve().parents[1]


def _environment_of(pid: int) -> dict[str, str]:
    """The environment process ``pid`` was started with (/proc/<pid>/environ)."""
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode(errors="replace").partition("=")[::2] for entry in entries if entry)


def _wait_settings_of_actors(tmp_path, monkeypatch, **settings: str) -> list[dict[str, str]]:
    """The wait settings every actor of a short Ray run was started with, the driver's
    environment holding exactly ``settings``."""
    for name in WAIT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    spec = JobSpec(task="digits", task_args={}, optimizer="adam", optimizer_args={"lr": 1e-2}, param_groups=None,
                   schedulers=(), steps=2, epochs=None, batch_size=64, shards=2, workers=1, backend="ray",
                   run_dir=str(tmp_path / "run"))
    seen: list[dict[str, str]] = []

    def on_step(record: dict) -> None:
        if record["step"] == 1:
            for _, pid in coordinator.pids:
                environment = _environment_of(pid)
                seen.append({name: environment[name] for name in WAIT_SETTINGS if name in environment})

    coordinator = Coordinator(spec, on_step=on_step)
    assert coordinator.run().steps == 2
    return seen


def test_actors_start_with_shardstep_thread_environment(tmp_path, monkeypatch, ray_address):
    seen = _wait_settings_of_actors(tmp_path, monkeypatch)
    assert seen == [THREAD_ENVIRONMENT] * 3


def test_actors_start_with_the_wait_settings_the_user_gave(tmp_path, monkeypatch, ray_address):
    """A user's GOMP_SPINCOUNT is their choice: the actors get it, and no OMP_WAIT_POLICY of ours."""
    seen = _wait_settings_of_actors(tmp_path, monkeypatch, GOMP_SPINCOUNT="1234")
    assert seen == [{"GOMP_SPINCOUNT": "1234"}] * 3


@pytest.mark.parametrize("settings, expected", [
    ({}, THREAD_ENVIRONMENT),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),
    ({"GOMP_SPINCOUNT": "0"}, {"GOMP_SPINCOUNT": "0"}),
    ({"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "10"}, {"OMP_WAIT_POLICY": "active", "GOMP_SPINCOUNT": "10"}),
])
def test_thread_environment_keeps_any_wait_setting_of_the_users(monkeypatch, settings, expected):
    for name in WAIT_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    assert thread_environment() == expected


@pytest.mark.parametrize("given", [None, "ACTIVE"])
def test_the_shardstep_command_gives_its_process_the_thread_environment_first(given):
    """The command's entry point sets the variables before it parses anything (the inline
    backend then computes in that process); a value the user set stays."""
    environment = {k: v for k, v in os.environ.items() if k not in WAIT_SETTINGS}
    if given is not None:
        environment["OMP_WAIT_POLICY"] = given
    program = ("import os, sys\n"
               "from shardstep.service.cli import entry\n"
               "sys.argv = ['shardstep', '--version']\n"
               "try:\n    entry()\nexcept SystemExit:\n    pass\n"
               "print('OMP_WAIT_POLICY=' + os.environ.get('OMP_WAIT_POLICY', ''))\n")
    done = subprocess.run([sys.executable, "-c", program], env=environment, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == f"OMP_WAIT_POLICY={given or THREAD_ENVIRONMENT['OMP_WAIT_POLICY']}"
