"""The learned branches of VSD and LODS on every kind of diffusers prior: tiny Stable Diffusion (epsilon and
v-prediction) and tiny DeepFloyd IF (6 output channels: noise and variance).

Expectations, independent of the code under test:
- the pretrained noise prediction is written out here from the diffusers UNet's raw output: the first C
  channels (IF's UNet predicts noise then variance), and for v-prediction eps = sqrt(abar) v + sqrt(1 - abar) x_t
  (Salimans & Ho 2022: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, v = sqrt(abar) eps - sqrt(1 - abar) x0), with
  abar from the schedule's formula;
- at initialization each learned branch is the pretrained model (peft starts LoRA at B = 0, LODS's embedding
  starts as the empty prompt's, VSD's camera term starts at zero), so it must equal the pretrained branch it
  replaces: LODS the unconditional one (empty prompt), VSD the conditional one (guidance 1, plain prompt).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from amortized3d.distillation.adapters import LODSEmbedding, LODSLoRA, VSDLoRA
from amortized3d.priors.diffusers_prior import DiffusionPrior, DiffusionPriorConfig
from amortized3d.priors.tiny import make_tiny_deepfloyd_if, make_tiny_stable_diffusion
from amortized3d.rendering.cameras import orbit_cameras
from amortized3d.interfaces import Conditioning
from tests.fixtures import REPO, SD_TINY, cosine_alphas_cumprod, scaled_linear_alphas_cumprod

PROMPTS = ["a frog", "a castle"]
ADAPTERS = {"vsd": VSDLoRA, "lods-embedding": LODSEmbedding, "lods-lora": LODSLoRA}
PRIORS = ("sd-epsilon", "sd-v", "if")


@pytest.fixture(scope="module")
def prior_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("learned_branches")
    sd = make_tiny_stable_diffusion(root / "sd")
    v = root / "sd_v"
    shutil.copytree(sd, v)
    config_path = v / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "v_prediction"
    config_path.write_text(json.dumps(config))
    return {"sd-epsilon": sd, "sd-v": v, "if": make_tiny_deepfloyd_if(root / "if")}


def load_prior(folders, name) -> DiffusionPrior:
    if name == "if":
        return DiffusionPrior(DiffusionPriorConfig(model=str(folders[name])), kind="deepfloyd_if")
    return DiffusionPrior(DiffusionPriorConfig(model=str(folders[name]), resolution=16))


def pretrained_eps_by_hand(prior: DiffusionPrior, name: str, x_t, t, words) -> torch.Tensor:
    """The pretrained UNet's noise prediction, written out from its raw output (module docstring)."""
    abar = cosine_alphas_cumprod() if name == "if" else scaled_linear_alphas_cumprod()
    with torch.no_grad():
        raw = prior.unet(x_t, t, encoder_hidden_states=prior.text_encoder.encode(words).tokens).sample
    channels = x_t.shape[1]
    assert raw.shape[1] == (2 * channels if name == "if" else channels)
    raw = raw[:, :channels]
    if name == "sd-v":
        a = abar[t].view(-1, 1, 1, 1)
        return a.sqrt() * raw + (1 - a).sqrt() * x_t
    return raw


@pytest.mark.parametrize("method", list(ADAPTERS))
@pytest.mark.parametrize("name", PRIORS)
def test_learned_branch_starts_as_the_pretrained_branch(prior_folders, name, method):
    prior = load_prior(prior_folders, name)
    adapter = ADAPTERS[method](prior)
    channels, size = (3, 16) if name == "if" else (4, 8)
    x_t = torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([150, 820])
    cameras = orbit_cameras(2, 15.0, 1.5, 70.0)
    with torch.no_grad():
        learned = adapter.predict_noise(x_t, t, Conditioning(PROMPTS, cameras))
    words = PROMPTS if method == "vsd" else ["", ""]
    expected = pretrained_eps_by_hand(prior, name, x_t, t, words)
    assert learned.shape == expected.shape == (2, channels, size, size)
    torch.testing.assert_close(learned, expected, atol=1e-5, rtol=1e-5)
    if name == "sd-v":  # the conversion matters: the raw v output is far from eps
        with torch.no_grad():
            raw = prior.unet(x_t, t, encoder_hidden_states=prior.text_encoder.encode(words).tokens).sample
        assert (raw - expected).abs().max() > 0.1


@pytest.mark.parametrize("method", list(ADAPTERS))
@pytest.mark.parametrize("name", PRIORS)
def test_methods_with_a_learned_branch_train_on_every_prior(prior_folders, name, method, tmp_path):
    from safetensors.torch import load_file

    from amortized3d.config import load_config
    from amortized3d.training.train import train

    corpus = tmp_path / "prompts.json"
    corpus.write_text('{"train": ["a frog", "a chair"]}')
    overrides = [*SD_TINY, f"prior.model={prior_folders[name]}", f"distill.method={method}", "distill.guidance_scale=null",
                 "train.steps=3", "distill.adapter_lr=0.01", "train.ckpt_every=1", "train.keep_checkpoints=3"]
    if name == "if":
        overrides.append("prior.kind=deepfloyd_if")
    run = train(load_config(str(corpus), str(REPO / "configs" / "mg15.yaml"), overrides), tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["skipped_steps"] == 0 and math.isfinite(r["loss"]) and math.isfinite(r["adapter_loss"]) for r in rows)
    first, last = (load_file(str(run / "checkpoints" / f"step_0000000{s}" / "adapter.safetensors")) for s in (1, 3))
    assert first.keys() == last.keys() and any(not torch.equal(first[k], last[k]) for k in first)  # the learned branch moved
