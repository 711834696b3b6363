"""persense-serve under load and faults: concurrent clients with no failure and bounded memory; a client that
disconnects mid-upload or gives up mid-inference leaves the server healthy."""

from __future__ import annotations

import socket
import time

import pytest

httpx = pytest.importorskip("httpx")

from prompt_scenes import scene_files
from serve_process import serve

from persense.benchmarks.serve_load import create_reference, rss_mb, run_load

CLIENTS = 4
# Resident-memory growth allowed over a load run after warm-up (arenas and allocator caches settle in the first
# requests; a leak of one target image per request, 0.3 MB decoded, would pass 100 requests at 30 MB).
RSS_GROWTH_MB = 64


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    return scene_files(tmp_path_factory.mktemp("load_scene"))


@pytest.fixture(scope="module")
def server(trained_tiny_engines, tmp_path_factory):
    root = tmp_path_factory.mktemp("load_server")
    with serve(trained_tiny_engines, root / "cache", root / "server.log", "--workers", str(CLIENTS), "-q") as running:
        yield running


@pytest.fixture(scope="module")
def reference_id(server, files) -> str:
    return create_reference(server.url, files["reference"], ",".join(f"{v:g}" for v in files["box"]))


@pytest.fixture(scope="module")
def warm(server, files, reference_id) -> None:
    """One request per client slot, so memory is measured after the arenas' first growth."""
    assert run_load(server.url, reference_id, files["target"], CLIENTS, 1).failures == 0


def check_load(server, files, reference_id, requests: int) -> None:
    """CLIENTS x `requests`: no failure, one answer for identical requests, memory growth under the bound."""
    report = run_load(server.url, reference_id, files["target"], CLIENTS, requests, server.process.pid)
    assert report.requests == CLIENTS * requests and report.failures == 0
    assert len(report.counts) == 1
    assert report.rss_after_mb - report.rss_before_mb < RSS_GROWTH_MB, report
    assert report.p50_ms <= report.p95_ms <= report.max_ms


def test_short_load_has_no_failure_and_bounded_memory(server, files, reference_id, warm):
    check_load(server, files, reference_id, 2)


@pytest.mark.slow
def test_load_4_clients_x_25_requests(server, files, reference_id, warm):
    """The README's load figures (benchmarks/serve_load.py prints them); the short test covers the same checks."""
    check_load(server, files, reference_id, 25)


def healthy(server, files, reference_id) -> None:
    """/healthz answers and a whole segment request still succeeds."""
    with server.client() as http:
        assert http.get("/healthz").status_code == 200
        target = {"image": ("target.png", files["target"].read_bytes(), "image/png")}
        assert http.post("/v1/segment", files=target, data={"reference": reference_id}).status_code == 200
    assert server.process.poll() is None


def test_client_disconnecting_mid_upload_leaves_the_server_healthy(server, files, reference_id):
    host, port = server.url.removeprefix("http://").split(":")
    boundary = "persense-test-boundary"
    head = (
        f"POST /v1/segment HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
        f"Content-Length: 400000\r\n\r\n--{boundary}\r\n"
        'Content-Disposition: form-data; name="image"; filename="target.png"\r\nContent-Type: image/png\r\n\r\n'
    ).encode()
    for _ in range(3):
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(head + files["target"].read_bytes()[:20000])
            time.sleep(0.2)
    rss = rss_mb(server.process.pid)
    healthy(server, files, reference_id)
    assert rss_mb(server.process.pid) - rss < RSS_GROWTH_MB


def test_request_cancelled_mid_inference_leaves_the_server_healthy(server, files, reference_id):
    target = {"image": ("target.png", files["target"].read_bytes(), "image/png")}
    for _ in range(2):
        with httpx.Client(base_url=server.url, timeout=httpx.Timeout(60, read=0.3)) as impatient:
            with pytest.raises(httpx.ReadTimeout):  # the upload is sent; the client gives up while SAM runs
                impatient.post("/v1/segment", files=target, data={"reference": reference_id})
    healthy(server, files, reference_id)
