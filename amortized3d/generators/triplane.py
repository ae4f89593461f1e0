"""Triplane-Transformer (LRM-style): per-token text -> transformer over learned triplane tokens -> triplane field.

For P prompts with per-token text embeddings c [P, T, D]:

    q = learned queries [3 S^2, W]                      (S = tokens_side, W = width; init N(0, 1) / sqrt(W))
    for each of `depth` pre-norm blocks:
        q = q + CrossAttention(LN(q), c)               (heads x W / heads, no qkv bias)
        q = q + SelfAttention(LN(q))
        q = q + MLP(LN(q))                              (W -> 4W -> W, GELU)
    planes = ConvTranspose2d(LN(q) as 3 planes of S x S, stride 2) -> [P, 3, C, 2S, 2S]   (no activation)

A point x is projected onto the xy, xz and yz planes (coordinates / bound, EG3D-style bilinear
sampling with zero padding), the three C-vectors are concatenated (3C = 96 by default) and
decoded by MLPs 3C -> h -> h -> 1 (SDF, plus a sphere of radius sphere_radius) and -> 3
(sigmoid color). Attention is torch's scaled_dot_product_attention. Each prompt's points only
see that prompt's planes. The background is a prompt-agnostic environment map.

Paper size (the `paper` preset): S = 32, W = 768, 12 blocks, 16 heads, C = 32, text width 1024,
about 120.5 M parameters.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from amortized3d.generators.common import DecodedField, EnvironmentMap, GeneratorBaseConfig, color_channels

PRESETS = {
    "paper": dict(tokens_side=32, width=768, depth=12, heads=16, plane_channels=32, mlp_hidden=64),
    "tiny": dict(tokens_side=8, width=64, depth=2, heads=4, plane_channels=8, mlp_hidden=32),
}


class TriplaneConfig(GeneratorBaseConfig):
    """The Triplane-Transformer's config: sizes from the preset, and activation checkpointing of the transformer
    blocks (less memory, same results)."""

    preset: Literal[tuple(PRESETS)] = "paper"
    activation_checkpointing: bool = False


class Attention(nn.Module):
    """Multi-head attention without qkv bias; queries [B, Nq, W], context [B, Nk, Dc] -> [B, Nq, W]."""

    def __init__(self, width: int, heads: int, context_dim: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width={width} must be divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(context_dim, 2 * width, bias=False)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, N, W = x.shape
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(B, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(B, N, W))


class Block(nn.Module):
    """Pre-norm cross-attention, self-attention and MLP (LayerNorm eps 1e-6)."""

    def __init__(self, width: int, heads: int, text_dim: int):
        super().__init__()
        self.norm_cross, self.norm_self, self.norm_mlp = (nn.LayerNorm(width, eps=1e-6) for _ in range(3))
        self.cross = Attention(width, heads, text_dim)
        self.self_attn = Attention(width, heads, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        x = x + self.cross(self.norm_cross(x), text)
        h = self.norm_self(x)
        x = x + self.self_attn(h, h)
        return x + self.mlp(self.norm_mlp(x))


def decoder(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))


class TriplaneTransformer(nn.Module):
    """Per-token text [P, T, D] -> TriplaneField for those P prompts; ``config`` is its TriplaneConfig;
    latent_channels > 0: latent colors of that width (amortized3d.generators.common)."""


    Config = TriplaneConfig

    def __init__(self, text_dim: int, config: TriplaneConfig, latent_channels: int = 0):
        super().__init__()
        size = PRESETS[config.preset]
        self.latent_channels = latent_channels
        self.config = config
        self.side, self.width, self.channels = size["tokens_side"], size["width"], size["plane_channels"]
        self.text_dim, self.sphere_radius, self.bound = text_dim, config.sphere_radius, config.bound
        self.z_dim = 0  # no latent: one asset per prompt
        self.activation_checkpointing = config.activation_checkpointing
        self.queries = nn.Parameter(torch.randn(3 * self.side**2, self.width) / self.width**0.5)
        self.blocks = nn.ModuleList(Block(self.width, size["heads"], text_dim) for _ in range(size["depth"]))
        self.norm = nn.LayerNorm(self.width, eps=1e-6)
        self.upsample = nn.ConvTranspose2d(self.width, self.channels, kernel_size=2, stride=2)
        self.sdf_mlp = decoder(3 * self.channels, size["mlp_hidden"], 1)
        self.color_mlp = decoder(3 * self.channels, size["mlp_hidden"], color_channels(latent_channels))
        nn.init.normal_(self.sdf_mlp[-1].weight, 0.0, 1e-3)  # start as the sphere: a near-zero SDF correction
        nn.init.zeros_(self.sdf_mlp[-1].bias)
        self.background = EnvironmentMap(latent_channels=latent_channels)

    def geometry_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("background.")]

    def decoder_parameters(self) -> list[nn.Parameter]:
        """The SDF and color MLPs (part of geometry_parameters)."""
        return list(self.sdf_mlp.parameters()) + list(self.color_mlp.parameters())

    def background_parameters(self) -> list[nn.Parameter]:
        return list(self.background.parameters())

    def describe(self) -> dict[str, int]:
        """Sizes for a memory estimate (builders.describe_generator): float values of the activations kept per prompt
        (about 10 per token and width in each block, plus the planes) and per rendered sample (position, three plane
        features, MLP hidden activations, outputs)."""
        tokens = 3 * self.side**2
        return {"activations_per_prompt": len(self.blocks) * tokens * self.width * 10 + self.planes_numel(),
                "values_per_sample": 3 + 2 * 3 * self.channels + 4 * self.sdf_mlp[0].weight.shape[0] + 4}

    def planes_numel(self) -> int:
        """Values in one prompt's triplane: 3 C (2S)^2."""
        return 3 * self.channels * (2 * self.side) ** 2

    def planes(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """text_tokens [P, T, D] -> triplanes [P, 3, C, 2S, 2S]."""
        if text_tokens.dim() != 3 or text_tokens.shape[-1] != self.text_dim:
            raise ValueError(f"text_tokens must have shape [P, T, {self.text_dim}], got {tuple(text_tokens.shape)}")
        P, S = text_tokens.shape[0], self.side
        x = self.queries.unsqueeze(0).expand(P, -1, -1).to(text_tokens.dtype)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, text_tokens, use_reentrant=False)
            else:
                x = block(x, text_tokens)
        x = self.norm(x).view(P * 3, S, S, self.width).permute(0, 3, 1, 2)  # [3P, W, S, S]
        return self.upsample(x).view(P, 3, self.channels, 2 * S, 2 * S)

    def forward(self, text_pooled: torch.Tensor, text_tokens: torch.Tensor, z: torch.Tensor | None = None) -> "TriplaneField":
        """text_pooled [P, D] (unused), text_tokens [P, T, D], z unused -> field of the P prompts."""
        return TriplaneField(self, self.planes(text_tokens))


class TriplaneField(DecodedField):
    """Field of P prompts: each prompt's points read only its own three planes."""

    def __init__(self, model: TriplaneTransformer, planes: torch.Tensor):
        self.model, self.planes = model, planes  # [P, 3, C, R, R]
        self.n_prompts = planes.shape[0]

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """points [P, N, 3] -> concatenated plane features [P, N, 3C] (xy, xz, yz; zero outside the box)."""
        P, N, _ = points.shape
        if P != self.n_prompts:
            raise ValueError(f"points must have shape [P={self.n_prompts}, N, 3], got {tuple(points.shape)}")
        u = points / self.model.bound
        coords = torch.stack([u[..., [0, 1]], u[..., [0, 2]], u[..., [1, 2]]], 1)  # [P, 3, N, 2]
        planes = self.planes.reshape(P * 3, *self.planes.shape[2:])
        grid = coords.reshape(P * 3, 1, N, 2).to(planes.dtype)
        sampled = F.grid_sample(planes, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # [3P, C, 1, N]
        return sampled.view(P, 3, -1, N).permute(0, 3, 1, 2).reshape(P, N, -1)
