"""Run directories on object storage: a URL (``s3://bucket/prefix/run``, ``gs://...``,
``az://...``) names a key prefix that checkpoints are written under and read from.

The layer is `obstore <https://developmentseed.org/obstore/>`_ (the Rust ``object_store``
crate): it is the one of the candidates that gives conditional writes (create-only and
compare-and-swap by ETag), which the atomic commit and the writer's lease need, next to
ranged GETs and streamed multipart uploads (docs/checkpoints.md, "Object storage"). It is an
optional extra (``pip install 'shardstep[objectstore]'``), imported only when a URL is used.

Credentials and endpoint come from the environment as for every AWS/GCS/Azure client
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION``,
``AWS_ENDPOINT_URL`` for an S3-compatible server, ``AWS_ALLOW_HTTP=true`` for one without
TLS; instance, container and web-identity credentials are found the same way), and for S3
from the AWS profile files where the environment does not set them (:func:`aws_profile`).
Nothing here ever writes them anywhere.

:class:`ObjectPath` joins like a :class:`pathlib.Path`, so the readers in ``run.py`` handle
both; :class:`ObjectSource` is what a :class:`~shardstep.checkpoints.format.FileReader` reads
through for an object (ranged GETs, with a read-ahead window so small sequential reads do not
cost one request each); :func:`put_object` streams a file's bytes as one PUT or a multipart
upload, optionally create-only.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from shardstep.checkpoints.errors import CheckpointError

# the schemes obstore serves from a URL; memory:// is per process, so no run can use it
SCHEMES = ("s3", "s3a", "gs", "az", "abfs", "abfss", "azure")
URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)")
# bytes fetched by one GET when small reads run sequentially (a header, a checksum chunk at a
# time): one request serves them all
READ_AHEAD = 8 << 20
FIRST_READ_AHEAD = 64 << 10
# a large read is split into ranges of READ_PART fetched READ_CONCURRENCY at a time (one GET
# per range, as S3's own clients do: one stream is far below what a bucket serves); a reader
# asks for up to READ_RUN bytes at once, so that many ranges are in flight
READ_PART = 8 << 20
READ_CONCURRENCY = 4
READ_RUN = READ_PART * READ_CONCURRENCY * 2
# part size of multipart uploads (S3 wants at least 5 MiB for every part but the last, and at
# most 10,000 parts: 78 GiB per shard file) and parts in flight at once; an upload holds at
# most about (PART_CONCURRENCY + 1) * PART_SIZE of its data in memory
PART_SIZE = 8 << 20
PART_CONCURRENCY = 4
# a failing store is retried for at most this long per request, then the error is ours:
# long enough to ride out a server restart, short enough that a run fails in seconds
RETRY = {"max_retries": 4, "retry_timeout": timedelta(seconds=20),
         "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=4), "base": 2}}
# no client options are passed: that would replace those the environment gives (AWS_ALLOW_HTTP,
# AWS_PROXY_URL, ...); object_store's defaults are a 5 s connect and a 30 s request timeout


def is_url(location: Any) -> bool:
    """Whether ``location`` (a str, Path or ObjectPath) names object storage."""
    return isinstance(location, ObjectPath) or (isinstance(location, str) and URL.match(location) is not None)


def location(root: Any) -> Any:
    """``root`` as an :class:`ObjectPath` when it is a URL, else as a local ``Path``."""
    from pathlib import Path

    if isinstance(root, ObjectPath):
        return root
    if isinstance(root, str) and URL.match(root):
        return ObjectPath(root)
    return Path(root)


class ObjectPath:
    """A key prefix in an object store, named by its URL; ``/``, ``name``, ``parent`` and
    ``with_name`` work as on a ``PurePosixPath``."""

    __slots__ = ("scheme", "bucket", "key")

    def __init__(self, url: str, *, _parts: tuple[str, str, str] | None = None):
        if _parts is not None:
            self.scheme, self.bucket, self.key = _parts
            return
        match = URL.fullmatch(url)
        if match is None:
            raise ValueError(f"{url!r} is not a URL")
        scheme, rest = match.group(1).lower(), match.group(2)
        if scheme not in SCHEMES:
            raise CheckpointError(
                f"{url}: the {scheme}:// scheme is not an object store shardstep writes to; "
                f"allowed: {', '.join(s + '://' for s in SCHEMES)}, or a local path")
        bucket, _, key = rest.partition("/")
        parts = [part for part in key.split("/") if part]
        if not bucket or any(part in (".", "..") for part in parts):
            raise CheckpointError(f"{url}: expected {scheme}://BUCKET/PREFIX with no '.' or '..' in the prefix")
        self.scheme, self.bucket, self.key = scheme, bucket, "/".join(parts)

    def __truediv__(self, name: str) -> ObjectPath:
        name = str(name).strip("/")
        key = f"{self.key}/{name}" if self.key else name
        return ObjectPath("", _parts=(self.scheme, self.bucket, key))

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath("", _parts=(self.scheme, self.bucket, self.key.rpartition("/")[0]))

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __reduce__(self):
        return ObjectPath, (str(self),)

    # -- what run.py asks of a path ---------------------------------------------------------

    @property
    def store(self) -> Any:
        return _store(self.scheme, self.bucket)

    def size(self) -> int | None:
        """The object's size, or None when there is no object at this key."""
        obstore = _obstore()
        try:
            return int(obstore.head(self.store, self.key)["size"])
        except FileNotFoundError:
            return None
        except Exception as error:
            raise _error(f"cannot look up {self}", error) from error

    def is_file(self) -> bool:
        return self.size() is not None

    exists = is_file  # a prefix "exists" only as the objects under it: callers ask of objects

    def is_dir(self) -> bool:
        """Whether any object lies below this prefix."""
        prefixes, objects = self.children()
        return bool(prefixes or objects)

    def children(self) -> tuple[list[str], dict[str, int]]:
        """The names one level below this prefix: ``(prefixes, {object name: size})``."""
        obstore = _obstore()
        try:
            listing = obstore.list_with_delimiter(self.store, prefix=self.key or None)
        except Exception as error:
            raise _error(f"cannot list {self}", error) from error
        skip = len(self.key) + 1 if self.key else 0
        prefixes = [prefix[skip:].rstrip("/") for prefix in listing["common_prefixes"]]
        objects = {meta["path"][skip:]: int(meta["size"]) for meta in listing["objects"]}
        return prefixes, objects

    def walk(self) -> dict[str, int]:
        """Every object below this prefix: ``{key relative to it: size}``."""
        obstore = _obstore()
        skip = len(self.key) + 1 if self.key else 0
        found: dict[str, int] = {}
        try:
            for batch in obstore.list(self.store, prefix=f"{self.key}/" if self.key else None):
                for meta in batch:
                    found[meta["path"][skip:]] = int(meta["size"])
        except Exception as error:
            raise _error(f"cannot list {self}", error) from error
        return found

    def read_bytes(self) -> bytes:
        obstore = _obstore()
        try:
            return bytes(obstore.get(self.store, self.key).bytes())
        except FileNotFoundError:
            raise
        except Exception as error:
            raise _error(f"cannot read {self}", error) from error

    def delete(self, names: Iterable[str] = ("",)) -> None:
        """Delete this object, or the objects ``self / name`` for each name; absent ones are
        not an error (deleting is idempotent on every object store)."""
        obstore = _obstore()
        keys = [(self / name).key if name else self.key for name in names]
        try:
            for start in range(0, len(keys), 1000):
                obstore.delete(self.store, keys[start:start + 1000])
        except FileNotFoundError:
            pass
        except Exception as error:
            raise _error(f"cannot delete under {self}", error) from error


# ---------------------------------------------------------------------------------------
# the client


_STORES: dict[tuple[str, str, int], Any] = {}
_STORES_LOCK = threading.Lock()


def _obstore() -> Any:
    try:
        import obstore
    except ImportError:
        raise CheckpointError(
            "run directories on object storage need obstore: pip install 'shardstep[objectstore]'") from None
    return obstore


def _store(scheme: str, bucket: str) -> Any:
    """One client per bucket and process (clients hold connection pools; a forked child
    must not share its parent's)."""
    key = (scheme, bucket, os.getpid())
    with _STORES_LOCK:
        store = _STORES.get(key)
        if store is None:
            _obstore()
            from obstore.store import from_url

            config = aws_profile() if scheme in ("s3", "s3a") else {}
            try:
                store = from_url(f"{scheme}://{bucket}", retry_config=RETRY, **({"config": config} if config else {}))
            except Exception as error:
                raise _error(f"cannot configure a client for {scheme}://{bucket}", error) from error
            _STORES[key] = store
    return store


_READ_POOL: Any = None


def _read_pool() -> Any:
    """The threads that run a large read's GETs (the client releases the GIL while it waits)."""
    global _READ_POOL
    with _STORES_LOCK:
        if _READ_POOL is None or _READ_POOL[0] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor

            _READ_POOL = (os.getpid(), ThreadPoolExecutor(READ_CONCURRENCY, thread_name_prefix="object-read"))
    return _READ_POOL[1]


# what the AWS config files may give, as obstore names it, unless the environment gives it
_CREDENTIAL_KEYS = {"aws_access_key_id": "access_key_id", "aws_secret_access_key": "secret_access_key",
                    "aws_session_token": "session_token"}
_CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def aws_profile() -> dict[str, str]:
    """The S3 settings of the AWS profile (``AWS_PROFILE``, else ``default``) from the shared
    files every AWS tool reads (``~/.aws/credentials``, ``~/.aws/config``, or where
    ``AWS_SHARED_CREDENTIALS_FILE`` / ``AWS_CONFIG_FILE`` point): keys, region and
    ``endpoint_url``, each only where the environment does not set it (the environment wins,
    as in the AWS CLI). A named profile that neither file has is an error."""
    import configparser

    name = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
    profile = name or "default"
    sections = []
    for variable, default, section in (
            ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials", profile),
            ("AWS_CONFIG_FILE", "~/.aws/config", profile if profile == "default" else f"profile {profile}")):
        path = os.path.expanduser(os.environ.get(variable) or default)
        parser = configparser.RawConfigParser()
        try:
            parser.read(path, encoding="utf-8")
        except (configparser.Error, UnicodeDecodeError) as error:
            raise CheckpointError(f"cannot read the AWS file {path}: {type(error).__name__}: {error}") from None
        if parser.has_section(section):
            sections.append(dict(parser.items(section)))
    if name and not sections:
        raise CheckpointError(f"AWS_PROFILE={name}: no such profile in the AWS credentials or config file")
    found: dict[str, str] = {}
    for values in sections:  # the credentials file first: it wins, as for the AWS CLI
        for key, value in values.items():
            found.setdefault(key, value.strip())
    config = {}
    if not any(os.environ.get(variable) for variable in _CREDENTIAL_ENV):
        config.update({ours: found[key] for key, ours in _CREDENTIAL_KEYS.items() if found.get(key)})
    if found.get("region") and not (os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")):
        config["region"] = found["region"]
    if found.get("endpoint_url") and not (os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")):
        config["endpoint"] = found["endpoint_url"]
    return config


def _error(what: str, error: BaseException) -> CheckpointError:
    """An obstore error as ours: its first line only (the rest is the client's debug dump,
    which may quote request headers)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckpointError(f"{what}: {type(error).__name__}: {text}")


def exceptions() -> Any:
    return _obstore().exceptions


# ---------------------------------------------------------------------------------------
# reading and writing objects


class ObjectSource:
    """Ranged reads of one object, for a FileReader: ``size``, ``pread``, ``readinto``.

    Read-ahead only where reads are small and sequential (the header, ``verify_all``'s chunk
    at a time): then one GET fetches up to :data:`READ_AHEAD` bytes, and the window is dropped once
    read to its end, so an open reader holds no buffer between scans. Any other read fetches
    exactly its range.
    """

    def __init__(self, path: ObjectPath):
        self.path = path
        size = path.size()
        if size is None:
            raise ObjectMissingError(f"cannot open checkpoint {path}: no such object")
        self.size = size
        self._prefetched: dict[tuple[int, int], bytes] = {}
        self._window: memoryview | None = None
        self._window_start = 0
        self._last_end = 0  # where the previous read ended: a read from there is sequential
        self._ahead = FIRST_READ_AHEAD

    def _get(self, start: int, stop: int) -> memoryview:
        obstore = _obstore()
        try:
            return memoryview(obstore.get_range(self.path.store, self.path.key, start=start, end=stop))
        except Exception as error:
            raise _error(f"cannot read {self.path}", error) from error

    run_bytes = READ_RUN

    def _get_parallel(self, target: memoryview, offset: int) -> None:
        """``target`` filled from ``offset`` by ranged GETs of READ_PART, several in flight."""
        parts = [(start, min(start + READ_PART, len(target))) for start in range(0, len(target), READ_PART)]

        def fetch(part: tuple[int, int]) -> None:
            start, stop = part
            target[start:stop] = self._get(offset + start, offset + stop)

        for done in _read_pool().map(fetch, parts):
            del done  # map re-raises the first failure here

    def readinto(self, target: memoryview, offset: int) -> int:
        """Fill ``target`` from ``offset`` on; returns the bytes read (fewer only at the end)."""
        length = min(len(target), max(0, self.size - offset))
        if length == 0:
            return 0
        end = offset + length
        fetched = self._prefetched.pop((offset, end), None)
        if fetched is not None:
            target[:length] = fetched
            self._last_end = end
            return length
        window = self._window
        if window is not None and self._window_start <= offset and end <= self._window_start + len(window):
            at = offset - self._window_start
            target[:length] = window[at:at + length]
            if end == self._window_start + len(window):
                self._window = None
        elif length > READ_PART:
            self._get_parallel(target[:length], offset)
            self._ahead = FIRST_READ_AHEAD
        elif length < READ_AHEAD and offset == self._last_end:
            # as the kernel's read-ahead: small at first, growing while reads stay sequential
            fetched = self._get(offset, min(self.size, offset + max(length, self._ahead)))
            self._ahead = min(READ_AHEAD, self._ahead * 4)
            target[:length] = fetched[:length]
            self._window, self._window_start = (fetched, offset) if len(fetched) > length else (None, 0)
        else:
            target[:length] = self._get(offset, end)
            self._ahead = FIRST_READ_AHEAD
        self._last_end = end
        return length

    def read_ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``(start, stop)`` range (clipped to the object's end), fetched
        together: the client merges nearby ranges into few requests."""
        if not ranges:
            return []
        obstore = _obstore()
        clipped = [(min(start, self.size), min(stop, self.size)) for start, stop in ranges]
        try:
            found = obstore.get_ranges(self.path.store, self.path.key, starts=[a for a, _ in clipped],
                                       ends=[b for _, b in clipped])
        except Exception as error:
            raise _error(f"cannot read {self.path}", error) from error
        return [bytes(data) for data in found]

    def prefetch(self, ranges: list[tuple[int, int]]) -> None:
        """Fetch these ranges together now; a later read of exactly one of them is served from
        here (once). For the many small reads a header check makes."""
        for key, data in zip(ranges, self.read_ranges(ranges)):
            if len(data) == key[1] - key[0]:
                self._prefetched[key] = data

    def pread(self, length: int, offset: int) -> bytes:
        buffer = bytearray(length)
        got = self.readinto(memoryview(buffer), offset)
        return bytes(buffer[:got])

    def close(self) -> None:
        self._window = None
        self._prefetched.clear()


def put_object(path: ObjectPath, chunks: Iterable[Any], *, create: bool = False,
               if_match: str | None = None) -> str | None:
    """Upload ``chunks`` (bytes-like blocks, streamed: a multipart upload once they pass one
    part) as the object at ``path``. ``create``: only if no object is there yet (an
    ``If-None-Match: *`` PUT); a taken key raises :class:`ObjectExistsError`. An object is
    visible whole or not at all, so no temporary name is needed. ``if_match``: only if the
    object there still has this ETag (compare-and-swap; a changed one raises
    :class:`ObjectChangedError`). Returns the new object's ETag when the store gives one."""
    obstore = _obstore()
    try:
        if if_match is not None:
            result = obstore.put(path.store, path.key, b"".join(bytes(chunk) for chunk in chunks),
                                 mode={"e_tag": if_match}, use_multipart=False)
        elif create:
            # a conditional PUT is one request (S3 has no create-only multipart upload here):
            # used for manifests and leases, which are small
            result = obstore.put(path.store, path.key, b"".join(bytes(chunk) for chunk in chunks), mode="create",
                                 use_multipart=False)
        else:
            # written from this thread (the chunks may come from reads of other objects, which
            # must not run inside the client's own event loop); an error or a kill before the
            # end leaves no object: the multipart upload is aborted or never completed
            # the writer keeps the buffers it is given until their part is uploaded, and
            # callers reuse theirs (a streamed export fills one block over and over): each
            # chunk goes in as a copy of its own
            with obstore.open_writer(path.store, path.key, buffer_size=PART_SIZE,
                                     max_concurrency=PART_CONCURRENCY) as writer:
                for chunk in chunks:
                    writer.write(bytes(chunk))
            return None
    except obstore.exceptions.AlreadyExistsError:
        raise ObjectExistsError(f"{path} already exists") from None
    except obstore.exceptions.PreconditionError:
        if if_match is not None:
            raise ObjectChangedError(f"{path} was changed by someone else") from None
        raise ObjectExistsError(f"{path} already exists") from None
    except CheckpointError:
        raise
    except Exception as error:
        raise _error(f"cannot write {path}", error) from error
    return result.get("e_tag") if isinstance(result, dict) else None


def get_object(path: ObjectPath) -> tuple[bytes, str | None] | None:
    """An object's bytes and ETag, or None when there is none."""
    obstore = _obstore()
    try:
        result = obstore.get(path.store, path.key)
        return bytes(result.bytes()), result.meta.get("e_tag")
    except FileNotFoundError:
        return None
    except Exception as error:
        raise _error(f"cannot read {path}", error) from error


def copy_object(source: ObjectPath, target: ObjectPath) -> None:
    obstore = _obstore()
    try:
        obstore.copy(source.store, source.key, target.key)
    except Exception as error:
        raise _error(f"cannot copy {source} to {target}", error) from error


class ObjectMissingError(CheckpointError):
    """There is no object where a checkpoint file should be."""


class ObjectExistsError(CheckpointError):
    """A create-only write found the key taken."""


class ObjectChangedError(CheckpointError):
    """A compare-and-swap write found the object changed."""
