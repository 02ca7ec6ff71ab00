"""A multi-node Ray cluster simulated on this one machine, for tests of node loss and recovery.

Every node is its own raylet (own object store, worker processes and ports), started by
``ray.cluster_utils.Cluster`` and bound to 127.0.0.1; the driver joins by the cluster's address,
never by a bare ``ray.init()`` (that joins whatever cluster ``ray start`` last made on the
machine). Nodes can join late, and can be lost abruptly: the raylet and every process it started
are SIGKILLed, as when a machine loses power, and the GCS finds out only by its health check.

    from tests.cluster import FAST_NODE_FAILURE_DETECTION, SimulatedCluster

    with SimulatedCluster(head_cpus=0, system_config=FAST_NODE_FAILURE_DETECTION) as cluster:
        node = cluster.add_node(num_cpus=1, labels={"zone": "a"})
        actor = Worker.options(label_selector={"zone": "a"}).remote()
        ray.get(actor.ready.remote(), timeout=60)
        assert cluster.node_of_actor(actor) == node.node_id
        cluster.kill_node(node)
        cluster.wait_for_node_dead(node.node_id, timeout=30)

What Ray 2.60 does meanwhile (measured with this module on this machine):
- ``ray.nodes()`` lists a killed node Alive until the GCS health check has failed
  ``health_check_failure_threshold`` times, ``health_check_period_ms`` apart: 12-15 s with the
  defaults (5, 3000 ms), ~1.1 s with FAST_NODE_FAILURE_DETECTION. Until then the scheduler still
  places actors there (they stay PENDING_CREATION, then die with the node); its raylet's
  NodeManagerPort refuses connections at once (``raylet_reachable``).
- every node has the label ``ray.io/node-id`` (its hex id):
  ``label_selector={"ray.io/node-id": f"!in({node_id})"}`` keeps an actor off a node (and
  ``bundle_label_selector=[...]`` a placement group's bundle). Several ids go without spaces,
  ``!in(a,b)``: Ray accepts ``!in(a, b)`` but then matches " b", space and all, so b is not excluded.
- ``ray.util.state`` needs the dashboard, which does not run here: actor and node records come
  from the GCS (``actor_info``, ``nodes``); ``ray.available_resources()`` works as usual.
"""

from __future__ import annotations

import os

# Ray reads this once, when it is first imported (ray._private.ray_constants): without it the
# raylets and the driver move from 127.0.0.1 to the machine's external address
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import signal
import socket
import time
from typing import Self
from unittest import mock

import ray
import ray._common.utils
import ray._private.node
import ray._private.utils
from ray._private import ray_constants
from ray._private.label_utils import validate_node_label_syntax, validate_node_labels
from ray.cluster_utils import Cluster

if ray_constants.ENABLE_RAY_CLUSTER:
    raise ImportError("ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set: import "
                      "tests.cluster (or set the variable) before anything imports ray")

LOOPBACK = "127.0.0.1"
# small object stores: several nodes share a 24 GiB machine, and test objects are small
OBJECT_STORE_BYTES = 128 * 1024 * 1024
# bounds of the helper's own waits: a node starts in 1-10 s here (more when the machine is busy)
NODE_START_TIMEOUT_S = 60.0
PROCESS_EXIT_TIMEOUT_S = 10.0

# The GCS health check of the raylets; given to the head, it holds for the whole cluster. A killed
# raylet's port refuses at once, so every check after the loss fails at once and the node is
# marked dead (threshold - 1) x period after the first failed check: 12-15 s with Ray's defaults
# (5 checks, 3000 ms apart; timeout 10000 ms, initial delay 5000 ms), 1.0-1.5 s with these. The
# timeout only bounds a check of a raylet that hangs without refusing: it stays generous so a live
# raylet slowed by a busy machine is not declared dead (the GCS would then kill it). The initial
# delay is how long a new node goes unchecked.
FAST_NODE_FAILURE_DETECTION = {
    "health_check_initial_delay_ms": 1000,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 2000,
    "health_check_failure_threshold": 3,
}


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition()`` until it returns something truthy, which is returned; TimeoutError
    naming ``what`` after ``timeout`` seconds. Every wait of this module goes through here."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


def free_loopback_ports(count: int, exclude: set[int] = frozenset()) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1, none in ``exclude``: the kernel's picks for
    bound sockets, all held open until every port is picked so none is handed out twice."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((LOOPBACK, 0))
            if (port := sock.getsockname()[1]) not in exclude:
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def tcp_port_open(port: int, host: str = LOOPBACK, timeout: float = 1.0) -> bool:
    """Whether something accepts TCP connections on host:port (a refusal takes well under 1 ms)."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _check_labels(labels: dict | None):
    """Reject the labels a raylet would reject only by crashing at startup (Ray 2.60 checks them
    in the raylet, and Node() then waits 30 s for a node that never registers): keys under
    ray.io/, Ray's own (such as ray.io/node-id), and keys or values that are not Kubernetes-style."""
    validate_node_labels(labels)
    validate_node_label_syntax(labels)


# ---- processes, by pid, from /proc (never by name: other Ray instances run on this machine) ----

def _proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state letter, start time in clock ticks) of a process, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(root: int) -> set[int]:
    """The pids of every descendant of ``root`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _proc_stat(int(entry))) is not None:
            children.setdefault(stat[0], []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _state(pid: int, start: int) -> str | None:
    """The state letter of the process that had this pid and start time, None once it is gone
    or a zombie (a different start time means the pid now belongs to another process)."""
    stat = _proc_stat(pid)
    return stat[1] if stat is not None and stat[2] == start and stat[1] not in "ZX" else None


def _signal(pids: dict[int, int], sig: int):
    for pid, start in pids.items():
        if _state(pid, start):  # never a reused pid
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def _node_processes(node: ray._private.node.Node) -> dict[int, int]:
    """pid -> start time of the live processes the node started (its raylet; on the head also
    the GCS and monitors) and of everything its raylet started: workers, agents."""
    roots = [info.process.pid for infos in node.all_processes.values() for info in infos
             if info.process.poll() is None]
    pids = {}
    for pid in set(roots).union(*(_descendants(root) for root in roots)):
        if (stat := _proc_stat(pid)) is not None and stat[1] not in "ZX":
            pids[pid] = stat[2]
    pids.pop(os.getpid(), None)  # never the test process itself
    return pids


class SimulatedCluster:
    """A head node plus any number of worker nodes, each a raylet on 127.0.0.1, with this process
    as the driver, attached to the head's raylet (so losing any other node leaves the driver
    running). A context manager; leaving it stops exactly what was started.

    head_cpus, head_resources, head_labels: the head's CPUs, custom resources and labels (0 CPUs
        keeps work off the head, which cannot be killed: it holds the GCS and the driver).
    system_config: Ray's ``_system_config`` for the whole cluster, e.g. FAST_NODE_FAILURE_DETECTION
        (None: Ray's defaults, a lost node is noticed after 12-15 s).
    connect: join as the driver on entry; ``init_kwargs`` go to ray.init.
    """

    def __init__(self, head_cpus: float = 1, head_resources: dict | None = None,
                 head_labels: dict | None = None, system_config: dict | None = None,
                 object_store_memory: int = OBJECT_STORE_BYTES, connect: bool = True, **init_kwargs):
        _check_labels(head_labels)
        self._head_args = {"num_cpus": head_cpus, "resources": head_resources, "labels": head_labels,
                           "object_store_memory": object_store_memory, "include_dashboard": False,
                           "_system_config": system_config or {}}
        self._object_store_memory = object_store_memory
        self._connect = connect
        self._init_kwargs = {"logging_level": "ERROR", "log_to_driver": False} | init_kwargs
        self._cluster: Cluster | None = None
        self._ports: set[int] = set()  # every port handed to a node, never handed out again
        self._started: dict[int, int] = {}  # pid -> start time of every process seen on a node
        self._added: dict[str, int] = {}  # node id -> order of joining

    # ---- lifecycle ----

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.shutdown()

    def start(self):
        """Start the head (GCS + raylet) and, unless connect=False, join it as the driver."""
        if ray.is_initialized():
            raise RuntimeError("ray is already initialized in this process: shut it down first")
        # Cluster writes the head's address to /tmp/ray/ray_current_cluster (and deletes that file
        # at shutdown, whoever wrote it), where a bare ray.init() on this machine would find it
        with mock.patch.object(ray._private.utils, "write_ray_address"):
            self._cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                                    head_node_args=self._node_args(head=True, **self._head_args))
        try:
            self._remember(self.head)
            if self._connect:
                self.connect()
        except BaseException:
            self.shutdown()
            raise

    def connect(self):
        """Join the cluster as the driver, by its address, and check where the driver sits."""
        ray.init(address=self.address, _node_ip_address=LOOPBACK, **self._init_kwargs)
        if ray.get_runtime_context().get_node_id() != self.head.node_id:
            raise RuntimeError("the driver attached to a raylet other than the head's")
        self.check_loopback()

    def shutdown(self):
        """Disconnect the driver and stop every node, then make sure no process of any node
        outlived it (one that did is SIGKILLed, by pid, and reported)."""
        if self._cluster is None:
            return
        cluster, self._cluster = self._cluster, None
        for node in cluster.list_all_nodes():
            self._remember(node)  # the workers started since the node joined
        if ray.is_initialized():  # Cluster refuses to remove the node a driver is attached to
            ray.shutdown()
        with mock.patch.object(ray._common.utils, "reset_ray_address"):  # see start()
            cluster.shutdown()
        survivors = {pid: start for pid, start in self._started.items() if _state(pid, start)}
        try:  # a raylet stopped gracefully takes its workers along, within a second or so
            wait_for(lambda: not any(_state(pid, start) for pid, start in survivors.items()),
                     PROCESS_EXIT_TIMEOUT_S, "the nodes' processes to exit")
        except TimeoutError:
            _signal(survivors, signal.SIGKILL)
            raise RuntimeError(f"processes outlived their node and were killed: {sorted(survivors)}") from None

    # ---- nodes ----

    @property
    def address(self) -> str:
        """The GCS address (host:port): what ray.init(address=...) and RAY_ADDRESS take."""
        return self._cluster.address

    @property
    def head(self) -> ray._private.node.Node:
        return self._cluster.head_node

    @property
    def worker_nodes(self) -> list[ray._private.node.Node]:
        """The nodes added and not killed, oldest first."""
        return sorted(self._cluster.worker_nodes, key=lambda node: self._added[node.node_id])

    def add_node(self, num_cpus: float = 1, resources: dict | None = None, labels: dict | None = None,
                 **node_args) -> ray._private.node.Node:
        """Start another node (before or after the driver joined: a late-joining node) and return
        it once the GCS lists it alive; ``node.node_id`` is its hex id. ``labels``: the node's
        labels (Ray 2.60's Cluster.add_node takes them; Ray adds ray.io/node-id itself).
        ``node_args`` go to ray._private.parameter.RayParams (e.g. object_store_memory)."""
        _check_labels(labels)
        node = self._cluster.add_node(wait=True, **self._node_args(
            num_cpus=num_cpus, resources=resources, labels=labels,
            object_store_memory=self._object_store_memory) | node_args)
        self._remember(node)
        wait_for(lambda: node.node_id in self.alive_node_ids(), NODE_START_TIMEOUT_S,
                 f"node {node.node_id} to be alive")
        return node

    def kill_node(self, node) -> list[int]:
        """Lose a node abruptly: SIGKILL its raylet and every process the raylet started (workers,
        agents), then drop it from the cluster, which tells the GCS nothing. ``node``: a Node from
        add_node, or its hex id; not the head. Returns the killed pids."""
        node = self._node(node)
        if node is self.head:
            raise ValueError("the head holds the GCS and the driver: it cannot be killed")
        # Stop, then kill: a stopped raylet starts no new worker, and no stopped worker sees its
        # raylet die and exits in an orderly way (a lost machine says nothing). Repeat until no
        # new process turns up (one forked while the others were being stopped).
        frozen: dict[int, int] = {}
        while new := {pid: start for pid, start in _node_processes(node).items() if pid not in frozen}:
            _signal(new, signal.SIGSTOP)
            frozen |= new
            wait_for(lambda: all(_state(pid, start) in (None, "T", "t") for pid, start in new.items()),
                     PROCESS_EXIT_TIMEOUT_S, "the node's processes to stop")
        _signal(frozen, signal.SIGKILL)
        self._started.update(frozen)
        wait_for(lambda: not any(_state(pid, start) for pid, start in frozen.items()),
                 PROCESS_EXIT_TIMEOUT_S, f"the processes of node {node.node_id} to die")
        # reaps the raylet (a child of this process: the workers, orphaned, are reaped by init)
        self._cluster.remove_node(node, allow_graceful=False)
        return sorted(frozen)

    def nodes(self) -> list[dict]:
        """Every node the GCS knows, dead ones too, as ray.nodes() shows them (NodeID, Alive,
        NodeManagerAddress, NodeManagerPort, Resources, Labels, ...); needs no driver."""
        return self._cluster.global_state.node_table()

    def alive_node_ids(self) -> list[str]:
        """Hex ids of the nodes the GCS considers alive: a killed node stays until the GCS health
        check gives up on it."""
        return [node["NodeID"] for node in self.nodes() if node["Alive"]]

    def wait_for_node_dead(self, node_id: str, timeout: float) -> float:
        """Wait until the GCS marks the node dead; returns the seconds waited."""
        began = time.monotonic()
        wait_for(lambda: not self._entry(node_id)["Alive"], timeout, f"node {node_id} to be dead")
        return time.monotonic() - began

    def raylet_reachable(self, node_id: str) -> bool:
        """Whether the node's raylet accepts connections on its NodeManagerPort. A killed raylet's
        port refuses at once, 12-15 s before the GCS (by default) marks the node dead. A hint of
        death, not proof of life: another process could take the port later."""
        entry = self._entry(node_id)
        return tcp_port_open(entry["NodeManagerPort"], entry["NodeManagerAddress"])

    def check_loopback(self):
        """Every node the GCS knows is on 127.0.0.1 (never on the machine's external address)."""
        if (addresses := {node["NodeManagerAddress"] for node in self.nodes()}) != {LOOPBACK}:
            raise RuntimeError(f"Ray left loopback: nodes at {addresses}")

    # ---- actors ----

    def actor_info(self, actor) -> dict:
        """The GCS's record of an actor (handle, ActorID or hex id), {} if unknown: State
        (DEPENDENCIES_UNREADY, PENDING_CREATION, ALIVE, RESTARTING, DEAD), Address.NodeID (while
        pending: the node it is being placed on, if any), NumRestarts, DeathCause, Pid..."""
        actor_id = actor if isinstance(actor, str) else getattr(actor, "_actor_id", actor).hex()
        return self._cluster.global_state.actor_table(actor_id)

    def node_of_actor(self, actor) -> str | None:
        """Hex id of the node an actor (handle, ActorID or hex id) is alive on, else None."""
        info = self.actor_info(actor)
        return info["Address"]["NodeID"] if info.get("State") == "ALIVE" else None

    def wait_for_actor_state(self, actor, state: str, timeout: float) -> dict:
        """Wait until the actor's GCS state is ``state`` (e.g. "ALIVE", "DEAD"); returns its record."""
        return wait_for(lambda: (info := self.actor_info(actor)).get("State") == state and info,
                        timeout, f"actor to be {state}")

    # ---- internals ----

    def _node_args(self, head: bool = False, **args) -> dict:
        """Arguments of one node: on loopback, with its own agent and metrics ports (the defaults,
        e.g. 52365, collide with other Ray instances on the machine). The head gets its own
        dashboard port too: no dashboard listens (include_dashboard=False), but the head records
        127.0.0.1:<dashboard_port> in the GCS as the API server, and with the default 8265
        ray.util.state could query another Ray instance's dashboard."""
        ports = free_loopback_ports(4 if head else 3, exclude=self._ports)
        self._ports.update(ports)
        return {key: value for key, value in args.items() if value is not None} | {
            "node_ip_address": LOOPBACK, "dashboard_agent_listen_port": ports[0],
            "metrics_export_port": ports[1], "runtime_env_agent_port": ports[2],
            **({"dashboard_port": ports[3]} if head else {})}

    def _remember(self, node: ray._private.node.Node):
        """Note the node's processes, so that shutdown can check none outlives it."""
        self._added.setdefault(node.node_id, len(self._added))
        self._started.update(_node_processes(node))

    def _entry(self, node_id: str) -> dict:
        """The GCS's record of a node (see ``nodes``)."""
        for entry in self.nodes():
            if entry["NodeID"] == node_id:
                return entry
        raise KeyError(f"the GCS knows no node {node_id}")

    def _node(self, node) -> ray._private.node.Node:
        if not isinstance(node, str):
            return node
        for candidate in self._cluster.list_all_nodes():
            if candidate.node_id == node:
                return candidate
        raise KeyError(f"no running node {node}")
