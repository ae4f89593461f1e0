"""StableDreamer's dual-phase training (phase2): a pixel-space prior, then a latent-space prior from a given step, on the
same representation, with the geometry's learning-rate change; one run folder, resumable across the switch."""

import json

import pytest
import torch
from safetensors.torch import load_file

from amortized3d.config import ConfigError, load_config
from amortized3d.training.checkpoint import latest_checkpoint
from amortized3d.training.train import train
from tests.fixtures import SD_TINY, TINY

PROMPT = "prompt:a large red cube"


def same_weights(a, b) -> bool:
    wa, wb = (load_file(str(latest_checkpoint(run) / "model.safetensors")) for run in (a, b))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_shapeworld_pixel_then_latent_prior_resumes_exactly_across_the_switch(tmp_path, monkeypatch):
    cfg = load_config(PROMPT, overrides=[*TINY, "train.prompts_per_step=1", "train.views_per_prompt=1", "train.steps=5",
                                         "train.ckpt_every=2", "phase2.start=0.5", "phase2.prior={latent: true}",
                                         "phase2.lr_geometry=0.002"])
    from amortized3d.training import step as step_module

    seen = []
    original = step_module.distillation_step
    monkeypatch.setattr("amortized3d.training.train.distillation_step",
                        lambda cfg, generator, prior, *a, **k: seen.append(prior.config.latent) or original(cfg, generator, prior, *a, **k))
    straight = train(cfg, tmp_path / "straight")
    # progress = step / 4: steps 0, 1 below 0.5 use the pixel prior, steps 2, 3, 4 the latent one
    assert seen == [False, False, True, True, True]
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == [1, 1, 2, 2, 2]
    interrupted = tmp_path / "interrupted"
    train(cfg, interrupted, max_steps=2)  # stops at the switch
    train(cfg, interrupted, resume=True)
    assert same_weights(straight, interrupted)


def test_the_geometry_learning_rate_changes_at_the_switch(tmp_path, monkeypatch):
    cfg = load_config(PROMPT, overrides=[*TINY, "train.prompts_per_step=1", "train.views_per_prompt=1", "train.steps=3",
                                         "phase2.start=0.5", "phase2.prior={latent: true}", "phase2.lr_geometry=0.002"])
    rates = []
    from amortized3d.training import guard

    original = guard.guarded_optimizer_step

    def spy(accelerator, generator, optimizer, *args):
        rates.append([group["lr"] for group in optimizer.param_groups])
        return original(accelerator, generator, optimizer, *args)

    monkeypatch.setattr("amortized3d.training.train.guarded_optimizer_step", spy)
    train(cfg, tmp_path / "run")
    # groups: geometry (grid), background, decoders; phase 2 from progress 0.5 = step 1 of 3
    assert rates == [[0.01, 0.003, 0.001], [0.002, 0.003, 0.001], [0.002, 0.003, 0.001]]


def test_deepfloyd_if_then_stable_diffusion_in_one_run(tiny_if, tiny_sd, tmp_path):
    overrides = [*SD_TINY, "train.steps=3", "train.ckpt_every=1", "prior.kind=deepfloyd_if", f"prior.model={tiny_if}",
                 "prior.resolution=16", "phase2.start=0.5", f"phase2.prior={{kind: stable_diffusion, model: {tiny_sd}, resolution: 32}}",
                 "train.prompts_per_step=1", "render.eikonal_points=64"]
    cfg = load_config("prompt:a hamburger", None, overrides)
    straight = train(cfg, tmp_path / "straight")
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == [1, 2, 2]
    assert (straight / "validation" / "step_00000003_denoised.png").is_file()
    interrupted = tmp_path / "interrupted"
    train(cfg, interrupted, max_steps=1)
    train(cfg, interrupted, resume=True)
    assert same_weights(straight, interrupted)


def test_two_phase_config_errors():
    with pytest.raises(ConfigError, match="learned branch"):
        load_config(PROMPT, overrides=["phase2.start=0.5", "phase2.prior={latent: true}", "distill.method=vsd"])
    with pytest.raises(ConfigError, match="text.encoder=hashed"):
        load_config(PROMPT, overrides=["phase2.start=0.5", "phase2.prior={latent: true}", "text.encoder=prior"])
    with pytest.raises(ConfigError, match="std: Input should be greater than 0"):  # the prior section's own ranges
        load_config(PROMPT, overrides=["phase2.start=0.5", "phase2.prior={std: -1}"])
    with pytest.raises(ConfigError, match="names none"):
        load_config(PROMPT, overrides=["phase2.start=0.5"])
