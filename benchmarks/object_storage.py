"""Run checkpoints on object storage: save and load through an S3-compatible server against
the raw transfer of the same bytes with the same client, and what an asynchronous save blocks.

    python benchmarks/object_storage.py --no-write                          # 100M parameters with Adam state
    python benchmarks/object_storage.py --params 1e6 --repeats 1 --no-write   # a quick look

Needs the ``test`` extra (obstore, moto[server]). The server is moto's standalone S3 server on
127.0.0.1 behind the tests' TCP relay (``tests/objectstore.py``), started and stopped by this
script; its AWS_* variables are set before any client exists. Nothing leaves the machine.

The state: ``--params`` float32 parameters in 4 large parameters of shape (rows, 1024), with
Adam's state (exp_avg, exp_avg_sq, a 0-d step per parameter), split into ``--shards`` shards by
:class:`ShardLayout` (values as in ``tests/checkpoints/processes.py::expected_shard``). Each
shard is held by a process of its own (spawned), which builds its slices once and does every
transfer of that shard, so all shards move in parallel, as the shard actors of a run would.

Every repetition (the order of the systems rotating each time; the tables give medians):

- **Save.** shardstep: ``store.begin`` + ``write_shard`` in every shard process + ``store.commit``
  (parent wall time). Raw: every shard process uploads the same arrays (8 MiB blocks) as one
  plain object with ``storage.put_object``, the call shardstep's writer uses, so the same
  obstore client, part size (``PART_SIZE``) and parts in flight (``PART_CONCURRENCY``).
- **Load.** shardstep: ``open_checkpoint(url).load_shard(shard, shards)`` in every shard
  process, every checksum verified. Raw: the plain objects read into a buffer allocated just
  before (untouched, so both pay the same page faults), by 8 MiB ranged GETs, ``READ_CONCURRENCY``
  in flight (the requests shardstep's reader makes) and by one streamed GET per object. Each load is
  compared with the shard's source arrays afterwards (untimed).
- **Async.** ``AsyncSaver.write_shard`` in every shard process: the time its caller is blocked
  (the staging copy) against that process's synchronous ``write_shard`` of the same repetition;
  then ``wait()`` and commit. The first call allocates the staging buffers, later ones reuse them.

The repetition's objects are then deleted (moto keeps every object it holds). CPU columns are
CPU seconds (user + kernel, all threads) during the operation of moto's server process (from
/proc), of this script's main process, which during a transfer only runs the relay's threads
(and begin/commit for shardstep's save), and of the shard processes (the obstore client).
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import platform
import secrets
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine, write_section  # noqa: E402
from shardstep.checkpoints import AsyncSaver, CheckpointStore, ShardLayout, open_checkpoint, write_shard  # noqa: E402
from shardstep.checkpoints.format import IO_BLOCK  # noqa: E402
from shardstep.checkpoints.layout import ParamSpec  # noqa: E402
from shardstep.checkpoints.run import step_directory  # noqa: E402
from shardstep.checkpoints.storage import (  # noqa: E402
    PART_CONCURRENCY,
    PART_SIZE,
    READ_CONCURRENCY,
    ObjectPath,
    put_object,
)
from tests.checkpoints.processes import expected_shard  # noqa: E402
from tests.objectstore import BUCKET, S3Server, restore_environment, set_environment  # noqa: E402

BEGIN, END = "<!-- object-storage:begin -->", "<!-- object-storage:end -->"
WIDTH = 1024
NAMES = ("embed.weight", "layers.0.weight", "layers.1.weight", "head.weight")
STATE_KEYS = ("exp_avg", "exp_avg_sq")
VALUES_STEP = 7  # the step whose expected_shard values every shard holds


def param_specs(total: int) -> tuple[ParamSpec, ...]:
    """4 parameters of equal shape (rows, 1024), about ``total`` elements together."""
    rows = max(1, total // (len(NAMES) * WIDTH))
    return tuple(ParamSpec(name, (rows, WIDTH), "float32") for name in NAMES)


def shard_arrays(params: dict, state: dict) -> list[np.ndarray]:
    """A shard's 1-D arrays in the order its file holds them: the parameters, then each
    parameter's exp_avg and exp_avg_sq."""
    return [params[name] for name in params] + [state[name][key] for name in params for key in STATE_KEYS]


# -- the shard processes ----------------------------------------------------------------------


class ReadRequests:
    """Counts the read requests (GET, ranged GET, HEAD, LIST) this process makes through
    obstore: shardstep's storage layer looks the functions up on the module at every call,
    so wrapping them there sees every request, shardstep's and the raw transfers' alike."""

    NAMES = ("get", "get_range", "get_ranges", "head", "list", "list_with_delimiter")

    def __init__(self) -> None:
        self.count = 0

    def install(self) -> ReadRequests:
        import obstore

        for name in self.NAMES:
            def counted(*args, _real=getattr(obstore, name), **kwargs):
                self.count += 1
                return _real(*args, **kwargs)

            setattr(obstore, name, counted)
        return self


REQUESTS = ReadRequests()


def _clocked(fn) -> tuple[Any, float, float]:
    """``fn()``'s value, wall seconds and this process's CPU seconds (all threads)."""
    gc.collect()
    cpu = time.process_time()
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start, time.process_time() - cpu


def _worker(shard: int, specs: tuple[ParamSpec, ...], num_shards: int, environment: dict[str, str],
            connection: Any) -> None:
    """One shard's process: builds its slices, then serves the parent's commands (one at a
    time, answered with ``("ok", result)`` or ``("error", traceback)``) until told to stop."""
    os.environ.update(environment)
    REQUESTS.install()
    layout = ShardLayout(specs, num_shards)
    params, state = expected_shard(layout, shard, VALUES_STEP)
    arrays = shard_arrays(params, state)
    size = sum(array.nbytes for array in arrays)
    saver = AsyncSaver()

    def blocks():
        for array in arrays:
            view = memoryview(array.view(np.uint8))
            for start in range(0, len(view), IO_BLOCK):
                yield view[start:start + IO_BLOCK]

    def check_raw(buffer: np.ndarray) -> None:
        at = 0
        for array in arrays:
            if not np.array_equal(buffer[at:at + array.nbytes], array.view(np.uint8)):
                raise AssertionError(f"shard {shard}: the raw object does not hold the uploaded bytes")
            at += array.nbytes

    def save(pending):
        _, seconds, cpu = _clocked(lambda: write_shard(pending, shard, params, state))
        return {"seconds": seconds, "cpu": cpu}

    def raw_save(url):
        _, seconds, cpu = _clocked(lambda: put_object(ObjectPath(url), blocks()))
        return {"seconds": seconds, "cpu": cpu}

    def load(root):
        def run():
            with open_checkpoint(root) as checkpoint:
                return checkpoint.load_shard(shard, num_shards)

        loaded, seconds, cpu = _clocked(run)
        for name in params:
            same = np.array_equal(loaded["params"][name], params[name]) and all(
                np.array_equal(loaded["state"][name][key], state[name][key]) for key in STATE_KEYS)
            if not same or float(loaded["state"][name]["step"]) != VALUES_STEP:
                raise AssertionError(f"shard {shard}: load_shard returned other values for {name!r}")
        return {"seconds": seconds, "cpu": cpu}

    def raw_load(url, whole):
        import obstore

        path = ObjectPath(url)
        store = path.store
        buffer = np.empty(size, np.uint8)
        view = memoryview(buffer)

        def ranged():
            # as many ranged GETs in flight as shardstep's reader keeps (READ_CONCURRENCY)
            from concurrent.futures import ThreadPoolExecutor

            def fetch(start):
                stop = min(size, start + IO_BLOCK)
                view[start:stop] = obstore.get_range(store, path.key, start=start, end=stop)

            with ThreadPoolExecutor(READ_CONCURRENCY) as pool:
                list(pool.map(fetch, range(0, size, IO_BLOCK)))

        def streamed():
            at = 0
            for chunk in obstore.get(store, path.key).stream(min_chunk_size=IO_BLOCK):
                view[at:at + len(chunk)] = chunk
                at += len(chunk)
            if at != size:
                raise AssertionError(f"shard {shard}: the GET returned {at} bytes of {size}")

        _, seconds, cpu = _clocked(streamed if whole else ranged)
        check_raw(buffer)
        return {"seconds": seconds, "cpu": cpu}

    def save_async(pending):
        start = time.perf_counter()
        cpu = time.process_time()
        saver.write_shard(pending, shard, params, state)
        blocked, blocked_cpu = time.perf_counter() - start, time.process_time() - cpu
        saver.wait()
        return {"seconds": blocked, "cpu": blocked_cpu, "until_written": time.perf_counter() - start}

    handlers = {"save": save, "raw save": raw_save, "load": load, "raw load": raw_load, "async": save_async}
    connection.send(size)
    try:
        while True:
            message = connection.recv()
            if message is None:
                return
            kind, *arguments = message
            try:
                before = REQUESTS.count
                answer = handlers[kind](*arguments)
                connection.send(("ok", {**answer, "reads": REQUESTS.count - before}))
            except BaseException:
                connection.send(("error", traceback.format_exc()))
    finally:
        saver.close()


class Worker:
    """The parent's end of one shard process."""

    def __init__(self, context: Any, shard: int, specs: tuple[ParamSpec, ...], num_shards: int,
                 environment: dict[str, str]):
        self.shard = shard
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(shard, specs, num_shards, environment, child),
                                       name=f"shard-{shard}", daemon=True)
        self.process.start()
        child.close()
        self.size: int | None = None

    def ready(self) -> int:
        self.size = self.connection.recv()
        return self.size

    def result(self) -> dict:
        kind, value = self.connection.recv()
        if kind == "error":
            raise RuntimeError(f"shard process {self.shard} failed:\n{value}")
        return value

    def stop(self) -> None:
        try:
            self.connection.send(None)
        except OSError:
            pass
        self.process.join(60)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def in_parallel(workers: list[Worker], messages: list[tuple]) -> list[dict]:
    """Send every worker its command, then collect every answer."""
    for worker, message in zip(workers, messages):
        worker.connection.send(message)
    return [worker.result() for worker in workers]


# -- the parent ------------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """CPU seconds (user + kernel, all threads) a process has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_memory(pid: int) -> float:
    """A process's peak resident memory, GiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


class Bench:
    def __init__(self, server: S3Server, workers: list[Worker]):
        self.server = server
        self.workers = workers
        self.results: dict[str, list[dict]] = {}

    def measure(self, key: str, run) -> dict:
        """Time ``run()`` (which returns the shard processes' answers) in the parent, with
        the CPU of the server, of this process and of the shard processes."""
        gc.collect()
        pid = self.server.process.pid
        server_cpu, own_cpu, down = process_cpu(pid), time.process_time(), self.server.relay.bytes_down
        reads = REQUESTS.count
        start = time.perf_counter()
        answers, extra = run()
        wall = time.perf_counter() - start
        record = {
            "wall": wall, "server cpu": process_cpu(pid) - server_cpu, "main cpu": time.process_time() - own_cpu,
            "client cpu": sum(answer["cpu"] for answer in answers), "received": self.server.relay.bytes_down - down,
            "reads": REQUESTS.count - reads + sum(answer["reads"] for answer in answers),
            "shards": answers, **extra,
        }
        self.results.setdefault(key, []).append(record)
        return record


def delete_all(paths: list[ObjectPath]) -> None:
    for path in paths:
        objects = path.walk()
        if objects:
            path.delete(list(objects))
        if path.is_file():
            path.delete()


def median(values) -> float:
    return statistics.median(values)


def render(bench: Bench, header: dict) -> str:
    results = bench.results
    mb = 1e6

    def med(key, field="wall"):
        return median(record[field] for record in results[key])

    def rate(key, size):
        return size / med(key) / mb

    ours_bytes, raw_bytes = header["file bytes"], header["raw bytes"]
    save_rate, raw_save_rate = rate("save ours", ours_bytes), rate("save raw", raw_bytes)
    load_rate = rate("load ours", ours_bytes)
    ranged_rate = rate("load raw ranged", raw_bytes)

    def row(label, key, size, ours_rate, note=""):
        cells = [f"{med(key) * 1e3:,.0f}", f"{rate(key, size):,.0f}", f"{ours_rate / rate(key, size) * 100:.0f}%",
                 f"{med(key, 'server cpu'):.1f}", f"{med(key, 'main cpu'):.1f}", f"{med(key, 'client cpu'):.1f}",
                 f"{med(key, 'reads'):,.0f}"]
        if key.startswith("load"):
            cells.append(f"{med(key, 'received') / mb:,.0f}")
        return f"| {label} | " + " | ".join(cells + [note]) + " |"

    columns = ("| system | ms | MB/s | shardstep's MB/s as % of this | server CPU s | main process (relay) CPU s "
               "| shard processes CPU s | read requests | note |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---|"
    load_columns = columns.replace("| note |", "| MB received | note |")
    load_rule = rule[:-len("---|")] + "---:|---|"
    shards = header["shards"]
    # async: per (repetition, shard): blocked time and its share of that shard's synchronous write
    first = [shard["seconds"] for shard in results["async"][0]["shards"]]
    later = [shard["seconds"] for record in results["async"][1:] for shard in record["shards"]] or first
    sync_of = [[shard["seconds"] for shard in record["shards"]] for record in results["save ours"]]
    shares = [[a["seconds"] / s for a, s in zip(record["shards"], sync)]
              for record, sync in zip(results["async"], sync_of)]
    first_share = median(shares[0])
    later_share = median([x for share in shares[1:] for x in share] or shares[0])
    sync_write = median(x for sync in sync_of for x in sync)
    written = median(shard["until_written"] for record in results["async"] for shard in record["shards"])
    written_share = median(shard["until_written"] / s for record, sync in zip(results["async"], sync_of)
                           for shard, s in zip(record["shards"], sync))
    targets = [
        ("save >= 80% of raw (same client, part size and concurrency)", save_rate / raw_save_rate, 0.80, ">="),
        ("load >= 80% of raw (8 MiB ranged GETs, the same requests)", load_rate / ranged_rate, 0.80, ">="),
        ("async save blocks <= 10% of the synchronous save (staging reused)", later_share, 0.10, "<="),
    ]
    lines = [
        BEGIN,
        "## Checkpoints on object storage",
        "",
        f"Machine: {header['machine']}. Python {header['python']}, numpy {header['numpy']}, obstore "
        f"{header['obstore']}, moto {header['moto']} (its standalone server on 127.0.0.1, behind the tests' "
        f"TCP relay); {header['date']}; load average at start {header['load']}, at the end {header['load end']} "
        f"(other work on this machine shares the cores). Command: `{header['command']}`.",
        "",
        f"State: {header['params'] / 1e6:.1f}M float32 parameters in {len(NAMES)} parameters of shape "
        f"{header['shape']} with Adam's state (exp_avg, exp_avg_sq, a 0-d step), {raw_bytes / 1e9:.3f} GB of "
        f"arrays in {shards} shards, each written and read by its own process, all in parallel (shard files "
        f"{ours_bytes / 1e9:.3f} GB with their headers). {header['repeats']} repetition(s), the order rotating, "
        f"medians. Uploads: parts of {PART_SIZE >> 20} MiB, {PART_CONCURRENCY} in flight per object. "
        "CPU: seconds used during the operation by moto's server process, by this script's main process "
        "(which runs the relay's threads; for shardstep's save also begin and commit) and by the shard "
        "processes (the obstore client). Read requests: GET, ranged GET, HEAD and LIST calls made through "
        "obstore (uploads not counted). MB received: bytes the relay carried from the server to the clients.",
        "",
        "### Save",
        "",
        columns,
        rule,
        row(f"shardstep: begin + write_shard x{shards} + commit", "save ours", ours_bytes, save_rate,
            f"checksums; commit {med('save ours', 'commit') * 1e3:,.0f} ms, "
            f"{med('save ours', 'commit reads'):,.0f} read requests"),
        row("raw: put_object of the same arrays, one object per shard", "save raw", raw_bytes, save_rate),
        "",
        "### Load",
        "",
        load_columns,
        load_rule,
        row(f"shardstep: open_checkpoint + load_shard x{shards}", "load ours", ours_bytes, load_rate,
            "every checksum verified"),
        row("raw: 8 MiB ranged GETs, 4 in flight", "load raw ranged", raw_bytes, load_rate,
            "the requests shardstep makes"),
        row("raw: one streamed GET per object", "load raw whole", raw_bytes, load_rate),
        "",
        "### Asynchronous save (time a shard's caller is blocked)",
        "",
        "| call | ms per shard | of that shard's synchronous write_shard |",
        "|---|---:|---:|",
        f"| write_shard (synchronous) | {sync_write * 1e3:,.0f} | 100% |",
        f"| AsyncSaver.write_shard, first call (allocates staging) | {median(first) * 1e3:,.0f} | "
        f"{first_share * 100:.1f}% |",
        f"| AsyncSaver.write_shard, next calls (staging reused) | {median(later) * 1e3:,.0f} | "
        f"{later_share * 100:.1f}% |",
        f"| AsyncSaver.write_shard until wait() returns (the upload) | {written * 1e3:,.0f} | "
        f"{written_share * 100:.0f}% |",
        "",
        "| target | this run | met |",
        "|---|---:|---|",
    ]
    for name, value, goal, kind in targets:
        met = value >= goal if kind == ">=" else value <= goal
        lines.append(f"| {name} | {value * 100:.{1 if kind == '<=' else 0}f}% | {'yes' if met else 'no'} |")
    lines += ["", header["notes"], END]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1e8, help="number of model parameters")
    parser.add_argument("--shards", type=int, default=2, help="shards, each in a process of its own")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    if args.shards < 1 or args.repeats < 1:
        parser.error("--shards and --repeats must be at least 1")
    import moto
    import obstore

    specs = param_specs(int(args.params))
    load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    started = time.perf_counter()
    REQUESTS.install()
    server = S3Server()
    previous = set_environment(server.environment())
    workers: list[Worker] = []
    try:
        context = multiprocessing.get_context("spawn")
        workers = [Worker(context, s, specs, args.shards, server.environment()) for s in range(args.shards)]
        raw_bytes = sum(worker.ready() for worker in workers)
        print(f"{len(workers)} shard processes ready ({raw_bytes / 1e9:.3f} GB of arrays) after "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        bench = Bench(server, workers)
        prefix = ObjectPath(f"s3://{BUCKET}/object-storage-{secrets.token_hex(4)}")
        root = prefix / "run"
        layout = ShardLayout(specs, args.shards)
        groups = [{"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0, "params": list(NAMES)}]
        file_bytes = None
        step = 0
        with CheckpointStore(str(root), run_id="bench") as store:
            for repeat in range(args.repeats):
                step += 1
                save_step = step
                raw = [prefix / f"raw-{repeat}" / f"shard-{s:05d}" for s in range(args.shards)]

                def ours_save():
                    begun = time.perf_counter()
                    pending = store.begin(save_step, layout)
                    answers = in_parallel(workers, [("save", pending)] * len(workers))
                    written, reads = time.perf_counter(), REQUESTS.count
                    store.commit(pending, param_groups=groups)
                    return answers, {"begin+write": written - begun, "commit": time.perf_counter() - written,
                                     "commit reads": REQUESTS.count - reads}

                saves = [("save ours", ours_save),
                         ("save raw", lambda: (in_parallel(workers, [("raw save", str(p)) for p in raw]), {}))]
                loads = [("load ours", lambda: (in_parallel(workers, [("load", str(root))] * len(workers)), {})),
                         ("load raw ranged",
                          lambda: (in_parallel(workers, [("raw load", str(p), False) for p in raw]), {})),
                         ("load raw whole",
                          lambda: (in_parallel(workers, [("raw load", str(p), True) for p in raw]), {}))]
                for key, run in saves[repeat % len(saves):] + saves[:repeat % len(saves)]:
                    bench.measure(key, run)
                if file_bytes is None:
                    directory = step_directory(root, save_step)
                    file_bytes = sum(size for name, size in directory.walk().items() if name != "manifest.ckpt")
                for key, run in loads[repeat % len(loads):] + loads[:repeat % len(loads)]:
                    bench.measure(key, run)

                step += 1
                async_step = step

                def async_save():
                    pending = store.begin(async_step, layout)
                    answers = in_parallel(workers, [("async", pending)] * len(workers))
                    store.commit(pending, param_groups=groups)
                    return answers, {}

                bench.measure("async", async_save)
                delete_all([step_directory(root, save_step), step_directory(root, async_step), *raw])
                print(f"repetition {repeat}: " + ", ".join(
                    f"{key} {records[-1]['wall'] * 1e3:,.0f} ms" for key, records in bench.results.items())
                    + "; async blocked " + "/".join(f"{a['seconds'] * 1e3:,.0f}"
                                                    for a in bench.results["async"][-1]["shards"]) + " ms",
                    flush=True)
        elapsed = time.perf_counter() - started
        server_peak = peak_memory(server.process.pid)
        results = bench.results

        def med(key, field):
            return median(record[field] for record in results[key])

        def busy(key):
            return f"{med(key, 'server cpu') / med(key, 'wall') * 100:.0f}%"

        notes = [
            "Where the time goes. moto's server is one Python process: its CPU per second of wall time was "
            f"{busy('save ours')} (shardstep's save), {busy('save raw')} (raw save), {busy('load ours')} "
            f"(shardstep's load), {busy('load raw ranged')} (raw ranged GETs) and {busy('load raw whole')} "
            "(one GET per object), against 100% for one core. moto materializes the whole object for every "
            "ranged GET (it reads the key's value, then slices it), so a ranged GET costs in proportion to the "
            "object's size: loads by 8 MiB ranges are quadratic in the shard file's size on this server, "
            "whoever makes them; a real S3 serves a range at its own cost. The raw streamed GET shows what one "
            "request per object gets from the same server and client. Requests: shardstep's commit read "
            f"{med('save ours', 'commit reads'):,.0f} times (every shard file's size, preamble, header and 0-d state "
            f"read back to build the manifest), its load made {med('load ours', 'reads'):,.0f} read requests "
            f"against {med('load raw ranged', 'reads'):,.0f} for the raw ranged GETs of the same bytes; on this "
            "server each one costs in proportion to the size of the object it reads.",
            f"The whole run took {elapsed:.0f} s; moto's server peaked at {server_peak:.1f} GiB resident "
            "(objects above 5 MiB live in its temporary files).",
        ]
        shape = specs[0].shape
        header = {
            "machine": machine(), "python": platform.python_version(), "numpy": np.__version__,
            "obstore": obstore.__version__, "moto": moto.__version__, "date": time.strftime("%Y-%m-%d"),
            "load": load_at_start, "load end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "command": "python benchmarks/object_storage.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "params": sum(spec.numel for spec in specs), "shape": f"({shape[0]:,}, {shape[1]:,})",
            "shards": args.shards, "repeats": args.repeats, "raw bytes": raw_bytes, "file bytes": file_bytes,
            "notes": "\n\n".join(notes),
        }
        section = render(bench, header)
        print(section)
        if not args.no_write:
            write_section(args.doc, BEGIN, END, section)
            print(f"wrote {args.doc}")
    finally:
        for worker in workers:
            worker.stop()
        server.stop()
        restore_environment(previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
