"""Hyper-iNGP (ATT3D): a shared hash grid decoded by per-prompt MLPs made by a hypernetwork.

For prompt p with pooled text embedding t_p and a point x:

    e(x)       = HashGrid(x)                                   (prompt-agnostic, 32-d by default)
    W_p        = Hypernetwork(t_p)                              (the weights of two bias-free MLPs)
    sdf_p(x)   = MLP_sdf(e(x); W_p) + (|x| - sphere_radius)     (starts as a sphere)
    rgb_p(x)   = sigmoid(MLP_color(e(x); W_p))

Each MLP is enc -> mlp_hidden -> out without biases, with SiLU hidden activations:
SiLU keeps the SDF smooth, which the finite-difference normals and the eikonal
term see. The background is the same construction on unit ray directions: a tiny
dense grid over [-1, 1]^3 and a bias-free MLP (enc -> background_hidden -> 3,
SiLU, sigmoid) whose weights come from a second hypernetwork, so the geometry
and the background can use different learning rates.

Hypernetwork: Linear(text_dim -> hyper_hidden, no bias) -> LayerNorm -> SiLU ->
Linear(hyper_hidden -> n_weights), optionally with spectral norm on both Linear
layers. Its last layer starts so that every generated weight matrix has a
fan-in scale (std sqrt(2 / fan_in) before an activation, sqrt(1 / fan_in) at the
output) for any text embedding: LayerNorm fixes the statistics of its input.

Shapes: P prompts, N points per prompt, R rays per prompt, D text width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as add_spectral_norm

from amortized3d.generators.common import HashGridConfig, color_activation, color_channels
from amortized3d.generators.hash_grid import HashGrid
from amortized3d.rendering.volume import SDFRepresentation
from amortized3d.schema import Int

# The background's direction grid and MLP (fixed sizes, not part of the config).
BACKGROUND = dict(n_levels=4, base_resolution=2, per_level_scale=2.0, log2_hashmap_size=16, hidden=32, hyper_hidden=64)


class HyperINGPConfig(HashGridConfig):
    """Hyper-iNGP's config: the hash grid's sizes, the hypernetwork's and the per-prompt MLPs' widths.

    spectral_norm: on the hypernetwork's linear layers; null in a config means on for SDS (ScaleDreamer Sec. 4.2
    and ATT3D: training the hypernetwork with SDS fails without it, its gradients being about 10x ASD's), off
    otherwise (the experiment config resolves it; the model reads null as off).
    """

    hyper_hidden: Int = Field(64, ge=1, le=4096)
    spectral_norm: bool | None = None


def silu_second_moment() -> float:
    """E[silu(z)^2] for z ~ N(0, 1), by quadrature (about 0.3557)."""
    z = torch.linspace(-12.0, 12.0, 48001, dtype=torch.float64)
    density = torch.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    return float((F.silu(z) ** 2 * density).sum() * (z[1] - z[0]))


class Hypernetwork(nn.Module):
    """Text embedding -> weights of a bias-free MLP.

    text [P, D] -> list of weight matrices [P, fan_in, fan_out], one per entry of ``layer_shapes``
    (each (fan_in, fan_out)). W = gain * (A silu(LN(B t)) + b), flattened layer after layer.
    ``activated[i]`` says whether layer i is followed by an activation (it sets the init scale).
    """

    def __init__(
        self, text_dim: int, hidden: int, layer_shapes: list[tuple[int, int]], activated: list[bool], spectral_norm: bool
    ):
        super().__init__()
        if len(activated) != len(layer_shapes):
            raise ValueError(f"activated has {len(activated)} entries but layer_shapes has {len(layer_shapes)}; give one per layer")
        self.layer_shapes = [tuple(shape) for shape in layer_shapes]
        self.layer_sizes = [fan_in * fan_out for fan_in, fan_out in self.layer_shapes]
        self.n_weights = sum(self.layer_sizes)
        self.text_projection = nn.Linear(text_dim, hidden, bias=False)
        self.norm = nn.LayerNorm(hidden)
        self.weight_head = nn.Linear(hidden, self.n_weights)

        # Target std of each generated weight: He-like before an activation, 1/sqrt(fan_in) at the output.
        target_std = torch.cat(
            [
                torch.full((size,), math.sqrt((2.0 if is_hidden else 1.0) / fan_in))
                for (fan_in, _), size, is_hidden in zip(self.layer_shapes, self.layer_sizes, activated)
            ]
        )
        # silu(LN(.)) has E[h_i^2] = m2 per feature, so row a of the head gives std |a| sqrt(m2).
        m2 = silu_second_moment()
        with torch.no_grad():
            self.weight_head.weight.normal_().mul_((target_std / math.sqrt(hidden * m2))[:, None])
            self.weight_head.bias.zero_()
        gain = torch.ones(self.n_weights)
        if spectral_norm:
            add_spectral_norm(self.text_projection)
            add_spectral_norm(self.weight_head)
            # Spectral norm rescales the head to unit largest singular value; a fixed per-weight gain
            # restores the fan-in scale (the map stays Lipschitz with that constant).
            with torch.no_grad():
                row_norm = self.weight_head.weight.norm(dim=1)
                gain = target_std / (row_norm * math.sqrt(m2))
        self.register_buffer("output_gain", gain)

    def forward(self, text: torch.Tensor) -> list[torch.Tensor]:
        """text [P, D] -> [W_1 [P, fan_in_1, fan_out_1], W_2 ...]."""
        hidden = F.silu(self.norm(self.text_projection(text)))
        flat = self.weight_head(hidden) * self.output_gain  # [P, n_weights]
        chunks = flat.split(self.layer_sizes, dim=-1)
        return [chunk.view(-1, fan_in, fan_out) for chunk, (fan_in, fan_out) in zip(chunks, self.layer_shapes)]


class HyperINGP(nn.Module):
    """Prompt-amortized generator: pooled text [P, D] -> HyperINGPField for those P prompts; ``config`` is its
    HyperINGPConfig; latent_channels > 0: latent colors of that width (amortized3d.generators.common)."""


    Config = HyperINGPConfig

    def __init__(self, text_dim: int, config: HyperINGPConfig, latent_channels: int = 0):
        super().__init__()
        self.config, self.latent_channels = config, latent_channels
        C = color_channels(latent_channels)
        self.text_dim, self.z_dim = text_dim, 0  # no latent: one asset per prompt
        self.mlp_hidden = config.mlp_hidden
        self.sphere_radius = config.sphere_radius
        self.grid = HashGrid(**config.grid_sizes())
        enc = self.grid.output_dim
        # Layer order: SDF hidden, SDF out, color hidden, color out.
        h, spectral_norm = config.mlp_hidden, bool(config.spectral_norm)
        self.hypernet = Hypernetwork(
            text_dim, config.hyper_hidden, [(enc, h), (h, 1), (enc, h), (h, C)],
            [True, False, True, False],
            spectral_norm,
        )
        self.background_grid = HashGrid(
            BACKGROUND["n_levels"], 2, BACKGROUND["log2_hashmap_size"], BACKGROUND["base_resolution"], BACKGROUND["per_level_scale"], 1.0
        )
        self.background_hypernet = Hypernetwork(
            text_dim,
            BACKGROUND["hyper_hidden"],
            [(self.background_grid.output_dim, BACKGROUND["hidden"]), (BACKGROUND["hidden"], C)],
            [True, False],
            spectral_norm,
        )

    @staticmethod
    def n_generated_weights(encoding_dim: int, mlp_hidden: int) -> int:
        """Weights per prompt of the SDF and color MLPs: 2 E H + 4 H (4352 for E = 32, H = 64)."""
        return encoding_dim * mlp_hidden + mlp_hidden * 1 + encoding_dim * mlp_hidden + mlp_hidden * 3

    def describe(self) -> dict[str, int]:
        """Sizes for a memory estimate (builders.describe_generator): float values of the activations kept per prompt
        (its generated MLP weights) and per rendered sample (position, grid features and their finite-difference
        neighbours, MLP hidden activations, outputs)."""
        return {"activations_per_prompt": self.hypernet.n_weights,
                "values_per_sample": 3 + self.grid.output_dim * 9 + 2 * self.mlp_hidden + 4}

    def geometry_parameters(self) -> list[nn.Parameter]:
        """Hash grid and SDF/color hypernetwork (the geometry learning rate)."""
        return list(self.grid.parameters()) + list(self.hypernet.parameters())

    def decoder_parameters(self) -> list[nn.Parameter]:
        """None: the per-prompt MLPs that decode the grid's features are the hypernetwork's output, not parameters."""
        return []

    def background_parameters(self) -> list[nn.Parameter]:
        """Direction grid and background hypernetwork (the background learning rate)."""
        return list(self.background_grid.parameters()) + list(self.background_hypernet.parameters())

    def forward(self, text_pooled: torch.Tensor, text_tokens: torch.Tensor | None = None, z: torch.Tensor | None = None) -> "HyperINGPField":
        """text_pooled [P, D] (text_tokens [P, T, D] and z are accepted and unused) -> field for the P prompts."""
        if text_pooled.dim() != 2 or text_pooled.shape[1] != self.text_dim:
            raise ValueError(
                f"text_pooled must have shape [P, {self.text_dim}], got {tuple(text_pooled.shape)}; "
                "pass the pooled text embedding, or build the model with a matching text_dim"
            )
        sdf_hidden, sdf_out, color_hidden, color_out = self.hypernet(text_pooled)
        background_hidden, background_out = self.background_hypernet(text_pooled)
        return HyperINGPField(self, sdf_hidden, sdf_out, color_hidden, color_out, background_hidden, background_out)


def block_diagonal_out(sdf_out: torch.Tensor, color_out: torch.Tensor) -> torch.Tensor:
    """[P, H, 1], [P, H, C] -> [P, 2H, 1 + C] = [[sdf_out, 0], [0, color_out]], so one bmm decodes both heads."""
    P, H, _ = sdf_out.shape
    zeros_sdf, zeros_color = sdf_out.new_zeros(P, H, color_out.shape[-1]), sdf_out.new_zeros(P, H, 1)
    return torch.cat([torch.cat([sdf_out, zeros_sdf], -1), torch.cat([zeros_color, color_out], -1)], 1)


class HyperINGPField(SDFRepresentation):
    """The Field of P prompts: shared grids, per-prompt MLP weights (prompt p only sees row p)."""

    def __init__(
        self,
        model: HyperINGP,
        sdf_hidden: torch.Tensor,
        sdf_out: torch.Tensor,
        color_hidden: torch.Tensor,
        color_out: torch.Tensor,
        background_hidden: torch.Tensor,
        background_out: torch.Tensor,
    ):
        self.model = model
        self.n_prompts = sdf_hidden.shape[0]
        self.sdf_hidden = sdf_hidden  # [P, E, H]
        self.sdf_out = sdf_out  # [P, H, 1]
        self.color_hidden = color_hidden  # [P, E, H]
        self.color_out = color_out  # [P, H, C] (C = 3, or the latent channels)
        self.background_hidden = background_hidden  # [P, Eb, Hb]
        self.background_out = background_out  # [P, Hb, C]

    def _check(self, points: torch.Tensor, name: str) -> None:
        if points.dim() != 3 or points.shape[0] != self.n_prompts or points.shape[2] != 3:
            raise ValueError(
                f"{name} must have shape [P={self.n_prompts}, N, 3], got {tuple(points.shape)}; "
                "give one row of points per prompt the field was built for"
            )

    def _encode(self, grid: HashGrid, points: torch.Tensor) -> torch.Tensor:
        """[P, N, 3] -> [P, N, E], one grid pass over all P * N points (row-major, so rows stay per prompt)."""
        P, N, _ = points.shape
        return grid(points.reshape(P * N, 3)).view(P, N, grid.output_dim)

    def _sphere(self, points: torch.Tensor) -> torch.Tensor:
        return points.norm(dim=-1) - self.model.sphere_radius

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """points [P, N, 3] -> sdf [P, N]; skips the color MLP."""
        self._check(points, "points")
        hidden = F.silu(torch.bmm(self._encode(self.model.grid, points), self.sdf_hidden))  # [P, N, H]
        return torch.bmm(hidden, self.sdf_out).squeeze(-1) + self._sphere(points)

    def sdf_and_color(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points [P, N, 3] -> (sdf [P, N], rgb [P, N, 3] in [0, 1] or latents [P, N, C]); both hidden layers in one bmm."""
        self._check(points, "points")
        encoding = self._encode(self.model.grid, points)
        hidden = F.silu(torch.bmm(encoding, torch.cat([self.sdf_hidden, self.color_hidden], -1)))  # [P, N, 2H]
        out = torch.bmm(hidden, block_diagonal_out(self.sdf_out, self.color_out))  # [P, N, 1 + C]
        return out[..., 0] + self._sphere(points), color_activation(out[..., 1:], self.model.latent_channels)

    def background(self, directions: torch.Tensor) -> torch.Tensor:
        """Unit directions [P, R, 3] -> rgb [P, R, 3] in [0, 1] (latents [P, R, C] with latent colors)."""
        self._check(directions, "directions")
        hidden = F.silu(torch.bmm(self._encode(self.model.background_grid, directions), self.background_hidden))
        return color_activation(torch.bmm(hidden, self.background_out), self.model.latent_channels)
