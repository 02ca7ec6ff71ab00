"""The coordinator's (driver's) own memory during a run: its peak private memory (RssAnon,
anonymous pages: what the process itself allocated; the shared-memory regions the actors use
are counted by the kernel as shared memory, RssShmem, and belong to the run, not the driver)
above the same driver idle, against the model's bytes.

    python benchmarks/driver_memory.py --params 100000000 --transport shared_memory
    python benchmarks/driver_memory.py --params 100000000 --transport object_store

One process per measurement: a private local Ray instance on loopback (2 CPUs), the
synthetic-mlp task (float32) with Adam, 2 shards and 2 workers, 2 steps, a checkpoint at
the end. "Idle" is this process with Ray started, every module imported (Ray's serialization
context too) and the job checked, just before the run; a thread samples /proc/self/status every 2 ms during the run.
Prints one JSON line: peak above idle (bytes), model bytes, their ratio, VmHWM, seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def private_kib(field: str = "RssAnon") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakSampler(threading.Thread):
    """The highest RssAnon seen while it runs."""

    def __init__(self, every: float = 0.002):
        super().__init__(daemon=True)
        self.every = every
        self.peak = private_kib()
        self._finished = threading.Event()

    def run(self) -> None:
        while not self._finished.is_set():
            self.peak = max(self.peak, private_kib())
            self._finished.wait(self.every)

    def stop(self) -> int:
        self._finished.set()
        self.join()
        self.peak = max(self.peak, private_kib())
        return self.peak


def measure(params: int, transport: str, steps: int = 2) -> dict:
    import gc

    import ray

    from shardstep.service.coordinator import Coordinator
    from shardstep.service.jobspec import JobSpec

    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=2,
             logging_level="ERROR", log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="driver-memory-") as directory:
            spec = JobSpec(task="synthetic-mlp", task_args={"params": params, "depth": 2, "examples": 512,
                                                            "eval_examples": 128},
                           optimizer="adam", optimizer_args={"lr": 1e-3}, param_groups=None, schedulers=(),
                           steps=steps, epochs=None, batch_size=64, seed=0, shards=2, workers=2, backend="ray",
                           transport=transport, run_dir=os.path.join(directory, "run"))
            coordinator = Coordinator(spec)
            model_bytes = 4 * coordinator.task.num_params
            # Ray builds its serialization context on first use, importing pyarrow when it is
            # installed (about 8 MB): the driver's own, part of idle, not the model's
            ray.get(ray.put(0))
            gc.collect()
            idle = private_kib()
            sampler = PeakSampler()
            sampler.start()
            started = time.perf_counter()
            result = coordinator.run()
            seconds = time.perf_counter() - started
            peak = sampler.stop()
            assert result.steps == steps and result.transport == transport, (result.steps, result.transport)
    finally:
        ray.shutdown()
    above = (peak - idle) * 1024
    return {"params": coordinator.task.num_params, "transport": transport, "model_bytes": model_bytes,
            "idle_rss_anon": idle * 1024, "peak_rss_anon": peak * 1024, "peak_above_idle": above,
            "ratio": above / model_bytes, "vm_hwm": private_kib("VmHWM") * 1024, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=int, default=100_000_000)
    parser.add_argument("--transport", choices=("shared_memory", "object_store"), default="shared_memory")
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.params, args.transport)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
