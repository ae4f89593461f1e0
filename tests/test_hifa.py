"""HiFA's techniques (../shared/papers/002_172db8a02ef91f11.txt): the z-variance loss (Eq. 6-8) and kernel smoothing of
the coarse weights before importance sampling (Sec. 4.2), checked against brute-force computations."""

import numpy as np
import pytest
import torch

from amortized3d.config import ConfigError, load_config
from amortized3d.distillation.regularizers import z_variance_loss
from amortized3d.rendering.cameras import orbit_cameras
from amortized3d.rendering.volume import (PDF_FLOOR, _importance_positions, proposal_weights, ray_sphere_near_far, render_images,
                                          render_rays, sample_from_pdf, smooth_weights)
from tests.fixtures import TINY, SphereField


def test_kernel_smoothing_is_a_centered_convolution_with_zeros_past_the_ends():
    """Against numpy.convolve(mode="same") divided by the kernel's sum, and by hand for K = [1, 1, 1]."""
    weights = torch.rand(3, 5, 17, dtype=torch.float64)
    for kernel in ((1.0, 1.0, 1.0), (1.0, 2.0, 1.0), (0.5, 1.0, 3.0, 1.0, 0.5)):
        expected = np.apply_along_axis(lambda v: np.convolve(v, kernel, mode="same") / sum(kernel), -1, weights.numpy())
        assert np.allclose(smooth_weights(weights, kernel).numpy(), expected, atol=1e-12)
    v = weights[0, 0]
    by_hand = [(float(v[i - 1]) if i > 0 else 0.0) + float(v[i]) + (float(v[i + 1]) if i < 16 else 0.0) for i in range(17)]
    assert torch.allclose(smooth_weights(v, (1, 1, 1)), torch.tensor(by_hand, dtype=torch.float64) / 3)
    assert torch.equal(smooth_weights(weights, ()), weights)
    with pytest.raises(ValueError, match="odd length"):
        smooth_weights(weights, (1.0, 1.0))


def test_importance_samples_follow_the_smoothed_coarse_weights():
    """The renderer's importance positions are the inverse-CDF samples of the smoothed proposal weights (plus the floor)."""
    field = SphereField(0.4)
    cams = orbit_cameras(2, 20.0, 1.5, 50.0).reshape(1, 2)
    from amortized3d.rendering.cameras import camera_rays

    origins, dirs = camera_rays(cams, 6, 6)
    origins, dirs = origins.reshape(1, -1, 3), dirs.reshape(1, -1, 3)
    near, far = ray_sphere_near_far(origins, dirs, 1.0)
    edges, weights = proposal_weights(field, origins, dirs, near, far, 16, 30.0)
    extra = sample_from_pdf(edges, smooth_weights(weights, (1, 1, 1)) + PDF_FLOOR, 8)
    expected = torch.sort(torch.cat([edges, extra], -1), -1).values
    got = _importance_positions(field, origins, dirs, near, far, 16, 8, 30.0, None, None, (1, 1, 1))
    assert torch.allclose(got, expected)
    plain = _importance_positions(field, origins, dirs, near, far, 16, 8, 30.0, None, None, ())
    assert torch.equal(_importance_positions(field, origins, dirs, near, far, 16, 8, 30.0, None, None, (2.0,)), plain)  # K = [c]: identity
    assert not torch.allclose(got, plain)


def test_z_variance_loss_equals_a_per_ray_brute_force():
    """Eq. 6-8 computed ray by ray in Python from the renderer's own weights and sample positions."""
    field = SphereField(0.45, center=(0.1, 0.0, 0.0))
    cams = orbit_cameras(3, 15.0, 1.6, 50.0).reshape(1, 3)
    from amortized3d.rendering.cameras import camera_rays

    origins, dirs = camera_rays(cams, 8, 8)
    origins, dirs = origins.reshape(1, -1, 3), dirs.reshape(1, -1, 3)
    near, far = ray_sphere_near_far(origins, dirs, 1.0)
    out = render_rays(field, origins, dirs, near, far, n_proposal=16, n_importance=8, inv_std=20.0)
    total, n_rays = 0.0, out.weights.shape[1]
    for r in range(n_rays):
        w, z = out.weights[0, r].tolist(), out.t_mid[0, r].tolist()
        opacity = sum(w)
        if opacity > 0.5:  # delta_r of Eq. 8
            mu = sum(wi * zi for wi, zi in zip(w, z)) / opacity  # Eq. 6
            total += sum(wi * (zi - mu) ** 2 for wi, zi in zip(w, z)) / opacity  # Eq. 7
    expected = total / n_rays  # E_r over all rays
    assert 0 < expected
    assert abs(float(z_variance_loss(out.opacity, out.z_variance)) - expected) < 1e-6 * max(1.0, expected)
    some_empty = (out.opacity < 0.5).any() and (out.opacity > 0.5).any()
    assert some_empty  # the mask matters in this scene


def test_z_variance_loss_trains_and_is_logged():
    from amortized3d.builders import build_generator, build_prior, build_text_encoder
    from amortized3d.data.loader import PromptBatch
    from amortized3d.training.step import distillation_step

    cfg = load_config("shapeworld-16", overrides=[*TINY, "regularizers.z_variance=[[0.0, 3.0]]"])
    text_encoder = build_text_encoder(cfg)
    generator, prior = build_generator(cfg), build_prior(cfg)
    prompts = ["a large red cube", "a cube"]
    batch = PromptBatch(prompts, prompts, text_encoder.encode(prompts), [], None)
    result = distillation_step(cfg, generator, prior, batch, 0.5, torch.Generator().manual_seed(0), "cpu")
    assert result.metrics["z_variance"] >= 0
    result.loss.backward()
    assert generator.grid.table.grad.abs().sum() > 0


def test_kernel_and_z_variance_config_errors():
    with pytest.raises(ConfigError, match="importance_kernel"):
        load_config("shapeworld-16", overrides=["render.importance_kernel=[1, 1]"])
    with pytest.raises(ConfigError, match="importance_kernel"):
        load_config("shapeworld-16", overrides=["render.importance_kernel=[0, 0, 0]"])
    cfg = load_config("shapeworld-16", overrides=["render.importance_kernel=[1, 1, 1]"])
    assert cfg.render.volume_kwargs()["importance_kernel"] == (1.0, 1.0, 1.0)
    field = SphereField(0.4)
    cams = orbit_cameras(1, 20.0, 1.5, 50.0).reshape(1, 1)
    a = render_images(field, cams, 8, 8, **cfg.render.volume_kwargs()).rgb
    assert torch.isfinite(a).all()


def test_validation_writes_each_views_denoised_target_stabledreamer(tmp_path):
    """StableDreamer Prop. 1: the SDS gradient w(t) (eps_hat - eps) equals beta(t) (x - x_hat), beta = w sqrt(abar) /
    sqrt(1 - abar), so x_hat is the view's pseudo ground truth; the run writes it beside each validation sheet."""
    import imageio.v3 as iio

    from amortized3d.builders import build_prior
    from amortized3d.distillation.score_distillation import score_distillation
    from amortized3d.interfaces import Conditioning
    from amortized3d.training.train import train

    cfg = load_config("shapeworld-16", overrides=[*TINY, "distill.method=sds", "train.steps=2", "train.val_every=2"])
    train(cfg, tmp_path / "run")
    render_sheet = iio.imread(tmp_path / "run" / "validation" / "step_00000002.png")
    denoised_sheet = iio.imread(tmp_path / "run" / "validation" / "step_00000002_denoised.png")
    assert render_sheet.shape == denoised_sheet.shape and not (render_sheet == denoised_sheet).all()

    prior = build_prior(cfg)  # Prop. 1 on the analytic prior (pixel space: z = x)
    x = torch.rand(3, 3, 16, 16, dtype=torch.float32)
    cond = Conditioning(["a cube", "a large red cube", "a large blue sphere"], orbit_cameras(3, 15.0, 1.6, 50.0))
    out = score_distillation(prior, x, cond, method="sds", guidance_scale=1.0, t_range=(100, 900), eta=0.0,
                             generator=torch.Generator().manual_seed(0))
    abar = prior.alphas_cumprod[out.timesteps].view(-1, 1, 1, 1)
    beta = (1 - abar) * abar.sqrt() / (1 - abar).sqrt()
    torch.testing.assert_close(out.grad, beta * (x - out.denoised), atol=1e-4, rtol=1e-4)


def test_the_ablation_benchmark_measures_its_runs(tmp_path):
    """benchmarks/hifa_ablations.py end to end at a few steps: every row has its measures, flicker is 0 for a field
    rendered without randomness in its samples (no importance samples, no proposal jitter: n_proposal=1 has no interior
    edges), and the table names each variant."""
    from tests.fixtures import load_benchmark

    bench = load_benchmark("hifa_ablations")
    result = bench.main(["--prompts", "a large red cube", "--variants", "base", "zvar+ks", "--set", "train.steps=2", "train.ckpt_every=2",
                         *TINY[1:], "train.prompts_per_step=1", "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "r.json")])
    assert [r["variant"] for r in result["rows"]] == ["base", "zvar+ks"]
    for row in result["rows"]:
        assert 0 <= row["iou"] <= 1 and row["flicker"] > 0 and row["z_variance"] >= 0 and row["train_s"] > 0
    assert "| zvar+ks |" in result["table"]
    steady = bench.main(["--prompts", "a large red cube", "--variants", "base", "--set", "train.steps=2", "train.ckpt_every=2",
                         *TINY[1:], "train.prompts_per_step=1", "render.n_proposal=1", "render.n_importance=0",
                         "--out", str(tmp_path / "steady"), "--json", str(tmp_path / "s.json")])
    assert steady["rows"][0]["flicker"] == 0
