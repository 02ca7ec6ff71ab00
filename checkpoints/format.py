"""The single-file checkpoint format: a msgpack header, then raw little-endian buffers.

The specification is ``checkpoints/FORMAT.md``; this module is its reference writer and
reader. In short::

    preamble (24 bytes): magic, format version, header length, XXH3-64 of the header
    header (msgpack):    {"chunk_size", "tensors": [tensor table], "tree": the value}
    zero padding to a multiple of 64, then each tensor's bytes (C order, little-endian),
    each starting at the next multiple of 64, zero padding between them

Every byte of a file is covered: the header by its checksum, each tensor by one XXH3-64 per
``chunk_size`` bytes, padding by having to be zero, and the length by having to end exactly
where the last tensor ends. Nothing is ever unpickled; the value tree uses four extension
types defined by the spec (tensor reference, tuple, big integer, numpy scalar).
"""

from __future__ import annotations

import math
import mmap as _mmap
import os
import reprlib
import secrets
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import xxhash

from shardstep.checkpoints.errors import CheckpointError, CorruptCheckpointError
from shardstep.checkpoints.storage import ObjectSource, is_url, location, put_object

MAGIC = b"\x89SSCKPT\n"
VERSION = 1
# magic, format version, header length, XXH3-64 of the header bytes; all little-endian
PREAMBLE = struct.Struct("<8sIIQ")
ALIGNMENT = 64
CHUNK_SIZE = 1 << 20
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 1 << 12, 1 << 30
# bytes handed to one write() / read() call; a multiple of CHUNK_SIZE
IO_BLOCK = 8 << 20
MAX_DEPTH = 100
MAX_NDIM = 64
MAX_HEADER = (1 << 32) - 1

EXT_TENSOR, EXT_TUPLE, EXT_BIGINT, EXT_SCALAR = 1, 2, 3, 4

DTYPE_NAMES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
)
DTYPES = {name: np.dtype(name).newbyteorder("<") for name in DTYPE_NAMES}
ALLOWED_DTYPES = ", ".join(DTYPE_NAMES)
TENSOR_FIELDS = ("key", "dtype", "shape", "offset", "length", "checksums")
HEADER_FIELDS = ("chunk_size", "tensors", "tree")
INT_RANGE = (-(1 << 63), (1 << 64) - 1)


def checksum(data: Any) -> int:
    """XXH3-64 (seed 0) of a bytes-like object: the format's only checksum."""
    return xxhash.xxh3_64_intdigest(data)


def align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def dtype_name(dtype: np.dtype) -> str | None:
    """The format's name of a numpy dtype in either byte order, or None if not allowed."""
    dtype = np.dtype(dtype)
    if dtype.fields is not None or dtype.subdtype is not None or dtype.name not in DTYPES:
        return None
    return dtype.name


# ---------------------------------------------------------------------------------------
# encoding the value tree


def _describe(path: tuple) -> str:
    return "obj" + "".join(f"[{p!r}]" for p in path)


def _key_component(key: Any) -> str:
    # RFC 6901 escaping, so "/" in a name can never be mistaken for nesting
    return str(key).replace("~", "~0").replace("/", "~1")


@dataclass
class TensorSource:
    """One tensor to write: its table key, format dtype, shape and where its bytes come from
    (``blocks(n)`` yields its C-order little-endian bytes in pieces of at most n bytes)."""

    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    blocks: Callable[[int], Iterator[memoryview]]

    @property
    def length(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class StreamedArray:
    """An array to save whose bytes are produced while writing (``blocks`` as in
    :class:`TensorSource`), so a file can be written without the array in memory."""

    dtype: np.dtype
    shape: tuple[int, ...]
    blocks: Callable[[int], Iterator[memoryview]]


def array_blocks(array: np.ndarray, max_bytes: int) -> Iterator[memoryview]:
    """C-order little-endian bytes of ``array`` in pieces of at most ``max_bytes`` (one row
    block at a time when a conversion is needed, so memory never holds a second full copy)."""
    little = array.dtype.newbyteorder("<")
    if array.flags.c_contiguous and array.dtype == little:
        view = memoryview(array.reshape(-1).view(np.uint8))
        for start in range(0, len(view), max_bytes):
            yield view[start:start + max_bytes]
        return
    if array.ndim <= 1 or array.itemsize * int(np.prod(array.shape[1:])) <= max_bytes:
        if array.ndim == 0:
            yield memoryview(np.array(array, dtype=little).reshape(-1).view(np.uint8))
            return
        row_bytes = array.itemsize * int(np.prod(array.shape[1:]))
        rows = max(1, max_bytes // max(row_bytes, 1))
        for start in range(0, array.shape[0], rows):
            block = np.array(array[start:start + rows], dtype=little, order="C")
            yield memoryview(block.reshape(-1).view(np.uint8))
        return
    for row in array:
        yield from array_blocks(row, max_bytes)


class Encoder:
    """Turns a value tree into msgpack-native values plus a list of tensors to write.

    ``stage(array)`` decides where an array's bytes come from at write time: the array
    itself (synchronous save) or a snapshot copy (asynchronous save).
    """

    def __init__(self, stage: Callable[[np.ndarray], np.ndarray] | None = None):
        self.tensors: list[TensorSource] = []
        self._keys: set[str] = set()
        self._stage = stage

    def encode(self, value: Any, path: tuple = ()) -> Any:
        if len(path) > MAX_DEPTH:
            raise ValueError(f"cannot save {_describe(path[:3])}...: nesting deeper than {MAX_DEPTH} levels")
        kind = type(value)
        if value is None or kind is bool or kind is str or kind is bytes or kind is float:
            return value
        if kind is int:
            if INT_RANGE[0] <= value <= INT_RANGE[1]:
                return value
            size = (value.bit_length() + 8) // 8
            return msgpack.ExtType(EXT_BIGINT, value.to_bytes(size, "little", signed=True))
        if isinstance(value, np.ndarray) and kind in (np.ndarray, np.memmap):
            return self._tensor(value, path)
        if kind is StreamedArray:
            key = self._key(path)
            self._keys.add(key)
            self.tensors.append(TensorSource(key, DTYPES[value.dtype.name], value.shape, value.blocks))
            return msgpack.ExtType(EXT_TENSOR, key.encode())
        if isinstance(value, np.generic):
            name = dtype_name(value.dtype)
            if name is None:
                raise TypeError(
                    f"cannot save {_describe(path)}: numpy scalar of dtype {value.dtype} is not "
                    f"supported; allowed dtypes: {ALLOWED_DTYPES}"
                )
            raw = np.asarray(value, dtype=DTYPES[name]).tobytes()
            return msgpack.ExtType(EXT_SCALAR, msgpack.packb([name, raw], use_bin_type=True))
        if isinstance(value, dict):
            encoded = {}
            for key, item in value.items():
                if not (type(key) is str or (type(key) is int and INT_RANGE[0] <= key <= INT_RANGE[1])):
                    raise TypeError(
                        f"cannot save {_describe(path)}: dict key {key!r} of type "
                        f"{type(key).__name__}; keys must be str or int (64-bit)"
                    )
                encoded[key] = self.encode(item, (*path, key))
            return encoded
        if kind is list:
            return [self.encode(item, (*path, i)) for i, item in enumerate(value)]
        if kind is tuple:
            items = [self.encode(item, (*path, i)) for i, item in enumerate(value)]
            return msgpack.ExtType(EXT_TUPLE, _pack(items))
        raise TypeError(
            f"cannot save {_describe(path)}: values of type {kind.__name__} are not supported; "
            "allowed: dict (str or int keys), list, tuple, str, bytes, int, float, bool, None, "
            f"numpy arrays and numpy scalars of dtype {ALLOWED_DTYPES}"
        )

    def _tensor(self, array: np.ndarray, path: tuple) -> msgpack.ExtType:
        name = dtype_name(array.dtype)
        if name is None:
            raise TypeError(
                f"cannot save {_describe(path)}: arrays of dtype {array.dtype} are not "
                f"supported; allowed dtypes: {ALLOWED_DTYPES}"
            )
        key = self._key(path)
        self.add(key, array if self._stage is None else self._stage(array))
        return msgpack.ExtType(EXT_TENSOR, key.encode())

    def _key(self, path: tuple) -> str:
        key = "/".join(_key_component(p) for p in path)
        if key in self._keys:
            suffix = 2
            while f"{key}~{suffix}" in self._keys:
                suffix += 1
            key = f"{key}~{suffix}"
        return key

    def add(self, key: str, array: np.ndarray) -> None:
        self._keys.add(key)
        self.tensors.append(TensorSource(
            key, DTYPES[array.dtype.name], tuple(array.shape),
            lambda max_bytes, array=array: array_blocks(array, max_bytes),
        ))


def _pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


# ---------------------------------------------------------------------------------------
# writing


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        written = os.write(fd, data)
        data = data[written:]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: str | os.PathLike, tree: Any, tensors: list[TensorSource],
               chunk_size: int = CHUNK_SIZE, *, create: bool = False) -> int:
    """Write a checkpoint file atomically (temporary file, fsync, rename, fsync of the
    directory; on object storage one PUT or multipart upload, visible whole or not at all);
    returns the header checksum. ``tree`` is already encoded. ``create`` (object storage
    only): refuse, with ObjectExistsError, if the object is there already."""
    header, table, placeholder_length, data_start = _plan(path, tree, tensors, chunk_size)
    if is_url(path):
        return _write_object(location(path), header, tensors, placeholder_length, data_start, create)
    if create:
        raise ValueError("create=True is for object storage; local files commit by rename")
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except OSError as error:
        raise CheckpointError(f"cannot write checkpoint {path}: {error.strerror or error}") from error
    try:
        try:
            os.lseek(fd, data_start, os.SEEK_SET)
            position = 0
            for source, entry in zip(tensors, table):
                if entry["offset"] > position:
                    _write_all(fd, memoryview(bytes(entry["offset"] - position)))
                entry["checksums"] = _checksummed(source, entry["length"], chunk_size,
                                                  lambda block: _write_all(fd, block))
                position = entry["offset"] + entry["length"]
            head, header_sum = _head(header, placeholder_length, data_start)
            os.pwrite(fd, head, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, path)
        _fsync_directory(path.parent)
    except BaseException as error:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        if isinstance(error, OSError):
            raise CheckpointError(f"cannot write checkpoint {path}: {error.strerror or error}") from error
        raise
    return header_sum


def _plan(path: Any, tree: Any, tensors: list[TensorSource], chunk_size: int) -> tuple[dict, list, int, int]:
    """The header with its tensor table (checksums zeroed: same length as the real ones),
    the header's packed length and where the data starts."""
    table = []
    end = 0
    for source in tensors:
        offset = align(end)
        length = source.length
        table.append({
            "key": source.key, "dtype": source.dtype.name, "shape": list(source.shape),
            "offset": offset, "length": length, "checksums": bytes(8 * -(-length // chunk_size)),
        })
        end = offset + length
    header = {"chunk_size": chunk_size, "tensors": table, "tree": tree}
    placeholder = _pack(header)
    if len(placeholder) > MAX_HEADER:
        raise ValueError(f"cannot save {path}: the header would be {len(placeholder)} bytes; at most {MAX_HEADER}")
    return header, table, len(placeholder), align(PREAMBLE.size + len(placeholder))


def _head(header: dict, placeholder_length: int, data_start: int) -> tuple[bytes, int]:
    """Preamble, header and padding: the file's first ``data_start`` bytes, and the
    header checksum."""
    header_bytes = _pack(header)
    assert len(header_bytes) == placeholder_length, "header length changed while writing"
    header_sum = checksum(header_bytes)
    head = PREAMBLE.pack(MAGIC, VERSION, len(header_bytes), header_sum)
    return head + header_bytes + bytes(data_start - PREAMBLE.size - len(header_bytes)), header_sum


def _write_object(path: Any, header: dict, tensors: list[TensorSource], placeholder_length: int,
                  data_start: int, create: bool) -> int:
    """An object cannot be written header-last, so the checksums come from a first pass over
    the data (hashing runs at memory speed, far above any upload) and the upload streams
    header then data. The second pass is checked against the first: a source that changed
    in between fails the upload before it completes, never stores a file whose checksums lie."""
    table = header["tensors"]
    chunk_size = header["chunk_size"]
    for source, entry in zip(tensors, table):
        entry["checksums"] = _checksummed(source, entry["length"], chunk_size, None)
    head, header_sum = _head(header, placeholder_length, data_start)

    put_object(path, _streamed(tensors, table, head, chunk_size, path), create=create)
    return header_sum


def _streamed(tensors: list[TensorSource], table: list[dict], head: bytes, chunk_size: int, path: Any):
    """Header, padding and each tensor's blocks in file order, re-hashed as they go out."""
    yield head
    position = 0
    for source, entry in zip(tensors, table):
        if entry["offset"] > position:
            yield bytes(entry["offset"] - position)
        hasher = _ChunkHasher(chunk_size)
        for block in source.blocks(IO_BLOCK):
            hasher.update(block)
            yield block
        if hasher.length != entry["length"] or hasher.digest() != entry["checksums"]:
            raise CheckpointError(f"cannot write {path}: tensor {source.key!r} changed while it was uploaded")
        position = entry["offset"] + entry["length"]


class _ChunkHasher:
    """XXH3-64 of every ``chunk_size`` bytes of a stream fed in blocks of any length."""

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self.sums = bytearray()
        self.hasher = xxhash.xxh3_64()
        self.filled = 0
        self.length = 0

    def update(self, block: memoryview) -> None:
        self.length += len(block)
        position = 0
        while position < len(block):
            take = min(self.chunk_size - self.filled, len(block) - position)
            if self.filled == 0 and take == self.chunk_size:
                self.sums += checksum(block[position:position + take]).to_bytes(8, "little")
            else:
                self.hasher.update(block[position:position + take])
                self.filled += take
                if self.filled == self.chunk_size:
                    self.sums += self.hasher.intdigest().to_bytes(8, "little")
                    self.hasher.reset()
                    self.filled = 0
            position += take

    def digest(self) -> bytes:
        sums = bytearray(self.sums)
        if self.filled:
            sums += self.hasher.intdigest().to_bytes(8, "little")
        return bytes(sums)


def _checksummed(source: TensorSource, length: int, chunk_size: int,
                 sink: Callable[[memoryview], Any] | None) -> bytes:
    """The chunk checksums of a tensor's bytes, each block handed to ``sink`` as it is
    hashed (None: hash only)."""
    hasher = _ChunkHasher(chunk_size)
    for block in source.blocks(IO_BLOCK):
        if sink is not None:
            sink(block)
        hasher.update(block)
    if hasher.length != length:
        raise ValueError(f"tensor {source.key!r} produced {hasher.length} bytes; expected {length}")
    return hasher.digest()


def dump(obj: Any, path: str | os.PathLike) -> None:
    """Save ``obj`` to ``path`` atomically: a nested dict (str or int keys) / list / tuple of
    str, bytes, int, float, bool, None, numpy arrays and numpy scalars (dtypes in
    ``DTYPE_NAMES``). An existing file at ``path`` is replaced only once the new one is
    complete and on disk. Unsupported values raise TypeError naming where they are."""
    encoder = Encoder()
    tree = encoder.encode(obj)
    write_file(path, tree, encoder.tensors)


# ---------------------------------------------------------------------------------------
# reading


class _Pairs(list):
    """A msgpack map as its list of (key, value) pairs, so duplicates can be rejected."""


@dataclass(frozen=True)
class TensorEntry:
    key: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute, from the start of the file
    length: int
    checksums: bytes


@dataclass(frozen=True)
class TensorRef:
    """Where the tree holds a tensor: its index in the table."""

    index: int


class FileReader:
    """An open checkpoint file whose header has been read and fully validated.

    ``tree`` is the decoded value with :class:`TensorRef` where tensors go; ``read_into``
    reads any byte range of a tensor, verifying every chunk it touches.
    """

    def __init__(self, path: str | os.PathLike):
        self._object: ObjectSource | None = None
        self._scratch: bytearray | None = None
        self.fd = -1
        if is_url(path):
            # an object in a store: ranged GETs instead of pread (checkpoints/storage.py)
            self.path = location(path)
            self._object = ObjectSource(self.path)
            self.size = self._object.size
            try:
                self._parse()
            except BaseException:
                self._object.close()
                raise
            return
        self.path = Path(path)
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer (it is refused below)
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as error:
            raise CheckpointError(f"cannot open checkpoint {self.path}: {error.strerror or error}") from error
        try:
            status = os.fstat(self.fd)
            if not stat.S_ISREG(status.st_mode):
                raise CheckpointError(f"cannot open checkpoint {self.path}: not a regular file")
            self.size = status.st_size
            self._parse()
        except OSError as error:
            os.close(self.fd)
            raise CheckpointError(f"cannot read checkpoint {self.path}: {error.strerror or error}") from error
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self._object is not None:
            self._object.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FileReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def corrupt(self, message: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self.path}: {message}")

    def pread(self, length: int, offset: int) -> bytes:
        if self._object is not None:
            data = self._object.pread(length, offset)
            if len(data) != length:
                raise self.corrupt(f"object ended at byte {offset + len(data)} while reading {length} bytes at {offset}")
            return data
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as error:
            raise CheckpointError(f"cannot read {self.path}: {error.strerror or error}") from error
        if len(data) != length:
            raise self.corrupt(f"file ended at byte {offset + len(data)} while reading {length} bytes at {offset}")
        return data

    def _preadinto(self, target: memoryview, offset: int) -> None:
        while len(target):
            if self._object is not None:
                got = self._object.readinto(target, offset)
                if got == 0:
                    raise self.corrupt(f"object ended at byte {offset} while reading tensor data")
                target = target[got:]
                offset += got
                continue
            try:
                got = os.preadv(self.fd, [target], offset)
            except OSError as error:
                raise CheckpointError(f"cannot read {self.path}: {error.strerror or error}") from error
            if got == 0:
                raise self.corrupt(f"file ended at byte {offset} while reading tensor data")
            target = target[got:]
            offset += got

    # -- header -----------------------------------------------------------------------------

    def _parse(self) -> None:
        if self.size < PREAMBLE.size:
            raise self.corrupt(
                f"file is {self.size} bytes, shorter than the {PREAMBLE.size}-byte preamble; "
                "not a checkpoint or truncated"
            )
        magic, version, header_length, header_sum = PREAMBLE.unpack(self.pread(PREAMBLE.size, 0))
        if magic != MAGIC:
            raise self.corrupt(f"bad magic {magic!r}; a checkpoint file starts with {MAGIC!r}")
        if version != VERSION:
            raise self.corrupt(f"unsupported format version {version}; this reader reads version {VERSION}")
        self.data_start = align(PREAMBLE.size + header_length)
        if self.data_start > self.size:
            raise self.corrupt(
                f"header of {header_length} bytes (padded to byte {self.data_start}) runs past the "
                f"end of the {self.size}-byte file; truncated or damaged"
            )
        block = self.pread(self.data_start - PREAMBLE.size, PREAMBLE.size)
        header = block[:header_length]
        if checksum(header) != header_sum:
            raise self.corrupt("header checksum mismatch; the header is damaged")
        if any(block[header_length:]):
            raise self.corrupt("nonzero byte in the padding after the header")
        self.header_checksum = header_sum
        try:
            raw = msgpack.unpackb(header, raw=False, strict_map_key=False, object_pairs_hook=_Pairs)
        except Exception as error:  # any malformation msgpack reports, of whatever type
            raise self.corrupt(f"header is not valid msgpack ({type(error).__name__}: {error})") from None
        fields = self._exact_map(raw, HEADER_FIELDS, "header")
        chunk_size = fields["chunk_size"]
        if (type(chunk_size) is not int or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE
                or chunk_size & (chunk_size - 1)):
            raise self.corrupt(
                f"chunk_size {_show(chunk_size)} must be a power of two in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]"
            )
        self.chunk_size = chunk_size
        self.entries = self._table(fields["tensors"])
        self._referenced = [False] * len(self.entries)
        self._by_key = {entry.key: i for i, entry in enumerate(self.entries)}
        self.tree = self._decode(fields["tree"], 0)
        for entry, seen in zip(self.entries, self._referenced):
            if not seen:
                raise self.corrupt(f"tensor {_show(entry.key)} is in the table but not in the value tree")

    def _exact_map(self, raw: Any, names: tuple[str, ...], what: str) -> dict[str, Any]:
        # messages show file values through _show: bounded, whatever the file holds
        if not isinstance(raw, _Pairs):
            raise self.corrupt(f"{what} must be a map; got {_kind(raw)}")
        found = {}
        for key, value in raw:
            if type(key) is not str or key not in names:
                raise self.corrupt(f"{what} has unknown field {_show(key)}; allowed: {', '.join(names)}")
            if key in found:
                raise self.corrupt(f"{what} has field {_show(key)} twice")
            found[key] = value
        missing = [name for name in names if name not in found]
        if missing:
            raise self.corrupt(f"{what} lacks field(s) {', '.join(missing)}")
        return found

    def _table(self, raw: Any) -> list[TensorEntry]:
        if type(raw) is not list:
            raise self.corrupt(f"tensor table must be an array; got {_kind(raw)}")
        entries = []
        keys = set()
        end = 0
        for index, item in enumerate(raw):
            fields = self._exact_map(item, TENSOR_FIELDS, f"tensor table entry {index}")
            key, name, shape = fields["key"], fields["dtype"], fields["shape"]
            offset, length, sums = fields["offset"], fields["length"], fields["checksums"]
            if type(key) is not str:
                raise self.corrupt(f"tensor table entry {index}: key must be a string; got {_kind(key)}")
            label = f"tensor {_show(key)}"
            if key in keys:
                raise self.corrupt(f"{label} appears twice in the tensor table")
            keys.add(key)
            if type(name) is not str or name not in DTYPES:
                raise self.corrupt(f"{label}: unknown dtype {_show(name)}; allowed: {ALLOWED_DTYPES}")
            dtype = DTYPES[name]
            if type(shape) is not list or len(shape) > MAX_NDIM or any(
                    type(d) is not int or not 0 <= d < (1 << 63) for d in shape):
                raise self.corrupt(f"{label}: shape {_show(shape)} must be a list of at most {MAX_NDIM} non-negative ints")
            count = 1
            for d in shape:
                count *= d
            nonzero = dtype.itemsize
            for d in shape:
                nonzero *= max(d, 1)
            if nonzero >= 1 << 63:
                # numpy refuses such a shape even when a zero dimension makes it empty
                raise self.corrupt(f"{label}: shape {shape} is too large for an array")
            if type(length) is not int or length != count * dtype.itemsize:
                raise self.corrupt(
                    f"{label}: length {_show(length)} disagrees with shape {shape} of {name} "
                    f"({count * dtype.itemsize} bytes)"
                )
            if type(offset) is not int or offset < 0 or offset % ALIGNMENT:
                raise self.corrupt(f"{label}: offset {_show(offset)} must be a non-negative multiple of {ALIGNMENT}")
            if offset < end:
                raise self.corrupt(f"{label}: offset {offset} overlaps the previous tensor, which ends at {end}")
            if offset != align(end):
                raise self.corrupt(
                    f"{label}: offset {offset} leaves a gap; the next tensor starts at {align(end)}"
                )
            if self.data_start + offset + length > self.size:
                raise self.corrupt(
                    f"{label}: bytes {self.data_start + offset}..{self.data_start + offset + length} run "
                    f"past the end of the {self.size}-byte file; truncated or damaged"
                )
            if type(sums) is not bytes or len(sums) != 8 * -(-length // self.chunk_size):
                raise self.corrupt(
                    f"{label}: checksum list of {len(sums) if type(sums) is bytes else _kind(sums)} bytes; "
                    f"expected {8 * -(-length // self.chunk_size)}"
                )
            entries.append(TensorEntry(key, dtype, tuple(shape), self.data_start + offset, length, sums))
            end = offset + length
        if self.data_start + end != self.size:
            raise self.corrupt(
                f"file is {self.size} bytes but its data ends at byte {self.data_start + end}; "
                "trailing bytes or truncation"
            )
        return entries

    def _decode(self, raw: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.corrupt(f"value tree nested deeper than {MAX_DEPTH} levels")
        kind = type(raw)
        if raw is None or kind in (bool, int, float, str, bytes):
            return raw
        if kind is list:
            return [self._decode(item, depth + 1) for item in raw]
        if kind is _Pairs:
            result = {}
            for key, value in raw:
                if type(key) is not str and type(key) is not int:
                    raise self.corrupt(f"map key {_show(key)} of type {_kind(key)}; keys must be strings or integers")
                if key in result:
                    raise self.corrupt(f"map key {_show(key)} appears twice")
                result[key] = self._decode(value, depth + 1)
            return result
        if kind is msgpack.ExtType:
            return self._decode_ext(raw.code, raw.data, depth)
        raise self.corrupt(f"value of unsupported msgpack type {_kind(raw)} in the tree")

    def _decode_ext(self, code: int, data: bytes, depth: int) -> Any:
        if code == EXT_TENSOR:
            try:
                key = data.decode()
            except UnicodeDecodeError:
                raise self.corrupt(f"tensor reference {_show(data)} is not UTF-8") from None
            index = self._by_key.get(key)
            if index is None:
                raise self.corrupt(f"the tree refers to tensor {_show(key)}, which the table lacks")
            if self._referenced[index]:
                raise self.corrupt(f"the tree refers to tensor {_show(key)} twice")
            self._referenced[index] = True
            return TensorRef(index)
        if code == EXT_BIGINT:
            if not data:
                raise self.corrupt("empty big-integer payload")
            return int.from_bytes(data, "little", signed=True)
        if code in (EXT_TUPLE, EXT_SCALAR):
            try:
                items = msgpack.unpackb(data, raw=False, strict_map_key=False, object_pairs_hook=_Pairs)
            except Exception as error:
                raise self.corrupt(f"extension {code} payload is not valid msgpack ({type(error).__name__})") from None
            if type(items) is not list:
                raise self.corrupt(f"extension {code} payload must be an array; got {_kind(items)}")
            if code == EXT_TUPLE:
                return tuple(self._decode(item, depth + 1) for item in items)
            if (len(items) != 2 or type(items[0]) is not str or items[0] not in DTYPES
                    or type(items[1]) is not bytes or len(items[1]) != DTYPES[items[0]].itemsize):
                raise self.corrupt(f"numpy scalar payload {_show(items)} must be [dtype name, its little-endian bytes]")
            if items[0] == "bool" and items[1] not in (b"\x00", b"\x01"):
                raise self.corrupt(f"bool scalar holds byte {_show(items[1])}; only 0 and 1 are allowed")
            return np.frombuffer(items[1], DTYPES[items[0]])[0]
        raise self.corrupt(f"unknown msgpack extension type {code}; the format defines 1 to 4")

    # -- tensor data ----------------------------------------------------------------------------

    def read_into(self, entry: TensorEntry, out: memoryview, start: int = 0, stop: int | None = None) -> None:
        """Bytes [start, stop) of a tensor into ``out`` (a byte view of that length); every
        chunk touched is read whole and verified, partial ones through a scratch buffer."""
        stop = entry.length if stop is None else stop
        size = self.chunk_size
        chunk = start // size
        while chunk * size < stop:
            c0 = chunk * size
            if c0 >= start and min(c0 + size, entry.length) <= stop:
                # a run of whole chunks that land in ``out``: read them there in one call
                run_end = min(c0 + size, entry.length)
                limit = IO_BLOCK if self._object is None else self._object.run_bytes
                while run_end < stop and run_end - c0 < limit and min(run_end + size, entry.length) <= stop:
                    run_end = min(run_end + size, entry.length)
                target = out[c0 - start:run_end - start]
                self._preadinto(target, entry.offset + c0)
                for at in range(0, len(target), size):
                    self._verify(entry, chunk, target[at:at + size])
                    chunk += 1
                continue
            c1 = min(c0 + size, entry.length)
            if self._scratch is None or len(self._scratch) < c1 - c0:
                self._scratch = bytearray(size)
            scratch = memoryview(self._scratch)[:c1 - c0]
            self._preadinto(scratch, entry.offset + c0)
            self._verify(entry, chunk, scratch)
            lo, hi = max(start, c0), min(stop, c1)
            out[lo - start:hi - start] = scratch[lo - c0:hi - c0]
            chunk += 1

    def _verify(self, entry: TensorEntry, chunk: int, data: memoryview) -> None:
        expected = int.from_bytes(entry.checksums[8 * chunk:8 * chunk + 8], "little")
        if checksum(data) != expected:
            first = chunk * self.chunk_size
            raise self.corrupt(
                f"checksum mismatch in tensor {_show(entry.key)}, bytes {first}..{first + len(data)}; "
                "the data is damaged"
            )

    def verify_all(self) -> None:
        """Every chunk of every tensor against its checksum (and bool tensors' bytes), read
        one chunk at a time into one reused buffer: memory stays at one ``chunk_size``
        whatever the file's size. Padding is :meth:`check_padding`'s."""
        if self._scratch is None or len(self._scratch) < self.chunk_size:
            self._scratch = bytearray(self.chunk_size)
        buffer = memoryview(self._scratch)
        for entry in self.entries:
            for chunk, start in enumerate(range(0, entry.length, self.chunk_size)):
                data = buffer[:min(self.chunk_size, entry.length - start)]
                self._preadinto(data, entry.offset + start)
                self._verify(entry, chunk, data)
                if entry.dtype.kind == "b" and np.frombuffer(data, np.uint8).max() > 1:
                    raise self.corrupt(f"bool tensor {_show(entry.key)} holds bytes other than 0 and 1")

    def check_padding(self) -> None:
        """The zero bytes between tensors (the header padding is checked when opening)."""
        gaps, end = [], self.data_start
        for entry in self.entries:
            if entry.offset > end:
                gaps.append((end, entry.offset, entry))
            end = entry.offset + entry.length
        if self._object is not None:
            # one request for them all (the client coalesces nearby ranges), not one per gap
            contents = self._object.read_ranges([(start, stop) for start, stop, _ in gaps])
        else:
            contents = (self.pread(stop - start, start) for start, stop, _ in gaps)
        for (start, stop, entry), data in zip(gaps, contents):
            if len(data) != stop - start:
                raise self.corrupt(f"file ended at byte {start + len(data)} while reading the padding")
            if any(data):
                raise self.corrupt(f"nonzero byte in the padding before tensor {_show(entry.key)}")

    def prefetch(self, entries: list[TensorEntry]) -> None:
        """Tensors about to be read whole, fetched in one request on object storage (their
        chunks, as read_into reads them); nothing on a local file."""
        if self._object is None:
            return
        ranges = []
        for entry in entries:
            for start in range(0, entry.length, self.chunk_size):
                ranges.append((entry.offset + start, entry.offset + min(start + self.chunk_size, entry.length)))
        self._object.prefetch(ranges)

    def read_array(self, entry: TensorEntry) -> np.ndarray:
        try:
            array = np.empty(entry.shape, entry.dtype)
        except MemoryError:
            raise CheckpointError(
                f"{self.path}: not enough memory for tensor {_show(entry.key)} ({entry.length} bytes); "
                "load(..., mmap=True) maps it instead"
            ) from None
        self.read_into(entry, memoryview(array.reshape(-1).view(np.uint8)))
        self.check_bool(entry, array)
        return array

    def check_bool(self, entry: TensorEntry, array: np.ndarray) -> None:
        if entry.dtype.kind == "b" and array.size and array.view(np.uint8).max() > 1:
            raise self.corrupt(f"bool tensor {_show(entry.key)} holds bytes other than 0 and 1")

    def mapped_arrays(self) -> list[np.ndarray]:
        """Read-only arrays that alias the file through one shared mapping, verified."""
        if self._object is not None:
            raise CheckpointError(f"cannot map {self.path}: an object in a store is not a file; load it without mmap")
        flags = _mmap.MAP_SHARED | getattr(_mmap, "MAP_POPULATE", 0)
        try:
            mapping = _mmap.mmap(self.fd, self.size, flags=flags, prot=_mmap.PROT_READ)
        except OSError as error:
            raise CheckpointError(f"cannot map {self.path}: {error.strerror or error}") from error
        view = memoryview(mapping)
        arrays = []
        for entry in self.entries:
            data = view[entry.offset:entry.offset + entry.length]
            for chunk, at in enumerate(range(0, entry.length, self.chunk_size)):
                self._verify(entry, chunk, data[at:at + self.chunk_size])
            count = entry.length // entry.dtype.itemsize
            array = np.frombuffer(mapping, entry.dtype, count, entry.offset).reshape(entry.shape)
            self.check_bool(entry, array)
            arrays.append(array)
        view.release()
        return arrays


_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 80
_SHOW.maxlevel = 3


def _show(value: Any) -> str:
    """A short repr of a value read from a file (bounded in length and depth)."""
    return _SHOW.repr(value)


def _kind(value: Any) -> str:
    if type(value) is _Pairs:
        return "map"
    if type(value) is msgpack.ExtType:
        return f"extension type {value.code}"
    return type(value).__name__


def fill(tree: Any, arrays: list[np.ndarray]) -> Any:
    """The decoded tree with each TensorRef replaced by its array."""
    if type(tree) is TensorRef:
        return arrays[tree.index]
    if type(tree) is dict:
        return {key: fill(value, arrays) for key, value in tree.items()}
    if type(tree) is list:
        return [fill(value, arrays) for value in tree]
    if type(tree) is tuple:
        return tuple(fill(value, arrays) for value in tree)
    return tree


def load(path: str | os.PathLike, *, mmap: bool = False) -> Any:
    """Load a value saved by :func:`dump`, verifying every checksum.

    Arrays are read straight into freshly allocated, writable arrays (no intermediate
    buffer). With ``mmap=True`` they are read-only views of one shared mapping of the file
    instead (no copy at all; the file must not be truncated while they live). Anything
    damaged raises :class:`CorruptCheckpointError` naming the file and the problem.
    """
    if type(mmap) is not bool:
        raise TypeError(f"mmap must be True or False; got {mmap!r}")
    with FileReader(path) as reader:
        reader.check_padding()
        if mmap:
            arrays = reader.mapped_arrays()
        else:
            arrays = [reader.read_array(entry) for entry in reader.entries]
        return fill(reader.tree, arrays)
