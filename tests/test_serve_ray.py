"""persense-serve on Ray Serve, on a local Ray instance: two replicas, each with its own engines, share references
through the reference-cache folder."""

from __future__ import annotations

import cv2
import pytest

httpx = pytest.importorskip("httpx")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")

from prompt_scenes import scene_files
from serve_process import free_port

from persense.runtime.api import PerSense
from persense.runtime.datasets.ray_batch import LOCAL
from persense.runtime.serve.app import Limits
from persense.runtime.serve.engines import EngineOptions
from persense.runtime.serve.ray_app import APP_NAME, run

REPLICAS = 2


@pytest.fixture(scope="module")
def deployed(trained_tiny_engines, tmp_path_factory):
    """The app on Ray Serve (REPLICAS replicas, one CPU each) with a shared cache folder; yields (url, cache)."""
    cache = tmp_path_factory.mktemp("ray_serve_cache")
    port = free_port()
    ray.init(num_cpus=REPLICAS, include_dashboard=False, logging_level="ERROR")
    try:
        serve = run(
            EngineOptions(trained_tiny_engines, threads=1, cache_dir=cache),
            Limits(),
            REPLICAS,
            LOCAL,
            "127.0.0.1",
            port,
        )
        yield f"http://127.0.0.1:{port}", cache, serve
        serve.shutdown()
    finally:
        ray.shutdown()


def test_replicas_segment_with_a_reference_neither_of_them_encoded(deployed, trained_tiny_engines, tmp_path):
    url, cache, serve = deployed
    files = scene_files(tmp_path)
    rgb = cv2.cvtColor(cv2.imread(str(files["reference"])), cv2.COLOR_BGR2RGB)
    # encoded by another process (this one) into the shared cache folder: what a replica on another node would see
    encoded = PerSense.open(trained_tiny_engines, cache_dir=cache, threads=1).reference(rgb, box=files["box"])
    reference_id = f"{encoded.key}-fp32"
    status = serve.status().applications[APP_NAME]
    replicas = status.deployments["PerSense"].replica_states
    assert replicas.get("RUNNING") == REPLICAS
    target = {"image": ("target.png", files["target"].read_bytes(), "image/png")}
    with httpx.Client(base_url=url, timeout=300) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        answers = [http.post("/v1/segment", files=target, data={"reference": reference_id}) for _ in range(4)]
        assert [a.status_code for a in answers] == [200] * 4, answers[0].text
        assert len({a.json()["count"] for a in answers}) == 1
        box = ",".join(f"{v:g}" for v in files["box"])
        image = {"image": ("reference.png", files["reference"].read_bytes(), "image/png")}
        again = http.post("/v1/references", files=image, data={"box": box}).json()
    assert (again["id"], again["source"]) == (reference_id, "cache")
