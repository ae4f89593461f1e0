"""SDS, Score Distillation Sampling (DreamFusion; ScaleDreamer Table 1):

    grad = w(t) (eps_cfg(x_t, t, y) - eps)        default guidance 100

and HiFA's multi-step form of its latent residual (SDS+, Eq. 3 with Alg. 1 step 5's multi-step z_hat):

    grad = beta(t) (x - z_hat),  beta(t) = w(t) sqrt(abar_t) / sqrt(1 - abar_t)

with z_hat from guided DDIM steps from (x_t, t) down past 0 (multistep_denoised). With the one-step estimate
z_hat = (x_t - sqrt(1 - abar_t) eps_cfg) / sqrt(abar_t) this is SDS itself (HiFA Eq. 2).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from amortized3d.distillation.guidance import Draw, guided_prediction
from amortized3d.priors.schedule import ddim_scheduler


def sds_gradient(eps_cfg: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """w(t) (eps_cfg - eps). eps_cfg, noise [B, C, H, W], weight [B] -> [B, C, H, W]."""
    return weight.reshape(-1, 1, 1, 1) * (eps_cfg - noise)


class SDS:
    default_guidance = 100.0
    learned_branch = False

    def timestep_ceiling(self, t_range: tuple[int, int], eta: float, rule: str) -> int:
        return t_range[1]

    def gradient(self, d: Draw) -> torch.Tensor:
        eps_cfg, _, _ = guided_prediction(d)
        return sds_gradient(eps_cfg, d.noise, d.weight)


def multistep_denoised(d: Draw, steps: int, eta: float) -> torch.Tensor:
    """HiFA's multi-step z_hat (Alg. 1 step 5; A.1: DDIM, r = 0.25, eta = 1; its code's --denoising_steps): from each
    image's (x_t, t), guided DDIM steps of stride T // steps (diffusers' DDIMScheduler.step, stochastic with ``eta``)
    at t, t - stride, ... while >= 0, the last one landing on abar_0: floor(t / stride) + 1 guided predictions per
    image, the first the draw's own (d.eps_guided, from the method's call), each further one batched over the images
    still stepping (Perp-Neg too when the prior uses it). The DDIM noise comes from the draw's generator.
    -> z_hat [B, C, H, W]."""
    scheduler = ddim_scheduler(d.abar, steps)
    stride = scheduler.config.num_train_timesteps // steps
    sample, t = d.x_t.clone(), d.t.clone()
    active = torch.arange(len(t), device=t.device)
    eps_cfg = d.eps_guided  # the first stride starts from the method's own prediction at (x_t, t)
    while len(active):
        if eps_cfg is None:
            sub = replace(d, x=d.x[active], cond=d.cond.select(active), t=t[active], x_t=sample[active],
                          noise=d.noise[active], weight=d.weight[active])
            eps_cfg, _, _ = guided_prediction(sub)
        noise = torch.randn(eps_cfg.shape, generator=d.generator).to(eps_cfg.device, eps_cfg.dtype)
        for k, i in enumerate(active.tolist()):
            sample[i] = scheduler.step(eps_cfg[k:k + 1], int(t[i]), sample[i:i + 1], eta=eta,
                                       variance_noise=noise[k:k + 1]).prev_sample[0].to(sample.dtype)
        t[active] -= stride
        active, eps_cfg = active[t[active] >= 0], None
    return sample
