"""A run directory's files besides the checkpoints: their names, and how they are written.

    RUN_DIR/job.json        the run's id and the job that created it (written once)
    RUN_DIR/init.json       a fine-tuning run's record of where its parameters came from
    RUN_DIR/metrics.jsonl   one JSON record per step, appended; cut back on resume
    RUN_DIR/checkpoints/    the committed checkpoints (shardstep.checkpoints)

Every whole-file write goes to a temporary name first and is renamed into place, so a
reader never sees half a file.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

JOB_FILE = "job.json"
CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
INIT_FILE = "init.json"


def plain(value: Any) -> Any:
    """A numpy scalar as the Python number JSON writes."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def open_run_dir(run_dir: Path, job: Mapping[str, Any], init: Mapping[str, Any] | None) -> str:
    """Create the run directory (or find the one a previous run made) and return its run
    id; record where a fine-tuning run's parameters came from."""
    run_dir.mkdir(parents=True, exist_ok=True)
    job_path = run_dir / JOB_FILE
    if job_path.exists():
        run_id = json.loads(job_path.read_text())["run_id"]
    else:
        run_id = secrets.token_hex(8)
        _replace(job_path, json.dumps({"run_id": run_id, "job": dict(job)}, indent=1))
    if init is not None:
        _replace(run_dir / INIT_FILE, json.dumps(dict(init), indent=1))
    return run_id


def append_record(run_dir: Path, record: Mapping[str, Any]) -> None:
    with open(run_dir / METRICS_FILE, "a") as log:
        log.write(json.dumps(record, default=plain) + "\n")


def truncate_records(run_dir: Path, step: int) -> None:
    """Drop the records past ``step`` (a resumed run replays them)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    _replace(path, "".join(line + "\n" for line in kept))
