"""The field interface: what a generator produces for a batch of prompts.

A field answers, for every prompt p in the batch and every 3D point, the signed
distance to the surface and the albedo color there, plus a background color for
ray directions that leave the scene. Generators (``amortized3d.generators``) and
the exact ShapeWorld scenes (``amortized3d.shapeworld``) both produce fields,
so the renderer, the mesh export and the oracle evaluation treat them alike.

Shapes: P prompts, N points per prompt, R rays per prompt.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Field(Protocol):
    """A batch of P signed-distance fields with albedo and background."""

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """Signed distance, negative inside. points [P, N, 3] -> sdf [P, N]."""

    def sdf_and_color(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points [P, N, 3] -> (sdf [P, N], rgb [P, N, 3] in [0, 1])."""

    def background(self, directions: torch.Tensor) -> torch.Tensor:
        """Unit ray directions [P, R, 3] -> background rgb [P, R, 3] in [0, 1]."""


def finite_difference_gradient(field: Field, points: torch.Tensor, sdf: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """Forward-difference gradient of the SDF, three extra SDF evaluations.

    grad_i = (sdf(x + eps e_i) - sdf(x)) / eps

    points [P, N, 3], sdf [P, N] (already evaluated at ``points``) -> grad [P, N, 3].
    """
    P, N, _ = points.shape
    offsets = torch.eye(3, dtype=points.dtype, device=points.device) * eps  # [3, 3]
    shifted = (points.unsqueeze(2) + offsets).reshape(P, N * 3, 3)
    shifted_sdf = field.sdf(shifted).reshape(P, N, 3)
    return (shifted_sdf - sdf.unsqueeze(-1)) / eps
