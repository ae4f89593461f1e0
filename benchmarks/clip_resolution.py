"""Rendering at the CLIP input size vs rendering at 512 and resizing (the reference protocol).

    python benchmarks/clip_resolution.py --checkpoint RUN_DIR [--clip MODEL] [--size 224] [--high 512]
        [--prompts 4] [--image-views 2] [--views 120] [--out benchmarks/results/clip_resolution.json]

On the first --prompts test prompts of RUN_DIR's corpus:

1. The images, for any model: each prompt's --image-views orbit views (the protocol's elevation)
   are rendered once at the CLIP input size S (one ray per pixel; --size, or the --clip model's)
   and once at --high and resized to S, bicubic with antialiasing, as CLIP's preprocessing does
   (about (high/S)^2 rays per pixel). Reported: PSNR between the two, and the share of pixels
   whose largest channel difference is over 8/255. With --clip, also the cosine between the
   two images' CLIP features. On ShapeWorld corpora the same is done for the prompts' exact
   scenes, once with the run's render.inv_std and once with --sharp-inv-std (2000): surfaces
   sharper than a pixel, about the most a render can gain from supersampling.
2. With --clip only (a random network's scores would say nothing): `evaluate_clip` runs twice,
   at the default render size and with --resolution --high, exactly as `amortized3d evaluate`
   does, with --views views per prompt; reported are the R@1 and Sim of each, the mean absolute
   per-prompt Sim difference, and how many prompts' R@1 changed.

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from amortized3d.builders import build_decoding_prior, build_text_encoder, load_run
from amortized3d.data.corpora import load_corpus
from amortized3d.evaluation.clip_eval import DEFAULT_ELEVATION, evaluate_clip
from amortized3d.evaluation.clip_models import load_clip, resize_to_input
from amortized3d.evaluation.gallery import clip_scores
from amortized3d.files import write_text_atomic
from amortized3d.priors.analytic import render_prompt_scenes
from amortized3d.rendering.cameras import orbit_cameras
from amortized3d.rendering.volume import rays_per_chunk
from amortized3d.training.previews import render_validation

DIFFERENT = 8 / 255  # a pixel whose largest channel difference is above this counts as visibly different


def exact_views(cfg, prompt: str, n_views: int, resolution: int, inv_std: float) -> torch.Tensor:
    """The exact ShapeWorld scene of prompt (its first, for an under-specified one) at the protocol's orbit views,
    its surfaces as sharp as inv_std makes them. -> [n_views, 3, R, R]."""
    cams = orbit_cameras(n_views, DEFAULT_ELEVATION, cfg.camera.eval_distance, cfg.camera.eval_fovy).reshape(1, n_views)
    rgb, _ = render_prompt_scenes([prompt], cams, resolution, resolution, **dict(cfg.render.volume_kwargs(), inv_std=inv_std),
                                  chunk_rays=rays_per_chunk(cfg.render.n_proposal, cfg.render.n_importance))
    return rgb[0, 0]


@torch.no_grad()
def compare_images(views, model, size: int, prompts: list[str], high: int) -> dict:
    """PSNR and share of visibly different pixels (and, with a CLIP model, the feature cosine) between the two modes.

    views(prompt, resolution) -> [V, 3, resolution, resolution] in [0, 1].
    """
    psnr, different, cosine = [], [], []
    for prompt in prompts:
        direct, resized = views(prompt, size), resize_to_input(views(prompt, high), size)
        mse = ((direct - resized) ** 2).flatten(1).mean(1).clamp_min(1e-12)
        psnr.append(-10 * torch.log10(mse))
        different.append(((direct - resized).abs().amax(1) > DIFFERENT).flatten(1).float().mean(1))
        if model:
            cosine.append((model.encode_images(direct) * model.encode_images(resized)).sum(-1))
    psnr, different = torch.cat(psnr), torch.cat(different)
    out = {"views": len(psnr), "psnr_mean_db": round(psnr.mean().item(), 2), "psnr_min_db": round(psnr.min().item(), 2),
           "pixels_over_8_255_mean": round(different.mean().item(), 4), "pixels_over_8_255_max": round(different.max().item(), 4)}
    if model:
        cosine = torch.cat(cosine)
        out.update(feature_cosine_mean=round(cosine.mean().item(), 5), feature_cosine_min=round(cosine.min().item(), 5))
    return out


def protocol_scores(checkpoint: str, clip: str, n_prompts: int, n_views: int, resolution: int | None, out: Path) -> tuple[dict, dict]:
    """One `evaluate_clip` run into out (resolution None: the CLIP input size). -> (its numbers, per-prompt scores)."""
    start = time.perf_counter()
    summary = evaluate_clip(checkpoint, clip, n_views=n_views, resolution=resolution, out=out, limit=n_prompts, progress=False)
    return {"render_resolution": summary["render_resolution"], "r_at_1": round(summary["r_at_1"], 4),
            "similarity": round(summary["similarity"], 5), "seconds": round(time.perf_counter() - start, 1)}, clip_scores(out / "scores.csv")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clip", default=None, help="a load_clip spec with real weights (adds feature cosines and the protocol's scores)")
    parser.add_argument("--size", type=int, default=224, help="the CLIP input size, without --clip (224: ViT-L/14, ViT-B/32)")
    parser.add_argument("--high", type=int, default=512, help="the reference's render size")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--image-views", type=int, default=2, help="views per prompt for the image comparison")
    parser.add_argument("--sharp-inv-std", type=float, default=2000.0,
                        help="ShapeWorld: also render the exact scenes with surfaces this sharp (well under a pixel)")
    parser.add_argument("--views", type=int, default=120, help="views per prompt for the protocol's scores (with --clip)")
    parser.add_argument("--out", default="benchmarks/results/clip_resolution.json")
    args = parser.parse_args()
    cfg, generator, _ = load_run(args.checkpoint)
    prompts = load_corpus(cfg.corpus.name, cfg.corpus.dir).test[: args.prompts]
    text_encoder = build_text_encoder(cfg)
    decoder = build_decoding_prior(cfg, text_encoder)  # a render.latents run's renders are decoded by its prior
    model = load_clip(args.clip) if args.clip else None
    size = model.image_size if model else args.size
    inv_std = cfg.render.inv_std
    sources = {f"generator (inv_std {inv_std:g})": lambda p, r: render_validation(
        cfg, generator, text_encoder, [p], "cpu", args.image_views, r, DEFAULT_ELEVATION, decoder)[0]}
    if cfg.corpus.name.startswith("shapeworld"):
        for s in (inv_std, args.sharp_inv_std):
            sources[f"exact scenes (inv_std {s:g})"] = lambda p, r, s=s: exact_views(cfg, p, args.image_views, r, s)
    images = []
    for name, views in sources.items():
        start = time.perf_counter()
        images.append({"rendered": name, **compare_images(views, model, size, prompts, args.high)})
        images[-1]["seconds"] = round(time.perf_counter() - start, 1)
    print(f"images ({len(prompts)} prompts x {args.image_views} views, {size} direct vs {args.high} resized to {size}):")
    print("| rendered | PSNR mean / min | pixels over 8/255, mean / max |" + (" CLIP feature cosine mean / min |" if model else "") + " seconds |")
    for row in images:
        print(f"| {row['rendered']} | {row['psnr_mean_db']} / {row['psnr_min_db']} dB | {row['pixels_over_8_255_mean']:.2%} / "
              f"{row['pixels_over_8_255_max']:.2%} |" + (f" {row['feature_cosine_mean']} / {row['feature_cosine_min']} |" if model else "")
              + f" {row['seconds']} |")
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "checkpoint": args.checkpoint, "clip": args.clip,
              "size": size, "high": args.high, "prompts": prompts, "images": images}
    if args.clip:
        with tempfile.TemporaryDirectory() as work:
            direct, direct_rows = protocol_scores(args.checkpoint, args.clip, len(prompts), args.views, None, Path(work) / "direct")
            resized, resized_rows = protocol_scores(args.checkpoint, args.clip, len(prompts), args.views, args.high, Path(work) / "resized")
        sim_change = sum(abs(direct_rows[p]["CLIP Sim"] - resized_rows[p]["CLIP Sim"]) for p in prompts) / len(prompts)
        changed = sum(direct_rows[p]["CLIP R@1"] != resized_rows[p]["CLIP R@1"] for p in prompts)
        print(f"\nprotocol ({len(prompts)} prompts x {args.views} views, {args.clip}):")
        print("| render | R@1 | Sim | seconds |")
        for row in (direct, resized):
            print(f"| {row['render_resolution']} | {row['r_at_1']} | {row['similarity']} | {row['seconds']} |")
        print(f"mean |Sim difference| per prompt: {sim_change:.5f}; prompts whose R@1 changed: {changed}")
        result["protocol"] = {"direct": direct, "resized": resized, "mean_abs_similarity_difference": round(sim_change, 6),
                              "prompts_with_r_at_1_changed": changed}
    write_text_atomic(args.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
