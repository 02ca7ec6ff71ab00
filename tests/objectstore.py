"""A real S3-compatible server for the tests: moto's standalone server on loopback, reached
through a TCP relay the tests own, so they can cut the network path (a stopped server, as
the client sees it: connections refused, open ones reset), restore it, and count the bytes
the server sent.

The server is a subprocess started and stopped by the fixture (tests/conftest.py), bound to
127.0.0.1 on a free port; nothing here mocks the client: obstore talks HTTP to it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

BUCKET = "shardstep-tests"
ACCESS_KEY, SECRET_KEY, REGION = "shardstep-test-key", "shardstep-test-secret", "us-east-1"


def _die_with_parent() -> None:
    """In the server's process before it starts: the kernel ends it when the test process ends,
    however that ends (a killed pytest never runs its fixtures' teardown)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Relay:
    """Forwards every connection made to its port on 127.0.0.1 to ``upstream``."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.port = free_port()
        self.bytes_down = 0  # bytes from the server to clients
        # byte strings to look for in what clients send, and how many chunks held each
        self.watched: dict[bytes, int] = {}
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        self._accepting = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._accepting.start()

    def restore(self) -> None:
        """Listen again on the same port: the server is back."""
        self.start()

    def cut(self) -> None:
        """Close the port and reset every open connection: the server is gone."""
        listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass
            listener.close()
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            try:
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                connection.close()
            except OSError:
                pass
        if self._accepting is not None:
            self._accepting.join(5)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._connections.update((client, server))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, down: bool) -> None:
        try:
            while True:
                data = source.recv(1 << 20)
                if not data:
                    break
                target.sendall(data)
                with self._lock:
                    if down:
                        self.bytes_down += len(data)
                    else:
                        for marker in self.watched:
                            self.watched[marker] += marker in data
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class S3Server:
    """moto's server in a subprocess, behind a :class:`Relay`, with one bucket."""

    def __init__(self) -> None:
        self.server_port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.server_port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        try:
            self._wait_ready()
            self.relay = Relay(("127.0.0.1", self.server_port))
            self.relay.start()
            self.endpoint = f"http://127.0.0.1:{self.relay.port}"
            self._create_bucket(BUCKET)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto's server exited with {self.process.returncode} before it served")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.server_port}/moto-api/", timeout=2).close()
                return
            except (urllib.error.URLError, OSError):
                time.sleep(0.1)
        raise RuntimeError("moto's server did not answer within 60 s")

    def _create_bucket(self, bucket: str) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name=REGION)
        client.create_bucket(Bucket=bucket)

    def environment(self) -> dict[str, str]:
        """What a client (obstore, boto3, a Ray worker) reads to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
            "AWS_ALLOW_HTTP": "true",
        }

    def objects(self, prefix: str) -> dict[str, int]:
        """Every object under ``prefix`` of the bucket, read with another client (boto3)."""
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                              aws_secret_access_key=SECRET_KEY, region_name=REGION)
        found: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = item["Size"]
        return found

    def stop(self) -> None:
        relay: Any = getattr(self, "relay", None)
        if relay is not None:
            relay.cut()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def set_environment(values: dict[str, str]) -> dict[str, str | None]:
    """Set ``values`` in os.environ; returns what to restore."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    return previous


def restore_environment(previous: dict[str, str | None]) -> None:
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
