"""``shardstep plot RUN_DIR``: loss, evaluation metrics and learning rates against the step,
from the run directory's ``metrics.jsonl``, as one PNG (matplotlib, the ``plot`` extra)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


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


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the PNG; returns its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install 'shardstep[plot]'") from None
    records = [r for r in read_metrics(run_dir) if not r.get("skipped")]
    steps = [r["step"] for r in records]
    evaluations = [(r["step"], r["eval"]) for r in records if "eval" in r]
    metric_names = sorted({name for _, metrics in evaluations for name in metrics})

    panels = 2 + (1 if metric_names else 0)
    figure, axes = plt.subplots(panels, 1, figsize=(8, 2.6 * panels), sharex=True, constrained_layout=True)
    loss_axis, *rest = axes
    loss_axis.plot(steps, [r["loss"] for r in records], lw=1, label="training loss")
    if "loss" in metric_names:
        loss_axis.plot([s for s, m in evaluations if "loss" in m], [m["loss"] for _, m in evaluations if "loss" in m],
                       "o-", ms=3, label="evaluation loss")
    positive = all(r["loss"] > 0 for r in records if math.isfinite(r["loss"]))
    if positive:
        loss_axis.set_yscale("log")
    loss_axis.set_ylabel("loss")
    loss_axis.legend(loc="upper right")
    from shardstep.service.run_dir import run_location

    where = run_location(run_dir)
    name = where.resolve().name if isinstance(where, Path) else where.name
    loss_axis.set_title(f"{name}: {len(records)} steps")
    if metric_names:
        metric_axis = rest.pop(0)
        for name in metric_names:
            if name == "loss":
                continue
            points = [(s, m[name]) for s, m in evaluations if name in m]
            metric_axis.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, label=name)
        metric_axis.set_ylabel("evaluation")
        metric_axis.legend(loc="best")
    lr_axis = rest.pop(0)
    groups = max(len(r.get("lrs") or [r.get("lr")]) for r in records)
    for group in range(groups):
        values = [(r["step"], (r.get("lrs") or [r.get("lr")])[group]) for r in records
                  if group < len(r.get("lrs") or [r.get("lr")])]
        lr_axis.plot([v[0] for v in values], [v[1] for v in values], lw=1, label=f"group {group}")
    lr_axis.set_ylabel("learning rate")
    lr_axis.set_xlabel("step")
    lr_axis.legend(loc="best")
    out = Path(out)
    # written beside the target and renamed, so a failed write leaves no half PNG
    partial = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        figure.savefig(partial, dpi=100, format="png")
        os.replace(partial, out)
    except OSError as error:
        try:
            partial.unlink(missing_ok=True)
        except OSError:
            pass  # it was never created
        raise PlotError(f"cannot write {out}: {error.strerror or error}") from None
    finally:
        plt.close(figure)
    return out
