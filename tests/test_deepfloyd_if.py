"""DeepFloyd IF stage I as a pixel-space prior, on a tiny random folder written by IFPipeline.save_pretrained."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from amortized3d.distillation.score_distillation import score_distillation
from amortized3d.interfaces import Conditioning
from amortized3d.priors.diffusers_prior import DiffusionPrior, DiffusionPriorConfig
from amortized3d.priors.tiny import IF_TEXT_DIM
from amortized3d.rendering.cameras import orbit_cameras
from tests.fixtures import REPO, SD_TINY, cosine_alphas_cumprod


@pytest.fixture(scope="module")
def prior(tiny_if) -> DiffusionPrior:
    return DiffusionPrior(DiffusionPriorConfig(model=str(tiny_if)), kind="deepfloyd_if")


def test_pixel_space_prior_loads_with_its_schedule(prior):
    assert prior.vae is None and prior.resolution == 16 and prior.channels == 3
    torch.testing.assert_close(prior.alphas_cumprod, cosine_alphas_cumprod(), atol=1e-5, rtol=1e-4)
    assert prior.text_encoder.kind == "t5" and prior.text_encoder.dim == IF_TEXT_DIM
    assert not any(p.requires_grad for p in prior.unet.parameters())


def test_encode_is_the_resized_image_in_minus_one_one_and_decode_inverts_it(prior):
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    x = prior.encode(images)
    expected = 2 * F.interpolate(images.detach(), size=(16, 16), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(x.detach(), expected)
    x.sum().backward()
    assert images.grad.abs().sum() > 0
    small = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(prior.decode(prior.encode(small)), small)


def test_noise_is_the_first_three_of_six_output_channels(prior):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([30, 600])
    eps = prior.predict_noise(x, t, Conditioning(["a frog", "a dog"], orbit_cameras(2, 15.0, 1.5, 70.0)), torch.tensor([0, 1]))
    tokens = prior.text_encoder.encode(["a frog", ""]).tokens
    with torch.no_grad():
        full = prior.unet(x, t, encoder_hidden_states=tokens).sample
    assert full.shape[1] == 6 and eps.shape == (2, 3, 16, 16)
    torch.testing.assert_close(eps, full[:, :3], atol=1e-5, rtol=1e-4)


def test_t5_pooled_is_the_mean_over_the_prompt_tokens(prior):
    emb = prior.text_encoder.encode(["a frog on a log", "a red cube"])
    ids = prior.text_encoder.token_ids(["a frog on a log", "a red cube"])
    for i in range(2):
        n = int((ids[i] == 1).nonzero()[0]) + 1  # words and the end token </s> = 1
        assert emb.mask[i].sum() == n
        torch.testing.assert_close(emb.pooled[i], emb.tokens[i, :n].mean(0))


def test_asd_gradient_with_the_if_prior(prior):
    B, g, t_range, eta = 2, 7.5, (100, 900), 0.1
    x = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    gen = torch.Generator().manual_seed(2)
    replay = torch.Generator().set_state(gen.get_state())
    out = score_distillation(prior, x, Conditioning(["a frog", "a log"], orbit_cameras(B, 15.0, 1.5, 70.0)), method="asd",
                             guidance_scale=g, t_range=t_range, eta=eta, generator=gen)
    t = torch.randint(t_range[0], t_range[1] + 1, (B,), generator=replay)
    noise = torch.randn(x.shape, generator=replay)
    u = torch.rand(B, generator=replay)
    bound = torch.minimum(torch.floor(eta * (t - t_range[0]).double()).long(), t_range[1] - t)  # Alg. 1 with t + dt <= T_max
    t_shift = t + torch.floor(u.double() * (bound + 1)).long()  # uniform on {0, ..., bound}
    abar = cosine_alphas_cumprod()

    def eps(steps, words):
        a = abar[steps].view(-1, 1, 1, 1)
        with torch.no_grad():
            noisy = a.sqrt() * x.detach() + (1 - a).sqrt() * noise
            return prior.unet(noisy, steps, encoder_hidden_states=prior.text_encoder.encode(words).tokens).sample[:, :3]

    eps_c, eps_u = eps(t, ["a frog", "a log"]), eps(t, ["", ""])
    expected = (1 - abar[t]).view(-1, 1, 1, 1) * (eps_u + g * (eps_c - eps_u) - eps(t_shift, ["a frog", "a log"]))
    torch.testing.assert_close(out.grad, expected, atol=1e-4, rtol=1e-4)


def test_train_and_generate_with_the_if_prior(tiny_if, tmp_path):
    from amortized3d.cli import main

    corpus = tmp_path / "prompts.json"
    corpus.write_text('{"train": ["a frog", "a chair"]}')
    run = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--corpus", str(corpus), "--config", str(REPO / "configs" / "mg15.yaml"),
         "--prior", str(tiny_if), "prior.kind=deepfloyd_if", "--output", str(run), *SD_TINY],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert f"dim: {IF_TEXT_DIM}" in (run / "config.yaml").read_text()
    assert main(["generate", "a frog", "--checkpoint", str(run), "--out", str(tmp_path / "out"), "--mesh-resolution", "24",
                 "--frames", "2", "--image-size", "16"]) == 0
    assert (tmp_path / "out" / "a_frog.glb").is_file()
