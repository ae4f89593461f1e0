"""A prompt-agnostic environment map: ray direction -> background color, shared by all prompts.

    rgb(d) = sigmoid(MLP(gamma(d))),  gamma(d) = (d, sin(2^k pi d), cos(2^k pi d)) for k < n_frequencies

Used by the 3D-conv and triplane generators (the reference recipes' neural environment map);
Hyper-iNGP has its own text-conditioned background.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class EnvironmentMap(nn.Module):
    """Unit directions [P, R, 3] -> rgb [P, R, 3] in [0, 1]."""

    def __init__(self, n_frequencies: int = 4, hidden: int = 32):
        super().__init__()
        self.register_buffer("frequencies", (2.0 ** torch.arange(n_frequencies)) * math.pi, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(3 + 6 * n_frequencies, hidden), nn.SiLU(), nn.Linear(hidden, 3))

    def forward(self, directions: torch.Tensor) -> torch.Tensor:
        angles = directions.unsqueeze(-1) * self.frequencies  # [..., 3, F]
        encoded = torch.cat([directions, angles.sin().flatten(-2), angles.cos().flatten(-2)], -1)
        return torch.sigmoid(self.mlp(encoded.to(self.mlp[0].weight.dtype)).float())
