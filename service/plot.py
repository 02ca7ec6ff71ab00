"""``shardstep plot RUN_DIR``: how a run went, as one PNG (matplotlib, the ``plot`` extra), from
the run directory's ``metrics.jsonl``, its ``job.json`` and its committed checkpoints.

Panels, one above the other against the step (:func:`build_figure`):

- **loss**: the training loss of every step that was not skipped, and the evaluation loss.
  Past :data:`SMOOTH_AFTER` steps the raw training loss is drawn faint and thin, under its
  smoothing drawn bold: an exponential moving average with bias correction, as TensorBoard
  smooths (:func:`ema_smooth`; the weight grows with the run's length,
  :func:`smoothing_weight`). The axis is logarithmic only when every plotted value is
  positive and they span more than :data:`LOG_DECADES` decades (:func:`wants_log_scale`).
- **evaluation**: the evaluation metrics other than the loss, when there are any.
- **gradient norm**: the global norm before clipping, when the records carry ``grad_norm``.
- **learning rate**: one line per param group, in the optimizer's order, labelled by what
  the group holds (:func:`lr_group_labels`). Series drawn on one axis differ in colour, line
  style, width and markers, and a legend entry says when its line coincides with another's
  (two groups with the same learning rate), so no line hides another unannounced.

Every panel marks the committed checkpoints (dotted grey) and each start from a checkpoint,
a resume or a recovery (dash-dotted red: the record's ``started_from``). The title names the
run, its steps, its final training loss, its last evaluation and, when the records carry
``time``, the wall-clock time from the first step to the last. Older logs without ``lrs``,
``time``, ``grad_norm`` or ``started_from`` plot with what they have.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# more plotted training steps than this: the raw loss faint under its smoothing
SMOOTH_AFTER = 50
# a logarithmic loss axis only when the plotted values span more decades than this
LOG_DECADES = 1.5
# a group of at most this many parameters (whose names fit in LABEL_CHARS) is labelled by its
# parameters' names; a larger one by the rule's pattern and a count
FEW_PARAMETERS = 3
LABEL_CHARS = 40
# the resumes a legend entry lists by step before it counts the rest
LISTED_STARTS = 4
# inches: the figure's width, each panel's height, the title's
WIDTH = 10.0
PANEL_HEIGHTS = {"loss": 3.2, "evaluation": 2.2, "gradient norm": 2.0, "learning rate": 2.2}
TITLE_HEIGHT = 0.9
DPI = 100
# how series on one axis differ besides colour: line style, width and marker, in drawing
# order; the earlier lines are wider, so a later line drawn on top of an equal one leaves
# the earlier one's colour showing on both sides
SERIES_STYLES = (("-", "o"), ((0, (5, 2)), "s"), ((0, (1, 1.5)), "^"), ("-.", "D"), ((0, (3, 1, 1, 1, 1, 1)), "v"),
                 ((0, (8, 3)), "P"))
# a line's width; a line that an equal one drawn later covers is wider by WIDER for each
SERIES_WIDTH, WIDER = 1.6, 1.4
MARKERS_PER_LINE = 8
CHECKPOINT_STYLE = {"color": "0.55", "linestyle": ":", "linewidth": 1.0}
START_STYLE = {"color": "tab:red", "linestyle": "-.", "linewidth": 1.6}


class PlotError(Exception):
    """No metrics to plot, or matplotlib missing."""


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The step records of the run's log (one JSON object per line), in order."""
    from shardstep.service.run_dir import METRICS_FILE, RunLogError, log_location, read_log_lines, run_location

    where = run_location(run_dir)
    try:
        lines = read_log_lines(where)
    except (RunLogError, OSError) as error:
        raise PlotError(f"cannot read the log of {run_dir}: {error}") from None
    if lines is None:
        raise PlotError(f"{run_dir} has no {METRICS_FILE}: not a run directory, or no step has finished yet")
    records = []
    # a live run may be mid-append, and a resumed one cuts back torn lines itself: a line
    # that is not a whole record is left out of the plot, not an error
    for line in lines:
        try:
            record = json.loads(line) if line.strip() else None
        except ValueError:
            continue
        if isinstance(record, dict) and type(record.get("step")) is int and "loss" in record:
            records.append(record)
    if not records:
        raise PlotError(f"{log_location(where)} holds no steps yet")
    return records


# ---------------------------------------------------------------------------------------
# numbers


def _number(value: Any) -> float:
    """A record's value as a float; NaN for anything that is not a finite number (a gap in
    the line, never a point at infinity)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return math.nan


def ema_smooth(values: Sequence[float], weight: float) -> list[float]:
    """The exponential moving average of ``values`` with bias correction, as TensorBoard
    smooths a scalar: ``last = weight * last + (1 - weight) * value`` from ``last = 0``, shown
    as ``last / (1 - weight ** n)`` after the ``n``-th finite value (without the correction
    the first values would be pulled towards 0). A non-finite value is NaN in the result and
    leaves the average as it was. ``weight`` in [0, 1): 0 is no smoothing."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"the smoothing weight must be in [0, 1); got {weight!r}")
    smoothed, last, count = [], 0.0, 0
    for value in values:
        if not math.isfinite(value):
            smoothed.append(math.nan)
            continue
        last = weight * last + (1.0 - weight) * value
        count += 1
        smoothed.append(last / (1.0 - weight ** count))
    return smoothed


def smoothing_weight(count: int) -> float:
    """The weight :func:`ema_smooth` uses for a series of ``count`` points: that of an
    average over about a thirtieth of the run (a span of 5 to 200 points), ``1 - 2 / (span
    + 1)``; the average lags the raw values by about half the span, so the span stays short."""
    span = min(max(count // 30, 5), 200)
    return 1.0 - 2.0 / (span + 1)


def wants_log_scale(values: Sequence[float]) -> bool:
    """Whether a logarithmic axis suits ``values``: every finite one positive, and the
    largest more than :data:`LOG_DECADES` decades above the smallest (non-finite values are
    not plotted and do not count)."""
    finite = [value for value in values if math.isfinite(value)]
    if not finite or min(finite) <= 0:
        return False
    return math.log10(max(finite) / min(finite)) > LOG_DECADES


def coinciding(series: Sequence[Mapping[int, float]]) -> list[list[int]]:
    """For each series (step -> value), the indices of the other series equal to it at every
    step both have (to a relative 1e-12), with at least one step in common."""
    same: list[list[int]] = [[] for _ in series]
    for i, first in enumerate(series):
        for j in range(i + 1, len(series)):
            second = series[j]
            shared = [step for step in first if step in second]
            if shared and all(_equal(first[step], second[step]) for step in shared):
                same[i].append(j)
                same[j].append(i)
    return same


def _equal(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


# ---------------------------------------------------------------------------------------
# what the param groups hold


def lr_group_labels(run_dir: str | os.PathLike, count: int) -> list[str]:
    """A label for each of the run's ``count`` param groups (the optimizer's order, the
    order of a record's ``lrs``).

    The optimizer's groups come from the param-group rules (the job's ``param_groups``, or
    when it has none, the task's own rules that match a trained parameter) by
    :func:`~shardstep.workers.tasks.base.assign_groups`: first the parameters no rule
    matched, when there are any, then one group per rule in order. Which parameters each
    group holds is read from the newest committed checkpoint's manifest, or else worked out
    from the task's parameters (the task is built from ``job.json``). A group of a few
    parameters is labelled by their names after its pattern (``*.bias: 0.bias, 2.bias``),
    a larger one by its pattern and a count (``other parameters (12)``), one group ``all
    parameters`` (``all trained parameters`` when the job freezes some). What cannot be known (no ``job.json``, a task that cannot be built, a
    group count that differs from the job's) falls back to ``group k``."""
    return [label for label, _ in _describe_groups(run_dir, count)]


def _describe_groups(run_dir: str | os.PathLike, count: int) -> list[tuple[str, str]]:
    """``(label, short name)`` of each param group (:func:`lr_group_labels`); the short name
    is the pattern, ``other``, or what the label says when the pattern is not known."""
    from shardstep.service.run_dir import RunDirectoryError, run_location, saved_job

    where = run_location(run_dir)
    try:
        saved = saved_job(where)
    except RunDirectoryError:
        saved = None
    job = saved["job"] if saved is not None else None
    if count == 1:  # frozen parameters are in no group
        label = "all trained parameters" if job is not None and job.get("frozen") else "all parameters"
        return [(label, label)]
    members = _checkpoint_members(where)
    task = None
    if job is not None and (members is None or job.get("param_groups") is None):
        task = _built_task(job)
    trainable = None
    if members is not None:
        trainable = [name for group in members for name in group]
    elif task is not None:
        trainable = _trainable(job, task)
    rules = _rules(job, task, trainable)
    if members is None and rules is not None and trainable is not None:
        members = _assigned(trainable, rules)
    if members is not None and len(members) != count:
        members = None
    patterns = _patterns(rules, members, count)
    described = []
    for index in range(count):
        names = members[index] if members is not None else None
        described.append(_label(index, patterns[index] if patterns is not None else _UNKNOWN, names))
    # two groups never share a name (a job may repeat a pattern)
    labels, shorts = [label for label, _ in described], [short for _, short in described]
    return [(label if labels.count(label) == 1 else f"{label} [group {index}]",
             short if shorts.count(short) == 1 else f"{short} [group {index}]")
            for index, (label, short) in enumerate(described)]


_UNKNOWN = object()  # a group whose rule is not known (None: the parameters no rule matched)


def _checkpoint_members(where: Any) -> list[list[str]] | None:
    """The parameter names of each param group, from the newest committed checkpoint whose
    manifest reads; None when there is none."""
    from shardstep.checkpoints import CheckpointError, committed_steps, open_checkpoint
    from shardstep.service.run_dir import CHECKPOINT_DIR

    root = where / CHECKPOINT_DIR
    try:
        steps = committed_steps(root)
    except (CheckpointError, OSError):
        return None
    for step in reversed(steps):
        try:
            with open_checkpoint(root, step) as checkpoint:
                groups = checkpoint.param_groups
        except (CheckpointError, OSError):
            continue
        if isinstance(groups, list) and all(isinstance(g, Mapping) and isinstance(g.get("params"), list)
                                            for g in groups):
            return [[str(name) for name in g["params"]] for g in groups]
    return None


def _built_task(job: Mapping[str, Any]) -> Any:
    """The job's task, built as the run builds it (its own code imported from the job's
    ``code_dir``), or None when it cannot be (the code is gone, its data moved)."""
    from shardstep.service.job_code import use_job_code
    from shardstep.workers.tasks import make_task

    try:
        use_job_code(job.get("code_dir"))
        return make_task(job["task"], **dict(job.get("task_args") or {}))
    except Exception:  # whatever the user's code raises, the plot still draws, with "group k"
        return None


def _trainable(job: Mapping[str, Any], task: Any) -> list[str] | None:
    """The task's parameters the run trains (those no ``frozen`` pattern matches), in order."""
    import fnmatch

    frozen = [pattern for pattern in job.get("frozen") or () if isinstance(pattern, str)]
    try:
        names = [spec.name for spec in task.param_specs()]
    except Exception:
        return None
    return [name for name in names if not any(fnmatch.fnmatchcase(name, pattern) for pattern in frozen)]


def _rules(job: Mapping[str, Any] | None, task: Any, trainable: Sequence[str] | None) -> list[Any] | None:
    """The rules the optimizer was built with (:meth:`JobSpec.group_rules`), or None."""
    from shardstep.workers.optim.param_groups import ParamGroupRule

    if job is None:
        return None
    given = job.get("param_groups")
    try:
        if given is not None:
            return [ParamGroupRule(rule["pattern"], rule.get("options") or {}) for rule in given]
        if task is None or trainable is None:
            return None
        return [rule for rule in task.param_groups if any(rule.matches(name) for name in trainable)]
    except (TypeError, ValueError, KeyError, AttributeError):
        return None


def _assigned(trainable: Sequence[str], rules: Sequence[Any]) -> list[list[str]] | None:
    from shardstep.workers.optim.param_groups import assign_groups

    try:
        return [names for _, names in assign_groups(list(trainable), list(rules))]
    except ValueError:
        return None


def _patterns(rules: Sequence[Any] | None, members: Sequence[Sequence[str]] | None, count: int) -> list[Any] | None:
    """Each group's pattern (None: the parameters no rule matched), or None when unknown."""
    if rules is None:
        return None
    if members is not None:
        patterns: list[Any] = []
        for names in members:
            # each parameter is in the group of the first rule it matches
            first = {next((rule.pattern for rule in rules if rule.matches(name)), None) for name in names}
            patterns.append(first.pop() if len(first) == 1 else _UNKNOWN)
        return patterns
    # every rule forms a group (a rule that matches nothing is refused with the job), after
    # the group of the parameters it leaves, when there is one
    if count == len(rules) + 1:
        return [None, *(rule.pattern for rule in rules)]
    if count == len(rules):
        return [rule.pattern for rule in rules]
    return None


def _label(index: int, pattern: Any, names: Sequence[str] | None) -> tuple[str, str]:
    """``(label, short name)`` of group ``index`` from its pattern (None: the parameters no
    rule matched; _UNKNOWN) and its parameters' names (None: not known)."""
    listed = ", ".join(names) if names else ""
    few = names is not None and 0 < len(names) <= FEW_PARAMETERS and len(listed) <= LABEL_CHARS
    if pattern is _UNKNOWN:
        if few:
            return listed, listed
        return f"group {index}" + (f" ({len(names)} parameters)" if names else ""), f"group {index}"
    short = "other" if pattern is None else pattern
    if few:
        return (short if listed == pattern else f"{short}: {listed}"), short
    if pattern is None:
        return "other parameters" + (f" ({len(names)})" if names else ""), short
    return pattern + (f" ({len(names)} parameters)" if names else ""), short


# ---------------------------------------------------------------------------------------
# the figure


def build_figure(run_dir: str | os.PathLike) -> Figure:
    """The figure of the run (see the module's docstring); PlotError when the run has no
    steps or matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install 'shardstep[plot]'") from None
    from shardstep.checkpoints import CheckpointError, committed_steps
    from shardstep.service.run_dir import CHECKPOINT_DIR, run_location

    where = run_location(run_dir)
    every = read_metrics(run_dir)
    records = [r for r in every if not r.get("skipped")]
    if not records:
        raise PlotError(f"{run_dir}: every one of its {len(every)} steps so far was skipped; nothing to plot")
    steps = [r["step"] for r in records]
    losses = [_number(r.get("loss")) for r in records]
    evaluations = [(r["step"], r["eval"]) for r in records if isinstance(r.get("eval"), Mapping)]
    metric_names = sorted({name for _, metrics in evaluations for name in metrics if name != "loss"})
    norms = [(r["step"], _number(r.get("grad_norm"))) for r in records if "grad_norm" in r]
    norms = [(step, value) for step, value in norms if math.isfinite(value)]
    try:
        checkpoints = committed_steps(where / CHECKPOINT_DIR)
    except (CheckpointError, OSError):
        checkpoints = []  # the log alone still plots
    starts = [r["started_from"] for r in every if type(r.get("started_from")) is int]

    panels = ["loss", *(["evaluation"] if metric_names else []), *(["gradient norm"] if norms else []),
              "learning rate"]
    heights = [PANEL_HEIGHTS[panel] for panel in panels]
    figure = Figure(figsize=(WIDTH, sum(heights) + TITLE_HEIGHT), dpi=DPI, layout="constrained")
    axes = figure.subplots(len(panels), 1, sharex=True, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0]
    by_panel = dict(zip(panels, axes))
    for panel, axis in by_panel.items():
        axis.set_ylabel(panel)
        axis.grid(True, alpha=0.25, linewidth=0.6)

    smoothed = _draw_loss(by_panel["loss"], steps, losses, evaluations)
    if metric_names:
        _draw_series(by_panel["evaluation"], [
            (name, name, {step: _number(metrics[name]) for step, metrics in evaluations if name in metrics})
            for name in metric_names], markers=True)
    if norms:
        _draw_noisy(by_panel["gradient norm"], [s for s, _ in norms], [v for _, v in norms], "gradient norm")
    _draw_learning_rates(by_panel["learning rate"], run_dir, records)
    for index, axis in enumerate(axes):
        _draw_markers(axis, checkpoints, starts, legend=index == 0)
    for panel, axis in by_panel.items():
        if axis.get_legend_handles_labels()[0]:
            axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small",
                        frameon=False, handlelength=3.0)
    bottom = axes[-1]
    bottom.set_xlabel("step")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    name = where.resolve().name if isinstance(where, Path) else where.name
    figure.suptitle(_title(name, every, records, losses, smoothed, evaluations, starts), fontsize="medium")
    return figure


def _draw_loss(axis: Axes, steps: list[int], losses: list[float],
               evaluations: list[tuple[int, Mapping[str, Any]]]) -> list[float] | None:
    """The training loss (raw, and smoothed on a long run) and the evaluation loss; returns
    the smoothed series, or None when the run is short enough to show raw."""
    smoothed = _draw_noisy(axis, steps, losses, "training loss")
    points = [(step, _number(metrics["loss"])) for step, metrics in evaluations if "loss" in metrics]
    if points:
        axis.plot([s for s, _ in points], [v for _, v in points], color="tab:orange", linestyle="-",
                  linewidth=1.4, marker="o", markersize=4, label="evaluation loss", zorder=4)
    plotted = losses + [v for _, v in points]
    axis.set_yscale("log" if wants_log_scale(plotted) else "linear")
    return smoothed


def _draw_noisy(axis: Axes, steps: list[int], values: list[float], what: str) -> list[float] | None:
    """``values`` against ``steps``; past SMOOTH_AFTER points, faint and thin under their
    smoothing. Returns the smoothing (None when the values are drawn as they are)."""
    finite = sum(1 for value in values if math.isfinite(value))
    if finite <= SMOOTH_AFTER:
        axis.plot(steps, values, color="tab:blue", linewidth=1.5, label=what)
        smoothed = None
    else:
        weight = smoothing_weight(finite)
        smoothed = ema_smooth(values, weight)
        axis.plot(steps, values, color="tab:blue", linewidth=0.8, alpha=0.3, label=f"{what}, each step")
        axis.plot(steps, smoothed, color="tab:blue", linewidth=2.2, label=f"{what}, smoothed (EMA {weight:.2f})",
                  zorder=3)
    if what != "training loss":  # the loss axis decides with the evaluation loss too
        axis.set_yscale("log" if wants_log_scale(values) else "linear")
    return smoothed


def _draw_learning_rates(axis: Axes, run_dir: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """One line per param group. The axis is logarithmic only when the groups' typical
    rates lie decades apart; a schedule's own fall (a cosine to 0) reads better linear."""
    def rates(record: dict[str, Any]) -> list[Any]:
        lrs = record.get("lrs")
        return lrs if isinstance(lrs, list) and lrs else [record.get("lr")]

    count = max(len(rates(r)) for r in records)
    groups = _describe_groups(run_dir, count)
    series = [(label, short, {r["step"]: _number(rates(r)[group]) for r in records if group < len(rates(r))})
              for group, (label, short) in enumerate(groups)]
    _draw_series(axis, series, markers=False)
    values = [value for _, _, points in series for value in points.values() if math.isfinite(value)]
    medians = [statistics.median(finite) for _, _, points in series
               if (finite := [v for v in points.values() if math.isfinite(v)])]
    log = bool(values) and min(values) > 0 and wants_log_scale(medians)
    axis.set_yscale("log" if log else "linear")


def _draw_series(axis: Axes, series: list[tuple[str, str, Mapping[int, float]]], *, markers: bool) -> None:
    """Lines on one axis, ``(label, short name, step -> value)`` each, in their own colour,
    style and marker; an entry whose line coincides with another's says so by the other's
    short name, and of equal lines the earlier drawn are wider, so the later, narrower ones
    on top leave them showing. ``markers``: a marker on every point (evaluations); else a
    few per line, at offsets that differ between lines so that equal lines show both."""
    same = coinciding([points for _, _, points in series])
    for index, (label, _, points) in enumerate(series):
        style, marker = SERIES_STYLES[index % len(SERIES_STYLES)]
        steps = sorted(points)
        covering = [j for j in same[index] if j > index]
        if same[index]:
            label = f"{label}  (same as {', '.join(series[j][1] for j in same[index])})"
        spacing = max(len(steps) // MARKERS_PER_LINE, 1)
        every = 1 if markers else (index * spacing // len(series) % spacing, spacing)
        colour = f"C{index % 10}"
        axis.plot(steps, [points[step] for step in steps], color=colour, linestyle=style,
                  linewidth=SERIES_WIDTH + WIDER * len(covering), marker=marker, markersize=5 if markers else 6,
                  markevery=every, markerfacecolor="none" if index % 2 else colour, label=label,
                  zorder=2 + index * 0.01)


def _draw_markers(axis: Axes, checkpoints: list[int], starts: list[int], *, legend: bool) -> None:
    """The committed checkpoints and the starts from a checkpoint as vertical lines, each
    kind one line of the axis (a segment per step); only the top panel's are in a legend."""
    transform = axis.get_xaxis_transform()  # x in steps, y from the axis' bottom (0) to top (1)

    def vertical(at: list[int], label: str, style: dict[str, Any], zorder: float) -> None:
        xs: list[float] = []
        ys: list[float] = []
        for step in at:
            xs += [step, step, math.nan]
            ys += [0.0, 1.0, math.nan]
        line, = axis.plot(xs, ys, transform=transform, label=label if legend else f"_{label}", zorder=zorder,
                          **style)
        line.set_gid("checkpoints" if style is CHECKPOINT_STYLE else "starts")

    if checkpoints:
        vertical(checkpoints, f"checkpoint ({len(checkpoints)} committed)" if len(checkpoints) > 1 else
                 "checkpoint", CHECKPOINT_STYLE, 1.0)
    if starts:
        shown = ", ".join(str(step) for step in starts[:LISTED_STARTS])
        more = f" and {len(starts) - LISTED_STARTS} more" if len(starts) > LISTED_STARTS else ""
        label = f"resumed from step{'s' if len(starts) > 1 else ''} {shown}{more}"
        vertical(starts, label, START_STYLE, 5.0)
        if legend and len(starts) <= LISTED_STARTS:
            for step in starts:
                axis.annotate(f"resumed from {step}", (step, 1.0), xycoords=transform, xytext=(3, -3),
                              textcoords="offset points", ha="left", va="top", fontsize="x-small",
                              color=START_STYLE["color"])


def _title(name: str, every: list[dict[str, Any]], records: list[dict[str, Any]], losses: list[float],
           smoothed: list[float] | None, evaluations: list[tuple[int, Mapping[str, Any]]], starts: list[int]) -> str:
    skipped = len(every) - len(records)
    lines = [name]
    parts = [f"{records[-1]['step']} steps" + (f" ({skipped} skipped)" if skipped else "")]
    final = next((value for value in reversed(losses) if math.isfinite(value)), math.nan)
    if math.isfinite(final):
        parts.append(f"final loss {final:.4g}" + (f" (smoothed {smoothed[-1]:.4g})"
                                                  if smoothed and math.isfinite(smoothed[-1]) else ""))
    times = [r["time"] for r in every if isinstance(r.get("time"), (int, float)) and math.isfinite(r["time"])]
    if len(times) > 1 and times[-1] > times[0]:
        parts.append(f"{_duration(times[-1] - times[0])} wall clock" +
                     (f" over {len(starts) + 1} starts" if starts else ""))
    lines.append("  ·  ".join(parts))
    if evaluations:
        step, metrics = evaluations[-1]
        shown = ", ".join(f"{key} {_number(value):.4g}" for key, value in sorted(metrics.items()))
        lines.append(f"last evaluation (step {step}): {shown}")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.3g} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the PNG of :func:`build_figure`; returns its path."""
    figure = build_figure(run_dir)
    out = Path(out)
    # written beside the target and renamed, so a failed write leaves no half PNG
    partial = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        figure.savefig(partial, dpi=DPI, format="png")
        os.replace(partial, out)
    except OSError as error:
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass  # it was never created
        raise PlotError(f"cannot write {out}: {error.strerror or error}") from None
    return out
