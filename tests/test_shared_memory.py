"""The shared-memory regions of the shared_memory transport: layout, sharing between real
processes, and release."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardstep.checkpoints import ShardLayout
from shardstep.checkpoints.layout import ParamSpec
from shardstep.workers import shared_memory
from shardstep.workers.shared_memory import ALIGN, Region, SharedMemory, region_places, whole

pytestmark = pytest.mark.skipif(not shared_memory.available(), reason="needs Linux memfd_create and /proc")

LAYOUT = ShardLayout((ParamSpec("embedding", (7, 3), "float64"), ParamSpec("empty", (0, 4), "float32"),
                      ParamSpec("bias", (5,), "float32"), ParamSpec("scale", (), "float16")), 2)


def open_regions() -> list[str]:
    """The shared-memory regions this process has open (link targets of /proc/self/fd)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("/memfd:shardstep-"):
            found.append(target)
    return found


def test_every_parameter_has_its_own_aligned_place():
    places, size = region_places(LAYOUT)
    assert list(places) == ["embedding", "empty", "bias", "scale"]
    spans = []
    for spec in LAYOUT.params:
        offset, count, dtype = places[spec.name]
        assert offset % ALIGN == 0 and count == spec.numel and dtype == spec.dtype
        spans.append((offset, offset + count * np.dtype(dtype).itemsize))
    # in order, no overlap, everything inside the region
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])) and spans[-1][1] <= size
    assert spans[0] == (0, 7 * 3 * 8) and spans[2][0] == 192  # 168 bytes round up to 192


def test_a_region_is_shared_with_another_process_and_released_on_close():
    assert open_regions() == []
    memory = SharedMemory(LAYOUT, workers=2)
    transport = memory.transport
    assert [Region(r.path, r.size) for r in transport.grads] == list(transport.grads)
    params = memory.params()
    params["embedding"][...] = np.arange(21, dtype=np.float64)
    # a separate process maps the same region by path, reads what this one wrote, writes back
    script = (
        "import pickle, sys, numpy as np\n"
        "from shardstep.workers.shared_memory import whole\n"
        "transport = pickle.loads(sys.stdin.buffer.read())\n"
        "arrays = transport.param_arrays()\n"
        "print(float(arrays['embedding'].sum()))\n"
        "arrays['bias'][...] = [1, 2, 3, 4, 5]\n"
        "grads = transport.grad_arrays(1)\n"
        "grads['scale'][...] = 0.5\n"
        "shaped = whole(arrays, transport.layout)\n"
        "print(shaped['embedding'].shape, shaped['embedding'].flags.writeable)\n"
    )
    child = subprocess.run([sys.executable, "-c", script], input=pickle.dumps(transport), capture_output=True,
                           check=True, cwd=str(Path(__file__).resolve().parents[1]))
    assert child.stdout.decode().split("\n")[:2] == ["210.0", "(7, 3) False"]
    assert params["bias"].tolist() == [1, 2, 3, 4, 5]
    assert transport.grad_arrays(1)["scale"].tolist() == [0.5]
    assert transport.grad_arrays(0)["scale"].tolist() == [0.0]  # each worker has its own region
    # the coordinator's three descriptors, and the one of its own mapping of the parameters
    # (mmap keeps a duplicate while the arrays on it live)
    assert sorted(open_regions()) == ["/memfd:shardstep-grads-0 (deleted)", "/memfd:shardstep-grads-1 (deleted)",
                                      "/memfd:shardstep-params (deleted)", "/memfd:shardstep-params (deleted)"]
    memory.close()
    # the mapping this process still holds stays valid until its arrays go, then nothing is left
    assert params["bias"].tolist() == [1, 2, 3, 4, 5]
    assert open_regions() == ["/memfd:shardstep-params (deleted)"]
    del params
    assert open_regions() == []


def test_a_region_that_cannot_be_opened_says_what_to_do():
    with pytest.raises(OSError, match=r"cannot map the coordinator's shared memory /proc/self/fd/999999 .*"
                                      r"transport = \"object_store\""):
        Region("/proc/self/fd/999999", ALIGN).map()


def test_whole_views_are_read_only_and_shaped():
    memory = SharedMemory(LAYOUT, workers=1)
    try:
        views = whole(memory.params(), LAYOUT)
        assert {name: v.shape for name, v in views.items()} == {"embedding": (7, 3), "empty": (0, 4), "bias": (5,),
                                                               "scale": ()}
        with pytest.raises(ValueError, match="read-only"):
            views["bias"][0] = 1.0
    finally:
        memory.close()
