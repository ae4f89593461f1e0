"""HiFA's techniques on per-prompt ShapeWorld runs, each variant trained and measured on the same prompts:
the z-variance loss, kernel smoothing, and the timestep schedules (sqrt, linear, random).

    python benchmarks/hifa_ablations.py [--prompts "a large red cube" ...] [--variants base zvar ...]
        [--set KEY=VALUE ...] [--out runs/hifa-ablations] [--json benchmarks/results/hifa_ablations.json]

Every run is `amortized3d train --prompt P` with configs/prompt-shapeworld.yaml plus the variant's overrides (and
--set), trained into OUT/<variant>/<prompt>/ (a finished run is reused). Measured for each run:

  iou, similarity, psnr   the ShapeWorld oracle (amortized3d evaluate) at the recipe's eval views
  z_variance              the mean depth variance (HiFA Eq. 7) of the rays with opacity > 0.5, over the eval views
                          (deterministic sampling), in squared scene units
  flicker                 the pixel standard deviation of one eval view rendered FLICKER_DRAWS times with different
                          stratified-sampling draws (the renderer's jitter and importance-sampling bias), averaged over
                          the pixels, in [0, 1] RGB units
  train_s                 training wall-clock seconds (this machine, every core)

The table has one row per variant (means over the prompts) and the JSON every run's values.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from amortized3d.builders import build_text_encoder, load_run
from amortized3d.config import REPO_ROOT, load_config
from amortized3d.evaluation.oracle import evaluate_run
from amortized3d.files import write_text_atomic
from amortized3d.inference.export import safe_output_names
from amortized3d.rendering.cameras import orbit_cameras
from amortized3d.rendering.volume import render_images
from amortized3d.training.checkpoint import latest_checkpoint, step_of
from amortized3d.training.train import train

PROMPTS = ["a large red cube", "a large blue sphere", "a small purple torus on top of a large cyan octahedron"]
HIFA_BOUNDS = ["distill.t_min=[0.02,0.02]", "distill.t_max=[0.98,0.98]"]  # HiFA's fixed [t_min, t_max] for its schedules
ZVAR = "regularizers.z_variance=[[0.0,0.0],[0.5,3.0]]"  # lambda_zvar 3, ramped as HiFA's code: min(1, 2 progress)
VARIANTS = {
    "base": [],
    "zvar": [ZVAR],
    "ks": ["render.importance_kernel=[1,1,1]"],
    "zvar+ks": [ZVAR, "render.importance_kernel=[1,1,1]"],
    "t-random": HIFA_BOUNDS,
    "t-sqrt": [*HIFA_BOUNDS, "distill.t_schedule=sqrt"],
    "t-linear": [*HIFA_BOUNDS, "distill.t_schedule=linear"],
}
FLICKER_DRAWS = 8


@torch.no_grad()
def render_measures(run_dir: Path, prompt: str) -> dict:
    """z_variance and flicker of a trained run (see the module docstring)."""
    cfg, generator, _ = load_run(run_dir)
    text = build_text_encoder(cfg).encode([prompt])
    field = generator(text.pooled, text.tokens)
    R, V = cfg.eval.resolution, cfg.eval.n_views
    cams = orbit_cameras(V, cfg.camera.eval_elevation, cfg.camera.eval_distance, cfg.camera.eval_fovy).reshape(1, V)
    render = render_images(field, cams, R, R, **cfg.render.volume_kwargs())
    solid = render.opacity > 0.5
    z_variance = float(render.z_variance[solid].mean()) if solid.any() else float("nan")
    draws = torch.stack([render_images(field, cams[:, :1], R, R, **cfg.render.volume_kwargs(),
                                       generator=torch.Generator().manual_seed(seed)).rgb[0, 0] for seed in range(FLICKER_DRAWS)])
    return {"z_variance": z_variance, "flicker": float(draws.std(dim=0).mean())}


def run_one(variant: str, overrides: list[str], prompt: str, folder: Path) -> dict:
    cfg = load_config("prompt:" + prompt, str(REPO_ROOT / "configs" / "prompt-shapeworld.yaml"), ["train.wandb=disabled", *overrides])
    timing = folder / "train_seconds.json"
    last = latest_checkpoint(folder)
    if last is None or step_of(last) < cfg.train.steps or not timing.is_file():
        start = time.perf_counter()
        train(cfg, folder, resume=last is not None)
        write_text_atomic(timing, json.dumps({"seconds": time.perf_counter() - start}))
    summary = evaluate_run(folder)["summary"]
    row = {"variant": variant, "prompt": prompt, "iou": summary["iou"], "similarity": summary["similarity"], "psnr": summary["psnr"],
           **render_measures(folder, prompt), "train_s": json.loads(timing.read_text())["seconds"]}
    print(json.dumps(row), flush=True)
    return row


def table(rows: list[dict], variants: list[str]) -> str:
    keys = ("iou", "similarity", "psnr", "z_variance", "flicker", "train_s")
    lines = ["| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        means = [sum(r[k] for r in mine) / len(mine) for k in keys]
        lines.append(f"| {variant} | " + " | ".join(f"{m:.4g}" if k in ("z_variance", "flicker") else f"{m:.3f}" if k != "train_s" else f"{m:.0f}"
                                               for k, m in zip(keys, means)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", nargs="+", default=PROMPTS)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run, e.g. train.steps=500")
    parser.add_argument("--out", default="runs/hifa-ablations")
    parser.add_argument("--json", default="benchmarks/results/hifa_ablations.json")
    args = parser.parse_args(argv)
    out = Path(args.out)
    rows = []
    for variant in args.variants:
        for prompt, name in zip(args.prompts, safe_output_names(args.prompts)):
            rows.append(run_one(variant, [*VARIANTS[variant], *args.set], prompt, out / variant / name))
    result = {"prompts": args.prompts, "variants": {v: VARIANTS[v] for v in args.variants}, "set": args.set,
              "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(), "rows": rows,
              "table": table(rows, args.variants)}
    print(result["table"])
    write_text_atomic(args.json, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
