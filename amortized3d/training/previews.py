"""Orbit renders of a trained generator at the evaluation camera: the validation views a run writes as it trains,
and the renders the evaluations score (amortized3d.evaluation imports them from here)."""

from __future__ import annotations

import torch

from amortized3d.config import ExperimentConfig
from amortized3d.rendering.cameras import orbit_cameras
from amortized3d.rendering.volume import rays_per_chunk
from amortized3d.run_dir import RunDir


@torch.no_grad()
def render_validation(cfg: ExperimentConfig, generator, text_encoder, prompts: list[str], device, n_views: int = 4,
                      resolution: int | None = None, elevation: float | None = None) -> torch.Tensor:
    """Orbit renders of ``prompts`` at the evaluation camera (elevation: cfg.camera.eval_elevation unless given).
    -> rgb [P, n_views, 3, R, R] in [0, 1]."""
    R = resolution or cfg.eval.resolution
    elevation = cfg.camera.eval_elevation if elevation is None else elevation
    text = text_encoder.encode(prompts).to(device)
    representation = generator(text.pooled, text.tokens)
    cams = orbit_cameras(n_views, elevation, cfg.camera.eval_distance, cfg.camera.eval_fovy, device)
    cams = cams.reshape(1, n_views)[[0] * len(prompts)]
    out = representation.render(cams, R, R, cfg.render, chunk_rays=rays_per_chunk(cfg.render.n_proposal, cfg.render.n_importance))
    return out.rgb.clamp(0, 1)


def write_validation(cfg: ExperimentConfig, generator, text_encoder, prompts: list[str], run: RunDir, step: int, device) -> None:
    """The contact sheet of ``prompts`` (4 views each) and a 24-frame turntable of the first, into run.validation(step)."""
    from amortized3d.inference.export import contact_sheet, to_uint8, write_video

    sheet = run.validation(step, ".png")
    sheet.parent.mkdir(parents=True, exist_ok=True)
    grid = render_validation(cfg, generator, text_encoder, prompts, device, n_views=4)
    contact_sheet(to_uint8(grid.reshape(-1, *grid.shape[2:])), sheet, ncols=4)
    turn = render_validation(cfg, generator, text_encoder, prompts[:1], device, n_views=24)
    write_video(to_uint8(turn[0]), run.validation(step, ".mp4"), fps=12)


def has_validation(run: RunDir, step: int) -> bool:
    """Whether the validation views of ``step`` were written completely (a killed run may have left them half done)."""
    return run.validation(step, ".png").is_file() and (run.validation(step, ".mp4").is_file() or run.validation(step, ".gif").is_file())
