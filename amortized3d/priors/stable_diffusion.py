"""Stable Diffusion (1.x / 2.x, any diffusers-format checkpoint) as a frozen score-distillation prior.

Default model: stabilityai/stable-diffusion-2-1-base. The prior implements the same interface
as the analytic prior:

    encode(images [B, 3, H, W] in [0, 1]) -> latents [B, 4, r/f, r/f], differentiable
        resize to r x r (prior.resolution, bilinear), map to [-1, 1], VAE-encode, take a posterior
        sample and multiply by the VAE's scaling factor (0.18215 for SD); f is the VAE's
        downsampling factor (8 for SD), so r = 512 gives 64 x 64 latents.
    decode(latents) -> images [B, 3, r, r] in [0, 1]
    predict_noise(x_t, t, prompts, cameras, unconditional) -> eps [N, 4, h, w]
        one UNet call for the whole batch: conditional rows see their prompt's token
        embeddings, unconditional rows the empty prompt's. A v-prediction checkpoint's output
        is converted to eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t.
    alphas_cumprod [1000] from the checkpoint's own scheduler config.

Cost of prior.resolution: the VAE encoder runs at r x r with gradient, and its activations
dominate memory (they scale with r^2); the UNet runs on (r / 8)^2 latents, so r = 256 makes
both about 4x cheaper than the reference 512 at the price of a prior that was trained at 512.
The weights are frozen (requires_grad False), in fp16 or bf16 on a GPU (prior.dtype), and the
UNet uses channels_last memory format.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from amortized3d.rendering.cameras import Cameras
from amortized3d.text.clip_encoder import CLIPTextEncoder

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
SUBFOLDERS = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
TEXT_SUBFOLDERS = ["text_encoder", "tokenizer"]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on CUDA and fp32 elsewhere (half-precision convolutions are slow or missing on CPU)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


class StableDiffusionPrior:
    """Frozen UNet + VAE + scheduler constants of a Stable Diffusion checkpoint; text from ``text_encoder``."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        text_encoder: CLIPTextEncoder | None = None,
        resolution: int = 512,
        dtype: str = "auto",
        device: str | torch.device = "cpu",
    ):
        from amortized3d._compat import import_torchvision_safely

        import_torchvision_safely()
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        from amortized3d.priors.pretrained import load_component, resolve_model_dir

        device = torch.device(device)
        self.model_name = model
        self.dtype = resolve_dtype(dtype, device)
        folder = resolve_model_dir(model, SUBFOLDERS)
        self.text_encoder = text_encoder if text_encoder is not None else CLIPTextEncoder(folder, model, device, self.dtype)
        self.unet = load_component(UNet2DConditionModel, folder, "unet", model, torch_dtype=self.dtype)
        self.vae = load_component(AutoencoderKL, folder, "vae", model, torch_dtype=self.dtype)
        scheduler = load_component(DDPMScheduler, folder, "scheduler", model)
        for module in (self.unet, self.vae):
            module.requires_grad_(False).eval().to(device)
        self.unet.to(memory_format=torch.channels_last)
        if self.unet.config.cross_attention_dim != self.text_encoder.dim:
            raise ValueError(
                f"the UNet of {model!r} expects {self.unet.config.cross_attention_dim}-d text tokens but its text encoder "
                f"gives {self.text_encoder.dim}-d ones; the folder mixes components of different models"
            )
        self.device = device
        self.resolution = int(resolution)
        self.latent_scale = float(self.vae.config.scaling_factor)
        self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.resolution % self.vae_factor:
            raise ValueError(f"prior.resolution={resolution} must be a multiple of the VAE's downsampling factor {self.vae_factor}")
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{model!r} predicts {self.prediction_type!r}; supported: epsilon, v_prediction")
        self.alphas_cumprod = scheduler.alphas_cumprod.float().to(device)  # [T]
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> latents [B, 4, r/f, r/f] (float32), with gradient to the images."""
        x = images
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        posterior = self.vae.encode((2.0 * x - 1.0).to(self.dtype)).latent_dist
        return posterior.sample(generator=generator).float() * self.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 4, h, w] -> images [B, 3, h f, w f] in [0, 1]."""
        images = self.vae.decode((latents / self.latent_scale).to(self.dtype)).sample.float()
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)

    def text_condition(self, prompts: list[str], unconditional: torch.Tensor) -> torch.Tensor:
        """Token embeddings [N, 77, C]: the prompt's for conditional rows, the empty prompt's for the rest."""
        rows = ["" if bool(u) else p for p, u in zip(prompts, unconditional)]
        return self.text_encoder.encode(rows).tokens

    @torch.no_grad()
    def predict_noise(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompts: list[str],
        cameras: Cameras,
        unconditional: torch.Tensor,
    ) -> torch.Tensor:
        """eps(x_t, t, condition) in one UNet call; noisy [N, 4, h, w], timesteps long [N], prompts (N),
        cameras [N] (unused by this prior), unconditional bool [N] -> eps float32 [N, 4, h, w]."""
        condition = self.text_condition(prompts, unconditional).to(self.device, self.dtype)
        x = noisy.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        out = self.unet(x, timesteps.to(self.device), encoder_hidden_states=condition).sample.float()
        if self.prediction_type == "v_prediction":
            abar = self.alphas_cumprod[timesteps.to(self.device)].view(-1, 1, 1, 1)
            out = abar.sqrt() * out + (1.0 - abar).sqrt() * noisy.to(self.device).float()
        return out


def load_stable_diffusion_text_encoder(model: str, device="cpu", dtype: str = "auto") -> CLIPTextEncoder:
    """Only the tokenizer and text encoder of ``model`` (what generate needs to condition a trained generator)."""
    from amortized3d.priors.pretrained import resolve_model_dir

    device = torch.device(device)
    folder: Path = resolve_model_dir(model, TEXT_SUBFOLDERS)
    return CLIPTextEncoder(folder, model, device, resolve_dtype(dtype, device))
