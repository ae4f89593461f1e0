"""Geometry regularizers of the reference recipe and their schedules.

Schedules are piecewise-linear in training progress p in [0, 1], given as a list
of (progress, weight) knots; before the first knot the first weight holds, after
the last the last. Example: opacity entropy ramped 0 -> 10 over the last 20% of
steps is [[0.8, 0.0], [1.0, 10.0]].
"""

from __future__ import annotations

import torch


def scheduled_weight(knots: list[list[float]] | list[tuple[float, float]], progress: float) -> float:
    """Piecewise-linear interpolation of (progress, weight) knots at ``progress``."""
    if not knots:
        return 0.0
    if progress <= knots[0][0]:
        return float(knots[0][1])
    for (p0, w0), (p1, w1) in zip(knots[:-1], knots[1:]):
        if progress <= p1:
            if p1 == p0:
                return float(w1)
            return float(w0 + (w1 - w0) * (progress - p0) / (p1 - p0))
    return float(knots[-1][1])


def sparsity_loss(opacity: torch.Tensor) -> torch.Tensor:
    """mean sqrt(opacity^2 + 0.01). opacity [...] -> scalar."""
    return torch.sqrt(opacity**2 + 0.01).mean()


def opacity_entropy_loss(opacity: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Binary entropy -o log o - (1 - o) log(1 - o), averaged. opacity [...] -> scalar."""
    o = opacity.clamp(eps, 1 - eps)
    return (-o * torch.log(o) - (1 - o) * torch.log(1 - o)).mean()


def z_variance_loss(opacity: torch.Tensor, z_variance: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """HiFA Eq. 8: E_r[delta_r sigma^2_r], delta_r = 1 where the ray's opacity exceeds ``threshold`` (0.5), else 0 (the
    mask carries no gradient); sigma^2_r the depth variance of the ray's weights (Eq. 7, volume.z_variance).
    opacity, z_variance [...] (one value per ray) -> scalar, the mean over all rays."""
    return (z_variance * (opacity.detach() > threshold)).mean()


def eikonal_loss(sdf_grad: torch.Tensor) -> torch.Tensor:
    """mean (|grad sdf| - 1)^2. sdf_grad [..., 3] -> scalar."""
    return ((sdf_grad.norm(dim=-1) - 1.0) ** 2).mean()
