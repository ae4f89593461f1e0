"""CSD, Classifier Score Distillation (ScaleDreamer Table 1):

    grad = w(t) (eps_cfg(x_t, t, y) - eps_u(x_t, t))   (= w(t) g (eps_c - eps_u))      default guidance 1
"""

from __future__ import annotations

import torch

from amortized3d.distillation.guidance import Draw, guided_prediction


def csd_gradient(eps_cfg: torch.Tensor, eps_uncond: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """w(t) (eps_cfg - eps_u). [B, C, H, W] x2, weight [B] -> [B, C, H, W]."""
    return weight.reshape(-1, 1, 1, 1) * (eps_cfg - eps_uncond)


class CSD:
    default_guidance = 1.0
    learned_branch = False

    def timestep_ceiling(self, t_range: tuple[int, int], eta: float, rule: str) -> int:
        return t_range[1]

    def gradient(self, d: Draw) -> torch.Tensor:
        eps_cfg, eps_uncond, _ = guided_prediction(d)
        return csd_gradient(eps_cfg, eps_uncond, d.weight)
