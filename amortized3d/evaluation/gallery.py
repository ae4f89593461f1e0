"""A static HTML gallery of a run: per prompt a turntable, an interactive 3D viewer of its mesh, and its scores.

    amortized3d gallery RUN_DIR [--prompts P ...] [--limit 12] [--out DIR]
    python -m http.server --directory RUN_DIR/gallery 8000      # then open http://localhost:8000

The assets come from ``generate`` (GLB mesh, MP4 turntable, PNG sheet) into DIR/assets. Scores
come from the run's evaluation reports, where present: eval_clip_<split>/scores.csv (CLIP R@1
and Sim) and eval_<split>.json (the ShapeWorld oracle). The 3D viewer is Google's
<model-viewer> web component, a dependency installed from the npm registry (package.json; `npm ci`
in the checkout). Its self-contained UMD build is copied next to index.html, so the page needs no
network. Browsers do not let pages opened as file:// fetch the GLB files, so serve the folder
over HTTP as above.
"""

from __future__ import annotations

import csv
import html
import json
import os
import shutil
import subprocess
from pathlib import Path

VIEWER_FILE = "model-viewer-umd.min.js"
VIEWER_PACKAGE = Path("node_modules") / "@google" / "model-viewer" / "dist" / VIEWER_FILE


class GalleryError(RuntimeError):
    """A missing piece of the gallery (the model-viewer package), with what to do about it."""


def model_viewer_script() -> Path:
    """$AMORTIZED3D_MODEL_VIEWER, else the checkout's node_modules, else the global npm root."""
    env = os.environ.get("AMORTIZED3D_MODEL_VIEWER")
    if env:
        if not Path(env).is_file():
            raise GalleryError(f"AMORTIZED3D_MODEL_VIEWER={env!r} is not a file; point it at @google/model-viewer's dist/{VIEWER_FILE}")
        return Path(env)
    checkout = Path(__file__).resolve().parents[2] / VIEWER_PACKAGE
    if checkout.is_file():
        return checkout
    try:  # only when the checkout has none: asking npm takes a subprocess
        root = subprocess.run(["npm", "root", "-g"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        root = ""
    if root and (Path(root).parent / VIEWER_PACKAGE).is_file():
        return Path(root).parent / VIEWER_PACKAGE
    raise GalleryError(
        "the gallery's 3D viewer is the npm package @google/model-viewer, which is not installed: run `npm ci` in the "
        f"amortized3d checkout (package.json pins it), or set AMORTIZED3D_MODEL_VIEWER to its dist/{VIEWER_FILE}"
    )


def clip_scores(path: Path) -> dict[str, dict[str, float]]:
    """{prompt: {'CLIP R@1': ..., 'CLIP Sim': ...}} from an evaluation's scores.csv."""
    with open(path, newline="", encoding="utf-8") as f:
        return {row["prompt"]: {"CLIP R@1": float(row["r_at_1"]), "CLIP Sim": float(row["similarity"])} for row in csv.DictReader(f)}


def run_scores(run_dir: Path, extra: list[Path] = ()) -> dict[str, dict[str, float]]:
    """{prompt: {metric: value}} from the run's CLIP and oracle reports (and the CLIP scores.csv files in ``extra``)."""
    scores: dict[str, dict[str, float]] = {}
    for path in [*sorted(run_dir.glob("eval_clip_*/scores.csv")), *extra]:
        for prompt, values in clip_scores(path).items():
            scores.setdefault(prompt, {}).update(values)
    for path in sorted(run_dir.glob("eval_*.json")):
        for row in json.loads(path.read_text()).get("per_prompt", []):
            scores.setdefault(row["prompt"], {}).update({"oracle R@1": row["r_at_1"], "IoU": row["iou"]})
    return scores


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<script src="model-viewer.min.js"></script>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; background: #fafafa; color: #222; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 16px; }}
.card {{ background: #fff; border: 1px solid #ddd; border-radius: 8px; padding: 12px; }}
.card h2 {{ font-size: 15px; margin: 0 0 8px; }}
.media {{ display: grid; grid-template-columns: 1fr 1fr; gap: 8px; }}
model-viewer, video {{ width: 100%; aspect-ratio: 1; background: #eee; border-radius: 4px; }}
table {{ border-collapse: collapse; font-size: 13px; margin-top: 8px; }}
td {{ padding: 2px 10px 2px 0; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{about}</p>
<div class="grid">
{cards}
</div>
</body>
</html>
"""

CARD = """<div class="card">
<h2>{prompt}</h2>
<div class="media">
<video src="{video}" autoplay loop muted playsinline></video>
{viewer}
</div>
<table>{scores}</table>
</div>"""


def build_gallery(run_dir: str | Path, prompts: list[str] | None = None, *, out: str | Path | None = None, limit: int = 12,
                  split: str = "test", mesh_resolution: int = 96, frames: int = 36, image_size: int = 192,
                  score_files: list[Path] = ()) -> Path:
    """Generate the assets of ``prompts`` (default: the first ``limit`` prompts of the run's split) and write
    OUT/index.html (default OUT: RUN_DIR/gallery); score_files: CLIP scores.csv files outside the run folder.
    -> the page's path."""
    from amortized3d.builders import load_run
    from amortized3d.data.corpora import load_corpus
    from amortized3d.inference.generate import generate

    run_dir = Path(run_dir)
    viewer_js = model_viewer_script()
    cfg, _, state = load_run(run_dir)
    if not prompts:
        prompts = load_corpus(cfg.corpus.name, cfg.corpus.dir).split(split)[:limit]
    out = Path(out) if out else run_dir / "gallery"
    results = generate(prompts, run_dir, out / "assets", resolution=mesh_resolution, frames=frames, image_size=image_size)
    shutil.copyfile(viewer_js, out / "model-viewer.min.js")
    scores = run_scores(run_dir, list(score_files))
    cards = []
    for r in results:
        glb = Path(r["mesh_glb"]).relative_to(out).as_posix() if "mesh_glb" in r else None
        viewer = (f'<model-viewer src="{html.escape(glb)}" alt="{html.escape(r["prompt"])}" camera-controls auto-rotate '
                  'shadow-intensity="0.6" exposure="1.1"></model-viewer>') if glb else f'<p>no mesh: {html.escape(r["mesh_error"])}</p>'
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.3f}</td></tr>" for k, v in scores.get(r["prompt"], {}).items())
        cards.append(CARD.format(prompt=html.escape(r["prompt"]), video=html.escape(Path(r["video"]).relative_to(out).as_posix()),
                                 viewer=viewer, scores=rows or "<tr><td>not evaluated</td></tr>"))
    about = (f"{cfg.distill.method.upper()} with the {cfg.generator.kind} generator on {html.escape(str(cfg.corpus.name))}, "
             f"step {state['step']}. Left: turntable; right: the exported mesh (drag to rotate).")
    page = out / "index.html"
    page.write_text(PAGE.format(title=html.escape(f"amortized3d: {run_dir.name}"), about=about, cards="\n".join(cards)), encoding="utf-8")
    return page
