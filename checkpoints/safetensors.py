"""The safetensors format, written and read here (no dependency): the parameters-only file
the Hugging Face ecosystem, ``safetensors.numpy`` and ``safetensors.torch`` load.

    write_safetensors("model.safetensors", {"0.weight": array, ...}, metadata={"format": "pt"})
    with SafetensorsFile("model.safetensors") as weights:
        weights.specs                       # name -> (dtype, shape), in the file's order
        weights.read("0.weight", 0, 1024)   # elements 0 .. 1023 of the flattened tensor

Layout (https://github.com/huggingface/safetensors, "Format"): an unsigned little-endian
64-bit header length N, N bytes of JSON (``{name: {"dtype", "shape", "data_offsets":
[begin, end]}, "__metadata__": {str: str}}``, padded with spaces to a multiple of 8), then
the tensors' bytes, little-endian and C-ordered, at those offsets from the end of the header.
The reader checks what a damaged or hostile file could get wrong (a header larger than the
file or than ``MAX_HEADER_BYTES``, offsets outside the data or overlapping, a shape that does
not match its byte count, an unknown dtype) and reads only the byte range a caller asks for,
so a shard of a fine-tuning run reads only its own rows.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from shardstep.checkpoints.errors import CheckpointError, CorruptCheckpointError

# safetensors' dtype names and numpy's; BF16 and the 8-bit floats have no numpy dtype
DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32", "I16": "int16",
          "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool"}
CODES = {name: code for code, name in DTYPES.items()}
# the header is JSON: 100 MB is the reference implementation's own limit
MAX_HEADER_BYTES = 100_000_000
SUFFIXES = (".safetensors",)


def write_safetensors(path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``arrays`` (name -> ndarray of a dtype in ``CODES``) to ``path`` atomically (a
    temporary file renamed into place)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(key): str(value) for key, value in metadata.items()}
    offset = 0
    for name, array in arrays.items():
        dtype = np.dtype(array.dtype)
        if dtype.name not in CODES:
            raise ValueError(f"safetensors: {name!r} has dtype {dtype}; allowed: {', '.join(CODES)}")
        size = array.size * dtype.itemsize
        header[name] = {"dtype": CODES[dtype.name], "shape": list(array.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    temporary = f"{os.fspath(path)}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            handle.write(struct.pack("<Q", len(text)))
            handle.write(text)
            for array in arrays.values():
                little = np.ascontiguousarray(array, dtype=np.dtype(array.dtype).newbyteorder("<"))
                handle.write(memoryview(little.reshape(-1).view(np.uint8)))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise


class SafetensorsFile:
    """A safetensors file opened for ranged reads (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._handle = open(self.path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: no such file") from None
        except OSError as error:
            raise CheckpointError(f"cannot read {self.path}: {error.strerror or error}") from error
        try:
            self.specs, self.metadata, self._offsets, self._data_start = self._header()
        except BaseException:
            self._handle.close()
            raise

    def _damaged(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.path} is not a valid safetensors file: {what}")

    def _header(self) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, str], dict[str, tuple[int, int]], int]:
        size = os.fstat(self._handle.fileno()).st_size
        prefix = self._handle.read(8)
        if len(prefix) < 8:
            raise self._damaged(f"it is {size} bytes, shorter than the 8-byte header length")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise self._damaged(f"its header length {length} exceeds the file ({size} bytes) or {MAX_HEADER_BYTES}")
        try:
            header = json.loads(self._handle.read(length))
        except (UnicodeDecodeError, ValueError) as error:
            raise self._damaged(f"its header is not JSON ({error})") from None
        if not isinstance(header, dict):
            raise self._damaged("its header is not a JSON object")
        metadata = header.pop("__metadata__", {}) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._damaged("__metadata__ must map strings to strings")
        data_size = size - 8 - length
        specs, offsets = {}, {}
        for name, entry in header.items():
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                raise self._damaged(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
            code, shape, span = entry["dtype"], entry["shape"], entry["data_offsets"]
            if code not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {code!r}, which numpy cannot hold; "
                                      f"allowed: {', '.join(DTYPES)}")
            if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                    or not isinstance(span, list) or len(span) != 2 or not all(type(o) is int for o in span)):
                raise self._damaged(f"tensor {name!r} has a bad shape {shape!r} or offsets {span!r}")
            begin, end = span
            if not 0 <= begin <= end <= data_size:
                raise self._damaged(f"tensor {name!r} lies at bytes [{begin}, {end}) of a data section of {data_size}")
            if (end - begin) != math.prod(shape) * np.dtype(DTYPES[code]).itemsize:
                raise self._damaged(f"tensor {name!r} of shape {shape} and dtype {code} needs "
                                    f"{math.prod(shape) * np.dtype(DTYPES[code]).itemsize} bytes; its offsets give "
                                    f"{end - begin}")
            specs[name] = (DTYPES[code], tuple(shape))
            offsets[name] = (begin, end)
        spans = sorted(offsets.values())
        for (_, first_end), (second_begin, _) in zip(spans, spans[1:]):
            if second_begin < first_end:
                raise self._damaged("two tensors' bytes overlap")
        return specs, metadata, offsets, 8 + length

    def read(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Elements ``start .. stop - 1`` of the flattened tensor ``name`` (a copy, native
        byte order)."""
        dtype_name, shape = self.specs[name]
        dtype = np.dtype(dtype_name).newbyteorder("<")
        count = math.prod(shape)
        stop = count if stop is None else stop
        if not 0 <= start <= stop <= count:
            raise ValueError(f"{self.path}: elements [{start}, {stop}) of {name!r}, which has {count}")
        begin = self._data_start + self._offsets[name][0] + start * dtype.itemsize
        data = os.pread(self._handle.fileno(), (stop - start) * dtype.itemsize, begin)
        if len(data) != (stop - start) * dtype.itemsize:
            raise self._damaged(f"tensor {name!r} ends past the end of the file")
        return np.frombuffer(data, dtype).astype(dtype_name)

    def array(self, name: str) -> np.ndarray:
        return self.read(name).reshape(self.specs[name][1])

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
