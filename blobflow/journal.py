"""Resume state on disk, so a killed or interrupted job continues where it stopped.

One small JSON file per blob in flight under the state dir (``--state-dir``, default
``$XDG_STATE_HOME/blobflow``):

- a download records its partial file and the byte ranges written to it, each with an xxh3-64 of
  its bytes; a later run re-checks every range against the file before trusting it (the final
  sha256 still covers every byte);
- an upload records its session URL and the offset the registry confirmed; a later run asks the
  registry for the offset (``GET`` on the session) and continues, or starts a new session.

Records are replaced atomically (temp + rename). A record that does not parse, or that names
another blob, size or file, is discarded with a warning, never trusted. A state dir that cannot
be written (a read-only root filesystem in a container, a home that is not there) costs resume,
never the job: the first record that fails says so once, and the job goes on keeping none.

Beside the records, :class:`KnownLocations` remembers which repositories of a registry earlier
jobs put each blob in: mount sources for a later job, so the re-run of a killed mirror (or a
push to a new repository) mounts what is already in the registry instead of sending it again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from .config import NO_HOME, home_dir
from .types import Digest, is_repository

__all__ = ["DownloadRecord", "Journal", "KnownLocations", "UploadRecord", "default_state_dir",
           "range_checksum"]

_VERSION = 1
# one line of a KnownLocations file, exactly as written there
_LOCATION_LINE = re.compile(
    r'^\{"digest": "(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})", "repository": "([a-z0-9._/-]+)"\}$', re.MULTILINE)


def default_state_dir() -> Path | None:
    """``$XDG_STATE_HOME/blobflow``, else ``~/.local/state/blobflow``; None without either."""
    base = os.environ.get("XDG_STATE_HOME")
    if base:
        return Path(base) / "blobflow"
    home = home_dir()
    return home / ".local" / "state" / "blobflow" if home is not None else None


def range_checksum(read_at: Any, start: int, end: int, *, piece: int = 8 << 20) -> str:
    """xxh3-64 of ``[start, end)`` read with ``read_at(offset, n)``."""
    h = xxhash.xxh3_64()
    pos = start
    while pos < end:
        data = read_at(pos, min(piece, end - pos))
        if not data:
            break
        h.update(data)
        pos += len(data)
    return h.hexdigest() if pos == end else ""


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


@dataclass
class DownloadRecord:
    """Ranges of a partial file known to hold the blob's bytes: ``(start, end, xxh3)``."""

    file: Path
    digest: str
    size: int
    partial: str
    ranges: list[tuple[int, int, str]] = field(default_factory=list)
    warning: str = ""
    journal: Journal | None = field(default=None, repr=False)

    def save(self) -> bool:
        """Write the record; False when the state dir cannot keep it (nothing to resume from)."""
        return self.journal is not None and self.journal.keep(self.file, {
            "version": _VERSION, "kind": "download", "digest": self.digest, "size": self.size,
            "partial": self.partial, "ranges": [list(r) for r in self.ranges]})

    def discard(self) -> None:
        self.file.unlink(missing_ok=True)


@dataclass
class UploadRecord:
    """An upload session to continue: its URL and the offset the registry confirmed.

    A record belongs to one upload at a time (an exclusive lock on ``<record>.lock``); a second
    upload of the same blob to the same repository, in this process or another, gets a record
    that remembers nothing, so two uploads never share a session.
    """

    file: Path
    digest: str
    size: int
    location: str = ""
    offset: int = 0
    opened_at: float = 0.0  # wall-clock time the session was opened: its upload window runs from then
    warning: str = ""
    owned: bool = True
    journal: Journal | None = field(default=None, repr=False)
    _lock: int = -1

    def save(self) -> bool:
        """Write the record (when this upload owns it); False when it was not written."""
        return self.owned and self.journal is not None and self.journal.keep(self.file, {
            "version": _VERSION, "kind": "upload", "digest": self.digest, "size": self.size,
            "location": self.location, "offset": self.offset, "opened_at": self.opened_at})

    def discard(self) -> None:
        if self.owned:
            self.file.unlink(missing_ok=True)

    def release(self) -> None:
        if self._lock >= 0:
            self.file.with_suffix(".lock").unlink(missing_ok=True)  # deleted while still held: see _lock_file
            os.close(self._lock)
            self._lock = -1


class KnownLocations:
    """Repositories of each registry that jobs put a blob in (sent, mounted or found there).

    One append-only file of JSON lines per registry under ``locations/``, read once per job. A
    hint, never trusted: a mount from a repository that no longer holds the blob is declined by
    the registry and the blob is sent. Lines that do not parse are skipped; a file grown past
    :attr:`MAX_BYTES` is started afresh (the hints of the job reading it stay in memory).
    """

    MAX_BYTES = 2 << 20  # about 18,000 hints, read in some 50 ms

    def __init__(self, root: Path | None) -> None:
        """``root`` None: no state dir, the hints of this job live in memory only."""
        self.root = root / "locations" if root is not None else None
        self._tables: dict[str, dict[str, list[str]]] = {}

    def get(self, registry: str, digest: Digest) -> list[str]:
        """Repositories of ``registry`` known to hold ``digest``, latest first."""
        return self._table(registry).get(str(digest), [])[::-1]

    def add(self, registry: str, digest: Digest, repository: str) -> None:
        if not is_repository(repository):
            return
        repos = self._table(registry).setdefault(str(digest), [])
        if repository in repos:
            return
        repos.append(repository)
        if self.root is None:
            return
        line = f'{{"digest": "{digest}", "repository": "{repository}"}}\n'  # what _LOCATION_LINE reads
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self._file(registry), "a", encoding="utf-8") as f:  # one short write: whole lines
                f.write(line)
        except OSError:
            pass  # a hint is never worth failing a transfer for

    def _file(self, registry: str) -> Path:
        assert self.root is not None
        return self.root / f"{_key(registry)}.jsonl"

    def _table(self, registry: str) -> dict[str, list[str]]:
        table = self._tables.get(registry)
        if table is not None:
            return table
        table = self._tables[registry] = {}
        if self.root is None:
            return table
        file = self._file(registry)
        try:
            text = file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return table
        valid: dict[str, bool] = {}  # a job's hints name few repositories, each on many lines
        for digest, repository in _LOCATION_LINE.findall(text):  # a torn or foreign line does not match
            ok = valid.get(repository)
            if ok is None:
                ok = valid[repository] = is_repository(repository)
            if ok:
                repos = table.setdefault(digest, [])
                if repository not in repos:
                    repos.append(repository)
        if len(text) > self.MAX_BYTES:
            file.unlink(missing_ok=True)
        return table


class Journal:
    def __init__(self, root: Path | str | None = None, *, warn: Callable[[str], None] | None = None) -> None:
        """``warn`` hears, once, that the state dir cannot keep records. Without ``root`` and
        without a default one (no home), the job keeps none: ``download`` gives no record and
        ``upload`` one that writes nothing."""
        self.root = Path(root) if root is not None else default_state_dir()
        self.locations = KnownLocations(self.root)
        self.unusable = ""  # why records cannot be written here, once one failed
        self._warn = warn

    def failed(self, e: OSError) -> None:
        """A record could not be written: keep none for the rest of the job, and say so once."""
        self._give_up(f"in {self.root}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else ""))

    def keep(self, file: Path, data: dict[str, Any]) -> bool:
        """Write a record; False (and no more tries this job) when the state dir cannot take it."""
        if self.unusable:
            return False
        try:
            _write(file, data)
        except OSError as e:
            self.failed(e)
            return False
        return True

    def _give_up(self, why: str) -> None:
        if self.unusable:
            return
        self.unusable = why
        if self._warn is not None:
            self._warn(f"cannot keep resume records {why}; the job goes on, but an interrupted transfer will "
                       "start over (--state-dir DIR to keep them)")

    def _homeless(self) -> bool:
        if self.root is not None:
            return False
        self._give_up(f"anywhere: {NO_HOME} and XDG_STATE_HOME is not set")
        return True

    def download(self, destination: Path, digest: Digest, size: int, partial: Path) -> DownloadRecord | None:
        """The record for ``digest`` downloading to ``destination`` (empty when there is none;
        None without a state dir)."""
        if self._homeless():
            return None
        assert self.root is not None
        file = self.root / "downloads" / f"{_key(str(destination.resolve()), str(digest))}.json"
        # resolved, as the key is: `pull ./out` run again from another directory as `pull /abs/out`
        # (a cron job, a CI step) is the same download and must find its partial file trusted
        partial_name = str(partial.resolve())
        fresh = DownloadRecord(file, str(digest), size, partial_name, journal=self)
        data, warning = _read(file)
        if data is None:
            fresh.warning = warning
            return fresh
        try:
            ok = (data["kind"] == "download" and data["digest"] == str(digest) and data["size"] == size
                  and data["partial"] == partial_name)
            ranges = [(int(s), int(e), str(x)) for s, e, x in data["ranges"]]
            ok = ok and all(0 <= s < e <= size for s, e, _ in ranges)
        except (KeyError, TypeError, ValueError):
            ok, ranges = False, []
        if not ok:
            file.unlink(missing_ok=True)
            fresh.warning = f"discarded a resume record for {digest.short} that does not match this blob"
            return fresh
        fresh.ranges = ranges
        return fresh

    def upload(self, registry: str, repository: str, digest: Digest, size: int, *,
               resumable: bool = True) -> UploadRecord:
        """The record of ``digest``'s upload session to ``repository``. ``resumable=False`` (a blob
        sent in one request, with nothing to continue) gives one that reads and writes nothing:
        the record's filesystem calls cost more than such an upload's own work on a slow disk."""
        if not resumable or self._homeless() or self.unusable:
            return UploadRecord(Path(os.devnull), str(digest), size, owned=False)  # reads and writes nothing
        assert self.root is not None
        file = self.root / "uploads" / f"{_key(registry, repository, str(digest))}.json"
        fresh = UploadRecord(file, str(digest), size, journal=self)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            lock = _lock_file(file.with_suffix(".lock"))
        except OSError as e:
            self.failed(e)
            fresh.owned = False  # reads and writes nothing: the upload goes on without a record
            return fresh
        if lock is None:
            fresh.owned = False  # another upload of this blob holds the record
            return fresh
        fresh._lock = lock
        data, warning = _read(file)
        if data is None:
            fresh.warning = warning
            return fresh
        try:
            ok = data["kind"] == "upload" and data["digest"] == str(digest) and data["size"] == size
            location, offset = str(data["location"]), int(data["offset"])
            opened_at = float(data.get("opened_at", 0.0))
            ok = ok and location.startswith(("http://", "https://")) and 0 <= offset <= size and opened_at >= 0
        except (KeyError, TypeError, ValueError):
            ok, location, offset, opened_at = False, "", 0, 0.0
        if not ok:
            file.unlink(missing_ok=True)
            fresh.warning = f"discarded a resume record for {digest.short} that does not match this blob"
            return fresh
        fresh.location, fresh.offset, fresh.opened_at = location, offset, opened_at
        return fresh


def _lock_file(path: Path) -> int | None:
    """An exclusive lock on ``path`` (created when missing), or None while another holds it. Its
    holder deletes the file when done (one per upload otherwise piles up in the state dir, ten
    thousand after a few mirror runs), so a lock got on a file that is no longer at ``path`` is
    taken again on the file there now."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _is_at(fd, path):
                return fd
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _is_at(fd: int, path: Path) -> bool:
    try:
        there = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (there.st_dev, there.st_ino)


def _read(file: Path) -> tuple[dict[str, Any] | None, str]:
    try:
        raw = file.read_bytes()
    except (FileNotFoundError, NotADirectoryError):  # no record (a state dir that is not there has none)
        return None, ""
    except OSError as e:
        return None, f"cannot read resume record {file}: {e.strerror}"
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or data.get("version") != _VERSION:
            raise ValueError("unknown version")
    except ValueError:
        file.unlink(missing_ok=True)
        return None, f"discarded a corrupt resume record {file.name}"
    return data, ""


def _write(file: Path, data: dict[str, Any]) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, file)
