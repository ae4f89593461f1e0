"""The paper's diagnostics: the noise-prediction error e(t) (Fig. 2/12), the gradient norms of runs side by side
(Fig. 3/13 right) and the 2D toy experiment (Fig. 3/13 left), and the analytic prior's reuse of scene renders
they rely on."""

import json
import math

import pytest
import torch

from amortized3d.builders import build_prior
from amortized3d.cli import main
from amortized3d.evaluation.noise_error import error_curve
from amortized3d.interfaces import Conditioning
from amortized3d.priors.analytic import render_prompt_scenes
from amortized3d.priors.branches import COND
from amortized3d.rendering.cameras import orbit_cameras
from tests.fixtures import tiny_config


def test_error_curve_equals_the_closed_form_for_one_gaussian():
    # One scene (K = 1), prior N(mu, s^2 I). With x_t = sqrt(a) x + sqrt(1-a) eps and v = a s^2 + 1 - a, Tweedie gives
    # eps* = sqrt(1-a)/v (x_t - sqrt(a) mu), hence eps* - eps = sqrt(a(1-a))/v (x - mu) + ((1-a)/v - 1) eps
    # = sqrt(a(1-a))/v (x - mu) - a s^2/v eps:
    # the error follows from d = x - mu and eps alone, without the prior's code.
    cfg = tiny_config()
    prior = build_prior(cfg)
    cams = orbit_cameras(2, 15.0, 1.6, 50.0)
    prompt = "a large red cube"
    mu = render_prompt_scenes([prompt], cams.reshape(1, 2), 16, 16, **prior.render_kwargs)[0][0, 0]  # [2, 3, 16, 16]
    g = torch.Generator().manual_seed(0)
    x = (mu + 0.2 * torch.randn(mu.shape, generator=g)).double()
    eps = torch.randn(mu.shape, generator=g).double()
    cond = Conditioning([prompt] * 2, cams)
    branch = torch.full((2,), COND)
    timesteps = [20, 200, 500, 900]
    abar = prior.alphas_cumprod.double()
    curve = error_curve(lambda x_t, t: prior.predict_noise(x_t, t, cond, branch), x, eps, timesteps, abar)
    s2 = prior.std**2
    for t, e in zip(timesteps, curve):
        a = float(abar[t])
        v = a * s2 + 1 - a
        expected = (math.sqrt(a * (1 - a)) / v * (x - mu.double()) - a * s2 / v * eps).pow(2).mean()
        assert e == pytest.approx(float(expected), rel=1e-6)


def test_render_reuse_gives_the_fresh_predictions():
    # Reused renders (a second call, and a call mixing reused and new keys with different scene counts: "a cube" has
    # 16 scenes, "a red sphere" 2) must give what a prior that renders everything afresh gives.
    cfg = tiny_config()
    warm, cold = build_prior(cfg), build_prior(cfg)
    cams = orbit_cameras(3, 15.0, 1.6, 50.0)
    g = torch.Generator().manual_seed(1)
    noisy = torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([100, 400, 800])
    branch = torch.full((3,), COND)
    first = Conditioning(["a cube", "a cube", "a large blue cone"], cams)
    warm.predict_noise(noisy, t, first, branch)
    mixed = Conditioning(["a cube", "a red sphere", "a large blue cone"], cams)
    assert torch.equal(warm.predict_noise(noisy, t, first, branch), cold.predict_noise(noisy, t, first, branch))
    fresh = build_prior(cfg).predict_noise(noisy, t, mixed, branch)
    torch.testing.assert_close(warm.predict_noise(noisy, t, mixed, branch), fresh, rtol=1e-6, atol=1e-6)
    assert len(warm._render_cache) <= warm.RENDER_CACHE


def test_noise_error_of_a_vsd_run(tmp_path):
    from amortized3d.training.train import train

    # A VSD run whose learned branch barely moved (adapter lr 1e-12, one step): its branch starts as the exact
    # conditional (zero-initialized correction), so e_FT(t) equals e_PT(t) up to that step.
    cfg = tiny_config("distill.method=vsd", "train.steps=1", "train.ckpt_every=1", "distill.adapter_lr=1e-12")
    run = train(cfg, tmp_path / "run")
    assert main(["noise-error", str(run), "--prompts", "2", "--views", "2", "--timesteps", "12", "--eta", "0.2"]) == 0
    report = json.loads((run / "plots" / "noise_error.json").read_text())
    assert (run / "plots" / "noise_error.png").stat().st_size > 0
    ts = report["timesteps"]
    assert ts[0] == 20 and ts[-1] == 980 and len(ts) == 12 and ts == sorted(ts)  # distill.t_min[1] .. t_max[0]
    for a, b in zip(report["e_finetuned"], report["e_pretrained"]):
        assert a == pytest.approx(b, rel=1e-4)
    shifted = report["shifted"]
    assert report["t_min"] == 20 and report["eta"] == 0.2
    # ScaleDreamer Sec. 3.2: dt = eta (t - T_min), on the integers; T_min = 0.02 x 1000 at the end of the recipe's annealing
    assert shifted["t_plus_dt"] == [t + math.floor(0.2 * (t - 20)) for t in shifted["timesteps"]]
    assert all(s <= 980 for s in shifted["t_plus_dt"]) and len(shifted["e_pretrained"]) == len(shifted["timesteps"]) < 12
    # the shifted curve is the pretrained error at t + dt: where t + dt is itself a grid timestep, the values agree
    for t, s, e in zip(shifted["timesteps"], shifted["t_plus_dt"], shifted["e_pretrained"]):
        if s in ts:
            assert e == pytest.approx(report["e_pretrained"][ts.index(s)], rel=1e-6)


def test_plot_compares_runs_side_by_side(tmp_path):
    from amortized3d.training.train import train

    runs = [train(tiny_config(f"distill.method={m}", "train.steps=3", "train.ckpt_every=3"), tmp_path / m) for m in ("asd", "sds")]
    out = tmp_path / "compare"
    assert main(["plot", *map(str, runs), "--out", str(out)]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["labels"] == ["asd", "sds"] and (out / "compare_grad_sd_norm.png").is_file()
    for label, run in zip(data["labels"], runs):
        logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert data["series"]["grad_sd_norm"][label]["value"] == [r["grad_sd_norm"] for r in logged if "grad_sd_norm" in r]


def test_toy2d_every_setting_writes_its_files(tmp_path):
    from amortized3d.evaluation.toy2d import toy2d

    out = tmp_path / "toy"
    summaries = {s["name"]: s for s in toy2d("all", steps=3, particles=2, out=out)}
    assert set(summaries) == {"sds", "sds-star", "csd", "vsd", "lods-embedding", "lods-lora", "asd-eta0", "asd-paper-eta0.1",
                              "asd-reference-eta0.1", "asd-deterministic-eta0.1", "asd-fixed-eta0.1"}
    for name, s in summaries.items():
        assert (out / f"{name}.png").is_file() and json.loads((out / f"{name}.json").read_text())["grad_norm"] == s["grad_norm"]
        assert len(s["grad_norm"]) == 3 and len(s["psnr"]) == 2 and 1 <= s["distinct_modes"] <= 2
    assert (out / "toy2d.png").is_file() and (out / "grad_norms.png").is_file()
    # Table 1 at the first step (same particles, t and eps: the shift's draw comes after them): ASD with dt = 0 is
    # w (eps_u + g (eps_c - eps_u) - eps_c) = (g - 1) w (eps_c - eps_u), CSD at guidance 1 is w (eps_c - eps_u).
    asd, csd = summaries["asd-eta0"], summaries["csd"]
    assert asd["guidance"] == 7.5 and csd["guidance"] == 1.0
    assert asd["grad_norm"][0] == pytest.approx(6.5 * csd["grad_norm"][0], rel=1e-5)


def test_toy2d_command_rejects_unknown_settings(tmp_path, capsys):
    assert main(["toy2d", "--method", "dds", "--out", str(tmp_path)]) == 2
    assert "choose one of asd" in capsys.readouterr().err
    assert main(["toy2d", "--method", "asd", "--asd-shift", "random", "--out", str(tmp_path)]) == 2
    assert "paper, reference, deterministic, fixed" in capsys.readouterr().err
    assert main(["toy2d", "--method", "asd", "--prompt", "a frog", "--out", str(tmp_path)]) == 2


def test_a_zeroed_camera_is_a_clear_error_not_nan():
    # A zeroed camera-to-world matrix (VSD's camera dropout applies it to the learned term only) has no rays to render.
    from amortized3d.rendering.cameras import Cameras

    prior = build_prior(tiny_config())
    cams = orbit_cameras(1, 15.0, 1.6, 50.0)
    zeroed = Cameras(torch.zeros_like(cams.c2w), cams.fovy, cams.elevation, cams.azimuth, cams.distance)
    with pytest.raises(ValueError, match="all-zero camera-to-world rotation"):
        prior.predict_noise(torch.rand(1, 3, 8, 8), torch.tensor([500]), Conditioning(["a red cube"], zeroed), torch.full((1,), COND))
