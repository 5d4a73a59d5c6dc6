"""``blob get IMAGE@DIGEST -`` and ``blob put - REPO``: a blob through standard output and input.

Standard output gets the blob only once every byte of it is verified (it is spooled under
$TMPDIR first), so a pipe reader never sees bytes a digest check would refuse; the spool never
outlives the command, whatever ends it.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import sys
from pathlib import Path

from conftest import Cli, MakeProxy, sigint_as_at_a_terminal
from faultproxy import Faults

import blobflow
from blobflow.localreg import LocalRegistry

MiB = 1024 * 1024


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


async def put_blob(registry: LocalRegistry, data: bytes, tmp_path: Path) -> str:
    src = tmp_path / "blob.src"
    src.write_bytes(data)
    _, desc = await blobflow.Client().blob_put(src, f"{registry.host}/r")
    return str(desc.digest)


def spool_dir(tmp_path: Path) -> Path:
    """A $TMPDIR of the test's own, to see what the command leaves there."""
    d = tmp_path / "tmpdir"
    d.mkdir(exist_ok=True)
    return d


async def test_blob_get_to_stdout_writes_the_verified_blob_and_the_summary_to_stderr(
        registry: LocalRegistry, cli: Cli, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 17)
    digest = await put_blob(registry, data, tmp_path)
    tmpdir = spool_dir(tmp_path)

    result = await cli("blob", "get", f"{registry.host}/r@{digest}", "-", env={"TMPDIR": str(tmpdir)})

    assert result.returncode == 0, result.stderr
    assert result.stdout_bytes == data
    assert "downloaded 1 blob" in result.stderr
    assert list(tmpdir.iterdir()) == []


async def test_blob_get_to_stdout_of_corrupt_bytes_writes_nothing(
        registry: LocalRegistry, proxy: MakeProxy, cli: Cli, tmp_path: Path) -> None:
    digest = await put_blob(registry, os.urandom(256 * 1024), tmp_path)
    fault_proxy = await proxy(registry, Faults(wrong_bytes=1.0, seed=3))
    tmpdir = spool_dir(tmp_path)

    result = await cli("blob", "get", f"{fault_proxy.host}/r@{digest}", "-", "--retries", "1",
                       env={"TMPDIR": str(tmpdir)})

    assert result.returncode == 1, result.stderr
    assert fault_proxy.counters["wrong_bytes"] == 2  # both attempts got a flipped byte
    assert result.stdout_bytes == b""
    assert "Traceback" not in result.stderr
    assert list(tmpdir.iterdir()) == []


async def test_blob_get_to_stdout_interrupted_writes_nothing_and_leaves_no_spool(
        registry: LocalRegistry, proxy: MakeProxy, tmp_path: Path) -> None:
    digest = await put_blob(registry, os.urandom(2 * MiB), tmp_path)
    slow = await proxy(registry, Faults(bandwidth=200_000))  # about 10 s for the blob
    tmpdir = spool_dir(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "blobflow", "blob", "get", f"{slow.host}/r@{digest}", "-",
        env={**os.environ, "TMPDIR": str(tmpdir)}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=sigint_as_at_a_terminal)
    try:
        async with asyncio.timeout(30):
            # the spool is there, and blob bytes are on their way into it
            while not list(tmpdir.rglob("*.partial")) or slow.counters["bytes_to_client"] < 100_000:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert proc.returncode == 130, err.decode()
    assert "not resumed" in err.decode()
    assert out == b""
    assert list(tmpdir.iterdir()) == []


async def test_blob_get_to_a_reader_that_goes_away(registry: LocalRegistry, tmp_path: Path) -> None:
    """``blobflow blob get ... - | head -c 10``: a non-zero exit, no traceback, no spool left."""
    digest = await put_blob(registry, os.urandom(4 * MiB), tmp_path)  # more than a pipe holds
    tmpdir = spool_dir(tmp_path)
    script = '"$0" -m blobflow blob get "$1" - | head -c 10 >/dev/null; exit "${PIPESTATUS[0]}"'
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", script, sys.executable, f"{registry.host}/r@{digest}",
        env={**os.environ, "TMPDIR": str(tmpdir)}, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()

    assert proc.returncode == 1, err.decode()
    assert "Traceback" not in err.decode()
    assert list(tmpdir.iterdir()) == []


async def test_blob_put_from_stdin(registry: LocalRegistry, cli: Cli, tmp_path: Path) -> None:
    data = os.urandom(5 * MiB + 3)  # over the monolithic threshold: a streamed upload
    tmpdir = spool_dir(tmp_path)

    result = await cli("blob", "put", "-", f"{registry.host}/from-stdin", stdin=data, env={"TMPDIR": str(tmpdir)})

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{digest_of(data)}\n"  # the summary line goes to standard error
    assert "MB" in result.stderr
    assert list(tmpdir.iterdir()) == []
    got = io.BytesIO()
    await blobflow.Client().blob_get(f"{registry.host}/from-stdin@{digest_of(data)}", got)
    assert got.getvalue() == data


async def test_stdout_or_stdin_that_cannot_carry_the_blob_is_bad_input(
        registry: LocalRegistry, cli: Cli, tmp_path: Path) -> None:
    digest = await put_blob(registry, b"x" * 1000, tmp_path)
    image = f"{registry.host}/r@{digest}"

    with_json = await cli("blob", "get", image, "-", "--json")
    assert with_json.returncode == 2
    assert "--json" in with_json.stderr
    assert b"x" * 1000 not in with_json.stdout_bytes

    put = ["blob", "put", "-", f"{registry.host}/r"]
    for args, stream in ((["blob", "get", image, "-"], "stdout"), (put, "stdin")):
        leader, follower = os.openpty()
        try:
            ends = {"stdin": asyncio.subprocess.DEVNULL, "stdout": asyncio.subprocess.PIPE, stream: follower}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "blobflow", *args, stdin=ends["stdin"], stdout=ends["stdout"],
                stderr=asyncio.subprocess.PIPE)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            os.close(follower)
            os.close(leader)
        assert proc.returncode == 2, (stream, err.decode())
        assert f"standard {'output' if stream == 'stdout' else 'input'} is a terminal" in err.decode()


async def test_api_blob_get_and_put_with_file_objects(registry: LocalRegistry, tmp_path: Path) -> None:
    data = os.urandom(MiB)
    client = blobflow.Client()

    _, desc = await client.blob_put(io.BytesIO(data), f"{registry.host}/api")
    assert str(desc.digest) == digest_of(data) and desc.size == len(data)

    out = io.BytesIO()
    result = await client.blob_get(f"{registry.host}/api@{desc.digest}", out)
    assert out.getvalue() == data
    assert result.bytes == len(data)


async def test_sigterm_ends_a_command_stuck_on_a_pipe(registry: LocalRegistry, tmp_path: Path) -> None:
    """Standard input that never ends, standard output nobody reads: SIGTERM still ends the
    command at once (exit 130, no spool left). The blocked read or write used to hold the event
    loop's shutdown until the pipe moved."""
    digest = await put_blob(registry, os.urandom(4 * MiB), tmp_path)  # more than a pipe holds
    tmpdir = spool_dir(tmp_path)
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    put = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "blobflow", "blob", "put", "-", f"{registry.host}/never-ends", env=env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    get = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "blobflow", "blob", "get", f"{registry.host}/r@{digest}", "-", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert put.stdin is not None
        put.stdin.write(b"some bytes, and then nothing more for ever")
        await put.stdin.drain()
        async with asyncio.timeout(30):
            # both spools are there, and the get's is complete: it is writing into the full pipe
            while len(list(tmpdir.glob("blobflow-*"))) < 2 or not list(tmpdir.glob("blobflow-*/blob")):  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        for proc in (put, get):
            proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            # the exit itself: wait() would also wait for the end of the pipe this test never reads
            while put.returncode is None or get.returncode is None:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
        codes = [put.returncode, get.returncode]
    finally:
        for proc in (put, get):
            if proc.returncode is None:
                proc.kill()
            await proc.communicate()
    assert codes == [130, 130]
    assert list(tmpdir.iterdir()) == []
