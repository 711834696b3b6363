"""Load on a running persense-serve: C concurrent clients, each sending R segment requests back to back.

    python -m persense.benchmarks.serve_load --url http://127.0.0.1:8000 --reference ref.png --box 141,114,198,173 \
        --target crowd.jpg --clients 4 --requests 25 [--pid SERVER_PID]

Encodes the reference once (POST /v1/references), then times every POST /v1/segment from send to the whole
answer. Prints one JSON object: requests, failures (non-200 or transport errors), p50/p95/max latency (ms),
throughput (requests/s over the wall time), the counts seen, and with --pid the server's resident memory
before and after the load (Linux /proc).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np


@dataclass
class LoadReport:
    """What one load run measured."""

    clients: int
    requests: int
    failures: int
    p50_ms: float
    p95_ms: float
    max_ms: float
    throughput_rps: float
    wall_s: float
    counts: list[int]  # distinct instance counts answered (one, for identical requests)
    rss_before_mb: float | None = None
    rss_after_mb: float | None = None


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (Linux /proc/<pid>/status, VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for process {pid}")


def create_reference(url: str, reference: Path, box: str) -> str:
    """POST /v1/references with a box; the reference id."""
    files = {"image": (reference.name, reference.read_bytes())}
    answer = httpx.post(f"{url}/v1/references", files=files, data={"box": box}, timeout=300)
    answer.raise_for_status()
    return answer.json()["id"]


def run_load(
    url: str, reference_id: str, target: Path, clients: int, requests: int, pid: int | None = None
) -> LoadReport:
    """`clients` threads, each with its own connection, sending `requests` segment requests one after another."""
    data = target.read_bytes()
    latencies: list[float] = []
    counts: set[int] = set()
    failures = [0]
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            for _ in range(requests):
                start = time.perf_counter()
                try:
                    answer = http.post(
                        "/v1/segment", files={"image": (target.name, data)}, data={"reference": reference_id}
                    )
                    ok = answer.status_code == 200
                    count = answer.json()["count"] if ok else None
                except httpx.HTTPError:
                    ok, count = False, None
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    latencies.append(elapsed)
                    failures[0] += not ok
                    if count is not None:
                        counts.add(count)

    before = rss_mb(pid) if pid is not None else None
    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    values = np.array(latencies)
    return LoadReport(
        clients,
        len(values),
        failures[0],
        round(float(np.percentile(values, 50)), 1),
        round(float(np.percentile(values, 95)), 1),
        round(float(values.max()), 1),
        round(len(values) / wall, 3),
        round(wall, 2),
        sorted(counts),
        before,
        rss_mb(pid) if pid is not None else None,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: one load run, printed as JSON."""
    parser = argparse.ArgumentParser(prog="serve_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    parser.add_argument("--reference", type=Path, required=True, help="reference image")
    parser.add_argument("--box", required=True, metavar="x0,y0,x1,y1", help="box around the object in it")
    parser.add_argument("--target", type=Path, required=True, help="target image every request sends")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    parser.add_argument("--requests", type=int, default=25, help="requests per client (default 25)")
    parser.add_argument("--pid", type=int, help="the server's process id, to report its resident memory")
    args = parser.parse_args(argv)
    reference_id = create_reference(args.url, args.reference, args.box)
    report = run_load(args.url, reference_id, args.target, args.clients, args.requests, args.pid)
    print(json.dumps(asdict(report)))
    return 0 if report.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
