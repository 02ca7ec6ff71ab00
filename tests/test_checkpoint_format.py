"""The single-file format: exact round trips of state_dict-like values, what dump refuses,
atomic replacement, read-only mapped loads, and a committed file that must keep loading."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from shardstep import checkpoints
from shardstep.checkpoints.format import DTYPE_NAMES, MAGIC, PREAMBLE
from shardstep.workers.optim import LBFGS, Adam, Parameter, RowSparseGrad, SparseAdam
from tests.checkpoints import assert_identical, values

GOLDEN = Path(__file__).parent / "checkpoints" / "golden_v1.ckpt"


def roundtrip(obj, tmp_path, mmap=False):
    path = tmp_path / "value.ckpt"
    checkpoints.dump(obj, path)
    return checkpoints.load(path, mmap=mmap)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=values)
def test_random_nested_values_round_trip_exactly(value, tmp_path):
    assert_identical(value, roundtrip(value, tmp_path))
    assert_identical(value, roundtrip(value, tmp_path, mmap=True))


@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_every_dtype_with_empty_zero_d_non_contiguous_and_big_endian_arrays(name, tmp_path):
    dtype = np.dtype(name)
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, 4096 * dtype.itemsize, dtype=np.uint8)
    if dtype.kind == "b":
        raw %= 2
    base = raw.view(dtype)
    obj = {
        "plain": base[:60].reshape(3, 4, 5),
        "zero_d": base[5].reshape(()),
        "empty": base[:0].reshape(0, 3),
        "empty_2": np.empty((4, 0, 2), dtype),
        "strided": base[:240].reshape(12, 20)[::3, 1::2],
        "fortran": np.asfortranarray(base[:60].reshape(6, 10)),
        "reversed": base[:17][::-1],
        "big_endian": base[:24].reshape(4, 6).astype(dtype.newbyteorder(">")),
        "scalar": base[3],
    }
    loaded = roundtrip(obj, tmp_path)
    assert_identical(obj, loaded)
    assert all(a.flags.c_contiguous and a.flags.writeable for a in loaded.values() if isinstance(a, np.ndarray))


def test_non_contiguous_arrays_larger_than_the_io_block_are_streamed_in_pieces(tmp_path):
    # 3 x 4M float64 rows, every other column: a conversion row block by row block
    base = np.arange(3 * 2 * (1 << 21), dtype=np.float64).reshape(3, -1)
    obj = {"strided": base[:, ::2], "transposed": base.T[: 1 << 20], "swapped": base[1].astype(">f8")}
    assert_identical(obj, roundtrip(obj, tmp_path))


def test_python_types_survive_as_they_were(tmp_path):
    obj = {
        0: {"step": np.float32(3.0), "flag": True, "n": 7, "none": None},
        "tuple": (1, (2.5, "x"), []), "list": [1, [2, (3,)]], "empty_tuple": (), "empty_dict": {},
        "big": 2**200, "small": -(2**100), "edges": [2**64 - 1, -(2**63)], "float_bits": [float("nan"), -0.0, float("inf")],
        "bytes": b"\x00\xff", "text": "é/~", -1: "negative key", 2**63 - 1: "largest key",
    }
    loaded = roundtrip(obj, tmp_path)
    assert_identical(obj, loaded)
    assert type(loaded["tuple"][1]) is tuple and type(loaded["list"][1]) is list


def test_numpy_rng_and_python_random_states_round_trip(tmp_path):
    import random

    generator = np.random.default_rng(12345)
    generator.random(3)
    obj = {"numpy": generator.bit_generator.state, "python": random.Random(5).getstate(),
           "legacy": np.random.RandomState(3).get_state()}
    loaded = roundtrip(obj, tmp_path)
    assert_identical(obj, loaded)
    restored = np.random.default_rng()
    restored.bit_generator.state = loaded["numpy"]
    assert restored.random() == generator.random()
    rebuilt = random.Random()
    rebuilt.setstate(loaded["python"])
    assert rebuilt.random() == random.Random(5).random()


def _stepped(optimizer_class, make_grad, steps=3, **kwargs):
    rng = np.random.default_rng(0)
    params = [Parameter(rng.standard_normal((4, 3)).astype(np.float32), name="w"),
              Parameter(rng.standard_normal(3).astype(np.float32), name="b")]
    optimizer = optimizer_class(params, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = make_grad(p, rng)
        optimizer.step(lambda: 1.0)
    return optimizer


@pytest.mark.parametrize("case", ["adam_amsgrad", "sparse_adam", "lbfgs"])
def test_optimizer_state_dicts_round_trip_and_load_back(case, tmp_path):
    """torch-layout state_dicts: int state keys, float32 0-d steps, SparseAdam's int step,
    tuples (betas), None (foreach), LBFGS's lists and Python floats."""
    dense = lambda p, rng: rng.standard_normal(p.shape).astype(np.float32)  # noqa: E731
    if case == "adam_amsgrad":
        optimizer = _stepped(Adam, dense, amsgrad=True, betas=(0.8, 0.99))
    elif case == "sparse_adam":
        optimizer = _stepped(SparseAdam, lambda p, rng: RowSparseGrad(
            np.array([0]), rng.standard_normal((1, *p.shape[1:])).astype(np.float32), p.shape))
    else:
        optimizer = _stepped(LBFGS, dense, history_size=3)
    state_dict = optimizer.state_dict()
    loaded = roundtrip(state_dict, tmp_path)
    assert_identical(state_dict, loaded)
    if case == "sparse_adam":
        assert type(loaded["state"][0]["step"]) is int
    fresh = type(optimizer)([Parameter(p.data.copy()) for g in optimizer.param_groups for p in g["params"]])
    fresh.load_state_dict(loaded)
    assert_identical(state_dict, fresh.state_dict())


@pytest.mark.parametrize("bad, message", [
    ({"s": {1, 2}}, r"obj\['s'\]: values of type set are not supported; allowed: dict"),
    ({(1, 2): 0}, r"dict key \(1, 2\) of type tuple; keys must be str or int"),
    ({2**64: 0}, r"dict key 18446744073709551616 of type int; keys must be str or int \(64-bit\)"),
    ({"a": [np.array(["x"])]}, r"obj\['a'\]\[0\]: arrays of dtype <U1 are not supported; allowed dtypes: bool, int8"),
    ({"o": np.array([None], object)}, r"arrays of dtype object are not supported"),
    ({"l": np.longdouble(1)}, r"numpy scalar of dtype float128 is not supported"),
    ({"c": 1j}, r"values of type complex are not supported"),
    ({"m": np.ma.masked_array([1, 2])}, r"values of type MaskedArray are not supported"),
])
def test_unsupported_values_are_refused_with_where_and_what(bad, message, tmp_path):
    target = tmp_path / "x.ckpt"
    checkpoints.dump({"old": 1}, target)
    with pytest.raises(TypeError, match=message):
        checkpoints.dump(bad, target)
    assert checkpoints.load(target) == {"old": 1}
    assert sorted(os.listdir(tmp_path)) == ["x.ckpt"]


def test_nesting_beyond_the_limit_is_refused(tmp_path):
    deep = []
    for _ in range(150):
        deep = [deep]
    with pytest.raises(ValueError, match="nesting deeper than 100 levels"):
        checkpoints.dump(deep, tmp_path / "deep.ckpt")


def test_unknown_keyword_and_bad_mmap_value_are_refused(tmp_path):
    checkpoints.dump({}, tmp_path / "x.ckpt")
    with pytest.raises(TypeError, match="unexpected keyword argument 'verify'"):
        checkpoints.load(tmp_path / "x.ckpt", verify=False)
    with pytest.raises(TypeError, match="mmap must be True or False; got 1"):
        checkpoints.load(tmp_path / "x.ckpt", mmap=1)


def test_mmap_load_gives_read_only_views_and_default_load_gives_private_copies(tmp_path):
    path = tmp_path / "x.ckpt"
    checkpoints.dump({"w": np.arange(1000, dtype=np.float32)}, path)
    mapped = checkpoints.load(path, mmap=True)["w"]
    assert not mapped.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        mapped[0] = 1
    owned = checkpoints.load(path)["w"]
    owned[0] = 5
    assert checkpoints.load(path)["w"][0] == 0 and mapped[0] == 0
    mapped.copy()[0] = 1  # a copy on request is writable


def test_dump_replaces_an_existing_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.ckpt"
    checkpoints.dump({"v": np.zeros(10)}, path)
    checkpoints.dump({"v": np.ones(3)}, path)
    assert_identical({"v": np.ones(3)}, checkpoints.load(path))
    assert os.listdir(tmp_path) == ["x.ckpt"]


def test_missing_directory_and_missing_file_are_checkpoint_errors(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match=r"cannot write checkpoint .*nowhere/x.ckpt: No such file"):
        checkpoints.dump({}, tmp_path / "nowhere" / "x.ckpt")
    with pytest.raises(checkpoints.CheckpointError, match=r"cannot open checkpoint .*absent.ckpt: No such file"):
        checkpoints.load(tmp_path / "absent.ckpt")


WRITE_LIMITED = """
import resource, signal, sys
import numpy as np
from shardstep import checkpoints
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # writes past the limit fail with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    checkpoints.dump({"big": np.ones(1 << 19)}, sys.argv[1])
except checkpoints.CheckpointError as error:
    print("refused:", error)
"""


def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_nothing(tmp_path):
    """A real I/O error (the file-size limit, EFBIG) after part of the data was written."""
    path = tmp_path / "x.ckpt"
    checkpoints.dump({"old": np.arange(4)}, path)
    out = subprocess.run([sys.executable, "-c", WRITE_LIMITED, str(path)], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], check=True)
    assert "refused: cannot write checkpoint" in out.stdout and "File too large" in out.stdout, out
    assert_identical({"old": np.arange(4)}, checkpoints.load(path))
    assert os.listdir(tmp_path) == ["x.ckpt"]


def test_file_layout_is_the_documented_one(tmp_path):
    path = tmp_path / "x.ckpt"
    checkpoints.dump({"a": np.arange(3, dtype=np.int16), "b": np.ones(2, np.float64)}, path)
    data = path.read_bytes()
    magic, version, header_length, _ = PREAMBLE.unpack_from(data)
    assert (magic, version) == (MAGIC, 1)
    start = -(-(24 + header_length) // 64) * 64
    # a at the data start, b at the next multiple of 64, the file ending right after b
    assert data[start:start + 6] == np.arange(3, dtype="<i2").tobytes()
    assert data[start + 6:start + 64] == bytes(58)
    assert data[start + 64:] == np.ones(2, "<f8").tobytes()


def test_the_committed_version_1_file_still_loads():
    """Written once by tests/checkpoints/make_corpus.py; a reader change that breaks it breaks
    every checkpoint already on disk."""
    from tests.checkpoints.make_corpus import golden_value

    assert_identical(golden_value(), checkpoints.load(GOLDEN))
