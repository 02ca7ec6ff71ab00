"""Jobs that bring their own data and model: ``[data]`` (NPZ, CSV, Parquet files) and
``[model]`` (a layer list and a loss) make the ``supervised`` task with no Python.

The same numbers in each format give the same arrays, batches and training, bit for bit; the
shipped CSV job (examples/jobs/digits-csv.toml) trains like the built-in digits task it
mirrors, on Ray as inline (the actors get the data with the task: no node reads the files);
a validation fraction is a fixed, seeded split; class names become indices in a stated
order; and bad data or a bad model is refused before anything starts, with one line naming
the key, the file and the column, exit code 2 and nothing written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shardstep.service.cli import main
from shardstep.service.run_dir import METRICS_FILE
from shardstep.workers.tasks import make_task
from shardstep.workers.training import Trainer
from tests.runs import assert_same, final_params
from tests.supervised_jobs import JOB, LAYERS, data_args, dataset, task_of, write

ROOT = Path(__file__).resolve().parents[1]
FORMATS = ("npz", "csv", "parquet")


# ---------------------------------------------------------------------------------------
# formats, batches, splits


def test_each_format_gives_the_same_arrays_batches_and_training(tmp_path):
    features, labels = dataset()
    tasks = {kind: task_of(write(tmp_path, kind, features, labels)) for kind in FORMATS}
    for kind, task in tasks.items():
        inputs, targets = task.training_arrays()
        assert inputs.dtype == np.float32 and targets.dtype == np.int64
        assert np.array_equal(inputs, features) and np.array_equal(targets, labels), kind
    reference = tasks["npz"]
    for kind, task in tasks.items():
        for world_size in (1, 2, 3):
            for rank in range(world_size):
                ours = list(task.batches(7, 1, 32, rank, world_size))
                theirs = list(reference.batches(7, 1, 32, rank, world_size))
                for a, b in zip(ours, theirs, strict=True):
                    assert np.array_equal(a.examples, b.examples)
                    for key in a.data:
                        assert a.data[key].tobytes() == b.data[key].tobytes(), (kind, world_size, rank, key)
    trained = {kind: Trainer(task, seed=3, batch_size=32, optimizer="adam", optimizer_kwargs={"lr": 0.01},
                             world_size=2).run(steps=12).params for kind, task in tasks.items()}
    for kind in FORMATS:
        assert_same(trained[kind], trained["npz"], f"{kind}: ")


def test_a_file_is_read_once_per_process_until_it_changes(tmp_path):
    """The job check, a re-check after overrides and the coordinator each build the task: the
    second one takes the arrays the first read, and a rewritten file is read again."""
    import os

    features, labels = dataset()
    path = write(tmp_path, "csv", features, labels)
    first, second = task_of(path), task_of(path)
    first.prepare()
    second.prepare()
    assert second._data() is first._data()
    other = task_of(path, dtype="float64")  # another argument: its own read
    other.prepare()
    assert other._data() is not first._data() and other._data().train_inputs.dtype == np.float64
    write(tmp_path, "csv", features[::-1], labels[::-1])
    os.utime(path, ns=(1, 1))  # the rewrite might share the old modification time to the ns
    again = task_of(path)
    again.prepare()
    assert np.array_equal(again.training_arrays()[0], features[::-1])


def test_a_validation_fraction_is_a_seeded_split_of_the_training_rows(tmp_path):
    features, labels = dataset(rows=101)
    path = write(tmp_path, "npz", features, labels)
    split = task_of(path, validation=0.25)._data()
    again = task_of(path, validation=0.25)._data()
    other = task_of(path, validation=0.25, split_seed=1)._data()
    assert split.valid_inputs.shape == (25, 5) and split.train_inputs.shape == (76, 5)
    assert split.validated_on == "validation"
    rows = {row.tobytes(): i for i, row in enumerate(features)}
    held = sorted(rows[row.tobytes()] for row in split.valid_inputs)
    kept = [rows[row.tobytes()] for row in split.train_inputs]
    assert kept == sorted(kept) and sorted(held + kept) == list(range(101))  # disjoint, file order kept
    expected = np.sort(np.random.default_rng([0, 0, 4]).permutation(101)[:25])  # the documented rule
    assert held == expected.tolist()
    assert np.array_equal(again.valid_inputs, split.valid_inputs)
    assert not np.array_equal(other.valid_inputs, split.valid_inputs)
    # without validation data, evaluation reports on the training rows
    assert task_of(path)._data().validated_on == "training"


def test_class_names_become_indices_in_sorted_or_stated_order(tmp_path):
    features, labels = dataset(rows=30)
    names = np.array(["cat", "ant", "bee"])[labels]
    path = write(tmp_path, "csv", features, names.tolist())
    assert np.array_equal(task_of(path).training_arrays()[1], np.array([2, 0, 1])[labels])  # ant 0, bee 1, cat 2
    stated = task_of(path, classes=["cat", "ant", "bee"]).training_arrays()[1]
    assert np.array_equal(stated, labels)


def test_a_model_with_layer_norm_declares_what_it_builds_and_learns(tmp_path):
    features, labels = dataset()
    layers = [LAYERS[0], {"name": "LayerNorm", "args": {"normalized_shape": 12}}, *LAYERS[1:]]
    task = task_of(write(tmp_path, "npz", features, labels), layers=layers, validation=0.2)
    built = task.init_params(0)
    assert [(s.name, s.shape) for s in task.param_specs()] == [(name, a.shape) for name, a in built.items()]
    assert np.array_equal(built["1.weight"], np.ones(12, np.float32)) and not built["1.bias"].any()  # torch's init
    before = task.evaluate(built)["loss"]
    result = Trainer(task, seed=0, batch_size=32, optimizer="adam", optimizer_kwargs={"lr": 0.01},
                     world_size=2).run(steps=40)
    assert result.metrics["loss"] < 0.5 * before, (before, result.metrics)


def test_a_1d_convolutional_model_declares_what_it_builds_and_learns(tmp_path):
    """Each row of 5 features as one sequence (1, 5): Conv1d, ReLU, AdaptiveAvgPool1d, Flatten,
    Linear."""
    features, labels = dataset()
    layers = [{"name": "Conv1d", "args": {"in_channels": 1, "out_channels": 6, "kernel_size": 3, "padding": 1}},
              {"name": "ReLU"}, {"name": "AdaptiveAvgPool1d", "args": {"output_size": 2}}, {"name": "Flatten"},
              {"name": "Linear", "args": {"in_features": 12, "out_features": 3}}]
    task = make_task("supervised", data=data_args(write(tmp_path, "npz", features, labels), validation=0.2),
                     model={"layers": layers, "loss": "CrossEntropyLoss", "input_shape": [1, 5]})
    built = task.init_params(0)
    assert [(s.name, s.shape) for s in task.param_specs()] == [(name, a.shape) for name, a in built.items()]
    assert built["0.weight"].shape == (6, 1, 3)
    before = task.evaluate(built)["loss"]
    result = Trainer(task, seed=0, batch_size=32, optimizer="adam", optimizer_kwargs={"lr": 0.02},
                     world_size=2).run(steps=60)
    assert result.metrics["loss"] < 0.5 * before, (before, result.metrics)


def test_regression_and_binary_targets_take_the_outputs_shape_and_report_rmse_or_accuracy(tmp_path):
    features, labels = dataset(rows=60)
    values = features[:, :2].sum(axis=1)
    path = write(tmp_path, "parquet", features, values)
    layers = [{"name": "Linear", "args": {"in_features": 5, "out_features": 1}}]
    task = task_of(path, layers=layers, loss="MSELoss", validation=0.5)
    assert task.training_arrays()[1].shape == (30, 1)
    metrics = task.evaluate(task.init_params(0))
    assert list(metrics) == ["loss", "rmse"]
    assert metrics["rmse"] == pytest.approx(np.sqrt(metrics["loss"]), rel=1e-5)  # MSE's mean is RMSE squared
    binary = task_of(write(tmp_path / "b", "csv", features, (labels > 0).astype(int)), layers=layers,
                     loss="BCEWithLogitsLoss")
    assert binary.training_arrays()[1].dtype == np.float32
    assert list(binary.evaluate(binary.init_params(0))) == ["accuracy", "loss"]


# ---------------------------------------------------------------------------------------
# the shipped examples through the command line


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardstep.service.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env, stdin=subprocess.DEVNULL)


def evaluations(run_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return [record["eval"] for record in records if "eval" in record]


def test_the_csv_job_trains_bit_for_bit_like_the_builtin_digits_on_ray_and_inline(tmp_path, ray_address):
    builtin = tmp_path / "builtin"
    assert cli("run", "examples/jobs/digits.toml", "--run-dir", str(builtin), "--backend", "inline",
               "--quiet").returncode == 0
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    for backend in ("inline", "ray"):
        run_dir = tmp_path / backend
        out = cli("run", "examples/jobs/digits-csv.toml", "--run-dir", str(run_dir), "--backend", backend,
                  "--quiet", env=env)
        assert out.returncode == 0, out.stderr
        assert_same(final_params(run_dir), final_params(builtin), f"{backend}: ")
        assert evaluations(run_dir) == evaluations(builtin)
        saved = json.loads((run_dir / "job.json").read_text())["job"]
        assert saved["task"] == "supervised"
        assert saved["task_args"]["data"]["train"] == str(ROOT / "examples" / "data" / "digits-train.csv")


def test_the_parquet_regression_example_learns(tmp_path):
    out = cli("run", "examples/jobs/sensors-parquet.toml", "--run-dir", str(tmp_path / "run"), "--backend",
              "inline", "--quiet")
    assert out.returncode == 0, out.stderr
    history = evaluations(tmp_path / "run")
    # the target's spread is about 1.6; what is left is mostly the 0.1 noise and the x1 x2 term
    assert history[0]["rmse"] > 1.0 and history[-1]["rmse"] < 0.4, history


def test_data_paths_are_relative_to_the_job_file_and_the_data_travels_with_the_task(tmp_path, ray_address):
    """The job file in its own folder, run from elsewhere; on Ray the file is gone before the
    actors start (they get the arrays with the task, never the path)."""
    features, labels = dataset()
    folder = tmp_path / "project"
    write(folder / "data", "csv", features, labels)
    (folder / "job.toml").write_text(JOB.format(run_dir="runs/one", train="data/data.csv", backend="ray"))
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    code = subprocess.run([sys.executable, "-c", MOVES_DATA_THEN_RUNS, str(folder / "job.toml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600, env=env)
    assert code.returncode == 0, code.stderr
    reference = Trainer(task_of(write(tmp_path / "again", "csv", features, labels)), seed=0, batch_size=32,
                        optimizer="sgd", optimizer_kwargs={"lr": 0.1}, world_size=2).run(steps=6).params
    assert_same(final_params(folder / "runs" / "one"), reference)


def test_the_shards_get_the_task_without_its_data(tmp_path):
    import pickle

    features, labels = dataset(rows=2000)
    task = task_of(write(tmp_path, "npz", features, labels))
    task.prepare()
    bare = task.without_data()
    assert len(pickle.dumps(task)) > features.nbytes > 20 * len(pickle.dumps(bare))
    assert_same(bare.init_params(4), task.init_params(4))
    assert bare.param_specs() == task.param_specs()
    assert task._arrays is not None  # the original keeps its data


def test_data_from_object_storage_trains_like_the_same_file_on_disk(tmp_path, s3_server):
    import uuid

    from shardstep.checkpoints.storage import ObjectPath, put_object
    from tests.objectstore import BUCKET

    features, labels = dataset()
    local = write(tmp_path, "parquet", features, labels)
    url = ObjectPath(f"s3://{BUCKET}/data/{uuid.uuid4().hex}/train.parquet")
    put_object(url, [local.read_bytes()])
    (tmp_path / "job.toml").write_text(JOB.format(run_dir="runs/s3", train=str(url), backend="inline"))
    assert main(["run", str(tmp_path / "job.toml"), "--quiet"]) == 0
    reference = Trainer(task_of(local), seed=0, batch_size=32, optimizer="sgd", optimizer_kwargs={"lr": 0.1},
                        world_size=2).run(steps=6).params
    assert_same(final_params(tmp_path / "runs" / "s3"), reference)
    (tmp_path / "gone.toml").write_text(JOB.format(run_dir="runs/gone", train=f"{url}.missing", backend="inline"))
    assert main(["run", str(tmp_path / "gone.toml")]) == 2
    assert not (tmp_path / "runs" / "gone").exists()


# the coordinator reads the data when it is built; the file is removed before it starts the actors
MOVES_DATA_THEN_RUNS = """
import os, sys
from shardstep.service.coordinator import Coordinator
from shardstep.service.jobspec import load_job
spec = load_job(sys.argv[1])
coordinator = Coordinator(spec)
os.rename(spec.task_args["data"]["train"], spec.task_args["data"]["train"] + ".moved")
coordinator.run()
"""

# the [model] table of JOB, as a job file writes it
MODEL_TABLE = JOB[JOB.index("[model]"):JOB.index("[optimizer]")].replace("{{", "{").replace("}}", "}")

# ---------------------------------------------------------------------------------------
# bad data and bad models: one line, exit 2, nothing written


def _csv(text: str):
    def make(folder: Path) -> Path:
        path = folder / "data.csv"
        path.write_text(text)
        return path
    return make


def _array_file(kind: str, features=None, labels=None):
    def make(folder: Path) -> Path:
        base_features, base_labels = dataset(rows=20)
        return write(folder, kind, base_features if features is None else features,
                     base_labels if labels is None else labels)
    return make


GOOD_CSV = "f0,f1,f2,f3,f4,label\n" + "".join(f"{i},0.5,1,2,3,{i % 3}\n" for i in range(10))
WITH_NAN = np.ones((20, 5), np.float32)
WITH_NAN[7, 2] = np.nan
WITH_INF = np.ones((20, 5), np.float32)
WITH_INF[3, 1] = np.inf

# (id, data file maker, edits of the job text (old -> new), fragments of the message)
CASES = [
    ("missing file", None, {'train = "data.csv"': 'train = "nowhere.csv"'}, ["data.train: data file not found:",
                                                                           "nowhere.csv"]),
    ("no such label column", _csv(GOOD_CSV), {'label = "label"': 'label = "class"'},
     ["data.train (", "data.csv): no label column 'class'; its columns: 'f0', 'f1'"]),
    ("no such feature column", _csv(GOOD_CSV), {'label = "label"': 'label = "label"\nfeatures = ["f0", "g1"]'},
     ["data.csv): no feature column 'g1'"]),
    ("a word among the numbers", _csv(GOOD_CSV.replace("3,0.5,1", "3,abc,1")), {},
     ["data.csv): column 'f1' holds 'abc' at row 4; feature columns hold numbers"]),
    ("an empty cell", _csv(GOOD_CSV.replace("5,0.5,1,2", "5,0.5,,2")), {},
     ["data.csv): column 'f2' holds an empty cell at row 6"]),
    ("NaN in a CSV", _csv(GOOD_CSV.replace("2,0.5,1,2,3", "2,0.5,1,nan,3")), {},
     ["data.csv): 'f3' holds nan at row 3; data must be finite numbers"]),
    ("a short row", _csv(GOOD_CSV.replace("4,0.5,1,2,3,1\n", "4,0.5,1,2\n")), {},
     ["data.csv): line 6 has 4 cells; the header has 6"]),
    ("NaN in an NPZ array", _array_file("npz", features=WITH_NAN), {'train = "data.csv"': 'train = "data.npz"',
                                                                     'label = "label"': 'label = "y"\nfeatures = "x"'},
     ["data.npz): 'x' holds nan at row 8"]),
    ("infinity in Parquet", _array_file("parquet", features=WITH_INF), {'train = "data.csv"': 'train = "data.parquet"'},
     ["data.parquet): 'f1' holds inf at row 4"]),
    ("a null Parquet cell", None, {'train = "data.csv"': 'train = "data.parquet"'},
     ["data.parquet): column 'f0' has an empty (null) cell at row 2"]),
    ("features wider than the model", _csv(GOOD_CSV.replace("f4,label", "f4,f5,label").replace(",3,", ",3,9,")),
     {}, ["data.csv): (6,) features per example, but model.layers' first Linear takes in_features = 5"]),
    ("a class beyond the outputs", _csv(GOOD_CSV.replace("9,0.5,1,2,3,0", "9,0.5,1,2,3,3")), {},
     ["data.csv): label 'label' holds class 3 at row 10; the model's 3 outputs (last Linear out_features) "
      "allow 0..2"]),
    ("more class names than outputs", _csv(GOOD_CSV.replace(",0\n", ",zero\n").replace(",1\n", ",one\n")
                                           .replace(",2\n", ",two\n").replace("9,0.5,1,2,3,zero", "9,0.5,1,2,3,four")),
     {}, ["4 classes (['four', 'one', 'two', 'zero']), but model.layers' last Linear has out_features = 3"]),
    ("an NPZ without the array", _array_file("npz"), {'train = "data.csv"': 'train = "data.npz"',
                                                      'label = "label"': 'label = "labels"\nfeatures = "x"'},
     ["data.npz): no array 'labels'; its arrays: 'x', 'y'"]),
    ("a file of unknown format", _csv(GOOD_CSV), {'train = "data.csv"': 'train = "data.txt"'},
     ["data.train = '", "data.txt': cannot tell the format from the suffix '.txt'"]),
    ("validation with other columns", _csv(GOOD_CSV),
     {'label = "label"': 'label = "label"\nvalidation = "other.csv"'}, ["data.validation (", "no label column"]),
    ("a validation fraction of 1.5", _csv(GOOD_CSV), {'label = "label"': 'label = "label"\nvalidation = 1.5'},
     ["data.validation as a fraction of the training rows must be in (0, 1); got 1.5"]),
    ("a binary target beyond 1", _csv(GOOD_CSV),
     {'"CrossEntropyLoss"': '"BCEWithLogitsLoss"', "out_features = 3": "out_features = 1"},
     ["data.csv): BCEWithLogitsLoss takes targets in [0, 1]; row 3 holds [2.0]"]),
    ("an unknown data key", _csv(GOOD_CSV), {'label = "label"': 'label = "label"\nshuffle = true'},
     ["data has unknown key 'shuffle'; allowed: train, validation, features, label"]),
    ("an unknown layer", _csv(GOOD_CSV), {'{ name = "GELU" }': '{ name = "Conv3d" }'},
     ["model.layers[1].name must be one of Linear, Conv1d, Conv2d, ReLU, Tanh, GELU, LogSoftmax, Softmax, "
      "MaxPool2d, AvgPool2d, AdaptiveAvgPool1d, AdaptiveAvgPool2d, Flatten, LayerNorm, BatchNorm1d, BatchNorm2d, "
      "Dropout; got 'Conv3d'"]),
    ("a batch norm of the wrong width", _csv(GOOD_CSV),
     {'{ name = "GELU" }': '{ name = "BatchNorm1d", args = { num_features = 11 } }'},
     ["model.layers[1]: BatchNorm1d takes (num_features,) or (num_features, length) per example with num_features "
      "= 11; the layers before it give shape [12]"]),
    ("a Conv1d on vectors", _csv(GOOD_CSV),
     {'{ name = "GELU" }': '{ name = "Conv1d", args = { in_channels = 1, out_channels = 2, kernel_size = 3 } }'},
     ["model.layers[1]: Conv1d takes sequences (channels, length) per example; the layers before it give shape [12] "
      "(set model.input_shape, e.g. [1, 64])"]),
    ("a dropout probability of 2", _csv(GOOD_CSV), {'{ name = "GELU" }': '{ name = "Dropout", args = { p = 2.0 } }'},
     ["model: Dropout: p (the probability of an element to be zeroed) must be in [0, 1]; got 2.0"]),
    ("widths that do not chain", _csv(GOOD_CSV), {"in_features = 12": "in_features = 13"},
     ["model.layers[2].args.in_features must be 12, the size the layers before it give (shape [12] per example); "
      "got 13"]),
    ("a LayerNorm of the wrong size", _csv(GOOD_CSV),
     {'{ name = "GELU" }': '{ name = "LayerNorm", args = { normalized_shape = 11 } }'},
     ["model.layers[1].args.normalized_shape must be the last axes of what the layers before it give (shape [12] "
      "per example); got [11]"]),
    ("an unknown layer argument", _csv(GOOD_CSV), {"out_features = 12 }": "out_features = 12, bais = false }"},
     ["model.layers[0].args: Linear has no argument 'bais'; allowed: in_features, out_features, bias"]),
    ("a loss reduction", _csv(GOOD_CSV), {'loss = "CrossEntropyLoss"':
                                          'loss = { name = "CrossEntropyLoss", args = { reduction = "mean" } }'},
     ["model.loss.args.reduction is not set in the job: it is 'sum' (the engine divides by the global batch size)"]),
    ("an unknown loss", _csv(GOOD_CSV), {'"CrossEntropyLoss"': '"FocalLoss"'},
     ["model.loss.name must be one of CrossEntropyLoss, NLLLoss, MSELoss"]),
    ("a bad loss argument", _csv(GOOD_CSV),
     {'loss = "CrossEntropyLoss"': 'loss = { name = "CrossEntropyLoss", args = { label_smoothing = 2.0 } }'},
     ["model: CrossEntropyLoss: label_smoothing must be in [0, 1]; got 2.0"]),
    ("data without a model", _csv(GOOD_CSV), {"MODEL": ""}, ["[data] needs [model] too"]),
    ("a task as well", _csv(GOOD_CSV), {"[optimizer]": '[task]\nname = "digits"\n\n[optimizer]'},
     ["a job gives either [task] or [data] with [model], not both"]),
    ("a non-UTF-8 CSV", lambda folder: (folder / "data.csv").write_bytes(b"f0,label\n\xff,1\n") and folder / "data.csv",
     {}, ["data.csv): a CSV file must be UTF-8 text; byte 9 is not"]),
]


def _null_parquet(folder: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {f"f{i}": pa.array([1.0, None, 2.0] if i == 0 else [1.0, 1.5, 2.0]) for i in range(5)}
    path = folder / "data.parquet"
    pq.write_table(pa.table(columns | {"label": pa.array([0, 1, 2])}), path)
    return path


def test_the_table_of_bad_inputs_is_large():
    assert len(CASES) >= 15 and len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case, make, edits, fragments", CASES, ids=[case[0] for case in CASES])
def test_bad_data_or_model_is_refused_before_anything_starts(tmp_path, capsys, case, make, edits, fragments):
    project = tmp_path / "project"
    project.mkdir()
    if case == "a null Parquet cell":
        make = _null_parquet
    if make is not None:
        make(project)
    if case == "validation with other columns":
        (project / "other.csv").write_text(GOOD_CSV.replace("label", "target"))
    text = JOB.format(run_dir="runs/bad", train="data.csv", backend="inline")
    for old, new in edits.items():
        old = MODEL_TABLE if old == "MODEL" else old
        assert old in text, old
        text = text.replace(old, new)
    (project / "job.toml").write_text(text)
    before = sorted(tmp_path.rglob("*"))

    code = main(["run", str(project / "job.toml")])

    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"shardstep run: error: {project / 'job.toml'}: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert not (project / "runs").exists()
    assert sorted(tmp_path.rglob("*")) == before


def test_a_good_base_job_of_the_bad_inputs_table_runs(tmp_path):
    """Each case fails for its own edit: the job it edits trains."""
    (tmp_path / "data.csv").write_text(GOOD_CSV)
    (tmp_path / "job.toml").write_text(JOB.format(run_dir="runs/good", train="data.csv", backend="inline"))
    assert main(["run", str(tmp_path / "job.toml"), "--quiet"]) == 0
    assert re.search(r"step-0*6$", str(sorted((tmp_path / "runs" / "good" / "checkpoints").iterdir())[-1]))


# ---------------------------------------------------------------------------------------
# Ray Data: row servers, each worker fetching only its own rows


def parquet_parts(folder: Path, features: np.ndarray, labels: np.ndarray, cuts=(0, 40, 100, 150)) -> Path:
    """The rows as several Parquet files in one directory (Ray Data reads them in name
    order, one block or more each), and the same rows as one file, ``all.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def table(rows: slice):
        return pa.table({**{f"f{i}": features[rows, i] for i in range(features.shape[1])}, "label": labels[rows]})

    (folder / "parts").mkdir(parents=True)
    for index, (start, stop) in enumerate(zip(cuts, cuts[1:])):
        pq.write_table(table(slice(start, stop)), folder / "parts" / f"part-{index}.parquet")
    pq.write_table(table(slice(None)), folder / "all.parquet")
    return folder / "parts"


def test_row_servers_hand_each_rank_its_own_rows_and_reload_after_a_restart(tmp_path, ray_address):
    import ray

    features, labels = dataset()
    parts = parquet_parts(tmp_path, features, labels)
    served = task_of(parts, ray_data=True, row_servers=2, format="parquet", validation=0.2)
    served.prepare()
    served.serve()
    local = task_of(tmp_path / "all.parquet", validation=0.2)
    assert served.train_size == local.train_size == 120
    servers = served._rows.servers
    assert sorted(ray.get([server.counts.remote() for server in servers])) == [(75, 0), (75, 0)]
    for world_size in (1, 2):
        for index in range(local.num_batches(32)):
            for rank in range(world_size):
                ours, theirs = served.batch(3, 0, index, 32, rank, world_size), local.batch(3, 0, index, 32, rank,
                                                                                             world_size)
                for key in theirs.data:
                    assert ours.data[key].tobytes() == theirs.data[key].tobytes()
    # each rank asked only for its own rows: an epoch served each training row once per world size
    assert sum(ray.get([server.counts.remote() for server in servers])[i][1] for i in range(2)) == 2 * 120
    assert served.evaluate(served.init_params(0)) == local.evaluate(local.init_params(0))

    ray.kill(servers[0], no_restart=False)  # as when its node is lost: Ray restarts it, empty
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if ray.get(servers[0].counts.remote(), timeout=10)[0] == 0:
                break
        except ray.exceptions.RayActorError:
            time.sleep(0.2)
    again = served.batch(3, 1, 0, 150, 0, 1)  # every training row: part of it on the restarted server
    assert again.data["inputs"].tobytes() == local.batch(3, 1, 0, 150, 0, 1).data["inputs"].tobytes()

    served.stop_serving()  # what the coordinator does at the end of a run; ray.kill lands soon after
    deadline = time.monotonic() + 30
    for server in servers:
        while True:
            try:
                ray.get(server.counts.remote(), timeout=10)
            except ray.exceptions.RayActorError:
                break
            assert time.monotonic() < deadline, "a row server still answers 30 s after stop_serving"
            time.sleep(0.1)


def test_a_ray_data_job_trains_bit_for_bit_like_the_same_file_and_resumes_mid_epoch(tmp_path, ray_address):
    features, labels = dataset()
    parts = parquet_parts(tmp_path, features, labels)
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    runs = {}
    for name, train, extra in (("file", "all.parquet", ""),
                               ("ray", "parts", 'ray_data = true\nrow_servers = 2\nformat = "parquet"\n')):
        text = JOB.format(run_dir=f"runs/{name}", train=train, backend="ray")
        text = text.replace('label = "label"\n', f'label = "label"\nvalidation = 0.2\n{extra}')
        text = text.replace("steps = 6", "steps = 10\neval_every = 5") + "\n[checkpoint]\nevery = 5\n"
        (tmp_path / f"{name}.toml").write_text(text)
        out = cli("run", str(tmp_path / f"{name}.toml"), "--quiet", env=env)
        assert out.returncode == 0, out.stderr
        assert "Progress" not in out.stderr and "RowServer" not in out.stderr, out.stderr  # Ray Data kept quiet
        runs[name] = tmp_path / "runs" / name
    assert_same(final_params(runs["ray"]), final_params(runs["file"]))
    assert evaluations(runs["ray"]) == evaluations(runs["file"])
    assert parts.exists()
    # 120 training rows in batches of 32: step 5 is inside the second epoch
    shutil.rmtree(runs["ray"] / "checkpoints" / "step-0000000010")
    resumed = cli("resume", str(runs["ray"]), "--quiet", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert_same(final_params(runs["ray"]), final_params(runs["file"]))


def test_ray_data_bad_input_is_refused_before_anything_is_written(tmp_path, capsys, ray_address):
    features, labels = dataset()
    features[117, 3] = np.nan  # in the third file, row 18 of it; row 118 of the data set
    parts = parquet_parts(tmp_path, features, labels)
    cases = {
        "nan": (str(parts), 'ray_data = true\nformat = "parquet"', "'f3' holds nan at row 118"),
        "column": (str(parts), 'ray_data = true\nformat = "parquet"\nfeatures = ["f0", "g1"]',
                   "no feature column 'g1'"),
        "inline": (str(parts), 'ray_data = true\nformat = "parquet"', "data.ray_data = true reads the data with Ray "
                                                                     "Data on the cluster, which needs "
                                                                     "resources.backend = 'ray'"),
        "directory without format": (str(parts), "ray_data = true", "data.format must be given ('parquet' or 'csv')"),
    }
    for name, (train, extra, fragment) in cases.items():
        backend = "inline" if name == "inline" else "ray"
        text = JOB.format(run_dir=f"runs/{name}", train=train, backend=backend)
        (tmp_path / f"{name}.toml").write_text(text.replace('label = "label"\n', f'label = "label"\n{extra}\n')
                                               .replace('backend = "ray"', f'backend = "ray"\naddress = "{ray_address}"'))
        code = main(["run", str(tmp_path / f"{name}.toml")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and fragment in err, (name, err)
        assert not (tmp_path / "runs" / name).exists(), name


def test_the_cnn_example_passes_98_5_percent_on_ray_bit_identical_to_inline(tmp_path, ray_address):
    """examples/jobs/digits-cnn.toml (Conv2d, MaxPool2d, Flatten from a layer list) on Ray with
    2 shards and 2 workers, and inline: the same parameters, held-out accuracy >= 98.5%."""
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    for backend in ("ray", "inline"):
        out = cli("run", "examples/jobs/digits-cnn.toml", "--run-dir", str(tmp_path / backend), "--backend", backend,
                  "--quiet", env=env)
        assert out.returncode == 0, out.stderr
    assert_same(final_params(tmp_path / "ray"), final_params(tmp_path / "inline"))
    history = evaluations(tmp_path / "ray")
    assert history == evaluations(tmp_path / "inline")
    assert history[-1]["accuracy"] >= 0.985, history


# ---------------------------------------------------------------------------------------
# dropout: masks keyed to the step and each example's place in the global batch

DROPOUT_LAYERS = [LAYERS[0], LAYERS[1], {"name": "Dropout", "args": {"p": 0.4}}, LAYERS[2]]


def test_dropout_masks_do_not_depend_on_ranks_or_micro_batches(tmp_path):
    """The summed partials of 1, 2 and 3 ranks, and of 2 micro-batches, are one function of the
    parameters: the same masks whatever the cut (float64, to rounding). Without the keying, a
    rank would draw its rows' masks from its own stream and the losses would differ by O(1)."""
    from shardstep.workers.tasks.base import accumulated_loss_and_grad

    features, labels = dataset()
    path = write(tmp_path, "npz", features.astype(np.float64), labels)
    task = task_of(path, layers=DROPOUT_LAYERS, dtype="float64")
    params = task.init_params(3)
    results = {}
    for world_size, parts in ((1, 1), (2, 1), (3, 1), (1, 2)):
        loss, grads = 0.0, None
        for rank in range(world_size):
            batch = next(iter(task.batches(7, 2, 40, rank, world_size)))
            part_loss, part_grads = accumulated_loss_and_grad(task, params, batch, parts)
            loss += part_loss
            grads = part_grads if grads is None else {k: grads[k] + part_grads[k] for k in grads}
        results[(world_size, parts)] = loss, grads
    reference_loss, reference = results[(1, 1)]
    for key, (loss, grads) in results.items():
        assert abs(loss - reference_loss) <= 1e-12 * abs(reference_loss), key
        for name in reference:
            np.testing.assert_allclose(grads[name], reference[name], rtol=1e-10, atol=1e-14, err_msg=str(key))
    # the masks are real: the same batch without dropout has another loss, and the batch of
    # the same number in another epoch draws other masks
    without = task_of(path, layers=[*DROPOUT_LAYERS[:2], {"name": "Dropout", "args": {"p": 0.0}}, LAYERS[2]],
                      dtype="float64")
    batch = next(iter(task.batches(7, 2, 40)))
    assert abs(without.loss_and_grad(params, batch)[0] - reference_loss) > 1e-3
    other_epoch = next(iter(task.batches(7, 3, 40)))
    assert not np.array_equal(task.loss_and_grad(params, other_epoch)[1]["0.weight"],
                              without.loss_and_grad(params, other_epoch)[1]["0.weight"])


def test_a_dropout_job_resumes_bit_for_bit_and_ray_equals_inline(tmp_path, ray_address):
    features, labels = dataset()
    write(tmp_path, "csv", features, labels)
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    runs = {}
    for backend in ("ray", "inline"):
        text = JOB.format(run_dir=f"runs/{backend}", train="data.csv", backend=backend)
        text = text.replace('{ name = "GELU" },', '{ name = "GELU" }, { name = "Dropout", args = { p = 0.4 } },')
        text = text.replace("steps = 6", "steps = 10") + "\n[checkpoint]\nevery = 5\n"
        assert "Dropout" in text
        (tmp_path / f"{backend}.toml").write_text(text)
        out = cli("run", str(tmp_path / f"{backend}.toml"), "--quiet", env=env)
        assert out.returncode == 0, out.stderr
        runs[backend] = tmp_path / "runs" / backend
    finished = final_params(runs["ray"])
    assert_same(finished, final_params(runs["inline"]))
    # a crash after step 5: the run resumed from its checkpoint ends with the same parameters
    shutil.rmtree(runs["ray"] / "checkpoints" / "step-0000000010")
    resumed = cli("resume", str(runs["ray"]), "--quiet", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert_same(final_params(runs["ray"]), finished)


# ---------------------------------------------------------------------------------------
# BatchNorm: running statistics as model state, moved once per global batch

BN_LAYERS = [LAYERS[0], {"name": "BatchNorm1d", "args": {"num_features": 12}}, LAYERS[1], LAYERS[2]]


def test_batch_norm_statistics_move_once_per_global_batch_from_all_its_pieces(tmp_path):
    """One piece moves the running statistics bit for bit as the layer itself does on that
    batch; 3 ranks of 2 micro-batches each pool to the same statistics (float64 rounding);
    the evaluation normalizes with the running statistics it is given."""
    from shardstep.workers import nn
    from shardstep.workers.tasks.base import accumulated_loss_and_grad

    features, labels = dataset()
    path = write(tmp_path, "npz", features.astype(np.float64), labels)
    task = task_of(path, layers=BN_LAYERS, dtype="float64", validation=0.2)
    params = task.init_params(3)
    start = task.init_buffers(3)
    assert list(start) == ["1.running_mean", "1.running_var", "1.num_batches_tracked"]
    batch = task.batch(7, 0, 0, 40)
    task.loss_and_grad(params, batch)
    whole = task.advance_buffers(start, [task.take_batch_statistics()])
    linear = nn.Linear(5, 12, dtype=np.float64)
    linear.load_state_dict({"weight": params["0.weight"], "bias": params["0.bias"]})
    layer = nn.BatchNorm1d(12, dtype=np.float64)
    layer(linear(batch.data["inputs"]))
    assert np.array_equal(whole["1.running_mean"], layer.running_mean)
    assert np.array_equal(whole["1.running_var"], layer.running_var)
    assert whole["1.num_batches_tracked"] == 1 and start["1.num_batches_tracked"] == 0
    reports = []
    for rank in range(3):
        accumulated_loss_and_grad(task, params, task.batch(7, 0, 0, 40, rank, 3), 2)
        reports.append(task.take_batch_statistics())
    assert [len(report["1"]) for report in reports] == [2, 2, 2]
    pooled = task.advance_buffers(start, reports)
    np.testing.assert_allclose(pooled["1.running_mean"], whole["1.running_mean"], rtol=1e-13, atol=1e-16)
    np.testing.assert_allclose(pooled["1.running_var"], whole["1.running_var"], rtol=1e-13)
    task.set_buffers(start)
    at_start = task.evaluate(params)
    task.set_buffers(whole)
    assert task.evaluate(params)["loss"] != at_start["loss"]


def test_a_batch_norm_job_keeps_its_running_statistics_across_backends_resume_and_export(tmp_path, ray_address):
    from shardstep.checkpoints import load, open_checkpoint

    features, labels = dataset()
    write(tmp_path, "csv", features, labels)
    env = {**os.environ, "RAY_ADDRESS": ray_address}
    runs = {}
    for backend in ("ray", "inline"):
        text = JOB.format(run_dir=f"runs/{backend}", train="data.csv", backend=backend)
        text = text.replace('{ name = "GELU" },', '{ name = "BatchNorm1d", args = { num_features = 12 } }, '
                                                  '{ name = "GELU" },')
        text = text.replace('label = "label"\n', 'label = "label"\nvalidation = 0.2\n')
        text = text.replace("steps = 6", "steps = 10\neval_every = 5") + "\n[checkpoint]\nevery = 5\n"
        assert "BatchNorm1d" in text
        (tmp_path / f"{backend}.toml").write_text(text)
        out = cli("run", str(tmp_path / f"{backend}.toml"), "--quiet", env=env)
        assert out.returncode == 0, out.stderr
        runs[backend] = tmp_path / "runs" / backend

    def buffers(run_dir: Path) -> dict:
        with open_checkpoint(run_dir / "checkpoints") as checkpoint:
            return checkpoint.extra["coordinator"]["buffers"]

    finished, moved = final_params(runs["ray"]), buffers(runs["ray"])
    assert moved["1.num_batches_tracked"] == 10 and moved["1.running_mean"].dtype == np.float32
    assert moved["1.running_var"].any() and not np.array_equal(moved["1.running_var"], np.ones(12, np.float32))
    assert_same(finished, final_params(runs["inline"]))
    assert_same(moved, buffers(runs["inline"]))
    assert evaluations(runs["ray"]) == evaluations(runs["inline"])
    shutil.rmtree(runs["ray"] / "checkpoints" / "step-0000000010")
    resumed = cli("resume", str(runs["ray"]), "--quiet", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert_same(final_params(runs["ray"]), finished)
    assert_same(buffers(runs["ray"]), moved)
    assert evaluations(runs["ray"]) == evaluations(runs["inline"])
    # the export is the model's whole state_dict, buffers included
    out = cli("export", str(runs["ray"]), "--out", str(tmp_path / "model.ckpt"))
    assert out.returncode == 0, out.stderr
    model = load(tmp_path / "model.ckpt")["model"]
    assert_same({name: model[name] for name in moved}, moved)
    assert set(model) == set(finished) | set(moved)


def test_fine_tuning_a_batch_norm_model_carries_its_running_statistics(tmp_path):
    """From the run directory and from its export alike: the statistics go on from the
    source's (the count too); a source buffer the model lacks is refused by name."""
    features, labels = dataset()
    write(tmp_path, "csv", features, labels)
    base = JOB.format(run_dir="runs/{name}", train="data.csv", backend="inline").replace(
        '{ name = "GELU" },', '{ name = "BatchNorm1d", args = { num_features = 12 } }, { name = "GELU" },')

    def run(name: str, init: str = "") -> subprocess.CompletedProcess:
        (tmp_path / f"{name}.toml").write_text(base.replace("{name}", name) + init)
        return cli("run", str(tmp_path / f"{name}.toml"), "--quiet")

    assert run("source").returncode == 0
    assert cli("export", str(tmp_path / "runs" / "source"), "--out", str(tmp_path / "source.ckpt")).returncode == 0
    assert run("from-run", '\n[init]\nfrom = "runs/source"\n').returncode == 0
    assert run("from-file", '\n[init]\nfrom = "source.ckpt"\n').returncode == 0
    from shardstep.checkpoints import open_checkpoint

    def buffers(name: str) -> dict:
        with open_checkpoint(tmp_path / "runs" / name / "checkpoints") as checkpoint:
            return checkpoint.extra["coordinator"]["buffers"]

    assert buffers("source")["1.num_batches_tracked"] == 6 and buffers("from-run")["1.num_batches_tracked"] == 12
    assert_same(buffers("from-file"), buffers("from-run"))
    assert_same(final_params(tmp_path / "runs" / "from-file"), final_params(tmp_path / "runs" / "from-run"))
    # the statistics moved on from the source's, not from a fresh start
    fresh = run("fresh")
    assert fresh.returncode == 0 and not np.array_equal(buffers("fresh")["1.running_mean"],
                                                        buffers("from-run")["1.running_mean"])
    other = base.replace("num_features = 12", "num_features = 12, track_running_stats = false")
    (tmp_path / "other.toml").write_text(other.replace("{name}", "other") + '\n[init]\nfrom = "runs/source"\n')
    refused = cli("run", str(tmp_path / "other.toml"), "--quiet")
    assert refused.returncode == 2 and "its buffers 1.running_mean (float32 (12,))" in refused.stderr, refused.stderr
    assert not (tmp_path / "runs" / "other").exists()


@pytest.mark.torch_live
def test_a_batch_norm_models_torch_export_loads_strictly_into_torch_and_back(tmp_path):
    from tests.conftest import require_torch

    torch = require_torch()
    features, labels = dataset()
    write(tmp_path, "csv", features, labels)
    base = JOB.format(run_dir="runs/{name}", train="data.csv", backend="inline").replace(
        '{ name = "GELU" },', '{ name = "BatchNorm1d", args = { num_features = 12 } }, { name = "GELU" },')
    (tmp_path / "source.toml").write_text(base.replace("{name}", "source"))
    assert cli("run", str(tmp_path / "source.toml"), "--quiet").returncode == 0
    out = cli("export", str(tmp_path / "runs" / "source"), "--out", str(tmp_path / "model.pt"))
    assert out.returncode == 0, out.stderr
    module = torch.nn.Sequential(torch.nn.Linear(5, 12), torch.nn.BatchNorm1d(12), torch.nn.GELU(),
                                 torch.nn.Linear(12, 3))
    state = torch.load(tmp_path / "model.pt", weights_only=True)["model"]
    module.load_state_dict(state, strict=True)
    assert int(module[1].num_batches_tracked) == 6 and not torch.all(module[1].running_var == 1)
    (tmp_path / "tuned.toml").write_text(base.replace("{name}", "tuned") + '\n[init]\nfrom = "model.pt"\n')
    assert cli("run", str(tmp_path / "tuned.toml"), "--quiet").returncode == 0
    from shardstep.checkpoints import open_checkpoint

    with open_checkpoint(tmp_path / "runs" / "tuned" / "checkpoints") as checkpoint:
        assert checkpoint.extra["coordinator"]["buffers"]["1.num_batches_tracked"] == 12
