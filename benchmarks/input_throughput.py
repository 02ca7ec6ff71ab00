"""Input throughput: does a step ever wait for its data?

    python benchmarks/input_throughput.py            # the published table (about 2 minutes on 2 cores)
    python benchmarks/input_throughput.py --quick    # fewer steps and rounds; never writes the doc

Data: synthetic-mlp-sized inputs, 16,384 rows of 256 float32 features and 10 classes (a
random linear teacher, seed 0), written once to a temporary NPZ file and to a Parquet
directory of 4 files. Model: the ``[model]`` layer list Linear(256, 512), ReLU,
Linear(512, 512), ReLU, Linear(512, 10) with cross-entropy (about 400k parameters); Adam,
batch 256, 2 shards, 2 gradient workers, on a private single-node Ray instance on loopback
(this script starts and stops it; the coordinator reuses it).

1. Step time, ``Coordinator(spec).run()`` of the same job three ways, alternating over rounds:
   ``memory`` (the NPZ file, read once and shipped with the task: the in-memory reference),
   ``parquet`` (the same from one Parquet file: read once, then also in memory) and
   ``ray_data`` (the Parquet directory read by Ray Data into 2 row servers; each worker
   fetches its rows of each batch from them, one batch ahead). The time of a step is the
   coordinator's own per-step ``seconds``; the first ``WARMUP`` steps of every run are skipped;
   medians (p90) over the pooled steps, and each source's median against ``memory``'s.
2. Read rate, in this process: examples per second that ``task.examples`` delivers for one
   worker's share of a batch (128 random positions), from memory and from the row servers
   (fetched synchronously, no prefetch), against the examples per second the step computes
   (256 over the memory median).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep the private node on loopback

from benchmarks.report import machine, write_section  # noqa: E402

BEGIN, END = "<!-- input:begin -->", "<!-- input:end -->"
ROWS, FEATURES, CLASSES = 16_384, 256, 10
BATCH, WORKERS, SHARDS = 256, 2, 2
WARMUP = 5
LAYERS = [{"name": "Linear", "args": {"in_features": FEATURES, "out_features": 512}}, {"name": "ReLU"},
          {"name": "Linear", "args": {"in_features": 512, "out_features": 512}}, {"name": "ReLU"},
          {"name": "Linear", "args": {"in_features": 512, "out_features": CLASSES}}]
MODES = {"full": {"rounds": 5, "steps": 60, "reads": 400}, "quick": {"rounds": 1, "steps": 20, "reads": 100}}
SOURCES = ("memory", "parquet", "ray_data")


def write_data(folder: Path) -> dict[str, dict[str, Any]]:
    """The rows as NPZ, one Parquet file and a Parquet directory; the [data] table of each."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    features = rng.standard_normal((ROWS, FEATURES)).astype(np.float32)
    labels = (features @ rng.standard_normal((FEATURES, CLASSES)).astype(np.float32)).argmax(axis=1)
    np.savez(folder / "data.npz", x=features, y=labels)
    columns = {f"f{i}": features[:, i] for i in range(FEATURES)} | {"label": labels}
    pq.write_table(pa.table(columns), folder / "data.parquet")
    (folder / "parts").mkdir()
    for part in range(4):
        rows = slice(part * ROWS // 4, (part + 1) * ROWS // 4)
        pq.write_table(pa.table({name: values[rows] for name, values in columns.items()}),
                       folder / "parts" / f"part-{part}.parquet")
    return {
        "memory": {"train": str(folder / "data.npz"), "features": "x", "label": "y"},
        "parquet": {"train": str(folder / "data.parquet"), "label": "label"},
        "ray_data": {"train": str(folder / "parts"), "label": "label", "format": "parquet", "ray_data": True,
                     "row_servers": 2},
    }


def run(data: dict[str, Any], steps: int) -> list[float]:
    from shardstep.service.coordinator import Coordinator
    from shardstep.service.jobspec import JobSpec

    with tempfile.TemporaryDirectory(prefix="shardstep-input-") as run_dir:
        spec = JobSpec(task="supervised", task_args={"data": data, "model": {"layers": LAYERS,
                                                                             "loss": "CrossEntropyLoss"}},
                       optimizer="adam", optimizer_args={"lr": 1e-3}, param_groups=None, schedulers=(), steps=steps,
                       epochs=None, batch_size=BATCH, shards=SHARDS, workers=WORKERS, backend="ray", run_dir=run_dir)
        result = Coordinator(spec).run()
    return [record["seconds"] for record in result.history[WARMUP:]]


def read_rate(data: dict[str, Any], reads: int) -> float:
    """Examples per second of ``task.examples`` for one worker's share of a batch."""
    import numpy as np

    from shardstep.workers.tasks import make_task

    task = make_task("supervised", data=data, model={"layers": LAYERS, "loss": "CrossEntropyLoss"})
    task.prepare()
    task.serve()
    try:
        rng = np.random.default_rng(1)
        share = BATCH // WORKERS
        batches = [rng.permutation(task.train_size)[:share] for _ in range(reads)]
        task.examples(0, 0, batches[0])  # warm
        start = time.perf_counter()
        for positions in batches:
            task.examples(0, 0, positions)
        return share * reads / (time.perf_counter() - start)
    finally:
        task.stop_serving()


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def render(times: dict[str, list[float]], rates: dict[str, float], header: dict[str, Any]) -> str:
    memory = statistics.median(times["memory"])
    parquet, ray_data = statistics.median(times["parquet"]), statistics.median(times["ray_data"])
    lines = [
        BEGIN,
        "## Input throughput: does a step wait for its data?",
        "",
        f"Machine: {header['machine']}; Python {header['python']}, Ray {header['ray']}; {header['date']}. "
        f"Command: `{header['command']}` ({header['rounds']} rounds, {header['minutes']:.1f} min; load average "
        f"{header['load_before']} before, {header['load_after']} after).",
        "",
        f"Step time, {ROWS:,} rows x {FEATURES} float32 features, MLP {FEATURES}-512-512-{CLASSES} (about 400k "
        f"parameters), Adam, batch {BATCH}, {SHARDS} shards, {WORKERS} workers; {len(times['memory'])} timed steps "
        f"per source:",
        "",
        "| source | median step | p90 | vs memory |",
        "|---|---|---|---|",
    ]
    for source in SOURCES:
        median = statistics.median(times[source])
        lines.append(f"| {source} | {median * 1e3:.2f} ms | {p90(times[source]) * 1e3:.2f} ms | "
                     f"{median / memory:.3f}x |")
    compute = BATCH / memory
    lines += [
        "",
        f"`memory` and `parquet` train on the same in-memory arrays once started, so their difference "
        f"({parquet / memory:.3f}x) is this machine's noise between two identical runs. Against `parquet`, "
        f"`ray_data` is {ray_data / parquet:.3f}x; against `memory`, {ray_data / memory:.3f}x (target: at most "
        f"1.05x).",
        "",
        f"Read rate of one worker's share of a batch ({BATCH // WORKERS} random rows), against the examples per "
        f"second the step computes ({compute:,.0f}/s from the memory median):",
        "",
        "| source | examples/s | vs the step's |",
        "|---|---|---|",
    ]
    for source, rate in rates.items():
        lines.append(f"| {source} | {rate:,.0f} | {rate / compute:.1f}x |")
    lines.append(END)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds; never writes the doc")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args(argv)
    import ray

    mode = MODES["quick" if args.quick else "full"]
    started = time.perf_counter()
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    times: dict[str, list[float]] = {source: [] for source in SOURCES}
    ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, logging_level="WARNING")
    try:
        with tempfile.TemporaryDirectory(prefix="shardstep-input-data-") as folder:
            tables = write_data(Path(folder))
            for round_index in range(mode["rounds"]):
                order = SOURCES if round_index % 2 == 0 else SOURCES[::-1]
                for source in order:
                    seconds = run(tables[source], WARMUP + mode["steps"])
                    times[source] += seconds
                    print(f"  round {round_index + 1} {source:9s} median {statistics.median(seconds) * 1e3:7.2f} ms",
                          flush=True)
            rates = {"memory": read_rate(tables["memory"], mode["reads"]),
                     "ray_data": read_rate(tables["ray_data"], mode["reads"])}
    finally:
        ray.shutdown()
    header = {"machine": machine(), "python": platform.python_version(), "ray": ray.__version__,
              "date": time.strftime("%Y-%m-%d"), "rounds": mode["rounds"],
              "command": " ".join(["python benchmarks/input_throughput.py",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "minutes": (time.perf_counter() - started) / 60, "load_before": load_before,
              "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg())}
    section = render(times, rates, header)
    print(section)
    if not args.no_write and not args.quick:
        write_section(args.doc, BEGIN, END, section)
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
