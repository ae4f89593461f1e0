"""VSD, Variational Score Distillation (ProlificDreamer, as compared in ScaleDreamer Table 1):

    grad = w(t) (eps_cfg(x_t, t, y) - eps_phi'(x_t, t, pi, y))        default guidance 7.5

eps_phi' is the camera-conditioned LoRA branch (amortized3d.distillation.adapters.VSDLoRA), evaluated here without
gradient and trained by its own alignment loss. Two prior calls: [cond, uncond] on the pretrained UNet, then the
LoRA branch.
"""

from __future__ import annotations

import torch

from amortized3d.distillation.guidance import Draw, guided_prediction


def vsd_gradient(eps_cfg: torch.Tensor, eps_lora: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """w(t) (eps_cfg - eps_phi'). [B, C, H, W] x2, weight [B] -> [B, C, H, W]."""
    return weight.reshape(-1, 1, 1, 1) * (eps_cfg - eps_lora)


class VSD:
    default_guidance = 7.5
    learned_branch = True

    def timestep_ceiling(self, t_range: tuple[int, int], eta: float, rule: str) -> int:
        return t_range[1]

    def gradient(self, d: Draw) -> torch.Tensor:
        eps_cfg, _, _ = guided_prediction(d)
        return vsd_gradient(eps_cfg, d.adapter.predict_noise(d.x_t, d.t, d.cond), d.weight)
