"""Where shards live: a folder on local disk or a prefix in an S3-compatible bucket, through fsspec.

    store = open_store("data/shards")          # or "file:///data/shards", or "s3://bucket/shards"
    store.entries()                             # {name: size} of what is directly inside ({} if nothing)
    store.write_bytes("shard-000000.tar", data) # atomic: readers see the old object or the new one
    with store.open("shard-000000.tar") as f: ...

Every operation goes through one fsspec filesystem whatever the location, except two that
differ by nature: an atomic write is a temporary file, fsync and rename on a disk, and a single
PUT in a bucket (an object appears whole or not at all); and a local file is opened only if it
is a regular file (`files.open_regular`: a FIFO never blocks a reader). Listings are never
cached: several processes write the same prefix.

Credentials and endpoint come from the usual places of botocore and fsspec: ``AWS_ACCESS_KEY_ID``
/ ``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE``, ``~/.aws``), ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) for a server other than AWS, or fsspec's ``FSSPEC_S3_ENDPOINT_URL`` and
config files (docs/scale.md). `s3fs` is needed for ``s3://`` (the ``scale`` extra).
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import QualiclipError
from .files import open_regular

CHUNK = 1 << 20  # read size for hashing and copying


class StoreError(QualiclipError, OSError):
    """A location that cannot be used (no s3fs, no bucket, no credentials); the message names the fix."""


@dataclass(frozen=True)
class Store:
    """A flat folder of named files: ``root`` inside the filesystem ``fs``; ``url`` as the user gave it."""

    fs: fsspec.AbstractFileSystem
    root: str
    url: str

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, name: str) -> str:
        """``name``'s path inside ``fs`` (a local path on disk)."""
        return f"{self.root}/{name}"

    @property
    def location(self) -> str:
        """The folder as every process names it: an absolute path on disk, ``s3://bucket/prefix`` in a bucket."""
        return self.root if self.local else self.fs.unstrip_protocol(self.root)

    def url_of(self, name: str) -> str:
        """``name``'s location, as `open_file` and `open_store` accept it."""
        return f"{self.location}/{name}"

    def entries(self) -> dict[str, int | None]:
        """Size of each file directly inside (None: a sub-folder); {} when the folder does not exist."""
        try:
            listing = self.fs.ls(self.root, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except Exception as exc:  # noqa: BLE001 - credentials, endpoint, permissions: one line naming the fix
            raise self._unreachable(exc) from None
        if any(e["name"].rstrip("/") == self.root for e in listing):  # fsspec lists a file as itself
            raise StoreError(f"{self.url} is a file, not a folder — choose another location")
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: (e["size"] if e["type"] == "file" else None) for e in listing}

    def mkdir(self) -> None:
        """Make the folder (locally); check the bucket exists (a prefix needs no making)."""
        if self.local:
            os.makedirs(self.root, exist_ok=True)
            return
        bucket = self.root.split("/", 1)[0]
        try:
            exists = self.fs.exists(bucket)
        except Exception as exc:  # noqa: BLE001
            raise self._unreachable(exc) from None
        if not exists:
            raise StoreError(
                f"bucket '{bucket}' of {self.url} does not exist — create it first: "
                f"{make_bucket_command(bucket)} (s3fs, with these credentials and endpoint), "
                "or fix the location"
            )

    def open(self, name: str) -> BinaryIO:
        """``name`` opened for binary reading (`FileNotFoundError` when absent)."""
        path = self.path(name)
        if not self.local:
            try:
                return self.fs.open(path, "rb")
            except FileNotFoundError:
                raise
            except Exception as exc:  # noqa: BLE001 - credentials, endpoint: one line naming the fix
                raise self._unreachable(exc) from None
        if not os.path.lexists(path):  # open_regular reports it as unreadable; callers tell "absent" apart
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        return open_regular(path)

    def read_bytes(self, name: str) -> bytes:
        with self.open(name) as f:
            return f.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically. On disk the temporary name carries the pid: a shard job orphaned
        by a killed run may still write the same file while a rerun writes it."""
        if not self.local:
            self.fs.pipe_file(self.path(name), data)  # one PUT (multipart above 50 MB): whole or absent
            return
        tmp = self.path(f"{name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(name))

    def delete(self, names: list[str]) -> None:
        """Remove files; absent ones are ignored. A bucket deletes up to 1000 per request."""
        paths = [self.path(n) for n in names]
        if not paths:
            return
        if self.local:
            for p in paths:
                try:
                    os.unlink(p)
                except FileNotFoundError:
                    pass
        else:
            self.fs.rm(paths)

    def sha256(self, name: str) -> tuple[int, str]:
        """(size, sha256) of ``name``'s bytes, read once."""
        with self.open(name) as f:
            return hash_stream(f)

    def _unreachable(self, exc: Exception) -> StoreError:
        hint = (
            (
                " — set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and, for a server other "
                "than AWS, AWS_ENDPOINT_URL (docs/scale.md)"
            )
            if not self.local
            else ""
        )
        return StoreError(f"cannot reach {self.url} ({type(exc).__name__}: {exc}){hint}")


def hash_stream(f: BinaryIO, sink: Callable[[bytes], object] | None = None) -> tuple[int, str]:
    """(size, sha256) of what ``f`` holds from its position on, each chunk also handed to ``sink``."""
    h, size = hashlib.sha256(), 0
    for chunk in iter(lambda: f.read(CHUNK), b""):
        h.update(chunk)
        size += len(chunk)
        if sink is not None:
            sink(chunk)
    return size, h.hexdigest()


def make_bucket_command(bucket: str) -> str:
    """A shell command that creates ``bucket`` with what the project installs (the AWS CLI is no
    dependency): s3fs, reading the credentials and endpoint as every `Store` does."""
    return f"python -c \"import s3fs; s3fs.S3FileSystem().mkdir('{bucket}')\""


def open_store(location: str | os.PathLike) -> Store:
    """The `Store` of a folder path, a ``file://`` URL or an ``s3://bucket/prefix`` URL; no I/O yet."""
    url = os.fspath(location)
    try:
        # no listings cache: other processes (shard workers, a rerun) change the folder under us
        fs, root = fsspec.core.url_to_fs(url, use_listings_cache=False)
    except ImportError as exc:
        raise StoreError(f"{url}: {exc} — install the scale extra: pip install 'qualiclip[scale]'") from None
    return Store(fs, root.rstrip("/") or "/", url)


def split_location(location: str | os.PathLike) -> tuple[Store, str]:
    """``.../folder/name`` -> (the folder's `Store`, ``name``)."""
    folder, _, name = os.fspath(location).rstrip("/").rpartition("/")
    return open_store(folder or "."), name


def open_file(location: str | os.PathLike) -> BinaryIO:
    """The file at a path or URL (`Store.url_of`), opened for binary reading."""
    store, name = split_location(location)
    return store.open(name)
