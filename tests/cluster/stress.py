"""Abrupt node loss, many times over (not collected by pytest; the suite runs one trial of
each kind in tests/test_cluster.py):

    python -m tests.cluster.stress --trials 20 --seed 1

Each trial is a fresh simulated cluster (a head and three 2-CPU nodes, Ray's default health
checks) running the 12-step digits job with max_failures = 2; one node is lost abruptly at a
moment drawn from the seed: just before the start, after a random step, during a
checkpoint, or at the last step, holding shard 0 or gradient worker 0. A trial passes when
the run finishes, its final checkpoint equals the single-process reference bit for bit,
and no start after the loss placed an actor on the lost node. Prints one line per trial
and a summary; exits 1 if any trial failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.runs import digits_reference, final_params

ROOT = Path(__file__).resolve().parents[2]


def draw(rng: np.random.Generator, steps: int) -> tuple[str, str]:
    kind = str(rng.choice(["start", "step", "checkpoint", "last"], p=[0.15, 0.45, 0.2, 0.2]))
    when = str(int(rng.integers(1, steps))) if kind == "step" else kind
    return when, str(rng.choice(["shard", "worker"]))


def main(argv: list[str] | None = None) -> int:
    from tests.cluster.scenarios import STEPS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    reference = digits_reference(STEPS)
    passed, seconds = 0, []
    for trial in range(args.trials):
        when, victim = draw(rng, STEPS)
        with tempfile.TemporaryDirectory(prefix="stress-") as directory:
            run_dir = Path(directory) / "run"
            started = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "tests.cluster.scenarios", "node-loss", "--run-dir",
                                   str(run_dir), "--when", when, "--victim", victim], cwd=ROOT, capture_output=True,
                                  text=True, timeout=600)
            took = time.monotonic() - started
            verdict = "FAILED"
            detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            if done.returncode == 0:
                line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("RESULT "))
                report = json.loads(line[len("RESULT "):])
                killed = set(report["killed"])
                later = report["starts"] if when == "start" else report["starts"][1:]
                same = all(np.array_equal(a, reference[name]) for name, a in final_params(run_dir).items())
                clean = not any(killed & set(placed) for placed in later)
                if same and clean and report["result_steps"] == STEPS:
                    verdict, passed = "ok", passed + 1
                detail = (f"failures {report['failures']}, bit-identical {same}, restarts off the lost node {clean}, "
                          f"run {report['seconds']:.1f} s")
            seconds.append(took)
        print(f"trial {trial + 1:2d}: node of {victim} 0 lost at {when:>10}: {verdict} ({detail}; {took:.1f} s)",
              flush=True)
    print(f"{passed}/{args.trials} trials finished bit-identical to the single-process run, never restarting on the "
          f"lost node; median trial {np.median(seconds):.1f} s")
    return 0 if passed == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
