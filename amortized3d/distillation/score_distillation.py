"""Score distillation: SDS, CSD, ASD and VSD as in ScaleDreamer's Table 1, and LODS.

For a rendered image x (in the prior's space), timestep t, noise eps and
x_t = sqrt(abar_t) x + sqrt(1 - abar_t) eps, the gradient of each loss with respect
to x is, with w(t) = 1 - abar_t and eps_cfg = eps_u + g (eps_c - eps_u):

    SDS  w(t) (eps_cfg(x_t, t, y) - eps)
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

from amortized3d.priors.branches import COND, NEGATIVE_1, NEGATIVE_2, UNCOND
from amortized3d.priors.schedule import NUM_TRAIN_TIMESTEPS, add_noise
from amortized3d.interfaces import Conditioning

METHODS = ("asd", "sds", "csd", "vsd", "lods-embedding", "lods-lora")
ADAPTER_METHODS = ("vsd", "lods-embedding", "lods-lora")  # methods with a learned branch (need a neural prior)
DEFAULT_GUIDANCE = {"sds": 100.0, "csd": 1.0, "asd": 7.5, "vsd": 7.5, "lods-embedding": 1000.0, "lods-lora": 1000.0}


def timestep_range(progress: float, t_min: tuple[float, float], t_max: tuple[float, float]) -> tuple[int, int]:
    """Linearly annealed timestep bounds (the reference recipe: T_min 0.5 -> 0.02, T_max 0.98 -> 0.5).

    progress in [0, 1]; t_min, t_max = (start, end) as fractions of 1000 -> integer (T_min, T_max).
    """
    p = min(max(progress, 0.0), 1.0)
    lo = t_min[0] + (t_min[1] - t_min[0]) * p
    hi = t_max[0] + (t_max[1] - t_max[0]) * p
    lo_t = int(round(lo * NUM_TRAIN_TIMESTEPS))
    hi_t = int(round(hi * NUM_TRAIN_TIMESTEPS))
    lo_t = min(max(lo_t, 1), NUM_TRAIN_TIMESTEPS - 1)
    hi_t = min(max(hi_t, lo_t), NUM_TRAIN_TIMESTEPS - 1)
    return lo_t, hi_t


def sample_timesteps(batch: int, t_min: int, t_max: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """t ~ U{t_min, ..., t_max} per image. -> long [batch]."""
    return torch.randint(t_min, t_max + 1, (batch,), generator=generator).to(device)


ASD_SHIFTS = ("paper", "reference", "deterministic", "fixed")


def asd_fixed_shift(t_range: tuple[int, int], eta: float) -> int:
    """The "fixed" rule's dt: floor(eta T), T = 1000 diffusion steps, at most T_max - T_min."""
    return min(math.floor(eta * NUM_TRAIN_TIMESTEPS), t_range[1] - t_range[0])


def asd_timestep_ceiling(t_range: tuple[int, int], eta: float, rule: str = "paper") -> int:
    """The largest first timestep t that ASD draws under ``rule``: T_max for the random rules (they shrink dt
    instead); for the deterministic ones the largest t whose t + dt still lies within T_max, so that no t + dt is
    clamped onto T_max."""
    t_min, t_max = t_range
    if rule == "deterministic":  # t + floor(eta (t - T_min)) is non-decreasing in t
        top = t_max
        while top > t_min and top + math.floor(eta * (top - t_min)) > t_max:
            top -= 1
        return top
    if rule == "fixed":
        return t_max - asd_fixed_shift(t_range, eta)
    return t_max


def asd_shifted_timesteps(t: torch.Tensor, t_range: tuple[int, int], eta: float, generator: torch.Generator,
                          rule: str = "paper") -> torch.Tensor:
    """ASD's second timestep t + dt, within [t, T_max]. t long [B] in [T_min, asd_timestep_ceiling] -> long [B].

    rule (distill.asd_shift), with (T_min, T_max) the annealed range of this step and u ~ U(0, 1):
        paper          dt ~ U[0, eta (t - T_min)] (ScaleDreamer Sec. 3.2, Alg. 1), on the integers and conditioned
                       on t + dt <= T_max (the bound of the paper's Eq. 3): uniform on
                       {0, ..., floor(min(eta (t - T_min), T_max - t))}. The range shrinks instead of t + dt being
                       clamped, so no timestep collects the draws that would have fallen beyond T_max.
        reference      dt = floor(eta u (T_max - t)): the first published version of the paper's code
                       (``get_t_plus`` with ``plus_random``); it shrinks as t grows, where the paper's grows.
        deterministic  dt = floor(eta (t - T_min)): the deterministic shift of the paper's Tables 4 and 5.
        fixed          dt = floor(eta T), T = 1000 (at most T_max - T_min): the fixed interval of the paper's Fig. 13
                       (there eta T_max with T_max = 980, fixed).
    For the deterministic rules t is drawn from [T_min, asd_timestep_ceiling(...)], so that t + dt <= T_max holds
    without clamping (score_distillation does this). The random rules draw one u per image from ``generator``.
    """
    t_min, t_max = t_range
    if rule not in ASD_SHIFTS:
        raise ValueError(f"distill.asd_shift={rule!r} is not known; choose one of {', '.join(ASD_SHIFTS)}")
    room = (t_max - t).clamp(min=0)
    if rule == "paper":
        u = torch.rand(t.shape, generator=generator).to(t.device)
        bound = torch.minimum(torch.floor(eta * (t - t_min).clamp(min=0).double()).long(), room)
        shift = torch.floor(u.double() * (bound + 1).double()).long()  # uniform on {0, ..., bound}
    elif rule == "reference":
        u = torch.rand(t.shape, generator=generator).to(t.device)
        shift = torch.floor(eta * u.double() * room.double()).long()
    elif rule == "deterministic":
        shift = torch.floor(eta * (t - t_min).clamp(min=0).double()).long()
    else:
        shift = torch.full_like(t, asd_fixed_shift(t_range, eta))
    return t + torch.minimum(shift, room)  # a no-op for t up to asd_timestep_ceiling


def sds_gradient(eps_cfg: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """w(t) (eps_cfg - eps). eps_cfg, noise [B, C, H, W], weight [B] -> [B, C, H, W]."""
    return weight.reshape(-1, 1, 1, 1) * (eps_cfg - noise)


def csd_gradient(eps_cfg: torch.Tensor, eps_uncond: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """w(t) (eps_cfg - eps_u). [B, C, H, W] x2, weight [B] -> [B, C, H, W]."""
    return weight.reshape(-1, 1, 1, 1) * (eps_cfg - eps_uncond)


def asd_gradient(eps_cfg: torch.Tensor, eps_cond_shifted: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """w(t) (eps_cfg(x_t, t) - eps_c(x_{t+dt}, t+dt)). [B, C, H, W] x2, weight [B] -> [B, C, H, W]."""
    return weight.reshape(-1, 1, 1, 1) * (eps_cfg - eps_cond_shifted)


def perpendicular_component(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x - (<x, y> / |y|^2) y per image. x, y [B, ...] -> [B, ...]."""
    xf, yf = x.flatten(1), y.flatten(1)
    coeff = (xf * yf).sum(1) / yf.square().sum(1).clamp_min(1e-12)
    return x - coeff.view(-1, *([1] * (x.dim() - 1))) * y


def perp_neg_guidance(eps_cond, eps_uncond, eps_negatives, negative_weights, guidance_scale: float) -> torch.Tensor:
    """Perp-Neg: eps_u + g (e_pos + sum_i w_i perp(eps_neg_i - eps_u, e_pos)), e_pos = eps_c - eps_u.

    eps_* [B, C, H, W], eps_negatives (2 of them), negative_weights [B, 2] -> [B, C, H, W].
    """
    e_pos = eps_cond - eps_uncond
    accumulated = torch.zeros_like(e_pos)
    for i, eps_neg in enumerate(eps_negatives):
        accumulated = accumulated + negative_weights[:, i].view(-1, 1, 1, 1) * perpendicular_component(eps_neg - eps_uncond, e_pos)
    return eps_uncond + guidance_scale * (e_pos + accumulated)


def vsd_gradient(eps_cfg: torch.Tensor, eps_lora: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """w(t) (eps_cfg - eps_phi'). [B, C, H, W] x2, weight [B] -> [B, C, H, W]."""
    return weight.reshape(-1, 1, 1, 1) * (eps_cfg - eps_lora)


def lods_gradient(eps_cond: torch.Tensor, eps_learned: torch.Tensor, noise: torch.Tensor, guidance: float, weight: torch.Tensor) -> torch.Tensor:
    """w(t) (eps_c + (1 - g) / g eps_learned - eps / g) (LODS Eq. 7 / 9). [B, C, H, W] x3, weight [B] -> [B, C, H, W]."""
    return weight.reshape(-1, 1, 1, 1) * (eps_cond + (1.0 - guidance) / guidance * eps_learned - noise / guidance)


def distillation_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """loss_b = 0.5 ||x_b - stopgrad(x_b - grad_b)||^2, so d loss_b / d x_b = grad_b.

    x [B, C, H, W] (with grad), grad [B, C, H, W] -> loss [B].
    """
    target = (x - grad).detach()
    return 0.5 * ((x - target) ** 2).flatten(1).sum(1)


@dataclass
class DistillationOutput:
    """loss [B] per image, grad [B, C, H, W], timesteps [B], shifted timesteps [B] (ASD only)."""

    loss: torch.Tensor
    grad: torch.Tensor
    timesteps: torch.Tensor
    shifted_timesteps: torch.Tensor | None


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
) -> DistillationOutput:
    """One score-distillation step on a batch of rendered images.

    x [B, C, H, W] in the prior's space (after prior.encode), cond of B rows (amortized3d.interfaces.Conditioning);
    ``adapter`` is the learned branch of VSD / LODS (amortized3d.distillation.adapters); ``asd_shift`` the rule
    of ASD's timestep shift (asd_shifted_timesteps).
    All pretrained branches go through one batched prior call; non-finite gradients are
    kept as they are so the training loop's guard can see them.
    """
    if method not in METHODS:
        raise ValueError(f"distill.method={method!r} is not known; choose one of {', '.join(METHODS)}")
    if (adapter is None) != (method not in ADAPTER_METHODS):
        raise ValueError(f"distill.method={method!r} {'needs' if adapter is None else 'takes no'} learned branch (adapter)")
    B = x.shape[0]
    t_min, t_max = t_range
    t = sample_timesteps(B, t_min, asd_timestep_ceiling(t_range, eta, asd_shift) if method == "asd" else t_max, generator, x.device)
    noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
    abar = prior.alphas_cumprod.to(x.device)
    weight = (1 - abar[t]).to(x.dtype)
    t_shift = None
    with torch.no_grad():
        x_t = add_noise(x.detach(), noise, t, abar)
        def rows(code: int) -> torch.Tensor:
            return torch.full((B,), code, dtype=torch.long)

        if method in ("lods-embedding", "lods-lora"):
            eps_cond = prior.predict_noise(x_t, t, cond, rows(COND))
            grad = lods_gradient(eps_cond, adapter.predict_noise(x_t, t, cond), noise, guidance_scale, weight)
        else:
            perp_neg = prior.perp_neg
            inputs, steps, branches = [x_t, x_t], [t, t], [rows(COND), rows(UNCOND)]
            if perp_neg:
                inputs += [x_t, x_t]
                steps += [t, t]
                branches += [rows(NEGATIVE_1), rows(NEGATIVE_2)]
            if method == "asd":
                t_shift = asd_shifted_timesteps(t, t_range, eta, generator, asd_shift)
                inputs.append(add_noise(x.detach(), noise, t_shift, abar))
                steps.append(t_shift)
                branches.append(rows(COND))
            n_branches = len(inputs)
            eps = prior.predict_noise(torch.cat(inputs), torch.cat(steps), cond.repeat(n_branches), torch.cat(branches))
            eps_branches = eps.chunk(n_branches)
            eps_cond, eps_uncond = eps_branches[0], eps_branches[1]
            if perp_neg:
                negative_weights = prior.perp_neg_weights(cond.cameras).to(x.device, x.dtype)
                eps_cfg = perp_neg_guidance(eps_cond, eps_uncond, eps_branches[2:4], negative_weights, guidance_scale)
            else:
                eps_cfg = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            if method == "sds":
                grad = sds_gradient(eps_cfg, noise, weight)
            elif method == "csd":
                grad = csd_gradient(eps_cfg, eps_uncond, weight)
            elif method == "vsd":
                grad = vsd_gradient(eps_cfg, adapter.predict_noise(x_t, t, cond), weight)
            else:
                grad = asd_gradient(eps_cfg, eps_branches[-1], weight)
    return DistillationOutput(distillation_loss(x, grad), grad, t, t_shift)
