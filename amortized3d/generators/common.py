"""Parts shared by the generators.

GeneratorBaseConfig: the config fields every generator kind has (its own config, e.g. HyperINGPConfig, adds its sizes).

EnvironmentMap: a prompt-agnostic background, ray direction -> color, shared by all prompts:

    rgb(d) = sigmoid(MLP(gamma(d))),  gamma(d) = (d, sin(2^k pi d), cos(2^k pi d)) for k < n_frequencies

(the reference recipes' neural environment map; Hyper-iNGP has its own text-conditioned background).

DecodedField: a field whose points are read as features by ``features(points)`` and decoded by
the model's MLPs: sdf = sdf_mlp(f) + (|x| - sphere_radius), rgb = sigmoid(color_mlp(f)).

Latent colors (render.latents, the reference's rgb_as_latents): a generator built with ``latent_channels=C`` has color
heads and background of C channels without the sigmoid, so its renders are the prior's latents themselves (C = 4 for
Stable Diffusion, MVDream and the latent analytic prior); color_activation is the one place that tells the two apart.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from amortized3d.rendering.volume import SDFRepresentation
from amortized3d.schema import ConfigModel, Int


class GeneratorBaseConfig(ConfigModel):
    """Every generator's field starts as a sphere of radius sphere_radius and lives in the box [-bound, bound]^3."""

    sphere_radius: float = Field(0.5, gt=0, le=100)
    bound: float = Field(2.0, gt=0, le=100)


class HashGridConfig(GeneratorBaseConfig):
    """The sizes of a multi-resolution hash grid (amortized3d.generators.hash_grid.HashGrid), for the generators built
    on one (Hyper-iNGP, the per-prompt Instant-NGP field). Defaults: Instant-NGP's 16 levels x 2 features, 2^19 rows,
    resolutions 16 to about 4096."""

    n_levels: Int = Field(16, ge=1, le=32)
    n_features_per_level: Int = Field(2, ge=1, le=8)
    log2_hashmap_size: Int = Field(19, ge=4, le=26)
    base_resolution: Int = Field(16, ge=1, le=4096)
    per_level_scale: float = Field(1.4473, ge=1, le=8)
    mlp_hidden: Int = Field(64, ge=1, le=4096)

    def grid_sizes(self) -> dict:
        """HashGrid's keyword arguments for this config (its box is [-bound, bound]^3)."""
        return dict(n_levels=self.n_levels, n_features_per_level=self.n_features_per_level, log2_hashmap_size=self.log2_hashmap_size,
                    base_resolution=self.base_resolution, per_level_scale=self.per_level_scale, bound=self.bound)


def color_channels(latent_channels: int) -> int:
    """The width of a generator's colors: 3 (RGB), or latent_channels with latent colors (module docstring)."""
    return latent_channels or 3


def color_activation(raw: torch.Tensor, latent_channels: int) -> torch.Tensor:
    """A color head's output [..., C] -> colors: sigmoid(raw) in [0, 1] (RGB), or raw itself with latent colors
    (latent_channels > 0: the prior's latents, unbounded)."""
    return raw if latent_channels else torch.sigmoid(raw)


class EnvironmentMap(nn.Module):
    """Unit directions [P, R, 3] -> rgb [P, R, 3] in [0, 1] (with latent_channels = C > 0: latents [P, R, C])."""

    def __init__(self, n_frequencies: int = 4, hidden: int = 32, latent_channels: int = 0):
        super().__init__()
        self.latent_channels = latent_channels
        self.register_buffer("frequencies", (2.0 ** torch.arange(n_frequencies)) * math.pi, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(3 + 6 * n_frequencies, hidden), nn.SiLU(), nn.Linear(hidden, color_channels(latent_channels)))

    def forward(self, directions: torch.Tensor) -> torch.Tensor:
        angles = directions.unsqueeze(-1) * self.frequencies  # [..., 3, F]
        encoded = torch.cat([directions, angles.sin().flatten(-2), angles.cos().flatten(-2)], -1)
        return color_activation(self.mlp(encoded.to(self.mlp[0].weight.dtype)).float(), self.latent_channels)


class DecodedField(SDFRepresentation):
    """Field of P prompts: subclasses give features(points [P, N, 3]) -> [P, N, F]; ``model`` has
    sdf_mlp, color_mlp, sphere_radius, latent_channels and background."""

    model: nn.Module

    def features(self, points: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sphere(self, points: torch.Tensor) -> torch.Tensor:
        return points.norm(dim=-1) - self.model.sphere_radius

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """points [P, N, 3] -> sdf [P, N]."""
        return self.model.sdf_mlp(self.features(points)).squeeze(-1).float() + self._sphere(points)

    def sdf_and_color(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points [P, N, 3] -> (sdf [P, N], rgb [P, N, 3] in [0, 1], or latents [P, N, C] with latent colors)."""
        f = self.features(points)
        return self.model.sdf_mlp(f).squeeze(-1).float() + self._sphere(points), color_activation(self.model.color_mlp(f).float(), self.model.latent_channels)

    def background(self, directions: torch.Tensor) -> torch.Tensor:
        """Unit directions [P, R, 3] -> rgb [P, R, 3], the same environment map for every prompt."""
        return self.model.background(directions)
