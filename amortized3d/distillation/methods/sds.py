"""SDS, Score Distillation Sampling (DreamFusion; ScaleDreamer Table 1):

    grad = w(t) (eps_cfg(x_t, t, y) - eps)        default guidance 100
"""

from __future__ import annotations

import torch

from amortized3d.distillation.guidance import Draw, guided_prediction


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
