"""Inference time by stage for a trained run, and the turntable speed-up of the baked field.

    python benchmarks/generate.py --checkpoint runs/quickstart [--prompts "a large red cube" ...]
        [--frames 36] [--image-size 128] [--mesh-resolution 128] [--out benchmarks/results/generate.json]

For each prompt: seconds for text + generator + baking the field on the export grid,
marching cubes with vertex colors, the turntable rendered from the baked field (only rays
near the surface), and the same turntable rendered from the network field with every ray
(what the renderer does during training and evaluation). Prints a table, writes JSON.
The ratio column is exact-render time / baked-render time on the same machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from amortized3d.builders import build_text_encoder, load_run
from amortized3d.inference.baked import bake_field, render_baked
from amortized3d.inference.export import extract_mesh
from amortized3d.rendering.cameras import orbit_cameras
from amortized3d.rendering.volume import rays_per_chunk, render_images


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--prompts", nargs="+", default=["a large red cube", "a small purple torus on top of a large cyan octahedron"])
    parser.add_argument("--frames", type=int, default=36)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--mesh-resolution", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/generate.json")
    args = parser.parse_args()
    cfg, generator, _ = load_run(args.checkpoint)
    device = next(generator.parameters()).device
    encoder = build_text_encoder(cfg)
    cameras = orbit_cameras(args.frames, cfg.camera.eval_elevation, cfg.camera.eval_distance, cfg.camera.eval_fovy).to(device)
    render = cfg.render.volume_kwargs()
    bound = cfg.sampling_radius()
    rows = []
    for prompt in args.prompts:
        stamps = [time.perf_counter()]
        text = encoder.encode([prompt]).to(device)
        field = generator(text.pooled, text.tokens)
        baked = bake_field(field, args.mesh_resolution, bound, device=device)
        sync(device)
        stamps.append(time.perf_counter())
        extract_mesh(baked)
        stamps.append(time.perf_counter())
        fast = render_baked(baked, cameras, args.image_size, args.image_size, **render)
        sync(device)
        stamps.append(time.perf_counter())
        exact = render_images(field, cameras.reshape(1, -1), args.image_size, args.image_size,
                              chunk_rays=rays_per_chunk(render["n_proposal"], render["n_importance"]), **render).rgb[0]
        sync(device)
        stamps.append(time.perf_counter())
        bake_s, mesh_s, baked_s, exact_s = (b - a for a, b in zip(stamps, stamps[1:]))
        rows.append({
            "prompt": prompt, "bake_s": round(bake_s, 3), "mesh_s": round(mesh_s, 3), "turntable_baked_s": round(baked_s, 3),
            "turntable_exact_s": round(exact_s, 3), "exact_over_baked": round(exact_s / baked_s, 1),
            "turntable_mean_abs_diff": round(float((fast - exact.clamp(0, 1)).abs().mean()), 5),
        })
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[k]) for k in header))
    result = {"device": str(device), "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
              "frames": args.frames, "image_size": args.image_size, "mesh_resolution": args.mesh_resolution, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
