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


class DensityField(Protocol):
    """A batch of P volume-density fields with albedo and background (NeRF-style, e.g. the per-prompt Instant-NGP
    field with generator.geometry=density); rendered with geometry="density"."""

    def density(self, points: torch.Tensor) -> torch.Tensor:
        """Volume density sigma >= 0. points [P, N, 3] -> sigma [P, N]."""

    def density_and_color(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points [P, N, 3] -> (sigma [P, N], rgb [P, N, 3] in [0, 1])."""

    def background(self, directions: torch.Tensor) -> torch.Tensor:
        """Unit ray directions [P, R, 3] -> background rgb [P, R, 3] in [0, 1]."""


def finite_difference_gradient(values_at, points: torch.Tensor, values: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """Forward-difference gradient of a scalar field (a field's ``sdf`` or ``density``), three extra evaluations.

    grad_i = (f(x + eps e_i) - f(x)) / eps

    values_at: points [P, M, 3] -> [P, M]; points [P, N, 3], values [P, N] (already evaluated at ``points``) -> grad [P, N, 3].
    """
    P, N, _ = points.shape
    offsets = torch.eye(3, dtype=points.dtype, device=points.device) * eps  # [3, 3]
    shifted = (points.unsqueeze(2) + offsets).reshape(P, N * 3, 3)
    shifted_values = values_at(shifted).reshape(P, N, 3)
    return (shifted_values - values.unsqueeze(-1)) / eps


def values_and_color(field, points: torch.Tensor, geometry: str = "sdf") -> tuple[torch.Tensor, torch.Tensor]:
    """A field's geometry value and albedo at points [P, N, 3]: (sdf, rgb) of a Field (geometry "sdf") or (sigma, rgb)
    of a DensityField (geometry "density"), each [P, N] and [P, N, 3]."""
    return field.density_and_color(points) if geometry == "density" else field.sdf_and_color(points)


def grid_points(resolution: int, bound: float, *, cell_centers: bool = False, device=None) -> torch.Tensor:
    """The points of a res^3 grid over the box [-bound, bound]^3, where a field is sampled.

    Grid vertices (default), the box's corners included, or the centers of its res^3 equal cells:

        vertices:      x_i = -bound + i h,          h = 2 bound / (res - 1)
        cell_centers:  x_i = -bound + (i + 1/2) h,  h = 2 bound / res

    and the same for y_j and z_k. Points are row-major over (k, j, i), x fastest, so values
    sampled at them reshape to [res, res, res] indexed [k, j, i] (grid_sample's depth, height,
    width order). -> points [res^3, 3] as (x, y, z), float32.
    """
    if cell_centers:
        axis = (torch.arange(resolution, dtype=torch.float32, device=device) + 0.5) / resolution * 2 * bound - bound
    else:
        axis = torch.linspace(-bound, bound, resolution, dtype=torch.float32, device=device)
    gz, gy, gx = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([gx, gy, gz], dim=-1).reshape(-1, 3)
