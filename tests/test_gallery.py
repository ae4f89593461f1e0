"""The HTML gallery: assets, scores and the model-viewer script in place; in headless Chromium (when installed)
the page renders and its 3D viewer draws the mesh. Without the viewer (an optional npm package) the page
falls back to the turntables, links the meshes and says how to turn the 3D view on."""

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

from amortized3d.evaluation import gallery as gallery_module
from amortized3d.evaluation.gallery import GalleryError, ViewerNotInstalled, build_gallery, model_viewer_script
from tests.fixtures import hide_viewer, tiny_config

PROMPTS = ["a large red cube", "a large blue sphere"]
SMALL = {"mesh_resolution": 32, "frames": 4, "image_size": 32}


def links(text: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', text)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from amortized3d.training.train import train

    return train(tiny_config("train.steps=2", "train.ckpt_every=2"), tmp_path_factory.mktemp("gallery") / "run")


@pytest.fixture(scope="module")
def gallery(run):
    try:
        model_viewer_script()
    except GalleryError as err:  # CI installs it (`npm ci`); the fallback page is tested without it below
        pytest.skip(f"needs the 3D viewer: {err}")
    return run, build_gallery(run, PROMPTS, **SMALL)


def test_gallery_page_links_its_assets(gallery):
    run, page = gallery
    text = page.read_text()
    assert text.count('<div class="card">') == 2 and all(p in text for p in PROMPTS)
    assert (page.parent / "model-viewer.min.js").stat().st_size > 100_000
    assert '<script src="model-viewer.min.js"></script>' in text and "npm ci" not in text
    for link in links(text):
        assert (page.parent / link).is_file(), link
    assert text.count("<model-viewer") == 2 and "not evaluated" in text  # this run has no evaluation reports
    assert len(re.findall(r'href="[^"]+\.glb" download', text)) == 2


def test_without_the_viewer_the_page_shows_turntables_links_meshes_and_says_how_to_enable_it(run, tmp_path, monkeypatch, capsys):
    hide_viewer(monkeypatch, tmp_path / "empty")
    with pytest.raises(ViewerNotInstalled, match="npm ci"):
        model_viewer_script()
    page = build_gallery(run, PROMPTS, out=tmp_path / "plain", **SMALL)
    text = page.read_text()
    assert text.count('<div class="card">') == 2 and all(p in text for p in PROMPTS)
    assert "<model-viewer" not in text and "<script" not in text and not (page.parent / "model-viewer.min.js").exists()
    turntables = re.findall(r'<video src="[^"]+"|<img src="[^"]+\.gif"', text)
    sheets = re.findall(r'<img src="[^"]+\.png"', text)
    assert len(turntables) == 2 and len(sheets) == 2
    glbs = re.findall(r'href="([^"]+\.glb)" download', text)
    assert len(glbs) == 2
    for link in links(text):
        assert (page.parent / link).is_file(), link
    notice = re.search(r'<p class="notice">(.*?)</p>', text, re.S).group(1)
    assert "npm ci" in notice and "Node.js 18+" in notice and "AMORTIZED3D_MODEL_VIEWER" in notice
    err = capsys.readouterr().err
    note = [line for line in err.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and "npm ci" in note[0] and str(page) in note[0]


def test_a_viewer_path_naming_a_missing_file_is_an_error_unless_lenient(run, tmp_path, monkeypatch, capsys):
    hide_viewer(monkeypatch, tmp_path / "empty")
    monkeypatch.setenv("AMORTIZED3D_MODEL_VIEWER", str(tmp_path / "missing.js"))
    with pytest.raises(GalleryError, match="AMORTIZED3D_MODEL_VIEWER=.*missing.js.* is not a file") as err:
        build_gallery(run, PROMPTS, out=tmp_path / "strict", **SMALL)  # what `amortized3d gallery` does: stop, say what to fix
    assert not isinstance(err.value, ViewerNotInstalled) and not (tmp_path / "strict").exists()  # nothing generated
    page = build_gallery(run, PROMPTS[:1], out=tmp_path / "lenient", lenient=True, **SMALL)  # evaluate --clip, bench
    text = page.read_text()
    assert "<model-viewer" not in text and "missing.js" in text and "npm ci" in text and text.count("<video") == 1
    assert "missing.js" in capsys.readouterr().err


def test_the_viewer_is_looked_up_in_the_env_var_then_the_checkout_then_the_global_npm_root(tmp_path, monkeypatch):
    hide_viewer(monkeypatch, tmp_path / "checkout")
    script = tmp_path / "global" / "lib" / gallery_module.VIEWER_PACKAGE
    monkeypatch.setattr(gallery_module, "npm_global_root", lambda: tmp_path / "global" / "lib" / "node_modules")
    with pytest.raises(ViewerNotInstalled):
        model_viewer_script()
    script.parent.mkdir(parents=True)
    script.write_text("//")
    assert model_viewer_script() == script
    local = tmp_path / "checkout" / gallery_module.VIEWER_PACKAGE
    local.parent.mkdir(parents=True)
    local.write_text("//")
    assert model_viewer_script() == local
    monkeypatch.setenv("AMORTIZED3D_MODEL_VIEWER", str(script))
    assert model_viewer_script() == script


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
