"""A static HTML gallery of a run: per prompt a turntable, an interactive 3D viewer of its mesh, and its scores.

    amortized3d gallery RUN_DIR [--prompts P ...] [--limit 12] [--out DIR]
    python -m http.server --directory RUN_DIR/gallery 8000      # then open http://localhost:8000

The assets come from ``generate`` (GLB mesh, MP4 turntable, PNG sheet) into DIR/assets. Scores
come from the run's evaluation reports, where present: eval_clip_<split>/scores.csv (CLIP R@1
and Sim) and eval_<split>.json (the ShapeWorld oracle). The 3D viewer is Google's
<model-viewer> web component, an optional dependency installed from the npm registry
(package.json; `npm ci` in the checkout, Node.js 18+). Its self-contained UMD build is copied next
to index.html, so the page needs no network. Browsers do not let pages opened as file:// fetch the
GLB files, so serve the folder over HTTP as above.

Where the viewer is not installed, the gallery is still written: each card shows the turntable
(MP4, or GIF without ffmpeg) and the contact sheet instead of the 3D view, every mesh is still
exported and linked for download (GLB), the page says at its top how to turn the 3D view on, and a
one-line note on stderr says the same. So a missing viewer never fails `amortized3d gallery`,
`amortized3d evaluate --clip` (its default --gallery 12) or a bench with ``gallery: N``.

The one error left is a user's explicit setting gone wrong: $AMORTIZED3D_MODEL_VIEWER naming a
file that does not exist. ``build_gallery`` raises GalleryError for it by default (what
`amortized3d gallery` gets: the gallery is what was asked for, so it stops before generating
anything and says what to fix); with ``lenient=True`` (what `evaluate --clip` and `bench` pass:
there the gallery is a by-product of hours of work) it writes the page without the 3D view and
notes the bad setting on stderr instead.

The viewer is looked up in this order (model_viewer_script): $AMORTIZED3D_MODEL_VIEWER, the
checkout's node_modules (CHECKOUT), the global npm root (npm_global_root, asked only when the
checkout has none). Tests point CHECKOUT and npm_global_root elsewhere to hide an installed viewer.
"""

from __future__ import annotations

import csv
import html
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from amortized3d.run_dir import RunDir

VIEWER_ENV = "AMORTIZED3D_MODEL_VIEWER"
VIEWER_FILE = "model-viewer-umd.min.js"
VIEWER_PACKAGE = Path("node_modules") / "@google" / "model-viewer" / "dist" / VIEWER_FILE
CHECKOUT = Path(__file__).resolve().parents[2]  # the source checkout (package.json) in an editable install


class GalleryError(RuntimeError):
    """A missing piece of the gallery (the model-viewer package), with what to do about it."""


class ViewerNotInstalled(GalleryError):
    """@google/model-viewer is found nowhere (and $AMORTIZED3D_MODEL_VIEWER is not set): the gallery goes without the 3D view."""


def how_to_enable() -> str:
    where = f" ({CHECKOUT})" if (CHECKOUT / "package.json").is_file() else ""
    return (f"run `npm ci` in the amortized3d checkout{where} (Node.js 18+), "
            f"or set {VIEWER_ENV} to @google/model-viewer's dist/{VIEWER_FILE}")


def npm_global_root() -> Path | None:
    """`npm root -g` (the global node_modules folder), or None without a working npm."""
    try:
        root = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return Path(root) if root else None


def model_viewer_script() -> Path:
    """$AMORTIZED3D_MODEL_VIEWER, else the checkout's node_modules, else the global npm root.

    Raises GalleryError when $AMORTIZED3D_MODEL_VIEWER is set but not a file, and ViewerNotInstalled
    (a GalleryError) when the package is found nowhere."""
    env = os.environ.get(VIEWER_ENV)
    if env:
        if not Path(env).is_file():
            raise GalleryError(f"{VIEWER_ENV}={env!r} is not a file; point it at @google/model-viewer's dist/{VIEWER_FILE} "
                               f"(or unset it to use the checkout's node_modules)")
        return Path(env)
    checkout = CHECKOUT / VIEWER_PACKAGE
    if checkout.is_file():
        return checkout
    root = npm_global_root()  # only when the checkout has none: asking npm takes a subprocess
    if root and (root.parent / VIEWER_PACKAGE).is_file():
        return root.parent / VIEWER_PACKAGE
    raise ViewerNotInstalled(f"the gallery's 3D viewer, the npm package @google/model-viewer, is not installed: {how_to_enable()}")


def clip_scores(path: Path) -> dict[str, dict[str, float]]:
    """{prompt: {'CLIP R@1': ..., 'CLIP Sim': ...}} from an evaluation's scores.csv."""
    with open(path, newline="", encoding="utf-8") as f:
        return {row["prompt"]: {"CLIP R@1": float(row["r_at_1"]), "CLIP Sim": float(row["similarity"])} for row in csv.DictReader(f)}


def run_scores(run_dir: Path, extra: list[Path] = ()) -> dict[str, dict[str, float]]:
    """{prompt: {metric: value}} from the run's CLIP and oracle reports (and the CLIP scores.csv files in ``extra``)."""
    scores: dict[str, dict[str, float]] = {}
    run = RunDir(run_dir)
    clip_files = [folder / "scores.csv" for _, folder in run.clip_evals() if (folder / "scores.csv").is_file()]
    for path in [*clip_files, *extra]:
        for prompt, values in clip_scores(path).items():
            scores.setdefault(prompt, {}).update(values)
    for _, path in run.oracle_reports():
        for row in json.loads(path.read_text()).get("per_prompt", []):
            scores.setdefault(row["prompt"], {}).update({"oracle R@1": row["r_at_1"], "IoU": row["iou"]})
    return scores


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
{script}<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; background: #fafafa; color: #222; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 16px; }}
.card {{ background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 12px; }}
.card h2 {{ font-size: 15px; margin: 0 0 8px; }}
.media {{ display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }}
model-viewer, video, .media img {{ width: 100%; aspect-ratio: 1; object-fit: contain; background: #eee; border-radius: 4px; }}
.notice {{ background: #fff4d6; border: 1px solid #e3c26b; border-radius: 6px; padding: 8px 12px; }}
.files {{ font-size: 13px; margin: 8px 0 0; }}
table {{ border-collapse: collapse; font-size: 13px; margin-top: 8px; }}
td {{ padding: 2px 10px 2px 0; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{about}</p>
{notice}<div class="grid">
{cards}
</div>
</body>
</html>
"""

CARD = """<div class="card">
<h2>{prompt}</h2>
<div class="media">
{turntable}
{right}
</div>
<p class="files">{files}</p>
<table>{scores}</table>
</div>"""


def _turntable(r: dict, out: Path) -> str:
    """The turntable: a looping <video> (MP4), or an <img> where generate fell back to a GIF (no ffmpeg)."""
    src = html.escape(Path(r["video"]).relative_to(out).as_posix())
    if src.lower().endswith(".gif"):
        return f'<img src="{src}" alt="turntable of {html.escape(r["prompt"])}">'
    return f'<video src="{src}" autoplay loop muted playsinline></video>'


def _card(r: dict, out: Path, scores: dict[str, float], viewer: bool) -> str:
    prompt = html.escape(r["prompt"])
    glb = html.escape(Path(r["mesh_glb"]).relative_to(out).as_posix()) if "mesh_glb" in r else None
    if glb and viewer:
        right = (f'<model-viewer src="{glb}" alt="{prompt}" camera-controls auto-rotate '
                 'shadow-intensity="0.6" exposure="1.1"></model-viewer>')
    else:  # no 3D view (or no mesh to show in it): the contact sheet of the turntable's views
        right = f'<img src="{html.escape(Path(r["contact_sheet"]).relative_to(out).as_posix())}" alt="views of {prompt}">'
    files = f'<a href="{glb}" download>mesh (GLB)</a>' if glb else f'no mesh: {html.escape(r["mesh_error"])}'
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in scores.items())
    return CARD.format(prompt=prompt, turntable=_turntable(r, out), right=right, files=files,
                       scores=rows or "<tr><td>not evaluated</td></tr>")


def build_gallery(run_dir: str | Path, prompts: list[str] | None = None, *, out: str | Path | None = None, limit: int = 12,
                  split: str = "test", mesh_resolution: int = 96, frames: int = 36, image_size: int = 192,
                  score_files: list[Path] = (), lenient: bool = False) -> Path:
    """Generate the assets of ``prompts`` (default: the first ``limit`` prompts of the run's split) and write
    OUT/index.html (default OUT: RUN_DIR/gallery); score_files: CLIP scores.csv files outside the run folder.

    Without the model-viewer package the page has no 3D view (module docstring) and a note goes to
    stderr. lenient: also so when $AMORTIZED3D_MODEL_VIEWER names a missing file, which otherwise
    raises GalleryError before anything is generated. -> the page's path."""
    from amortized3d.builders import load_run
    from amortized3d.data.corpora import load_corpus
    from amortized3d.inference.generate import generate

    run_dir = Path(run_dir)
    try:
        viewer_js, why_not = model_viewer_script(), None
    except ViewerNotInstalled:
        viewer_js, why_not = None, "the npm package @google/model-viewer is not installed"
    except GalleryError:  # $AMORTIZED3D_MODEL_VIEWER names a missing file
        if not lenient:
            raise
        viewer_js, why_not = None, f"{VIEWER_ENV}={os.environ.get(VIEWER_ENV)!r} is not a file"
    cfg, _, state = load_run(run_dir)
    if not prompts:
        prompts = load_corpus(cfg.corpus.name, cfg.corpus.dir).split(split)[:limit]
    out = Path(out) if out else RunDir(run_dir).gallery
    results = generate(prompts, run_dir, out / "assets", resolution=mesh_resolution, frames=frames, image_size=image_size)
    if viewer_js:
        shutil.copyfile(viewer_js, out / "model-viewer.min.js")
        script, notice = '<script src="model-viewer.min.js"></script>\n', ""
        layout = "Left: turntable; right: the exported mesh (drag to rotate)."
    else:
        script = ""
        notice = (f'<p class="notice"><b>The interactive 3D view is off</b>: {html.escape(why_not)}. To enable it, '
                  f"{html.escape(how_to_enable())}, then build this gallery again. The meshes are linked below each card "
                  "for download (GLB).</p>\n")
        layout = "Left: turntable; right: its views; below: the exported mesh (GLB)."
    scores = run_scores(run_dir, list(score_files))
    cards = [_card(r, out, scores.get(r["prompt"], {}), viewer_js is not None) for r in results]
    about = (f"{cfg.distill.method.upper()} with the {cfg.generator.kind} generator on {html.escape(str(cfg.corpus.name))}, "
             f"step {state['step']}. {layout}")
    page = out / "index.html"
    page.write_text(PAGE.format(title=html.escape(f"amortized3d: {run_dir.name}"), script=script, about=about, notice=notice,
                                cards="\n".join(cards)), encoding="utf-8")
    if not viewer_js:
        print(f"note: {page} has no interactive 3D view ({why_not}); to enable it, {how_to_enable()}", file=sys.stderr)
    return page
