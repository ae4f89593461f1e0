"""What every distillation method shares: one noisy draw of the rendered batch, and the guided prediction of the
frozen prior on it, with all pretrained branches in one batched call.

    x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps,   w(t) = 1 - abar_t
    eps_cfg = eps_u + g (eps_c - eps_u)
    with Perp-Neg (a text-to-image prior with prior.perp_neg):
    eps_cfg = eps_u + g (e_pos + sum_i w_i perp(eps_neg_i - eps_u, e_pos)),  e_pos = eps_c - eps_u

The batched call holds [cond(t), uncond(t)], then [neg1(t), neg2(t)] with Perp-Neg, then a method's extra rows
(ASD: cond(t + dt)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amortized3d.interfaces import Conditioning, Prior
from amortized3d.priors.branches import COND, NEGATIVE_1, NEGATIVE_2, UNCOND


@dataclass
class Draw:
    """One noisy draw of B images, what a method's gradient is computed from.

    x [B, C, H, W] the images in the prior's space (detached here); cond of B rows; t long [B]; noise eps and
    x_t [B, C, H, W]; weight w(t) [B]; abar [T] the prior's schedule; guidance_scale g; t_range (T_min, T_max) of
    this step; eta, asd_shift: ASD's shift settings; generator: the step's random stream; adapter: the learned
    branch of VSD / LODS (None otherwise). A method that draws a second timestep records it in shifted_timesteps;
    every method records its guided prediction at (x_t, t) in eps_guided [B, C, H, W] (eps_cfg; LODS: its learned
    unconditional branch guided, eps_l + g (eps_c - eps_l)), from which the one-step denoised image comes, and
    guided_prediction its conditional one in eps_cond. recon_rescale: SDS*'s guidance rescale (methods/sds_star.py);
    a method whose target is not the one-step estimate of eps_guided records it in denoised (SDS*: x0_r).
    """

    prior: Prior
    x: torch.Tensor
    cond: Conditioning
    t: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    weight: torch.Tensor
    abar: torch.Tensor
    guidance_scale: float
    t_range: tuple[int, int]
    eta: float
    asd_shift: str
    generator: torch.Generator
    adapter: object | None = None
    recon_rescale: float = 0.5
    shifted_timesteps: torch.Tensor | None = None
    eps_guided: torch.Tensor | None = None
    eps_cond: torch.Tensor | None = None
    denoised: torch.Tensor | None = None

    def rows(self, code: int) -> torch.Tensor:
        """The branch code for every image: long [B]."""
        return torch.full((self.x.shape[0],), code, dtype=torch.long)


def perpendicular_component(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x - (<x, y> / |y|^2) y per image. x, y [B, ...] -> [B, ...]."""
    xf, yf = x.flatten(1), y.flatten(1)
    coeff = (xf * yf).sum(1) / yf.square().sum(1).clamp_min(1e-12)
    return x - coeff.view(-1, *([1] * (x.dim() - 1))) * y


def perp_neg_guidance(eps_cond, eps_uncond, eps_negatives, negative_weights, guidance_scale: float) -> torch.Tensor:
    """Perp-Neg: eps_u + g (e_pos + sum_i w_i perp(eps_neg_i - eps_u, e_pos)), e_pos = eps_c - eps_u.

    eps_* [B, C, H, W], eps_negatives (2 of them), negative_weights [B, 2] -> [B, C, H, W].
    """
    e_pos = eps_cond - eps_uncond
    accumulated = torch.zeros_like(e_pos)
    for i, eps_neg in enumerate(eps_negatives):
        accumulated = accumulated + negative_weights[:, i].view(-1, 1, 1, 1) * perpendicular_component(eps_neg - eps_uncond, e_pos)
    return eps_uncond + guidance_scale * (e_pos + accumulated)


def guided_prediction(d: Draw, extra: list[tuple[torch.Tensor, torch.Tensor, int]] = ()
                      ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """eps_cfg and eps_u at (x_t, t), and the predictions of the ``extra`` rows ((noisy [B, C, H, W], t long [B],
    branch code) each), from one batched prior call. -> (eps_cfg, eps_uncond, [eps of each extra]), all [B, C, H, W]."""
    inputs, steps, branches = [d.x_t, d.x_t], [d.t, d.t], [d.rows(COND), d.rows(UNCOND)]
    if d.prior.perp_neg:
        inputs += [d.x_t, d.x_t]
        steps += [d.t, d.t]
        branches += [d.rows(NEGATIVE_1), d.rows(NEGATIVE_2)]
    for noisy, t, code in extra:
        inputs.append(noisy)
        steps.append(t)
        branches.append(d.rows(code))
    n = len(inputs)
    eps = d.prior.predict_noise(torch.cat(inputs), torch.cat(steps), d.cond.repeat(n), torch.cat(branches)).chunk(n)
    eps_cond, eps_uncond = eps[0], eps[1]
    if d.prior.perp_neg:
        negative_weights = d.prior.perp_neg_weights(d.cond.cameras).to(d.x.device, d.x.dtype)
        eps_cfg = perp_neg_guidance(eps_cond, eps_uncond, eps[2:4], negative_weights, d.guidance_scale)
    else:
        eps_cfg = eps_uncond + d.guidance_scale * (eps_cond - eps_uncond)
    d.eps_guided, d.eps_cond = eps_cfg, eps_cond
    return eps_cfg, eps_uncond, list(eps[n - len(extra):])
