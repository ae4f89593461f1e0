"""Multi-view distillation: the joint analytic prior, one t per object, SDS*, the orbit camera sampler and the
cross-view consistency of the oracle."""

import math

import pytest
import torch

from amortized3d.distillation.score_distillation import score_distillation
from amortized3d.interfaces import Conditioning
from amortized3d.priors.analytic import AnalyticPrior, AnalyticPriorConfig, mixture_noise_prediction, render_prompt_scenes
from amortized3d.priors.branches import COND, UNCOND
from amortized3d.rendering.cameras import Cameras, orbit_cameras, sample_training_cameras
from tests.test_distillation import RandomPredictor


def joint_monte_carlo_eps(x_t, a, means, std, n=400_000, seed=0):
    """Self-normalized importance estimate of E[eps | x_t] for one object's V views drawn jointly: k ~ U{K}, then
    x_v = mu_kv + s z_v for every view v. x_t [V, D], means [K, V, D] -> [V, D]. The estimate weighs prior samples
    of the whole group by N(x_t; sqrt(a) x, (1 - a) I) over all its views at once."""
    g = torch.Generator().manual_seed(seed)
    K, V, D = means.shape
    k = torch.randint(0, K, (n,), generator=g)
    x = means[k] + std * torch.randn(n, V, D, generator=g, dtype=torch.float64)
    logw = -((x_t - math.sqrt(a) * x) ** 2).sum((1, 2)) / (2 * (1 - a))
    w = torch.softmax(logw, 0)
    eps = (x_t - math.sqrt(a) * x) / math.sqrt(1 - a)
    return (w.view(-1, 1, 1) * eps).sum(0)


def test_joint_prediction_matches_monte_carlo_of_the_joint_distribution():
    # 2 scenes, a joint 4-view sample, 2 pixels per view: the noisy views lean to scene 0 in three views, scene 1 in one.
    means = torch.tensor([[[0.1, 0.9], [0.8, 0.2], [0.5, 0.5], [0.3, 0.6]],
                          [[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.7, 0.2]]], dtype=torch.float64)
    std, V = 0.3, 4
    for a in (0.3, 0.7):
        x_t = math.sqrt(a) * torch.tensor([[0.2, 0.7], [0.7, 0.3], [0.45, 0.55], [0.6, 0.3]], dtype=torch.float64) + 0.2
        mc = joint_monte_carlo_eps(x_t, a, means, std)
        closed = mixture_noise_prediction(x_t.reshape(V, 2, 1, 1), torch.full((V,), a, dtype=torch.float64),
                                          means.permute(1, 0, 2).reshape(V, 2, 2, 1, 1), torch.ones(V, 2, dtype=torch.bool),
                                          std, views_per_object=V).reshape(V, 2)
        assert torch.allclose(closed, mc, atol=0.01), (a, closed, mc)
        per_view = mixture_noise_prediction(x_t.reshape(V, 2, 1, 1), torch.full((V,), a, dtype=torch.float64),
                                            means.permute(1, 0, 2).reshape(V, 2, 2, 1, 1), torch.ones(V, 2, dtype=torch.bool), std)
        assert (per_view - closed).abs().max() > 0.05  # the joint prior is a different distribution from the per-view one


def make_prior(multiview):
    return AnalyticPrior(AnalyticPriorConfig(std=0.05, n_proposal=32, n_importance=16), scene_radius=1.0, inv_std=30.0,
                         multiview=multiview)


def test_multiview_prior_shares_one_scene_across_the_views_of_an_object():
    # "a cube" means 16 scenes (8 colors x 2 sizes). Three views near scene 3 and one near scene 9: per view, each
    # follows its own scene; jointly, the group's scene is 3 for all four (the likelihood of 3 views outweighs 1).
    prompt, cams = "a cube", orbit_cameras(4, 15.0, 2.2, 50.0)
    mu, valid = render_prompt_scenes([prompt], cams.reshape(1, 4), 12, 12, **make_prior(True).render_kwargs)
    assert int(valid.sum()) == 16
    t = torch.full((4,), 20)  # low noise: the other scenes' responsibilities are negligible (below e^-50)
    a = make_prior(True).alphas_cumprod[t].reshape(-1, 1, 1, 1)
    picks = [3, 3, 9, 3]
    clean = torch.stack([mu[0, k, v] for v, k in enumerate(picks)])
    x_t = a.sqrt() * clean + (1 - a).sqrt() * 0.02 * torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    branch = torch.full((4,), COND)
    per_view = make_prior(False).predict_noise(x_t, t, Conditioning([prompt] * 4, cams), branch)
    joint = make_prior(True).predict_noise(x_t, t, Conditioning([prompt] * 4, cams, views_per_object=4), branch)
    v = a * 0.05**2 + 1 - a  # a single component's Tweedie formula (analytic.py's docstring)
    towards = lambda k: (1 - a).sqrt() / v * (x_t - a.sqrt() * mu[0, k])  # noqa: E731  [V, 3, H, W]
    assert torch.allclose(per_view, torch.stack([towards(k)[i] for i, k in enumerate(picks)]), atol=1e-4)
    assert torch.allclose(joint, towards(3), atol=1e-4)
    # one scene only ("a large red cube"): the joint and per-view priors coincide
    red = Conditioning(["a large red cube"] * 4, cams, views_per_object=4)
    assert torch.allclose(make_prior(True).predict_noise(x_t, t, red, branch),
                          make_prior(False).predict_noise(x_t, t, Conditioning(red.prompts, cams), branch), atol=1e-5)


def test_multiview_prior_refuses_groups_that_are_not_one_object():
    prior, cams = make_prior(True), orbit_cameras(4, 15.0, 2.2, 50.0)
    x = torch.rand(4, 3, 8, 8)
    cond = Conditioning(["a cube"] * 4, cams, views_per_object=4)
    with pytest.raises(ValueError, match="one timestep per object"):
        prior.predict_noise(x, torch.tensor([100, 100, 200, 100]), cond, torch.full((4,), COND))
    with pytest.raises(ValueError, match="one branch per object"):
        prior.predict_noise(x, torch.full((4,), 100), cond, torch.tensor([COND, COND, UNCOND, COND]))
    with pytest.raises(ValueError, match="mix prompts"):
        prior.predict_noise(x, torch.full((4,), 100), Conditioning(["a cube"] * 3 + ["a cone"], cams, views_per_object=4),
                            torch.full((4,), COND))
    with pytest.raises(ValueError, match="has 4 rows"):
        prior.predict_noise(x, torch.full((4,), 100), Conditioning(["a cube"] * 4, cams, views_per_object=3), torch.full((4,), COND))


@pytest.mark.parametrize("method", ["asd", "sds", "sds-star", "csd"])
def test_one_timestep_per_object(method):
    # 3 objects x 4 views through the multi-view analytic prior: every object's views share t (and ASD's t + dt);
    # the objects draw their own.
    prior, cams = make_prior(True), orbit_cameras(4, 15.0, 2.2, 50.0)
    x = torch.rand(12, 3, 8, 8)
    cond = Conditioning(["a cube"] * 4 + ["a cone"] * 4 + ["a sphere"] * 4, Cameras.cat([cams] * 3), views_per_object=4)
    out = score_distillation(prior, x, cond, method=method, guidance_scale=7.5, t_range=(20, 980), eta=0.5,
                             generator=torch.Generator().manual_seed(3), recon_rescale=0.5)
    for steps in [out.timesteps] + ([out.shifted_timesteps] if method == "asd" else []):
        groups = steps.view(3, 4)
        assert (groups == groups[:, :1]).all()
        assert len(set(groups[:, 0].tolist())) == 3  # three independent draws (this seed)
    if method == "asd":
        assert (out.shifted_timesteps >= out.timesteps).all()


def test_sds_star_gradient_from_raw_predictions():
    # MVDream's threestudio guidance (multiview_diffusion_guidance.py, recon_loss): x0 of eps_cfg and of eps_c, the
    # rescale factor std(x0_c) / std(x0_cfg) over each object's views x C x H x W (torch's unbiased std, + 1e-8), the
    # target phi factor x0_cfg + (1 - phi) x0_cfg and loss 1/2 ||x - target||^2 (no w(t)).
    V, g, phi = 4, 50.0, 0.5
    prior = RandomPredictor((3, 4, 4))
    x = torch.rand(2 * V, 3, 4, 4, requires_grad=True)
    cams = Cameras.cat([orbit_cameras(V, 15.0, 2.0, 50.0)] * 2)
    cond = Conditioning(["p0"] * V + ["p1"] * V, cams, views_per_object=V)
    out = score_distillation(prior, x, cond, method="sds-star", guidance_scale=g, t_range=(100, 900), eta=0.0,
                             generator=torch.Generator().manual_seed(1), recon_rescale=phi)
    (dx,) = torch.autograd.grad(out.loss.sum(), x)
    call = prior.calls[0]
    x_t, t = call["noisy"][: 2 * V], call["t"][: 2 * V]
    eps_c, eps_u = call["out"][: 2 * V], call["out"][2 * V:]
    eps_cfg = eps_u + g * (eps_c - eps_u)
    a = prior.alphas_cumprod[t].view(-1, 1, 1, 1)
    x0_cfg = (x_t - (1 - a).sqrt() * eps_cfg) / a.sqrt()
    x0_c = (x_t - (1 - a).sqrt() * eps_c) / a.sqrt()
    factor = (x0_c.view(2, V, 3, 4, 4).std([1, 2, 3, 4]) + 1e-8) / (x0_cfg.view(2, V, 3, 4, 4).std([1, 2, 3, 4]) + 1e-8)
    target = phi * factor.repeat_interleave(V).view(-1, 1, 1, 1) * x0_cfg + (1 - phi) * x0_cfg
    assert torch.allclose(dx, x.detach() - target, atol=1e-4)
    assert torch.allclose(out.loss, 0.5 * (x.detach() - target).square().flatten(1).sum(1), rtol=1e-4)
    # phi = 0: SDS with the weight sqrt(1 - abar_t) / sqrt(abar_t) in place of w(t) (x - x0_cfg, solved for eps)
    prior = RandomPredictor((3, 4, 4))
    out = score_distillation(prior, x, cond, method="sds-star", guidance_scale=g, t_range=(100, 900), eta=0.0,
                             generator=torch.Generator().manual_seed(1), recon_rescale=0.0)
    call = prior.calls[0]
    eps_cfg = call["out"][2 * V:] + g * (call["out"][: 2 * V] - call["out"][2 * V:])
    noise = (call["noisy"][: 2 * V] - a.sqrt() * x.detach()) / (1 - a).sqrt()
    assert torch.allclose(out.grad, (1 - a).sqrt() / a.sqrt() * (eps_cfg - noise), atol=1e-4)


def test_orbit_cameras_per_prompt():
    # MVDream's sampler (and the reference's multi-view one): the V views of a prompt 360 / V apart in azimuth, one
    # elevation, distance and fovy per prompt; relative_distance puts the camera at U(range) / tan(fovy / 2).
    g = torch.Generator().manual_seed(0)
    cams = sample_training_cameras(50, 4, (0.0, 30.0), (0.8, 1.0), (15.0, 60.0), g, group_views=True, relative_distance=True)
    assert cams.shape == (50, 4)
    step = torch.remainder(cams.azimuth.diff(dim=1), 360.0)
    assert torch.allclose(step, torch.full_like(step, 90.0), atol=1e-3)
    for name in ("elevation", "distance", "fovy"):
        values = getattr(cams, name)
        assert (values == values[:, :1]).all(), name
        assert values[:, 0].unique().numel() == 50, name
    relative = cams.distance * torch.tan(cams.fovy / 2)
    assert relative.min() >= 0.8 - 1e-5 and relative.max() <= 1.0 + 1e-5
    assert cams.elevation.min() >= 0.0 and cams.elevation.max() <= 30.0
    assert math.degrees(cams.fovy.min()) >= 15.0 - 1e-4 and math.degrees(cams.fovy.max()) <= 60.0 + 1e-4
    # the camera looks at the origin from its distance: its position is distance along its +z axis
    position, back = cams.c2w[..., :3, 3], cams.c2w[..., :3, 2]
    assert torch.allclose(position, cams.distance.unsqueeze(-1) * back, atol=1e-4)
    # the first view's azimuth -180 + 90 u spreads over its quarter, so the orbits cover every direction
    assert cams.azimuth[:, 0].min() < -170 and cams.azimuth[:, 0].max() > -100 and cams.azimuth[:, 0].max() < -90


def test_view_consistency_counts_the_views_showing_one_scene():
    from amortized3d.evaluation.oracle import view_consistency

    scenes = torch.rand(2, 3, 4, 3, 2, 2)  # 2 prompts, 3 scenes, 4 views
    valid = torch.tensor([[True, True, True], [True, True, False]])
    renders = torch.stack([torch.stack([scenes[0, k, v] for v, k in enumerate([0, 0, 2, 0])]),
                           torch.stack([scenes[1, k, v] for v, k in enumerate([0, 1, 0, 1])])])
    assert view_consistency(renders, scenes, valid).tolist() == [0.75, 0.5]
    assert view_consistency(scenes[:, 1], scenes, valid).tolist() == [1.0, 1.0]


def test_prior_flag_keeps_a_recipes_pretrained_prior_kind():
    # --prior MODEL: a ShapeWorld recipe (analytic) switches to Stable Diffusion; DL17k keeps MVDream; an explicit
    # prior.kind override wins.
    from amortized3d.cli import _resolve_config, build_parser

    def kind(*argv):
        args = build_parser().parse_args(["train", *argv])
        return _resolve_config(args).prior.kind

    assert kind("--corpus", "shapeworld-16", "--prior", "/some/sd21") == "stable_diffusion"
    assert kind("--corpus", "dl17k", "--prior", "/some/4view.pt") == "mvdream"
    assert kind("--corpus", "dl17k", "--prior", "/some/sd21", "prior.kind=stable_diffusion") == "stable_diffusion"
    assert kind("--corpus", "shapeworld-16", "--prior", "/some/if", "prior.kind=deepfloyd_if") == "deepfloyd_if"


def test_the_multiview_recipe_trains_with_one_orbit_and_one_t_per_object(tmp_path, monkeypatch, capsys):
    # configs/shapeworld-multiview.yaml through train(): every prior call sees 2 prompts x 4 views as 2 objects of 4
    # views, each an orbit (azimuths 90 degrees apart, one elevation), at one timestep per object and branch.
    from amortized3d.config import load_config
    from amortized3d.training.train import train
    from tests.fixtures import TINY

    cfg = load_config("shapeworld-16", "configs/shapeworld-multiview.yaml",
                      [*[o for o in TINY if not o.startswith("generator.")], "generator.preset=tiny", "train.steps=2",
                       "train.prompts_per_step=2", "train.ckpt_every=2"])
    calls = []
    original = AnalyticPrior.predict_noise

    def recording(self, noisy, timesteps, cond, branch):
        calls.append((cond.views_per_object, timesteps.clone(), cond.cameras.azimuth.clone(), cond.cameras.elevation.clone(), list(cond.prompts)))
        return original(self, noisy, timesteps, cond, branch)

    monkeypatch.setattr(AnalyticPrior, "predict_noise", recording)
    train(cfg, tmp_path / "run")
    training_calls = [c for c in calls if len(c[1]) == 3 * 8]  # ASD: [cond(t), uncond(t), cond(t + dt)] x 8 images
    assert len(training_calls) == 2
    for V, t, azimuth, elevation, prompts in training_calls:
        assert V == 4
        groups = t.view(-1, 4)
        assert (groups == groups[:, :1]).all()
        step = torch.remainder(azimuth.view(-1, 4).diff(dim=1), 360.0)
        assert torch.allclose(step, torch.full_like(step, 90.0), atol=1e-3)
        assert (elevation.view(-1, 4) == elevation.view(-1, 4)[:, :1]).all()
        assert all(len(set(prompts[i:i + 4])) == 1 for i in range(0, len(prompts), 4))
    # the noise-error diagnostic shows the prior objects of the views it was trained on (4), and says so for others
    from amortized3d.cli import main

    capsys.readouterr()
    assert main(["noise-error", str(tmp_path / "run"), "--prompts", "1", "--views", "3", "--timesteps", "2"]) == 2
    assert "use --views 4" in capsys.readouterr().err
    calls.clear()
    assert main(["noise-error", str(tmp_path / "run"), "--prompts", "1", "--views", "4", "--timesteps", "2"]) == 0
    assert calls and all(V == 4 for V, *_ in calls)


def test_multistep_z_hat_keeps_objects_together():
    # HiFA's DDIM z_hat with a multi-view prior: objects at different t step down in whole groups
    prior, cams = make_prior(True), orbit_cameras(4, 15.0, 2.2, 50.0)
    x = torch.rand(8, 3, 8, 8)
    cond = Conditioning(["a cube"] * 4 + ["a cone"] * 4, Cameras.cat([cams] * 2), views_per_object=4)
    out = score_distillation(prior, x, cond, method="sds", guidance_scale=7.5, t_range=(20, 980), eta=0.0,
                             generator=torch.Generator().manual_seed(7), denoise_steps=4)
    assert out.timesteps[0] != out.timesteps[4] and torch.isfinite(out.denoised).all()
