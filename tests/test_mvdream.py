"""The MVDream prior: a tiny checkpoint in the original ldm layout (tests/mvdream_reference.py), converted and loaded
through the path users take (prior.kind=mvdream, prior.model=PATH.pt), against the original network's math written
independently; the camera convention against MVDream's own camera code; distillation gradients from raw UNet outputs."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from amortized3d.interfaces import Conditioning
from amortized3d.priors.branches import COND, UNCOND
from amortized3d.priors.pretrained import PretrainedLoadError
from amortized3d.rendering.cameras import Cameras, look_at_cameras, orbit_cameras
from tests.mvdream_reference import text_reference, write_tiny_mvdream

PROMPTS = ["a red chair", "a blue teapot on a table"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(checkpoint path, reference UNet, VAE, text tower, the loaded prior)."""
    from amortized3d.priors.diffusers_prior import DiffusionPrior, DiffusionPriorConfig

    path, unet, vae, tower = write_tiny_mvdream(tmp_path_factory.mktemp("mvdream") / "tiny-4view.pt")
    prior = DiffusionPrior(DiffusionPriorConfig(model=str(path)), kind="mvdream")
    return path, unet, vae, tower, prior


def open_clip_tokens(prompts):
    from amortized3d._compat import import_torchvision_safely

    import_torchvision_safely()
    import open_clip

    return open_clip.tokenize(prompts)


def reference_context(tower, prompts):
    with torch.no_grad():
        return text_reference(tower, open_clip_tokens(prompts))


def mvdream_get_camera(elevation: float, azimuth: float) -> np.ndarray:
    """MVDream's camera_utils, written out: create_camera_to_world_matrix (OpenGL, y up), convert_opengl_to_blender
    (z up), normalize_camera (translation to unit length), flattened. Angles in degrees -> [16]."""
    e, a = math.radians(elevation), math.radians(azimuth)
    position = np.array([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])
    forward = -position / np.linalg.norm(position)  # looking at the origin
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([right, up, -forward], 1)
    c2w[:3, 3] = position
    blender = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float) @ c2w
    blender[:3, 3] /= np.linalg.norm(blender[:3, 3]) + 1e-8
    return blender.reshape(16)


def test_cameras_follow_mvdreams_convention():
    # Our azimuth a (z-up world, position d (cos e cos a, cos e sin a, sin e)) is MVDream's a + 90 degrees; the
    # distance drops out with the normalization.
    from amortized3d.priors.mvdream import mvdream_cameras

    for elevation, azimuth in [(0.0, 0.0), (15.0, 30.0), (30.0, -120.0), (5.0, 170.0)]:
        ours = mvdream_cameras(look_at_cameras(torch.tensor([elevation]), torch.tensor([azimuth]), torch.tensor([2.7]),
                                               torch.tensor([40.0])))[0]
        theirs = mvdream_get_camera(elevation, azimuth + 90.0)
        assert np.allclose(ours.numpy(), theirs, atol=1e-5), (elevation, azimuth)


def test_converted_checkpoint_loads_into_diffusers(tiny):
    path, _, vae, _, prior = tiny
    folder = path.parent / f"{path.stem}-diffusers"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert prior.unet.config.class_embed_type == "projection" and prior.unet.config.projection_class_embeddings_input_dim == 16
    assert prior.multiview and prior.resolution == 256 and prior.latent_scale == pytest.approx(0.18215)
    # the VAE's weights come back exactly (the checkpoint was written from a diffusers VAE through ldm's names)
    for key, value in vae.state_dict().items():
        assert torch.equal(prior.vae.state_dict()[key], value), key
    # the scheduler: scaled-linear 0.00085 -> 0.012
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    assert torch.allclose(prior.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), atol=1e-6)


def test_text_embedding_is_open_clips_penultimate_layer(tiny):
    _, _, _, tower, prior = tiny
    ours = prior.text_encoder.encode(PROMPTS).tokens
    assert torch.allclose(ours.float(), reference_context(tower, PROMPTS), atol=1e-5)


def predict_both(tiny, x, t, cameras, context, V):
    """(the prior's UNet, the reference network) on the same inputs."""
    from amortized3d.priors.mvdream import mvdream_cameras

    _, unet, _, _, prior = tiny
    with torch.no_grad():
        camera = mvdream_cameras(cameras)
        return prior.unet_noise(x, t, context, camera, num_frames=V), unet(x, t, context, camera, V)


def two_objects(tiny):
    _, _, _, tower, _ = tiny
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 8, 8, generator=g)
    t = torch.tensor([700] * 4 + [150] * 4)
    cams = Cameras.cat([orbit_cameras(4, 15.0, 2.0, 40.0), look_at_cameras(torch.full((4,), 25.0), torch.tensor([10.0, 100.0, 190.0, 280.0]),
                                                                            torch.full((4,), 3.0), torch.full((4,), 30.0))])
    context = reference_context(tower, PROMPTS).repeat_interleave(4, 0)
    return x, t, cams, context


def test_noise_prediction_equals_the_original_network(tiny):
    x, t, cams, context = two_objects(tiny)
    ours, theirs = predict_both(tiny, x, t, cams, context, 4)
    assert theirs.abs().mean() > 0.1  # the reference is not trivially small
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()


def test_views_of_other_objects_do_not_matter_and_views_permute(tiny):
    x, t, cams, context = two_objects(tiny)
    base, _ = predict_both(tiny, x, t, cams, context, 4)
    changed = x.clone()
    changed[:4] += torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    other, _ = predict_both(tiny, changed, t, cams, context, 4)
    assert torch.equal(other[4:], base[4:])  # object B bit-identical
    assert not torch.allclose(other[:4], base[:4])
    # 4 objects of one view each: the joint attention reaches nothing else
    single, _ = predict_both(tiny, x, t, cams, context, 1)
    assert not torch.allclose(single[:4], base[:4], atol=1e-3)  # the views do see each other in the 4-view object
    order = torch.tensor([2, 0, 3, 1, 4, 5, 6, 7])
    permuted, _ = predict_both(tiny, x[order], t[order], cams[order], context[order], 4)
    assert torch.allclose(permuted, base[order], atol=1e-5)


def test_one_view_with_a_zero_camera_embedding_is_the_plain_sd_unet(tiny):
    from diffusers import UNet2DConditionModel

    path, _, _, tower, prior = tiny
    config = {k: v for k, v in prior.unet.config.items() if not k.startswith("_")}
    config.update(class_embed_type=None, projection_class_embeddings_input_dim=None)
    plain = UNet2DConditionModel(**config).eval()
    weights = {k: v for k, v in prior.unet.state_dict().items() if not k.startswith("class_embedding.")}
    assert not plain.load_state_dict(weights, strict=True).missing_keys
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([10, 500, 990])
    context = reference_context(tower, ["a", "b", "c"])
    state = {k: v.clone() for k, v in prior.unet.class_embedding.state_dict().items()}
    try:
        with torch.no_grad():
            prior.unet.class_embedding.linear_2.weight.zero_()
            prior.unet.class_embedding.linear_2.bias.zero_()
            ours = prior.unet_noise(x, t, context, torch.randn(3, 16, generator=g), num_frames=1)
            sd = plain(x, t, encoder_hidden_states=context).sample
    finally:
        prior.unet.class_embedding.load_state_dict(state)
    assert torch.allclose(ours, sd, atol=1e-5)


def test_predict_noise_takes_each_objects_cameras_and_one_timestep(tiny):
    _, unet, _, tower, prior = tiny
    x, t, cams, _ = two_objects(tiny)
    cond = Conditioning([PROMPTS[0]] * 4 + [PROMPTS[1]] * 4, cams, views_per_object=4)
    branch = torch.tensor([COND] * 4 + [UNCOND] * 4)
    from amortized3d.priors.mvdream import mvdream_cameras

    with torch.no_grad():
        got = prior.predict_noise(x, t, cond, branch)
        context = torch.cat([reference_context(tower, [PROMPTS[0]]).expand(4, -1, -1), reference_context(tower, [""]).expand(4, -1, -1)])
        want = unet(x, t, context, mvdream_cameras(cams), 4)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="one timestep per object"):
        prior.predict_noise(x, torch.tensor([700, 700, 600, 700] + [150] * 4), cond, branch)


class Recorder:
    """The prior, recording every predict_noise call's inputs."""

    def __init__(self, prior):
        self.prior, self.calls = prior, []
        self.alphas_cumprod, self.perp_neg, self.multiview, self.text_encoder = prior.alphas_cumprod, False, True, prior.text_encoder

    def predict_noise(self, noisy, timesteps, cond, branch):
        self.calls.append((noisy.clone(), timesteps.clone(), cond, branch.clone()))
        return self.prior.predict_noise(noisy, timesteps, cond, branch)


@pytest.mark.parametrize("method", ["asd", "sds", "sds-star"])
def test_distillation_gradients_from_raw_unet_outputs(tiny, method):
    # ScaleDreamer's MVDream guidance: ASD [cond(t), uncond(t), cond(t + dt)] and SDS, w(t) = 1 - abar_t;
    # SDS*: MVDream's x0 reconstruction with the guidance rescale 0.5 per object (std over views, C, H, W).
    from amortized3d.distillation.score_distillation import score_distillation
    from amortized3d.priors.mvdream import mvdream_cameras

    _, unet, _, tower, prior = tiny
    V, g = 4, {"asd": 7.5, "sds": 100.0, "sds-star": 50.0}[method]
    x = torch.randn(2 * V, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cams = Cameras.cat([orbit_cameras(V, 15.0, 2.0, 40.0)] * 2)
    cond = Conditioning([PROMPTS[0]] * V + [PROMPTS[1]] * V, cams, views_per_object=V)
    recorder = Recorder(prior)
    out = score_distillation(recorder, x, cond, method=method, guidance_scale=g, t_range=(20, 980), eta=0.1,
                             generator=torch.Generator().manual_seed(4), recon_rescale=0.5)
    (noisy, steps, _, branch), = recorder.calls
    assert len(set(out.timesteps[:V].tolist())) == 1 and len(set(out.timesteps[V:].tolist())) == 1
    text = {COND: reference_context(tower, PROMPTS).repeat_interleave(V, 0), UNCOND: reference_context(tower, [""]).expand(2 * V, -1, -1)}
    n = len(noisy) // (2 * V)
    context = torch.cat([text[int(branch[k * 2 * V])] for k in range(n)])
    with torch.no_grad():
        eps = unet(noisy, steps, context, mvdream_cameras(Cameras.cat([cams] * n)), V).chunk(n)
    abar = prior.alphas_cumprod[out.timesteps].view(-1, 1, 1, 1)
    x_t = noisy[: 2 * V]
    noise = (x_t - abar.sqrt() * x) / (1 - abar).sqrt()
    eps_cfg = eps[1] + g * (eps[0] - eps[1])
    if method == "asd":
        expected = (1 - abar) * (eps_cfg - eps[2])
        assert (out.shifted_timesteps >= out.timesteps).all() and len(set(out.shifted_timesteps[:V].tolist())) == 1
    elif method == "sds":
        expected = (1 - abar) * (eps_cfg - noise)
    else:
        x0_cfg = (x_t - (1 - abar).sqrt() * eps_cfg) / abar.sqrt()
        x0_c = (x_t - (1 - abar).sqrt() * eps[0]) / abar.sqrt()
        factor = (x0_c.view(2, V, -1).std([1, 2]) + 1e-8) / (x0_cfg.view(2, V, -1).std([1, 2]) + 1e-8)
        expected = x - (0.5 * factor.repeat_interleave(V).view(-1, 1, 1, 1) * x0_cfg + 0.5 * x0_cfg)
    assert torch.allclose(out.grad, expected, atol=1e-3, rtol=1e-3), (out.grad - expected).abs().max()


def test_bad_checkpoints_are_refused_with_the_keys(tiny, tmp_path):
    from amortized3d.priors.mvdream import convert_checkpoint

    path = tiny[0]
    state = torch.load(path, weights_only=True)
    config = path.with_suffix(".yaml")
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "model.diffusion_model.out.2.weight"}, "missing: out.2.weight|conv_out.weight"),
        "extra": ({**state, "model.diffusion_model.extra_block.weight": torch.zeros(3)}, "extra_block.weight"),
        "shape": ({**state, "model.diffusion_model.time_embed.0.weight": torch.zeros(128, 16)}, "mis-shaped.*time_embedding.linear_1.weight"),
        "foreign": ({**state, "ema.decay": torch.tensor(0.9)}, "outside MVDream.*ema.decay"),
        "no camera": ({k: v for k, v in state.items() if "camera_embed" not in k}, "camera_embed"),
    }
    for name, (bad, message) in cases.items():
        bad_path = tmp_path / f"{name.replace(' ', '_')}.pt"
        torch.save(bad, bad_path)
        with pytest.raises(PretrainedLoadError, match=message):
            convert_checkpoint(bad_path, tmp_path / f"{name}-out", config)


def test_conversion_is_cached_beside_the_checkpoint_and_redone_when_it_changes(tiny, tmp_path):
    from amortized3d.priors.mvdream import converted_folder

    path = tiny[0]
    folder = converted_folder(str(path))
    assert folder == path.parent / f"{path.stem}-diffusers"
    stamp = (folder / "conversion.json").stat().st_mtime_ns
    assert converted_folder(str(path)) == folder and (folder / "conversion.json").stat().st_mtime_ns == stamp
    with pytest.raises(PretrainedLoadError, match="does not exist"):
        converted_folder(str(tmp_path / "nowhere.pt"))


def test_shipped_random_architecture_is_the_converted_real_one():
    # random:mvdream-sd21-base-4view (benchmarks at real size) must be the UNet that MVDream's own config converts to
    import json

    import yaml

    from amortized3d.priors.mvdream import LDM_CONFIG, unet_config_from_ldm

    import inspect

    from amortized3d._compat import import_torchvision_safely

    import_torchvision_safely()
    from diffusers import UNet2DConditionModel

    defaults = {k: p.default for k, p in inspect.signature(UNet2DConditionModel.__init__).parameters.items() if k != "self"}
    plain = lambda config: {k: list(v) if isinstance(v, tuple) else v for k, v in {**defaults, **config}.items()}  # noqa: E731
    converted = plain(unet_config_from_ldm(yaml.safe_load(LDM_CONFIG.read_text())))
    shipped = plain({k: v for k, v in json.loads((LDM_CONFIG.parent / "unet" / "config.json").read_text()).items() if not k.startswith("_")})
    assert shipped == converted
    assert shipped["projection_class_embeddings_input_dim"] == 16 and shipped["sample_size"] == 32


@pytest.mark.skipif(not os.environ.get("AMORTIZED3D_CORPORA"), reason="AMORTIZED3D_CORPORA (the reference corpora folder) is not set")
@pytest.mark.parametrize("latents", [False, True])
def test_dl17k_recipe_trains_with_the_tiny_checkpoint(tiny, tmp_path, latents):
    # `train --corpus dl17k --prior TINY.pt`: the recipe keeps its MVDream prior, renders 1 prompt x 4 views as one orbit
    # (with render.latents: the 4 views' latents, which the validation views decode)
    import json

    from amortized3d.cli import main

    small = [*(["render.latents=true", "render.random_background_prob=0"] if latents else []), "generator.preset=tiny", "render.height=16", "render.width=16", "render.n_proposal=16", "render.n_importance=8",
             "eval.resolution=16", "train.steps=2", "train.ckpt_every=2", "train.val_every=1000", "train.wandb=disabled"]
    assert main(["train", "--corpus", "dl17k", "--prior", str(tiny[0]), "--output", str(tmp_path / "run"), *small]) == 0
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "kind: mvdream" in config and str(tiny[0]) in config
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss_sd"] for r in rows if "loss_sd" in r]
    assert losses and all(math.isfinite(v) for v in losses)


def test_cameras_for_a_unet_without_a_camera_embedding_are_refused(tmp_path):
    from amortized3d.priors.diffusers_prior import DiffusionPrior, DiffusionPriorConfig
    from amortized3d.priors.tiny import make_tiny_stable_diffusion

    prior = DiffusionPrior(DiffusionPriorConfig(model=str(make_tiny_stable_diffusion(tmp_path / "sd"))))
    tokens = prior.text_encoder.encode(["a"]).tokens
    with pytest.raises(ValueError, match="no class embedding"):
        prior.unet_noise(torch.randn(1, 4, 8, 8), torch.tensor([10]), tokens, torch.zeros(1, 16))
