"""The Stable Diffusion prior on a tiny random SD folder written by diffusers' save_pretrained and
loaded through the same from_pretrained path as real checkpoints."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from amortized3d.distillation.score_distillation import score_distillation
from amortized3d.priors.pretrained import PretrainedLoadError
from amortized3d.interfaces import Conditioning
from amortized3d.priors.branches import COND, UNCOND
from amortized3d.priors.diffusers_prior import DiffusionPrior, DiffusionPriorConfig
from amortized3d.priors.tiny import TEXT_DIM
from amortized3d.rendering.cameras import orbit_cameras
from tests.fixtures import REPO, SD_TINY, scaled_linear_alphas_cumprod


@pytest.fixture(scope="module")
def prior(tiny_sd) -> DiffusionPrior:
    return DiffusionPrior(DiffusionPriorConfig(model=str(tiny_sd), resolution=16))


def test_loads_frozen_with_the_checkpoint_schedule(prior):
    torch.testing.assert_close(prior.alphas_cumprod, scaled_linear_alphas_cumprod(), atol=1e-6, rtol=0)
    assert prior.text_encoder.dim == TEXT_DIM and len(prior.text_encoder.tokenizer) == 49408
    assert prior.latent_scale == pytest.approx(0.18215) and prior.vae_factor == 2
    for module in (prior.unet, prior.vae, prior.text_encoder.model):
        assert not any(p.requires_grad for p in module.parameters())
    assert prior.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_encode_is_the_vae_posterior_sample_with_gradient(prior):
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    latents = prior.encode(images, torch.Generator().manual_seed(3))
    assert latents.shape == (2, 4, 8, 8)
    upsampled = F.interpolate(images.detach(), size=(16, 16), mode="bilinear", align_corners=False)
    posterior = prior.vae.encode(2 * upsampled - 1).latent_dist
    expected = (posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))) * 0.18215
    torch.testing.assert_close(latents.detach(), expected, atol=1e-5, rtol=1e-4)
    latents.square().sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    decoded = prior.decode(latents.detach())
    assert decoded.shape == (2, 3, 16, 16) and decoded.min() >= 0 and decoded.max() <= 1


def test_tokenizer_has_clips_ids_and_keeps_the_end_token(prior):
    text = prior.text_encoder
    # Ids as open_clip's own tokenizer gives them (open_clip.get_tokenizer("ViT-B-32")); 49406/49407 = begin/end.
    expected = {
        "a red cube": [49406, 320, 736, 11353, 49407],
        "a frog wearing a sweater": [49406, 320, 11438, 3309, 320, 11455, 49407],
        "A DSLR photo of a squirrel, 4k.": [49406, 320, 33740, 1125, 539, 320, 14004, 267, 275, 330, 269, 49407],
    }
    ids = text.token_ids(list(expected))
    for row, ref in zip(ids, expected.values()):
        assert row[: len(ref)].tolist() == ref and (row[len(ref) :] == 0).all()  # SD 2.x pads with "!" = 0
    prompts = list(expected)[1:]
    long_prompt = " ".join(["frog"] * 100)
    with pytest.warns(UserWarning, match="truncated"):
        long_ids = text.token_ids([long_prompt])
    assert long_ids.shape == (1, 77) and long_ids[0, 0] == 49406 and long_ids[0, -1] == 49407
    with pytest.warns(UserWarning, match="truncated"):
        emb = text.encode(prompts + [long_prompt])
        all_ids = text.token_ids(prompts + [long_prompt])
    assert emb.tokens.shape == (3, 77, TEXT_DIM) and emb.pooled.shape == (3, TEXT_DIM)
    # The pooled vector is the final hidden state at the (first) end token.
    for i, row in enumerate(all_ids):
        eos = int((row == 49407).nonzero()[0])
        torch.testing.assert_close(emb.pooled[i], emb.tokens[i, eos])
        assert emb.mask[i].sum() == eos + 1


def test_prediction_is_one_batched_unet_call_with_the_right_conditions(prior):
    calls = []
    handle = prior.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        gen = torch.Generator().manual_seed(0)
        noisy = torch.randn(4, 4, 8, 8, generator=gen)
        t = torch.tensor([10, 500, 10, 900])
        prompts = ["a frog", "a dog", "a frog", "a dog"]
        uncond = torch.tensor([False, False, True, True])
        eps = prior.predict_noise(noisy, t, Conditioning(prompts, orbit_cameras(4, 15.0, 1.5, 70.0)), uncond)
        assert len(calls) == 1
        for i in range(4):
            words = "" if uncond[i] else prompts[i]
            tokens = prior.text_encoder.encode([words]).tokens
            with torch.no_grad():
                single = prior.unet(noisy[i : i + 1], t[i : i + 1], encoder_hidden_states=tokens).sample
            torch.testing.assert_close(eps[i : i + 1], single, atol=1e-5, rtol=1e-4)
    finally:
        handle.remove()


def test_v_prediction_output_becomes_the_true_noise(prior, monkeypatch):
    """If the UNet returned the exact v = sqrt(abar) eps - sqrt(1 - abar) x0, the prior must return eps."""
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([5, 400, 990])
    abar = scaled_linear_alphas_cumprod()[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0

    class Out:
        sample = v

    monkeypatch.setattr(prior, "prediction_type", "v_prediction")
    monkeypatch.setattr(prior, "unet", lambda *args, **kwargs: Out())
    eps = prior.predict_noise(x_t, t, Conditioning(["a frog"] * 3, orbit_cameras(3, 15.0, 1.5, 70.0)), torch.zeros(3, dtype=torch.bool))
    torch.testing.assert_close(eps, noise, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["sds", "csd", "asd"])
def test_distillation_gradient_equals_its_formula_for_the_tiny_unet(prior, method):
    B, guidance, t_range, eta = 2, 7.5, (100, 900), 0.1
    latents = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(5), requires_grad=True)
    prompts = ["a frog", "a castle"]
    gen = torch.Generator().manual_seed(11)
    replay = torch.Generator().set_state(gen.get_state())
    calls = []
    handle = prior.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        out = score_distillation(prior, latents, Conditioning(prompts, orbit_cameras(B, 15.0, 1.5, 70.0)),
                                 method=method, guidance_scale=guidance, t_range=t_range, eta=eta, generator=gen)
    finally:
        handle.remove()
    assert len(calls) == 1  # every branch in one UNet call

    # Independent replay of Table 1: t ~ U{t_min..t_max}, eps ~ N(0, I), ASD shift uniform on {0..min(floor(eta (t - t_min)), t_max - t)}.
    t = torch.randint(t_range[0], t_range[1] + 1, (B,), generator=replay)
    noise = torch.randn(latents.shape, generator=replay)
    abar = scaled_linear_alphas_cumprod()
    assert torch.equal(out.timesteps, t)

    def eps(x, steps, words):
        a = abar[steps].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x.detach() + (1 - a).sqrt() * noise
        with torch.no_grad():
            return prior.unet(noisy, steps, encoder_hidden_states=prior.text_encoder.encode(words).tokens).sample

    eps_cond, eps_uncond = eps(latents, t, prompts), eps(latents, t, ["", ""])
    eps_cfg = eps_uncond + guidance * (eps_cond - eps_uncond)
    w = (1 - abar[t]).view(-1, 1, 1, 1)
    if method == "sds":
        expected = w * (eps_cfg - noise)
    elif method == "csd":
        expected = w * (eps_cfg - eps_uncond)
    else:
        u = torch.rand(B, generator=replay)
        bound = torch.minimum(torch.floor(eta * (t - t_range[0]).double()).long(), t_range[1] - t)  # Alg. 1 with t + dt <= T_max
        t_shift = t + torch.floor(u.double() * (bound + 1)).long()  # uniform on {0, ..., bound}
        assert torch.equal(out.shifted_timesteps, t_shift)
        expected = w * (eps_cfg - eps(latents, t_shift, prompts))
    torch.testing.assert_close(out.grad, expected, atol=1e-4, rtol=1e-4)
    out.loss.sum().backward()
    torch.testing.assert_close(latents.grad, out.grad, atol=1e-5, rtol=1e-5)


def test_broken_tokenizer_is_refused(tiny_sd, tmp_path):
    import shutil

    from transformers import CLIPTokenizer

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken)
    shutil.rmtree(broken / "tokenizer")
    (tmp_path / "v.json").write_text('{"<|startoftext|>": 0, "<|endoftext|>": 1}')
    (tmp_path / "m.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(tmp_path / "v.json"), str(tmp_path / "m.txt")).save_pretrained(str(broken / "tokenizer"))
    with pytest.raises(PretrainedLoadError, match="vocabulary of 2 tokens"):
        DiffusionPrior(DiffusionPriorConfig(model=str(broken), resolution=16))


def test_missing_weights_fail_fast_with_instructions(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    corpus = tmp_path / "prompts.json"
    corpus.write_text('{"train": ["a frog"]}')
    for prior_args, expected in [([], "stabilityai/stable-diffusion-2-1-base"), (["--prior", str(tmp_path / "nowhere")], "does not exist")]:
        start = time.perf_counter()
        run = subprocess.run(
            [sys.executable, str(REPO / "train.py"), "--corpus", str(corpus), "--config", str(REPO / "configs" / "mg15.yaml"),
             "--output", str(tmp_path / "run"), *prior_args],
            env=env, capture_output=True, text=True, timeout=120,
        )
        elapsed = time.perf_counter() - start
        assert run.returncode == 2, run.stderr[-2000:]
        assert expected in run.stderr and "--prior PATH" in run.stderr and "Traceback" not in run.stderr
        assert elapsed < 15, f"took {elapsed:.1f} s"  # no network retries (those take 20 s and more)


def reference_corpus_args(tmp_path: Path) -> list[str]:
    """--corpus mg15 when the reference corpora are available, else a JSON corpus with the MG15 recipe."""
    folder = os.environ.get("AMORTIZED3D_CORPORA")
    if folder and (Path(folder) / "magic3d_15_prompt_library.json").is_file():
        return ["--corpus", "mg15", "--corpus-dir", folder]
    corpus = tmp_path / "prompts.json"
    corpus.write_text('{"train": ["a frog wearing a sweater", "a wooden chair"], "test": ["a red apple"]}')
    return ["--corpus", str(corpus), "--config", str(REPO / "configs" / "mg15.yaml")]


def test_train_script_and_generate_with_the_sd_prior(tiny_sd, tmp_path):
    import json

    import trimesh

    from amortized3d.cli import main

    run = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *reference_corpus_args(tmp_path), "--prior", str(tiny_sd), "--output", str(run), *SD_TINY],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    config = (run / "config.yaml").read_text()
    assert "stable_diffusion" in config and f"dim: {TEXT_DIM}" in config
    out = tmp_path / "out"
    assert main(["generate", "a frog", "--checkpoint", str(run), "--out", str(out), "--mesh-resolution", "24",
                 "--frames", "2", "--image-size", "16"]) == 0
    mesh = trimesh.load(out / "a_frog.glb", force="mesh")  # the sphere initialization still has its surface
    assert len(mesh.faces) > 0 and mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
    assert (out / "a_frog.mp4").is_file() and (out / "a_frog.png").is_file()


@pytest.mark.parametrize("method", ["sds", "csd", "vsd", "lods-embedding", "lods-lora"])
def test_trainer_takes_the_sd_prior_for_every_method(tiny_sd, tmp_path, method):
    from amortized3d.config import load_config
    from amortized3d.training.train import train

    corpus = tmp_path / "prompts.json"
    corpus.write_text('{"train": ["a frog", "a chair"]}')
    cfg = load_config(str(corpus), str(REPO / "configs" / "mg15.yaml"),
                      [*SD_TINY, f"prior.model={tiny_sd}", f"distill.method={method}", "distill.guidance_scale=null"])
    run = train(cfg, tmp_path / "run")
    rows = [line for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and '"skipped_steps": 0' in rows[-1]
    learned = method in ("vsd", "lods-embedding", "lods-lora")
    assert ('"adapter_loss"' in rows[-1]) == learned
    assert (run / "checkpoints" / "step_00000002" / "adapter.safetensors").is_file() == learned


def test_half_precision_weights_predict_close_to_fp32_and_train_fp32_adapters(tiny_sd, prior):
    from amortized3d.distillation.adapters import VSDLoRA

    half = DiffusionPrior(DiffusionPriorConfig(model=str(tiny_sd), resolution=16, dtype="bf16"))
    assert half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    cameras, branch = orbit_cameras(2, 15.0, 1.5, 70.0), torch.tensor([0, 1])
    full = prior.predict_noise(x, t, Conditioning(["a frog", "a dog"], cameras), branch)
    low = half.predict_noise(x, t, Conditioning(["a frog", "a dog"], cameras), branch)
    assert low.dtype == torch.float32 and (low - full).abs().max() < 0.1 * full.abs().mean()
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    latents = half.encode(images, torch.Generator().manual_seed(0))
    latents.sum().backward()
    assert latents.dtype == torch.float32 and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    adapter = VSDLoRA(half)
    adapter.alignment_loss(latents.detach(), Conditioning(["a frog", "a dog"], cameras), torch.Generator().manual_seed(1)).backward()
    assert all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all() for p in adapter.parameters())


def test_training_reads_the_view_prompts_from_the_store(tiny_sd, tmp_path, monkeypatch):
    # The store is built once (here by `prepare_store` with its own encoder); the trainer's CLIP then encodes
    # no view prompt again: the embeddings of "a frog, front view" etc. come from the shards.
    from amortized3d.builders import build_text_encoder, prepare_store
    from amortized3d.config import load_config
    from amortized3d.data.embedding_store import load_manifest
    from amortized3d.text.pretrained_encoder import PretrainedTextEncoder
    from amortized3d.training.train import train

    corpus = tmp_path / "prompts.json"
    corpus.write_text('{"train": ["a frog", "a chair"]}')
    cfg = load_config(str(corpus), str(REPO / "configs" / "mg15.yaml"), [*SD_TINY, f"prior.model={tiny_sd}", "text.encoder=prior"])
    store = prepare_store(cfg, ["a frog", "a chair"], build_text_encoder(cfg), build_text_encoder(cfg), progress=False)
    assert load_manifest(store)["prior_suffixes"] == [", side view", ", front view", ", back view", ", overhead view"]
    encoded, everywhere, in_step = [], [], []
    original = PretrainedTextEncoder._encode_uncached
    monkeypatch.setattr(PretrainedTextEncoder, "_encode_uncached",
                        lambda self, texts: everywhere.extend(texts) or (encoded.extend(texts) if in_step else None) or original(self, texts))
    from amortized3d.training import train as train_module

    step = train_module.distillation_step

    def training_step(*args, **kwargs):  # encodings inside the training steps (validation's denoised views encode their own)
        in_step.append(True)
        try:
            return step(*args, **kwargs)
        finally:
            in_step.pop()

    monkeypatch.setattr(train_module, "distillation_step", training_step)
    train(cfg, tmp_path / "run")
    assert not [t for t in encoded if t.endswith(" view")], encoded  # at most "" (the unconditional branch)
    assert [t for t in everywhere if t.endswith(" view")]  # the spy sees view prompts: validation's denoised views encode them


def test_text_cache_stays_correct_when_full(prior, monkeypatch):
    # A cache overflow in the middle of an encode() keeps every row it needs.
    from amortized3d.text import pretrained_encoder

    encoder = prior.text_encoder
    monkeypatch.setattr(pretrained_encoder, "CACHE_SIZE", 3)
    reference = encoder._encode_uncached(["a frog", "a chair", "", "a cat", "a dog"])
    encoder._cache.clear()
    encoder.encode(["a frog", "a chair"])  # cached
    out = encoder.encode(["a frog", "a cat", "a dog", "a chair", ""])  # two cached, three new: the cache overflows
    for row, i in zip(range(5), (0, 3, 4, 1, 2)):
        torch.testing.assert_close(out.tokens[row], reference[0][i])


def test_stored_embeddings_reach_the_prior_as_data(prior):
    """A condition that carries the prior's token embeddings (as read from the embedding store) is what the prior
    conditions on, row by row; without them the prior encodes the prompts itself. Reference: the encoder's own
    output, and a recognizably different "stored" embedding (+1)."""
    cameras = orbit_cameras(3, 15.0, 1.5, 70.0)
    own = prior.text_encoder.encode(["a frog", "a chair", ""]).tokens
    stored = own[:2] + 1.0
    branch = torch.tensor([COND, UNCOND, COND])
    with_tokens = prior.text_condition(Conditioning(["a frog", "a chair", "a chair"], cameras, tokens=stored[[0, 1, 1]]), branch)
    torch.testing.assert_close(with_tokens, torch.stack([stored[0], own[2], stored[1]]))
    without = prior.text_condition(Conditioning(["a frog", "a chair", "a chair"], cameras), branch)
    torch.testing.assert_close(without, torch.stack([own[0], own[2], own[1]]))


def test_sds_plus_image_term_and_the_latent_residual_identity(prior):
    """HiFA SDS+ (Eq. 2-4) on the tiny SD: (a) Eq. 2's identity, w(t) (eps_cfg - eps) = beta(t) (z - z_hat) with
    beta = w sqrt(abar) / sqrt(1 - abar) and z_hat = (z_t - sqrt(1 - abar) eps_cfg) / sqrt(abar); (b) the image term's
    gradient lambda beta (x - D(z_hat)), with eps_cfg and D computed directly from the UNet and the VAE decoder."""
    from amortized3d.distillation.score_distillation import image_residual_loss

    B, guidance, t_range, lam = 2, 100.0, (50, 950), 0.1
    images = torch.rand(B, 3, 16, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    latents = prior.encode(images, generator=torch.Generator().manual_seed(4)).detach()
    prompts = ["a frog", "a castle"]
    gen = torch.Generator().manual_seed(12)
    replay = torch.Generator().set_state(gen.get_state())
    out = score_distillation(prior, latents, Conditioning(prompts, orbit_cameras(B, 15.0, 1.5, 70.0)), method="sds",
                             guidance_scale=guidance, t_range=t_range, eta=0.0, generator=gen)
    t = torch.randint(t_range[0], t_range[1] + 1, (B,), generator=replay)
    noise = torch.randn(latents.shape, generator=replay)
    a = scaled_linear_alphas_cumprod()[t].view(-1, 1, 1, 1)
    z_t = a.sqrt() * latents + (1 - a).sqrt() * noise
    with torch.no_grad():
        unet = lambda words: prior.unet(z_t, t, encoder_hidden_states=prior.text_encoder.encode(words).tokens).sample  # noqa: E731
        eps_u, eps_c = unet(["", ""]), unet(prompts)
    eps_cfg = eps_u + guidance * (eps_c - eps_u)
    z_hat = (z_t - (1 - a).sqrt() * eps_cfg) / a.sqrt()
    beta = (1 - a) * a.sqrt() / (1 - a).sqrt()
    torch.testing.assert_close(out.denoised, z_hat, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out.grad, beta * (latents - z_hat), atol=1e-3, rtol=1e-3)  # (a)
    with torch.no_grad():
        x_hat = ((prior.vae.decode(z_hat / 0.18215).sample + 1) / 2).clamp(0, 1)
    image_residual_loss(prior, images, out.denoised, out.timesteps, lam).sum().backward()
    torch.testing.assert_close(images.grad, lam * beta * (images.detach() - x_hat), atol=1e-4, rtol=1e-3)  # (b)
