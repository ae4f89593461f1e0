"""SDS*, the x0-reconstruction form of SDS that MVDream trains with (ScaleDreamer Table 5's SDS*; MVDream's
threestudio guidance, recon_loss with recon_std_rescale):

    x0_cfg = (x_t - sqrt(1 - abar_t) eps_cfg) / sqrt(abar_t),   x0_c the same with eps_c (no guidance)
    x0_r   = phi (std(x0_c) / std(x0_cfg)) x0_cfg + (1 - phi) x0_cfg          (the CFG rescale, phi = recon_rescale)
    loss   = 1/2 ||x - stopgrad(x0_r)||^2,   grad = x - x0_r                   default guidance 50

with the standard deviations taken per object, over the V views (Conditioning.views_per_object), channels and pixels
(unbiased, + 1e-8 on each), as Lin et al.'s guidance rescale of "Common Diffusion Noise Schedules..." applied to x0.
Without the rescale (phi = 0) it is SDS with the weight sqrt(1 - abar_t) / sqrt(abar_t) instead of w(t):
x - x0_cfg = sqrt(1 - abar_t) / sqrt(abar_t) (eps_cfg - eps).
"""

from __future__ import annotations

import torch

from amortized3d.distillation.guidance import Draw, guided_prediction
from amortized3d.priors.schedule import predict_clean


def rescaled_reconstruction(x0_cfg: torch.Tensor, x0_cond: torch.Tensor, views_per_object: int, rescale: float) -> torch.Tensor:
    """x0_r = rescale (std(x0_c) / std(x0_cfg)) x0_cfg + (1 - rescale) x0_cfg, the std over each object's V consecutive
    images. x0_cfg, x0_cond [B, C, H, W] -> [B, C, H, W]."""
    V = views_per_object
    std_cond = x0_cond.unflatten(0, (-1, V)).flatten(1).std(1) + 1e-8  # [B / V]
    std_cfg = x0_cfg.unflatten(0, (-1, V)).flatten(1).std(1) + 1e-8
    factor = (std_cond / std_cfg).repeat_interleave(V).view(-1, 1, 1, 1)
    return rescale * factor * x0_cfg + (1 - rescale) * x0_cfg


class SDSStar:
    default_guidance = 50.0
    learned_branch = False

    def timestep_ceiling(self, t_range: tuple[int, int], eta: float, rule: str) -> int:
        return t_range[1]

    def gradient(self, d: Draw) -> torch.Tensor:
        eps_cfg, _, _ = guided_prediction(d)
        x0_cfg = predict_clean(d.x_t, eps_cfg, d.t, d.abar)
        x0_cond = predict_clean(d.x_t, d.eps_cond, d.t, d.abar)
        d.denoised = rescaled_reconstruction(x0_cfg, x0_cond, d.cond.views_per_object, d.recon_rescale)
        return d.x - d.denoised
