"""Checkpoint save and load: shardstep's format vs torch.save/torch.load vs raw file I/O.

    python benchmarks/checkpoint_io.py                    # 100M parameters with Adam state
    python benchmarks/checkpoint_io.py --params 1e7 --repeats 2 --no-write   # a quick look

Needs the ``bench`` extra (torch 2.13.0). The state is a 100M-parameter model (an
embedding and 16 dense layers, float32) with Adam's state (exp_avg, exp_avg_sq, a 0-d step
per parameter): ``{"model": {name: array}, "optimizer": torch-layout state_dict}``, about
1.2 GB. torch saves the same dict with tensors sharing the arrays' memory.

Every system writes the same bytes to the same directory, in turns (ours, torch, raw, ...,
the order rotating every repetition) so machine noise hits all alike; the tables give medians. Before each timed save the
target is removed and dirty pages are flushed (``os.sync``), so no run pays for the previous
one's writeback. Saves: ours fsyncs the file and its directory (durable and atomic);
torch.save does not fsync, so it is also timed followed by an fsync; raw is one sequential
``os.write`` pass, with and without fsync. Loads are timed twice: warm (the file is in the
page cache) and cold (``echo 3 > /proc/sys/vm/drop_caches`` before each, when permitted).
Ours verifies every checksum in every load. Sharded: the same state written by 2 processes
in parallel as a run checkpoint, then exported (consolidated) and loaded as 1 of 4 shards.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine, write_section  # noqa: E402
from shardstep import checkpoints  # noqa: E402
from shardstep.checkpoints import AsyncSaver, CheckpointStore, ShardLayout, open_checkpoint, write_shard  # noqa: E402

BEGIN, END = "<!-- checkpoint-io:begin -->", "<!-- checkpoint-io:end -->"
IO_BLOCK = 8 << 20


def model_shapes(total: int) -> dict[str, tuple[int, ...]]:
    """An embedding of about a third of the parameters and 16 equal dense layers."""
    width = 1024
    layer_rows = max(1, (2 * total // 3) // (16 * width))
    embed_rows = max(1, (total - 16 * layer_rows * width) // width)
    shapes = {"embed.weight": (embed_rows, width)}
    for i in range(16):
        shapes[f"layers.{i}.weight"] = (layer_rows, width)
    return shapes


def build_state(total: int) -> dict:
    rng = np.random.default_rng(0)
    model, state = {}, {}
    for index, (name, shape) in enumerate(model_shapes(total).items()):
        model[name] = rng.standard_normal(shape, dtype=np.float32)
        state[index] = {"step": np.array(10.0, np.float32),
                        "exp_avg": rng.standard_normal(shape, dtype=np.float32),
                        "exp_avg_sq": rng.random(shape, dtype=np.float32)}
    groups = [{"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0, "amsgrad": False,
               "foreach": None, "maximize": False, "capturable": False, "differentiable": False,
               "fused": None, "params": list(range(len(model)))}]
    return {"model": model, "optimizer": {"state": state, "param_groups": groups}}


def arrays_of(state: dict) -> list[np.ndarray]:
    out = list(state["model"].values())
    for entries in state["optimizer"]["state"].values():
        out += [v for v in entries.values()]
    return out


def to_torch(value, torch):
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, dict):
        return {k: to_torch(v, torch) for k, v in value.items()}
    if isinstance(value, list):
        return [to_torch(v, torch) for v in value]
    return value


# -- timing helpers -------------------------------------------------------------------------

class FsyncClock:
    """Adds up the time spent in os.fsync while installed (the call itself is unchanged)."""

    def __init__(self):
        self.seconds = 0.0
        self._real = os.fsync

    def __enter__(self):
        real = self._real

        def timed(fd):
            start = time.perf_counter()
            try:
                return real(fd)
            finally:
                self.seconds += time.perf_counter() - start

        os.fsync = timed
        return self

    def __exit__(self, *exc):
        os.fsync = self._real


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def fresh(path: Path) -> None:
    if path.exists():
        path.unlink()
    os.sync()


def raw_write(arrays, path: Path, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for array in arrays:
            view = memoryview(array.reshape(-1).view(np.uint8))
            for start in range(0, len(view), IO_BLOCK):
                os.write(fd, view[start:start + IO_BLOCK])
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def raw_read(path: Path, target: np.ndarray | None, total: int) -> None:
    buffer = np.empty(total, np.uint8) if target is None else target
    with open(path, "rb", buffering=0) as f:
        view = memoryview(buffer)
        while len(view):
            got = f.readinto(view)
            if not got:
                break
            view = view[got:]


CPU_SECONDS: dict[str, list[float]] = {}


def timed(fn, cpu_key: str | None = None) -> float:
    """Wall seconds of ``fn()``; with ``cpu_key``, also records the CPU seconds this process
    spent (all its threads, user and kernel), which other load on the machine does not
    inflate: the wall time does include waiting for a busy CPU or disk."""
    gc.collect()
    cpu = time.process_time()
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    if cpu_key is not None:
        CPU_SECONDS.setdefault(cpu_key, []).append(time.process_time() - cpu)
    return wall


# -- the sharded run checkpoint --------------------------------------------------------------

def sharded(total: int, directory: Path, shards: int) -> dict[str, float]:
    context = multiprocessing.get_context("forkserver")
    root = directory / "run"
    state_shapes = model_shapes(total)
    layout = ShardLayout.from_arrays({n: np.empty(s, np.float32) for n, s in state_shapes.items()}, shards)
    out = {}
    with CheckpointStore(root, run_id="bench") as store:
        pending = store.begin(1, layout)
        barrier = context.Barrier(shards + 1)
        procs = [context.Process(target=_sharded_writer, args=(pending, s, total, barrier))
                 for s in range(shards)]
        for p in procs:
            p.start()
        barrier.wait()  # every process has built its slices
        os.sync()
        start = time.perf_counter()
        for p in procs:
            p.join()
        out["parallel write"] = time.perf_counter() - start
        commit_start = time.perf_counter()
        groups = [{"lr": 0.001, "betas": (0.9, 0.999), "params": list(state_shapes)}]
        store.commit(pending, param_groups=groups)
        out["commit"] = time.perf_counter() - commit_start
    with open_checkpoint(root) as checkpoint:
        out["export (warm)"] = timed(checkpoint.export)
    with open_checkpoint(root) as checkpoint:
        out["load 1 of 4 shards (warm)"] = timed(lambda: checkpoint.load_shard(1, 4))
    shutil.rmtree(root)
    return out


def _sharded_writer(pending, shard: int, total: int, barrier) -> None:
    """One shard process: it builds the state only to cut its slices out (untimed), waits
    for the others, then writes its file; the parent times from the common start."""
    state = build_state(total)
    layout = pending.layout
    params, opt = {}, {}
    for index, name in enumerate(state["model"]):
        start, stop = layout.slice(name, shard)
        params[name] = np.ascontiguousarray(state["model"][name].reshape(-1)[start:stop])
        entries = state["optimizer"]["state"][index]
        opt[name] = {"step": entries["step"],
                     "exp_avg": np.ascontiguousarray(entries["exp_avg"].reshape(-1)[start:stop]),
                     "exp_avg_sq": np.ascontiguousarray(entries["exp_avg_sq"].reshape(-1)[start:stop])}
    del state
    barrier.wait()
    write_shard(pending, shard, params, opt)


# -- the report -----------------------------------------------------------------------------


def render(results: dict, header: dict, total_bytes: int) -> str:
    gb = total_bytes / 1e9

    def med(key):
        return statistics.median(results[key])

    def cpu(key):
        return statistics.median(CPU_SECONDS[key])

    def row(label, key, reference=None, note=""):
        t = med(key)
        ratio = f"{med(reference) / t:.2f}x" if reference else ""
        return f"| {label} | {t * 1e3:,.0f} | {gb / t:.2f} | {ratio} | {cpu(key) * 1e3:,.0f} | {note} |"

    lines = [
        BEGIN,
        "## Checkpoint save and load",
        "",
        f"Machine: {header['machine']}; disk: {header['disk']}. Python {header['python']}, numpy "
        f"{header['numpy']}, torch {header['torch']}, xxhash {header['xxhash']}; {header['date']}; load "
        f"average at start {header['load']}. Command: `{header['command']}`.",
        "",
        f"State: {header['params'] / 1e6:.1f}M float32 parameters in {header['tensors']} tensors with Adam's "
        f"state, {gb:.3f} GB of arrays; {header['repeats']} interleaved repetitions, medians. "
        "Ratios are the reference's time divided by the row's time (> 1: the row is faster). "
        "CPU ms is the CPU time of the benchmark process during the call (user and kernel, all "
        "threads): unlike the wall time it does not grow while other work on this shared machine "
        "holds the cores, though neither counts the kernel's background write-back.",
        "",
        "### Save",
        "",
        "| system | ms | GB/s | vs torch.save | CPU ms | note |",
        "|---|---:|---:|---:|---:|---|",
        row("shardstep dump", "ours save", "torch save", "fsync of file and directory, atomic rename, checksums"),
        row("torch.save", "torch save", "torch save", "no fsync"),
        row("torch.save + fsync", "torch save+fsync", "torch save"),
        row("raw write + fsync", "raw write+fsync", "torch save", "one sequential os.write pass"),
        row("raw write, no fsync", "raw write", "torch save", "page cache only"),
        "",
        f"shardstep dump vs raw write + fsync (same durability): "
        f"**{med('raw write+fsync') / med('ours save') * 100:.0f}%** of raw throughput. Time in fsync: "
        f"{med('ours fsync') * 1e3:,.0f} ms of ours, {med('raw fsync') * 1e3:,.0f} ms of raw. Without the "
        f"fsync time, ours takes {(med('ours save') - med('ours fsync')) * 1e3:,.0f} ms "
        f"({gb / (med('ours save') - med('ours fsync')):.2f} GB/s, "
        f"{med('torch save') / (med('ours save') - med('ours fsync')):.2f}x torch.save, which does not fsync).",
        "",
        "### Asynchronous save (time the caller is blocked)",
        "",
        "| call | ms | of the synchronous dump | CPU ms |",
        "|---|---:|---:|---:|",
        f"| AsyncSaver.dump, first call (allocates staging) | {med('async first') * 1e3:,.0f} | "
        f"{med('async first') / med('ours save') * 100:.0f}% | {cpu('async first') * 1e3:,.0f} |",
        f"| AsyncSaver.dump, next calls (staging reused) | {med('async steady') * 1e3:,.0f} | "
        f"{med('async steady') / med('ours save') * 100:.0f}% | {cpu('async steady') * 1e3:,.0f} |",
        "",
        "### Load",
        "",
        "| system | warm ms | warm GB/s | warm vs torch.load | warm CPU ms | cold ms | cold GB/s | cold vs torch.load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, key in (("shardstep load (private arrays, verified)", "ours load"),
                       ("shardstep load mmap=True (read-only, verified)", "ours mmap"),
                       ("torch.load", "torch load"),
                       ("torch.load mmap=True (lazy: reads nothing)", "torch mmap"),
                       ("raw readinto, fresh buffer", "raw read fresh"),
                       ("raw readinto, reused buffer", "raw read reused")):
        warm = med(key + " warm")
        cold_key = key + " cold"
        cells = [f"{warm * 1e3:,.0f}", f"{gb / warm:.2f}", f"{med('torch load warm') / warm:.2f}x",
                 f"{cpu(key + ' warm') * 1e3:,.0f}"]
        if results.get(cold_key):
            cold = med(cold_key)
            cells += [f"{cold * 1e3:,.0f}", f"{gb / cold:.2f}", f"{med('torch load cold') / cold:.2f}x"]
        else:
            cells += ["", "", ""]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if "parallel write" in results:
        lines += [
            "",
            f"### Sharded run checkpoint ({header['shards']} writer processes)",
            "",
            "| operation | ms | GB/s |",
            "|---|---:|---:|",
        ]
        for key in ("parallel write", "commit", "export (warm)", "load 1 of 4 shards (warm)"):
            t = med(key)
            size = gb / 4 if key.startswith("load 1 of 4") else gb
            rate = f"{size / t:.2f}" if key != "commit" else ""
            lines.append(f"| {key} | {t * 1e3:,.0f} | {rate} |")
    lines += ["", *_targets(med), "", header["notes"], END]
    return "\n".join(lines)


def _targets(med) -> list[str]:
    """The performance targets, each with this run's figure and whether it is met."""
    rows = [
        ("save >= 3x torch.save (checksums on, fsync)", med("torch save") / med("ours save"), 3.0, "x"),
        ("save >= 70% of raw write + fsync", med("raw write+fsync") / med("ours save"), 0.70, "%"),
        ("load >= 5x torch.load (private arrays, warm)", med("torch load warm") / med("ours load warm"), 5.0, "x"),
        ("load >= 5x torch.load (mmap=True, warm)", med("torch load warm") / med("ours mmap warm"), 5.0, "x"),
        ("async save blocks <= 10% of the sync save", med("async steady") / med("ours save"), 0.10, "%<"),
    ]
    lines = ["| target | this run | met |", "|---|---:|---|"]
    for name, value, goal, kind in rows:
        met = value <= goal if kind == "%<" else value >= goal
        shown = f"{value * 100:.0f}%" if kind.startswith("%") else f"{value:.2f}x"
        lines.append(f"| {name} | {shown} | {'yes' if met else 'no'} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=float, default=1e8, help="number of model parameters")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cold-repeats", type=int, default=3)
    parser.add_argument("--shards", type=int, default=2, help="writer processes of the sharded run (0: skip)")
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print the tables only")
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        parser.error("torch is not installed: pip install -e '.[bench]'")
    import xxhash

    torch.set_num_threads(os.cpu_count() or 1)
    directory = Path(tempfile.mkdtemp(prefix="checkpoint-io-", dir=args.dir))
    load_at_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    try:
        state = build_state(int(args.params))
        arrays = arrays_of(state)
        total = sum(a.nbytes for a in arrays)
        torch_state = to_torch(state, torch)
        ours, theirs, raw = directory / "ours.ckpt", directory / "torch.pt", directory / "raw.bin"
        results: dict[str, list[float]] = {}

        def record(key, seconds):
            results.setdefault(key, []).append(seconds)

        def torch_durable():
            torch.save(torch_state, theirs)
            fd = os.open(theirs, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        # (result key, file, call, whether to time its fsyncs); the order rotates every
        # repetition so no system always runs first after the previous one's deletions
        saves = [
            ("ours save", ours, lambda: checkpoints.dump(state, ours), "ours fsync"),
            ("torch save", theirs, lambda: torch.save(torch_state, theirs), None),
            ("torch save+fsync", theirs, torch_durable, None),
            ("raw write+fsync", raw, lambda: raw_write(arrays, raw, True), "raw fsync"),
            ("raw write", raw, lambda: raw_write(arrays, raw, False), None),
        ]
        # one untimed round first: the first writes of this much data make a VM fault in page-cache
        # memory its guest has not used yet (seconds of CPU for 1.2 GB, whichever writer meets
        # it), so every system is then timed on memory that has been touched once
        for _, target, call, _ in saves:
            fresh(target)
            call()
        os.sync()
        for repeat in range(args.repeats):
            for key, target, call, fsync_key in saves[repeat % len(saves):] + saves[:repeat % len(saves)]:
                fresh(target)
                with FsyncClock() as clock:
                    record(key, timed(call, key))
                if fsync_key:
                    record(fsync_key, clock.seconds)
            os.sync()
            print(f"save {repeat}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in results.items()), flush=True)
        # the loads below need all three files
        if not theirs.exists():
            torch.save(torch_state, theirs)
        if not raw.exists():
            raw_write(arrays, raw, False)

        with AsyncSaver() as saver:
            for repeat in range(args.repeats):
                target = directory / f"async{repeat % 2}.ckpt"
                fresh(target)
                key = "async first" if repeat == 0 else "async steady"
                record(key, timed(lambda: saver.dump(state, target), key))
                saver.wait()
            if args.repeats == 1:
                results["async steady"] = results["async first"]
                CPU_SECONDS["async steady"] = CPU_SECONDS["async first"]
        for repeat in range(2):
            (directory / f"async{repeat}.ckpt").unlink(missing_ok=True)

        reused = np.empty(total, np.uint8)
        reused.fill(0)
        cases = {
            "ours load": lambda: checkpoints.load(ours),
            "ours mmap": lambda: checkpoints.load(ours, mmap=True),
            "torch load": lambda: torch.load(theirs),
            "torch mmap": lambda: torch.load(theirs, mmap=True),
            "raw read fresh": lambda: raw_read(raw, None, total),
            "raw read reused": lambda: raw_read(raw, reused, total),
        }
        for name, fn in cases.items():
            fn()  # into the page cache
        names = list(cases)
        for repeat in range(args.repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                record(name + " warm", timed(cases[name], name + " warm"))
        cold_possible = drop_caches()
        if cold_possible:
            for repeat in range(args.cold_repeats):
                for name in names[repeat % len(names):] + names[:repeat % len(names)]:
                    drop_caches()
                    record(name + " cold", timed(cases[name]))
        del reused
        print({k: f"{statistics.median(v) * 1e3:.0f} ms" for k, v in results.items()}, flush=True)

        for path in (ours, theirs, raw):
            path.unlink()
        del torch_state, state, arrays
        gc.collect()
        if args.shards:
            for repeat in range(max(1, args.repeats // 2)):
                for key, seconds in sharded(int(args.params), directory, args.shards).items():
                    record(key, seconds)

        notes = [
            "What limits each. **Saves** that fsync are bound by the disk's write-back (the fsync "
            "time above); shardstep's dump is one pass of page-cache writes of the arrays' own memory "
            "with an XXH3-64 of each 1 MiB chunk taken while the chunk is hot in cache (about 50 ms of "
            "CPU for 1.2 GB), so it tracks the raw write. torch.save spends its time in pickling and "
            "its zip writer and does not fsync: against it, a durable save can only win by the margin "
            "the raw page-cache write has over torch.save, which is the '3x torch.save' target's "
            "ceiling on this disk. **Asynchronous saves** block for one copy of the state into "
            "staging buffers: memory bandwidth on the steady path (buffers reused), plus the first "
            "touch of fresh memory on the first call (on this VM, memory the guest never used before "
            "costs about 2 s per 1.2 GB to fault in, in numpy's huge pages or not).",
            "**Loads into private arrays** are bound by the kernel copying page-cache pages into the "
            "new arrays and by faulting that memory in (the raw read into one fresh 1.2 GB buffer "
            "is slower still); checksums add about 50 ms. **mmap loads** only map the page cache and "
            "checksum it. torch.load with mmap=True reads nothing until the tensors are used and "
            "verifies nothing, so its row is not a like-for-like load. **Cold loads** are bound by "
            "the disk's read rate.",
            f"Cold runs drop the page cache before each load: {'yes (as root)' if cold_possible else 'not permitted here: cold columns are empty'}.",
        ]
        header = {
            "machine": machine(), "disk": _disk(directory), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "xxhash": xxhash.VERSION,
            "date": time.strftime("%Y-%m-%d"), "load": load_at_start,
            "command": "python benchmarks/checkpoint_io.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "params": sum(int(np.prod(s)) for s in model_shapes(int(args.params)).values()),
            "tensors": len(model_shapes(int(args.params))) * 4, "repeats": args.repeats,
            "shards": args.shards, "notes": "\n\n".join(notes),
        }
        section = render(results, header, total)
        print(section)
        if not args.no_write:
            write_section(args.doc, BEGIN, END, section)
            print(f"wrote {args.doc}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


def _disk(directory: Path) -> str:
    stat = os.statvfs(directory)
    device = "unknown"
    try:
        best = ""
        for line in open("/proc/mounts"):
            source, target, kind = line.split()[:3]
            if str(directory.resolve()).startswith(target) and len(target) >= len(best):
                best, device = target, f"{kind} on {source}"
    except OSError:
        pass
    return f"{device}, {stat.f_bavail * stat.f_frsize / 2**30:.0f} GiB free"


if __name__ == "__main__":
    sys.exit(main())
