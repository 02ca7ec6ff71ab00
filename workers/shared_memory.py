"""Parameters and gradients in shared memory, for actors on the coordinator's node.

With the ``shared_memory`` transport the bulk data of a step never passes through Ray's
object store. The coordinator creates anonymous shared files (``memfd_create``) and the
actors on its node map them by path (``/proc/<coordinator pid>/fd/<fd>``):

- one parameter region: every parameter whole, each at its own 64-byte-aligned offset. A
  shard's parameter slices are views of its rows there, so ``apply`` updates them in place,
  and a gradient worker reads whole parameters from it without gathering or copying;
- one gradient region per worker, laid out the same way: the worker copies its dense
  gradients in, each shard reads the rows it owns.

The Ray calls of a step still order everything (a worker's ``compute`` takes the shards'
``apply`` results as arguments, a shard's ``reduce`` takes the workers' ``compute``
results), they only carry losses, reports and row-sparse gradients. Why: each object-store
transfer is a serialization plus a copy into pages the store hands out fresh (page faults on
every step), and a worker has to concatenate the shards' slices into whole parameters; the
regions here are mapped once and reused every step.

The memory is freed when the coordinator closes its descriptors and the last actor that
mapped it exits; nothing is left in a file system if any of them is killed.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

from shardstep.checkpoints import ShardLayout

ALIGN = 64  # bytes: every parameter starts on a cache line


def available() -> bool:
    """Whether this platform can share memory this way (Linux with memfd_create and /proc)."""
    return hasattr(os, "memfd_create") and os.path.isdir(f"/proc/{os.getpid()}/fd")


def region_places(layout: ShardLayout) -> tuple[dict[str, tuple[int, int, str]], int]:
    """``{name: (byte offset, elements, dtype)}`` of every parameter in a region, in table
    order, and the region's size in bytes."""
    places: dict[str, tuple[int, int, str]] = {}
    at = 0
    for spec in layout.params:
        count = spec.numel
        places[spec.name] = (at, count, spec.dtype)
        at += -(-count * np.dtype(spec.dtype).itemsize // ALIGN) * ALIGN
    return places, max(at, ALIGN)


@dataclass(frozen=True)
class Region:
    """One shared file of the coordinator: ``path`` opens it from any process on the node."""

    path: str
    size: int

    def map(self) -> mmap.mmap:
        try:
            with open(self.path, "r+b") as file:
                return mmap.mmap(file.fileno(), self.size)
        except OSError as error:
            # another user, or a node other than the coordinator's: the path is not reachable
            raise OSError(f"cannot map the coordinator's shared memory {self.path} from process {os.getpid()}: "
                          f"{error.strerror or error}; run every actor on the coordinator's node as its user, "
                          f"or set resources.transport = \"object_store\"") from error


@dataclass(frozen=True)
class SharedTransport:
    """What an actor needs to map the regions of a run: the parameter region and one gradient
    region per worker rank, all laid out by :func:`region_places` of ``layout``."""

    layout: ShardLayout
    params: Region
    grads: tuple[Region, ...]

    def param_arrays(self) -> dict[str, np.ndarray]:
        """Every parameter as a flat, writable array of the mapped parameter region."""
        return _arrays(self.params.map(), self.layout)

    def grad_arrays(self, rank: int) -> dict[str, np.ndarray]:
        """Worker ``rank``'s gradient of every parameter, flat, in its mapped region."""
        return _arrays(self.grads[rank].map(), self.layout)


def _arrays(buffer: mmap.mmap, layout: ShardLayout) -> dict[str, np.ndarray]:
    places, _ = region_places(layout)
    return {name: np.frombuffer(buffer, dtype=dtype, count=count, offset=offset)
            for name, (offset, count, dtype) in places.items()}


class SharedGrad:
    """Stands for a worker's dense gradient piece in a step's results: the values are in that
    worker's gradient region (the shard reads its own rows there)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "SharedGrad()"


class SharedMemory:
    """The coordinator's side: creates a run's regions and owns their descriptors."""

    def __init__(self, layout: ShardLayout, workers: int):
        _, size = region_places(layout)
        self._fds: list[int] = []
        try:
            params = self._create("params", size)
            grads = tuple(self._create(f"grads-{rank}", size) for rank in range(workers))
        except BaseException:
            self.close()
            raise
        self.transport = SharedTransport(layout, params, grads)
        self._params: dict[str, np.ndarray] | None = None

    def _create(self, name: str, size: int) -> Region:
        fd = os.memfd_create(f"shardstep-{name}", os.MFD_CLOEXEC)
        self._fds.append(fd)
        os.ftruncate(fd, size)
        return Region(f"/proc/{os.getpid()}/fd/{fd}", size)

    def params(self) -> dict[str, np.ndarray]:
        """The parameter region as the shards last wrote it (flat views; copy before keeping)."""
        if self._params is None:
            self._params = self.transport.param_arrays()
        return self._params

    def close(self) -> None:
        self._params = None  # the mapping goes with the last view
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


def whole(arrays: dict[str, np.ndarray], layout: ShardLayout) -> dict[str, np.ndarray]:
    """Read-only views of flat region arrays in their parameters' shapes."""
    out = {}
    for spec in layout.params:
        array = arrays[spec.name].reshape(spec.shape)
        array.flags.writeable = False
        out[spec.name] = array
    return out
