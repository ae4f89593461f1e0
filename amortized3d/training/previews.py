"""Orbit renders of a trained generator at the evaluation camera: the validation views a run writes as it trains,
and the renders the evaluations score (amortized3d.evaluation imports them from here)."""

from __future__ import annotations

import torch

from amortized3d.config import ExperimentConfig
from amortized3d.rendering.cameras import orbit_cameras
from amortized3d.rendering.volume import ImageRender, rays_per_chunk
from amortized3d.run_dir import RunDir


DECODE_CHUNK = 8  # latent renders decoded per call of the prior's decoder (a VAE's activations: hundreds of MB per 512^2 image)


@torch.no_grad()
def render_views(cfg: ExperimentConfig, representation, cameras, resolution: int, prior=None) -> tuple[torch.Tensor, ImageRender]:
    """Images of a representation's P prompts from cameras [P, V], R x R pixels (R = resolution) -> (rgb [P, V, 3, R, R]
    in [0, 1], the ImageRender they come from). With render.latents the field renders the prior's latents, at the
    prior's latent size for R x R images, and ``prior`` (required then) decodes them DECODE_CHUNK at a time, resized
    to R x R (antialiased) where the decoder's size differs."""
    R = resolution
    if cfg.render.latents and prior is None:
        raise ValueError("this run renders the prior's latents (render.latents=true): pass its prior (builders.build_prior) "
                         "to decode them into images")
    height, width = prior.space_shape(R, R)[1:] if cfg.render.latents else (R, R)
    out = representation.render(cameras, height, width, cfg.render, chunk_rays=rays_per_chunk(cfg.render.n_proposal, cfg.render.n_importance))
    if not cfg.render.latents:
        return out.rgb.clamp(0, 1), out
    P, V = cameras.shape
    latents = out.rgb.reshape(P * V, -1, height, width)
    images = torch.cat([prior.decode(chunk).float() for chunk in latents.split(DECODE_CHUNK)])
    if images.shape[-2:] != (R, R):
        images = torch.nn.functional.interpolate(images, size=(R, R), mode="bilinear", align_corners=False, antialias=True)
    return images.clamp(0, 1).reshape(P, V, 3, R, R), out


@torch.no_grad()
def render_validation(cfg: ExperimentConfig, generator, text_encoder, prompts: list[str], device, n_views: int = 4,
                      resolution: int | None = None, elevation: float | None = None, prior=None) -> torch.Tensor:
    """Orbit renders of ``prompts`` at the evaluation camera (elevation: cfg.camera.eval_elevation unless given), R x R
    pixels (R = resolution or eval.resolution); with render.latents decoded by ``prior`` (render_views).
    -> rgb [P, n_views, 3, R, R] in [0, 1]."""
    R = resolution or cfg.eval.resolution
    elevation = cfg.camera.eval_elevation if elevation is None else elevation
    text = text_encoder.encode(prompts).to(device)
    representation = generator(text.pooled, text.tokens)
    cams = orbit_cameras(n_views, elevation, cfg.camera.eval_distance, cfg.camera.eval_fovy, device)
    cams = cams.reshape(1, n_views)[[0] * len(prompts)]
    return render_views(cfg, representation, cams, R, prior)[0]


@torch.no_grad()
def denoised_views(cfg: ExperimentConfig, prior, renders: torch.Tensor, prompts: list[str], progress: float, adapter=None,
                   seed: int = 0) -> torch.Tensor:
    """What each view is pulled toward: the one-step denoised image x_hat of the run's method at the middle of its
    timestep range at ``progress`` (StableDreamer Prop. 1: the distillation gradient is beta(t) (x - x_hat)), decoded
    by the prior and resized to the renders' size; the prior sees the renders at the training size. renders [P, V, 3, R, R] of
    the eval orbit -> x_hat [P, V, 3, R, R]."""
    from amortized3d.distillation.score_distillation import guidance_scale, score_distillation, timestep_range
    from amortized3d.interfaces import Conditioning

    P, V, _, R, _ = renders.shape
    rng = torch.Generator().manual_seed(seed)
    cams = orbit_cameras(V, cfg.camera.eval_elevation, cfg.camera.eval_distance, cfg.camera.eval_fovy, renders.device)
    cond = Conditioning.orbits(prompts, cams, prior.multiview)  # a multi-view prior sees each orbit as one object
    lo, hi = timestep_range(progress, cfg.distill.t_min, cfg.distill.t_max)
    middle = (lo + hi) // 2
    x = renders.reshape(P * V, 3, R, R)
    if cfg.render.size_at(progress) != (R, R):  # the prior sees the views at the training renders' size
        x = torch.nn.functional.interpolate(x, size=cfg.render.size_at(progress), mode="bilinear", align_corners=False, antialias=True)
    out = score_distillation(prior, prior.encode(x, generator=rng), cond, method=cfg.distill.method,
                             guidance_scale=guidance_scale(cfg.distill), t_range=(middle, middle), eta=0.0, generator=rng, adapter=adapter,
                             recon_rescale=cfg.distill.recon_rescale)
    images = prior.decode(out.denoised).float()
    if images.shape[-2:] != (R, R):
        images = torch.nn.functional.interpolate(images, size=(R, R), mode="bilinear", align_corners=False, antialias=True)
    return images.clamp(0, 1).reshape(P, V, 3, R, R)


def write_validation(cfg: ExperimentConfig, generator, text_encoder, prompts: list[str], run: RunDir, step: int, device,
                     prior=None, adapter=None) -> None:
    """The contact sheet of ``prompts`` (4 views each) and a 24-frame turntable of the first, into run.validation(step);
    given the prior (and the method's learned branch), also each view's one-step denoised image (denoised_views) as
    the sheet <step>_denoised.png beside it (not with render.latents, whose renders the prior decodes: it is required then)."""
    from amortized3d.inference.export import contact_sheet, to_uint8, write_video

    sheet = run.validation(step, ".png")
    sheet.parent.mkdir(parents=True, exist_ok=True)
    grid = render_validation(cfg, generator, text_encoder, prompts, device, n_views=4, prior=prior)
    if prior is not None and not cfg.render.latents:
        progress = step / max(cfg.train.steps - 1, 1)
        denoised = denoised_views(cfg, prior, grid, prompts, progress, adapter)
        contact_sheet(to_uint8(denoised.reshape(-1, *grid.shape[2:])), run.validation(step, "_denoised.png"), ncols=4)
    contact_sheet(to_uint8(grid.reshape(-1, *grid.shape[2:])), sheet, ncols=4)
    turn = render_validation(cfg, generator, text_encoder, prompts[:1], device, n_views=24, prior=prior)
    write_video(to_uint8(turn[0]), run.validation(step, ".mp4"), fps=12)


def has_validation(run: RunDir, step: int) -> bool:
    """Whether the validation views of ``step`` were written completely (a killed run may have left them half done)."""
    return run.validation(step, ".png").is_file() and (run.validation(step, ".mp4").is_file() or run.validation(step, ".gif").is_file())
