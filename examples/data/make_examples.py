"""Write the example data files of examples/jobs/*-data.toml (run from anywhere; needs pyarrow).

- ``digits-train.csv``, ``digits-test.csv``: the UCI handwritten digits that the built-in
  ``digits`` task trains on (shardstep/workers/tasks/data/digits.npz: source, licence and the
  held-out rule in its README), one row per image: columns ``p0`` .. ``p63`` hold a pixel's
  count / 16 (exact in four decimals), ``digit`` the label. The same 1,442 training and 355
  held-out images, in the same order, so ``digits-csv.toml`` trains bit for bit like
  ``digits`` with the same model.
- ``sensors.parquet``: 2,000 rows of a synthetic regression generated here (seed 0): eight
  features ``x0`` .. ``x7`` drawn from N(0, 1) and the target
  ``y = sin(x0) + x1 x2 - 0.5 x3^2 + 0.1 noise`` (float32 columns).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def write_digits() -> None:
    from shardstep.workers.tasks.digits import load_digits

    data = load_digits(np.dtype(np.float64))
    for name, inputs, labels in (("digits-train.csv", data.train_inputs, data.train_labels),
                                 ("digits-test.csv", data.held_out_inputs, data.held_out_labels)):
        with open(HERE / name, "w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow([f"p{i}" for i in range(inputs.shape[1])] + ["digit"])
            for row, label in zip(inputs, labels):
                writer.writerow([f"{value:.4f}".rstrip("0").rstrip(".") for value in row] + [int(label)])


def write_sensors() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2000, 8))
    y = np.sin(x[:, 0]) + x[:, 1] * x[:, 2] - 0.5 * x[:, 3] ** 2 + 0.1 * rng.standard_normal(2000)
    columns = {f"x{i}": x[:, i].astype(np.float32) for i in range(8)} | {"y": y.astype(np.float32)}
    pq.write_table(pa.table(columns), HERE / "sensors.parquet", compression="zstd")


if __name__ == "__main__":
    write_digits()
    write_sensors()
