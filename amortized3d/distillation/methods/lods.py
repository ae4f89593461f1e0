"""LODS, Learning the unconditional branch (LODS Eq. 7 and 9):

    grad = w(t) (eps_c(x_t, t, y) + (1 - g) / g eps_learned(x_t, t) - eps / g)        default guidance 1000

SDS with a learned unconditional branch, divided by g. The branch is a learnable token embedding alpha
(eps_phi(x_t; alpha, t), distill.method=lods-embedding) or a LoRA on the unconditional branch
(eps_psi(x_t; empty, t), lods-lora): amortized3d.distillation.adapters.LODSEmbedding / LODSLoRA, evaluated here
without gradient and trained by their own alignment losses. Two prior calls: [cond] on the pretrained UNet, then
the learned branch.
"""

from __future__ import annotations

import torch

from amortized3d.distillation.guidance import Draw
from amortized3d.priors.branches import COND


def lods_gradient(eps_cond: torch.Tensor, eps_learned: torch.Tensor, noise: torch.Tensor, guidance: float, weight: torch.Tensor) -> torch.Tensor:
    """w(t) (eps_c + (1 - g) / g eps_learned - eps / g) (LODS Eq. 7 / 9). [B, C, H, W] x3, weight [B] -> [B, C, H, W]."""
    return weight.reshape(-1, 1, 1, 1) * (eps_cond + (1.0 - guidance) / guidance * eps_learned - noise / guidance)


class LODS:
    default_guidance = 1000.0
    learned_branch = True

    def timestep_ceiling(self, t_range: tuple[int, int], eta: float, rule: str) -> int:
        return t_range[1]

    def gradient(self, d: Draw) -> torch.Tensor:
        eps_cond = d.prior.predict_noise(d.x_t, d.t, d.cond, d.rows(COND))
        eps_learned = d.adapter.predict_noise(d.x_t, d.t, d.cond)
        d.eps_guided = eps_learned + d.guidance_scale * (eps_cond - eps_learned)
        return lods_gradient(eps_cond, eps_learned, d.noise, d.guidance_scale, d.weight)
