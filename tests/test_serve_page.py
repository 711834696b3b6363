"""The web page of persense-serve in a real headless Chromium (Debian's, driven by Playwright), as a person uses it:
upload the reference, click the object, upload a target, run; the page shows what the REST API answers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright

from prompt_scenes import scene_files
from serve_process import serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# where the README's screenshot is written when this variable names a file (docs/serve_page.png)
SCREENSHOT_ENV = "PERSENSE_PAGE_SCREENSHOT"
TIMEOUT_MS = 120_000  # one segmentation on two busy cores

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium)")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    return scene_files(tmp_path_factory.mktemp("page_scene"))


@pytest.fixture(scope="module")
def server(trained_tiny_engines, tmp_path_factory):
    root = tmp_path_factory.mktemp("page_server")
    with serve(trained_tiny_engines, root / "cache", root / "server.log", "-q") as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


def rest_answer(server, files: dict, click: tuple[int, int]) -> tuple[str, dict]:
    """The REST API's reference id for a click and its segmentation of the target."""
    with server.client() as http:
        image = {"image": ("reference.png", files["reference"].read_bytes(), "image/png")}
        reference = http.post("/v1/references", files=image, data={"point": f"{click[0]},{click[1]}", "label": "1"})
        target = {"image": ("target.png", files["target"].read_bytes(), "image/png")}
        answer = http.post("/v1/segment", files=target, data={"reference": reference.json()["id"]})
    return reference.json()["id"], answer.json()


def test_page_click_then_segment_shows_the_rest_count(server, browser, files, tmp_path):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server.url)
    page.wait_for_selector("#precision option", state="attached")
    assert page.locator("#method option").all_inner_texts() == ["persense"]
    page.set_input_files("#ref-file", str(files["reference"]))
    page.wait_for_function("document.getElementById('ref-canvas').width === 384")
    x, y = files["click"]
    canvas = page.locator("#ref-canvas").bounding_box()
    page.mouse.click(canvas["x"] + (x + 0.5) * canvas["width"] / 384, canvas["y"] + (y + 0.5) * canvas["height"] / 288)
    page.wait_for_selector("#ref-status[data-reference-id]", state="attached")
    page_reference = page.get_attribute("#ref-status", "data-reference-id")
    page.set_input_files("#targets-file", str(files["target"]))
    page.click("#run")
    page.wait_for_selector("#run-status[data-done]", state="attached")
    shown = int(page.get_attribute(".result", "data-count"))
    label = page.inner_text(".result .count")
    timings = page.locator(".result .timings tbody tr").count()
    reference_id, answer = rest_answer(server, files, (x, y))
    assert page_reference == reference_id  # the page sent the clicked pixel, as the REST call does
    assert shown == answer["count"] >= 1
    assert label == f"{answer['count']} instance{'s' if answer['count'] != 1 else ''}"
    assert timings == len(answer["timings_ms"])
    assert page.get_attribute(".result a.labels", "href").startswith("data:image/png;base64,")
    assert page.locator(".status.error").count() == 0
    shot = tmp_path / "page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV):
        save_small(shot, Path(os.environ[SCREENSHOT_ENV]))


def save_small(shot: Path, path: Path) -> None:
    """The screenshot as the README shows it: cropped below the first result, 128 colours (about 130 kB)."""
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    image = image.crop((0, 0, image.width, min(image.height, 870)))
    image.quantize(128, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
