"""persense-serve as a client sees it: a real server process on loopback, the REST contract, every bad upload."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
coco_mask = pytest.importorskip("pycocotools.mask")

from prompt_scenes import scene_files
from serve_process import Server, serve

from persense.runtime.api import PerSense

ERRORS_MD = Path(__file__).resolve().parents[1] / "docs" / "ERRORS.md"
MAX_UPLOAD_MB = 1  # the test server's bounds (the scene's PNGs are about 0.3 MB)
MAX_SIDE = 1024
# pycocotools 2.0.11's decode under NumPy 2 (its own code; the masks it returns are right)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


def decode_rle(rle: dict) -> np.ndarray:
    """A COCO RLE from the server as an HxW bool mask (pycocotools)."""
    return coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool)


def decode_png(data: str) -> np.ndarray:
    """A base64 PNG from the server, unchanged (16-bit label maps stay 16-bit)."""
    return cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    return scene_files(tmp_path_factory.mktemp("serve_scene"))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve_cache")


@pytest.fixture(scope="module")
def server(trained_tiny_engines, cache_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_log") / "server.log"
    flags = ("--max-upload-mb", str(MAX_UPLOAD_MB), "--max-side", str(MAX_SIDE), "-q")
    with serve(trained_tiny_engines, cache_dir, log, *flags) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server):
    with server.client() as http:
        yield http


@pytest.fixture(scope="module")
def ps(trained_tiny_engines) -> PerSense:
    """The same engines in this process, for what the server must reproduce."""
    return PerSense.open(trained_tiny_engines, cache=False, threads=1)


def upload(path: Path, name: str | None = None) -> tuple[str, bytes, str]:
    """A multipart file part."""
    return (name or path.name, path.read_bytes(), "image/png")


@pytest.fixture(scope="module")
def box_reference(client, files) -> dict:
    """POST /v1/references with the box around the reference instance."""
    box = ",".join(f"{v:g}" for v in files["box"])
    answer = client.post("/v1/references", files={"image": upload(files["reference"])}, data={"box": box})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_health_info_and_openapi(client, trained_tiny_engines):
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/v1/info").json()
    assert info["model_type"] == "tiny-trained" and info["backend"] == "ort-cpu"
    assert info["precisions"] == ["fp32"] and info["methods"] == ["persense"]
    assert info["max_upload_bytes"] == MAX_UPLOAD_MB * 2**20 and info["max_side"] == MAX_SIDE
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/references", "/v1/segment", "/healthz", "/v1/info"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_server_binds_loopback_by_default():
    from persense.runtime.serve.cli import build_parser

    assert build_parser().parse_args([]).host == "127.0.0.1"


def test_reference_from_a_box_is_sams_mask_and_content_addressed(client, files, box_reference, ps):
    expected = ps.reference(cv2.cvtColor(cv2.imread(str(files["reference"])), cv2.COLOR_BGR2RGB), box=files["box"])
    assert re.fullmatch(r"[0-9a-f]{64}-fp32", box_reference["id"])
    assert box_reference["size"] == [288, 384] and box_reference["source"] == "encoded"
    np.testing.assert_array_equal(decode_rle(box_reference["mask"]), expected.mask)
    box = ",".join(f"{v:g}" for v in files["box"])
    again = client.post("/v1/references", files={"image": upload(files["reference"])}, data={"box": box}).json()
    assert (again["id"], again["source"]) == (box_reference["id"], "cache")
    np.testing.assert_array_equal(decode_rle(again["mask"]), expected.mask)


def test_reference_from_clicks_and_from_a_mask(client, files):
    x, y = files["click"]
    clicked = client.post(
        "/v1/references",
        files={"image": upload(files["reference"])},
        data={"point": [f"{x},{y}", "5,5"], "label": ["1", "0"]},
    )
    assert clicked.status_code == 200, clicked.text
    assert decode_rle(clicked.json()["mask"])[y, x]
    given = client.post(
        "/v1/references", files={"image": upload(files["reference"]), "mask": upload(files["mask"])}
    ).json()
    assert given["mask"] is None and given["id"] != clicked.json()["id"]


def test_segment_gives_what_the_api_gives(client, files, box_reference, ps):
    answer = client.post(
        "/v1/segment",
        files={"image": upload(files["target"])},
        data={"reference": box_reference["id"], "images": "true"},
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    rgb = cv2.cvtColor(cv2.imread(str(files["reference"])), cv2.COLOR_BGR2RGB)
    target = cv2.cvtColor(cv2.imread(str(files["target"])), cv2.COLOR_BGR2RGB)
    expected = ps.segment(target, ps.reference(rgb, box=files["box"]))
    assert body["count"] == len(expected.points) == len(body["instances"]) >= 1
    assert body["method"] == "persense" and body["precision"] == "fp32" and body["size"] == [288, 384]
    assert set(body["timings_ms"]) == set(expected.timings_ms) and body["warnings"] == expected.warnings
    for got, mask, point, score in zip(body["instances"], expected.instance_masks(), expected.points, expected.scores):
        np.testing.assert_array_equal(decode_rle(got["mask"]), mask)
        assert got["point"] == pytest.approx(point.tolist()) and got["score"] == pytest.approx(float(score))
        assert len(got["box"]) == 4
    np.testing.assert_array_equal(decode_png(body["label_map_png"]), expected.labels)
    np.testing.assert_array_equal(decode_png(body["union_png"]), expected.union)


def test_a_restarted_server_keeps_the_reference(trained_tiny_engines, cache_dir, files, box_reference, tmp_path):
    with serve(trained_tiny_engines, cache_dir, tmp_path / "second.log", "-q") as second, second.client() as http:
        answer = http.post(
            "/v1/segment", files={"image": upload(files["target"])}, data={"reference": box_reference["id"]}
        )
    assert answer.status_code == 200, answer.text


# --- bad uploads: docs/ERRORS.md, "persense-serve" --------------------------------------------------------

Request = Callable[[httpx.Client, dict, dict], httpx.Response]


def _reference(client: httpx.Client, files: dict, parts: dict | None = None, **data) -> httpx.Response:
    """POST /v1/references with the reference image unless `parts` replaces the files."""
    return client.post("/v1/references", files=parts or {"image": upload(files["reference"])}, data=data)


def _segment(client: httpx.Client, files: dict, reference: str, parts: dict | None = None, **data) -> httpx.Response:
    """POST /v1/segment with the target image unless `parts` replaces the files."""
    data = {"reference": reference, **data}
    return client.post("/v1/segment", files=parts or {"image": upload(files["target"])}, data=data)


def _png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


BAD_UPLOADS: dict[str, tuple[Request, int, str]] = {
    "not_an_image": (
        lambda c, f, r: _segment(c, f, r["id"], {"image": ("a.png", b"hello, not an image", "image/png")}),
        400,
        "image: not a readable image (truncated, corrupt or unsupported format)",
    ),
    "truncated_image": (
        lambda c, f, r: _segment(c, f, r["id"], {"image": ("t.png", f["target"].read_bytes()[:5000], "image/png")}),
        400,
        "image: not a readable image",
    ),
    "missing_image": (lambda c, f, r: c.post("/v1/segment", data={"reference": r["id"]}), 422, "image: Field required"),
    "image_not_a_file": (
        lambda c, f, r: c.post("/v1/segment", data={"reference": r["id"], "image": "target.png"}),
        422,
        "image: Value error, Expected UploadFile",
    ),
    "missing_reference": (
        lambda c, f, r: c.post("/v1/segment", files={"image": upload(f["target"])}),
        422,
        "reference: Field required",
    ),
    "unknown_reference": (
        lambda c, f, r: _segment(c, f, "0" * 64 + "-fp32"),
        404,
        "unknown reference id '" + "0" * 64 + "-fp32'; create one with POST /v1/references",
    ),
    "malformed_reference": (lambda c, f, r: _segment(c, f, "../etc/passwd"), 404, "unknown reference id"),
    "oversize_body": (
        lambda c, f, r: _segment(c, f, r["id"], {"image": ("big.png", bytes(MAX_UPLOAD_MB * 2**20 + 1), "image/png")}),
        413,
        f"request body is over this server's limit of {MAX_UPLOAD_MB * 2**20} bytes",
    ),
    "oversize_image_side": (
        lambda c, f, r: _segment(c, f, r["id"], {"image": ("wide.png", _png(np.zeros((8, 1100), np.uint8)), "i/png")}),
        413,
        f"image: image is 1100x8; this server takes at most {MAX_SIDE} px on a side",
    ),
    "reference_box_outside": (
        lambda c, f, r: _reference(c, f, box="10,10,500,100"),
        400,
        "reference box [10.0, 10.0, 500.0, 100.0] is not inside the 384x288 reference image",
    ),
    "reference_point_malformed": (
        lambda c, f, r: _reference(c, f, point="12"),
        400,
        "point expects 2 numbers x,y in reference-image pixels, got '12'",
    ),
    "label_count_mismatch": (
        lambda c, f, r: _reference(c, f, point=["10,10", "20,20"], label=["1"]),
        400,
        "got 1 point labels for 2 reference points",
    ),
    "label_not_a_number": (
        lambda c, f, r: _reference(c, f, point="10,10", label="yes"),
        422,
        "label.0: Input should be a valid integer",
    ),
    "mask_and_prompt": (
        lambda c, f, r: _reference(c, f, {"image": upload(f["reference"]), "mask": upload(f["mask"])}, box="1,1,9,9"),
        400,
        "give the reference object as a mask or as a prompt (box and/or points): not both",
    ),
    "no_mask_no_prompt": (
        lambda c, f, r: _reference(c, f),
        400,
        "give the reference object as a mask or as a prompt (box and/or points): none was given",
    ),
    "mask_size_mismatch": (
        lambda c, f, r: _reference(
            c, f, {"image": upload(f["reference"]), "mask": ("m.png", _png(np.full((10, 10), 255, np.uint8)), "i/png")}
        ),
        400,
        "mask: mask is 10x10 but the reference image is 384x288",
    ),
    "unknown_precision": (
        lambda c, f, r: _reference(c, f, box="1,1,90,90", precision="fp16"),
        400,
        "precision 'fp16' is not in this engines folder; choose one of fp32",
    ),
    "unknown_method": (
        lambda c, f, r: _segment(c, f, r["id"], method="persense++"),
        400,
        "method 'persense++' is not available here; choose one of persense",
    ),
    "box_and_text": (
        lambda c, f, r: _segment(c, f, r["id"], box="1,1,50,50", text="apple"),
        400,
        "give the first exemplar as a box or as a text prompt, not both",
    ),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_one_line_4xx_and_the_server_keeps_serving(case, client, files, box_reference):
    request, status, text = BAD_UPLOADS[case]
    answer = request(client, files, box_reference)
    assert answer.status_code == status, answer.text
    detail = answer.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and text in detail, detail
    assert "persense-serve-" not in detail and "/tmp" not in detail  # no server paths
    assert client.get("/healthz").status_code == 200


def test_every_bad_upload_is_documented():
    """docs/ERRORS.md's persense-serve table lists exactly these cases, in order, with their status codes."""
    section = ERRORS_MD.read_text().split("## persense-serve", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d{3}) \| `([a-z0-9_]+)` \|", section, flags=re.MULTILINE)
    assert [(name, int(code)) for code, name in rows] == [(name, case[1]) for name, case in BAD_UPLOADS.items()]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--engines", "{tmp}/absent"], "engines folder not found"),
        (["--workers", "0"], "--workers must be positive, got 0"),
        (["--cache-dir", "{tmp}/file/cache"], "cannot write to the reference cache folder"),
    ],
)
def test_serve_command_refuses_with_one_line(flags, message, trained_tiny_engines, tmp_path, capsys):
    from persense.runtime.serve.cli import main

    (tmp_path / "file").write_text("a file where a folder is expected")
    argv = ["--engines", str(trained_tiny_engines), *(f.format(tmp=tmp_path) for f in flags)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("persense-serve: error: ") and message in err and err.count("\n") == 1, err
