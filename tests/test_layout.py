"""The OCI layout under concurrent writers: several pulls into one directory at once."""

from __future__ import annotations

import errno
import multiprocessing
import os
import re
from pathlib import Path

import pytest

from blobflow.errors import LayoutError
from blobflow.layout import REF_NAME, Layout
from blobflow.types import MEDIA_OCI_MANIFEST, Descriptor

WRITERS = 4
TAGS_EACH = 12


def _tag_many(root: str, writer: int, start: multiprocessing.synchronize.Barrier) -> None:
    start.wait()
    layout = Layout.create(root)  # every writer may be the one that creates the layout
    for i in range(TAGS_EACH):
        data = f'{{"writer": {writer}, "i": {i}}}'.encode()
        digest = layout.write_blob(data)
        layout.set_tag(f"w{writer}-{i}", Descriptor(MEDIA_OCI_MANIFEST, digest, len(data)))


@pytest.mark.parametrize("existing", [False, True], ids=["new-dir", "existing-layout"])
def test_concurrent_writers_keep_every_tag(existing: bool, tmp_path: Path) -> None:
    """Each ``set_tag`` reads index.json, adds one entry and replaces the file. Processes doing it
    at the same time must not replace each other's entries (a pulled image that loses its tag is
    lost to the user), and creating a new layout must not wipe an index another process wrote."""
    root = tmp_path / "layout"
    if existing:
        Layout.create(root)
    ctx = multiprocessing.get_context("fork")
    start = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=_tag_many, args=(str(root), w, start)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * WRITERS
    tags = [(m.annotations or {}).get(REF_NAME, "") for m in Layout.open(root).images()]
    assert sorted(tags) == sorted(f"w{w}-{i}" for w in range(WRITERS) for i in range(TAGS_EACH))
    assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_when_creating_a_layout_is_not_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A parent that is a file is a wrong path (exit 2); a full disk is not: the OSError goes on to
    the CLI, which names the path, exits 1 and says to make room and run the command again."""
    def full(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "mkdir", full)
    with pytest.raises(OSError) as info:
        Layout.create(tmp_path / "out")
    assert not isinstance(info.value, LayoutError)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "out")


def test_what_is_not_a_layout_is_named_for_what_it_is(tmp_path: Path) -> None:
    """A tar file (oci-archive, `docker save`) given as the layout, a missing directory and an
    empty one: each said as such (the tar file was "oci-layout is unreadable: NotADirectoryError")."""
    archive = tmp_path / "image.tar"
    archive.write_bytes(b"\0" * 1024)
    (tmp_path / "empty").mkdir()
    cases = {archive: "is a file, not an OCI image layout directory; if it is an oci-archive tar, extract it",
             tmp_path / "missing": "is not an OCI image layout (no such directory)",
             tmp_path / "empty": "is not an OCI image layout (no oci-layout file)"}
    for root, message in cases.items():
        with pytest.raises(LayoutError, match=re.escape(f"{root} {message}")):
            Layout.open(root)


def test_a_layout_file_that_is_not_json_says_where_it_breaks(tmp_path: Path) -> None:
    """Was "index.json is unreadable: JSONDecodeError": no hint of what or where."""
    root = tmp_path / "layout"
    Layout.create(root)
    (root / "index.json").write_text('{"schemaVersion": 2, "manifests": [,]}')
    with pytest.raises(LayoutError, match=re.escape(f"{root / 'index.json'} is not valid JSON "
                                                    "(Expecting value at line 1 column 36)")):
        Layout.open(root)
    (root / "oci-layout").write_bytes(b'{"imageLayoutVersion": "1.0.0\xff"}')
    with pytest.raises(LayoutError, match=re.escape(f"{root / 'oci-layout'} is not UTF-8 text")):
        Layout.open(root)


def test_a_failed_pull_discards_only_a_layout_that_holds_nothing(tmp_path: Path) -> None:
    """What a failed pull removes: the layout it created, while no image, no blob and no part of
    one is in it. A layout another pull put anything into meanwhile stays whole (it was removed
    with everything in it)."""
    def layout(name: str) -> Layout:
        return Layout.create(tmp_path / name)

    empty = layout("empty")
    assert empty.discard_if_empty() and not empty.root.exists()

    tagged = layout("tagged")
    digest = tagged.write_blob(b"{}")
    tagged.set_tag("v1", Descriptor(MEDIA_OCI_MANIFEST, digest, 2))
    partial = layout("partial")
    partial.blob_writer(Descriptor(MEDIA_OCI_MANIFEST, digest, 2)).write_at(0, b"{")
    own_file = layout("own-file")
    (own_file.root / "notes.txt").write_text("mine")
    for kept in (tagged, partial, own_file):
        assert not kept.discard_if_empty(), kept.root.name
        assert (kept.root / "blobs" / "sha256").is_dir() and (kept.root / "oci-layout").exists(), kept.root.name
    assert Layout.open(tagged.root).resolve("v1").digest == digest
