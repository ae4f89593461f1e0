"""Inference time by stage, for a trained run or a recipe's generator at its real size, and the turntable speed-up of the
baked field.

    python benchmarks/generate.py --checkpoint runs/quickstart [--prompts "a large red cube" ...]
        [--frames 36] [--image-size 128] [--mesh-resolution 128] [--device cuda|cpu] [--skip-exact]
        [--out benchmarks/results/generate.json]
    python benchmarks/generate.py --recipe cp100k [--set KEY=VALUE ...] ...

For each prompt, after an untimed warm-up prompt: seconds for the text encoding, the generator, baking the field on
the export grid, marching cubes with vertex colors (text to mesh: the sum of these four), the turntable rendered
from the baked field (only rays near the surface), and the same turntable rendered from the network field with every
ray (what the renderer does during training and evaluation; --skip-exact leaves it out). The ratio column is
exact-render time / baked-render time on the same device.

--recipe builds the recipe's generator with random weights (and, for the Stable Diffusion recipes, the prior's text
encoder as random:stable-diffusion-2-1-base): the generator's and the field's cost are the real ones, but the
surface is arbitrary, so the mesh and near-surface rendering times only show the order of magnitude.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from amortized3d.builders import build_generator, build_text_encoder, load_run
from amortized3d.config import load_config
from amortized3d.files import write_text_atomic
from amortized3d.inference.baked import bake_representation, render_baked
from amortized3d.inference.export import extract_mesh
from amortized3d.priors.pretrained import RANDOM_MODELS, RandomWeightsWarning
from amortized3d.rendering.cameras import orbit_cameras
from amortized3d.rendering.volume import rays_per_chunk, render_images
from recipe_step import device_name, sync  # benchmarks/, beside this script



def check_rgb_colors(cfg) -> None:
    """This benchmark times the RGB path (bake, mesh, baked turntable); a render.latents field's colors are latents."""
    if cfg.render.latents:
        raise SystemExit("benchmarks/generate.py times generate's RGB path (baked turntable, mesh colors from the field); with "
                         "render.latents=true generate renders and decodes the latents instead: time that with `generate` itself")


def build(args, device):
    """-> (config, generator in eval mode on device, text encoder) from --checkpoint or --recipe."""
    if args.checkpoint:
        cfg, generator, _ = load_run(args.checkpoint, device)
        check_rgb_colors(cfg)
        return cfg, generator, build_text_encoder(cfg, device)
    cfg = load_config(args.recipe, overrides=["train.wandb=disabled", *args.overrides])
    check_rgb_colors(cfg)
    if cfg.text.encoder == "prior" and cfg.prior.kind in RANDOM_MODELS and not any(o.startswith("prior.model=") for o in args.overrides):
        cfg.prior.model = RANDOM_MODELS[cfg.prior.kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)  # said once, below
        encoder = build_text_encoder(cfg, device)
    cfg.text.dim = encoder.dim
    torch.manual_seed(0)
    print(f"{args.recipe}: {cfg.generator.kind} with random weights; the surface is arbitrary, so mesh and near-surface rendering "
          "times only show their order of magnitude")
    return cfg, build_generator(cfg).to(device).eval(), encoder


def time_prompt(prompt, cfg, generator, encoder, cameras, args, device) -> dict:
    render = cfg.render.volume_kwargs()
    stamps = [time.perf_counter()]

    def stamp():
        sync(device)
        stamps.append(time.perf_counter())

    text = encoder.encode([prompt]).to(device)
    stamp()
    field = generator(text.pooled, text.tokens)
    stamp()
    baked = bake_representation(field, args.mesh_resolution, cfg.sampling_radius(), device=device)
    stamp()
    extract_mesh(baked)
    stamp()
    fast = render_baked(baked, cameras, args.image_size, args.image_size, **render)
    stamp()
    seconds = [b - a for a, b in zip(stamps, stamps[1:])]
    row = {"prompt": prompt, **{f"{k}_s": round(v, 3) for k, v in zip(("text", "generator", "bake", "mesh", "turntable_baked"), seconds)},
           "to_mesh_s": round(sum(seconds[:4]), 3)}
    if not args.skip_exact:
        exact = render_images(field, cameras.reshape(1, -1), args.image_size, args.image_size, geometry=field.geometry,
                              chunk_rays=rays_per_chunk(render["n_proposal"], render["n_importance"]), **render).rgb[0]
        stamp()
        row.update(turntable_exact_s=round(stamps[-1] - stamps[-2], 3),
                   exact_over_baked=round((stamps[-1] - stamps[-2]) / seconds[4], 1),
                   turntable_mean_abs_diff=round(float((fast - exact.clamp(0, 1)).abs().mean()), 5))
    return row


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a trained run folder")
    source.add_argument("--recipe", help="a recipe (corpus name or config file): its generator at real size, random weights")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override (--recipe)")
    parser.add_argument("--prompts", nargs="+", default=["a large red cube", "a small purple torus on top of a large cyan octahedron"])
    parser.add_argument("--frames", type=int, default=36)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--mesh-resolution", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-exact", action="store_true", help="leave out the turntable rendered from the network field")
    parser.add_argument("--out", default="benchmarks/results/generate.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cfg, generator, encoder = build(args, device)
    cameras = orbit_cameras(args.frames, cfg.camera.eval_elevation, cfg.camera.eval_distance, cfg.camera.eval_fovy).to(device)
    # warm-up on a prompt of its own (text encoders cache their encodings): kernels, allocator
    time_prompt("a warm-up prompt", cfg, generator, encoder, cameras, args, device)
    rows = [time_prompt(prompt, cfg, generator, encoder, cameras, args, device) for prompt in args.prompts]
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[k]) for k in header))
    result = {"source": args.checkpoint or args.recipe, "generator": cfg.generator.kind,
              "generator_parameters": sum(p.numel() for p in generator.parameters()),
              "device": device_name(device), "torch_threads": torch.get_num_threads(), "frames": args.frames, "image_size": args.image_size,
              "mesh_resolution": args.mesh_resolution, "rows": rows}
    write_text_atomic(args.out, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
