"""The Instant-NGP field of one prompt: what a per-prompt run (`amortized3d train --prompt P`) optimizes.

Not a text-to-3D generator but the per-prompt representation of DreamFusion-style optimization (HiFA, LODS,
StableDreamer, ScaleDreamer Table 2 left half), behind the same Generator interface so that the training loop,
checkpoints, `generate` and the evaluations treat it as they treat the amortized generators:

    e(x)     = HashGrid(x)                                  (Instant-NGP, config sizes)
    sdf(x)   = MLP_sdf(e(x)) + (|x| - sphere_radius)        (starts as a sphere, like the generators' fields)
    rgb(x)   = sigmoid(MLP_color(e(x)))
    background(d) = the environment map of amortized3d.generators.common

Each MLP is E -> mlp_hidden -> out, SiLU, no biases (threestudio's implicit volumes: one hidden layer of 64); the last
SDF layer starts near zero, so the field starts as the sphere. The text embedding is not read: the field is the one
asset of the run's prompt (corpus "prompt:TEXT"), and for P prompts it answers that asset P times.

Shapes: P prompts (1 in a per-prompt run), N points per prompt, R rays per prompt, E = n_levels x n_features_per_level.
"""

from __future__ import annotations

import torch
from torch import nn

from amortized3d.generators.common import DecodedField, EnvironmentMap, HashGridConfig
from amortized3d.generators.hash_grid import HashGrid


class NGPConfig(HashGridConfig):
    """The per-prompt field's config: its hash grid's sizes and the MLPs' width (HashGridConfig's fields)."""


def decoder(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    """inputs -> hidden -> outputs, SiLU, bias-free."""
    return nn.Sequential(nn.Linear(inputs, hidden, bias=False), nn.SiLU(), nn.Linear(hidden, outputs, bias=False))


class PromptNGP(nn.Module):
    """One prompt's Instant-NGP SDF field: text [P, D] (unread) -> NGPField; ``config`` is its NGPConfig."""

    Config = NGPConfig
    z_dim = 0

    def __init__(self, text_dim: int, config: NGPConfig):
        super().__init__()
        self.config, self.text_dim = config, text_dim
        self.sphere_radius = config.sphere_radius
        self.grid = HashGrid(**config.grid_sizes())
        self.sdf_mlp = decoder(self.grid.output_dim, config.mlp_hidden, 1)
        self.color_mlp = decoder(self.grid.output_dim, config.mlp_hidden, 3)
        nn.init.normal_(self.sdf_mlp[-1].weight, 0.0, 1e-3)  # start as the sphere: a near-zero SDF correction
        self.background = EnvironmentMap()

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

    def forward(self, text_pooled: torch.Tensor, text_tokens: torch.Tensor | None = None, z: torch.Tensor | None = None) -> "NGPField":
        """text_pooled [P, D] (only P is read) -> the field, answered for each of the P rows."""
        if text_pooled.dim() != 2:
            raise ValueError(f"text_pooled must have shape [P, D], got {tuple(text_pooled.shape)}")
        return NGPField(self, text_pooled.shape[0])


class NGPField(DecodedField):
    """The one asset of a PromptNGP, for P rows of points."""

    def __init__(self, model: PromptNGP, n_prompts: int):
        self.model, self.n_prompts = model, n_prompts

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """points [P, N, 3] -> grid features [P, N, E], one grid pass over all P N points."""
        if points.dim() != 3 or points.shape[0] != self.n_prompts or points.shape[2] != 3:
            raise ValueError(f"points must have shape [P={self.n_prompts}, N, 3], got {tuple(points.shape)}")
        P, N, _ = points.shape
        return self.model.grid(points.reshape(P * N, 3)).view(P, N, self.model.grid.output_dim)
