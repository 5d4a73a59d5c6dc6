"""A delaying reverse proxy in a process of its own, for benches that model a remote registry.

The proxy is the test suite's :class:`faultproxy.FaultProxy` with only ``Faults(latency=...)`` set:
every request (HEAD, manifest and blob GETs alike) waits that long before it is forwarded, bodies
stream through in 64 KiB chunks (memory stays bounded whatever the blob size). With ``connect``,
also ``Faults(connect_latency=...)`` of the same value: the first request of each new connection
waits one round trip more, as a TCP handshake with a remote registry costs. It runs in a child
process so its event loop does not share the bench's GIL.

Child side (``python benches/latency_proxy.py UPSTREAM_URL LATENCY_MS [connect]``): prints one JSON line
``{"addresses": [[host, port], ...]}`` once listening on 127.0.0.1, then answers each line read on
stdin with one JSON line of its counters and CPU seconds; it exits when stdin closes (so it also
ends when the bench dies). Parent side: :class:`LatencyProxy`.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

from blobflow.localreg import terminate

HERE = Path(__file__).resolve().parent
START_TIMEOUT = 20.0


class LatencyProxy:
    """Start, query and stop the proxy child. Raises RuntimeError when it cannot start."""

    def __init__(self, upstream: str, latency_ms: float, *, log_path: Path, env: dict[str, str],
                 connect: bool = False) -> None:
        self.upstream = upstream
        self.latency_ms = latency_ms
        self.connect = connect
        self.log_path = log_path
        self.env = env
        self.host = ""
        self._proc: subprocess.Popen[str] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), self.upstream, f"{self.latency_ms:g}",
                 *(["connect"] if self.connect else [])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=self.env, text=True, bufsize=1)
        line = self._read_line(START_TIMEOUT)
        addresses = json.loads(line)["addresses"]
        if not addresses or any(a[0] != "127.0.0.1" for a in addresses):
            self.stop()
            raise RuntimeError(f"latency proxy listens on {addresses}, not on 127.0.0.1 only")
        self.host = f"127.0.0.1:{addresses[0][1]}"

    def stats(self) -> dict[str, Any]:
        """The proxy's counters so far (``requests``, ``connections``, ``bytes_to_client``, ``upstream_error``,
        ...) and ``cpu_s``."""
        proc = self._alive()
        assert proc.stdin is not None
        proc.stdin.write("stats\n")
        proc.stdin.flush()
        stats: dict[str, Any] = json.loads(self._read_line(10.0))
        return stats

    def stop(self) -> None:
        """Close its stdin (it exits), then SIGTERM and SIGKILL if it lingers; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            terminate(proc)

    def _alive(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError(f"latency proxy is not running; its log:\n{self._log_tail()}")
        return self._proc

    def _read_line(self, timeout: float) -> str:
        proc = self._alive()
        assert proc.stdout is not None
        if not _readable(proc.stdout, timeout):
            self.stop()
            raise RuntimeError(f"latency proxy did not answer within {timeout:.0f} s; its log:\n{self._log_tail()}")
        line = proc.stdout.readline()
        if not line:
            self.stop()
            raise RuntimeError(f"latency proxy exited; its log:\n{self._log_tail()}")
        return line

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def _readable(stream: IO[str], timeout: float) -> bool:
    ready, _, _ = select.select([stream], [], [], timeout)
    return bool(ready)


# ---------------------------------------------------------------------------------------------
# the child


def serve(upstream: str, latency_ms: float, *, connect: bool) -> None:
    sys.path.insert(0, str(HERE.parent / "tests"))
    from faultproxy import FaultProxy, Faults  # only the child needs aiohttp

    async def main() -> None:
        loop = asyncio.get_running_loop()
        faults = Faults(latency=latency_ms / 1000, connect_latency=latency_ms / 1000 if connect else 0.0)
        async with FaultProxy(upstream, faults) as proxy:
            # the sockets actually bound (FaultProxy.host only formats "127.0.0.1:PORT")
            assert proxy._runner is not None
            addresses = [list(a[:2]) for a in proxy._runner.addresses]
            print(json.dumps({"addresses": addresses}), flush=True)
            while await loop.run_in_executor(None, sys.stdin.readline):
                times = os.times()
                print(json.dumps({**proxy.counters, "cpu_s": times.user + times.system}), flush=True)

    asyncio.run(main())


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[3:] not in ([], ["connect"]):
        sys.exit(f"usage: {sys.argv[0]} UPSTREAM_URL LATENCY_MS [connect]")
    serve(sys.argv[1], float(sys.argv[2]), connect=sys.argv[3:] == ["connect"])
