"""Writes the committed test files: ``golden_v1.ckpt`` (a version-1 file every future reader
must load; written only when absent) and ``malformed/`` (damaged and hostile files, each
with the message the reader must give, in ``malformed/EXPECTED.json``).

    python -m tests.checkpoints.make_corpus

Every malformed file but the first few carries a correct header checksum, so what rejects
it is the reader's structural checks, not the checksum.
"""

from __future__ import annotations

import json
import struct
import tempfile
from pathlib import Path

import msgpack
import numpy as np

from shardstep.checkpoints.format import (
    DTYPE_NAMES,
    EXT_SCALAR,
    EXT_TENSOR,
    EXT_TUPLE,
    PREAMBLE,
    Encoder,
    checksum,
    dump,
    write_file,
)
from tests.checkpoints import build_file, split_file

HERE = Path(__file__).parent
GOLDEN = HERE / "golden_v1.ckpt"
MALFORMED = HERE / "malformed"


def golden_value() -> dict:
    """Every dtype, 0-d, empty and multi-chunk arrays, and every kind of plain value."""
    arrays = {}
    for i, name in enumerate(DTYPE_NAMES):
        dtype = np.dtype(name)
        raw = (np.arange(24 * dtype.itemsize, dtype=np.int64) * (i + 7) % 251).astype(np.uint8)
        if dtype.kind == "b":
            raw %= 2
        arrays[name] = raw.view(dtype).reshape(2, 3, 4)
    return {
        "arrays": arrays,
        "zero_d": np.array(2.5, np.float32),
        "empty": np.zeros((0, 4), np.int64),
        "large": np.arange(3000, dtype=np.float64),  # six 4 KiB checksum chunks
        "optimizer": {
            "state": {0: {"step": np.array(3.0, np.float32), "exp_avg": np.linspace(0, 1, 6, dtype=np.float32)},
                      1: {"step": 4}},
            "param_groups": [{"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "foreach": None,
                              "amsgrad": False, "params": [0, 1]}],
        },
        "scalars": [np.float16(1.5), np.int64(-3), np.bool_(True), np.complex64(1 - 2j)],
        "plain": {"none": None, "true": True, "int": -7, "big": 3**50, "float": -0.0,
                  "text": "ünï/cödé~", "bytes": b"\x00\x01", "tuple": (1, ("nested",)), "list": [[], ()]},
    }


def small_file() -> bytes:
    """The small valid file whose every single-byte corruption the tests try."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "small.ckpt"
        dump({"a": np.arange(6, dtype=np.int32), "b": np.array([True, False, True]), "c": [1, "x"]}, path)
        return path.read_bytes()


def _chunked_file() -> bytes:
    """One 10000-byte tensor in 4096-byte checksum chunks, then a small one."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "chunked.ckpt"
        encoder = Encoder()
        tree = encoder.encode({"w": np.arange(2500, dtype=np.float32), "v": np.arange(3, dtype=np.int8)})
        write_file(path, tree, encoder.tensors, chunk_size=4096)
        return path.read_bytes()


def _cases() -> dict[str, tuple[bytes, str]]:
    small = small_file()
    header, data, start = split_file(small)
    chunked = _chunked_file()
    chunked_header, chunked_data, chunked_start = split_file(chunked)
    _, _, length, _ = PREAMBLE.unpack_from(small)

    def edit(change, base=header, rest=data):
        copy = msgpack.unpackb(msgpack.packb(base, use_bin_type=True), raw=False, strict_map_key=False)
        change(copy)
        return build_file(copy, rest)

    def table(index, **fields):
        def change(h):
            h["tensors"][index].update(fields)
        return change

    deep = msgpack.ExtType(EXT_TUPLE, msgpack.packb([]))
    for _ in range(120):
        deep = msgpack.ExtType(EXT_TUPLE, msgpack.packb([deep], use_bin_type=True))
    raw_header = msgpack.packb(header, use_bin_type=True)
    bool_entry = header["tensors"][1]

    cases = {
        "empty": (b"", r"file is 0 bytes, shorter than the 24-byte preamble"),
        "png": (b"\x89PNG\r\n\x1a\n" + small[8:], r"bad magic b'\\x89PNG\\r\\n\\x1a\\n'"),
        "future_version": (small[:8] + struct.pack("<I", 2) + small[12:],
                           r"unsupported format version 2; this reader reads version 1"),
        "header_past_end": (small[:12] + struct.pack("<I", 0xFFFFFFF0) + small[16:],
                            r"header of 4294967280 bytes .* runs past the end of the \d+-byte file"),
        "header_checksum": (small[:PREAMBLE.size + 3] + bytes([small[PREAMBLE.size + 3] ^ 1]) + small[PREAMBLE.size + 4:],
                            r"header checksum mismatch"),
        "header_padding": (small[:PREAMBLE.size + length] + b"\x01" + small[PREAMBLE.size + length + 1:],
                           r"nonzero byte in the padding after the header"),
        "header_not_msgpack": (build_file(None, data, header_bytes=b"\xc1" + raw_header[1:]),
                               r"header is not valid msgpack"),
        "header_extra_bytes": (build_file(None, data, header_bytes=raw_header + b"\x00"),
                               r"header is not valid msgpack \(ExtraData"),
        "header_not_a_map": (build_file([1, 2], b""), r"header must be a map; got list"),
        "header_unknown_field": (edit(lambda h: h.update(extra=1)), r"header has unknown field 'extra'"),
        "header_missing_field": (edit(lambda h: h.pop("tree")), r"header lacks field\(s\) tree"),
        "chunk_size": (edit(lambda h: h.update(chunk_size=1000)), r"chunk_size 1000 must be a power of two"),
        "unknown_dtype": (edit(table(0, dtype="float8")), r"tensor 'a': unknown dtype 'float8'"),
        "shape_length": (edit(table(0, shape=[7])), r"tensor 'a': length 24 disagrees with shape \[7\] of int32"),
        "negative_dim": (edit(table(0, shape=[-6])), r"shape \[-6\] must be a list of at most 64 non-negative ints"),
        "empty_but_too_large": (edit(table(0, shape=[0, 1 << 62, 1 << 62], length=0, checksums=b"")),
                                r"tensor 'a': shape \[0, 4611686018427387904, 4611686018427387904\] is too large"),
        "huge_claim": (edit(table(0, shape=[1 << 40], length=4 << 40, checksums=b"")),
                       r"tensor 'a': bytes \d+\.\.\d+ run past the end of the \d+-byte file"),
        "misaligned": (edit(table(1, offset=40)), r"offset 40 must be a non-negative multiple of 64"),
        "overlap": (edit(table(1, offset=0)), r"tensor 'b': offset 0 overlaps the previous tensor, which ends at 24"),
        "gap": (edit(table(1, offset=128)), r"tensor 'b': offset 128 leaves a gap; the next tensor starts at 64"),
        "trailing": (small + b"\x00", r"but its data ends at byte \d+; trailing bytes or truncation"),
        "truncated": (small[:-1], r"tensor 'b': bytes \d+\.\.\d+ run past the end"),
        "data_checksum": (small[:start] + bytes([small[start] ^ 0x80]) + small[start + 1:],
                          r"checksum mismatch in tensor 'a', bytes 0\.\.24; the data is damaged"),
        "second_chunk": (chunked[:chunked_start + 5000] + b"\xff" + chunked[chunked_start + 5001:],
                         r"checksum mismatch in tensor 'w', bytes 4096\.\.8192"),
        "checksum_count": (edit(table(0, checksums=bytes(16))), r"tensor 'a': checksum list of 16 bytes; expected 8"),
        "duplicate_key": (edit(table(1, key="a")), r"tensor 'a' appears twice in the tensor table"),
        "unreferenced": (edit(lambda h: h.update(tree={"a": msgpack.ExtType(EXT_TENSOR, b"a")})),
                         r"tensor 'b' is in the table but not in the value tree"),
        "dangling_reference": (edit(lambda h: h["tree"].update(z=msgpack.ExtType(EXT_TENSOR, b"zz"))),
                               r"refers to tensor 'zz', which the table lacks"),
        "double_reference": (edit(lambda h: h["tree"].update(b=msgpack.ExtType(EXT_TENSOR, b"a"))),
                             r"refers to tensor 'a' twice"),
        "unknown_extension": (edit(lambda h: h["tree"].update(c=msgpack.ExtType(9, b""))),
                              r"unknown msgpack extension type 9; the format defines 1 to 4"),
        "timestamp": (edit(lambda h: h["tree"].update(c=msgpack.Timestamp(1, 0))),
                      r"value of unsupported msgpack type Timestamp"),
        "float_key": (edit(lambda h: h["tree"].update({1.5: 1})), r"map key 1.5 of type float"),
        "too_deep": (edit(lambda h: h["tree"].update(c=deep)), r"value tree nested deeper than 100 levels"),
        "bool_byte": (_bool_two(header, data), r"bool tensor 'b' holds bytes other than 0 and 1"),
        "tensor_padding": (small[:start + 30] + b"\x07" + small[start + 31:],
                           r"nonzero byte in the padding before tensor 'b'"),
        "scalar_payload": (edit(lambda h: h["tree"].update(c=msgpack.ExtType(
            EXT_SCALAR, msgpack.packb(["float32", b"\x00\x00"])))),
            r"numpy scalar payload .* must be \[dtype name, its little-endian bytes\]"),
    }
    assert bool_entry["key"] == "b"
    return cases


def _bool_two(header: dict, data: bytes) -> bytes:
    """The bool tensor holding byte 2, with its chunk checksum recomputed."""
    entry = header["tensors"][1]
    start = entry["offset"]
    damaged = data[:start] + b"\x02" + data[start + 1:]
    copy = msgpack.unpackb(msgpack.packb(header, use_bin_type=True), raw=False, strict_map_key=False)
    copy["tensors"][1]["checksums"] = checksum(damaged[start:start + entry["length"]]).to_bytes(8, "little")
    return build_file(copy, damaged)


def main() -> None:
    # the golden file pins what version 1 is: written once, never regenerated by a newer writer
    kept = GOLDEN.exists()
    if not kept:
        encoder = Encoder()
        write_file(GOLDEN, encoder.encode(golden_value()), encoder.tensors, chunk_size=4096)
    MALFORMED.mkdir(exist_ok=True)
    for old in MALFORMED.glob("*.ckpt"):
        old.unlink()
    expected = {}
    for number, (name, (content, message)) in enumerate(_cases().items()):
        file_name = f"{number:02d}-{name}.ckpt"
        (MALFORMED / file_name).write_bytes(content)
        expected[file_name] = message
    (MALFORMED / "EXPECTED.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"{'kept' if kept else 'wrote'} {GOLDEN}; wrote {len(expected)} files in {MALFORMED}")


if __name__ == "__main__":
    main()
