"""ASD, Asynchronous Score Distillation (ScaleDreamer Sec. 3.2, Table 1, Alg. 1):

    grad = w(t) (eps_cfg(x_t, t, y) - eps_c(x_{t+dt}, t + dt, y)),  dt ~ U[0, eta (t - T_min)], t + dt <= T_max

with the same eps at both timesteps, classifier-free guidance on the first branch only, and one batched prior
call [cond(t), uncond(t), cond(t + dt)] (with Perp-Neg [cond(t), uncond(t), neg1(t), neg2(t), cond(t + dt)]).
Default guidance 7.5. distill.asd_shift selects the rule of dt (asd_shifted_timesteps).
"""

from __future__ import annotations

import math

import torch

from amortized3d.distillation.guidance import Draw, guided_prediction
from amortized3d.priors.branches import COND
from amortized3d.priors.schedule import NUM_TRAIN_TIMESTEPS, add_noise

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


def asd_gradient(eps_cfg: torch.Tensor, eps_cond_shifted: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """w(t) (eps_cfg(x_t, t) - eps_c(x_{t+dt}, t+dt)). [B, C, H, W] x2, weight [B] -> [B, C, H, W]."""
    return weight.reshape(-1, 1, 1, 1) * (eps_cfg - eps_cond_shifted)


class ASD:
    default_guidance = 7.5
    learned_branch = False

    def timestep_ceiling(self, t_range: tuple[int, int], eta: float, rule: str) -> int:
        return asd_timestep_ceiling(t_range, eta, rule)

    def gradient(self, d: Draw) -> torch.Tensor:
        V = d.cond.views_per_object  # one t + dt per object (its V consecutive images share t)
        d.shifted_timesteps = asd_shifted_timesteps(d.t[::V], d.t_range, d.eta, d.generator, d.asd_shift).repeat_interleave(V)
        shifted = add_noise(d.x.detach(), d.noise, d.shifted_timesteps, d.abar)
        eps_cfg, _, (eps_shifted,) = guided_prediction(d, [(shifted, d.shifted_timesteps, COND)])
        return asd_gradient(eps_cfg, eps_shifted, d.weight)
