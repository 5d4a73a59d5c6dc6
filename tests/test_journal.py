"""The resume journal: records are trusted only when they describe this blob, and owned by one upload."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

import blobflow
from blobflow import journal as journal_module
from blobflow.deadline import UploadTicket
from blobflow.journal import Journal, _lock_file, range_checksum
from blobflow.localreg import LocalRegistry
from blobflow.registry.credentials import Credentials, load_credentials, store_credentials
from blobflow.synth import build_image
from blobflow.types import Digest

D1 = Digest("sha256", "1" * 64)
D2 = Digest("sha256", "2" * 64)


def test_upload_record_round_trip_keeps_the_session_and_when_it_was_opened(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    rec = journal.upload("r.example", "a/b", D1, 1000)
    assert rec.owned and not rec.location
    rec.location, rec.offset, rec.opened_at = "https://r.example/v2/a/b/blobs/uploads/u1?_state=x", 400, 1234.5
    rec.save()
    rec.release()
    again = journal.upload("r.example", "a/b", D1, 1000)
    assert (again.location, again.offset, again.opened_at) == (rec.location, 400, 1234.5)
    # another blob, another repository, or another size: nothing remembered
    assert not journal.upload("r.example", "a/c", D1, 1000).location
    assert not journal.upload("r.example", "a/b", D2, 1000).location


def test_a_record_of_an_upload_with_nothing_to_resume_touches_no_file(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    earlier = journal.upload("r.example", "a/b", D1, 10)
    earlier.location = "https://r.example/up/1"
    earlier.save()
    earlier.release()
    rec = journal.upload("r.example", "a/b", D1, 10, resumable=False)
    assert not rec.location  # what an earlier run left is not used ...
    rec.location = "https://r.example/up/2"
    rec.save()
    rec.discard()
    rec.release()
    assert journal.upload("r.example", "a/b", D1, 10).location == "https://r.example/up/1"  # ... nor touched


async def test_only_uploads_that_can_resume_keep_a_record(tmp_path: Path, registry: LocalRegistry) -> None:
    """A blob that goes in one PUT writes nothing to the state dir; a streamed one leaves nothing
    once it is done (each left a lock file: thousands after a few mirror runs)."""
    state = tmp_path / "state"
    client = blobflow.Client(blobflow.EngineConfig(plain_http=True, state_dir=str(state)))
    small, large = tmp_path / "small", tmp_path / "large"
    small.write_bytes(os.urandom(1000))
    large.write_bytes(os.urandom(5 * 1024 * 1024))
    await client.blob_put(small, f"{registry.host}/journal/small")
    assert not (state / "uploads").exists()
    await client.blob_put(large, f"{registry.host}/journal/large")
    assert list((state / "uploads").iterdir()) == []


def test_a_record_in_use_is_not_shared(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    first = journal.upload("r.example", "a/b", D1, 10)
    first.location = "https://r.example/up/1"
    first.save()
    second = journal.upload("r.example", "a/b", D1, 10)
    assert not second.owned and not second.location
    second.save()  # an upload that does not own the record must not overwrite it
    first.release()
    assert journal.upload("r.example", "a/b", D1, 10).location == "https://r.example/up/1"


def test_a_released_record_leaves_no_lock_file_and_the_next_upload_owns_it(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    first = journal.upload("r.example", "a/b", D1, 10)
    first.location = "https://r.example/up/1"
    first.save()
    assert not journal.upload("r.example", "a/b", D1, 10).owned
    first.release()
    assert [p.suffix for p in (tmp_path / "uploads").iterdir()] == [".json"]  # the record, for a resume
    second = journal.upload("r.example", "a/b", D1, 10)
    assert second.owned and second.location == "https://r.example/up/1"
    assert not journal.upload("r.example", "a/b", D1, 10).owned


def test_a_lock_got_on_a_file_its_holder_just_deleted_is_taken_on_the_new_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder deletes the lock file when it is done. One who opened it just before, and
    locks it just after, holds a lock on a file no longer there, which nobody else sees: two
    uploads would share a session. It must lock the file at the path instead."""
    path = tmp_path / "r.lock"
    real_flock, locked = fcntl.flock, []

    def holder_finishes_first(fd: int, operation: int) -> None:
        if not locked:
            path.unlink()
        locked.append(fd)
        real_flock(fd, operation)

    monkeypatch.setattr(journal_module.fcntl, "flock", holder_finishes_first)
    fd = _lock_file(path)
    assert fd is not None and len(locked) == 2
    assert os.fstat(fd).st_ino == os.stat(path).st_ino
    monkeypatch.undo()
    assert _lock_file(path) is None
    os.close(fd)


def test_corrupt_or_mismatched_records_are_discarded_with_a_warning(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    rec = journal.upload("r.example", "a/b", D1, 10)
    rec.release()
    rec.file.parent.mkdir(parents=True, exist_ok=True)
    rec.file.write_text("{not json")
    again = journal.upload("r.example", "a/b", D1, 10)
    assert "corrupt" in again.warning and not again.location and not rec.file.exists()
    again.release()
    rec.file.write_text(json.dumps({"version": 1, "kind": "upload", "digest": str(D1), "size": 10,
                                    "location": "file:///etc/passwd", "offset": 3}))
    third = journal.upload("r.example", "a/b", D1, 10)
    assert "does not match" in third.warning and not third.location


def test_download_ranges_outside_the_blob_are_not_trusted(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    dest, partial = tmp_path / "blob", tmp_path / ".blob.partial"
    rec = journal.download(dest, D1, 100, partial)
    rec.ranges = [(0, 50, "abc"), (50, 100, "def")]
    rec.save()
    assert journal.download(dest, D1, 100, partial).ranges == [(0, 50, "abc"), (50, 100, "def")]
    rec.ranges = [(0, 150, "abc")]
    rec.save()
    bad = journal.download(dest, D1, 100, partial)
    assert bad.ranges == [] and "does not match" in bad.warning


def test_a_download_record_is_found_however_the_path_is_spelled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pull ... out` interrupted, then `pull ... /abs/out` (or from another directory): the same
    download. The record's key was the resolved path, its check the path as given: "discarded a
    resume record that does not match this blob", and every byte fetched again."""
    journal = Journal(tmp_path / "state")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    rec = journal.download(Path("out/blob"), D1, 100, Path("out/.blob.partial"))
    assert rec is not None
    rec.ranges = [(0, 50, "abc")]
    rec.save()
    monkeypatch.chdir(tmp_path)
    again = journal.download(tmp_path / "work/out/blob", D1, 100, Path("work/out/.blob.partial"))
    assert again is not None and again.ranges == [(0, 50, "abc")] and not again.warning


def test_range_checksum_reads_exactly_the_range() -> None:
    data = bytes(range(256)) * 100
    def read_at(offset: int, n: int) -> bytes:
        return data[offset:offset + n]
    assert range_checksum(read_at, 10, 5000, piece=333) == range_checksum(read_at, 10, 5000)
    assert range_checksum(read_at, 10, 5000) != range_checksum(read_at, 11, 5000)
    assert range_checksum(read_at, 0, len(data) + 1) == ""  # a short file is no match


def test_a_resumed_session_has_spent_part_of_its_window() -> None:
    now = [1000.0]
    ticket = UploadTicket("ghcr.io", D1, 1000, 600.0, clock=lambda: now[0])
    ticket.session_resumed(120.0, 400)
    assert ticket.started == 880.0 and ticket.sent == 400


def test_known_locations_outlive_the_job_latest_first(tmp_path: Path) -> None:
    first = Journal(tmp_path).locations
    first.add("reg:5000", D1, "lib/a")
    first.add("reg:5000", D1, "lib/b")
    first.add("reg:5000", D1, "lib/a")  # known already: not written twice
    first.add("other:5000", D2, "lib/c")
    later = Journal(tmp_path).locations  # a later job reads them back
    assert later.get("reg:5000", D1) == ["lib/b", "lib/a"]
    assert later.get("reg:5000", D2) == []
    assert later.get("other:5000", D2) == ["lib/c"]
    files = list((tmp_path / "locations").iterdir())
    assert sum(len(f.read_text().splitlines()) for f in files) == 3


def test_known_locations_skip_what_does_not_parse_and_start_over_when_too_large(tmp_path: Path) -> None:
    good = Journal(tmp_path).locations
    good.add("reg:5000", D1, "lib/a")
    file = next((tmp_path / "locations").iterdir())
    with open(file, "a") as f:
        f.write('{"digest": "sha256:12", "repository": "lib/b"}\n')  # not a digest
        f.write(json.dumps({"digest": str(D1), "repository": "../../etc"}) + "\n")  # not a repository
        f.write(json.dumps({"digest": str(D1), "repository": "UPPER/case"}) + "\n")
        f.write('{"digest": "sha256:' + "3" * 64 + '", "repo')  # torn by a crash
    assert Journal(tmp_path).locations.get("reg:5000", D1) == ["lib/a"]

    big = Journal(tmp_path).locations
    big.MAX_BYTES = 10
    assert big.get("reg:5000", D1) == ["lib/a"]  # read, kept for this job ...
    assert not file.exists()  # ... and the file started afresh


def test_a_state_dir_that_cannot_be_written_costs_resume_not_the_job(tmp_path: Path) -> None:
    """A read-only root filesystem (a hardened container) or a home that is a file: records fail,
    the journal says so once and keeps none after that; nothing raises."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    heard: list[str] = []
    journal = Journal(blocker / "state", warn=heard.append)
    download = journal.download(tmp_path / "out" / "blob", D1, 100, tmp_path / "out" / ".blob.partial")
    download.ranges = [(0, 50, "00")]
    assert download.save() is False and download.save() is False
    upload = journal.upload("r.example", "a/b", D1, 1000)
    assert not upload.owned and upload.save() is False
    upload.discard()
    upload.release()
    assert len(heard) == 1 and str(blocker / "state") in heard[0] and "Not a directory" in heard[0]
    assert "interrupted transfer will start over" in heard[0]

    fresh = Journal(blocker / "state2", warn=heard.append)  # an upload may be the first to find out
    assert not fresh.upload("r.example", "a/b", D2, 1000).owned and len(heard) == 2


async def test_without_a_home_the_job_keeps_no_records_and_says_so(
        tmp_path: Path, registry: LocalRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container run as a uid with no passwd entry and no $HOME (OpenShift's random uids, a
    Kubernetes runAsUser missing from the image): Path.home() raises. Every command failed with
    'internal error: RuntimeError: Could not determine home directory'."""
    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    for name in ("HOME", "XDG_STATE_HOME", "DOCKER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(Path, "home", staticmethod(no_home))
    events: list[blobflow.Event] = []
    client = blobflow.Client(blobflow.EngineConfig(plain_http=True, chunk_size=1024 * 1024), listener=events.append)
    src = tmp_path / "src"
    build_image(src, "v1", [5 * 1024 * 1024], seed=4)  # over 4 MiB: a resumable, chunked upload
    await client.push(src, f"{registry.host}/home/less:v1")
    await client.pull(f"{registry.host}/home/less:v1", tmp_path / "out")
    notes = [e.detail for e in events if e.kind == "info" and "resume records" in e.detail]
    assert len(notes) == 2 and all("no home directory" in n and "--state-dir" in n for n in notes)  # one a job

    assert await load_credentials(registry.host) == Credentials()  # nowhere to look: anonymous
    with pytest.raises(blobflow.BadInputError, match="set DOCKER_CONFIG"):
        store_credentials(registry.host, Credentials("u", "p"))
