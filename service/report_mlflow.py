"""``[logging] mlflow``: the run as an MLflow run, through MLflow's client API
(``MlflowClient(tracking_uri)``: nothing is set in the process's global MLflow state, no
fluent active run).

One MLflow run per shardstep run, found again at every start by its tag ``shardstep.run_id``
(the run directory's id), so a resume (a new process) and a recovery (the same process) go
on in the same MLflow run, set back to RUNNING. ``finish`` ends it FINISHED, FAILED or KILLED.

Steps trained again after a restart (the same numbers, bit for bit) are not logged twice:
MLflow keeps every value sent for a step, so at each start the reporter reads the highest
step already logged for each metric (the run's latest metrics: one request, however long the
history) and leaves out the values at that step or earlier. A step logged by an earlier start
therefore keeps the value that start sent; the steps the earlier start never sent (it stopped
before they were flushed) come from the replay. Per metric, because a start can end between
two requests of one flush, and ``eval/*`` metrics have steps of their own.

Parameters: the job's keys, flattened with dots (``optimizer_args.lr``; lists and other
values as JSON), logged when the MLflow run is created; keys a later start brings are added.
MLflow refuses to change a parameter's value, so a start whose job differs (a resume with
more ``steps``) keeps the parameters as first logged, sets the tag ``shardstep.job.<key>`` to
the value each changed key has now (deleted again when a later start goes back to the
parameter's value), and stores the whole job of that start as the artifact
``job-<start_step>.json``; ``job.json`` is the job the run was created with. MLflow's limits
(``mlflow.utils.validation``: keys of 250 characters of letters, digits, ``_-. /``; values of
6000) are kept here, never left to MLflow's own truncation or refusal: a longer value is cut
and ends with a marker saying how long it was; a longer key is cut and ends with a hash of
the whole key; any other character becomes ``_`` (also in metric names: ``lr/*.bias`` is
``lr/_.bias``).

Metrics are buffered and sent with ``log_batch`` (which MLflow's client splits into requests
of at most 1000 values) every ``batch_steps`` steps or ``batch_seconds`` seconds, whichever comes first (checked at
each step), and at every checkpoint, every start and the finish: a remote tracking server gets
a request every few seconds, not one per step. Timestamps are the records' ``time``, in ms.

The tracking store is the caller's: MLflow 3.18 refuses its file store (``file:`` URIs, a
bare path) with an MlflowException unless ``MLFLOW_ALLOW_FILE_STORE=true`` is set, and its
sqlite store needs SQLAlchemy (the full ``mlflow`` package, not ``mlflow-skinny``); the
reporter neither sets nor hides either.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from typing import Any

from shardstep.service.reporting import Reporter, RunInfo, scalars

MISSING = "logging.mlflow needs MLflow: pip install 'shardstep[mlflow]'"

RUN_ID_TAG = "shardstep.run_id"
RUN_DIR_TAG = "shardstep.run_dir"
CHECKPOINT_TAG = "shardstep.latest_checkpoint"
CHANGED_TAG = "shardstep.job."  # + a parameter's key: the value the job has now, when it differs
# MLflow's limits (mlflow.utils.validation, 3.18: MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH,
# MAX_TAG_VAL_LENGTH); its own truncation is a logged warning, or an error when
# MLFLOW_TRUNCATE_LONG_VALUES=false, so values are kept within them here
KEY_CHARS = 250
PARAM_CHARS = 6000
TAG_CHARS = 8000
# what a key or a metric name may hold: MLflow's set without the colon, which MLflow refuses
# on Windows, so a run reads back the same names wherever it is opened
_NOT_ALLOWED = re.compile(r"[^/\w.\- ]")


def _mlflow_key(name: str) -> str:
    """``name`` as MLflow accepts a key: other characters become ``_``; a segment MLflow would
    read as a path step (empty, ``.``, ``..``) becomes underscores; too long, it is cut and
    ends with a hash of the whole name, so two long keys stay two."""
    segments = _NOT_ALLOWED.sub("_", name).split("/")
    key = "/".join("_" * max(1, len(s)) if s.strip(".") == "" else s for s in segments)
    if len(key) > KEY_CHARS:
        key = f"{key[:KEY_CHARS - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return key


def _bounded(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters: a longer one is cut and says so (the whole job is
    in the run's job artifacts)."""
    if len(text) <= limit:
        return text
    marker = f" [... cut: {len(text)} characters; the whole value is in job.json]"
    return text[:limit - len(marker)] + marker


def job_params(job: dict[str, Any]) -> dict[str, str]:
    """The job's keys, flattened with dots, as MLflow parameters (key and value within MLflow's
    limits): a table's keys go one level down, every other value is JSON (a string as it is)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
            return
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        name, key = prefix, _mlflow_key(prefix)
        while key in out:  # two keys MLflow would write the same ("a*" and "a?"): both kept
            name += "_"
            key = _mlflow_key(name)
        out[key] = _bounded(text, PARAM_CHARS)

    walk("", job)
    return out


def _job_text(job: dict[str, Any]) -> str:
    return json.dumps(job, indent=2, default=str)


class MLflow(Reporter):
    """The run as an MLflow run in ``experiment`` (created when missing) of the tracking
    server or store at ``tracking_uri``."""

    name = "MLflow"
    batch_steps = 100       # steps buffered before a request
    batch_seconds = 5.0     # seconds the oldest unsent value waits at most (checked at each step)

    def __init__(self, tracking_uri: str, experiment: str):
        try:
            from mlflow.entities import Metric, Param, RunTag, ViewType
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise ImportError(MISSING) from error
        self._Metric, self._Param, self._RunTag, self._ViewType = Metric, Param, RunTag, ViewType
        self._MlflowException = MlflowException
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        # made here, so a store MLflow cannot open (a file store it refuses, sqlite without
        # SQLAlchemy) fails the run before anything starts; a server is first asked in start()
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id: str | None = None
        self._groups: tuple[str, ...] = ()
        self._names: dict[str, str] = {}          # a scalar's name -> its MLflow metric name
        self._logged: dict[str, int] = {}         # MLflow metric name -> the highest step it has
        self._pending: list[Any] = []
        self._pending_steps = 0
        self._oldest = 0.0

    # -- the four calls

    def start(self, info: RunInfo) -> None:
        if self.run_id is not None:
            self._send()  # a recovery: what the previous start buffered goes first
        self._groups = tuple(info.group_names)
        client = self.client
        experiment_id = self._experiment_id()
        run = self._find(experiment_id, info.run_id)
        params = job_params(info.job)
        tags = [self._RunTag(RUN_DIR_TAG, _bounded(info.run_dir, TAG_CHARS))]
        if run is None:
            run = client.create_run(experiment_id, run_name=info.name,
                                    tags={RUN_ID_TAG: info.run_id, RUN_DIR_TAG: _bounded(info.run_dir, TAG_CHARS)})
            self.run_id = run.info.run_id
            self._log(params=[self._Param(k, v) for k, v in params.items()])
            client.log_text(self.run_id, _job_text(info.job), "job.json")
            self._logged = {}
            return
        self.run_id = run.info.run_id
        if run.info.status != "RUNNING":
            client.update_run(self.run_id, status="RUNNING")
        logged = run.data.params
        if not logged:  # created by a start that stopped before its params: this is its first job
            self._log(params=[self._Param(k, v) for k, v in params.items()], tags=tags)
            client.log_text(self.run_id, _job_text(info.job), "job.json")
        else:
            added = {k: v for k, v in params.items() if k not in logged}
            changed = {k: v for k, v in params.items() if k in logged and logged[k] != v}
            gone = [k for k in logged if k not in params]
            tags += [self._RunTag(_mlflow_key(CHANGED_TAG + k), _bounded(v, TAG_CHARS)) for k, v in changed.items()]
            self._log(params=[self._Param(k, v) for k, v in added.items()], tags=tags)
            for tag in run.data.tags:  # a key back at its parameter's value is no longer "changed"
                if tag.startswith(CHANGED_TAG) and tag not in {t.key for t in tags}:
                    client.delete_tag(self.run_id, tag)
            if added or changed or gone:
                client.log_text(self.run_id, _job_text(info.job), f"job-{info.start_step}.json")
        # the highest step of each metric: the run's latest metrics (MLflow keeps, per key,
        # the value of the highest step), read after this process's own values were sent
        self._logged = {metric.key: metric.step for metric in run.data.to_proto().metrics}

    def step(self, record: dict[str, Any]) -> None:
        self._require()
        stamp = record.get("time")
        stamp = stamp if isinstance(stamp, (int, float)) and math.isfinite(stamp) else time.time()
        added = self._add(scalars(record, self._groups), int(record["step"]), stamp)
        if not added:  # a skipped step, or one an earlier start logged
            return
        self._pending_steps += 1
        if self._pending_steps >= self.batch_steps or time.monotonic() - self._oldest >= self.batch_seconds:
            self._send()

    def checkpoint(self, step: int, seconds: float) -> None:
        self._require()
        self._add({"checkpoint/seconds": seconds}, int(step), time.time())
        self._send(tags=[self._RunTag(CHECKPOINT_TAG, str(step))])

    def finish(self, status: str) -> None:
        if self.run_id is None:  # never started: no MLflow run to end
            return
        self._send()
        self.client.set_terminated(self.run_id, status=status)

    # -- the pieces

    def _require(self) -> None:
        if self.run_id is None:
            raise RuntimeError(f"the MLflow reporter of {self.tracking_uri} is not started")

    def _experiment_id(self) -> str:
        client = self.client
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                return client.create_experiment(self.experiment)
            except self._MlflowException as error:
                if error.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                experiment = client.get_experiment_by_name(self.experiment)  # another run made it meanwhile
        if experiment.lifecycle_stage == "deleted":
            # restoring it would undo the user's deletion; logging to it is refused by MLflow
            raise RuntimeError(f"the MLflow experiment {self.experiment!r} is deleted: restore it "
                               f"(mlflow experiments restore) or name another (logging.mlflow_experiment)")
        return experiment.experiment_id

    def _find(self, experiment_id: str, run_id: str) -> Any:
        """The MLflow run tagged with this run's id (the oldest, should two exist), or None."""
        if not run_id:
            return None
        quote = "'" if "'" not in run_id else '"'
        found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = {quote}{run_id}{quote}",
                                        run_view_type=self._ViewType.ACTIVE_ONLY, max_results=1,
                                        order_by=["attributes.start_time ASC"])
        return found[0] if found else None

    def _metric_name(self, name: str) -> str:
        known = self._names.get(name)
        if known is None:
            known = candidate = _mlflow_key(name)
            taken = set(self._names.values())
            index = 2
            while known in taken:  # "lr/a*" and "lr/a?" would both be "lr/a_"
                known = f"{candidate}_{index}"
                index += 1
            self._names[name] = known
        return known

    def _add(self, values: dict[str, float], step: int, stamp: float) -> int:
        """Buffers the values not logged yet (their step past the metric's highest); how many."""
        added = 0
        for name, value in values.items():
            key = self._metric_name(name)
            if step <= self._logged.get(key, -1):
                continue  # an earlier start logged this step, with the same numbers
            if not self._pending:
                self._oldest = time.monotonic()
            self._pending.append(self._Metric(key, float(value), int(round(stamp * 1000)), step))
            self._logged[key] = step
            added += 1
        return added

    def _send(self, tags: list[Any] | None = None) -> None:
        pending, self._pending, self._pending_steps = self._pending, [], 0
        self._log(metrics=pending, tags=tags or [])

    def _log(self, metrics: list[Any] = (), params: list[Any] = (), tags: list[Any] = ()) -> None:
        """One ``log_batch`` (the client splits it into requests within MLflow's limits: 1000
        entities, 100 params, 100 tags). Synchronous: an error is raised here, where the run's
        reporters can drop this one, not in a background thread."""
        if metrics or params or tags:
            self.client.log_batch(self.run_id, metrics=list(metrics), params=list(params), tags=list(tags),
                                  synchronous=True)
