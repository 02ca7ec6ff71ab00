"""Helpers for the checkpoint tests: exact comparison, value strategies, real optimizer
states, sharding a full state by a layout, and file mutations for fuzzing."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import numpy as np
from hypothesis import strategies as st

from shardstep.checkpoints.format import DTYPE_NAMES, MAGIC, PREAMBLE, VERSION, checksum
from shardstep.checkpoints.layout import ParamSpec, ShardLayout

# the parameters of the run-checkpoint tests (test_checkpoint_run.py, test_checkpoint_async.py)
SPECS = (
    ParamSpec("big", (600_003,), "float32"),          # 2.4 MB: slices cross 1 MiB checksum chunks
    ParamSpec("matrix", (7, 5), "float64"),
    ParamSpec("tiny", (3,), "float16"),               # fewer elements than most shard counts
    ParamSpec("empty", (0, 4), "float32"),
    ParamSpec("cube", (2, 3, 4), "int32"),
)


def assert_identical(saved: Any, loaded: Any, path: str = "obj") -> None:
    """Same Python types all the way down, same dict key order, same dtypes, shapes and
    bits (so NaN payloads and -0.0 count); arrays compare by value in native byte order."""
    if isinstance(saved, np.ndarray):
        assert isinstance(loaded, np.ndarray), f"{path}: {type(loaded).__name__} instead of an array"
        assert loaded.dtype == saved.dtype.newbyteorder("<"), f"{path}: dtype {loaded.dtype} != {saved.dtype}"
        assert loaded.dtype.isnative or loaded.dtype.itemsize == 1
        assert loaded.shape == saved.shape, f"{path}: shape {loaded.shape} != {saved.shape}"
        expected = np.ascontiguousarray(saved, dtype=saved.dtype.newbyteorder("<"))
        assert loaded.tobytes() == expected.tobytes(), f"{path}: values differ"
        return
    assert type(loaded) is type(saved) or (isinstance(saved, dict) and type(loaded) is dict), (
        f"{path}: {type(loaded).__name__} instead of {type(saved).__name__}")
    if isinstance(saved, np.generic):
        assert loaded.dtype == saved.dtype and loaded.tobytes() == saved.tobytes(), f"{path}: {loaded!r} != {saved!r}"
    elif type(saved) is float:
        assert struct.pack("<d", loaded) == struct.pack("<d", saved), f"{path}: {loaded!r} != {saved!r}"
    elif isinstance(saved, dict):
        assert list(loaded) == list(saved), f"{path}: keys {list(loaded)} != {list(saved)}"
        for (key, value), other_key in zip(saved.items(), loaded):
            assert type(other_key) is type(key), f"{path}: key {key!r} came back as {other_key!r}"
            assert_identical(value, loaded[key], f"{path}[{key!r}]")
    elif type(saved) in (list, tuple):
        assert len(loaded) == len(saved), f"{path}: length {len(loaded)} != {len(saved)}"
        for i, (a, b) in enumerate(zip(saved, loaded)):
            assert_identical(a, b, f"{path}[{i}]")
    else:
        assert loaded == saved, f"{path}: {loaded!r} != {saved!r}"


# -- hypothesis strategies -----------------------------------------------------------------

def _arrays(draw_dtype: str) -> st.SearchStrategy:
    dtype = np.dtype(draw_dtype)

    def build(args):
        shape, seed, order, big_endian, step = args
        rng = np.random.default_rng(seed)
        full_shape = (*shape[:-1], shape[-1] * step) if shape else ()
        raw = rng.integers(0, 256, int(np.prod(full_shape)) * dtype.itemsize, dtype=np.uint8)
        if dtype.kind == "b":
            raw = raw % 2
        base = raw.view(dtype).reshape(full_shape)
        array = base[..., ::step] if shape else base
        if order == "F" and array.ndim > 1:
            array = np.asfortranarray(array)
        if big_endian and dtype.itemsize > 1:
            array = array.astype(dtype.newbyteorder(">"))
        return array

    shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
    return st.tuples(shapes, st.integers(0, 2**32 - 1), st.sampled_from("CF"), st.booleans(),
                     st.integers(1, 2)).map(build)


arrays = st.sampled_from(DTYPE_NAMES).flatmap(_arrays)
numpy_scalars = st.tuples(st.sampled_from(DTYPE_NAMES), st.integers(0, 2**32 - 1)).map(
    lambda args: _scalar(*args))


def _scalar(name: str, seed: int):
    dtype = np.dtype(name)
    raw = np.random.default_rng(seed).integers(0, 256, dtype.itemsize, dtype=np.uint8)
    if dtype.kind == "b":
        raw = raw % 2
    return raw.view(dtype)[0]


leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=8), st.binary(max_size=8), arrays, numpy_scalars,
)
keys = st.one_of(st.text(max_size=6), st.integers(-(2**63), 2**63 - 1))
values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=20,
)


# -- sharding a full state ------------------------------------------------------------------

def shard_inputs(layout: ShardLayout, shard: int, params: dict[str, np.ndarray],
                 state: dict[str, dict[str, Any]]) -> tuple[dict, dict]:
    """What shard ``shard`` holds of full named params and their optimizer state: flat
    slices of the parameters and of every array of the parameter's shape, scalars as is."""
    slices = layout.slices(shard)
    shard_params = {name: params[name].reshape(-1)[a:b] for name, (a, b) in slices.items()}
    shard_state = {}
    for name, entries in state.items():
        a, b = slices[name]
        shard_state[name] = {
            key: (value.reshape(-1)[a:b] if isinstance(value, np.ndarray) and value.ndim >= 1 else value)
            for key, value in entries.items()
        }
    return shard_params, shard_state


def named_state(optimizer, names: list[str]) -> tuple[dict, list[dict]]:
    """An optimizer's state_dict keyed by parameter name instead of index, and its groups
    with member names (names given in the optimizer's index order)."""
    state_dict = optimizer.state_dict()
    state = {names[index]: entries for index, entries in state_dict["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
              for g in state_dict["param_groups"]]
    return state, groups


# -- file surgery for the corpus and the fuzzer -------------------------------------------

def split_file(data: bytes) -> tuple[dict, bytes, int]:
    """The decoded header (msgpack-native, maps as dicts), the bytes after it, and where
    the data region starts."""
    _, _, length, _ = PREAMBLE.unpack_from(data)
    header = msgpack.unpackb(data[PREAMBLE.size:PREAMBLE.size + length], raw=False, strict_map_key=False)
    start = -(-(PREAMBLE.size + length) // 64) * 64
    return header, data[start:], start


def build_file(header: Any, data: bytes, *, magic: bytes = MAGIC, version: int = VERSION,
               pad_header: bool = True, header_bytes: bytes | None = None) -> bytes:
    """A file from a (possibly malformed) header value and data region, with a correct
    header checksum so the reader's structural checks are what gets exercised."""
    packed = msgpack.packb(header, use_bin_type=True) if header_bytes is None else header_bytes
    head = PREAMBLE.pack(magic, version, len(packed), checksum(packed)) + packed
    if pad_header:
        head += bytes(-len(head) % 64)
    return head + data


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One random damage: bit flips, byte overwrites, truncation, insertion, deletion,
    duplicated ranges or a rewritten header (checksum recomputed) of a valid file."""
    buf = bytearray(data)
    kind = rng.integers(0, 10)
    if kind >= 8:
        return _mutate_structure(data, rng)
    if kind == 0:
        for _ in range(rng.integers(1, 4)):
            i = rng.integers(0, len(buf))
            buf[i] ^= 1 << int(rng.integers(0, 8))
    elif kind == 1:
        for _ in range(rng.integers(1, 8)):
            buf[rng.integers(0, len(buf))] = int(rng.integers(0, 256))
    elif kind == 2:
        del buf[rng.integers(0, len(buf)):]
    elif kind == 3:
        i = rng.integers(0, len(buf) + 1)
        buf[i:i] = rng.integers(0, 256, rng.integers(1, 80), dtype=np.uint8).tobytes()
    elif kind == 4:
        i = rng.integers(0, len(buf))
        del buf[i:i + rng.integers(1, 80)]
    elif kind == 5:
        i, j = sorted(rng.integers(0, len(buf), 2))
        buf[j:j] = buf[i:i + rng.integers(1, 64)]
    else:
        # damage inside the header but re-seal it, so the structure checks must catch it
        _, _, length, _ = PREAMBLE.unpack_from(data)
        header = bytearray(data[PREAMBLE.size:PREAMBLE.size + length])
        for _ in range(rng.integers(1, 4)):
            if kind == 6:
                header[rng.integers(0, len(header))] = int(rng.integers(0, 256))
            else:
                i = rng.integers(0, len(header))
                del header[i:i + rng.integers(1, 4)]
        rest = data[-(-(PREAMBLE.size + length) // 64) * 64:]
        return build_file(None, rest, header_bytes=bytes(header))
    return bytes(buf)


_ODD_VALUES = [None, True, -1, 0, 1, 63, 64, 4096, 2**31, 2**40, 2**63 - 1, -(2**63), 1.5, float("nan"),
               "", "float32", "bool", "a", b"", b"\x00" * 8, [], [0], [-1], [2**40, 2**40], {}, {"a": 1},
               msgpack.ExtType(1, b"a"), msgpack.ExtType(2, b"\x90"), msgpack.ExtType(3, b""),
               msgpack.ExtType(4, b"\x92\xa4bool\xc4\x01\x03"), msgpack.ExtType(7, b"")]


def _mutate_structure(data: bytes, rng: np.random.Generator) -> bytes:
    """Replace, delete or duplicate one node of the decoded header, then re-seal it, so
    the reader's field and layout checks (not the checksum) must catch the change."""
    header, rest, _ = split_file(data)
    nodes = []

    def walk(node):
        if isinstance(node, dict):
            for key in list(node):
                nodes.append((node, key))
                walk(node[key])
        elif isinstance(node, list):
            for index in range(len(node)):
                nodes.append((node, index))
                walk(node[index])

    walk(header)
    parent, key = nodes[rng.integers(0, len(nodes))]
    action = rng.integers(0, 4)
    if action == 0 and isinstance(parent, dict):
        del parent[key]
    elif action == 1 and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] += int(rng.choice([-64, -1, 1, 64, 4096]))
    elif action == 2 and isinstance(parent, list):
        parent.insert(key, parent[key])
    else:
        parent[key] = _ODD_VALUES[rng.integers(0, len(_ODD_VALUES))]
    return build_file(header, rest)
