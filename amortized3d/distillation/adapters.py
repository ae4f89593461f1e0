"""The learned branches of VSD and LODS: small trainable parts beside the frozen Stable Diffusion prior.

Each adapter answers one noise prediction for a batch, ``predict_noise(x_t, t, cond)``
(one UNet call, with gradient to the adapter's own parameters), and trains itself with
``alignment_loss(x, cond, generator)`` on detached renders: a fresh t ~ U{0, ..., 999}
and fresh noise eps, loss = mean ||eps_adapter(x_t, t) - eps||^2. The generator update uses the
adapter's prediction without gradient (score_distillation), the adapter update uses this loss;
the trainer takes one step of each per iteration. One set of adapter parameters is shared by
all prompts of the corpus (the amortized setting), not one per prompt.

    VSDLoRA        (ProlificDreamer, as compared in ScaleDreamer) LoRA on the UNet's attention
                   projections plus a camera MLP (16 -> D -> D on the flattened camera-to-world
                   matrix, added to the timestep embedding); eps_phi'(x_t; t, pi, y), the
                   conditional branch with guidance 1. During training the camera is zeroed
                   with probability 0.1. The camera MLP's last layer starts at zero (ProlificDreamer's
                   starts random), so the branch starts as the pretrained conditional one.
    LODSEmbedding  (LODS, Eq. 7-8) a learnable unconditional token embedding alpha [77, C],
                   initialized from the empty prompt's; eps_phi(x_t; alpha, t).
    LODSLoRA       (LODS, Eq. 9-10) LoRA on the UNet, applied at scale 0.5, used for the
                   unconditional branch only: eps_psi(x_t; empty prompt, t).

LoRA adapters are peft's (through diffusers' ``add_adapter``), rank ``rank`` with alpha = rank,
on to_q, to_k, to_v and to_out.0 of every attention layer; peft starts them at zero
(B = 0), so each adapter starts as the pretrained model. Trainable parameters are float32
even when the UNet is fp16. Every branch goes through the prior's own prediction path,
``DiffusionPrior.unet_noise``: v-prediction checkpoints are converted to eps, and DeepFloyd IF's
variance channels are dropped, exactly as for the pretrained branches.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from amortized3d.interfaces import Conditioning
from amortized3d.priors.branches import COND, UNCOND
from amortized3d.priors.schedule import NUM_TRAIN_TIMESTEPS, add_noise
from amortized3d.priors.diffusers_prior import DiffusionPrior
from amortized3d.rendering.cameras import Cameras

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
VSD_CAMERA_DROPOUT = 0.1
LODS_LORA_SCALE = 0.5


def add_lora(prior: DiffusionPrior, name: str, rank: int) -> list[nn.Parameter]:
    """Add a peft LoRA adapter called ``name`` to the prior's UNet; -> its parameters (float32, trainable)."""
    from peft import LoraConfig

    unet = prior.unet
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True), adapter_name=name)
    params = [p for n, p in unet.named_parameters() if "lora_" in n and f".{name}." in n]
    for p in params:
        p.data = p.data.float()
    unet.disable_adapters()  # the pretrained branches see the plain UNet
    for p in params:  # peft's disable_adapters also freezes the adapter; it is ours to train
        p.requires_grad_(True)
    return params


@contextmanager
def lora_active(prior: DiffusionPrior, name: str, params: list[nn.Parameter], scale: float = 1.0):
    """Run the UNet with adapter ``name`` at ``scale`` inside the block, plain outside it; ``params``
    (the adapter's) stay trainable throughout (peft's enable/disable toggles requires_grad)."""
    prior.unet.enable_adapters()
    prior.unet.set_adapters([name], weights=[scale])
    try:
        yield
    finally:
        prior.unet.disable_adapters()
        for p in params:
            p.requires_grad_(True)


def camera_keep_mask(cameras: Cameras, generator: torch.Generator) -> torch.Tensor:
    """VSD's camera dropout while its branch trains: which cameras keep their condition, each dropped with
    probability VSD_CAMERA_DROPOUT (one draw per camera from ``generator``). cameras [N] -> bool [N]."""
    return (torch.rand(cameras.shape, generator=generator) >= VSD_CAMERA_DROPOUT).to(cameras.c2w.device)


class NoisePredictorAdapter(nn.Module):
    """Shared parts: the alignment loss on detached renders."""

    prior: DiffusionPrior

    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """noisy [N, C, h, w], timesteps long [N], cond of N rows -> eps [N, C, h, w], with gradient to the adapter."""
        raise NotImplementedError

    def alignment_loss(self, x: torch.Tensor, cond: Conditioning, generator: torch.Generator) -> torch.Tensor:
        """mean ||eps_adapter(x_t, t) - eps||^2 with t ~ U{0..999} and fresh eps; x [B, 4, h, w] is detached here."""
        x = x.detach()
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (x.shape[0],), generator=generator).to(x.device)
        noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        x_t = add_noise(x, noise, t, self.prior.alphas_cumprod)
        return F.mse_loss(self.training_prediction(x_t, t, cond, generator), noise)

    def training_prediction(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning, generator: torch.Generator) -> torch.Tensor:
        """The prediction the alignment loss trains: predict_noise, with VSD's camera dropout where it applies."""
        return self.predict_noise(x_t, t, cond)


class VSDLoRA(NoisePredictorAdapter):
    """eps_phi'(x_t; t, pi, y): LoRA UNet conditioned on the prompt and the camera."""

    def __init__(self, prior: DiffusionPrior, rank: int = 4):
        super().__init__()
        from diffusers.models.embeddings import TimestepEmbedding

        self.prior = prior  # a plain attribute: the frozen prior's weights are not the adapter's state
        self.lora = nn.ParameterList(add_lora(prior, "vsd", rank))
        width = prior.unet.time_embedding.linear_2.out_features
        self.camera = TimestepEmbedding(16, width).to(prior.device)
        with torch.no_grad():  # the camera's term starts at zero, so the branch starts as the pretrained conditional one
            self.camera.linear_2.weight.zero_()
            self.camera.linear_2.bias.zero_()

    def training_prediction(self, x_t, t, cond, generator) -> torch.Tensor:
        cameras = cond.cameras
        keep = camera_keep_mask(cameras, generator)  # a dropped camera is an all-zero camera-to-world matrix
        dropped = Cameras(cameras.c2w * keep.view(-1, 1, 1), cameras.fovy, cameras.elevation, cameras.azimuth, cameras.distance)
        return self.predict_noise(x_t, t, replace(cond, cameras=dropped))

    def predict_noise(self, noisy, timesteps, cond) -> torch.Tensor:
        unet = self.prior.unet
        tokens = self.prior.text_condition(cond, torch.full((len(cond),), COND), views=False)
        labels = cond.cameras.c2w.reshape(-1, 16).to(self.prior.device, torch.float32)
        unet.class_embedding = _CastTo(self.camera, self.prior.dtype)
        try:
            with lora_active(self.prior, "vsd", list(self.lora)):
                return self.prior.unet_noise(noisy, timesteps, tokens, class_labels=labels)
        finally:
            unet.class_embedding = None


class LODSEmbedding(NoisePredictorAdapter):
    """eps_phi(x_t; alpha, t) with a learnable unconditional token embedding alpha [77, C]."""

    def __init__(self, prior: DiffusionPrior):
        super().__init__()
        self.prior = prior
        null = prior.text_encoder.encode([""]).tokens[0]  # [77, C]
        self.embedding = nn.Parameter(null.clone().float().to(prior.device))

    def predict_noise(self, noisy, timesteps, cond) -> torch.Tensor:
        tokens = self.embedding.unsqueeze(0).expand(noisy.shape[0], -1, -1)
        return self.prior.unet_noise(noisy, timesteps, tokens)


class LODSLoRA(NoisePredictorAdapter):
    """eps_psi(x_t; empty prompt, t): the UNet with a LoRA at scale 0.5 on the unconditional branch."""

    def __init__(self, prior: DiffusionPrior, rank: int = 4):
        super().__init__()
        self.prior = prior
        self.lora = nn.ParameterList(add_lora(prior, "lods", rank))

    def predict_noise(self, noisy, timesteps, cond) -> torch.Tensor:
        tokens = self.prior.text_condition(cond, torch.full((len(cond),), UNCOND))
        with lora_active(self.prior, "lods", list(self.lora), LODS_LORA_SCALE):
            return self.prior.unet_noise(noisy, timesteps, tokens)


class _CastTo(nn.Module):
    """Runs a float32 module and casts its output to the UNet's dtype."""

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x):
        return self.module(x).to(self.dtype)
