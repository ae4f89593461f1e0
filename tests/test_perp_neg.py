"""View-dependent prompts and Perp-Neg: thresholds, weights and interpolation by hand, and the guided
gradient of a Perp-Neg step on the tiny Stable Diffusion folder against its formula."""

from __future__ import annotations

import math

import pytest
import torch

from amortized3d.distillation.guidance import perpendicular_component
from amortized3d.distillation.score_distillation import score_distillation
from amortized3d.priors.branches import COND, UNCOND
from amortized3d.priors.diffusers_prior import DiffusionPrior, DiffusionPriorConfig, perp_neg_terms, view_index
from amortized3d.rendering.cameras import look_at_cameras
from amortized3d.interfaces import Conditioning
from tests.fixtures import scaled_linear_alphas_cumprod

SIDE, FRONT, BACK, OVERHEAD = 0, 1, 2, 3


def test_view_thresholds():
    cases = [(0, 0, FRONT), (0, 29.9, FRONT), (0, -29.9, FRONT), (0, 30.1, SIDE), (10, 90, SIDE), (0, -150, SIDE),
             (0, 150.1, BACK), (0, -179, BACK), (61, 0, OVERHEAD), (61, 170, OVERHEAD), (59, 170, BACK)]
    elevation = torch.tensor([c[0] for c in cases], dtype=torch.float32)
    azimuth = torch.tensor([c[1] for c in cases], dtype=torch.float32)
    assert view_index(elevation, azimuth).tolist() == [c[2] for c in cases]


def reference_perp_neg_weights(elevation: torch.Tensor, azimuth: torch.Tensor, guidance_perp_neg: float = -0.5) -> torch.Tensor:
    """The final weights of the two negatives, step by step as ScaleDreamer's public code computes them
    (github.com/theEricMa/ScaleDreamer, the MG15 / DF415 / AT2520 / CP100k recipes):

    1. custom/amortized/models/prompt_processors/base.py, get_text_embeddings_perp_neg: guidance_scale_neg is
       None (get_eps does not pass it), so it is set to -1; per camera, azimuth shifted to (-180, 180); overhead
       (elevation > overhead_threshold 60) -> [0, 0]; |azi| < 90 -> r = 1 - |azi| / 90,
       [f_fs(r) * gsn, f_sf(1 - r) * gsn]; else r = 2 - |azi| / 90, [f_sb(r) * gsn, f_fsb(r) * gsn]; with
       shifted_expotional_decay(a, b, c, r) = a exp(-b r) + c and the Config defaults f_fs = f_sf = (4, 0.5, -2.426),
       f_sb = (1, 0.5, -0.606), f_fsb = (1, 0.5, 0.967).
    2. threestudio/models/guidance/stable_diffusion_asd_guidance.py, get_eps:
       neg_guidance_weights = neg_guidance_weights * -1 * guidenace_scale_perp_neg, with the recipes'
       guidance_perp_neg: -0.5; then accum_grad += w_i * perpendicular_component(eps_neg_i - eps_u, eps_pos) and
       noise_pred = (eps_pos + accum_grad) * guidance_scale + eps_u.
    """
    def decay(a, b, c, r):
        return a * math.exp(-b * r) + c

    f_fs = f_sf = (4, 0.5, -2.426)
    f_sb, f_fsb = (1, 0.5, -0.606), (1, 0.5, 0.967)
    guidance_scale_neg = -1
    rows = []
    for ele, azi in zip(elevation.tolist(), azimuth.tolist()):
        azi = (azi + 180) % 360 - 180  # shift_azimuth_deg
        if ele > 60:
            weights = [0.0, 0.0]
        elif abs(azi) < 90:
            r = 1 - abs(azi) / 90
            weights = [decay(*f_fs, r) * guidance_scale_neg, decay(*f_sf, 1 - r) * guidance_scale_neg]
        else:
            r = 2.0 - abs(azi) / 90
            weights = [decay(*f_sb, r) * guidance_scale_neg, decay(*f_fsb, r) * guidance_scale_neg]
        rows.append([w * -1 * guidance_perp_neg for w in weights])
    return torch.tensor(rows, dtype=torch.float32)


def test_perp_neg_weights_equal_the_reference_computation(tiny_sd):
    azimuth = torch.arange(-180.0, 180.0, 7.5).repeat(6)
    elevation = torch.tensor([-10.0, 15.0, 45.0, 59.9, 60.1, 85.0]).repeat_interleave(48)
    cameras = look_at_cameras(elevation, azimuth, torch.full_like(azimuth, 1.5), torch.full_like(azimuth, 60.0))
    prior = DiffusionPrior(DiffusionPriorConfig(model=str(tiny_sd), resolution=16, perp_neg=True))  # the default scale is the recipes' -0.5
    expected = reference_perp_neg_weights(cameras.elevation, cameras.azimuth)
    torch.testing.assert_close(prior.perp_neg_weights(cameras), expected, atol=1e-5, rtol=0)
    # Perp-Neg pushes away from the other views: at the front (azimuth 0) the side negative's weight is
    # -0.5 * (4 - 2.426) = -0.787, subtracting the side view's perpendicular component.
    front = (cameras.azimuth == 0) & (cameras.elevation < 60)
    torch.testing.assert_close(prior.perp_neg_weights(cameras)[front][:, 1], torch.full((int(front.sum()),), -0.787), atol=1e-6, rtol=0)
    assert (prior.perp_neg_weights(cameras)[cameras.elevation > 60] == 0).all()
    # Another scale scales the weights linearly, as guidance_perp_neg does in the reference.
    other = DiffusionPrior(DiffusionPriorConfig(model=str(tiny_sd), resolution=16, perp_neg=True, perp_neg_scale=-2.0))
    torch.testing.assert_close(other.perp_neg_weights(cameras), reference_perp_neg_weights(cameras.elevation, cameras.azimuth, -2.0),
                               atol=1e-5, rtol=0)


def test_perp_neg_interpolates_the_view_prompts():
    table = torch.randn(5, 4, 77, 8)  # per camera: side, front, back, overhead embeddings
    null = torch.randn(77, 8)
    azimuth = torch.tensor([0.0, -45.0, 90.0, 135.0, 10.0])
    elevation = torch.tensor([0.0, 0.0, 0.0, 0.0, 80.0])
    positive, negatives = perp_neg_terms(table, elevation, azimuth, null)
    torch.testing.assert_close(positive[0], table[0, FRONT])
    torch.testing.assert_close(positive[1], 0.5 * table[1, FRONT] + 0.5 * table[1, SIDE])
    torch.testing.assert_close(positive[2], table[2, SIDE])
    torch.testing.assert_close(positive[3], 0.5 * table[3, SIDE] + 0.5 * table[3, BACK])
    torch.testing.assert_close(positive[4], table[4, OVERHEAD])
    torch.testing.assert_close(negatives[0], torch.stack([table[0, FRONT], table[0, SIDE]]))
    torch.testing.assert_close(negatives[3], torch.stack([table[3, SIDE], table[3, FRONT]]))
    torch.testing.assert_close(negatives[4], torch.stack([null, null]))


def test_perpendicular_component_is_orthogonal_and_completes_x():
    x, y = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    perp = perpendicular_component(x, y)
    assert (perp * y).flatten(1).sum(1).abs().max() < 1e-4
    parallel = x - perp
    cos = torch.nn.functional.cosine_similarity(parallel.flatten(1), y.flatten(1)).abs()
    torch.testing.assert_close(cos, torch.ones(3), atol=1e-5, rtol=0)


def test_view_dependent_prompts_take_the_camera_suffix(tiny_sd):
    prior = DiffusionPrior(DiffusionPriorConfig(model=str(tiny_sd), resolution=16, view_dependent=True))
    cameras = look_at_cameras(torch.tensor([0.0, 0.0, 0.0, 70.0, 0.0]), torch.tensor([5.0, 100.0, 170.0, 0.0, 0.0]),
                              torch.full((5,), 1.5), torch.full((5,), 60.0))
    tokens = prior.text_condition(Conditioning(["a frog"] * 5, cameras), torch.tensor([COND] * 4 + [UNCOND]))
    texts = ["a frog, front view", "a frog, side view", "a frog, back view", "a frog, overhead view", ""]
    torch.testing.assert_close(tokens, prior.text_encoder.encode(texts).tokens)


@pytest.mark.parametrize("method", ["sds", "asd"])
def test_perp_neg_step_is_one_unet_call_and_matches_its_formula(tiny_sd, method):
    prior = DiffusionPrior(DiffusionPriorConfig(model=str(tiny_sd), resolution=16, perp_neg=True, perp_neg_scale=-0.5))
    B, g, t_range, eta = 3, 7.5, (100, 900), 0.1
    cameras = look_at_cameras(torch.tensor([10.0, 20.0, 75.0]), torch.tensor([20.0, -120.0, 60.0]),
                              torch.full((B,), 1.5), torch.full((B,), 60.0))
    prompts = ["a frog", "a castle", "a frog"]
    latents = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(7), requires_grad=True)
    gen = torch.Generator().manual_seed(8)
    replay = torch.Generator().set_state(gen.get_state())
    rows = []
    handle = prior.unet.register_forward_hook(lambda module, args, kwargs=None: rows.append(args[0].shape[0]))
    try:
        out = score_distillation(prior, latents, Conditioning(prompts, cameras), method=method, guidance_scale=g, t_range=t_range, eta=eta, generator=gen)
    finally:
        handle.remove()
    assert rows == [B * (5 if method == "asd" else 4)]  # [cond, uncond, neg1, neg2 (, cond(t + dt))] in one call

    t = torch.randint(t_range[0], t_range[1] + 1, (B,), generator=replay)
    noise = torch.randn(latents.shape, generator=replay)
    abar = scaled_linear_alphas_cumprod()
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * latents.detach() + (1 - a).sqrt() * noise
    # The embeddings by hand from the view prompts (Perp-Neg interpolation), independent of text_condition.
    suffix = [", side view", ", front view", ", back view", ", overhead view"]
    emb = {s: prior.text_encoder.encode([p + s for p in prompts]).tokens for s in suffix}
    null = prior.text_encoder.encode([""] * B).tokens
    az, el = cameras.azimuth, cameras.elevation
    pos, neg1, neg2 = [], [], []
    for i in range(B):
        side, front, back, over = (emb[s][i] for s in suffix)
        if el[i] > 60:
            pos.append(over), neg1.append(null[i]), neg2.append(null[i])
        elif abs(az[i]) < 90:
            r = 1 - abs(az[i]) / 90
            pos.append(r * front + (1 - r) * side), neg1.append(front), neg2.append(side)
        else:
            r = 2 - abs(az[i]) / 90
            pos.append(r * side + (1 - r) * back), neg1.append(side), neg2.append(front)

    def unet(x, steps, tokens):
        with torch.no_grad():
            return prior.unet(x, steps, encoder_hidden_states=torch.stack(tokens) if isinstance(tokens, list) else tokens).sample

    eps_c, eps_u, eps_n1, eps_n2 = unet(x_t, t, pos), unet(x_t, t, null), unet(x_t, t, neg1), unet(x_t, t, neg2)
    w_neg = reference_perp_neg_weights(el, az)
    e_pos = eps_c - eps_u

    def perp(v, y):
        v2, y2 = v.flatten(1), y.flatten(1)
        return v - ((v2 * y2).sum(1) / (y2 * y2).sum(1)).view(-1, 1, 1, 1) * y

    eps_cfg = eps_u + g * (e_pos + w_neg[:, 0].view(-1, 1, 1, 1) * perp(eps_n1 - eps_u, e_pos)
                           + w_neg[:, 1].view(-1, 1, 1, 1) * perp(eps_n2 - eps_u, e_pos))
    w = 1 - a
    if method == "sds":
        expected = w * (eps_cfg - noise)
    else:
        u = torch.rand(B, generator=replay)
        bound = torch.minimum(torch.floor(eta * (t - t_range[0]).double()).long(), t_range[1] - t)  # Alg. 1 with t + dt <= T_max
        t_shift = t + torch.floor(u.double() * (bound + 1)).long()  # uniform on {0, ..., bound}
        a2 = abar[t_shift].view(-1, 1, 1, 1)
        x_shift = a2.sqrt() * latents.detach() + (1 - a2).sqrt() * noise
        expected = w * (eps_cfg - unet(x_shift, t_shift, pos))
    torch.testing.assert_close(out.grad, expected, atol=2e-4, rtol=2e-4)
    assert not torch.allclose(w_neg, torch.zeros_like(w_neg))
