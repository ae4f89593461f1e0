"""The DDPM noise schedule shared by every prior.

Stable Diffusion's schedule: 1000 steps, "scaled linear" betas from 0.00085 to
0.012, i.e. beta_t = (sqrt(b0) + t / 999 (sqrt(b1) - sqrt(b0)))^2 and
alphabar_t = prod_{s<=t} (1 - beta_s). Noising: x_t = sqrt(alphabar_t) x + sqrt(1 - alphabar_t) eps.
"""

from __future__ import annotations

import torch

NUM_TRAIN_TIMESTEPS = 1000


def stable_diffusion_alphas_cumprod() -> torch.Tensor:
    """alphabar_t for t = 0..999 as float32 [1000], from diffusers' DDPMScheduler."""
    from diffusers import DDPMScheduler  # imported here: diffusers takes about a second to import

    scheduler = DDPMScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    return scheduler.alphas_cumprod.to(torch.float32).clone()


def add_noise(x: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps. x, noise [B, ...], timesteps long [B] -> [B, ...]."""
    abar = alphas_cumprod.to(x.device)[timesteps].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return abar.sqrt() * x + (1 - abar).sqrt() * noise


def predict_clean(noisy: torch.Tensor, eps: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """add_noise solved for x with eps given (the one-step denoised estimate): x_hat = (x_t - sqrt(1 - abar_t) eps) /
    sqrt(abar_t). noisy, eps [B, ...], timesteps long [B] -> [B, ...]."""
    abar = alphas_cumprod.to(noisy.device)[timesteps].to(noisy.dtype).reshape(-1, *([1] * (noisy.dim() - 1)))
    return (noisy - (1 - abar).sqrt() * eps) / abar.sqrt()


def ddim_scheduler(alphas_cumprod: torch.Tensor, num_inference_steps: int):
    """diffusers' DDIMScheduler on the schedule ``alphas_cumprod`` [T] (through its betas, 1 - abar_t / abar_{t-1}),
    set to ``num_inference_steps`` strides of T // num_inference_steps; epsilon prediction, no clipping, and the step
    past t = 0 lands on abar_0, as Stable Diffusion's scheduler config (set_alpha_to_one false)."""
    from diffusers import DDIMScheduler

    abar = alphas_cumprod.detach().double().cpu()
    betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    scheduler = DDIMScheduler(num_train_timesteps=len(abar), trained_betas=betas.numpy(), clip_sample=False,
                              set_alpha_to_one=False, prediction_type="epsilon")
    scheduler.set_timesteps(num_inference_steps)
    return scheduler
