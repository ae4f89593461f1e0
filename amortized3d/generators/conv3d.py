"""3D-conv generator (StyleGAN2-like, after CC3D): text + z -> w -> feature volume -> SDF and color.

Mapping: z [P, z_dim] ~ N(0, I), normalized to unit RMS, through two leaky-ReLU layers
(z_dim -> h -> h), concatenated with the pooled text embedding [P, D] and projected to w [P, w_dim].
The same w drives every layer (no style mixing).

Synthesis: a learned constant [c_4, 4, 4, 4], one modulated 3^3 convolution at 4^3, then one
block per resolution r = 8, 16, ..., R:

    x = ModConv3(x, w)                      (c_{r/2} -> c_r, at r/2)
    x = upsample_x2(x)                      (trilinear)
    x = x + noise_strength * noise_r        (noise_r a fixed buffer per resolution, strength init 0)
    x = x + voxel_bias_r                    (a learned [c_r, r, r, r] bias, for r <= voxel_bias_max_resolution)
    x = clamp(lrelu(ModConv3(lrelu(x), w)), +-256)
    skip = upsample_x2(skip) + ToFeature(x, w)   (modulated 1^3 conv to F channels, no demodulation)

ModConv3 is StyleGAN2's modulated and demodulated convolution: the kernel is scaled per input
channel by styles = affine(w) and normalized per output channel, and the P prompts run as
groups of one grouped conv3d, so no prompt's features reach another's volume. The result is
an F x R^3 feature volume per prompt (32 x 128^3 at paper size); a point x reads it by
trilinear interpolation at x / bound and bias-free MLPs F -> h -> 1 (SDF, plus a sphere of
radius sphere_radius) and F -> h -> 3 (sigmoid color) decode it. The background is a
prompt-agnostic environment map.

Channels per resolution (paper): 512 at 4, 8 and 16; min(512, 256 m) at 32, 128 m at 64, 64 m
at 128, for channel multiplier m. About 88.7 M parameters for m = 1 (44.3 M of them voxel
biases) and 144.8 M for m = 2.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from pydantic import Field
from torch.utils.checkpoint import checkpoint

from amortized3d.generators.common import DecodedField, EnvironmentMap, GeneratorBaseConfig, color_channels
from amortized3d.schema import Int

PRESETS = {
    "paper": dict(base_channels={4: 512, 8: 512, 16: 512, 32: 256, 64: 128, 128: 64}, resolution=128, voxel_bias_max_resolution=64,
                  feature_channels=32, z_dim=64, w_dim=256, mapping_hidden=256, mlp_hidden=64),
    "tiny": dict(base_channels={4: 32, 8: 32, 16: 16, 32: 16}, resolution=32, voxel_bias_max_resolution=16,
                 feature_channels=8, z_dim=16, w_dim=32, mapping_hidden=32, mlp_hidden=32),
}
MAX_CHANNELS = 512
CLAMP = 256.0


class Conv3DConfig(GeneratorBaseConfig):
    """The 3D-conv generator's config: sizes from the preset, channel multiplier m (the recipes use 1 and 2) and
    activation checkpointing of the synthesis blocks (less memory, same results)."""

    preset: Literal[tuple(PRESETS)] = "paper"
    channel_multiplier: Int = Field(1, ge=1, le=8)
    activation_checkpointing: bool = False


class ModulatedConv3d(nn.Module):
    """x [P, in, D, H, W], w [P, w_dim] -> [P, out, D, H, W]; kernel k^3, 'same' padding, equalized learning rate."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, w_dim: int, demodulate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel, kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.affine = nn.Linear(w_dim, in_channels)
        nn.init.normal_(self.affine.weight, 0.0, 1.0 / math.sqrt(w_dim))
        nn.init.ones_(self.affine.bias)  # styles start near 1
        self.gain = 1.0 / math.sqrt(in_channels * kernel**3)
        self.demodulate, self.padding = demodulate, kernel // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        P = x.shape[0]
        styles = self.affine(w)  # [P, in]
        weight = self.weight.unsqueeze(0) * (self.gain * styles).view(P, 1, -1, 1, 1, 1)  # [P, out, in, k, k, k]
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.square().sum(dim=(2, 3, 4, 5), keepdim=True) + 1e-8)
        out = F.conv3d(x.reshape(1, -1, *x.shape[2:]), weight.reshape(-1, *weight.shape[2:]).to(x.dtype), padding=self.padding, groups=P)
        return out.view(P, -1, *out.shape[2:]) + self.bias.view(1, -1, 1, 1, 1).to(out.dtype)


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)


class SynthesisBlock(nn.Module):
    """(x [P, c_in, r/2, ...], skip [P, F, r/2, ...], w) -> (x [P, c_out, r, ...], skip [P, F, r, ...])."""

    def __init__(self, in_channels: int, out_channels: int, resolution: int, w_dim: int, feature_channels: int, voxel_bias: bool):
        super().__init__()
        self.conv0 = ModulatedConv3d(in_channels, out_channels, 3, w_dim)
        self.conv1 = ModulatedConv3d(out_channels, out_channels, 3, w_dim)
        self.to_feature = ModulatedConv3d(out_channels, feature_channels, 1, w_dim, demodulate=False)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.register_buffer("noise", torch.randn(1, 1, resolution, resolution, resolution, generator=torch.Generator().manual_seed(resolution)))
        self.voxel_bias = nn.Parameter(torch.zeros(out_channels, resolution, resolution, resolution)) if voxel_bias else None

    def forward(self, x: torch.Tensor, skip: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = upsample(self.conv0(x, w))
        x = x + self.noise_strength * self.noise.to(x.dtype)
        if self.voxel_bias is not None:
            x = x + self.voxel_bias.unsqueeze(0).to(x.dtype)
        x = self.conv1(F.leaky_relu(x, 0.2), w)
        x = F.leaky_relu(x, 0.2).clamp(-CLAMP, CLAMP)
        return x, upsample(skip) + self.to_feature(x, w)


class Conv3DGenerator(nn.Module):
    """(pooled text [P, D], z [P, z_dim]) -> Conv3DField for those P prompts; ``config`` is its Conv3DConfig;
    latent_channels > 0: latent colors of that width (amortized3d.generators.common)."""


    Config = Conv3DConfig

    def __init__(self, text_dim: int, config: Conv3DConfig, latent_channels: int = 0):
        super().__init__()
        size = PRESETS[config.preset]
        self.latent_channels = latent_channels
        self.config = config
        self.text_dim, self.z_dim, self.w_dim = text_dim, size["z_dim"], size["w_dim"]
        self.sphere_radius, self.bound, self.activation_checkpointing = config.sphere_radius, config.bound, config.activation_checkpointing
        channel_multiplier = config.channel_multiplier
        base = size["base_channels"]
        channels = {r: c if r <= 16 else min(MAX_CHANNELS, c * channel_multiplier) for r, c in base.items()}
        h, feat = size["mapping_hidden"], size["feature_channels"]
        # The latent used when none is given (evaluation, generate without --seed): one fixed N(0, I) draw.
        self.register_buffer("default_z", torch.randn(self.z_dim, generator=torch.Generator().manual_seed(0)))
        self.mapping = nn.Sequential(nn.Linear(self.z_dim, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2))
        self.to_w = nn.Linear(h + text_dim, self.w_dim)
        self.const = nn.Parameter(torch.randn(channels[4], 4, 4, 4))
        self.conv4 = ModulatedConv3d(channels[4], channels[4], 3, self.w_dim)
        self.to_feature4 = ModulatedConv3d(channels[4], feat, 1, self.w_dim, demodulate=False)
        resolutions = [2**k for k in range(3, int(math.log2(size["resolution"])) + 1)]
        self.blocks = nn.ModuleList(
            SynthesisBlock(channels[r // 2], channels[r], r, self.w_dim, feat, r <= size["voxel_bias_max_resolution"]) for r in resolutions
        )
        self.sdf_mlp = nn.Sequential(nn.Linear(feat, size["mlp_hidden"], bias=False), nn.SiLU(), nn.Linear(size["mlp_hidden"], 1, bias=False))
        self.color_mlp = nn.Sequential(nn.Linear(feat, size["mlp_hidden"], bias=False), nn.SiLU(), nn.Linear(size["mlp_hidden"], color_channels(latent_channels), bias=False))
        nn.init.normal_(self.sdf_mlp[-1].weight, 0.0, 1e-3)  # start as the sphere: a near-zero SDF correction
        self.background = EnvironmentMap(latent_channels=latent_channels)

    def describe(self) -> dict[str, int]:
        """Sizes for a memory estimate (builders.describe_generator): float values of the activations kept per prompt
        (the constant, each block's volumes, the feature volume) and per rendered sample (position, features, MLP hidden
        activations, outputs)."""
        last = self.blocks[-1]
        volumes = [self.const.numel()] + [b.conv1.weight.shape[0] * b.noise.numel() * 3 for b in self.blocks]
        feature_channels = last.to_feature.weight.shape[0]
        return {"activations_per_prompt": sum(volumes) + feature_channels * last.noise.numel(),
                "values_per_sample": 3 + feature_channels + 2 * self.sdf_mlp[0].weight.shape[0] + 4}

    def geometry_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if not name.startswith("background.")]

    def decoder_parameters(self) -> list[nn.Parameter]:
        """The SDF and color MLPs (part of geometry_parameters)."""
        return list(self.sdf_mlp.parameters()) + list(self.color_mlp.parameters())

    def background_parameters(self) -> list[nn.Parameter]:
        return list(self.background.parameters())

    def style(self, text_pooled: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """text_pooled [P, D], z [P, z_dim] -> w [P, w_dim]."""
        z = z * torch.rsqrt(z.square().mean(-1, keepdim=True) + 1e-8)
        return self.to_w(torch.cat([self.mapping(z), text_pooled], -1))

    def volume(self, w: torch.Tensor) -> torch.Tensor:
        """w [P, w_dim] -> feature volume [P, F, R, R, R]."""
        P = w.shape[0]
        x = self.conv4(self.const.unsqueeze(0).expand(P, -1, -1, -1, -1).to(w.dtype), w)
        x = F.leaky_relu(x, 0.2)
        skip = self.to_feature4(x, w)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x, skip = checkpoint(block, x, skip, w, use_reentrant=False)
            else:
                x, skip = block(x, skip, w)
        return skip

    def forward(self, text_pooled: torch.Tensor, text_tokens: torch.Tensor | None = None, z: torch.Tensor | None = None) -> "Conv3DField":
        """text_pooled [P, D], z [P, z_dim] (None: default_z for every prompt) -> field of the P prompts; text_tokens is unused."""
        if text_pooled.dim() != 2 or text_pooled.shape[1] != self.text_dim:
            raise ValueError(f"text_pooled must have shape [P, {self.text_dim}], got {tuple(text_pooled.shape)}")
        if z is None:
            z = self.default_z.to(text_pooled.dtype).expand(text_pooled.shape[0], -1)
        if z.shape != (text_pooled.shape[0], self.z_dim):
            raise ValueError(f"z must have shape [P={text_pooled.shape[0]}, {self.z_dim}], got {tuple(z.shape)}")
        return Conv3DField(self, self.volume(self.style(text_pooled, z)))


class Conv3DField(DecodedField):
    """Field of P prompts: each prompt's points read only its own feature volume."""

    def __init__(self, model: Conv3DGenerator, volume: torch.Tensor):
        self.model, self.volume = model, volume  # [P, F, R, R, R]
        self.n_prompts = volume.shape[0]

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """points [P, N, 3] -> trilinear features [P, N, F] (the border value outside the box)."""
        P, N, _ = points.shape
        if P != self.n_prompts:
            raise ValueError(f"points must have shape [P={self.n_prompts}, N, 3], got {tuple(points.shape)}")
        grid = (points / self.model.bound).view(P, 1, 1, N, 3).to(self.volume.dtype)
        sampled = F.grid_sample(self.volume, grid, mode="bilinear", padding_mode="border", align_corners=True)  # [P, F, 1, 1, N]
        return sampled.view(P, -1, N).transpose(1, 2)
