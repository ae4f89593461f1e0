"""The latent analytic prior (prior.latent=true): a fixed linear encoder E with orthonormal rows, its pseudo-inverse
decoder, and a noise prediction that stays exact in latent space (checked by Monte Carlo)."""

import math

import pytest
import torch

from amortized3d.builders import build_prior
from amortized3d.config import ConfigError, load_config
from amortized3d.interfaces import Conditioning
from amortized3d.priors.analytic import latent_encoder_weight, mixture_noise_prediction
from amortized3d.priors.branches import COND, UNCOND
from amortized3d.rendering.cameras import orbit_cameras
from tests.fixtures import TINY


def encoder_matrix() -> torch.Tensor:
    """E as a [4, 12] matrix on one 2 x 2 block (channel-major, then row, then column), from the convolution weight."""
    return latent_encoder_weight().reshape(4, 12)


def test_encoder_rows_are_orthonormal_and_the_decoder_is_its_pseudo_inverse():
    E = encoder_matrix().double()
    assert torch.allclose(E @ E.T, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(torch.linalg.pinv(E), E.T, atol=1e-12)  # torch.linalg.pinv (an SVD), independently of E's construction
    prior = build_prior(load_config("shapeworld-16", overrides=["prior.latent=true"]))
    x = torch.rand(2, 3, 6, 8)
    z = prior.encode(x)
    assert z.shape == (2, 4, 3, 4)
    block = x[0, :, 2:4, 4:6].reshape(12)  # block (row 1, column 2) by hand
    assert torch.allclose(z[0, :, 1, 2], E.float() @ block, atol=1e-6)
    assert torch.allclose(prior.encode(prior.decode(z)), z, atol=1e-6)  # E D = I
    assert torch.allclose(z[:, 0], x[:, 0].unfold(1, 2, 2).unfold(2, 2, 2).sum((-1, -2)) / 2, atol=1e-6)  # the block means
    with pytest.raises(ValueError, match="even"):
        prior.encode(torch.rand(1, 3, 5, 4))


def test_latent_noise_prediction_matches_monte_carlo():
    """E[eps | z_t] by self-normalized importance sampling: x from the pixel-space mixture (1/K) sum_k N(mu_k, s^2 I),
    z = E x, weights N(z_t; sqrt(a) z, (1 - a) I); E[eps | z_t] = (z_t - sqrt(a) E[z | z_t]) / sqrt(1 - a).
    Against the closed form with means E mu_k and the same s (one 2 x 2 block: z is 4-dimensional)."""
    torch.manual_seed(0)
    E = encoder_matrix().double()
    mus = torch.rand(3, 12, dtype=torch.float64)  # K = 3 pixel-space means
    s, a = 0.3, 0.5
    n = 2_000_000
    k = torch.randint(0, 3, (n,))
    z = (mus[k] + s * torch.randn(n, 12, dtype=torch.float64)) @ E.T  # [n, 4]
    z_t = math.sqrt(a) * (E @ mus[1]) + 0.4 * torch.randn(4, dtype=torch.float64)
    logw = -((z_t - math.sqrt(a) * z) ** 2).sum(1) / (2 * (1 - a))
    w = torch.softmax(logw, 0)
    eps_mc = (z_t - math.sqrt(a) * (w[:, None] * z).sum(0)) / math.sqrt(1 - a)
    closed = mixture_noise_prediction(z_t.view(1, 4, 1, 1), torch.tensor([a], dtype=torch.float64), (mus @ E.T).view(1, 3, 4, 1, 1),
                                      torch.ones(1, 3, dtype=torch.bool), s).view(4)
    assert torch.allclose(eps_mc, closed, atol=2e-2), (eps_mc, closed)


def test_the_prior_answers_in_latent_space_from_encoded_scene_renders():
    pixel = build_prior(load_config("shapeworld-16", overrides=TINY))
    latent = build_prior(load_config("shapeworld-16", overrides=[*TINY, "prior.latent=true"]))
    cams = orbit_cameras(2, 15.0, 1.6, 50.0)
    cond = Conditioning(["a cube", "a large red cube"], cams)
    t = torch.tensor([300, 700])
    z_t = torch.randn(2, 4, 8, 8)
    eps = latent.predict_noise(z_t.repeat(2, 1, 1, 1), t.repeat(2), cond.repeat(2), torch.tensor([COND, COND, UNCOND, UNCOND]))
    from amortized3d.priors.analytic import render_prompt_scenes

    rgb, valid = render_prompt_scenes(cond.prompts, cams.reshape(2, 1), 16, 16, **pixel.render_kwargs)
    means = latent.encode(rgb[:, :, 0].flatten(0, 1)).unflatten(0, (2, rgb.shape[1]))
    abar = latent.alphas_cumprod[t]
    assert torch.allclose(eps[:2], mixture_noise_prediction(z_t, abar, means, valid, latent.std), atol=1e-5)
    gray = latent.encode(torch.full((1, 3, 2, 2), 0.5))[0]  # E(m 1) = (2m, 2m, 2m, 0) per block
    assert torch.allclose(gray.flatten(), torch.tensor([1.0, 1.0, 1.0, 0.0]), atol=1e-6)
    a = abar.view(-1, 1, 1, 1)
    v = a * latent.uncond_std**2 + 1 - a
    assert torch.allclose(eps[2:], (1 - a).sqrt() / v * (z_t - a.sqrt() * gray), atol=1e-5)


def test_latent_training_runs_and_bad_settings_are_refused(tmp_path):
    from amortized3d.training.train import train

    cfg = load_config("shapeworld-16", overrides=[*TINY, "prior.latent=true", "train.steps=2", "distill.rgb_weight=0.1"])
    train(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="learned branch"):
        load_config("shapeworld-16", overrides=["prior.latent=true", "distill.method=vsd"])
    with pytest.raises(ConfigError, match="even"):
        load_config("shapeworld-16", overrides=["prior.latent=true", "render.height=33"])
