"""Density control of 3D Gaussians (amortized3d/training/densify.py) on constructed cases, whose outcome is worked out by
hand from the rules of 3DGS (clone small, split large, prune transparent and, after a reset, large Gaussians), and a
run that resumes across a densification step bit-identically."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from amortized3d.builders import build_generator, build_optimizer
from amortized3d.config import load_config
from amortized3d.rendering.gaussians import SplatRender
from amortized3d.training.densify import DensityControl, accumulate
from tests.fixtures import TINY

PROMPT = "a large red cube"
GAUSSIANS = [*TINY, "generator.kind=gaussians", "regularizers.eikonal=[]", "train.prompts_per_step=1", "train.views_per_prompt=1"]


def four_gaussians(**splats):
    """A PromptGaussians holding 4 constructed Gaussians (0: small, 1: large, 2: transparent, 3: plain) and its
    optimizer, with one Adam step taken so that every moment is non-zero."""
    cfg = load_config("prompt:" + PROMPT, overrides=[*GAUSSIANS, "generator.n_gaussians=4", *[f"splats.{k}={v}" for k, v in splats.items()]])
    model = build_generator(cfg)
    with torch.no_grad():
        s = model.splats
        s["means"].copy_(torch.tensor([[0.1, 0, 0], [0, 0.2, 0], [0, 0, 0.3], [-0.1, -0.1, 0]]))
        s["scales"].copy_(torch.log(torch.tensor([[0.005] * 3, [0.05, 0.02, 0.03], [0.004] * 3, [0.006] * 3])))
        s["quats"].copy_(torch.tensor([[1.0, 0, 0, 0], [0.8, 0.6, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0]]))
        s["opacities"].copy_(torch.logit(torch.tensor([0.5, 0.6, 0.001, 0.7])))
        s["sh0"].copy_(torch.arange(12.0).reshape(4, 1, 3))
    optimizer = build_optimizer(cfg, model)
    sum(p.sum() * (i + 1) for i, p in enumerate(model.parameters())).backward()
    optimizer.step()
    optimizer.zero_grad()
    return cfg, model, optimizer


def moments(optimizer, model, name):
    return optimizer.state[model.splats[name]]["exp_avg"].clone()


def test_clone_split_and_prune_by_hand():
    cfg, model, optimizer = four_gaussians(grad_threshold=0.5, percent_dense=0.01, scene_extent=1.0)
    before = {k: v.detach().clone() for k, v in model.splats.items()}
    m_before = {k: moments(optimizer, model, k) for k in model.splats}
    model.grad2d.copy_(torch.tensor([3.0, 2.0, 0.1, 0.4]))
    model.count.copy_(torch.tensor([2.0, 2.0, 1.0, 2.0]))  # mean gradients 1.5, 1.0, 0.1, 0.2 against the threshold 0.5
    out = DensityControl(cfg.splats, seed=0).densify(200, model, optimizer)
    # Gaussian 0 (max scale 0.005 <= 0.01) is cloned, 1 (0.05) split in two, 2 (opacity 0.001 < 0.005) pruned, 3 kept:
    # gsplat's order: clones appended, split ones removed and their two children appended, pruned ones removed.
    assert out == {"cloned": 1.0, "split": 1.0, "pruned": 1.0}
    s = {k: v.detach() for k, v in model.splats.items()}
    assert s["means"].shape[0] == 5
    for name in ("quats", "opacities", "sh0"):  # rows: 0, 3, clone of 0, two children of 1
        assert torch.equal(s[name], before[name][[0, 3, 0, 1, 1]]), name
    assert torch.equal(s["means"][:3], before["means"][[0, 3, 0]])
    assert torch.allclose(s["scales"][:3], before["scales"][[0, 3, 0]])
    assert torch.allclose(s["scales"][3:], (before["scales"][1].exp() / 1.6).log().expand(2, 3), atol=1e-6)  # 3DGS: / (0.8 x 2)
    # the children are drawn from the parent's Gaussian: within a few standard deviations along its axes
    offsets = s["means"][3:] - before["means"][1]
    assert (offsets.norm(dim=-1) > 0).all() and (offsets.norm(dim=-1) < 4 * 0.05 * math.sqrt(3)).all()
    for name in model.splats:  # Adam's moments: carried for the survivors 0 and 3, zero for the three new Gaussians
        m = moments(optimizer, model, name)
        assert torch.equal(m[:2], m_before[name][[0, 3]]), name
        assert (m[2:] == 0).all(), name
        assert optimizer.state[model.splats[name]]["exp_avg_sq"][2:].eq(0).all()
    assert (model.grad2d == 0).all() and (model.count == 0).all() and model.grad2d.shape == (5,)


def test_reset_clamps_the_opacities_and_later_prunes_large_gaussians():
    cfg, model, optimizer = four_gaussians(grad_threshold=100.0, reset_opacity_at=[10], reset_opacity=0.05, prune_scale=0.04,
                                           densify_from=0, densify_every=5)
    control = DensityControl(cfg.splats, seed=0)
    opacity_moments = moments(optimizer, model, "opacities")
    assert (opacity_moments != 0).all()
    metrics = control.step(10, model, optimizer)  # a densification (the transparent one is pruned), then the reset
    expected = torch.minimum(torch.tensor([0.5, 0.6, 0.7]), torch.tensor(0.05))
    assert torch.allclose(torch.sigmoid(model.splats["opacities"]), expected, atol=1e-6)
    assert (moments(optimizer, model, "opacities") == 0).all() and metrics["opacity_reset"] == 1.0
    assert metrics["pruned"] == 1.0 and metrics["n_gaussians"] == 3.0  # step 10 is not after the reset: no large ones pruned
    metrics = control.step(15, model, optimizer)  # after the first reset: max scale 0.05 > 0.04 goes too
    assert metrics["pruned"] == 1.0 and model.n_gaussians == 2
    assert torch.allclose(model.splats["means"].detach(), torch.tensor([[0.1, 0, 0], [-0.1, -0.1, 0]]), atol=1e-3)  # after one Adam step


def test_growth_stops_at_max_gaussians_keeping_the_highest_gradients():
    cfg, model, optimizer = four_gaussians(grad_threshold=0.5, max_gaussians=5)
    model.grad2d.copy_(torch.tensor([3.0, 2.0, 0.1, 0.4]))
    model.count.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]))  # both 0 and 1 want to grow; room for one: the higher gradient
    out = DensityControl(cfg.splats, seed=0).densify(200, model, optimizer)
    assert out["cloned"] == 1.0 and out["split"] == 0.0


def test_accumulate_adds_ndc_gradient_norms_of_the_drawn_cameras():
    # gsplat's DefaultStrategy: pixel gradients scaled by (W / 2, H / 2) x the number of cameras; culled ones skipped.
    cfg, model, _ = four_gaussians()
    C, H, W = 2, 8, 12
    means2d = torch.zeros(C, 4, 2, requires_grad=True)
    means2d.grad = torch.tensor([[[1.0, 2.0], [0.5, 0.0], [0.0, 0.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, 0.0]]]) * 1e-3
    radii = torch.tensor([[1, 1, 0, 2], [3, 0, 1, 1]])
    render = SplatRender(torch.zeros(C, 3, H, W), torch.zeros(C, 1, H, W), torch.zeros(C, 1, H, W), torch.zeros(C, 1, H, W), means2d, radii)
    accumulate(model, render)
    g = means2d.grad * torch.tensor([W / 2 * C, H / 2 * C])
    expected = torch.zeros(4)
    for c in range(C):
        for i in range(4):
            if radii[c, i] > 0:
                expected[i] += g[c, i].norm()
    assert torch.allclose(model.grad2d, expected) and model.count.tolist() == [2.0, 1.0, 1.0, 2.0]


@pytest.mark.parametrize("color_field", [False, True])
def test_a_run_resumes_bit_identically_across_a_densification(tmp_path, color_field):
    from amortized3d.training.train import train

    overrides = [*GAUSSIANS, f"generator.color_field={str(color_field).lower()}", "generator.n_gaussians=64", "train.steps=8",
                 "train.ckpt_every=3", "splats.densify_from=1", "splats.densify_every=4", "splats.densify_until=7", "splats.grad_threshold=1e-9", "splats.reset_opacity_at=[6]"]
    cfg = load_config("prompt:" + PROMPT, overrides=overrides)
    train(cfg, tmp_path / "whole")
    train(cfg, tmp_path / "parts", max_steps=3)  # stops before the densification at step 4
    train(cfg, tmp_path / "parts", resume=True)
    whole = load_file(tmp_path / "whole" / "checkpoints" / "step_00000008" / "model.safetensors")
    parts = load_file(tmp_path / "parts" / "checkpoints" / "step_00000008" / "model.safetensors")
    assert whole["splats.means"].shape[0] > 64  # it densified
    assert whole.keys() == parts.keys() and all(torch.equal(whole[k], parts[k]) for k in whole)
    opt_whole = load_file(tmp_path / "whole" / "checkpoints" / "step_00000008" / "optimizer.safetensors")
    opt_parts = load_file(tmp_path / "parts" / "checkpoints" / "step_00000008" / "optimizer.safetensors")
    assert all(torch.equal(opt_whole[k], opt_parts[k]) for k in opt_whole)


def test_gaussians_are_the_asset_of_one_prompt():
    from amortized3d.config import ConfigError

    with pytest.raises(ConfigError, match="gaussians is the asset of one prompt"):
        load_config("shapeworld-16", overrides=["generator.kind=gaussians", "regularizers.eikonal=[]"])
    with pytest.raises(ConfigError, match="no distance for the eikonal term"):
        load_config("prompt:" + PROMPT, overrides=["generator.kind=gaussians", "regularizers.eikonal=[[0, 0.1]]"])
