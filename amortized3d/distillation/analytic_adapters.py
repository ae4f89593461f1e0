"""The learned branches of VSD and LODS for the analytic prior: the exact prediction plus a small learned change.

The diffusers priors' branches (amortized3d.distillation.adapters) are the pretrained UNet with a LoRA or a learned
token embedding, each starting as the pretrained branch. The analytic prior has no weights to adapt, so its
branches add a small network to its exact prediction, and that network starts at exactly zero (its last layer is
zero-initialized: the LoRA analogue, whose B matrix starts at zero):

    AnalyticVSD            eps_phi'(x_t, t, pi, y)  = eps*_c(x_t, t, y, pi) + f(x_t, t, pi, e(y))
    AnalyticLODSLoRA       eps_psi(x_t, t)          = eps*_u(x_t, t)        + f(x_t, t, pi)
    AnalyticLODSEmbedding  eps_phi(x_t; alpha, t)   = E[eps | x_t] for x ~ N(alpha, S^2 I)

with eps*_c, eps*_u the analytic prior's conditional and unconditional predictions (amortized3d.priors.analytic),
pi the camera (its camera-to-world matrix; while VSD trains, the learned term sees it zeroed with probability
0.1, as VSDLoRA's camera embedding does, while the exact term always renders the real camera), e(y) a
hashed embedding of the prompt (amortized3d.text.hashed_encoder; the analytic prior has no text encoder) and f a
two-layer convolutional network on x_t with a per-image embedding of (t, pi[, e(y)]) added to its hidden layer.

The LODS embedding: in a text-to-image prior the unconditional branch is the model conditioned on the empty
prompt's token embedding, and LODS learns that embedding. The analytic prior's unconditional branch is the
Gaussian N(m 1, S^2 I) (prior.uncond_mean m, prior.uncond_std S); its only "condition" is the mean m, so the
learned null embedding alpha is a mean image [3, H, W] (at the render resolution), initialized to m everywhere,
which makes the branch start as the pretrained unconditional one exactly.

All three train by the shared alignment loss (adapters.NoisePredictorAdapter.alignment_loss) at the learning
rates of distill.adapter_lr (builders.ADAPTER_LR), like the diffusers priors' branches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from amortized3d.distillation.adapters import NoisePredictorAdapter, camera_keep_mask
from amortized3d.interfaces import Conditioning
from amortized3d.priors.analytic import AnalyticPrior, gaussian_noise_prediction
from amortized3d.priors.branches import COND, UNCOND
from amortized3d.priors.schedule import NUM_TRAIN_TIMESTEPS
from amortized3d.rendering.cameras import Cameras
from amortized3d.text.hashed_encoder import HashedTextEncoder

TIME_FREQUENCIES = 8
TEXT_DIM = 32


def timestep_features(t: torch.Tensor) -> torch.Tensor:
    """Sinusoidal features of t / T: long [N] -> [N, 2 TIME_FREQUENCIES]."""
    angles = (t.float() / NUM_TRAIN_TIMESTEPS).unsqueeze(-1) * (2.0 ** torch.arange(TIME_FREQUENCIES, device=t.device)) * math.pi
    return torch.cat([angles.sin(), angles.cos()], -1)


class Correction(nn.Module):
    """f(x_t, condition): x_t [N, C, H, W], condition [N, K] -> [N, C, H, W]; exactly zero at initialization.

    h = SiLU(conv3x3(x_t) + W c), out = conv3x3(h), the output convolution's weight and bias zero."""

    def __init__(self, condition_dim: int, channels: int = 3, hidden: int = 32):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(condition_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(self.conv_in(x_t) + self.embed(condition)[:, :, None, None])
        return self.conv_out(h)


def camera_features(cameras: Cameras) -> torch.Tensor:
    """The flattened camera-to-world matrices: cameras [N] -> [N, 16]."""
    return cameras.c2w.reshape(-1, 16).float()


class AnalyticVSD(NoisePredictorAdapter):
    """eps_phi'(x_t, t, pi, y) = eps*_c(x_t, t, y, pi) + f(x_t, t, pi, e(y))."""

    def __init__(self, prior: AnalyticPrior):
        super().__init__()
        self.prior = prior
        self.text = HashedTextEncoder(dim=TEXT_DIM)
        self.correction = Correction(2 * TIME_FREQUENCIES + 16 + TEXT_DIM)

    def training_prediction(self, x_t, t, cond, generator) -> torch.Tensor:
        # camera dropout reaches the learned term's camera input only: the exact conditional renders the real camera
        return self.predict_noise(x_t, t, cond, keep=camera_keep_mask(cond.cameras, generator))

    def predict_noise(self, noisy, timesteps, cond, keep: torch.Tensor | None = None) -> torch.Tensor:
        """keep bool [N]: the rows whose camera the learned term sees (the others see a zero camera); None: all."""
        exact = self.prior.predict_noise(noisy, timesteps, cond, torch.full((len(cond),), COND))
        text = self.text.encode(cond.prompts).pooled.to(noisy.device)
        camera = camera_features(cond.cameras).to(noisy.device)
        if keep is not None:
            camera = camera * keep.to(noisy.device).view(-1, 1)
        condition = torch.cat([timestep_features(timesteps), camera, text], -1)
        return exact + self.correction(noisy, condition)


class AnalyticLODSLoRA(NoisePredictorAdapter):
    """eps_psi(x_t, t) = eps*_u(x_t, t) + f(x_t, t, pi)."""

    def __init__(self, prior: AnalyticPrior):
        super().__init__()
        self.prior = prior
        self.correction = Correction(2 * TIME_FREQUENCIES + 16)

    def predict_noise(self, noisy, timesteps, cond: Conditioning) -> torch.Tensor:
        exact = self.prior.predict_noise(noisy, timesteps, cond, torch.full((len(cond),), UNCOND))
        condition = torch.cat([timestep_features(timesteps), camera_features(cond.cameras).to(noisy.device)], -1)
        return exact + self.correction(noisy, condition)


class AnalyticLODSEmbedding(NoisePredictorAdapter):
    """eps_phi(x_t; alpha, t) = E[eps | x_t] for x ~ N(alpha, S^2 I), alpha a learned mean image [3, H, W]."""

    def __init__(self, prior: AnalyticPrior, height: int, width: int):
        super().__init__()
        self.prior = prior
        self.embedding = nn.Parameter(torch.full((3, height, width), float(prior.uncond_mean)))

    def predict_noise(self, noisy, timesteps, cond: Conditioning) -> torch.Tensor:
        if noisy.shape[-2:] != self.embedding.shape[-2:]:
            raise ValueError(f"the learned null embedding is {tuple(self.embedding.shape[-2:])} pixels, the images "
                             f"{tuple(noisy.shape[-2:])}: it is built at render.height x render.width")
        alphabar = self.prior.alphas_cumprod.to(noisy.device)[timesteps]
        return gaussian_noise_prediction(noisy, alphabar, self.embedding, self.prior.uncond_std)
