"""The HTML gallery: assets, scores and the model-viewer script in place; in headless Chromium (when installed)
the page renders and its 3D viewer draws the mesh."""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import subprocess
import threading

import numpy as np
import pytest
from PIL import Image

from amortized3d.evaluation.gallery import GalleryError, build_gallery, model_viewer_script

PROMPTS = ["a large red cube", "a large blue sphere"]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    try:
        model_viewer_script()
    except GalleryError as err:
        pytest.fail(f"{err}")  # `npm ci` is part of the install: a missing viewer is a failure, not a skip
    from amortized3d.training.train import train
    from tests.test_training import tiny_config

    root = tmp_path_factory.mktemp("gallery")
    run = train(tiny_config("train.steps=2", "train.ckpt_every=2"), root / "run")
    page = build_gallery(run, PROMPTS, mesh_resolution=32, frames=4, image_size=32)
    return run, page


def test_gallery_page_links_its_assets(gallery):
    run, page = gallery
    text = page.read_text()
    assert text.count('<div class="card">') == 2 and all(p in text for p in PROMPTS)
    assert (page.parent / "model-viewer.min.js").stat().st_size > 100_000
    for link in re.findall(r'(?:src)="([^"]+)"', text):
        assert (page.parent / link).is_file(), link
    assert text.count("<model-viewer") == 2 and "not evaluated" in text  # this run has no evaluation reports


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def screenshot(folder, page_name: str, out) -> np.ndarray:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                        "--hide-scrollbars", "--window-size=1000,700", "--virtual-time-budget=15000", f"--screenshot={out}",
                        f"http://127.0.0.1:{server.server_port}/{page_name}"], capture_output=True, timeout=120, check=True)
    finally:
        server.shutdown()
    return np.asarray(Image.open(out).convert("RGB")).astype(int)


@pytest.mark.skipif(chromium() is None, reason="headless Chromium is not installed (apt-get install chromium)")
def test_gallery_renders_in_headless_chromium_and_its_viewer_shows_the_mesh(gallery, tmp_path):
    _, page = gallery
    text = re.sub(r"<video[^>]*></video>", "<div></div>", page.read_text())  # videos play on their own clock: leave them out
    (page.parent / "still.html").write_text(text)
    (page.parent / "empty.html").write_text(re.sub(r'<model-viewer src="[^"]*"', '<model-viewer src=""', text))
    with_mesh = screenshot(page.parent, "still.html", tmp_path / "with.png")
    without = screenshot(page.parent, "empty.html", tmp_path / "without.png")
    assert with_mesh.shape == (700, 1000, 3)
    assert (with_mesh.std(axis=(0, 1)) > 5).all()  # a page, not a blank or error screen
    changed = np.abs(with_mesh - without).sum(-1) > 30
    assert changed.sum() > 2000, changed.sum()  # the viewers drew the meshes where the empty ones show only their background
