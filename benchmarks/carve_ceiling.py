"""How well the carve reading of 3D Gaussians can score on ShapeWorld's IoU at best: the exact scene carved.

    python benchmarks/carve_ceiling.py [--config configs/prompt-gaussians.yaml] [--resolutions 32 64]
        [--matrix benchmarks/matrices/shapeworld-prompt-gaussians.yaml] [--json benchmarks/results/carve_ceiling.json]

The oracle's IoU reads 3D Gaussians through the solid their carve views show (amortized3d/generators/gaussians.py:
opacity and expected depth of rings of views, amortized3d.generators.gaussians.carve), while a field's IoU reads its
SDF directly. This script feeds the carve rule the renders of the exact scene instead of the Gaussians' (the ShapeWorld
SDF through the volume renderer: opacity, and the expected ray depth turned into camera depth), at the carve views the
recipe's Gaussians would use, and reports the IoU of that carved solid with the exact scene on the oracle's grid
(eval.iou_resolution cell centers, as amortized3d.evaluation.oracle). That is the IoU a perfect asset would get through
this reading: pixels quantize the silhouettes, and a surface seen only at grazing angles reads too far out (what the
carve views' near-polar rings are for: amortized3d/generators/gaussians.py). The prompts are those of --matrix
(benchmarks/matrices/shapeworld-prompt-gaussians.yaml: the six of the Gaussians-against-field bench).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from amortized3d.files import write_text_atomic


@torch.no_grad()
def exact_carve_iou(prompt: str, config: str, resolution: int | None, overrides: Sequence[str] = ()) -> float:
    """IoU with the exact scene of the exact scene's carved solid (carve views of the recipe and its overrides;
    resolution: theirs or this)."""
    from amortized3d.builders import build_generator
    from amortized3d.config import load_config
    from amortized3d.evaluation.oracle import occupancy_iou
    from amortized3d.fields import grid_points
    from amortized3d.generators.gaussians import carve
    from amortized3d.rendering.cameras import camera_rays
    from amortized3d.rendering.gaussians import camera_matrices
    from amortized3d.rendering.volume import render_images
    from amortized3d.shapeworld import parse_prompt, scene_field

    overrides = [*overrides, *([] if resolution is None else [f"generator.carve_resolution={resolution}"])]
    cfg = load_config("prompt:" + prompt, config, overrides)
    gaussians = build_generator(cfg)(torch.zeros(1, cfg.text.dim))
    cams, R = gaussians.carve_cameras(), gaussians.model.config.carve_resolution
    scene = scene_field(parse_prompt(prompt))
    out = render_images(scene, cams.reshape(1, -1), R, R, scene_radius=cfg.render.scene_radius, n_proposal=64, n_importance=32,
                        inv_std=cfg.render.inv_std)
    _, directions = camera_rays(cams.reshape(1, -1), R, R)  # [1, C, R R, 3]
    viewmats, _ = camera_matrices(cams, R, R)
    forward = torch.einsum("cij,cmj->cmi", viewmats[:, :3, :3], directions[0])[..., 2]  # camera depth per unit of ray
    opacity = out.opacity[0]  # [C, 1, R, R]
    depth = (out.depth[0].flatten(1) / opacity.flatten(1).clamp_min(1e-8) * forward).reshape(opacity.shape)
    points = grid_points(cfg.eval.iou_resolution, cfg.sampling_radius(), cell_centers=True)
    inside = carve(points, cams, opacity, depth, out.rgb[0] * opacity, cfg.generator.bound)[0] < 0
    reference = scene.sdf(points.unsqueeze(0)) < 0  # [1, G]
    return float(occupancy_iou(inside.unsqueeze(0), reference.unsqueeze(0), torch.ones(1, 1, dtype=torch.bool))[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/prompt-gaussians.yaml")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 64], help="carve view sizes in pixels")
    parser.add_argument("--matrix", default="benchmarks/matrices/shapeworld-prompt-gaussians.yaml",
                        help="a bench matrix: its prompts")
    parser.add_argument("--json", default="benchmarks/results/carve_ceiling.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. generator.carve_elevations=[-10,17.5,45]")
    args = parser.parse_args(argv)
    from amortized3d.evaluation.bench import load_matrix

    rows = [{"prompt": p, **{f"iou_at_{r}px": round(exact_carve_iou(p, args.config, r, args.overrides), 4)
                             for r in args.resolutions}} for p in load_matrix(args.matrix)["prompts"]]
    keys = [f"iou_at_{r}px" for r in args.resolutions]
    mean = {k: round(sum(r[k] for r in rows) / len(rows), 4) for k in keys}
    print("| prompt | " + " | ".join(f"exact scene carved, {r} px" for r in args.resolutions) + " |")
    print("|---|" + "---|" * len(keys))
    for row in [*rows, {"prompt": "mean", **mean}]:
        print(f"| {row['prompt']} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    result = {"config": args.config, "overrides": args.overrides, "rows": rows, "mean": mean}
    write_text_atomic(Path(args.json), json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
