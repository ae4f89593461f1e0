"""The analytic prior's learned branches (VSD, LODS-embedding, LODS-LoRA): zero at initialization, so the first
gradients are the methods' formulas with the pretrained branch in place of the learned one (ScaleDreamer Table 1
for VSD, LODS Eq. 7 and 9); their alignment loss falls on fixed renders; and training with them runs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from amortized3d.builders import build_adapter, build_prior
from amortized3d.distillation.score_distillation import score_distillation
from amortized3d.interfaces import Conditioning
from amortized3d.priors.branches import COND, UNCOND
from amortized3d.priors.schedule import add_noise
from amortized3d.rendering.cameras import orbit_cameras
from amortized3d.training.train import train
from tests.fixtures import tiny_config

METHODS = ["vsd", "lods-embedding", "lods-lora"]
PROMPTS = ["a large red cube", "a small blue sphere"]


def setup(method: str):
    cfg = tiny_config(f"distill.method={method}")
    prior = build_prior(cfg)
    adapter, optimizer = build_adapter(cfg, prior)
    H, W = cfg.render.height, cfg.render.width
    cameras = orbit_cameras(2, 15.0, 1.5, 60.0)
    x = prior.encode(torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1)))
    return cfg, prior, adapter, optimizer, x, Conditioning(PROMPTS, cameras)


@pytest.mark.parametrize("method", METHODS)
def test_first_gradient_is_the_formula_with_the_pretrained_branch(method):
    cfg, prior, adapter, _, x, cond = setup(method)
    g, t_range, B = 7.5 if method == "vsd" else 1000.0, (20, 980), x.shape[0]
    out = score_distillation(prior, x, cond, method=method, guidance_scale=g, t_range=t_range, eta=0.1,
                             generator=torch.Generator().manual_seed(5), adapter=adapter)
    # The same draws as score_distillation: t ~ U{t_min..t_max}, then eps, from one generator.
    gen = torch.Generator().manual_seed(5)
    t = torch.randint(t_range[0], t_range[1] + 1, (B,), generator=gen)
    noise = torch.randn(x.shape, generator=gen)
    abar = prior.alphas_cumprod
    x_t = add_noise(x, noise, t, abar)
    w = (1 - abar[t]).view(-1, 1, 1, 1)
    eps_c = prior.predict_noise(x_t, t, cond, torch.full((B,), COND))
    eps_u = prior.predict_noise(x_t, t, cond, torch.full((B,), UNCOND))
    if method == "vsd":  # w (eps_cfg - eps_phi'), eps_phi' = eps_c at initialization
        expected = w * (eps_u + g * (eps_c - eps_u) - eps_c)
    else:  # w (eps_c + (1 - g) / g eps_learned - eps / g), eps_learned = eps_u at initialization
        expected = w * (eps_c + (1 - g) / g * eps_u - noise / g)
    torch.testing.assert_close(out.grad, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_alignment_loss_falls_on_fixed_renders(method):
    _, prior, adapter, _, x, cond = setup(method)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = adapter.alignment_loss(x, cond, torch.Generator().manual_seed(6))  # the same t and eps each time
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # Adam on a fixed loss: lower at the end than at the start, and lower on average over the last ten steps
    assert losses[-1] < 0.98 * losses[0] and sum(losses[-10:]) < sum(losses[:10]), losses[::8]


@pytest.mark.parametrize("method", METHODS)
def test_training_with_the_learned_branch_runs_with_the_guard_silent(method, tmp_path):
    run = train(tiny_config(f"distill.method={method}", "train.steps=3", "train.ckpt_every=3"), tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[-1]["skipped_steps"] == 0
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["adapter_loss"]) for r in rows)


def test_vsd_camera_dropout_reaches_only_the_learned_term():
    """A dropped camera is zero for the learned term only; the exact conditional still renders the real camera, so the
    prediction stays finite and, at initialization, equals the exact conditional whatever is dropped."""
    _, prior, adapter, _, x, cond = setup("vsd")
    t = torch.tensor([300, 700])
    exact = prior.predict_noise(x, t, cond, torch.full((2,), COND))
    for keep in (torch.tensor([True, True]), torch.tensor([False, True]), torch.tensor([False, False])):
        torch.testing.assert_close(adapter.predict_noise(x, t, cond, keep=keep), exact)
    losses = [adapter.alignment_loss(x, cond, torch.Generator().manual_seed(seed)) for seed in range(40)]  # some drop
    assert all(torch.isfinite(loss) for loss in losses)
