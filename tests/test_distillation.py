"""Each distillation gradient against its Table-1 formula, for a random noise predictor."""

import math

import pytest
import torch

from amortized3d.distillation.regularizers import eikonal_loss, opacity_entropy_loss, scheduled_weight, sparsity_loss
from amortized3d.distillation.methods.asd import asd_shifted_timesteps, asd_timestep_ceiling
from amortized3d.distillation.score_distillation import DEFAULT_GUIDANCE, distillation_loss, score_distillation, timestep_range
from amortized3d.priors.schedule import add_noise, stable_diffusion_alphas_cumprod
from amortized3d.interfaces import Conditioning
from amortized3d.rendering.cameras import orbit_cameras


class RandomPredictor:
    """eps(x_t, t, cond) = tanh(A x_t + b_t + c_cond): random, nonlinear, t- and condition-dependent. Records calls."""

    def __init__(self, shape):
        g = torch.Generator().manual_seed(123)
        self.alphas_cumprod = stable_diffusion_alphas_cumprod()
        d = math.prod(shape)
        self.A = torch.randn(d, d, generator=g) / d**0.5
        self.bt = torch.randn(1000, d, generator=g) * 0.3
        self.bc = torch.randn(2, d, generator=g) * 0.5
        self.calls = []
        self.perp_neg, self.text_encoder = False, None

    def encode(self, x):
        return x

    def predict_noise(self, noisy, timesteps, cond, unconditional):
        prompts = cond.prompts
        flat = noisy.flatten(1)
        out = torch.tanh(flat @ self.A.T + self.bt[timesteps] + self.bc[unconditional.long()]).reshape(noisy.shape)
        self.calls.append(dict(noisy=noisy.clone(), t=timesteps.clone(), uncond=unconditional.clone(), out=out.clone(), prompts=list(prompts)))
        return out


def run(method, guidance, B=3, shape=(3, 4, 4), t_range=(200, 900), eta=0.1, seed=0):
    prior = RandomPredictor(shape)
    x = torch.rand(B, *shape, requires_grad=True)
    cams = orbit_cameras(B, 15.0, 2.0, 50.0)
    out = score_distillation(prior, x, Conditioning([f"p{i}" for i in range(B)], cams), method=method, guidance_scale=guidance,
                             t_range=t_range, eta=eta, generator=torch.Generator().manual_seed(seed))
    (dx,) = torch.autograd.grad(out.loss.sum(), x)
    return prior, x.detach(), out, dx


def recover_noise(prior, x, x_t, t):
    a = prior.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    return (x_t - a.sqrt() * x) / (1 - a).sqrt()


@pytest.mark.parametrize("method", ["sds", "csd", "asd"])
def test_single_batched_prior_call(method):
    prior, x, out, dx = run(method, 5.0)
    assert len(prior.calls) == 1
    call = prior.calls[0]
    n_branches = 3 if method == "asd" else 2
    assert call["noisy"].shape[0] == n_branches * x.shape[0]
    assert call["uncond"].tolist() == [False] * 3 + [True] * 3 + ([False] * 3 if method == "asd" else [])


def test_sds_gradient_matches_formula():
    prior, x, out, dx = run("sds", 100.0)
    c = prior.calls[0]
    B = x.shape[0]
    t = c["t"][:B]
    eps = recover_noise(prior, x, c["noisy"][:B], t)
    assert torch.allclose(c["noisy"][B:], c["noisy"][:B])  # both branches see the same x_t
    eps_c, eps_u = c["out"][:B], c["out"][B:]
    w = (1 - prior.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
    expected = w * (eps_u + 100.0 * (eps_c - eps_u) - eps)
    assert torch.allclose(dx, expected, atol=1e-4)


def test_csd_gradient_matches_formula():
    prior, x, out, dx = run("csd", 1.0)
    c = prior.calls[0]
    B = x.shape[0]
    t = c["t"][:B]
    w = (1 - prior.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
    expected = w * (c["out"][:B] - c["out"][B:])
    assert torch.allclose(dx, expected, atol=1e-5)


def test_asd_gradient_matches_formula():
    eta, t_lo = 0.3, 200
    prior, x, out, dx = run("asd", 7.5, B=6, t_range=(t_lo, 900), eta=eta)
    c = prior.calls[0]
    B = x.shape[0]
    t, t_plus = c["t"][:B], c["t"][2 * B :]
    # Same noise at both timesteps.
    eps_t = recover_noise(prior, x, c["noisy"][:B], t)
    eps_plus = recover_noise(prior, x, c["noisy"][2 * B :], t_plus)
    assert torch.allclose(eps_t, eps_plus, atol=1e-4)
    # Shift within U[0, eta (t - T_min)], and t + dt <= T_max.
    shift = t_plus - t
    assert (shift >= 0).all() and (shift <= torch.floor(eta * (t - t_lo).float()).long()).all() and (t_plus <= 900).all()
    eps_c, eps_u, eps_shift = c["out"][:B], c["out"][B : 2 * B], c["out"][2 * B :]
    w = (1 - prior.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
    expected = w * (eps_u + 7.5 * (eps_c - eps_u) - eps_shift)
    assert torch.allclose(dx, expected, atol=1e-4)


def exact_shift_pmf(rule: str, t: int, t_min: int, t_max: int, eta: float) -> dict[int, float]:
    """P(dt = k) written out from each rule's definition (ScaleDreamer: Alg. 1 / Sec. 3.2 for "paper", Tables 4-5
    for "deterministic", Fig. 13's fixed interval eta T for "fixed"; the first published get_t_plus for "reference")."""
    if rule == "paper":  # U[0, eta (t - T_min)] on the integers, conditioned on dt <= T_max - t
        k_max = min(math.floor(eta * (t - t_min)), t_max - t)
        return {k: 1 / (k_max + 1) for k in range(k_max + 1)}
    if rule == "reference":  # floor(eta u (T_max - t)), u ~ U(0, 1): each integer below L = eta (T_max - t) has mass 1 / L
        L = eta * (t_max - t)
        if L == 0:
            return {0: 1.0}
        pmf = {k: 1 / L for k in range(math.floor(L))}
        if L > math.floor(L):
            pmf[math.floor(L)] = (L - math.floor(L)) / L
        return pmf
    if rule == "deterministic":
        return {math.floor(eta * (t - t_min)): 1.0}
    return {math.floor(eta * 1000): 1.0}  # fixed


def brute_force_ceiling(rule: str, t_min: int, t_max: int, eta: float) -> int:
    """The largest t whose every possible t + dt stays within T_max (the first timestep's range for the rule)."""
    return max(t for t in range(t_min, t_max + 1) if t + max(exact_shift_pmf(rule, t, t_min, t_max, eta)) <= t_max)


RULES = ["paper", "reference", "deterministic", "fixed"]


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("t_range, t", [((500, 980), 900), ((500, 980), 975), ((500, 980), 520), ((20, 500), 333), ((20, 500), 400)])
def test_asd_shift_follows_its_definition(rule, t_range, t):
    t = min(t, brute_force_ceiling(rule, *t_range, 0.1))
    n = 40000
    steps = torch.full((n,), t)
    shifted = asd_shifted_timesteps(steps, t_range, 0.1, torch.Generator().manual_seed(0), rule)
    shift = (shifted - steps).tolist()
    pmf = exact_shift_pmf(rule, t, *t_range, 0.1)
    counts = {k: shift.count(k) / n for k in set(shift)}
    assert set(counts) <= set(pmf)  # no value outside the definition's support
    for k, p in pmf.items():
        assert abs(counts.get(k, 0.0) - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (k, counts.get(k), p)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("t_range", [(500, 980), (260, 740), (20, 500)])
def test_asd_second_timesteps_stay_below_t_max_and_pile_nowhere(rule, t_range):
    """Over the first timesteps ASD draws (t uniform on [T_min, ceiling]): t + dt always lies in [t, T_max], its
    distribution is the exact one from the rule's definition (computed here by enumeration), and no value holds
    more than 5 / n of the mass (n the number of first timesteps; clamping t + dt onto 999 used to put 8 / n there,
    and clamping the deterministic rule onto T_max 44 / n)."""
    t_min, t_max = t_range
    ceiling = asd_timestep_ceiling(t_range, 0.1, rule)
    assert ceiling == brute_force_ceiling(rule, t_min, t_max, 0.1)
    first = range(t_min, ceiling + 1)
    exact: dict[int, float] = {}
    for s in first:
        for k, p in exact_shift_pmf(rule, s, t_min, t_max, 0.1).items():
            exact[s + k] = exact.get(s + k, 0.0) + p / len(first)
    assert max(exact) <= t_max and max(exact.values()) <= 5 / len(first)
    n = 200000
    gen = torch.Generator().manual_seed(1)
    t = torch.randint(t_min, ceiling + 1, (n,), generator=gen)
    shifted = asd_shifted_timesteps(t, t_range, 0.1, gen, rule)
    assert (shifted >= t).all() and (shifted <= t_max).all()
    top = max(exact, key=exact.get)
    share = (shifted == top).float().mean().item()
    assert abs(share - exact[top]) < 5 * math.sqrt(exact[top] / n)


def test_asd_draws_its_first_timestep_below_the_ceiling_of_its_rule():
    prior, x = RandomPredictor((3, 4, 4)), torch.randn(64, 3, 4, 4)
    for rule in RULES:
        out = score_distillation(prior, x, Conditioning(["p"] * 64, orbit_cameras(64, 15.0, 1.5, 70.0)), method="asd", guidance_scale=7.5,
                                 t_range=(500, 980), eta=0.1, generator=torch.Generator().manual_seed(2), asd_shift=rule)
        assert out.timesteps.max() <= asd_timestep_ceiling((500, 980), 0.1, rule) and (out.shifted_timesteps <= 980).all()


def test_unknown_asd_shift_rule_is_refused():
    with pytest.raises(ValueError, match="asd_shift='random'.*paper, reference, deterministic, fixed"):
        asd_shifted_timesteps(torch.tensor([600]), (500, 980), 0.1, torch.Generator(), "random")


def test_distillation_loss_gradient_is_the_given_gradient():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    g = torch.randn(4, 3, 5, 5)
    (dx,) = torch.autograd.grad(distillation_loss(x, g).sum(), x)
    assert torch.allclose(dx, g, atol=1e-6)


def test_timestep_annealing_endpoints():
    assert timestep_range(0.0, (0.5, 0.02), (0.98, 0.5)) == (500, 980)
    assert timestep_range(1.0, (0.5, 0.02), (0.98, 0.5)) == (20, 500)
    assert timestep_range(0.5, (0.5, 0.02), (0.98, 0.5)) == (260, 740)


def test_piecewise_linear_bounds_stabledreamer():
    """StableDreamer Sec. 4.1: both bounds piecewise linear in training progress, converging by the end. Expected values by
    hand-interpolating the knots: T_max 980 -> 600 over the first half, 600 -> 300 over the second; T_min 400 -> 250 -> 200."""
    t_max = [[0.0, 0.98], [0.5, 0.6], [1.0, 0.3]]
    t_min = [[0.0, 0.4], [0.5, 0.25], [1.0, 0.2]]
    expected = {0.0: (400, 980), 0.25: (325, 790), 0.5: (250, 600), 0.8: (220, 420), 1.0: (200, 300)}
    for progress, bounds in expected.items():
        assert timestep_range(progress, t_min, t_max) == bounds
    assert timestep_range(0.3, [[0.4, 0.3], [0.6, 0.1]], [[0.4, 0.9], [0.6, 0.5]]) == (300, 900)  # before the first knot: its value
    for progress in (0.0, 0.3, 0.77, 1.0):  # [start, end] is the two-knot schedule
        assert timestep_range(progress, [0.5, 0.02], [0.98, 0.5]) == timestep_range(progress, [[0, 0.5], [1, 0.02]], [[0, 0.98], [1, 0.5]])


def test_default_guidance_scales_from_the_paper():
    # ScaleDreamer: SDS 100, CSD 1, ASD 7.5, VSD 7.5 (on the pretrained branch); LODS: 1000 for 3D generation;
    # SDS*: MVDream's threestudio guidance (multiview_diffusion_guidance.py, guidance_scale 50).
    assert DEFAULT_GUIDANCE == {"sds": 100.0, "sds-star": 50.0, "csd": 1.0, "asd": 7.5, "vsd": 7.5, "lods-embedding": 1000.0,
                                "lods-lora": 1000.0}


def test_noise_schedule_formula():
    abar = stable_diffusion_alphas_cumprod()
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, 0)
    assert abar.shape == (1000,)
    assert torch.allclose(abar.double(), expected, rtol=1e-5)
    x, e = torch.randn(2, 3), torch.randn(2, 3)
    t = torch.tensor([0, 999])
    xt = add_noise(x, e, t, abar)
    assert torch.allclose(xt[1], expected[999].sqrt().float() * x[1] + (1 - expected[999]).sqrt().float() * e[1], atol=1e-6)


def test_regularizers():
    assert scheduled_weight([[0.0, 100.0], [0.1, 1.0]], 0.05) == pytest.approx(50.5)
    assert scheduled_weight([[0.0, 100.0], [0.1, 1.0]], 0.9) == 1.0
    assert scheduled_weight([[0.8, 0.0], [1.0, 10.0]], 0.5) == 0.0
    assert scheduled_weight([[0.8, 0.0], [1.0, 10.0]], 0.9) == pytest.approx(5.0)
    o = torch.tensor([0.0, 1.0])
    assert sparsity_loss(o).item() == pytest.approx((0.1 + math.sqrt(1.01)) / 2)
    assert opacity_entropy_loss(torch.tensor([0.5])).item() == pytest.approx(math.log(2), rel=1e-4)
    assert opacity_entropy_loss(torch.tensor([0.0, 1.0])).item() < 1e-3
    g = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 1.0]])
    assert eikonal_loss(g).item() == pytest.approx(8.0)


@pytest.mark.parametrize("schedule, progress, expected", [
    # HiFA Eq. 5, t = t_max - (t_max - t_min) sqrt(p), with its code's bounds 20 and 980, by hand
    ("sqrt", 0.0, 980), ("sqrt", 0.25, 500), ("sqrt", 0.01, 884), ("sqrt", 1.0, 20),
    # its ablation's linear and cosine rates: f(p) = p and (1 - cos(pi p)) / 2 (HiFA code, nerf/sd.py)
    ("linear", 0.25, 740), ("linear", 0.5, 500), ("cosine", 0.5, 500), ("cosine", 1 / 3, 740), ("cosine", 1.0, 20),
])
def test_hifa_timestep_annealing_by_hand(schedule, progress, expected):
    from amortized3d.distillation.score_distillation import annealed_timestep

    assert annealed_timestep(schedule, progress, 20, 980) == expected


def test_hifa_timestep_annealing_properties():
    """Each schedule falls from t_max to t_min without rising; sqrt falls fastest early (sqrt(p) >= p >= cosine's
    (1 - cos(pi p)) / 2 on [0, 1/2])."""
    from amortized3d.distillation.score_distillation import annealed_timestep

    grid = [i / 200 for i in range(201)]
    for schedule in ("sqrt", "linear", "cosine"):
        ts = [annealed_timestep(schedule, p, 20, 980) for p in grid]
        assert ts[0] == 980 and ts[-1] == 20 and all(a >= b for a, b in zip(ts, ts[1:]))
    for p in grid[:101]:
        assert annealed_timestep("sqrt", p, 20, 980) <= annealed_timestep("linear", p, 20, 980) <= annealed_timestep("cosine", p, 20, 980)


@pytest.mark.parametrize("method, rule", [("sds", "paper"), ("asd", "paper"), ("asd", "fixed")])
def test_annealed_schedule_gives_every_image_the_same_timestep_below_the_method_ceiling(method, rule):
    """With t_schedule="sqrt" no timestep is drawn: all images get Eq. 5's t between T_min and the method's ceiling
    (ASD keeps room for its shifted timestep, which stays <= T_max)."""
    from amortized3d.distillation.score_distillation import annealed_timestep

    prior, x, t_range = RandomPredictor((3, 4, 4)), torch.randn(6, 3, 4, 4), (20, 980)
    ceiling = asd_timestep_ceiling(t_range, 0.1, rule) if method == "asd" else 980  # "fixed" keeps eta T_max of room
    out = score_distillation(prior, x, Conditioning(["p"] * 6, orbit_cameras(6, 15.0, 1.5, 70.0)), method=method, guidance_scale=7.5,
                             t_range=t_range, eta=0.1, generator=torch.Generator().manual_seed(0), t_schedule="sqrt", progress=0.25,
                             asd_shift=rule)
    assert out.timesteps.tolist() == [annealed_timestep("sqrt", 0.25, 20, ceiling)] * 6
    if method == "asd":
        assert (rule == "fixed") == (ceiling < 980)
        assert (out.shifted_timesteps <= 980).all() and (out.shifted_timesteps >= out.timesteps).all()
    with pytest.raises(ValueError, match="t_schedule='sqr'.*random, sqrt, linear, cosine"):
        score_distillation(prior, x, Conditioning(["p"] * 6, orbit_cameras(6, 15.0, 1.5, 70.0)), method=method, guidance_scale=7.5,
                           t_range=t_range, eta=0.1, generator=torch.Generator(), t_schedule="sqr")


def ddim_by_hand(predict, x_t, t, abar, stride, eta, noises):
    """DDIM (Song et al. 2021, Eq. 12 with sigma_t(eta) of Eq. 16), written out for one image and a scalar t:
    x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t); sigma = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev);
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z, a_prev = abar[t - stride], or abar[0]
    past 0 (Stable Diffusion's scheduler config, set_alpha_to_one false). HiFA's loop: t, t - stride, ... while >= 0."""
    k = 0
    while t >= 0:
        eps = predict(x_t, t)
        a_t = abar[t].double()
        a_prev = abar[t - stride].double() if t - stride >= 0 else abar[0].double()
        x0 = (x_t.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
        sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
        x_t = (a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps.double() + sigma * noises[k].double()).float()
        t, k = t - stride, k + 1
    return x_t


def test_hifa_multistep_z_hat_is_guided_ddim_and_the_gradient_its_latent_residual():
    """HiFA's multi-step z_hat (Alg. 1 step 5, A.1: DDIM r = 0.25, eta = 1) against DDIM written out by hand
    (ddim_by_hand) on the random predictor's guided prediction eps_u + g (eps_c - eps_u), each image from its own
    drawn (x_t, t) with the DDIM noise replayed from the step's generator, and the gradient against HiFA's Eq. 3
    latent residual beta(t) (x - z_hat), beta = w(t) sqrt(abar_t) / sqrt(1 - abar_t). Prior calls: one per stride,
    batched over the images still stepping (floor(t / 250) + 1 strides per image)."""
    B, shape, g, steps, eta = 4, (3, 4, 4), 30.0, 4, 1.0
    prior = RandomPredictor(shape)
    x = torch.rand(B, *shape, requires_grad=True)
    cams = orbit_cameras(B, 15.0, 2.0, 50.0)
    cond = Conditioning([f"p{i}" for i in range(B)], cams)
    gen = torch.Generator().manual_seed(5)
    replay = torch.Generator().set_state(gen.get_state())
    out = score_distillation(prior, x, cond, method="sds", guidance_scale=g, t_range=(20, 980), eta=0.1, generator=gen,
                             denoise_steps=steps, denoise_eta=eta)
    (dx,) = torch.autograd.grad(out.loss.sum(), x)
    t = torch.randint(20, 981, (B,), generator=replay)
    noise = torch.randn(x.shape, generator=replay)
    abar = prior.alphas_cumprod
    x_t = add_noise(x.detach(), noise, t, abar)
    stride = 1000 // steps
    strides = [int(ti) // stride + 1 for ti in t]
    assert len(prior.calls) == max(strides)
    assert [len(c["t"]) // 2 for c in prior.calls] == [sum(s > k for s in strides) for k in range(max(strides))]
    ddim_noise = [[None] * max(strides) for _ in range(B)]
    for k in range(max(strides)):  # the generator's draws: one [active, C, H, W] block per stride, images in order
        active = [i for i in range(B) if strides[i] > k]
        block = torch.randn(len(active), *shape, generator=replay)
        for j, i in enumerate(active):
            ddim_noise[i][k] = block[j]

    def guided(i):
        def predict(z, ti):
            ts = torch.tensor([ti, ti])
            eps = prior.predict_noise(torch.stack([z, z]), ts, Conditioning([f"p{i}"] * 2, cams[[i, i]]), torch.tensor([False, True]))
            return eps[1] + g * (eps[0] - eps[1])
        return predict

    z_hat = torch.stack([ddim_by_hand(guided(i), x_t[i], int(t[i]), abar, stride, eta, ddim_noise[i]) for i in range(B)])
    torch.testing.assert_close(out.denoised, z_hat, atol=2e-5, rtol=1e-4)
    a = abar[t].view(-1, 1, 1, 1)
    beta = (1 - a) * a.sqrt() / (1 - a).sqrt()
    torch.testing.assert_close(dx, beta * (x.detach() - z_hat), atol=2e-5, rtol=1e-4)


class PointMass:
    """The exact noise prediction of a data distribution that is one point mu: eps(x_t, t) = (x_t - sqrt(abar_t) mu)
    / sqrt(1 - abar_t), the same for every branch."""

    def __init__(self, mu):
        self.mu, self.alphas_cumprod = mu, stable_diffusion_alphas_cumprod()
        self.perp_neg, self.text_encoder = False, None

    def predict_noise(self, noisy, timesteps, cond, unconditional):
        a = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        return (noisy - a.sqrt() * self.mu) / (1 - a).sqrt()


def test_deterministic_ddim_on_a_point_mass_keeps_the_drawn_noise():
    """Property of DDIM with eta = 0 (Song et al. 2021): for a point-mass data distribution every stride predicts
    x0 = mu and keeps the predicted noise e = (x_t - sqrt(abar_t) mu) / sqrt(1 - abar_t) of the start, so the
    multi-step z_hat is sqrt(abar_0) mu + sqrt(1 - abar_0) e (the last stride lands on abar_0), whatever t and the
    number of strides."""
    mu = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    prior, B = PointMass(mu), 5
    x = torch.rand(B, 3, 4, 4)
    for steps in (2, 4, 10):
        gen = torch.Generator().manual_seed(steps)
        replay = torch.Generator().set_state(gen.get_state())
        out = score_distillation(prior, x, Conditioning(["p"] * B, orbit_cameras(B, 15.0, 2.0, 50.0)), method="sds", guidance_scale=7.5,
                                 t_range=(20, 980), eta=0.1, generator=gen, denoise_steps=steps, denoise_eta=0.0)
        t = torch.randint(20, 981, (B,), generator=replay)
        a_t = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a_t.sqrt() * x + (1 - a_t).sqrt() * torch.randn(x.shape, generator=replay)
        e = (x_t - a_t.sqrt() * mu) / (1 - a_t).sqrt()
        a0 = prior.alphas_cumprod[0]
        torch.testing.assert_close(out.denoised, a0.sqrt() * mu + (1 - a0).sqrt() * e, atol=1e-5, rtol=1e-4)


def test_multistep_z_hat_is_for_sds_only():
    from amortized3d.config import ConfigError, load_config

    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="denoise_steps=4 .*distill.method=sds, not asd"):
        score_distillation(RandomPredictor((3, 4, 4)), x, Conditioning(["p"] * 2, orbit_cameras(2, 15.0, 2.0, 50.0)), method="asd",
                           guidance_scale=7.5, t_range=(20, 980), eta=0.1, generator=torch.Generator(), denoise_steps=4)
    with pytest.raises(ConfigError, match="denoise_steps=4 .*distill.method=sds, not asd"):
        load_config("shapeworld-16", overrides=["distill.denoise_steps=4", "distill.method=asd"])
