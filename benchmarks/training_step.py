"""One training step (data, forward, loss, backward, Adam): shardstep's loop vs the same model in torch.

    python benchmarks/training_step.py                      # digits, synthetic-mlp 1M and 10M; 1 and 2 threads
    python benchmarks/training_step.py --cases digits --threads 1 --no-write   # a quick look

Needs the ``bench`` extra (torch 2.13.0). Each thread count runs in its own process, with
OPENBLAS/OMP/MKL/NUMBA thread counts set before numpy loads and ``torch.set_num_threads``.
shardstep's step is ``Trainer.step()`` of the local loop (the task's batch, the model's
forward and backward through ``shardstep.workers.nn``, the summable loss, ``Adam.step``). torch's step
is the same MLP (``nn.Sequential`` of ``nn.Linear`` and ``nn.ReLU``, same initial weights),
``nn.CrossEntropyLoss``, ``zero_grad`` / ``backward`` and ``torch.optim.Adam`` on the same
batches, gathered from the same numpy arrays. torch's Adam runs twice: fused (its fastest CPU
kernel; the ratio uses it) and default (what ``Adam(params)`` gives on CPU). All steps
alternate (ours, torch fused, torch default, ours, ...) so machine noise hits each alike;
tables give medians (p90).

Where the time goes, measured in the same process with the same interleaving:
``gemm`` is the step's matrix products alone at the same shapes (three per layer, two for
the first, whose input gradient neither computes), and ``adam`` is the
optimizer step alone; ``rest`` = step - gemm - adam: elementwise work (bias, ReLU, the
loss), gathering the batch, and Python overhead.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.report import machine, write_section  # noqa: E402

BEGIN, END = "<!-- training-step:begin -->", "<!-- training-step:end -->"
# case -> (task name, task kwargs, batch size, timed steps)
CASES = {
    "digits": ("digits", {}, 64, 400),
    "mlp-1M": ("synthetic-mlp", {"params": 1_000_000}, 128, 60),
    "mlp-10M": ("synthetic-mlp", {"params": 10_000_000}, 128, 20),
}
NOTES = [
    "Notes. With one thread per pool the step is matrix products (OpenBLAS here is at least as "
    "fast as torch's MKL on this CPU) plus, for the small digits model, per-call Python overhead "
    "in the layers, the loss and the optimizer. With two threads and the default environment a "
    "small model collapses: each numba parallel region leaves its OpenMP worker spinning (libgomp "
    "spins before it sleeps) while OpenBLAS's worker needs that core for the next GEMM, and the "
    "other way round; every switch between the two pools then waits for a scheduler time slice "
    "(the alternating column). `OMP_WAIT_POLICY=PASSIVE` makes numba's workers sleep at once: the "
    "switch is cheap, at the price of a wake-up per parallel kernel. In the two-thread runs "
    "torch shares its process, hence its cores, with shardstep's idle pools, so its figures there "
    "(a negative 'rest') carry some of that cost too. This machine is shared: compare the load "
    "averages, and trust the one-thread rows most.",
]

# shardstep's step in the order Trainer.step runs it
PHASES = ("data", "forward", "loss", "backward", "optimizer")
THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


# ---------------------------------------------------------------------------------------
# the measuring process (one thread count)


def _median_p90(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]


def measure_case(case: str, threads: int, repeats_scale: float) -> dict:
    import numpy as np
    import torch

    from shardstep.workers.tasks import make_task
    from shardstep.workers.training import Trainer

    torch.set_num_threads(threads)
    task_name, task_kwargs, batch_size, steps = CASES[case]
    steps = max(5, int(steps * repeats_scale))
    task = make_task(task_name, **task_kwargs)
    trainer = Trainer(task, seed=0, batch_size=batch_size, optimizer="adam", optimizer_kwargs={"lr": 1e-3})
    sizes = task.sizes

    def torch_model():
        layers = []
        for index, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            if index:
                layers.append(torch.nn.ReLU())
            layers.append(torch.nn.Linear(fan_in, fan_out))
        model = torch.nn.Sequential(*layers)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(torch.from_numpy(trainer.params[name].data))
        return model

    references = {}
    for impl, options in (("fused", {"fused": True}), ("default", {})):
        model = torch_model()
        references[impl] = (model, torch.optim.Adam(model.parameters(), lr=1e-3, **options))
    criterion = torch.nn.CrossEntropyLoss()
    data = task._data()
    order = np.random.default_rng(0).permutation(task.train_size)
    position = {"fused": 0, "default": 0}

    def torch_step(impl: str) -> None:
        model, optimizer = references[impl]
        start = position[impl] * batch_size % (task.train_size - batch_size)
        position[impl] += 1
        rows = order[start:start + batch_size]
        x = torch.from_numpy(data.train_inputs[rows])
        y = torch.from_numpy(data.train_labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()

    # the matrix products alone, at the step's shapes
    rng = np.random.default_rng(1)
    dtype = np.float32
    layers = list(itertools.pairwise(sizes))
    acts = [rng.standard_normal((batch_size, fan_in), dtype=dtype) for fan_in, _ in layers]
    grads = [rng.standard_normal((batch_size, fan_out), dtype=dtype) for _, fan_out in layers]
    weights = [rng.standard_normal((fan_out, fan_in), dtype=dtype) for fan_in, fan_out in layers]
    t_acts, t_grads, t_weights = ([torch.from_numpy(a) for a in group] for group in (acts, grads, weights))

    # both skip the first layer's input gradient (the data needs none)
    def ours_gemm() -> None:
        for index, (x, g, w) in enumerate(zip(acts, grads, weights)):
            x @ w.T          # forward
            g.T @ x          # weight gradient
            if index:
                g @ w        # input gradient

    def torch_gemm() -> None:
        for index, (x, g, w) in enumerate(zip(t_acts, t_grads, t_weights)):
            x @ w.T
            g.T @ x
            if index:
                g @ w

    ours_opt = trainer.optimizer
    fused_opt = references["fused"][1]
    trainer.step()  # grads in place for the optimizer-only timing
    for _ in range(3):
        torch_step("fused")

    # shardstep's step taken apart: the same calls Trainer.step makes, timed one by one
    from shardstep.workers.nn import CrossEntropyLoss

    bound, criterion_sum = task._model(), CrossEntropyLoss(reduction="sum")
    phase_times: dict[str, list[float]] = {name: [] for name in PHASES}

    def stream():
        for epoch in itertools.count():
            yield from task.batches(1, epoch, batch_size)

    batches = stream()

    def phases() -> None:
        marks = [time.perf_counter()]
        batch = next(batches)
        marks.append(time.perf_counter())
        bound.bind(trainer._views)
        logits = bound.module.forward(batch.data["inputs"])
        marks.append(time.perf_counter())
        criterion_sum(logits, batch.data["labels"])
        grad_logits = criterion_sum.backward(1.0 / batch.global_size)
        marks.append(time.perf_counter())
        bound.module.backward(grad_logits)
        marks.append(time.perf_counter())
        trainer._set_grads(bound.grads())
        ours_opt.step()
        marks.append(time.perf_counter())
        for name, start, stop in zip(PHASES, marks[:-1], marks[1:]):
            phase_times[name].append(stop - start)

    timers = {
        "ours": trainer.step,
        "torch_fused": lambda: torch_step("fused"),
        "torch_default": lambda: torch_step("default"),
        "ours_gemm": ours_gemm,
        "torch_gemm": torch_gemm,
        "ours_adam": ours_opt.step,
        "torch_adam": fused_opt.step,
    }
    for fn in timers.values():  # warm-up: compilation, allocation, page faults
        for _ in range(3):
            fn()
    times = {key: [] for key in timers}
    for _ in range(steps):
        for key, fn in timers.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
        phases()
    result = {"case": case, "threads": threads, "batch": batch_size, "steps": steps, "sizes": list(sizes),
              "params": sum(p.size for p in trainer.params.values())}
    for key, values in times.items():
        result[key], result[key + "_p90"] = _median_p90(values)
    for key, values in phase_times.items():
        result["phase_" + key] = statistics.median(values)
    return result


def measure_pool_switch(repeats: int = 300) -> dict:
    """A numba parallel loop (20,000 floats, as an optimizer kernel) and a small OpenBLAS GEMM
    (64x64 by 64x256, as a digits layer), each alone and alternating: the price of handing the
    cores from numba's thread pool to OpenBLAS's and back."""
    import numpy as np
    from numba import njit, prange

    @njit(parallel=True, nogil=True)
    def scale(a):
        for i in prange(a.size):
            a[i] = a[i] * np.float32(0.999) + np.float32(1e-3)

    vector = np.ones(20_000, np.float32)
    x, w = np.ones((64, 64), np.float32), np.ones((256, 64), np.float32)
    scale(vector)

    def both() -> None:
        scale(vector)
        x @ w.T

    timings = {}
    for key, fn in (("kernel", lambda: scale(vector)), ("gemm", lambda: x @ w.T), ("alternating", both)):
        values = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            values.append(time.perf_counter() - start)
        timings[key] = statistics.median(values)
    return timings


def child(args: argparse.Namespace) -> int:
    results = [measure_case(case, args.child, args.repeats_scale) for case in args.cases]
    print(json.dumps({"rows": results, "switch": measure_pool_switch()}))
    return 0


# ---------------------------------------------------------------------------------------
# the driver: one process per thread count, then the table


def _ms(value: float) -> str:
    return f"{value * 1e3:.3f}" if value < 0.01 else f"{value * 1e3:.2f}" if value < 0.1 else f"{value * 1e3:.1f}"


def _setting(row: dict) -> str:
    return f"{row['threads']}" + ("" if row["env"] == "default" else f" {row['env']}")


def render(rows: list[dict], header: dict) -> str:
    lines = [
        BEGIN,
        "## One training step (float32, Adam): shardstep's local loop vs torch",
        "",
        f"Machine: {header['machine']}. numpy {header['numpy']} (BLAS: {header['blas']}), numba "
        f"{header['numba']}, torch {header['torch']} (MKL), Python {header['python']}. Measured "
        f"{header['date']}; load average {header['load_before']} before, {header['load_after']} after.",
        "",
        f"Command: `{header['command']}`",
        "",
        "Medians (p90) of interleaved steps; ratio = shardstep ms / torch (fused Adam) ms, <= 1.0 "
        "means shardstep is no slower. threads: the thread count of every pool (OpenBLAS, numba, "
        "torch); 'passive' = the same with `OMP_WAIT_POLICY=PASSIVE` in the environment (for "
        "numba's and torch's OpenMP pools alike; see the notes). Models (ReLU MLPs, cross-entropy): "
        + "; ".join(f"{case}: {'-'.join(map(str, sizes))}, batch {batch}" for case, sizes, batch in header["models"])
        + ".",
        "",
        "| case | params | threads | shardstep ms | torch ms (fused Adam) | torch ms (default Adam) | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['params']:,} | {_setting(r)} | {_ms(r['ours'])} ({_ms(r['ours_p90'])}) | "
            f"{_ms(r['torch_fused'])} ({_ms(r['torch_fused_p90'])}) | {_ms(r['torch_default'])} "
            f"({_ms(r['torch_default_p90'])}) | {r['ours'] / r['torch_fused']:.2f} |"
        )
    lines += [
        "",
        "Where the time goes (medians, ms): `gemm` = the step's matrix products alone at the same "
        "shapes (numpy/OpenBLAS for shardstep, torch/MKL; neither computes the first layer's "
        "input gradient), `adam` = the optimizer step alone, `rest` = step - gemm - adam "
        "(bias, ReLU, loss, batch gathering, Python).",
        "",
        "| case | threads | shardstep gemm / adam / rest | gemm share | torch gemm / adam / rest | gemm share |",
        "|---|---:|---|---:|---|---:|",
    ]
    for r in rows:
        ours_rest = r["ours"] - r["ours_gemm"] - r["ours_adam"]
        torch_rest = r["torch_fused"] - r["torch_gemm"] - r["torch_adam"]
        lines.append(
            f"| {r['case']} | {_setting(r)} | {_ms(r['ours_gemm'])} / {_ms(r['ours_adam'])} / {_ms(ours_rest)} | "
            f"{r['ours_gemm'] / r['ours']:.0%} | {_ms(r['torch_gemm'])} / {_ms(r['torch_adam'])} / "
            f"{_ms(torch_rest)} | {r['torch_gemm'] / r['torch_fused']:.0%} |"
        )
    lines += [
        "",
        "shardstep's step by phase (medians, ms; the same calls `Trainer.step` makes, timed one by "
        "one): `data` = the task's batch (sharding rule, gathering rows), `forward` = the model's "
        "layers, `loss` = cross-entropy forward and backward, `backward` = the layers' backward "
        "(input and parameter gradients), `optimizer` = handing the gradients to the Parameters "
        "and `Adam.step`.",
        "",
        "| case | threads | " + " | ".join(PHASES) + " | sum | step |",
        "|---|---:|" + "---:|" * (len(PHASES) + 2),
    ]
    for r in rows:
        phase_ms = [r["phase_" + name] for name in PHASES]
        lines.append(f"| {r['case']} | {_setting(r)} | " + " | ".join(_ms(v) for v in phase_ms)
                     + f" | {_ms(sum(phase_ms))} | {_ms(r['ours'])} |")
    lines += [
        "",
        "Handing the cores between thread pools, measured in each process above: a numba parallel "
        "loop over 20,000 floats (like an optimizer kernel) and an OpenBLAS GEMM 64x64 by 64x256 "
        "(like a digits layer), each alone and alternating (medians, microseconds).",
        "",
        "| threads | kernel alone | gemm alone | kernel + gemm, alternating |",
        "|---|---:|---:|---:|",
    ]
    for sw in header["switches"]:
        lines.append(f"| {_setting(sw)} | {sw['kernel'] * 1e6:.1f} | {sw['gemm'] * 1e6:.1f} | "
                     f"{sw['alternating'] * 1e6:.1f} |")
    lines += ["", *NOTES]
    lines.append(END)
    return "\n".join(lines)


def _blas() -> str:
    import numpy as np

    config = np.show_config(mode="dicts")
    blas = config.get("Build Dependencies", {}).get("blas", {})
    return f"{blas.get('name', '?')} {blas.get('version', '')}".strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--no-passive", action="store_true",
                        help="skip the runs with OMP_WAIT_POLICY=PASSIVE at more than one thread")
    parser.add_argument("--repeats-scale", type=float, default=1.0, help="multiply every case's timed steps")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args)
    try:
        import torch
    except ImportError:
        parser.error("torch is not installed: pip install -e '.[bench]'")
    import numba
    import numpy as np

    configurations = []
    for threads in args.threads:
        configurations.append((threads, "default", {}))
        if threads > 1 and not args.no_passive:
            configurations.append((threads, "passive", {"OMP_WAIT_POLICY": "PASSIVE"}))
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    rows, switches = [], []
    for threads, label, extra in configurations:
        env = {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES}, **extra}
        command = [sys.executable, str(Path(__file__).resolve()), "--child", str(threads),
                   "--repeats-scale", str(args.repeats_scale), "--cases", *args.cases]
        out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.stderr.write(out.stderr)
            raise SystemExit(f"the measuring process for {threads} thread(s), {label}, failed (exit {out.returncode})")
        measured = json.loads(out.stdout.strip().splitlines()[-1])
        switches.append({"threads": threads, "env": label, **measured["switch"]})
        for r in measured["rows"]:
            r["env"] = label
            rows.append(r)
            print(f"{r['case']:8s} {threads}t {label:8s} ours {_ms(r['ours'])} ms  torch fused {_ms(r['torch_fused'])} "
                  f"ms  default {_ms(r['torch_default'])} ms  ratio {r['ours'] / r['torch_fused']:.2f}  | gemm "
                  f"{_ms(r['ours_gemm'])}/{_ms(r['torch_gemm'])}  adam {_ms(r['ours_adam'])}/{_ms(r['torch_adam'])}",
                  flush=True)
    order = [(t, label) for t, label, _ in configurations]
    rows.sort(key=lambda r: (list(CASES).index(r["case"]), order.index((r["threads"], r["env"]))))
    header = {
        "machine": machine(), "numpy": np.__version__, "blas": _blas(), "numba": numba.__version__,
        "torch": torch.__version__, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python benchmarks/training_step.py", *(argv if argv is not None else sys.argv[1:])]),
        "models": list(dict.fromkeys((r["case"], tuple(r["sizes"]), r["batch"]) for r in rows)),
        "load_before": load_before, "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "switches": switches,
    }
    section = render(rows, header)
    print(section)
    if not args.no_write:
        write_section(args.doc, BEGIN, END, section)
        print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
