"""``[logging] mlflow``: the run as an MLflow run, through MLflow's client API (nothing is
set in the process's global MLflow state).

One MLflow run per shardstep run: it is found again by its tag ``shardstep.run_id``, so a
resume or a recovery goes on in the same MLflow run. MLflow keeps every value logged for a
step, so a step trained again after a restart (the same numbers, bit for bit) is left out:
at each start the reporter reads the highest step already logged and sends only later ones.
Parameters are the job's keys, flattened (``optimizer_args.lr``), logged once when the
MLflow run is created; MLflow refuses to change a parameter, so a resume that changes a key
(``training.steps``) records the job it continued with as the artifact
``job-<step>.json``. Metrics go in batches (``log_batch``) every ``BATCH_METRICS`` values or
``BATCH_SECONDS`` seconds, at every checkpoint and at the end, not one request per step.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from shardstep.service.reporting import Reporter, RunInfo, scalars

MISSING = "logging.mlflow needs MLflow: pip install 'shardstep[mlflow]'"
BATCH_METRICS = 500
BATCH_SECONDS = 5.0
# MLflow's limits (mlflow.utils.validation): at most 100 params per request, values of at
# most 6000 characters
PARAMS_PER_CALL = 100
PARAM_VALUE_CHARS = 6000
RUN_ID_TAG = "shardstep.run_id"
# what MLflow allows in a metric name; anything else (a pattern's "*": "lr/*.bias") becomes "_"
NOT_IN_NAMES = re.compile(r"[^\w\-. :/]")


def _flat(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict) and value:
        for key, inner in value.items():
            _flat(f"{prefix}.{key}" if prefix else str(key), inner, out)
        return
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    if len(text) > PARAM_VALUE_CHARS:  # the whole value is in the job.json artifact
        text = text[:PARAM_VALUE_CHARS - 24] + " ... (see job.json)"
    out[prefix] = text


class MLflow(Reporter):
    """An MLflow run in experiment ``experiment`` of the tracking server or store at
    ``tracking_uri``."""

    name = "MLflow"

    def __init__(self, tracking_uri: str, experiment: str):
        try:
            from mlflow.entities import Metric, RunStatus
            from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise ImportError(MISSING) from error
        self._metric, self._status = Metric, RunStatus
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_id: str | None = None
        self._logged_to = 0
        self._pending: list[Any] = []
        self._sent_at = time.monotonic()
        self._groups: tuple[str, ...] = ()

    def start(self, info: RunInfo) -> None:
        self._send()
        client = self.client
        self._groups = tuple(info.group_names)
        experiment = client.get_experiment_by_name(self.experiment)
        experiment_id = experiment.experiment_id if experiment is not None else client.create_experiment(self.experiment)
        found = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{info.run_id}'",
                                   max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
            history = client.get_metric_history(self.run_id, "train/loss")
            self._logged_to = max((metric.step for metric in history), default=0)
            client.log_text(self.run_id, json.dumps(info.job, indent=2, sort_keys=True, default=str),
                            f"job-{info.start_step}.json")
        else:
            run = client.create_run(experiment_id, run_name=info.name,
                                    tags={RUN_ID_TAG: info.run_id, "shardstep.run_dir": info.run_dir})
            self.run_id = run.info.run_id
            self._logged_to = 0
            params: dict[str, str] = {}
            _flat("", info.job, params)
            from mlflow.entities import Param

            items = [Param(key, value) for key, value in params.items()]
            for first in range(0, len(items), PARAMS_PER_CALL):
                client.log_batch(self.run_id, params=items[first:first + PARAMS_PER_CALL])
            client.log_text(self.run_id, json.dumps(info.job, indent=2, sort_keys=True, default=str), "job.json")

    def step(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if step <= self._logged_to:
            return  # already logged by the run that trained it first, with the same numbers
        stamp = int(1000 * record.get("time", time.time()))
        self._pending += [self._metric(NOT_IN_NAMES.sub("_", name), value, stamp, step)
                          for name, value in scalars(record, self._groups).items()]
        if len(self._pending) >= BATCH_METRICS or time.monotonic() - self._sent_at >= BATCH_SECONDS:
            self._send()

    def checkpoint(self, step: int, seconds: float) -> None:
        self._pending.append(self._metric("checkpoint/seconds", seconds, int(1000 * time.time()), step))
        self._send()
        self.client.set_tag(self.run_id, "shardstep.latest_checkpoint", str(step))

    def finish(self, status: str) -> None:
        self._send()
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status=status)

    def _send(self) -> None:
        pending, self._pending = self._pending, []
        self._sent_at = time.monotonic()
        # MLflow takes at most 1000 metrics per request
        for first in range(0, len(pending), 1000):
            self.client.log_batch(self.run_id, metrics=pending[first:first + 1000])
        if pending:
            self._logged_to = max(self._logged_to, max(metric.step for metric in pending if metric.key == "train/loss")
                                  if any(metric.key == "train/loss" for metric in pending) else 0)
