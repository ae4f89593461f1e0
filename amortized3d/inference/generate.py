"""Inference: prompts -> generator -> field -> baked grid -> mesh (GLB, PLY), turntable video, contact sheet.

Each prompt's field is evaluated once on the res^3 export grid (``inference.baked``); marching
cubes and the turntable both read that grid, and the turntable only marches the rays that pass
near the surface. Vertex colors are the field's own albedo at the mesh vertices.

A run trained with render.latents renders the prior's latents, not colors. Its turntable is the field's latent renders
decoded by the prior (the evaluation's images); its vertex colors come from an affine map [z, 1] A from latents to
colors, fitted per prompt by weighted least squares to those decoded frames (fit_latent_to_rgb: each frame's pixels
averaged over the latent's cells, weighted by the render's opacity), since a decoder turns whole images, not points,
into colors. For the latent analytic prior the fit is exact: its decoder's cell means are z_RGB / 2.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from amortized3d.builders import build_decoding_prior, build_text_encoder, check_trained_prompts, load_run
from amortized3d.data.corpora import check_prompts
from amortized3d.inference.baked import bake_representation, render_baked
from amortized3d.inference.export import (contact_sheet, extract_mesh, safe_output_names, save_mesh, save_splats_ply, to_uint8,
                                         write_video)
from amortized3d.rendering.cameras import Cameras, orbit_cameras
from amortized3d.training.previews import render_views

BACKGROUND_FIT_WEIGHT = 0.01  # weight of a background pixel in fit_latent_to_rgb (an opaque pixel's is 1 + this)


def fit_latent_to_rgb(latents: torch.Tensor, images: torch.Tensor, opacity: torch.Tensor) -> torch.Tensor:
    """The affine map A [C + 1, 3] minimizing sum_pixels w (|[z, 1] A - x|^2), x the images averaged over each latent
    cell (area interpolation), w = opacity + BACKGROUND_FIT_WEIGHT (the object's pixels count most).
    latents [N, C, h, w], images [N, 3, H, W], opacity [N, 1, h, w] -> A, float32."""
    N, C, h, w = latents.shape
    target = F.interpolate(images.double(), size=(h, w), mode="area").permute(0, 2, 3, 1).reshape(-1, 3)
    X = torch.cat([latents.double(), torch.ones_like(latents[:, :1]).double()], 1).permute(0, 2, 3, 1).reshape(-1, C + 1)
    root_w = (opacity.double().reshape(-1, 1) + BACKGROUND_FIT_WEIGHT).sqrt()
    return torch.linalg.lstsq(X * root_w, target * root_w).solution.float()


class LatentColorsToRGB:
    """A one-prompt representation of a render.latents run whose latent colors and background read as RGB through the
    affine map A [C + 1, 3] of fit_latent_to_rgb: rgb = clamp([z, 1] A, 0, 1). What generate bakes and meshes."""

    def __init__(self, representation, A: torch.Tensor):
        self.representation, self.A = representation, A
        self.geometry = representation.geometry
        if self.geometry == "density":
            self.iso_density = representation.iso_density

    def _rgb(self, z: torch.Tensor) -> torch.Tensor:
        """latents [..., C] -> rgb [..., 3] in [0, 1]."""
        return (torch.cat([z, torch.ones_like(z[..., :1])], -1) @ self.A.to(z)).clamp(0.0, 1.0)

    def sdf(self, points):
        return self.representation.sdf(points)

    def density(self, points):
        return self.representation.density(points)

    def sdf_and_color(self, points):
        sdf, z = self.representation.sdf_and_color(points)
        return sdf, self._rgb(z)

    def density_and_color(self, points):
        sigma, z = self.representation.density_and_color(points)
        return sigma, self._rgb(z)

    def background(self, directions):
        return self._rgb(self.representation.background(directions))


@torch.no_grad()
def decoded_turntable(cfg, prior, representation, turntable: Cameras, image_size: int) -> tuple[torch.Tensor, LatentColorsToRGB]:
    """The turntable of a render.latents run's one-prompt representation: latent renders at the prior's latent size,
    decoded -> (rgb [frames, 3, S, S] in [0, 1], the representation with colors mapped to RGB by the map fitted to
    those frames)."""
    rgb, out = render_views(cfg, representation, turntable.reshape(1, -1), image_size, prior)
    latents, opacity = out.rgb[0], out.opacity[0]  # [frames, C, h, w], [frames, 1, h, w]
    return rgb[0], LatentColorsToRGB(representation, fit_latent_to_rgb(latents, rgb[0], opacity))


@torch.no_grad()
def generate(prompts: list[str], run_dir: str | Path, out: str | Path = "outputs", *, resolution: int = 128,
             video_format: str = "mp4", frames: int = 36, image_size: int = 128, contact_views: int = 8,
             seed: int | None = None) -> list[dict]:
    """For each prompt write NAME.glb, NAME.ply, NAME.mp4 (or .gif) and NAME.png into ``out`` (3D Gaussians: also
    NAME_splats.ply, the Gaussians in 3DGS's layout, and the turntable is rasterized from them).

    ``seed`` draws the latent z of generators that take one (3D-conv): the same prompt with
    another seed gives another shape; without a seed the generator's fixed default latent is used.
    A render.latents run loads its prior to decode the turntable (module docstring).

    -> one dict per prompt with the written paths and the seconds it took.
    """
    prompts = check_prompts(prompts, example='generate "a red cube" --checkpoint RUN_DIR')
    cfg, generator, _ = load_run(run_dir)
    check_trained_prompts(cfg, prompts, run_dir)
    text_encoder = build_text_encoder(cfg)
    prior = build_decoding_prior(cfg, text_encoder)  # None unless the run renders latents
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
        if prior is not None:  # latent renders: the decoder's turntable, and colors through the map fitted to it
            rgb, representation = decoded_turntable(cfg, prior, representation, turntable, image_size)
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
        elif prior is None:
            rgb = render_baked(baked, turntable, image_size, image_size, **cfg.render.volume_kwargs())  # [frames, 3, H, W]
        video = write_video(to_uint8(rgb), out / f"{name}.{video_format}", fps=12)
        step = max(1, frames // contact_views)
        sheet = contact_sheet(to_uint8(rgb[::step][:contact_views]), out / f"{name}.png", ncols=min(contact_views, 4))
        result.update(video=str(video), contact_sheet=str(sheet), seconds=round(time.perf_counter() - start, 2))
        results.append(result)
    return results
