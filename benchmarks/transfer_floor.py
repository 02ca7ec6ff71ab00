"""The least any byte-moving transport can add to a step across simulated nodes here.

    python -m benchmarks.transfer_floor            # the step's 2- and 4-node byte counts
    python -m benchmarks.transfer_floor --rounds 5 # a quick look

Simulated nodes (``ray.cluster_utils.Cluster``) are processes of one machine: what one
node's actor sends another must be copied by the same cores that compute the step. This
measures the cheapest such copy, with nothing of Ray or shardstep in it: ``pairs`` pairs of
processes move ``megabytes`` in all (an equal part each, at the same time) over a loopback
TCP socket into a preallocated buffer (``recv_into``: one copy into the kernel, one out),
and the receiver acknowledges with one byte. The rows use the cross-node bytes per step of
``benchmarks/cluster_step.py``'s job (synthetic-mlp, 4M float32 parameters, 2 shards, 2
workers): 32 MB on 2 nodes (two streams), 64 MB on 4 nodes (four). A transport that moves
those bytes cannot make the step cheaper than the one-node shared-memory step plus this.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import sys
import time

import numpy as np

MIB = 1 << 20


def _receive(ports, nbytes: int, rounds: int) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    ports.put(listener.getsockname()[1])
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    view = memoryview(np.empty(nbytes, np.uint8))
    for _ in range(rounds):
        got = 0
        while got < nbytes:
            got += connection.recv_into(view[got:], nbytes - got)
        connection.sendall(b"k")
    connection.close()
    listener.close()


def _send(port: int, nbytes: int, rounds: int, start, done) -> None:
    connection = socket.create_connection(("127.0.0.1", port))
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = memoryview(np.ones(nbytes, np.uint8))
    for _ in range(rounds):
        start.wait()
        connection.sendall(data)
        connection.recv(1)
        done.put(None)
    connection.close()


def measure(pairs: int, megabytes: int, rounds: int) -> list[float]:
    """Seconds per round: from releasing every sender to the last acknowledgement."""
    context = multiprocessing.get_context("spawn")
    nbytes = megabytes * MIB // pairs
    start, done, processes = context.Barrier(pairs + 1), context.Queue(), []
    for _ in range(pairs):
        ports = context.Queue()
        receiver = context.Process(target=_receive, args=(ports, nbytes, rounds))
        receiver.start()
        sender = context.Process(target=_send, args=(ports.get(timeout=60), nbytes, rounds, start, done))
        sender.start()
        processes += [receiver, sender]
    seconds = []
    try:
        for _ in range(rounds):
            began = time.perf_counter()
            start.wait(timeout=60)
            for _ in range(pairs):
                done.get(timeout=60)
            seconds.append(time.perf_counter() - began)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.kill()
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds per row (after 3 warm-up rounds)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1; got {args.rounds}")
    print("| nodes | streams | MB per step | ms (median) | p90 | min |")
    print("|---:|---:|---:|---:|---:|---:|")
    for nodes, pairs, megabytes in ((2, 2, 32), (4, 4, 64)):
        seconds = measure(pairs, megabytes, args.rounds + 3)[3:]
        ms = sorted(s * 1e3 for s in seconds)
        p90 = ms[min(len(ms) - 1, int(0.9 * len(ms)))]
        print(f"| {nodes} | {pairs} | {megabytes} | {statistics.median(ms):.1f} | {p90:.1f} | {ms[0]:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
