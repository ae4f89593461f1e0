"""Score distillation: SDS, CSD, ASD and VSD as in ScaleDreamer's Table 1, and LODS.

For a rendered image x (in the prior's space), timestep t, noise eps and
x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, the gradient of each loss with respect
to x is, with w(t) = 1 - abar_t and eps_cfg = eps_u + g (eps_c - eps_u):

    SDS  w(t) (eps_cfg(x_t, t, y) - eps)
    SDS* x - x0_r, x0_r the x0 of eps_cfg with MVDream's guidance rescale (methods/sds_star.py)
    CSD  w(t) (eps_cfg(x_t, t, y) - eps_u(x_t, t))           (= w(t) g (eps_c - eps_u))
    ASD  w(t) (eps_cfg(x_t, t, y) - eps_c(x_{t+dt}, t + dt, y)),  dt ~ U[0, eta (t - T_min)], t + dt <= T_max
    VSD  w(t) (eps_cfg(x_t, t, y) - eps_phi'(x_t, t, pi, y))  with the camera-conditioned LoRA UNet phi'
    LODS w(t) (eps_c(x_t, t, y) + (1 - g) / g * eps_learned(x_t, t) - eps / g)   (LODS Eq. 7 and 9)

For LODS the learned unconditional branch is either a learnable token embedding alpha
(eps_phi(x_t; alpha, t)) or a LoRA applied to the unconditional branch (eps_psi(x_t; empty, t));
the gradient is SDS with that branch as the unconditional one, divided by g.
The learned branches (``amortized3d.distillation.adapters``) are evaluated without gradient
here and trained by their own alignment losses.

ASD uses the same eps for both timesteps, classifier-free guidance on the first
branch only, and all branches go through one batched prior call:
[cond(t), uncond(t), cond(t + dt)], or with Perp-Neg (a Stable Diffusion prior with
prior.perp_neg) [cond(t), uncond(t), neg1(t), neg2(t), cond(t + dt)], where eps_cfg becomes
eps_u + g (e_pos + sum_i w_i perp(eps_neg_i - eps_u, e_pos)), e_pos = eps_c - eps_u. Default guidance scales: SDS 100, CSD 1, ASD 7.5,
VSD 7.5 (and 1 on the LoRA branch), LODS 1000. Prior calls per step: one for SDS, CSD and
ASD; two for VSD ([cond, uncond] on the pretrained UNet, then the LoRA branch) and LODS
([cond] on the pretrained UNet, then the learned unconditional branch).

Each loss is written so that its gradient with respect to the image equals the
distillation gradient: loss_b = 0.5 ||x_b - stopgrad(x_b - grad_b)||^2, so
d loss_b / d x_b = grad_b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from amortized3d.distillation.guidance import Draw
from amortized3d.distillation.methods import METHODS
from amortized3d.distillation.methods.sds import multistep_denoised
from amortized3d.interfaces import Conditioning
from amortized3d.priors.schedule import NUM_TRAIN_TIMESTEPS, add_noise, predict_clean

# methods with a learned branch of the prior (they need a neural prior), and each method's default guidance scale
ADAPTER_METHODS = tuple(name for name, method in METHODS.items() if method.learned_branch)
DEFAULT_GUIDANCE = {name: method.default_guidance for name, method in METHODS.items()}


def guidance_scale(distill) -> float:
    """The config's distill.guidance_scale, or its method's default (DEFAULT_GUIDANCE) when null."""
    return distill.guidance_scale if distill.guidance_scale is not None else DEFAULT_GUIDANCE[distill.method]


def bound_knots(bound) -> list[tuple[float, float]]:
    """A timestep bound of the config as (progress, fraction of 1000) knots: [start, end] (linear over the run) is
    [(0, start), (1, end)]; [[progress, fraction], ...] (StableDreamer's piecewise-linear annealing) as given."""
    if all(isinstance(v, (int, float)) for v in bound):
        return [(0.0, float(bound[0])), (1.0, float(bound[1]))]
    return [(float(p), float(v)) for p, v in bound]


def timestep_range(progress: float, t_min, t_max) -> tuple[int, int]:
    """The annealed timestep bounds at training progress in [0, 1]: T_min and T_max piecewise linear in progress
    between their knots (bound_knots; the reference recipe: T_min 0.5 -> 0.02, T_max 0.98 -> 0.5, linear).

    t_min, t_max: [start, end] or [[progress, fraction], ...], fractions of 1000 -> integer (T_min, T_max).
    """
    from amortized3d.distillation.regularizers import scheduled_weight

    p = min(max(progress, 0.0), 1.0)
    lo = scheduled_weight(bound_knots(t_min), p)
    hi = scheduled_weight(bound_knots(t_max), p)
    lo_t = int(round(lo * NUM_TRAIN_TIMESTEPS))
    hi_t = int(round(hi * NUM_TRAIN_TIMESTEPS))
    lo_t = min(max(lo_t, 1), NUM_TRAIN_TIMESTEPS - 1)
    hi_t = min(max(hi_t, lo_t), NUM_TRAIN_TIMESTEPS - 1)
    return lo_t, hi_t


def sample_timesteps(batch: int, t_min: int, t_max: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """t ~ U{t_min, ..., t_max} per image. -> long [batch]."""
    return torch.randint(t_min, t_max + 1, (batch,), generator=generator).to(device)


T_SCHEDULES = ("random", "sqrt", "linear", "cosine")


def annealed_timestep(schedule: str, progress: float, t_min: int, t_max: int) -> int:
    """HiFA's deterministic timesteps (Eq. 5 and its ablation, Fig. 7): t = floor(t_max - (t_max - t_min) f(p)) at
    training progress p in [0, 1], with f(p) = sqrt(p) ("sqrt", HiFA's choice), p ("linear") or (1 - cos(pi p)) / 2
    ("cosine"), as HiFA's code computes them (nerf/sd.py: percentage; t = (max - min)(1 - percentage) + min)."""
    p = min(max(progress, 0.0), 1.0)
    fraction = {"sqrt": math.sqrt(p), "linear": p, "cosine": (1.0 - math.cos(math.pi * p)) / 2.0}[schedule]
    return int(math.floor(t_max - (t_max - t_min) * fraction))


def check_denoise_steps(method: str, denoise_steps: int) -> None:
    """ValueError unless the multi-step z_hat (denoise_steps > 1, HiFA's SDS+) goes with SDS."""
    if denoise_steps > 1 and method != "sds":
        raise ValueError(f"distill.denoise_steps={denoise_steps} is HiFA's multi-step z_hat of SDS+, for distill.method=sds, "
                         f"not {method}; set distill.denoise_steps=1 or distill.method=sds")


def distillation_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """loss_b = 0.5 ||x_b - stopgrad(x_b - grad_b)||^2, so d loss_b / d x_b = grad_b.

    x [B, C, H, W] (with grad), grad [B, C, H, W] -> loss [B].
    """
    target = (x - grad).detach()
    return 0.5 * ((x - target) ** 2).flatten(1).sum(1)


@dataclass
class DistillationOutput:
    """loss [B] per image, grad [B, C, H, W], timesteps [B], shifted timesteps [B] (ASD only), and denoised [B, C, H, W]:
    the one-step estimate of the clean image from the method's guided prediction, x_hat = (x_t - sqrt(1 - abar_t)
    eps_guided) / sqrt(abar_t) (StableDreamer Prop. 1's pseudo ground truth; HiFA's z_hat), HiFA's multi-step
    z_hat (score_distillation's denoise_steps), or SDS*'s rescaled x0 (its target)."""

    loss: torch.Tensor
    grad: torch.Tensor
    timesteps: torch.Tensor
    shifted_timesteps: torch.Tensor | None
    denoised: torch.Tensor


def reconstruction_weight(abar_t: torch.Tensor) -> torch.Tensor:
    """beta(t) = w(t) sqrt(abar_t) / sqrt(1 - abar_t), w(t) = 1 - abar_t: the weight with which the SDS gradient
    w(t) (eps_hat - eps) equals the gradient of beta(t)/2 ||x - x_hat||^2 (StableDreamer Prop. 1, HiFA Eq. 2). [B] -> [B]."""
    return (1 - abar_t) * abar_t.sqrt() / (1 - abar_t).sqrt()


def image_residual_loss(prior, images: torch.Tensor, denoised: torch.Tensor, timesteps: torch.Tensor, rgb_weight: float) -> torch.Tensor:
    """HiFA's image-space term of SDS+ (Eq. 4): rgb_weight beta(t) / 2 ||x - D(z_hat)||^2 per image, with D(z_hat) the
    prior's decoding of the one-step denoised latent (no gradient) and x the render resized (bilinear) to its size, as
    HiFA's code compares them at the VAE's 512^2. The latent term of Eq. 4 is the SDS loss itself (reconstruction_weight).

    images [B, 3, H, W] in [0, 1], denoised [B, C, h, w], timesteps long [B] -> loss [B]."""
    with torch.no_grad():
        target = prior.decode(denoised).to(images.dtype)
    x = images
    if x.shape[-2:] != target.shape[-2:]:
        x = torch.nn.functional.interpolate(x, size=target.shape[-2:], mode="bilinear", align_corners=False)
    beta = reconstruction_weight(prior.alphas_cumprod.to(images.device)[timesteps]).to(images.dtype)
    return 0.5 * rgb_weight * beta * (x - target).square().flatten(1).sum(1)


def score_distillation(
    prior,
    x: torch.Tensor,
    cond: Conditioning,
    *,
    method: str,
    guidance_scale: float,
    t_range: tuple[int, int],
    eta: float,
    generator: torch.Generator,
    adapter=None,
    asd_shift: str = "paper",
    t_schedule: str = "random",
    progress: float = 0.0,
    denoise_steps: int = 1,
    denoise_eta: float = 1.0,
    recon_rescale: float = 0.5,
) -> DistillationOutput:
    """One score-distillation step on a batch of rendered images.

    x [B, C, H, W] in the prior's space (after prior.encode), cond of B rows (amortized3d.interfaces.Conditioning);
    ``method`` a name in amortized3d.distillation.methods.METHODS; ``adapter`` is the learned branch of VSD / LODS
    (amortized3d.distillation.adapters); ``asd_shift`` the rule of ASD's timestep shift (methods/asd.py).
    Draws t ~ U{T_min, ..., ceiling} (t_schedule "random"), or takes every image's t from HiFA's annealing at
    ``progress`` between T_min and the ceiling (annealed_timestep), draws eps, then the method's gradient; non-finite
    gradients are kept as they are so the training loop's guard can see them. ``denoise_steps`` > 1 (SDS only): z_hat
    from that many guided DDIM strides (methods/sds.py, multistep_denoised; ``denoise_eta`` their eta) and the
    gradient HiFA's latent residual beta(t) (x - z_hat) (Eq. 3); 1: the one-step z_hat, with which that is SDS.
    ``recon_rescale``: SDS*'s guidance rescale phi. For a multi-view prior (cond.views_per_object V > 1) each object's
    V consecutive images share one t (and ASD's t + dt); the noise is drawn per image.
    """
    if method not in METHODS:
        raise ValueError(f"distill.method={method!r} is not known; choose one of {', '.join(METHODS)}")
    spec = METHODS[method]
    if (adapter is None) == spec.learned_branch:
        raise ValueError(f"distill.method={method!r} {'needs' if adapter is None else 'takes no'} learned branch (adapter)")
    if t_schedule not in T_SCHEDULES:
        raise ValueError(f"distill.t_schedule={t_schedule!r} is not known; choose one of {', '.join(T_SCHEDULES)}")
    check_denoise_steps(method, denoise_steps)
    B, V = x.shape[0], cond.views_per_object
    if B % V:
        raise ValueError(f"{B} images do not form objects of views_per_object={V} views each")
    ceiling = spec.timestep_ceiling(t_range, eta, asd_shift)
    if t_schedule == "random":
        t = sample_timesteps(B // V, t_range[0], ceiling, generator, x.device).repeat_interleave(V)  # one t per object
    else:
        t = torch.full((B,), annealed_timestep(t_schedule, progress, t_range[0], ceiling), dtype=torch.long, device=x.device)
    noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    abar = prior.alphas_cumprod.to(x.device)
    weight = (1 - abar[t]).to(x.dtype)
    with torch.no_grad():
        x_t = add_noise(x.detach(), noise, t, abar)
        draw = Draw(prior, x.detach(), cond, t, noise, x_t, weight, abar, guidance_scale, t_range, eta, asd_shift, generator, adapter,
                    recon_rescale)
        grad = spec.gradient(draw)
        if denoise_steps > 1:  # HiFA's latent residual to the multi-step z_hat (Eq. 3)
            denoised = multistep_denoised(draw, denoise_steps, denoise_eta)
            grad = reconstruction_weight(abar[t]).to(x.dtype).reshape(-1, 1, 1, 1) * (x.detach() - denoised)
        elif draw.denoised is not None:  # the method's own target (SDS*: the rescaled x0)
            denoised = draw.denoised
        else:
            denoised = predict_clean(x_t, draw.eps_guided, t, abar)
    return DistillationOutput(distillation_loss(x, grad), grad, t, draw.shifted_timesteps, denoised)
