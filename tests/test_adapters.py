"""VSD and LODS on the tiny Stable Diffusion folder: gradients against their formulas, UNet-call
counts, the learned branches against LoRA weights folded in by hand, alignment training, and resume."""

from __future__ import annotations

import pytest
import torch

from amortized3d.distillation.adapters import LODS_LORA_SCALE, LODSEmbedding, LODSLoRA, VSDLoRA
from amortized3d.distillation.score_distillation import score_distillation
from amortized3d.priors.diffusers_prior import DiffusionPrior, DiffusionPriorConfig
from amortized3d.rendering.cameras import orbit_cameras
from amortized3d.interfaces import Conditioning
from tests.fixtures import REPO, SD_TINY, scaled_linear_alphas_cumprod

B = 2
PROMPTS = ["a frog", "a castle"]


def fresh_prior(folder) -> DiffusionPrior:
    return DiffusionPrior(DiffusionPriorConfig(model=str(folder), resolution=16))


def perturb_lora(adapter, seed=0):
    """peft starts LoRA at B = 0 (the pretrained model); give it weights so its branch differs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))


def count_unet_calls(prior):
    calls = []
    handle = prior.unet.register_forward_hook(lambda *args: calls.append(1))
    return calls, handle


def replay(gen, t_range):
    """Table 1's draws, in score_distillation's order: t ~ U{t_min..t_max}, then eps ~ N(0, I)."""
    r = torch.Generator().set_state(gen.get_state())
    t = torch.randint(t_range[0], t_range[1] + 1, (B,), generator=r)
    return t, torch.randn(B, 4, 8, 8, generator=r)


@pytest.mark.parametrize("method", ["vsd", "lods-embedding", "lods-lora"])
def test_gradient_equals_formula_and_two_unet_calls(tiny_sd, method):
    prior = fresh_prior(tiny_sd)
    adapter = {"vsd": VSDLoRA, "lods-embedding": LODSEmbedding, "lods-lora": LODSLoRA}[method](prior)
    if method == "lods-embedding":
        with torch.no_grad():
            adapter.embedding.add_(0.5 * torch.randn(adapter.embedding.shape, generator=torch.Generator().manual_seed(1)))
    else:
        perturb_lora(adapter)
    latents = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    cameras = orbit_cameras(B, 15.0, 1.5, 70.0)
    guidance, t_range = (7.5 if method == "vsd" else 1000.0), (100, 900)
    gen = torch.Generator().manual_seed(3)
    t, noise = replay(gen, t_range)
    calls, handle = count_unet_calls(prior)
    try:
        out = score_distillation(prior, latents, Conditioning(PROMPTS, cameras), method=method, guidance_scale=guidance,
                                 t_range=t_range, eta=0.1, generator=gen, adapter=adapter)
    finally:
        handle.remove()
    assert len(calls) == 2
    abar = scaled_linear_alphas_cumprod()
    a = abar[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * latents.detach() + (1 - a).sqrt() * noise
    with torch.no_grad():
        def base(words):
            return prior.unet(x_t, t, encoder_hidden_states=prior.text_encoder.encode(words).tokens).sample

        eps_c, eps_u = base(PROMPTS), base(["", ""])
        learned = adapter.predict_noise(x_t, t, Conditioning(PROMPTS, cameras))
    w = 1 - a
    if method == "vsd":
        expected = w * (eps_u + guidance * (eps_c - eps_u) - learned)
    else:  # LODS Eq. 7 / 9
        expected = w * (eps_c + (1 - guidance) / guidance * learned - noise / guidance)
    torch.testing.assert_close(out.grad, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(learned, eps_u if method != "vsd" else eps_c, atol=1e-3)  # the learned branch matters
    out.loss.sum().backward()
    torch.testing.assert_close(latents.grad, out.grad)
    assert all(p.grad is None for p in adapter.parameters())  # the generator update does not train the adapter


def merged_unet(folder, prior, name, scale=1.0):
    """A fresh plain UNet with each LoRA folded in by hand: W' = W + scale (alpha / r) B A, alpha = r."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    plain = dict(unet.named_modules())
    merged = 0
    with torch.no_grad():
        for path, module in prior.unet.named_modules():
            if hasattr(module, "lora_A") and name in module.lora_A:
                delta = module.lora_B[name].weight @ module.lora_A[name].weight
                plain[path].weight.add_(scale * delta)
                merged += 1
    assert merged > 0
    return unet


def test_lora_branches_match_peft_merged_weights(tiny_sd):
    x = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([50, 700])
    cameras = orbit_cameras(B, 20.0, 1.5, 70.0)
    # VSD: LoRA at scale 1 plus the camera MLP on the flattened camera-to-world matrix, prompt tokens.
    prior = fresh_prior(tiny_sd)
    vsd = VSDLoRA(prior)
    perturb_lora(vsd)
    got = vsd.predict_noise(x, t, Conditioning(PROMPTS, cameras))
    unet = merged_unet(tiny_sd, prior, "vsd")
    unet.class_embedding = vsd.camera
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=prior.text_encoder.encode(PROMPTS).tokens,
                    class_labels=cameras.c2w.reshape(B, 16)).sample
    torch.testing.assert_close(got.detach(), want, atol=1e-4, rtol=1e-4)
    # LODS-LoRA: LoRA at scale 0.5, empty prompt.
    prior = fresh_prior(tiny_sd)
    lods = LODSLoRA(prior)
    perturb_lora(lods, seed=1)
    got = lods.predict_noise(x, t, Conditioning(PROMPTS, cameras))
    unet = merged_unet(tiny_sd, prior, "lods", LODS_LORA_SCALE)
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=prior.text_encoder.encode(["", ""]).tokens).sample
    torch.testing.assert_close(got.detach(), want, atol=1e-4, rtol=1e-4)
    # The pretrained branch still sees the plain UNet.
    plain = fresh_prior(tiny_sd)
    uncond = torch.ones(B, dtype=torch.bool)
    torch.testing.assert_close(prior.predict_noise(x, t, Conditioning(PROMPTS, cameras), uncond), plain.predict_noise(x, t, Conditioning(PROMPTS, cameras), uncond))


@pytest.mark.parametrize("kind", [LODSEmbedding, LODSLoRA, VSDLoRA])
def test_alignment_loss_trains_only_the_adapter(tiny_sd, kind):
    prior = fresh_prior(tiny_sd)
    adapter = kind(prior)
    latents = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    cameras = orbit_cameras(B, 15.0, 1.5, 70.0)
    optimizer = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    losses = []
    calls, handle = count_unet_calls(prior)
    adapter.alignment_loss(latents, Conditioning(PROMPTS, cameras), torch.Generator().manual_seed(6))
    handle.remove()
    assert len(calls) == 1  # the adapter update is one UNet call
    for _ in range(15):
        loss = adapter.alignment_loss(latents, Conditioning(PROMPTS, cameras), torch.Generator().manual_seed(6))  # same t and eps each time
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    decreasing = sum(b < a for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0] - 1e-3 and decreasing >= 12, losses
    assert all(p.grad is None for p in prior.unet.parameters() if not p.requires_grad)
    assert not any(p.requires_grad for n, p in prior.unet.named_parameters() if "lora_" not in n)


def test_resume_restores_the_adapter_exactly(tiny_sd, tmp_path):
    from safetensors.torch import load_file

    from amortized3d.config import load_config
    from amortized3d.training.train import train

    corpus = tmp_path / "prompts.json"
    corpus.write_text('{"train": ["a frog", "a chair"]}')

    def config():
        return load_config(str(corpus), str(REPO / "configs" / "mg15.yaml"),
                           [*SD_TINY, f"prior.model={tiny_sd}", "distill.method=lods-embedding", "train.steps=3",
                            "train.ckpt_every=1", "distill.adapter_lr=0.01"])

    straight = train(config(), tmp_path / "straight")
    split = tmp_path / "split"
    train(config(), split, max_steps=2)
    train(config(), split, resume=True)
    for name in ("model.safetensors", "adapter.safetensors"):
        a = load_file(str(straight / "checkpoints" / "step_00000003" / name))
        b = load_file(str(split / "checkpoints" / "step_00000003" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(str(split / "checkpoints" / "step_00000002" / "adapter.safetensors"))["embedding"]
    assert not torch.equal(first, a["embedding"])  # the embedding did move
