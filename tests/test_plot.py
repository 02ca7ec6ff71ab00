"""``shardstep plot``: what the figure of a run shows, read off the matplotlib figure of run
directories that real short runs wrote (the inline backend): labelled learning rates, equal
lines told apart, checkpoint and resume markers, smoothing, scales and the title; the
smoothing's numbers; the PNG the command line writes."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from shardstep.checkpoints import committed_steps, open_checkpoint  # noqa: E402
from shardstep.service.coordinator import Coordinator  # noqa: E402
from shardstep.service.jobspec import JobSpec, SchedulerSpec  # noqa: E402
from shardstep.service.plot import (  # noqa: E402
    PlotError,
    build_figure,
    ema_smooth,
    lr_group_labels,
    plot_run,
    smoothing_weight,
    wants_log_scale,
)
from shardstep.service.run_dir import CHECKPOINT_DIR, JOB_FILE, METRICS_FILE  # noqa: E402
from shardstep.workers.tasks.base import ParamGroupRule  # noqa: E402

BIAS_LR, LR = 0.003, 0.01


def _run(run_dir, steps, **fields):
    values = dict(task="digits", task_args={}, optimizer="adam", optimizer_args={"lr": LR},
                  param_groups=(ParamGroupRule("*.bias", {"lr": BIAS_LR}),), schedulers=(), steps=steps,
                  epochs=None, batch_size=64, backend="inline", run_dir=str(run_dir))
    values.update(fields)
    Coordinator(JobSpec(**values)).run()
    return run_dir


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """120 steps of two param groups with different learning rates, checkpointed every 20,
    evaluated every 20: run to step 60, then resumed on the same directory to 120."""
    run_dir = tmp_path_factory.mktemp("plot") / "resumed"
    _run(run_dir, 60, checkpoint_every=20, eval_every=20)
    return _run(run_dir, 120, checkpoint_every=20, eval_every=20)


@pytest.fixture(scope="module")
def equal(tmp_path_factory):
    """30 steps of AdamW whose two param groups differ only in weight decay: their learning
    rates are the same at every step (a cosine schedule)."""
    run_dir = tmp_path_factory.mktemp("plot") / "equal"
    return _run(run_dir, 30, optimizer="adamw", optimizer_args={"lr": LR, "weight_decay": 0.1},
                param_groups=(ParamGroupRule("*.bias", {"weight_decay": 0.0}),),
                schedulers=(SchedulerSpec("CosineAnnealingLR", {"T_max": 30}),), eval_every=10)


def _records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / METRICS_FILE).read_text().splitlines()]


def _panels(figure):
    return {axis.get_ylabel(): axis for axis in figure.axes}


def _data_lines(axis):
    """The axis' plotted series, without the checkpoint and start markers."""
    return [line for line in axis.lines if line.get_gid() not in ("checkpoints", "starts")]


def _legend(axis):
    return [text.get_text() for text in axis.get_legend().get_texts()]


def _marked(axis, gid):
    """The steps at which the axis draws its vertical markers of kind ``gid``."""
    lines = [line for line in axis.lines if line.get_gid() == gid]
    assert len(lines) <= 1
    return sorted({int(x) for x in lines[0].get_xdata() if math.isfinite(x)}) if lines else []


def _copy(run_dir, tmp_path):
    target = tmp_path / Path(run_dir).name
    shutil.copytree(run_dir, target)
    return target


def _rewrite_job(run_dir, **changes):
    path = Path(run_dir) / JOB_FILE
    saved = json.loads(path.read_text())
    saved["job"].update(changes)
    path.write_text(json.dumps(saved))


# ---------------------------------------------------------------------------------------
# learning rates


def test_learning_rates_are_labelled_by_the_parameters_their_groups_hold(resumed):
    figure = build_figure(resumed)
    lines = _data_lines(_panels(figure)["learning rate"])
    # the optimizer's order, as the checkpoint records it: the parameters no rule matched first
    with open_checkpoint(resumed / CHECKPOINT_DIR) as checkpoint:
        assert [group["params"] for group in checkpoint.param_groups] == [["0.weight", "2.weight"],
                                                                          ["0.bias", "2.bias"]]
    assert [line.get_label() for line in lines] == ["other: 0.weight, 2.weight", "*.bias: 0.bias, 2.bias"]
    records = _records(resumed)
    for group, line in enumerate(lines):
        assert list(line.get_xdata()) == [r["step"] for r in records]
        assert list(line.get_ydata()) == [r["lrs"][group] for r in records]
    assert set(lines[0].get_ydata()) == {LR} and set(lines[1].get_ydata()) == {BIAS_LR}
    legend = _legend(_panels(figure)["learning rate"])
    assert legend == ["other: 0.weight, 2.weight", "*.bias: 0.bias, 2.bias"]  # nothing coincides


def test_groups_of_many_parameters_are_labelled_by_pattern_from_the_checkpoint_or_the_task(tmp_path):
    """Four linear layers: four weights and four biases, too many to list. The labels read
    off the checkpoint's groups equal those worked out from the job and its task."""
    run_dir = _run(tmp_path / "deep", 3, task_args={"hidden": [16, 16, 16]})
    expected = ["other parameters (4)", "*.bias (4 parameters)"]
    assert lr_group_labels(run_dir, 2) == expected
    shutil.rmtree(run_dir / CHECKPOINT_DIR)
    assert lr_group_labels(run_dir, 2) == expected
    figure = build_figure(run_dir)
    assert [line.get_label() for line in _data_lines(_panels(figure)["learning rate"])] == expected
    # three steps: the step axis counts whole steps
    ticks = [tick for tick in figure.axes[-1].get_xticks() if 1 <= tick <= 3]
    assert ticks == [1, 2, 3]


def test_a_task_s_own_rules_label_the_groups_of_a_job_that_sets_none(tmp_path, monkeypatch):
    """param_groups None: the task's rules, less those that match no trained parameter; when
    the task cannot be built any more, the groups fall back to their numbers."""
    module = f"plot_task_{uuid.uuid4().hex[:8]}"
    code = tmp_path / "code"
    code.mkdir()
    (code / f"{module}.py").write_text(textwrap.dedent("""
        from shardstep.workers.tasks.base import ParamGroupRule
        from shardstep.workers.tasks.digits import DigitsTask


        class BiasesApart(DigitsTask):
            param_groups = (ParamGroupRule("*.gamma", {"lr": 1.0}), ParamGroupRule("*.bias", {"lr": 0.002}))
        """))
    monkeypatch.syspath_prepend(str(code))
    run_dir = _run(tmp_path / "own", 3, task=f"{module}:BiasesApart", param_groups=None, code_dir=str(code))
    assert _records(run_dir)[-1]["lrs"] == [LR, 0.002]
    expected = ["other: 0.weight, 2.weight", "*.bias: 0.bias, 2.bias"]
    assert lr_group_labels(run_dir, 2) == expected
    shutil.rmtree(run_dir / CHECKPOINT_DIR)
    assert lr_group_labels(run_dir, 2) == expected  # built from the task
    _rewrite_job(run_dir, task="plot_no_such_module:Task")
    assert lr_group_labels(run_dir, 2) == ["group 0", "group 1"]
    assert [line.get_label() for line in _data_lines(_panels(build_figure(run_dir))["learning rate"])] == [
        "group 0", "group 1"]


def test_without_job_json_the_labels_fall_back(resumed, tmp_path):
    run_dir = _copy(resumed, tmp_path)
    (run_dir / JOB_FILE).unlink()
    # the checkpoint still says which parameters each group holds, not by which rule
    assert lr_group_labels(run_dir, 2) == ["0.weight, 2.weight", "0.bias, 2.bias"]
    shutil.rmtree(run_dir / CHECKPOINT_DIR)
    figure = build_figure(run_dir)
    lines = _data_lines(_panels(figure)["learning rate"])
    assert [line.get_label() for line in lines] == ["group 0", "group 1"]
    assert set(lines[1].get_ydata()) == {BIAS_LR}
    assert _marked(figure.axes[0], "checkpoints") == []


def test_rules_without_parameter_names_still_name_the_groups(resumed, tmp_path):
    """The job's rules are known but its task cannot be built and no checkpoint is left: one
    rule and two groups, so the first holds the parameters the rule left."""
    run_dir = _copy(resumed, tmp_path)
    shutil.rmtree(run_dir / CHECKPOINT_DIR)
    _rewrite_job(run_dir, task="plot_no_such_module:Task")
    assert lr_group_labels(run_dir, 2) == ["other parameters", "*.bias"]
    # a count that does not fit the rules is not guessed at
    assert lr_group_labels(run_dir, 3) == ["group 0", "group 1", "group 2"]


def test_one_group_is_all_parameters_and_frozen_ones_are_in_none(tmp_path):
    run_dir = _run(tmp_path / "one", 2, param_groups=())
    figure = build_figure(run_dir)
    assert [line.get_label() for line in _data_lines(_panels(figure)["learning rate"])] == ["all parameters"]
    assert lr_group_labels(_run(tmp_path / "head", 2, param_groups=(), frozen=("0.*",)), 1) == [
        "all trained parameters"]
    run_dir = _run(tmp_path / "frozen", 2, frozen=("0.weight",))
    expected = ["other: 2.weight", "*.bias: 0.bias, 2.bias"]
    assert lr_group_labels(run_dir, 2) == expected
    shutil.rmtree(run_dir / CHECKPOINT_DIR)
    assert lr_group_labels(run_dir, 2) == expected  # the task's parameters less the frozen one


def test_equal_learning_rates_stay_distinguishable(equal):
    axis = _panels(build_figure(equal))["learning rate"]
    first, second = _data_lines(axis)
    assert list(first.get_ydata()) == list(second.get_ydata())
    assert len(set(first.get_ydata())) > 10  # the schedule moves them together
    assert first.get_linestyle() != second.get_linestyle()
    assert first.get_marker() != second.get_marker()
    assert first.get_color() != second.get_color()
    # the one drawn first is wider, so the one on top leaves it showing
    assert first.get_linewidth() > second.get_linewidth()
    assert first.get_zorder() < second.get_zorder()
    assert _legend(axis) == ["other: 0.weight, 2.weight  (same as *.bias)", "*.bias: 0.bias, 2.bias  (same as other)"]


# ---------------------------------------------------------------------------------------
# checkpoints and starts


def test_checkpoints_and_the_resume_are_marked_on_every_panel(resumed):
    records = _records(resumed)
    started = [(r["step"], r["started_from"]) for r in records if "started_from" in r]
    assert started == [(61, 60)]  # the engine's record of the second run's start
    figure = build_figure(resumed)
    committed = committed_steps(resumed / CHECKPOINT_DIR)
    assert committed == [20, 40, 60, 80, 100, 120]
    assert list(_panels(figure)) == ["loss", "evaluation", "gradient norm", "learning rate"]
    for axis in figure.axes:
        assert _marked(axis, "checkpoints") == committed
        assert _marked(axis, "starts") == [60]
        # the vertical lines span the panel whatever its scale
        start = next(line for line in axis.lines if line.get_gid() == "starts")
        assert [y for y in start.get_ydata() if math.isfinite(y)] == [0.0, 1.0]
    loss = figure.axes[0]
    legend = _legend(loss)
    assert "checkpoint (6 committed)" in legend and "resumed from step 60" in legend
    assert [text.get_text() for text in loss.texts] == ["resumed from 60"]
    assert all(axis.get_legend() is None or not any("resumed" in t for t in _legend(axis))
               for axis in figure.axes[1:])


def test_a_fresh_run_shows_no_resume(equal):
    figure = build_figure(equal)
    assert all(_marked(axis, "starts") == [] for axis in figure.axes)
    assert not any("resumed" in text for text in _legend(figure.axes[0]))
    assert _marked(figure.axes[0], "checkpoints") == committed_steps(equal / CHECKPOINT_DIR)


# ---------------------------------------------------------------------------------------
# the loss: smoothing and scale


def test_a_long_run_draws_its_raw_loss_faint_under_the_smoothing(resumed):
    losses = [r["loss"] for r in _records(resumed)]
    axis = _panels(build_figure(resumed))["loss"]
    raw, smooth, evaluation = _data_lines(axis)
    assert raw.get_label() == "training loss, each step" and raw.get_alpha() == pytest.approx(0.3)
    assert list(raw.get_ydata()) == losses
    weight = smoothing_weight(len(losses))
    assert smooth.get_label() == f"training loss, smoothed (EMA {weight:.2f})"
    assert smooth.get_alpha() is None and smooth.get_linewidth() > 2 * raw.get_linewidth()
    assert smooth.get_zorder() > raw.get_zorder()
    assert list(smooth.get_ydata()) == pytest.approx(ema_smooth(losses, weight), rel=1e-12)
    assert evaluation.get_label() == "evaluation loss"
    assert list(evaluation.get_xdata()) == [20, 40, 60, 80, 100, 120]


def test_a_short_run_draws_its_loss_as_it_is(equal):
    losses = [r["loss"] for r in _records(equal)]
    axis = _panels(build_figure(equal))["loss"]
    training = [line for line in _data_lines(axis) if line.get_label().startswith("training")]
    assert len(training) == 1 and training[0].get_label() == "training loss"
    assert training[0].get_alpha() is None and list(training[0].get_ydata()) == losses


def test_ema_smoothing_by_hand():
    assert ema_smooth([2.5] * 40, 0.9) == pytest.approx([2.5] * 40, rel=1e-12)
    # weight 0.5: last = 0.5, 1.25, 2.125 over debiasing 0.5, 0.75, 0.875
    assert ema_smooth([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 17 / 7], rel=1e-12)
    # a non-finite value is a gap, and the average carries on as if it were not there
    smoothed = ema_smooth([1.0, math.nan, math.inf, 3.0], 0.5)
    assert math.isnan(smoothed[1]) and math.isnan(smoothed[2])
    assert [smoothed[0], smoothed[3]] == pytest.approx([1.0, 1.75 / 0.75], rel=1e-12)
    assert ema_smooth([3.0, 1.0, 4.0], 0.0) == [3.0, 1.0, 4.0]
    assert ema_smooth([], 0.6) == []
    with pytest.raises(ValueError):
        ema_smooth([1.0], 1.0)
    assert smoothing_weight(300) == pytest.approx(1 - 2 / 11)  # a span of 10 points
    assert smoothing_weight(10) == pytest.approx(1 - 2 / 6) and smoothing_weight(10**6) == pytest.approx(1 - 2 / 201)


def test_the_log_scale_needs_positive_values_over_decades():
    assert wants_log_scale([2.0, 0.01])  # 2.3 decades
    assert not wants_log_scale([2.0, 0.1])  # 1.3
    assert not wants_log_scale([2.0, 0.0, 0.001]) and not wants_log_scale([2.0, -0.5, 0.001])
    assert wants_log_scale([2.0, math.nan, math.inf, 0.01]) and not wants_log_scale([math.nan])


def _old_log(run_dir, losses, **extra):
    """A log as shardstep wrote it before records carried lrs, time, grad_norm and
    started_from: step, epoch, batch, loss, lr; a NaN loss is a skipped step."""
    run_dir.mkdir()
    lines, step = [], 0
    for batch, loss in enumerate(losses):
        if math.isnan(loss):  # a skipped step keeps the step count of the step before it
            record = {"step": step, "epoch": 0, "batch": batch, "skipped": True, "loss": loss, "lr": 0.1,
                      "message": "training loss is nan"}
        else:
            step += 1
            record = {"step": step, "epoch": 0, "batch": batch, "loss": loss, "lr": 0.1}
        lines.append(json.dumps({**record, **extra}))
    (run_dir / METRICS_FILE).write_text("\n".join(lines) + "\n")
    return run_dir


def test_an_older_log_plots_with_what_it_has(tmp_path):
    """No job.json, no checkpoints, none of the newer keys; a skipped step and an infinite
    loss: the loss spans three decades (log scale), the infinite one is a gap."""
    losses = [10.0 * 0.5 ** k for k in range(11)]
    losses[4], losses[7] = math.nan, math.inf
    run_dir = _old_log(tmp_path / "old", losses)
    figure = build_figure(run_dir)
    assert list(_panels(figure)) == ["loss", "learning rate"]
    loss = figure.axes[0]
    assert loss.get_yscale() == "log"
    training, = _data_lines(loss)
    plotted = list(training.get_ydata())
    assert len(plotted) == 10  # the skipped step is not drawn
    assert math.isnan(plotted[6]) and plotted[-1] == losses[-1]
    assert [line.get_label() for line in _data_lines(figure.axes[1])] == ["all parameters"]
    title = figure.get_suptitle()
    assert title.splitlines() == ["old", f"10 steps (1 skipped)  ·  final loss {losses[-1]:.4g}"]
    written = plot_run(run_dir, tmp_path / "old.png")  # the gap breaks neither scale nor file
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_loss_within_a_decade_or_not_positive_is_linear(tmp_path):
    assert build_figure(_old_log(tmp_path / "near", [2.0, 1.5, 1.0, 0.5])).axes[0].get_yscale() == "linear"
    negative = _old_log(tmp_path / "negative", [100.0, 1.0, 0.01, -0.5])
    assert build_figure(negative).axes[0].get_yscale() == "linear"


# ---------------------------------------------------------------------------------------
# title, gradient norm, the file


def test_the_title_says_the_run_its_steps_final_loss_and_last_evaluation(resumed):
    records = _records(resumed)
    figure = build_figure(resumed)
    name, numbers, evaluation = figure.get_suptitle().splitlines()
    assert name == "resumed"
    last = records[-1]
    assert numbers.startswith(f"120 steps  ·  final loss {last['loss']:.4g} (smoothed ")
    assert numbers.endswith(" wall clock over 2 starts")
    seconds = numbers.split("  ·  ")[-1].split(" s wall clock")[0]
    assert float(seconds) == pytest.approx(last["time"] - records[0]["time"], rel=0.01)
    metrics = last["eval"]
    assert evaluation == (f"last evaluation (step 120): accuracy {metrics['accuracy']:.4g}, "
                          f"loss {metrics['loss']:.4g}")
    norms = _data_lines(_panels(figure)["gradient norm"])
    assert list(norms[0].get_ydata()) == [r["grad_norm"] for r in records]
    assert list(_data_lines(_panels(figure)["evaluation"])[0].get_ydata()) == [
        r["eval"]["accuracy"] for r in records if "eval" in r]


def test_the_command_line_writes_a_png_of_the_figure_s_size(resumed, tmp_path):
    import matplotlib.image

    out = tmp_path / "plot.png"
    done = subprocess.run([sys.executable, "-m", "shardstep.service.cli", "plot", str(resumed), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out}"
    width, height = build_figure(resumed).get_size_inches() * 100
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (round(height), round(width))
    assert image[..., :3].std() > 0.05
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]  # no temporary file left


def test_what_cannot_be_plotted_is_said(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / METRICS_FILE).write_text("")
    with pytest.raises(PlotError, match="holds no steps yet"):
        build_figure(empty)
    skipped = _old_log(tmp_path / "skipped", [math.nan, math.nan])
    with pytest.raises(PlotError, match="every one of its 2 steps so far was skipped"):
        build_figure(skipped)
    ok = _old_log(tmp_path / "ok", [1.0, 0.5])
    with pytest.raises(PlotError, match="cannot write"):
        plot_run(ok, tmp_path / "no-such-directory" / "plot.png")
    without = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['matplotlib'] = None\n"
         "from shardstep.service.plot import PlotError, plot_run\n"
         f"try:\n    plot_run({str(ok)!r}, {str(tmp_path / 'x.png')!r})\n"
         "except PlotError as error:\n    print(error)\n"],
        capture_output=True, text=True, timeout=120)
    assert without.stdout.strip() == "plotting needs matplotlib: pip install 'shardstep[plot]'", without.stderr


def test_a_run_on_object_storage(s3_server, tmp_path):
    from shardstep.checkpoints.storage import ObjectPath
    from tests.objectstore import BUCKET

    url = ObjectPath(f"s3://{BUCKET}/runs/{uuid.uuid4().hex}")
    _run(url, 10, checkpoint_every=5)
    _run(url, 20, checkpoint_every=5)
    figure = build_figure(str(url))
    assert _marked(figure.axes[0], "checkpoints") == [5, 10, 15, 20]
    assert _marked(figure.axes[0], "starts") == [10]
    assert [line.get_label() for line in _data_lines(_panels(figure)["learning rate"])] == [
        "other: 0.weight, 2.weight", "*.bias: 0.bias, 2.bias"]
    assert figure.get_suptitle().splitlines()[0] == url.name
