"""A Ray head of its own on loopback, and the real `shardstep` processes run against it:
shared by the submission, observability and documentation tests.

The head (``ray start --head --block``) listens on loopback ports chosen here, keeps its
files in a temporary directory of its own, and has token authentication on; it is stopped
at the end by signalling its process group (and any job process it left), never with
``ray stop``. The ``head`` fixture (one head per test module) is in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HEAD_START_SECONDS = 90
ADDRESS_VARIABLES = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
AUTH_VARIABLES = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that are free now (all held open while choosing)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def base_env() -> dict[str, str]:
    """This environment without any Ray address or token settings."""
    return {key: value for key, value in os.environ.items()
            if key not in ADDRESS_VARIABLES + AUTH_VARIABLES + ("PYTHONPATH",)}


# ---------------------------------------------------------------------------------------
# the head


@dataclass(frozen=True)
class Head:
    url: str           # the job server, http://127.0.0.1:PORT
    gcs: str           # 127.0.0.1:PORT
    token: str
    env: dict          # what a client on this machine sets: loopback, token mode, the token
    process: subprocess.Popen
    temp_dir: str
    metrics_port: int = 0  # the head's Prometheus endpoint: http://127.0.0.1:PORT/metrics


def _group_pids(group: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == group and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def _pids_using(directory: str) -> list[int]:
    """Processes whose command line or working directory is inside ``directory`` (the head's
    own temporary directory: a job's driver runs in its own session, in a directory there)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if directory in command or cwd.startswith(directory):
            pids.append(int(entry))
    return pids


def _listening_addresses(pids: list[int]) -> set[str]:
    """The local addresses of the TCP sockets these processes listen on (from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[len("socket:["):-1])
        except OSError:
            continue
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            host = local.partition(":")[0]
            raw = b"".join(bytes.fromhex(host[i:i + 8])[::-1] for i in range(0, len(host), 8))
            address = ipaddress.ip_address(raw)
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            found.add(str(address))
    return found


def get_json(url: str, token: str) -> dict:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def _stop_head(process: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM to the head's process group, then SIGKILL to whatever of it (or of the jobs
    it ran) is left."""
    group = process.pid
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and (_group_pids(group) or process.poll() is None):
        time.sleep(0.2)
    leftovers = set(_group_pids(group)) | set(_pids_using(temp_dir))
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def running_head(ready: str = "node"):
    """A head of its own on loopback: yielded once its node is alive (``ready="node"``), or as
    soon as its job server answers (``"server"``: its job agent may not be up yet); stopped,
    with every process it started, at the end."""
    token = secrets.token_hex(16)
    # a short path: Ray's unix sockets live in it
    temp_dir = tempfile.mkdtemp(prefix="shardstep-ray-", dir="/tmp")
    names = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port")
    ports = dict(zip(names, free_ports(len(names))))
    env = base_env()
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_USAGE_STATS_ENABLED="0",
               # the jobs' `python` is this interpreter, as a cluster's image puts its own first
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
               "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
               "--num-cpus=2", f"--temp-dir={temp_dir}", "--object-store-memory=200000000",
               "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0",
               *[f"--{name}={port}" for name, port in ports.items()]]
    url = f"http://127.0.0.1:{ports['dashboard-port']}"
    with open(Path(temp_dir) / "head.log", "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    listening: set[str] = set()
    try:
        deadline = time.monotonic() + HEAD_START_SECONDS
        nodes: list = []
        answering = False
        while not (answering and ready == "server") and not any(node["state"] == "ALIVE" for node in nodes):
            assert process.poll() is None, "ray start exited:\n" + (Path(temp_dir) / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"the head was not up within {HEAD_START_SECONDS} s"
            time.sleep(0.5 if ready == "node" else 0.1)
            try:
                answering = bool(get_json(f"{url}/api/version", token).get("ray_version"))
                if answering and ready == "node":
                    nodes = get_json(f"{url}/api/v0/nodes", token)["data"]["result"]["result"]
            except (OSError, ValueError, KeyError):
                continue
        if ready == "node":
            assert [node["node_ip"] for node in nodes] == ["127.0.0.1"], nodes
            listening = _listening_addresses(_group_pids(process.pid))  # the GCS, the raylet, the job server, ...
            assert listening and all(ipaddress.ip_address(address).is_loopback for address in listening), listening
        client = base_env()
        client.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
        yield Head(url=url, gcs=f"127.0.0.1:{ports['port']}", token=token, env=client, process=process,
                   temp_dir=temp_dir, metrics_port=ports["metrics-export-port"])
        # everything the head and its jobs' processes listened on, after all the tests
        listening = _listening_addresses(_group_pids(process.pid) + _pids_using(temp_dir))
    finally:
        _stop_head(process, temp_dir)
    assert all(ipaddress.ip_address(address).is_loopback for address in listening), listening


# ---------------------------------------------------------------------------------------
# `shardstep` processes


def shardstep(*args: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardstep.service.cli", *args], capture_output=True, text=True, check=False,
                          timeout=timeout, env=env, cwd=tempfile.gettempdir(), stdin=subprocess.DEVNULL)


def submitted_id(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr
    match = re.search(r"^submitted (raysubmit_\w+) to ", result.stdout, re.MULTILINE)
    assert match, result.stdout
    return match.group(1)
