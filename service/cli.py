"""The ``shardstep`` command line.

    shardstep run JOB.toml [--set KEY=VALUE ...] [--run-dir DIR] [--shards N] [--workers W] [--backend ray|inline] [--address ADDR]
    shardstep resume RUN_DIR [--steps N] [--shards M] [--workers W] [--backend ...] [--address ADDR]
    shardstep inspect RUN_DIR_or_CHECKPOINT
    shardstep export RUN_DIR --out FILE [--step K]
    shardstep plot RUN_DIR [--out PNG]
    shardstep submit JOB.toml [--address URL] [--shards N] [--workers W] [--run-dir DIR] [--no-wait|--follow]
    shardstep jobs list | status ID | logs ID [--follow] | stop ID   [--address URL]

Exit codes: 0 done; 1 the run failed (an actor error, more failures than max_failures, a
non-finite loss); 2 bad input (a job file that does not validate, a directory that is not a
run, no checkpoint to resume, a cluster that cannot be reached or has no such job). A
submitted job that was watched to its end gives 0 when it succeeded, 1 when it failed or was
stopped. Errors are one message on stderr, never a traceback; an exception from the job's
own code (a task, a schedule function) or from shardstep itself is exit code 1 with its one
line first and its traceback after it.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

from shardstep.service import __version__
from shardstep.workers.runtime import use_thread_environment

EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the command line: exit code 2."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a run: the message names the run directory to resume."""

    def __init__(self, run_dir: str):
        super().__init__(run_dir)
        self.run_dir = run_dir


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from shardstep.service.jobspec import URL_SCHEME

    for name in ("run_dir", "path", "out", "job"):
        value = getattr(args, name, None)
        if not (isinstance(value, str) and URL_SCHEME.match(value)):
            continue
        what = "--run-dir" if name == "run_dir" and args.command in ("run", "submit") else name.upper()
        if name in ("run_dir", "path") or (name == "out" and args.command == "export"):
            # run directories, checkpoints and exports may be on object storage
            from shardstep.checkpoints.errors import CheckpointError
            from shardstep.checkpoints.storage import ObjectPath

            try:
                ObjectPath(value)
                continue
            except CheckpointError as error:
                print(f"shardstep {args.command}: error: {what} {error}", file=sys.stderr)
                return EXIT_USAGE
        print(f"shardstep {args.command}: error: {what} {value!r} is a URL; it must be a file system path "
              f"(run directories, checkpoints and exports may be on object storage; job files and plots not)",
              file=sys.stderr)
        return EXIT_USAGE
    from shardstep.checkpoints import CheckpointError
    from shardstep.service.errors import ShardstepError, UnsuitableClusterError
    from shardstep.service.jobspec import JobSpecError

    if args.command in ("run", "resume"):
        # `jobs stop` and schedulers end a driver with SIGTERM: stop like Ctrl-C, so the actors
        # end and a half-written checkpoint is discarded
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.handler(args)
    except (UsageError, JobSpecError, CheckpointError, UnsuitableClusterError) as error:
        print(f"shardstep {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except ShardstepError as error:
        print(f"shardstep {args.command}: the run failed: {error}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as error:  # the job's own code (a task, a schedule function) or a bug: the line that
        # matters first, the traceback after it
        import traceback

        print(f"shardstep {args.command}: the run failed: {type(error).__name__}: {error}\n"
              + "".join(traceback.format_exception(error)).rstrip(), file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as interruption:
        run_dir = getattr(interruption, "run_dir", None)
        if run_dir is None:  # before a run had begun (the job was still being read and checked)
            print(f"shardstep {args.command}: interrupted before the run started; nothing was written", file=sys.stderr)
        else:
            print(f"shardstep {args.command}: interrupted; committed checkpoints are kept "
                  f"(continue with `shardstep resume {run_dir}`)", file=sys.stderr)
        return 130


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


SET_HELP = ("a job key, dotted as in the job file, and a TOML value (training.steps=300, optimizer.args.lr=1e-3, "
            "resources.backend=inline); repeatable, checked like the file")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardstep", description="Sharded-optimizer training on Ray.")
    parser.add_argument("--version", action="version", version=f"shardstep {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def resources(command: argparse.ArgumentParser) -> None:
        command.add_argument("--shards", type=_positive, help="number of optimizer shards (overrides the job)")
        command.add_argument("--workers", type=_positive, help="number of gradient workers (overrides the job)")
        command.add_argument("--backend", choices=("ray", "inline"), help="where the actors run")
        command.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local instance)")
        command.add_argument("--quiet", action="store_true", help="print only the summary")
        command.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)

    run = commands.add_parser("run", help="run a job file (resumes its run directory if it has checkpoints)")
    run.add_argument("job", help="the job's TOML file")
    run.add_argument("--run-dir", help="the run directory (overrides the job's run_dir)")
    resources(run)
    run.set_defaults(handler=_run)

    resume = commands.add_parser("resume", help="continue a run from its latest committed checkpoint")
    resume.add_argument("run_dir", help="the run directory")
    resume.add_argument("--steps", type=_positive_int, metavar="N",
                        help="train to step N in all (more than the run planned: extend a finished run)")
    resources(resume)
    resume.set_defaults(handler=_resume)

    inspect = commands.add_parser("inspect", help="describe a run directory or one checkpoint")
    inspect.add_argument("path", help="a run directory or a step-<k> checkpoint directory")
    inspect.set_defaults(handler=_inspect)

    plot = commands.add_parser("plot", help="draw loss, evaluation metrics and learning rates as a PNG")
    plot.add_argument("run_dir", help="the run directory")
    plot.add_argument("--out", help="the PNG to write (default: RUN_DIR/metrics.png)")
    plot.set_defaults(handler=_plot)

    export = commands.add_parser("export", help="write consolidated parameters and a torch-layout optimizer state_dict")
    export.add_argument("run_dir", help="the run directory")
    export.add_argument("--out", required=True, help="the file to write")
    export.add_argument("--format", choices=("native", "torch", "safetensors"),
                        help="native (checkpoints.load), torch (torch.load, weights_only) or safetensors "
                             "(parameters only); default: from the suffix (.pt/.pth torch, .safetensors "
                             "safetensors), else native")
    export.add_argument("--step", type=_non_negative, help="the checkpoint step (default: the latest, or the best when "
                        "the job sets checkpoint.load_best)")
    export.set_defaults(handler=_export)
    _cluster_commands(commands)
    return parser


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}; got {value}")
        return value

    return parse


_positive = _int_at_least(1)
_non_negative = _int_at_least(0)


# ---------------------------------------------------------------------------------------
# run / resume


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    changes = {key: getattr(args, key) for key in ("shards", "workers", "backend", "address")
               if getattr(args, key) is not None}
    if changes.get("backend") == "inline" and "address" not in changes:
        changes["address"] = None  # a cluster address means nothing to the inline backend
    return changes


def _run(args: argparse.Namespace) -> int:
    from shardstep.service.jobspec import load_job

    spec = load_job(args.job)
    changes = {**_assigned(spec, args.set), **_overrides(args)}
    if args.run_dir is not None:
        changes["run_dir"] = _absolute(args.run_dir)
    if changes:
        spec = spec.replace(**changes)
    return _train(spec, args.quiet)


def _resume(args: argparse.Namespace) -> int:
    from shardstep.checkpoints import latest_step
    from shardstep.service.coordinator import CHECKPOINT_DIR, JOB_FILE
    from shardstep.service.jobspec import JobSpec
    from shardstep.service.run_dir import _read_text, run_location

    run_dir = run_location(args.run_dir)
    job_path = run_dir / JOB_FILE
    if not job_path.is_file():
        raise UsageError(f"{run_dir} is not a run directory (it has no {JOB_FILE}); start a run with "
                         f"`shardstep run JOB.toml`")
    if latest_step(run_dir / CHECKPOINT_DIR) is None:
        raise UsageError(f"{run_dir} has no committed checkpoint to resume from; start it again with "
                         f"`shardstep run JOB.toml`")
    try:
        saved = json.loads(_read_text(job_path))["job"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as error:
        raise UsageError(f"{job_path} is unreadable or damaged: {type(error).__name__}: {error}") from None
    spec = JobSpec.from_dict(saved)
    changes = {**_assigned(spec, args.set), "run_dir": _absolute(args.run_dir), **_overrides(args)}
    if args.steps is not None:
        changes["steps"] = args.steps
    return _train(spec.replace(**changes), args.quiet)


def _assigned(spec: Any, assignments: list[str]) -> dict[str, Any]:
    """The job fields ``--set`` gives (a run directory made absolute, as --run-dir's)."""
    from shardstep.service.jobspec import assigned_fields

    fields = assigned_fields(spec, assignments)
    if isinstance(fields.get("run_dir"), str):
        fields["run_dir"] = _absolute(fields["run_dir"])
    return fields


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1; got {text!r}")
    return value


def _complete(spec: Any, trained: tuple[int, int] | None) -> str | None:
    """Why a run that has trained to ``trained`` (step, epoch) has nothing left to train, or
    None when it has."""
    if trained is None:
        return None
    step, epoch = trained
    if spec.steps is not None and step >= spec.steps:
        return f"training.steps = {spec.steps}"
    if spec.steps is None and spec.epochs is not None and epoch >= spec.epochs:
        return f"training.epochs = {spec.epochs}"
    return None


def _print_init(init: dict[str, Any]) -> None:
    """What a fine-tuning run loads, said before it trains."""
    print(f"initialized from {init['from']}: loaded {', '.join(init['loaded'])}; new "
          f"{', '.join(init['new']) or 'none'}"
          + (f"; optimizer state of {len(init['state'])} parameters" if init['optimizer_state'] else ""),
          flush=True)


def _intact_at(run_dir: Any, trained: tuple[int, int] | None) -> bool:
    """Whether the run directory's newest intact checkpoint (every file verified) is the one
    at ``trained``: a damaged newest one is left to the run, which falls back and says so."""
    if trained is None:
        return False
    from shardstep.checkpoints.run import open_newest_intact
    from shardstep.service.coordinator import CHECKPOINT_DIR
    from shardstep.service.run_dir import position

    checkpoint, _ = open_newest_intact(run_dir / CHECKPOINT_DIR)
    if checkpoint is None:
        return False
    with checkpoint:
        return position(checkpoint) == trained


def _planned_steps(spec: Any, task: Any) -> int | None:
    """The steps a run takes in all: its steps, or its epochs' batches, whichever ends first."""
    counts = [] if spec.steps is None else [spec.steps]
    if spec.epochs is not None:
        counts.append(spec.epochs * task.num_batches(spec.batch_size))
    return min(counts) if counts else None


def _absolute(run_dir: str) -> str:
    """A run directory as a job names it: a URL as it is, a path made absolute."""
    from shardstep.service.run_dir import run_location

    where = run_location(run_dir)
    return str(where.resolve()) if isinstance(where, Path) else str(where)


def _train(spec: Any, quiet: bool) -> int:
    try:
        return _train_run(spec, quiet)
    except KeyboardInterrupt:  # from here on the message names the run directory to resume
        raise Interrupted(spec.run_dir) from None


def _train_run(spec: Any, quiet: bool) -> int:
    from shardstep.checkpoints import latest_step
    from shardstep.service.coordinator import CHECKPOINT_DIR, Coordinator
    from shardstep.service.run_dir import check_saved_job, run_location, trained_position

    start = time.perf_counter()
    run_dir = run_location(spec.run_dir)
    trained = trained_position(run_dir)
    try:
        check_saved_job(run_dir, spec.to_dict(), trained)
    except ValueError as error:
        raise UsageError(str(error)) from error
    complete = _complete(spec, trained)
    if complete is not None and not _intact_at(run_dir, trained):
        complete = None  # the newest checkpoint is damaged: the run falls back to an older one
    if complete is not None:  # nothing to train: no Ray, no actors, nothing written
        print(f"shardstep: {spec.run_dir} is already complete at step {trained[0]} ({complete}); nothing to train. "
              f"Train it further with `shardstep resume {spec.run_dir} --steps N` (N > {trained[0]})", flush=True)
        return 0
    resumed = latest_step(run_dir / CHECKPOINT_DIR)
    if not quiet:
        where = f"resuming from step {resumed}" if resumed is not None else "starting"
        print(f"shardstep: {spec.task} with {spec.optimizer}, {spec.shards} shard(s), {spec.workers} "
              f"worker(s), {spec.backend} backend; {where}; run directory {spec.run_dir}", flush=True)
    from shardstep.service.progress import Progress

    progress: Progress | None = None

    def event(text: str) -> None:
        # what the run waits for and why it restarts is said even with --quiet (on stderr)
        if progress is not None:
            progress.event(text)
        else:
            print(f"shardstep: {text}", file=sys.stderr, flush=True)

    def step(record: dict[str, Any]) -> None:
        if progress is not None:
            progress.update(record)

    try:
        coordinator = Coordinator(spec, on_step=None if quiet else step, on_event=event,
                                  on_init=None if quiet else _print_init)
        if not quiet:  # the task is built: an epoch-only job's step count is known
            progress = Progress(_planned_steps(spec, coordinator.task), start_step=resumed or 0)
        result = coordinator.run()
    except (ValueError, TypeError) as error:
        # configuration errors the spec could not see (e.g. a checkpoint from another job)
        raise UsageError(str(error)) from error
    finally:
        if progress is not None:
            progress.close()
    seconds = time.perf_counter() - start
    metrics = "  ".join(f"{k} {v:.6g}" for k, v in result.metrics.items() if math.isfinite(v))
    moved = {"shared_memory": " (actors exchanged data through shared memory)",
             "object_store": " (actors exchanged data through Ray's object store)"}.get(result.transport, "")
    cluster = "" if result.cluster == "inline" else f" on {result.cluster}"
    print(f"done: {result.steps} steps (epoch {result.epoch}) in {seconds:.1f} s{cluster}{moved}; {metrics}; "
          f"checkpoints at steps {result.checkpoint_steps[-5:]} in {run_dir / CHECKPOINT_DIR}"
          + (f"; recovered from {result.failures} failure(s)" if result.failures else "")
          + (f"; {result.stopped_early}" if result.stopped_early else ""), flush=True)
    if result.best_step is not None:
        best = "  ".join(f"{k} {v:.6g}" for k, v in (result.best_metrics or {}).items() if math.isfinite(v))
        print(f"result: the best checkpoint, step {result.best_step} by {spec.keep_metric} ({spec.keep_mode}): {best}; "
              f"export and init.from take it", flush=True)
    return 0


# ---------------------------------------------------------------------------------------
# inspect / export


def _checkpoint_of(path: Path, step: int | None = None, damaged: list | None = None):
    """The checkpoint a command reads, verified: ``path`` itself when it is a step
    directory, else ``step`` of the run directory, or its newest intact step (the damaged
    newer ones are appended to ``damaged`` as ``(step, reason)``)."""
    from shardstep.checkpoints import CheckpointError, RunCheckpoint, open_checkpoint, open_intact
    from shardstep.checkpoints.run import MANIFEST
    from shardstep.service.coordinator import CHECKPOINT_DIR

    if (path / MANIFEST).is_file():
        checkpoint = RunCheckpoint(path)
    else:
        root = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path
        if not root.is_dir():
            raise UsageError(f"{path} is neither a run directory nor a checkpoint directory")
        if step is None:
            checkpoint, found = open_intact(root)
            if damaged is not None:
                damaged.extend(found)
            if checkpoint is None:
                raise CheckpointError(f"no committed checkpoint in {root}")
            return checkpoint  # verified, its files open
        checkpoint = open_checkpoint(root, step)
    try:
        checkpoint.verify()
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint


# a live run's retention may delete the step a reader chose while it reads; it reads the
# newest again this many times
READ_ATTEMPTS = 5


def _reading(path: Path, step: int | None, body: Any) -> Any:
    """``body(checkpoint, damaged)`` on the checkpoint :func:`_checkpoint_of` chooses. When the
    read fails and the run directory's committed steps changed meanwhile (a live run
    committed and retention deleted what was chosen), it is read again from the newest."""
    from shardstep.checkpoints import CheckpointError, committed_steps
    from shardstep.service.coordinator import CHECKPOINT_DIR

    root = path / CHECKPOINT_DIR if (path / CHECKPOINT_DIR).is_dir() else path

    def listing() -> list[int]:
        try:
            return committed_steps(root)
        except CheckpointError:
            return []

    for attempt in range(READ_ATTEMPTS):
        before = listing()
        damaged: list[tuple[int, str]] = []
        try:
            with _checkpoint_of(path, step, damaged) as checkpoint:
                return body(checkpoint, damaged)
        except (CheckpointError, OSError):
            if step is not None or attempt == READ_ATTEMPTS - 1 or listing() == before:
                raise


def _inspect(args: argparse.Namespace) -> int:
    from shardstep.checkpoints.storage import location

    path = location(args.path)
    print("\n".join(_reading(path, None, lambda checkpoint, damaged: _description(path, checkpoint, damaged))))
    return 0


def _description(path: Path, checkpoint: Any, damaged: list[tuple[int, str]]) -> list[str]:
    from shardstep.checkpoints import committed_steps
    from shardstep.service.coordinator import CHECKPOINT_DIR

    lines = [f"checkpoint  {checkpoint.directory}",
             f"run         {checkpoint.run_id}",
             f"step        {checkpoint.step}",
             f"shards      {checkpoint.layout.num_shards}",
             f"verified    every chunk of its {checkpoint.layout.num_shards} shard file(s)"]
    if (path / CHECKPOINT_DIR).is_dir():
        lines.append(f"committed   steps {committed_steps(path / CHECKPOINT_DIR)}")
    lines += [f"damaged     step {step}: {reason}" for step, reason in damaged]
    if checkpoint.metrics:
        lines.append("metrics     " + "  ".join(f"{k} {v:.6g}" for k, v in checkpoint.metrics.items()))
    coordinator = (checkpoint.extra or {}).get("coordinator") if isinstance(checkpoint.extra, dict) else None
    if coordinator:
        lines.append(f"position    epoch {coordinator['epoch']}, batch {coordinator['batch']}")
    lines.append("")
    rows = [("parameter", "shape", "dtype", "elements", "group", "state")]
    group_of = {name: i for i, g in enumerate(checkpoint.param_groups) for name in g["params"]}
    total = 0
    for spec in checkpoint.layout.params:
        state = ", ".join(sorted(checkpoint.state_schema.get(spec.name, {})))
        rows.append((spec.name, "x".join(map(str, spec.shape)) or "()", spec.dtype, f"{spec.numel:,}",
                     str(group_of.get(spec.name, "-")), state or "-"))
        total += spec.numel
    lines += _table(rows)
    lines.append(f"total {total:,} elements")
    lines.append("")
    for index, group in enumerate(checkpoint.param_groups):
        hyper = ", ".join(f"{k}={v}" for k, v in group.items() if k != "params" and v is not None)
        lines.append(f"group {index}: {hyper}")
    return lines


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def _plot(args: argparse.Namespace) -> int:
    from shardstep.checkpoints.storage import ObjectPath, location
    from shardstep.service.plot import PlotError, plot_run

    where = location(args.run_dir)
    # a run on object storage is plotted into the current directory, named after the run
    default = Path(f"{where.name}-metrics.png") if isinstance(where, ObjectPath) else where / "metrics.png"
    out = Path(args.out) if args.out else default
    try:
        written = plot_run(args.run_dir, out)
    except PlotError as error:
        raise UsageError(str(error)) from None
    print(f"wrote {written}")
    return 0


def _result_step(run_dir: Any) -> int | None:
    """The best step of a run whose job sets checkpoint.load_best (None: the newest)."""
    from shardstep.service.run_dir import RunDirectoryError, result_step

    try:
        return result_step(run_dir)
    except RunDirectoryError:
        return None  # no readable job.json: the newest intact step, as for any directory


def _export(args: argparse.Namespace) -> int:
    from shardstep.checkpoints.storage import ObjectPath, location

    run_dir = location(args.run_dir)
    out = location(args.out)
    if not isinstance(out, ObjectPath) and out.exists() and out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name")
    from shardstep.checkpoints.torch_files import TorchMissingError, require_torch
    from shardstep.service.export import TORCH_EXPORT, export_checkpoint, format_for

    def export(checkpoint: Any, damaged: list[tuple[int, str]]) -> int:
        export_checkpoint(checkpoint, out, format_for(str(out), args.format))
        for step, reason in damaged:
            print(f"shardstep export: warning: step {step} is damaged ({reason}); exported step {checkpoint.step}, "
                  f"the newest intact one", file=sys.stderr)
        return checkpoint.step

    chosen = args.step if args.step is not None else _result_step(run_dir)
    kind = format_for(str(out), args.format)
    if kind == "torch":
        try:
            require_torch(TORCH_EXPORT)
        except TorchMissingError as error:
            raise UsageError(str(error)) from None
    try:
        step = _reading(run_dir, chosen, export)
    except OSError as error:
        raise UsageError(f"cannot write {out}: {error.strerror or error}") from None
    size = out.size() if isinstance(out, ObjectPath) else out.stat().st_size
    best = " (the run's best checkpoint: its job sets checkpoint.load_best)" if args.step is None and chosen else ""
    what, how = {
        "native": ("parameters and optimizer state_dict", f"checkpoints.load({str(out)!r})"),
        "torch": ("parameters and optimizer state_dict, torch format", f"torch.load({str(out)!r}, weights_only=True)"),
        "safetensors": ("parameters, safetensors format", f"safetensors.numpy.load_file({str(out)!r})"),
    }[kind]
    print(f"wrote {out} ({size:,} bytes): {what} of step {step}{best}; load with {how}")
    return 0


# ---------------------------------------------------------------------------------------
# submit / jobs: a Ray cluster's job server (service/submit.py, docs/cluster.md)


def _cluster_commands(commands: Any) -> None:
    address_help = ("the cluster: http://HEAD:8265 (its job server), ray://HEAD:10001, HEAD:6379 (its GCS) or "
                    "auto; default RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else a cluster started on this machine")

    submit = commands.add_parser("submit", help="run a job file on a Ray cluster through Ray Jobs (resubmitting "
                                 "resumes from the run directory's latest checkpoint)")
    submit.add_argument("job", help="the job's TOML file; its directory is uploaded with it")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--run-dir", help="the run directory as the cluster's nodes see it: storage they share "
                        "(default: the job's run_dir, relative to the job file)")
    submit.add_argument("--shards", type=_positive, help="number of optimizer shards (overrides the job)")
    submit.add_argument("--workers", type=_positive, help="number of gradient workers (overrides the job)")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    watch = submit.add_mutually_exclusive_group()
    watch.add_argument("--no-wait", dest="watch", action="store_const", const="no-wait",
                       help="return once the job is submitted")
    watch.add_argument("--follow", dest="watch", action="store_const", const="follow",
                       help="stream the job's output until it ends")
    submit.set_defaults(handler=_submit, watch="wait")

    jobs = commands.add_parser("jobs", help="list, inspect, follow or stop the jobs of a Ray cluster")
    actions = jobs.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="every submitted job with its status and run directory")
    listing.set_defaults(handler=_jobs_list)
    status = actions.add_parser("status", help="one job's status, times, command and latest checkpoint")
    status.set_defaults(handler=_jobs_status)
    logs = actions.add_parser("logs", help="one job's output")
    logs.add_argument("--follow", action="store_true", help="keep streaming until the job ends")
    logs.set_defaults(handler=_jobs_logs)
    stop = actions.add_parser("stop", help="stop a job and wait until it has ended (its checkpoints are kept)")
    stop.set_defaults(handler=_jobs_stop)
    for action in (status, logs, stop):
        action.add_argument("job_id", metavar="ID", help="the job's submission id (shardstep jobs list)")
    for action in (listing, status, logs, stop):
        action.add_argument("--address", help=address_help)


def _on_cluster(command: Any) -> int:
    """Run a cluster command; its ClusterError is bad input (exit code 2)."""
    from shardstep.service.submit import ClusterError

    try:
        return command()
    except ClusterError as error:
        raise UsageError(str(error)) from None


def _submit(args: argparse.Namespace) -> int:
    from shardstep.service import submit

    return _on_cluster(lambda: submit.submit(args.job, address=args.address, run_dir=args.run_dir,
                                             shards=args.shards, workers=args.workers, sets=args.set,
                                             mode=args.watch,
                                             out=sys.stdout, err=sys.stderr))


def _jobs_list(args: argparse.Namespace) -> int:
    from shardstep.service import submit

    return _on_cluster(lambda: submit.list_jobs(address=args.address, out=sys.stdout))


def _jobs_status(args: argparse.Namespace) -> int:
    from shardstep.service import submit

    return _on_cluster(lambda: submit.job_status(args.job_id, address=args.address, out=sys.stdout))


def _jobs_logs(args: argparse.Namespace) -> int:
    from shardstep.service import submit

    return _on_cluster(lambda: submit.job_logs(args.job_id, address=args.address, follow=args.follow,
                                               out=sys.stdout, err=sys.stderr))


def _jobs_stop(args: argparse.Namespace) -> int:
    from shardstep.service import submit

    return _on_cluster(lambda: submit.stop_job(args.job_id, address=args.address, out=sys.stdout, err=sys.stderr))


def entry() -> int:
    """The ``shardstep`` command (and ``python -m shardstep.service.cli``): :func:`main` in a
    process of its own, whose threads first get shardstep's thread environment (before
    anything loads an OpenMP runtime: the inline backend computes in this process)."""
    use_thread_environment()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
