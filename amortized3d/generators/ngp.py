"""The Instant-NGP field of one prompt: what a per-prompt run (`amortized3d train --prompt P`) optimizes.

Not a text-to-3D generator but the per-prompt representation of DreamFusion-style optimization (HiFA, LODS,
StableDreamer, ScaleDreamer Table 2 left half), behind the same Generator interface so that the training loop,
checkpoints, `generate` and the evaluations treat it as they treat the amortized generators:

    e(x)     = HashGrid(x)                                  (Instant-NGP, config sizes)
    geometry=sdf (default, the SDF twin):
      sdf(x)     = MLP_sdf(e(x)) + (|x| - sphere_radius)    (starts as a sphere, like the generators' fields)
    geometry=density (threestudio's implicit volume, the reference per-prompt field):
      sigma(x)   = softplus(MLP_density(e(x)) + blob_scale (1 - |x| / blob_std))   (Magic3D's blob: 10 and 0.5)
    rgb(x)   = sigmoid(MLP_color(e(x)))
    background(d) = the environment map of amortized3d.generators.common

Each MLP is E -> mlp_hidden -> out without biases (threestudio's implicit volumes: one hidden layer of 64), SiLU for
the SDF twin (smooth finite-difference normals and eikonal term) and ReLU for the density field (as the reference);
the last geometry layer starts near zero, so the field starts as the sphere or the blob. A density field's surface,
for meshes and occupancy, is the level sigma = iso_density (threestudio's isosurface threshold, 25). The text embedding
is not read: the field is the one asset of the run's prompt (corpus "prompt:TEXT"), and for P prompts it answers that
asset P times.

Shapes: P prompts (1 in a per-prompt run), N points per prompt, R rays per prompt, E = n_levels x n_features_per_level.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from amortized3d.generators.common import DecodedField, EnvironmentMap, HashGridConfig, color_activation, color_channels
from amortized3d.generators.hash_grid import HashGrid
from amortized3d.rendering.volume import DensityRepresentation


class NGPConfig(HashGridConfig):
    """The per-prompt field's config: its hash grid's sizes and the MLPs' width (HashGridConfig's fields), the geometry
    (sdf or density) and the density field's blob and surface level."""

    geometry: Literal["sdf", "density"] = "sdf"
    blob_scale: float = Field(10.0, ge=0, le=1000)
    blob_std: float = Field(0.5, gt=0, le=100)
    iso_density: float = Field(25.0, gt=0, le=1e6)


def decoder(inputs: int, hidden: int, outputs: int, activation: type[nn.Module] = nn.SiLU) -> nn.Sequential:
    """inputs -> hidden -> outputs, bias-free."""
    return nn.Sequential(nn.Linear(inputs, hidden, bias=False), activation(), nn.Linear(hidden, outputs, bias=False))


class PromptNGP(nn.Module):
    """One prompt's Instant-NGP field: text [P, D] (unread) -> NGPField (SDF) or NGPDensityField; ``config`` is its
    NGPConfig. ``sdf_mlp`` decodes the geometry (the SDF correction, or the density before its activation);
    latent_channels > 0: latent colors of that width (amortized3d.generators.common)."""

    Config = NGPConfig
    z_dim = 0

    def __init__(self, text_dim: int, config: NGPConfig, latent_channels: int = 0):
        super().__init__()
        self.config, self.text_dim, self.latent_channels = config, text_dim, latent_channels
        self.sphere_radius = config.sphere_radius
        self.grid = HashGrid(**config.grid_sizes())
        activation = nn.ReLU if config.geometry == "density" else nn.SiLU
        self.sdf_mlp = decoder(self.grid.output_dim, config.mlp_hidden, 1, activation)
        self.color_mlp = decoder(self.grid.output_dim, config.mlp_hidden, color_channels(latent_channels), activation)
        nn.init.normal_(self.sdf_mlp[-1].weight, 0.0, 1e-3)  # start as the sphere (or the blob): a near-zero correction
        self.background = EnvironmentMap(latent_channels=latent_channels)

    def describe(self) -> dict[str, int]:
        """Sizes for a memory estimate (builders.describe_generator): nothing per prompt; per rendered sample the
        position, the grid features with their finite-difference neighbours, the MLP hidden activations, the outputs."""
        return {"activations_per_prompt": 0, "values_per_sample": 3 + self.grid.output_dim * 4 + 2 * self.config.mlp_hidden + 4}

    def geometry_parameters(self) -> list[nn.Parameter]:
        """The hash grid and both MLPs."""
        return list(self.grid.parameters()) + self.decoder_parameters()

    def decoder_parameters(self) -> list[nn.Parameter]:
        """The SDF and color MLPs (the reference recipe trains them at 1e-3, the grid at 1e-2: optim.lr_decoder)."""
        return list(self.sdf_mlp.parameters()) + list(self.color_mlp.parameters())

    def background_parameters(self) -> list[nn.Parameter]:
        return list(self.background.parameters())

    def forward(self, text_pooled: torch.Tensor, text_tokens: torch.Tensor | None = None,
                z: torch.Tensor | None = None) -> "NGPField | NGPDensityField":
        """text_pooled [P, D] (only P is read) -> the field, answered for each of the P rows."""
        if text_pooled.dim() != 2:
            raise ValueError(f"text_pooled must have shape [P, D], got {tuple(text_pooled.shape)}")
        field = NGPDensityField if self.config.geometry == "density" else NGPField
        return field(self, text_pooled.shape[0])


def grid_features(model: PromptNGP, n_prompts: int, points: torch.Tensor) -> torch.Tensor:
    """points [P, N, 3] -> the grid's features [P, N, E], one grid pass over all P N points."""
    if points.dim() != 3 or points.shape[0] != n_prompts or points.shape[2] != 3:
        raise ValueError(f"points must have shape [P={n_prompts}, N, 3], got {tuple(points.shape)}")
    P, N, _ = points.shape
    return model.grid(points.reshape(P * N, 3)).view(P, N, model.grid.output_dim)


class NGPField(DecodedField):
    """The one SDF asset of a PromptNGP, for P rows of points."""

    def __init__(self, model: PromptNGP, n_prompts: int):
        self.model, self.n_prompts = model, n_prompts

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """points [P, N, 3] -> grid features [P, N, E]."""
        return grid_features(self.model, self.n_prompts, points)


class NGPDensityField(DensityRepresentation):
    """The one density asset of a PromptNGP (geometry=density), for P rows of points."""

    def __init__(self, model: PromptNGP, n_prompts: int):
        self.model, self.n_prompts = model, n_prompts
        self.iso_density = model.config.iso_density

    def _sigma(self, features: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        blob = self.model.config.blob_scale * (1 - points.norm(dim=-1) / self.model.config.blob_std)
        return F.softplus(self.model.sdf_mlp(features).squeeze(-1).float() + blob)

    def density(self, points: torch.Tensor) -> torch.Tensor:
        """points [P, N, 3] -> sigma [P, N]."""
        return self._sigma(grid_features(self.model, self.n_prompts, points), points)

    def density_and_color(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points [P, N, 3] -> (sigma [P, N], rgb [P, N, 3] in [0, 1], or latents [P, N, C] with latent colors)."""
        f = grid_features(self.model, self.n_prompts, points)
        return self._sigma(f, points), color_activation(self.model.color_mlp(f).float(), self.model.latent_channels)

    def background(self, directions: torch.Tensor) -> torch.Tensor:
        """Unit directions [P, R, 3] -> rgb [P, R, 3]."""
        return self.model.background(directions)
