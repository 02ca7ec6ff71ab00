"""A job's own data and model, shared by the data-job and submission tests: a small
three-class dataset written as NPZ, CSV or Parquet, the ``supervised`` task on such a file,
and a job file that trains on one."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from shardstep.workers.tasks import make_task

LAYERS = [{"name": "Linear", "args": {"in_features": 5, "out_features": 12}}, {"name": "GELU"},
          {"name": "Linear", "args": {"in_features": 12, "out_features": 3}}]


def dataset(rows: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """float32 features (5 columns) and int64 classes 0..2."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, rows)
    features = (rng.standard_normal((rows, 5)) + labels[:, None]).astype(np.float32)
    return features, labels.astype(np.int64)


def write(folder: Path, kind: str, features: np.ndarray, labels, name: str = "data") -> Path:
    """``features`` and ``labels`` as one file: NPZ arrays ``x`` and ``y``, or columns
    ``f0`` .. ``f4`` and ``label`` (each float written exactly: its shortest repr)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.{kind}"
    columns = [f"f{i}" for i in range(features.shape[1])]
    if kind == "npz":
        np.savez(path, x=features, y=np.asarray(labels))
    elif kind == "csv":
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow([*columns, "label"])
            for row, label in zip(features, labels):
                writer.writerow([repr(float(value)) for value in row] + [label])
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = {column: features[:, i] for i, column in enumerate(columns)} | {"label": np.asarray(labels)}
        pq.write_table(pa.table(table), path)
    return path


def data_args(path: Path, **extra) -> dict:
    keys = {"features": "x", "label": "y"} if path.suffix == ".npz" else {"label": "label"}
    return {"train": str(path), **keys, **extra}


def task_of(path: Path, layers=LAYERS, loss="CrossEntropyLoss", **extra):
    return make_task("supervised", data=data_args(path, **extra), model={"layers": layers, "loss": loss})


# a job on the data of a file, its [model] the LAYERS above
JOB = """\
run_dir = "{run_dir}"

[data]
train = "{train}"
label = "label"

[model]
loss = "CrossEntropyLoss"
layers = [{{ name = "Linear", args = {{ in_features = 5, out_features = 12 }} }}, {{ name = "GELU" }},
          {{ name = "Linear", args = {{ in_features = 12, out_features = 3 }} }}]

[optimizer]
name = "sgd"
[optimizer.args]
lr = 0.1

[training]
steps = 6
batch_size = 32

[resources]
shards = 2
workers = 2
backend = "{backend}"
"""
