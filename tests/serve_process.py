"""Helpers shared by the persense-serve tests: a real server process on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

START_TIMEOUT_S = 120  # engines are opened before the port is bound; 2 busy cores can take a while


def free_port() -> int:
    """A TCP port nobody listens on now, on 127.0.0.1."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A running persense-serve process: its base URL, process and log."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def client(self, timeout: float = 120) -> httpx.Client:
        """An HTTP client for this server."""
        return httpx.Client(base_url=self.url, timeout=timeout)

    def rss_bytes(self) -> int:
        """The server process's resident memory now (Linux /proc)."""
        fields = Path(f"/proc/{self.process.pid}/status").read_text().split("\n")
        line = next(f for f in fields if f.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024


@contextmanager
def serve(engines: Path, cache_dir: Path, log: Path, *flags: str) -> Iterator[Server]:
    """persense-serve on a free loopback port until the block ends (then SIGINT, as Ctrl-C, and wait)."""
    port = free_port()
    argv = [sys.executable, "-m", "persense.runtime.serve.cli", "--engines", str(engines), "--port", str(port)]
    env = {**os.environ, "PERSENSE_CACHE_DIR": str(cache_dir)}
    with log.open("wb") as sink:
        process = subprocess.Popen([*argv, "--threads", "1", *flags], stdout=sink, stderr=subprocess.STDOUT, env=env)
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"persense-serve exited with {process.returncode}: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"persense-serve did not start in {START_TIMEOUT_S} s: {log.read_text()[-2000:]}")
            time.sleep(0.25)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
