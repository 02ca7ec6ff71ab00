"""Where a run reports what it does, besides ``metrics.jsonl`` (which stays the source of
truth): TensorBoard event files, an MLflow run and Ray's metrics (the job's ``[logging]``).

A :class:`Reporter` hears the run's life in four calls, all from the coordinator's thread:
``start`` at every start of the actors (the first, each resume and each recovery, with the
step training continues from), ``step`` with every step's record, ``checkpoint`` when a
checkpoint is committed, and ``finish`` once at the end. Records are those of
``metrics.jsonl``: ``step``, ``epoch``, ``batch``, ``loss``, ``lr`` and ``lrs`` (one per param
group), ``seconds`` (the step's time), ``time`` (Unix seconds), ``grad_norm`` (the global L2
norm of the gradient before clipping, when known), ``eval`` (the metrics, when the step was
evaluated), ``skipped`` (a batch skipped for non-finite values: its loss is NaN).

After a resume or a recovery the steps past the checkpoint are trained again, with the same
numbers bit for bit; each reporter makes sure a step is shown once (TensorBoard purges the
old events past the restart, MLflow leaves out the steps it already has).

A reporter's failure in the middle of a run (a tracking server that stopped answering, a
full disk) must not cost the training: :class:`Reporters` warns once, names the reporter
and the error, and goes on without it. A reporter that cannot start at all (a tracking URI
that does not answer) fails the run before its first step instead, as a bad job key does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

# what a run's finish is called (MLflow's run statuses)
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


@dataclass(frozen=True)
class RunInfo:
    """What a reporter knows of the run when the actors start."""

    name: str                      # the run directory's name ("digits")
    run_id: str                    # the run directory's id (job.json), the same across resumes
    run_dir: str                   # where it is (a path or an object-storage URL)
    job: dict[str, Any]            # the job, every field (JobSpec.to_dict())
    start_step: int                # steps trained before this start (0: a fresh run)
    attempt: int = 0               # 0: the first start of this process; k: the k-th restart after a failure
    group_names: Sequence[str] = field(default_factory=tuple)  # a label per param group, in order


class Reporter:
    """A place the run reports to. Every method may be left as it is (does nothing)."""

    name = "reporter"

    def start(self, info: RunInfo) -> None:
        """The actors started; training continues after step ``info.start_step``."""

    def step(self, record: dict[str, Any]) -> None:
        """A step finished (its record, as in ``metrics.jsonl``)."""

    def checkpoint(self, step: int, seconds: float) -> None:
        """The checkpoint of ``step`` was committed, ``seconds`` after it began."""

    def finish(self, status: str) -> None:
        """The run ended: FINISHED, FAILED or KILLED (interrupted)."""


class Reporters:
    """Every reporter of a run, called in order; one that fails after the run started is
    dropped with one warning (``warn``) and the others go on."""

    def __init__(self, reporters: Sequence[Reporter], warn: Callable[[str], Any]):
        self.reporters = list(reporters)
        self.warn = warn
        self.started = False

    def _each(self, method: str, *args: Any) -> None:
        for reporter in list(self.reporters):
            try:
                getattr(reporter, method)(*args)
            except Exception as error:
                if method == "start" and not self.started:
                    raise  # cannot start at all: the run fails before its first step
                self.reporters.remove(reporter)
                lines = str(error).strip().splitlines()
                self.warn(f"warning: {reporter.name} stopped reporting ({type(error).__name__}: "
                          f"{lines[0] if lines else ''}); the run goes on, metrics.jsonl has every step")

    def start(self, info: RunInfo) -> None:
        self._each("start", info)
        self.started = True

    def step(self, record: dict[str, Any]) -> None:
        self._each("step", record)

    def checkpoint(self, step: int, seconds: float) -> None:
        self._each("checkpoint", step, seconds)

    def finish(self, status: str) -> None:
        self._each("finish", status)


def group_labels(groups: Sequence[Sequence[str]], rules: Sequence[Any]) -> list[str]:
    """A label per param group (each given by its parameter names, in the optimizer's order):
    the pattern of the param-group rule that formed it (``rules``: the job's, or the task's
    own), "other" for the parameters no rule matched, "all" when there is one group."""
    if len(groups) == 1:
        return ["all"]
    names: list[str] = []
    for index, members in enumerate(groups):
        rule = next((r for r in rules if members and all(r.matches(name) for name in members)), None)
        label = rule.pattern if rule is not None else "other"
        names.append(label if label not in names else f"{label} ({index})")
    return names


def scalars(record: dict[str, Any], group_names: Sequence[str]) -> dict[str, float]:
    """A record's numbers under the names every reporter uses: ``train/loss``,
    ``train/grad_norm``, ``train/step_seconds``, ``lr/<group>`` and ``eval/<metric>``. A
    skipped step has none (its loss is NaN by design, not a value to plot)."""
    if record.get("skipped"):
        return {}
    out: dict[str, float] = {}

    def put(name: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)

    put("train/loss", record.get("loss"))
    put("train/grad_norm", record.get("grad_norm"))
    put("train/step_seconds", record.get("seconds"))
    lrs = record.get("lrs") or [record.get("lr")]
    for index, lr in enumerate(lrs):
        label = group_names[index] if index < len(group_names) else f"group {index}"
        put(f"lr/{label}", lr)
    for metric, value in (record.get("eval") or {}).items():
        put(f"eval/{metric}", value)
    return out


# ---------------------------------------------------------------------------------------
# Ray's metrics: the run's numbers in the cluster's Prometheus endpoint


class RayMetrics(Reporter):
    """The run's numbers as Ray metrics (``ray.util.metrics``), tagged with the run's name
    and id, so they appear in every Ray node's Prometheus endpoint and the dashboard's
    Grafana panels as ``ray_shardstep_*``: ``steps`` (trained so far), ``loss``,
    ``step_seconds``, ``grad_norm``, ``learning_rate`` (tag ``group``), ``eval_metric``
    (tag ``metric``), ``checkpoint_step`` and ``checkpoint_seconds``, ``restarts``."""

    name = "Ray metrics"

    def __init__(self) -> None:
        self._gauges: dict[str, Any] = {}
        self._tags: dict[str, str] = {}
        self._groups: Sequence[str] = ()

    def _gauge(self, name: str, description: str, extra: tuple[str, ...] = ()) -> Any:
        gauge = self._gauges.get(name)
        if gauge is None:
            from ray.util.metrics import Gauge

            gauge = self._gauges[name] = Gauge(f"shardstep_{name}", description=description,
                                               tag_keys=("run", "run_id", *extra))
        return gauge

    def _set(self, name: str, description: str, value: float, **tags: str) -> None:
        self._gauge(name, description, tuple(tags)).set(value, tags={**self._tags, **tags})

    def start(self, info: RunInfo) -> None:
        self._tags = {"run": info.name, "run_id": info.run_id}
        self._groups = tuple(info.group_names)
        self._set("steps", "optimizer steps the run has trained", float(info.start_step))
        self._set("restarts", "restarts of the run's actors after a failure, in this process", float(info.attempt))

    def step(self, record: dict[str, Any]) -> None:
        if record.get("skipped"):
            return
        self._set("steps", "optimizer steps the run has trained", float(record["step"]))
        for name, value in scalars(record, self._groups).items():
            kind, _, rest = name.partition("/")
            if kind == "train":
                self._set(rest, f"the last step's {rest.replace('_', ' ')}", value)
            elif kind == "lr":
                self._set("learning_rate", "the learning rate of each param group", value, group=rest)
            else:
                self._set("eval_metric", "the latest evaluation's metrics", value, metric=rest)

    def checkpoint(self, step: int, seconds: float) -> None:
        self._set("checkpoint_step", "the step of the latest committed checkpoint", float(step))
        self._set("checkpoint_seconds", "seconds from the latest checkpoint's start to its commit", seconds)
