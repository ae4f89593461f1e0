"""Inference: prompts -> generator -> field -> baked grid -> mesh (GLB, PLY), turntable video, contact sheet.

Each prompt's field is evaluated once on the res^3 export grid (``inference.baked``); marching
cubes and the turntable both read that grid, and the turntable only marches the rays that pass
near the surface. Vertex colors are the field's own albedo at the mesh vertices.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from amortized3d.builders import build_text_encoder, check_rgb_run, check_trained_prompts, load_run
from amortized3d.data.corpora import check_prompts
from amortized3d.inference.baked import bake_representation, render_baked
from amortized3d.inference.export import (contact_sheet, extract_mesh, safe_output_names, save_mesh, save_splats_ply, to_uint8,
                                         write_video)
from amortized3d.rendering.cameras import orbit_cameras


@torch.no_grad()
def generate(prompts: list[str], run_dir: str | Path, out: str | Path = "outputs", *, resolution: int = 128,
             video_format: str = "mp4", frames: int = 36, image_size: int = 128, contact_views: int = 8,
             seed: int | None = None) -> list[dict]:
    """For each prompt write NAME.glb, NAME.ply, NAME.mp4 (or .gif) and NAME.png into ``out`` (3D Gaussians: also
    NAME_splats.ply, the Gaussians in 3DGS's layout, and the turntable is rasterized from them).

    ``seed`` draws the latent z of generators that take one (3D-conv): the same prompt with
    another seed gives another shape; without a seed the generator's fixed default latent is used.

    -> one dict per prompt with the written paths and the seconds it took.
    """
    prompts = check_prompts(prompts, example='generate "a red cube" --checkpoint RUN_DIR')
    cfg, generator, _ = load_run(run_dir)
    check_rgb_run(cfg, run_dir, "generate's colored meshes and turntables")
    check_trained_prompts(cfg, prompts, run_dir)
    text_encoder = build_text_encoder(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = safe_output_names(prompts)
    bound = cfg.sampling_radius()
    turntable = orbit_cameras(frames, cfg.camera.eval_elevation, cfg.camera.eval_distance, cfg.camera.eval_fovy)
    results = []
    for prompt, name in zip(prompts, names):
        start = time.perf_counter()
        text = text_encoder.encode([prompt])
        z_dim = generator.z_dim
        z = torch.randn(1, z_dim, generator=torch.Generator().manual_seed(seed)) if z_dim and seed is not None else None
        representation = generator(text.pooled, text.tokens, z=z)
        baked = bake_representation(representation, resolution, bound)
        result = {"prompt": prompt}
        try:
            mesh = extract_mesh(baked)
            glb, ply = save_mesh(mesh, out / name)
            result.update(mesh_glb=str(glb), mesh_ply=str(ply), vertices=len(mesh.vertices), faces=len(mesh.faces))
        except ValueError as err:
            result.update(mesh_error=str(err))
        if cfg.generator.kind == "gaussians":  # the splats themselves, as a splat viewer shows them, and their .ply
            result["splats_ply"] = str(save_splats_ply(generator.export_splats(), out / f"{name}_splats.ply"))
            rgb = representation.render(turntable.reshape(1, frames), image_size, image_size).rgb[0].clamp(0, 1)
        else:
            rgb = render_baked(baked, turntable, image_size, image_size, **cfg.render.volume_kwargs())  # [frames, 3, H, W]
        video = write_video(to_uint8(rgb), out / f"{name}.{video_format}", fps=12)
        step = max(1, frames // contact_views)
        sheet = contact_sheet(to_uint8(rgb[::step][:contact_views]), out / f"{name}.png", ncols=min(contact_views, 4))
        result.update(video=str(video), contact_sheet=str(sheet), seconds=round(time.perf_counter() - start, 2))
        results.append(result)
    return results
