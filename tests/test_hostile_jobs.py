"""Hostile and broken job files through the real command line, in-process: each is refused
with exit code 2 and one line naming the key or the path, without a traceback, a hang or a
run directory, and without running any code the job names.

Every case edits one small valid job (``backend = "inline"``, so nothing could start Ray
even if a check let a case through) or makes a job file that is not one (a FIFO, a device, a
directory, too big). Module-wide time limit: a case that blocked (a FIFO opened for reading
waits for a writer) fails instead of hanging the suite.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from shardstep.service.cli import main

pytestmark = pytest.mark.timeout(60)

RUN_DIR = "@RUN_DIR@"  # replaced by the case's run directory, inside tmp_path

SECTIONS = {
    "top": f'run_dir = "{RUN_DIR}"',
    "task": '[task]\nname = "least-squares"\n[task.args]\nrows = 16\ncols = 4',
    "optimizer": '[optimizer]\nname = "sgd"\n[optimizer.args]\nlr = 0.1',
    "training": "[training]\nsteps = 2",
    "resources": '[resources]\nbackend = "inline"',
}
RATINGS = '[task]\nname = "ratings"\n[task.args]\nusers = 20\nitems = 10\ndim = 2'


def job(extra: str = "", **sections: str | None) -> str:
    """The valid job with whole sections replaced (None leaves one out) and ``extra`` TOML
    appended at the end."""
    parts = {**SECTIONS, **sections}
    return "\n".join(text for text in parts.values() if text is not None) + "\n" + extra + "\n"


def top(line: str) -> str:
    """The top section with one more top-level line (top-level keys precede every table)."""
    return f"{SECTIONS['top']}\n{line}"


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


# a case is (id, the job file's text or a function making the file, fragments of the message)
Maker = Callable[[Path], Path]


def fifo(directory: Path) -> Path:
    path = directory / "job.toml"
    os.mkfifo(path)
    return path


def dev_zero(directory: Path) -> Path:
    return Path("/dev/zero")


def link_to_dev_zero(directory: Path) -> Path:
    path = directory / "job.toml"
    path.symlink_to("/dev/zero")
    return path


def directory_as_job(directory: Path) -> Path:
    path = directory / "job.toml"
    path.mkdir()
    return path


def oversized(directory: Path) -> Path:
    path = directory / "job.toml"
    text = job()
    path.write_text(text + "#" * (1024 * 1024 + 1 - len(text) - 1) + "\n")
    return path


def not_utf8(directory: Path) -> Path:
    path = directory / "job.toml"
    path.write_bytes(job().encode().replace(b"least-squares", b"least-squ\xe9res"))
    return path


def missing_with_newline(directory: Path) -> Path:
    return directory / "no\njob.toml"


def symlink_loop_run_dir(directory: Path) -> Path:
    (directory / "loop").symlink_to(directory / "loop")
    path = directory / "job.toml"
    path.write_text(job(top=f'run_dir = "{directory / "loop" / "run"}"'))
    return path


def exits_at_import(directory: Path) -> Path:
    """A schedule function in a module whose import raises SystemExit (the directory is on
    sys.path for these cases)."""
    (directory / "exiting_module.py").write_text("raise SystemExit(0)\n")
    path = directory / "job.toml"
    path.write_text(job('[[schedulers]]\nname = "LambdaLR"\n[schedulers.args]\nlr_lambda = "exiting_module:f"'))
    return path


def task_exits_at_import(directory: Path) -> Path:
    """A task in a module whose import raises SystemExit."""
    (directory / "exiting_task.py").write_text("raise SystemExit(3)\n")
    path = directory / "job.toml"
    path.write_text(job(task='[task]\nname = "exiting_task:Task"'))
    return path


def scheduler(name: str, args: str) -> str:
    return f'[[schedulers]]\nname = "{name}"\n[schedulers.args]\n{args}'


DEEP_KEY = ".".join(["a"] * 40_000)

CASES: list[tuple[str, str | Maker, list[str]]] = [
    # -- a table or key of the wrong type ------------------------------------------------
    ("task not a table", job(task=None, top=top("task = 5")),
     ["task must be a table ([task]); got 5 (integer)"]),
    ("optimizer not a table", job(optimizer=None, top=top('optimizer = "adam"')),
     ["optimizer must be a table ([optimizer]); got 'adam' (string)"]),
    ("training not a table", job(training=None, top=top("training = [1]")),
     ["training must be a table ([training]); got [1] (array)"]),
    ("resources not a table", job(resources=None, top=top('resources = "inline"')),
     ["resources must be a table ([resources]); got 'inline' (string)"]),
    ("checkpoint not a table", job(top=top("checkpoint = 3")), ["checkpoint must be a table ([checkpoint]); got 3"]),
    ("init not a table", job(top=top('init = "runs/x"')), ["init must be a table ([init]); got 'runs/x' (string)"]),
    ("param_groups not an array", job(top=top("param_groups = 3")),
     ["param_groups must be an array of tables", "got 3 (integer)"]),
    ("param group not a table", job(top=top("param_groups = [1]")),
     ["param_groups[0] must be a table (pattern plus hyperparameters); got 1 (integer)"]),
    ("schedulers not an array", job(top=top('schedulers = "StepLR"')),
     ["schedulers must be an array of tables ([[schedulers]]); got 'StepLR' (string)"]),
    ("scheduler not a table", job(top=top("schedulers = [1]")),
     ["schedulers[0] must be a table ([[schedulers]]); got 1 (integer)"]),
    ("frozen not an array", job(top=top('frozen = "weight"')), ["frozen must be an array of glob patterns"]),
    ("run_dir not a string", job(top="run_dir = 5"), ["run_dir must be a directory path; got 5 (integer)"]),
    ("task name not a string", job(task="[task]\nname = 5"), ["task.name must be one of", "got 5 (integer)"]),
    ("task args not a table", job(task='[task]\nname = "least-squares"\nargs = [1]'),
     ["task.args must be a table of arguments; got [1] (array)"]),
    ("optimizer args not a table", job(optimizer='[optimizer]\nname = "sgd"\nargs = "lr=1"'),
     ["optimizer.args must be a table of arguments; got 'lr=1' (string)"]),
    ("scheduler args not a table", job('[[schedulers]]\nname = "StepLR"\nargs = 2'),
     ["schedulers[0].args must be a table of arguments; got 2 (integer)"]),
    ("fractional steps", job(training="[training]\nsteps = 2.5"),
     ["training.steps must be an integer >= 0; got 2.5 (float)"]),
    ("steps as a date", job(training="[training]\nsteps = 1979-05-27"),
     ["training.steps must be an integer >= 0; got datetime.date(1979, 5, 27) (date)"]),
    ("boolean batch size", job(training="[training]\nsteps = 2\nbatch_size = true"),
     ["training.batch_size must be an integer >= 1; got True (boolean)"]),
    ("seed as a string", job(training='[training]\nsteps = 2\nseed = "7"'),
     ["training.seed must be an integer >= 0; got '7' (string)"]),
    ("clip norm as a string", job(training='[training]\nsteps = 2\nclip_grad_norm = "1"'),
     ["training.clip_grad_norm must be a finite number > 0; got '1' (string)"]),
    ("nonfinite policy", job(training='[training]\nsteps = 2\nnonfinite = "ignore"'),
     ["training.nonfinite must be one of 'stop', 'skip'; got 'ignore'"]),
    ("max_skipped_steps zero", job(training='[training]\nsteps = 2\nnonfinite = "skip"\nmax_skipped_steps = 0'),
     ["training.max_skipped_steps must be an integer >= 1; got 0"]),
    ("max_skipped_steps fractional", job(training="[training]\nsteps = 2\nmax_skipped_steps = 2.5"),
     ["training.max_skipped_steps must be an integer >= 1; got 2.5 (float)"]),
    ("checkpoint async as a string", job('[checkpoint]\nasync = "yes"'),
     ["checkpoint.async must be true or false; got 'yes' (string)"]),
    ("resource amount as a string", job(resources='[resources]\nbackend = "inline"\nworker_cpus = "2"'),
     ["resources.worker_cpus must be a finite number >= 0; got '2' (string)"]),
    # -- unknown keys ---------------------------------------------------------------------
    ("unknown top-level key", job(top=top("trainig = 3")), ["unknown key trainig (did you mean 'training'?)"]),
    ("unknown training key", job(training="[training]\nstep = 2"), ["unknown key training.step"]),
    ("unknown key with a newline", job(top=top('"bad\\nkey" = 1')),
     ['unknown key "bad\\nkey"; allowed at the top level']),
    ("unknown optimizer argument", job(optimizer='[optimizer]\nname = "sgd"\n[optimizer.args]\nlr = 0.1\nbetaz = 1'),
     ["optimizer.args: optimizer SGD got unknown argument 'betaz'"]),
    ("unknown task argument", job(task='[task]\nname = "least-squares"\n[task.args]\nrowz = 16'),
     ["task.args: task 'least-squares' got unknown argument 'rowz'"]),
    ("unknown scheduler key", job('[[schedulers]]\nname = "StepLR"\nevery = 2'), ["unknown key schedulers[0].every"]),
    ("unknown init key", job('[init]\nfrom = "elsewhere"\nstpe = 2'), ["unknown key init.stpe"]),
    ("no task", job(task=None), ["[task] is required"]),
    ("no steps or epochs", job(training="[training]\nbatch_size = 2"), ["training.steps or training.epochs"]),
    # -- out of range ---------------------------------------------------------------------
    ("negative steps", job(training="[training]\nsteps = -1"), ["training.steps must be an integer >= 0; got -1"]),
    ("zero shards", job(resources='[resources]\nbackend = "inline"\nshards = 0'),
     ["resources.shards must be an integer >= 1; got 0"]),
    ("workers past int64", job(resources='[resources]\nbackend = "inline"\nworkers = 18446744073709551616'),
     ["resources.workers must be an integer from 1 to 9223372036854775807 (int64); got 18446744073709551616"]),
    ("optimizer argument past int64", job(optimizer='[optimizer]\nname = "sgd"\n[optimizer.args]\nlr = '
                                                    "100000000000000000000"),
     ["optimizer.args.lr must be an integer from -9223372036854775808 to 9223372036854775807"]),
    ("negative learning rate", job(optimizer='[optimizer]\nname = "sgd"\n[optimizer.args]\nlr = -1'),
     ["optimizer.args: lr must be >= 0; got -1"]),
    ("unknown backend", job(resources='[resources]\nbackend = "cuda"'),
     ["resources.backend must be one of 'ray', 'inline'; got 'cuda'"]),
    ("keep_mode without keep_best", job('[checkpoint]\nmode = "max"'), ["checkpoint.mode applies to keep_best"]),
    # -- non-finite numbers ---------------------------------------------------------------
    ("infinite lr", job(optimizer='[optimizer]\nname = "sgd"\n[optimizer.args]\nlr = inf'),
     ["optimizer.args.lr must be a finite number; got inf"]),
    ("negative infinite lr", job(optimizer='[optimizer]\nname = "adam"\n[optimizer.args]\nlr = -inf'),
     ["optimizer.args.lr must be a finite number; got -inf"]),
    ("NaN lr", job(optimizer='[optimizer]\nname = "sgd"\n[optimizer.args]\nlr = nan'),
     ["optimizer.args.lr must be a finite number; got nan"]),
    ("overflowing lr", job(optimizer='[optimizer]\nname = "sgd"\n[optimizer.args]\nlr = 1e400'),
     ["optimizer.args.lr must be a finite number; got inf"]),
    ("NaN beta", job(optimizer='[optimizer]\nname = "adam"\n[optimizer.args]\nbetas = [0.9, nan]'),
     ["optimizer.args.betas[1] must be a finite number; got nan"]),
    ("infinite momentum", job(optimizer='[optimizer]\nname = "sgd"\n[optimizer.args]\nlr = 0.1\nmomentum = inf'),
     ["optimizer.args.momentum must be a finite number; got inf"]),
    ("infinite group lr", job(top=top('param_groups = [{ pattern = "bias", lr = inf }]')),
     ["param_groups[0].lr must be a finite number; got inf"]),
    ("Rprop's smallest step infinite", job(optimizer='[optimizer]\nname = "rprop"\n[optimizer.args]\n'
                                                     "step_sizes = [inf, inf]"),
     ["optimizer.args.step_sizes[0] must be a finite number (+inf is allowed only at step_sizes[1]); got inf"]),
    ("infinite scheduler gamma", job(scheduler("StepLR", "step_size = 2\ngamma = inf")),
     ["schedulers[0].args.gamma must be a finite number; got inf"]),
    ("NaN in a child scheduler", job(scheduler("SequentialLR", "milestones = [2]\nschedulers = "
                                               '[["StepLR", { step_size = 1 }], ["ExponentialLR", { gamma = nan }]]')),
     ["schedulers[0].args.schedulers[1][1].gamma must be a finite number; got nan"]),
    ("infinite clip norm", job(training="[training]\nsteps = 2\nclip_grad_norm = inf"),
     ["training.clip_grad_norm must be a finite number > 0; got inf (float)"]),
    ("infinite start timeout", job(resources='[resources]\nbackend = "inline"\nstart_timeout = inf'),
     ["resources.start_timeout must be a finite number > 0; got inf (float)"]),
    ("NaN task argument", job(task=RATINGS + "\nnoise = nan", optimizer='[optimizer]\nname = "sparse_adam"'),
     ["task.args: noise must be a finite real number; got nan"]),
    # -- deep nesting ---------------------------------------------------------------------
    ("50,000-deep array", job(top=top("a = " + nested(50_000))),
     ["arrays or tables nest too deeply for the TOML reader; a job's values may nest at most 32 deep"]),
    ("deep inline tables in task args", job(task='[task]\nname = "least-squares"\n[task.args]\nrows = '
                                            + "{ a = " * 5000 + "1" + " }" * 5000),
     ["arrays or tables nest too deeply for the TOML reader"]),
    ("40-deep array in optimizer args", job(optimizer='[optimizer]\nname = "sgd"\n[optimizer.args]\nlr = 0.1\n'
                                                      "weights = " + nested(40)),
     ["optimizer.args.weights[0][0]", ("is an array nested 32 arrays and tables deep; a job's values may nest at "
                                       "most 32 deep")]),
    ("40-deep tables in scheduler args", job(scheduler("StepLR", "step_size = 2\nx = " + "{ a = " * 40 + "1"
                                                       + " }" * 40)),
     ["schedulers[0].args.x.a.a", "is a table nested 32 arrays and tables deep"]),
    ("40,000-part table header", job(f"[task.args.{DEEP_KEY}]\nx = 1"),
     ["line 15: a key path of more than 32 parts (task.args.a.a.a", "a job's tables nest at most 32 deep"]),
    ("40,000-part dotted key", job(top=top(f"{DEEP_KEY} = 1")),
     ["line 2: a key path of more than 32 parts"]),
    ("deeply nested run_dir", job(top="run_dir = " + nested(300, '"x"')),
     ["run_dir must be a directory path; got [[[[", "characters) (array)"]),
    # -- huge strings and numbers ---------------------------------------------------------
    ("huge backend string", job(resources=f'[resources]\nbackend = "{"x" * 500_000}"'),
     ["resources.backend must be one of 'ray', 'inline'; got 'xxxx", "... (500002 characters)"]),
    ("huge task name", job(task=f'[task]\nname = "{"y" * 500_000}"'), ["task.name: unknown task 'yyyy", "characters)"]),
    ("huge optimizer argument", job(optimizer=f'[optimizer]\nname = "sgd"\n[optimizer.args]\nlr = "{"z" * 500_000}"'),
     ["optimizer.args: lr must be a real number; got 'zzzz", "characters)"]),
    ("a 5,000-digit integer", job(training="[training]\nsteps = " + "9" * 5000),
     ["a TOML value cannot be read: Exceeds the limit (4300 digits) for integer string conversion"]),
    ("a 300-byte name in run_dir", job(top=f'run_dir = "{RUN_DIR}/{"n" * 300}"'),
     ["run_dir has a name of 300 bytes; a name in a path may be at most 255 bytes"]),
    ("a 6,000-byte run_dir", job(top=f'run_dir = "{RUN_DIR}/{"d/" * 3000}"'),
     ["run_dir is", "bytes long; a path may be at most 4096 bytes"]),
    # -- characters a path cannot hold ----------------------------------------------------
    ("NUL in run_dir", job(top=f'run_dir = "{RUN_DIR}\\u0000x"'),
     ["run_dir holds a NUL character (at index", "which no path can hold"]),
    ("NUL in init.from", job('[init]\nfrom = "source\\u0000run"'), ["init.from holds a NUL character (at index 6)"]),
    ("unknown user in run_dir", job(top='run_dir = "~no_such_user_of_shardstep/run"'),
     ["run_dir: cannot resolve '~no_such_user_of_shardstep/run'"]),
    ("run_dir through a symlink loop", symlink_loop_run_dir, ["run_dir: cannot resolve", "loop"]),
    ("init.from inside run_dir", job(f'[init]\nfrom = "{RUN_DIR}/checkpoints"'),
     ["init.from must be another run's checkpoint, outside this job's run_dir"]),
    # -- files that are not job files -----------------------------------------------------
    ("FIFO", fifo, ["cannot read job file", "job.toml: it is a FIFO (named pipe), not a regular file"]),
    ("/dev/zero", dev_zero, ["cannot read job file /dev/zero: it is a character device, not a regular file"]),
    ("symlink to /dev/zero", link_to_dev_zero, ["job.toml: it is a character device, not a regular file"]),
    ("directory", directory_as_job, ["job.toml: it is a directory, not a regular file"]),
    ("oversized", oversized, ["job.toml: it is 1048577 bytes; a job file may be at most 1048576 bytes (1 MiB)"]),
    ("not UTF-8", not_utf8, ["job.toml: a job file must be UTF-8 text; byte"]),
    ("missing, with a newline in its name", missing_with_newline, ["job file not found: '", "no\\njob.toml'"]),
    ("TOML syntax", job(training="[training]\nsteps = = 2"), ["TOML syntax error: ", "(at line"]),
    # -- optimizer and task gradients -----------------------------------------------------
    ("sparse_adam on dense gradients", job(optimizer='[optimizer]\nname = "sparse_adam"'),
     [("optimizer.name: SparseAdam takes only row-sparse gradients, but task 'least-squares' gives dense gradients "
       "(weight, bias); allowed with dense gradients: sgd, adagrad, rmsprop, adadelta, adam, adamw, adamax, nadam, "
       "radam, asgd, rprop, lbfgs")]),
    ("adam on row-sparse gradients", job(task=RATINGS, optimizer='[optimizer]\nname = "adam"'),
     [("optimizer.name: Adam takes only dense gradients, but task 'ratings' gives row-sparse gradients (user.weight, "
       "item.weight, user_bias.weight, item_bias.weight); allowed with row-sparse gradients: sgd, adagrad, "
       "sparse_adam")]),
    ("lbfgs on row-sparse gradients", job(task=RATINGS, optimizer='[optimizer]\nname = "LBFGS"'),
     ["optimizer.name: LBFGS takes only dense gradients, but task 'ratings' gives row-sparse gradients"]),
    # -- code named by the job ------------------------------------------------------------
    ("lr_lambda not callable", job(scheduler("LambdaLR", 'lr_lambda = "math:pi"')),
     ["schedulers[0].args.lr_lambda: lr_lambda reference 'math:pi' names a float, which is not callable"]),
    ("lr_lambda not importable", job(scheduler("LambdaLR", 'lr_lambda = "no_such_module_of_shardstep:f"')),
     ["schedulers[0].args.lr_lambda: lr_lambda reference 'no_such_module_of_shardstep:f': cannot import"]),
    ("lr_lambda without a module", job(scheduler("MultiplicativeLR", 'lr_lambda = "os.path"')),
     [("schedulers[0].args.lr_lambda: lr_lambda must be a callable or a 'package.module:function' reference; "
       "got 'os.path'")]),
    ("lr_lambda of no such attribute", job(scheduler("LambdaLR", 'lr_lambda = ["os:no_such_function"]')),
     ["schedulers[0].args.lr_lambda[0]: lr_lambda reference 'os:no_such_function': module 'os' has no attribute"]),
    ("lr_lambda that would exit the process", job(scheduler("LambdaLR", 'lr_lambda = "os:_exit"') + "\n"
                                                  + scheduler("StepLR", "step_size = 0")),
     ["schedulers[1].args: step_size must be a positive integer; got 0"]),
    ("lr_lambda that would raise SystemExit", job(scheduler("LambdaLR", 'lr_lambda = "sys:exit"')
                                                  + '\n[checkpoint]\nkeep_best = 1\nmetric = "rmse"'),
     ["checkpoint.metric must be 'loss' or a metric of task 'least-squares'"]),
    ("scale_fn that would exit the process", job(scheduler("CyclicLR", 'base_lr = 0.01\nmax_lr = 0.1\n'
                                                           'scale_fn = "os:_exit"\ncycle_momentum = false') + "\n"
                                                 + scheduler("ExponentialLR", "gamma = -1")),
     ["schedulers[1].args: gamma must be"]),
    ("a child's lr_lambda that would exit the process", job(scheduler(
        "ChainedScheduler", 'schedulers = [["LambdaLR", { lr_lambda = "os:_exit" }], ["StepLR", { step_size = -2 }]]')),
     ["schedulers[0].args: step_size must be a positive integer; got -2"]),
    ("lr_lambda whose module exits at import", exits_at_import,
     ["schedulers[0].args.lr_lambda: importing 'exiting_module:f' failed: SystemExit: 0"]),
    ("a function as the task", job(task='[task]\nname = "os:_exit"'),
     ["task.name: task 'os:_exit': '_exit' in 'os' is not a Task subclass"]),
    ("task of no such module", job(task='[task]\nname = "no_such_module_of_shardstep:Task"'),
     ["task.name: task 'no_such_module_of_shardstep:Task': cannot import module"]),
    ("run_dir with a scheme that is no object store", job(top='run_dir = "ftp://host/runs/x"'),
     ["run_dir: ftp://host/runs/x: the ftp:// scheme is not an object store shardstep writes to; allowed: s3://"]),
    ("run_dir URL climbing out of its prefix", job(top='run_dir = "s3://bucket/runs/../x"'),
     ["run_dir: s3://bucket/runs/../x: expected s3://BUCKET/PREFIX with no '.' or '..' in the prefix"]),
    ("init.from with a scheme that is no object store", job(extra='[init]\nfrom = "http://host/run"'),
     ["init.from: http://host/run: the http:// scheme is not an object store"]),
    ("task whose module exits at import", task_exits_at_import,
     ["task 'exiting_task:Task': importing module 'exiting_task' failed: SystemExit: 3"]),
]


def _os_exit_called(*args: object) -> None:
    raise AssertionError(f"os._exit{args} was called while the job was validated")


@pytest.mark.parametrize("make, fragments", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_hostile_job_is_refused_with_one_line(tmp_path, capsys, monkeypatch, make, fragments):
    # a validation that called os._exit would end pytest with exit code 0: make it fail loudly
    monkeypatch.setattr(os, "_exit", _os_exit_called)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # an import writes no __pycache__
    run_dir = tmp_path / "run"
    if isinstance(make, str):
        path = tmp_path / "job.toml"
        path.write_text(make.replace(RUN_DIR, str(run_dir)))
    else:
        path = make(tmp_path)
    before = sorted(tmp_path.rglob("*"))

    code = main(["run", str(path)])

    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err[:2000]
    assert err.startswith("shardstep run: error: "), err[:2000]
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment.replace(RUN_DIR, str(run_dir)) in err, err[:2000]
    assert not run_dir.exists()
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


def test_the_table_is_large_and_its_base_job_is_valid(tmp_path):
    from shardstep.service.jobspec import parse_job

    assert len(CASES) >= 60 and len({case[0] for case in CASES}) == len(CASES)
    # each text case fails for its own mistake, not for one of the base job's
    assert parse_job(job().replace(RUN_DIR, str(tmp_path / "run"))).task == "least-squares"
    assert parse_job(job(task=RATINGS, optimizer='[optimizer]\nname = "sparse_adam"')
                     .replace(RUN_DIR, str(tmp_path / "run"))).task == "ratings"
