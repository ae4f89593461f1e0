"""The analytic prior: closed form, a Monte-Carlo estimate of E[eps | x_t], and CFG."""

import math

import torch

from amortized3d.priors.analytic import gaussian_noise_prediction, mixture_noise_prediction
from amortized3d.interfaces import Conditioning


def monte_carlo_eps(x_t, alphabar, means, std, n=400_000, seed=0):
    """Self-normalized importance estimate of E[eps | x_t] with x ~ (1/K) sum N(mu_k, s^2 I).

    x_t [D], means [K, D]. Samples x from the prior, weights by N(x_t; sqrt(a) x, (1 - a) I).
    """
    g = torch.Generator().manual_seed(seed)
    K, D = means.shape
    k = torch.randint(0, K, (n,), generator=g)
    x = means[k] + std * torch.randn(n, D, generator=g, dtype=torch.float64)
    a = alphabar
    logw = -((x_t - math.sqrt(a) * x) ** 2).sum(1) / (2 * (1 - a))
    w = torch.softmax(logw, 0)
    eps = (x_t - math.sqrt(a) * x) / math.sqrt(1 - a)
    return (w.unsqueeze(1) * eps).sum(0)


def test_mixture_prediction_matches_monte_carlo():
    means = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.5, 0.5]], dtype=torch.float64)
    std = 0.3
    for a, x_t in [(0.6, [0.4, 0.3]), (0.2, [1.0, -0.5]), (0.9, [0.7, 0.2])]:
        x_t = torch.tensor(x_t, dtype=torch.float64)
        mc = monte_carlo_eps(x_t, a, means, std)
        closed = mixture_noise_prediction(
            x_t.reshape(1, 2, 1, 1), torch.tensor([a], dtype=torch.float64), means.reshape(1, 3, 2, 1, 1),
            torch.ones(1, 3, dtype=torch.bool), std,
        ).reshape(2)
        assert torch.allclose(closed, mc, atol=0.01), (a, closed, mc)


def test_single_gaussian_closed_form():
    # K = 1: eps* = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)
    mu = torch.rand(2, 1, 3, 4, 4)
    x_t = torch.randn(2, 3, 4, 4)
    a = torch.tensor([0.3, 0.95])
    s = 0.1
    got = mixture_noise_prediction(x_t, a, mu, torch.ones(2, 1, dtype=torch.bool), s)
    for i in range(2):
        ai = a[i].item()
        exp = math.sqrt(1 - ai) * (x_t[i] - math.sqrt(ai) * mu[i, 0]) / (ai * s * s + 1 - ai)
        assert torch.allclose(got[i], exp, atol=1e-6)
    # the unconditional Gaussian is the same formula with a scalar mean
    got_u = gaussian_noise_prediction(x_t, a, 0.5, 0.5)
    exp_u = (1 - a[1]).sqrt() * (x_t[1] - a[1].sqrt() * 0.5) / (a[1] * 0.25 + 1 - a[1])
    assert torch.allclose(got_u[1], exp_u, atol=1e-6)


def test_invalid_components_are_ignored():
    mu = torch.rand(1, 3, 3, 2, 2)
    x_t = torch.randn(1, 3, 2, 2)
    a = torch.tensor([0.5])
    only_first = mixture_noise_prediction(x_t, a, mu[:, :1], torch.ones(1, 1, dtype=torch.bool), 0.2)
    masked = mixture_noise_prediction(x_t, a, mu, torch.tensor([[True, False, False]]), 0.2)
    assert torch.allclose(only_first, masked, atol=1e-6)


def test_noise_prediction_is_exact_at_the_mode_when_s_is_zero_limit():
    # x exactly on a component and s -> 0: E[eps | x_t] = eps (the noise is fully identifiable).
    mu = torch.rand(1, 1, 3, 4, 4)
    eps = torch.randn(1, 3, 4, 4)
    a = torch.tensor([0.7])
    x_t = a.sqrt() * mu[:, 0] + (1 - a).sqrt() * eps
    got = mixture_noise_prediction(x_t, a, mu, torch.ones(1, 1, dtype=torch.bool), 1e-4)
    assert torch.allclose(got, eps, atol=1e-5)


def test_prior_on_shapeworld_prompts_uses_the_exact_render():
    from amortized3d.priors.analytic import AnalyticPrior, AnalyticPriorConfig, render_prompt_scenes
    from amortized3d.rendering.cameras import orbit_cameras

    prior = AnalyticPrior(AnalyticPriorConfig(std=0.05, n_proposal=32, n_importance=16), scene_radius=1.0, inv_std=30.0)
    cams = orbit_cameras(2, 15.0, 2.2, 50.0)
    prompts = ["a large red cube", "a small blue sphere"]
    mu, valid = render_prompt_scenes(prompts, cams.reshape(2, 1), 16, 16, **prior.render_kwargs)
    assert mu.shape == (2, 1, 1, 3, 16, 16) and valid.all()
    # The red cube's render is reddish in the middle and white at the corner.
    center, corner = mu[0, 0, 0, :, 8, 8], mu[0, 0, 0, :, 0, 0]
    assert center[0] > 0.7 and center[1] < 0.3 and torch.allclose(corner, torch.ones(3), atol=1e-3)
    # x_t built from the render: eps* = sqrt(1-a)(x_t - sqrt(a) mu) / (a s^2 + 1 - a); unconditional rows use N(0.5, 0.5^2).
    t = torch.tensor([300, 700])
    a = prior.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    x_t = torch.randn(2, 3, 16, 16)
    eps = prior.predict_noise(torch.cat([x_t, x_t]), torch.cat([t, t]), Conditioning(prompts * 2, cams.reshape(2)[[0, 1, 0, 1]]),
                              torch.tensor([False, False, True, True]))
    expected_c = (1 - a).sqrt() * (x_t - a.sqrt() * mu[:, 0, 0]) / (a * 0.05**2 + 1 - a)
    expected_u = (1 - a).sqrt() * (x_t - a.sqrt() * 0.5) / (a * 0.25 + 1 - a)
    assert torch.allclose(eps[:2], expected_c, atol=1e-5)
    assert torch.allclose(eps[2:], expected_u, atol=1e-5)


def test_underspecified_prompt_is_a_mixture_over_its_scenes():
    from amortized3d.priors.analytic import AnalyticPrior, AnalyticPriorConfig, render_prompt_scenes
    from amortized3d.rendering.cameras import orbit_cameras

    prior = AnalyticPrior(AnalyticPriorConfig(std=0.05, n_proposal=32, n_importance=16), scene_radius=1.0, inv_std=30.0)
    cams = orbit_cameras(1, 15.0, 2.2, 50.0).reshape(1, 1)
    mu, valid = render_prompt_scenes(["a cube"], cams, 12, 12, **prior.render_kwargs)
    assert valid.sum() == 16  # 8 colors x 2 sizes
    # Near a specific component at low noise, the prediction follows that component.
    t = torch.tensor([50])
    a = prior.alphas_cumprod[t].reshape(1, 1, 1, 1)
    eps = torch.randn(1, 3, 12, 12)
    x_t = a.sqrt() * mu[0, 5, 0].unsqueeze(0) + (1 - a).sqrt() * eps
    got = prior.predict_noise(x_t, t, Conditioning(["a cube"], cams.reshape(1)), torch.tensor([False]))
    single = (1 - a).sqrt() * (x_t - a.sqrt() * mu[0, 5, 0]) / (a * 0.05**2 + 1 - a)
    assert torch.allclose(got, single, atol=1e-4)
