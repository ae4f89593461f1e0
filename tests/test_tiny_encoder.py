"""prior.tiny_encoder: a tiny autoencoder (diffusers AutoencoderTiny, TAESD) encodes renders on the gradient path
instead of the VAE's encoder."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from amortized3d._compat import import_torchvision_safely
from amortized3d.priors.diffusers_prior import DiffusionPrior, DiffusionPriorConfig
from amortized3d.priors.pretrained import RandomWeightsWarning, load_component, random_model_dir
from tests.fixtures import load_benchmark

import_torchvision_safely()
from diffusers import AutoencoderTiny  # noqa: E402


def test_random_taesd_is_the_taesd_encoder():
    """The shipped config builds TAESD's encoder. Expected by hand from its layer list (madebyollin/taesd, taesd.py:
    conv(3, 64), Block, then three times [stride-2 conv(64, 64) without bias, 3 Blocks], conv(64, 4); a Block is three
    3x3 convs 64 -> 64 with bias and an identity skip)."""
    conv = lambda c_in, c_out, bias=True: c_in * c_out * 9 + (c_out if bias else 0)  # noqa: E731
    block = 3 * conv(64, 64)
    expected = conv(3, 64) + block + 3 * (conv(64, 64, bias=False) + 3 * block) + conv(64, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        tiny = load_component(AutoencoderTiny, random_model_dir("random:taesd"), None, "random:taesd")
    assert sum(p.numel() for p in tiny.encoder.parameters()) == expected == 1_222_532
    assert 2 ** (len(tiny.config.encoder_block_out_channels) - 1) == 8 and tiny.config.latent_channels == 4  # SD's latent shape
    assert tiny.config.scaling_factor == 1.0  # TAESD outputs SD's latents already scaled


def save_tiny_autoencoder(folder, stages: int):
    """A random AutoencoderTiny downsampling by 2 ** (stages - 1), written with save_pretrained."""
    torch.manual_seed(0)
    model = AutoencoderTiny(encoder_block_out_channels=(8,) * stages, decoder_block_out_channels=(8,) * stages,
                            num_encoder_blocks=(1,) * stages, num_decoder_blocks=(1,) * stages, latent_channels=4)
    model.save_pretrained(str(folder))
    return folder


def test_tiny_encoder_replaces_the_vae_on_the_gradient_path(tiny_sd, tmp_path):
    folder = save_tiny_autoencoder(tmp_path / "tae", stages=2)  # the tiny SD's VAE downsamples by 2
    prior = DiffusionPrior(DiffusionPriorConfig(model=str(tiny_sd), resolution=16, tiny_encoder=str(folder)))
    images = torch.rand(3, 3, 8, 8, requires_grad=True)
    latents = prior.encode(images)
    # The reference: diffusers' own model from the same folder, on the renders resized as the prior documents
    # (bilinear to prior.resolution, mapped to [-1, 1]); no scaling factor (TAESD's latents are already scaled).
    reference = AutoencoderTiny.from_pretrained(str(folder)).encode(
        2 * F.interpolate(images.detach(), size=(16, 16), mode="bilinear", align_corners=False) - 1).latents
    assert latents.shape == (3, 4, 8, 8)
    torch.testing.assert_close(latents, reference)
    latents.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert torch.equal(prior.encode(images), prior.encode(images))  # deterministic: no posterior sample


def test_tiny_encoder_must_fit_the_vae_and_the_prior(tiny_sd, tiny_if, tmp_path):
    folder = save_tiny_autoencoder(tmp_path / "tae4", stages=3)  # downsamples by 4; the tiny SD's VAE by 2
    with pytest.raises(ValueError, match=r"4 channels at 1/4 of the image size, but .* 4 channels at 1/2"):
        DiffusionPrior(DiffusionPriorConfig(model=str(tiny_sd), resolution=16, tiny_encoder=str(folder)))
    with pytest.raises(ValueError, match="pixel space"):
        DiffusionPrior(DiffusionPriorConfig(model=str(tiny_if), tiny_encoder=str(folder)), kind="deepfloyd_if")


def test_agreement_measures_by_its_definitions():
    """Properties of the measures: an encoder against itself agrees exactly (error 0, cosine 1, ratio 1); against
    twice itself, the latents are off by 100 %, the gradients point the same way with twice the norm (J^T g doubles);
    against its negative, cosine -1."""
    agreement = load_benchmark("tiny_encoder_agreement").agreement
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    images, directions = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 4, 4, 4)
    same = agreement(conv, conv, images, directions)
    assert same["mean_latent_relative_error"] == 0.0
    assert same["mean_gradient_cosine"] == pytest.approx(1.0) and same["mean_gradient_norm_ratio"] == pytest.approx(1.0)
    double = agreement(conv, lambda x: 2 * conv(x), images, directions)
    assert double["mean_latent_relative_error"] == pytest.approx(1.0)
    assert double["mean_gradient_cosine"] == pytest.approx(1.0) and double["mean_gradient_norm_ratio"] == pytest.approx(2.0)
    assert agreement(conv, lambda x: -conv(x), images, directions)["mean_gradient_cosine"] == pytest.approx(-1.0)


def test_agreement_script_runs_on_the_tiny_models(tiny_sd, tmp_path):
    folder = save_tiny_autoencoder(tmp_path / "tae", stages=2)
    out = tmp_path / "agreement.json"
    result = load_benchmark("tiny_encoder_agreement").main(["--model", str(tiny_sd), "--tiny-encoder", str(folder), "--images", "3", "--resolution", "16",
                                    "--render-size", "8", "--out", str(out)])
    assert len(result["gradient_cosine"]) == 3 and all(-1.0 <= c <= 1.0 for c in result["gradient_cosine"])
    assert result["mean_latent_relative_error"] > 0  # two different random encoders
    assert json.loads(out.read_text())["images"] == 3
