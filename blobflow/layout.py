"""OCI image layout: ``oci-layout``, ``index.json``, ``blobs/<alg>/<hex>``.

Writes are atomic: a blob is written under a temporary name, fsynced, verified and renamed;
``index.json`` is replaced last, so a layout only ever references complete, verified blobs.
Processes writing one layout at once (parallel pulls of several tags) take turns at
``index.json`` under a lock on the layout directory, so no tag replaces another's.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import BadInputError, DigestMismatchError, LayoutError, ManifestError, unreadable
from .types import INDEX_TYPES, MEDIA_OCI_INDEX, Descriptor, Digest

__all__ = ["REF_NAME", "BlobWriter", "Layout", "atomic_write", "name_os_errors"]

REF_NAME = "org.opencontainers.image.ref.name"
_LAYOUT_FILE = {"imageLayoutVersion": "1.0.0"}


def _load_sync_file_range() -> Callable[[int, int, int], None]:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE): start write-back without waiting for it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux: the fsync at commit does all the work
        return lambda fd, offset, length: None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return lambda fd, offset, length: fn(fd, offset, length, 2) and None


_start_writeback = _load_sync_file_range()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on ``directory`` itself (``flock`` on its descriptor), held by one
    process at a time; no lock file is left in the layout."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def name_os_errors(path: Path) -> Iterator[None]:
    """Give an OSError of a call on a descriptor (``pwrite``, ``fsync``: no file name of its own)
    the file it was about, so "No space left on device" says where."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def writable_file(path: Path, name: str | None = None) -> Path:
    """``path`` as the place of a file a command writes at its end (a blob, a report): bad input,
    found before any transfer, when it is a directory or its directory is missing or cannot take
    files. Found at the end, a run was lost, or a verified blob left in a ``.partial`` file.
    ``name`` is how the user gave it (a flag and the path)."""
    name = name or str(path)
    if path.is_dir():
        raise BadInputError(f"{name}: is a directory; give a file name")
    parent = path.parent
    if not parent.is_dir():
        raise BadInputError(f"{name}: {parent} {'is not a directory' if parent.exists() else 'does not exist'}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInputError(f"{name}: cannot write in {parent}")
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` whole or keeps what it held: temporary file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class BlobWriter:
    """A blob being written at offsets into a temporary file; :meth:`commit` makes it visible."""

    def __init__(self, final: Path, digest: Digest, size: int, *, resumable: bool = False,
                 durable: bool = True) -> None:
        """With ``resumable``, the temporary file has a fixed name (``.<name>.partial``) that a later
        run finds again; ``reused`` says whether it already held ``size`` bytes. A second writer of
        the same blob at the same time (the file is locked) gets a private name instead. Not
        ``durable`` (a spool the job deletes after reading it back): no write-back started, no
        fsync, so its bytes can stay in the page cache."""
        self.final = final
        self.durable = durable
        self.digest = digest
        self.size = size
        self.committed = False
        self.reused = False
        self.resumable = False
        self.fd = -1
        if resumable:
            self.temp = final.with_name(f".{final.name}.partial")
            fd = os.open(self.temp, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
            else:
                self.fd, self.resumable = fd, True
                self.reused = os.fstat(fd).st_size == size and size > 0
        if self.fd < 0:
            self.temp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.partial")
            self.fd = os.open(self.temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        if not self.reused:
            with name_os_errors(self.temp):
                os.ftruncate(self.fd, 0)
                if size:
                    os.ftruncate(self.fd, size)

    def write_at(self, offset: int, data: bytes) -> None:
        """Blocking write; call from a worker thread for large buffers.

        Write-back of the range starts right away (``sync_file_range``), so the fsync at commit
        finds little left to do instead of stalling on the whole blob.
        """
        start = offset
        view = memoryview(data)
        with name_os_errors(self.temp):
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
            if self.durable:
                _start_writeback(self.fd, start, len(data))

    def read_at(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def commit(self, verified: Digest) -> None:
        """fsync and rename; ``verified`` is the digest computed over the bytes written."""
        if verified != self.digest:
            self.abort()
            raise DigestMismatchError(f"blob {self.digest.short}: received bytes have digest {verified.short}")
        if self.durable:
            with name_os_errors(self.temp):
                os.fsync(self.fd)
        os.replace(self.temp, self.final)
        os.close(self.fd)
        self.fd = -1
        self.committed = True

    def abort(self, *, keep: bool = False) -> None:
        """Close; remove the temporary file unless ``keep`` (a resumable one a journal describes)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if not self.committed and not (keep and self.resumable):
            self.temp.unlink(missing_ok=True)


class Layout:
    """An OCI image layout directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def open(cls, root: Path | str) -> Layout:
        root = Path(root)
        try:
            marker = json.loads((root / "oci-layout").read_text())
        except FileNotFoundError:
            what = "no oci-layout file" if root.is_dir() else "no such directory"
            raise LayoutError(f"{root} is not an OCI image layout ({what})") from None
        except NotADirectoryError:  # `docker save` and oci-archive output are tar files
            raise LayoutError(f"{root} is a file, not an OCI image layout directory; if it is an oci-archive "
                              f"tar, extract it first: mkdir DIR && tar -xf {root} -C DIR") from None
        except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
            raise LayoutError(f"{root}/oci-layout {unreadable(e)}") from None
        if not isinstance(marker, dict) or "imageLayoutVersion" not in marker:
            raise LayoutError(f"{root}/oci-layout has no imageLayoutVersion")
        layout = cls(root)
        layout.index()
        return layout

    @classmethod
    def create(cls, root: Path | str) -> Layout:
        """Open a layout, creating an empty one when ``root`` does not hold one yet."""
        root = Path(root)
        if (root / "oci-layout").exists():
            return cls.open(root)
        if root.exists() and not root.is_dir():
            raise LayoutError(f"{root} exists and is not a directory")
        try:
            (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
            with _locked(root):  # another process may be creating it, or already tagging in it
                if not (root / "index.json").exists():
                    atomic_write(root / "index.json", _index_bytes([]))
                if not (root / "oci-layout").exists():  # last: its presence means a whole layout
                    atomic_write(root / "oci-layout", json.dumps(_LAYOUT_FILE).encode())
        except OSError as e:  # a parent that is a file, a read-only or full filesystem
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # not bad input: make room and run it again
                raise OSError(e.errno, e.strerror, e.filename or str(root)) from None
            raise LayoutError(f"cannot create an OCI image layout at {root}: {e.strerror or e}") from None
        return cls(root)

    # -- reading ---------------------------------------------------------------------------
    def index(self) -> dict[str, Any]:
        path = self.root / "index.json"
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise LayoutError(f"{self.root} is not an OCI image layout (no index.json)") from None
        except (OSError, ValueError) as e:
            raise LayoutError(f"{path} {unreadable(e)}") from None
        if not isinstance(data, dict) or not isinstance(data.get("manifests", []), list):
            raise LayoutError(f"{path} is not an OCI index")
        return data

    def images(self) -> list[Descriptor]:
        try:
            return [Descriptor.from_json(m) for m in self.index().get("manifests", [])]
        except ManifestError as e:
            raise LayoutError(f"{self.root}/index.json: {e}") from None

    def resolve(self, tag: str | None) -> Descriptor:
        """The image tagged ``tag``, or the only image when ``tag`` is None."""
        images = self.images()
        if tag is None:
            if len(images) == 1:
                return images[0]
            if not images:
                raise LayoutError(f"{self.root} holds no image")
            names = sorted({(d.annotations or {}).get(REF_NAME, str(d.digest.short)) for d in images})
            raise LayoutError(f"{self.root} holds {len(images)} images; choose one with --tag "
                              f"({', '.join(names[:8])})")
        for d in images:
            if (d.annotations or {}).get(REF_NAME) == tag:
                return d
        names = sorted({(d.annotations or {}).get(REF_NAME, "") for d in images} - {""})
        raise LayoutError(f"{self.root} has no image tagged {tag!r}" +
                          (f" (tags: {', '.join(names[:8])})" if names else ""))

    def blob_path(self, digest: Digest) -> Path:
        return self.root / "blobs" / digest.algorithm / digest.hex

    def has_blob(self, desc: Descriptor) -> bool:
        try:
            return self.blob_path(desc.digest).stat().st_size == desc.size
        except FileNotFoundError:
            return False

    def read_blob(self, desc: Descriptor, *, limit: int) -> bytes:
        """A small blob (manifest, config), verified against its descriptor."""
        if desc.size > limit:
            raise ManifestError(f"{desc.digest.short} is {desc.size} bytes, over the {limit} byte limit")
        try:
            data = self.blob_path(desc.digest).read_bytes()
        except FileNotFoundError:
            raise LayoutError(f"{self.root}: blob {desc.digest} is missing") from None
        if len(data) != desc.size or Digest.of(data) != desc.digest:
            raise LayoutError(f"{self.root}: blob {desc.digest} is corrupt (digest or size mismatch)")
        return data

    # -- writing ---------------------------------------------------------------------------
    def discard_if_empty(self) -> bool:
        """Remove this layout if it holds no image and no blob, not even a partial one: what a pull
        that created it leaves when it fails before any byte lands. Only its own two files and
        empty directories are removed, under its lock, so a layout another process has put
        anything into (a tag, a blob, a file of its own) stays."""
        blobs = self.root / "blobs"
        try:
            with _locked(self.root):
                if (self.index().get("manifests") or [p.name for p in blobs.iterdir()] != ["sha256"]
                        or {p.name for p in self.root.iterdir()} != {"blobs", "index.json", "oci-layout"}):
                    return False
                (blobs / "sha256").rmdir()  # fails when a blob, or a part of one, is there
                blobs.rmdir()
                for name in ("oci-layout", "index.json"):
                    (self.root / name).unlink()
                self.root.rmdir()
        except (OSError, LayoutError):
            return False
        return True

    def blob_writer(self, desc: Descriptor) -> BlobWriter:
        path = self.blob_path(desc.digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        return BlobWriter(path, desc.digest, desc.size, resumable=True)

    def write_blob(self, data: bytes, digest: Digest | None = None) -> Digest:
        """Write a small blob atomically; ``digest``, when given, must match."""
        actual = Digest.of(data)
        if digest is not None and actual != digest:
            raise DigestMismatchError(f"blob {digest.short}: bytes have digest {actual.short}")
        path = self.blob_path(actual)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        return actual

    def set_tag(self, tag: str | None, desc: Descriptor) -> None:
        """Point ``tag`` at ``desc`` in index.json (replacing that tag's old entry), atomically and
        under the layout's lock: the entries other processes add meanwhile are kept."""
        entry = desc.to_json()
        entry.pop("platform", None)
        if tag is not None:
            entry["annotations"] = {**(desc.annotations or {}), REF_NAME: tag}
        with _locked(self.root):
            current = self.index().get("manifests", [])
            keep = [m for m in current if tag is None or (m.get("annotations") or {}).get(REF_NAME) != tag]
            if tag is None:
                keep = [m for m in keep if m.get("digest") != str(desc.digest)]
            atomic_write(self.root / "index.json", _index_bytes([*keep, entry]))


def _index_bytes(manifests: list[dict[str, Any]]) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": MEDIA_OCI_INDEX, "manifests": manifests},
                      indent=2).encode()


def is_index(media_type: str) -> bool:
    return media_type in INDEX_TYPES
