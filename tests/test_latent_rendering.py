"""Direct latent rendering (render.latents=true): the field's colors are the prior's latents, and the prior denoises the
renders themselves, with no encoder on the gradient path. The reference: ScaleDreamer's
threestudio/models/guidance/stable_diffusion_asd_guidance.py, get_latents(rgb_as_latents=True), takes the rendered
"rgb" interpolated (bilinear, align_corners=False) to 64 x 64 as the latents, and decodes them with the VAE for its
validation images (custom/amortized/systems/multiprompt_radience_field_generator.py)."""

import json

import pytest
import torch
import torch.nn.functional as F

from amortized3d.builders import build_generator, build_prior
from amortized3d.config import ConfigError, load_config
from amortized3d.rendering.cameras import orbit_cameras
from amortized3d.rendering.volume import SDFRepresentation, render_images
from amortized3d.training.step import prior_space
from tests.fixtures import REPO, SD_TINY, TINY, load_benchmark

LATENT = ["prior.latent=true", "render.latents=true"]


@pytest.mark.parametrize("overrides, match", [
    (["render.latents=true"], "denoises pixels"),  # the pixel-space analytic prior
    (["render.latents=true", "prior.kind=deepfloyd_if"], "denoises pixels"),
    ([*LATENT, "render.random_background_prob=0.2"], "random_background_prob=0"),
    ([*LATENT, "distill.method=sds", "distill.rgb_weight=0.1"], "rgb_weight=0"),
    ([*LATENT, "phase2.start=0.5", "phase2.prior={latent: false}"], "phase2.start=0"),
    (["render.latents=true", "prior.kind=stable_diffusion", "render.random_background_prob=0", "render.size_schedule=[[0.4,256]]"],
     "size_schedule=\\[\\]"),
])
def test_settings_that_need_rgb_renders_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("shapeworld-16", overrides=overrides)


def test_3d_gaussians_are_refused():
    with pytest.raises(ConfigError, match="field generator"):
        load_config("prompt:a large red cube", str(REPO / "configs" / "prompt-gaussians.yaml"), LATENT)


class ConstantField(SDFRepresentation):
    """A sphere of radius 0.5 whose color is ``color`` [C] everywhere, in front of a background ``background`` [C]."""

    def __init__(self, color: torch.Tensor, background: torch.Tensor):
        self.color, self.back = color, background

    def sdf(self, points):
        return points.norm(dim=-1) - 0.5

    def sdf_and_color(self, points):
        return self.sdf(points), self.color.expand(*points.shape[:2], -1)

    def background(self, directions):
        return self.back.expand(*directions.shape[:2], -1)


def test_the_renderer_composites_latents_of_any_width():
    """Volume compositing of C channels: pixel = sum_i w_i c + (1 - opacity) b (NeRF's quadrature), checked per pixel
    from the render's own opacity; a field with one latent everywhere, background included, renders that latent."""
    cams = orbit_cameras(2, 15.0, 1.5, 50.0).reshape(1, 2)
    color, back = torch.tensor([1.5, -0.7, 0.2, 3.0]), torch.tensor([-2.0, 0.4, 0.0, 1.0])
    kwargs = dict(scene_radius=1.0, n_proposal=16, n_importance=8, inv_std=30.0)
    out = render_images(ConstantField(color, back), cams, 12, 12, **kwargs)
    assert out.rgb.shape == (1, 2, 4, 12, 12)
    opacity = out.opacity
    assert 0.05 < opacity.mean() < 0.95  # both the sphere and the background are in view
    expected = color.view(1, 1, 4, 1, 1) * opacity + back.view(1, 1, 4, 1, 1) * (1 - opacity)
    assert torch.allclose(out.rgb, expected, atol=1e-5)
    same = render_images(ConstantField(color, color), cams, 12, 12, **kwargs).rgb
    assert torch.allclose(same, color.view(1, 1, 4, 1, 1).expand_as(same), atol=1e-5)


@pytest.mark.parametrize("kind", ["hyper_ingp", "conv3d", "triplane"])
def test_latent_colors_are_the_heads_raw_outputs(kind):
    """With render.latents a generator's colors and background have the prior's 4 latent channels and no sigmoid (the
    reference's latent fields have no color activation): the color equals the color head's linear output, while the
    RGB generator's is its sigmoid."""
    extra = [] if kind == "hyper_ingp" else ["generator.preset=tiny"]
    torch.manual_seed(0)
    cfg = load_config("shapeworld-16", overrides=[*TINY, *LATENT, f"generator.kind={kind}", *extra])
    generator = build_generator(cfg)
    text = torch.randn(2, cfg.text.dim)
    field = generator(text, torch.randn(2, 77, cfg.text.dim))
    points = torch.rand(2, 50, 3) - 0.5
    _, color = field.sdf_and_color(points)
    if kind == "hyper_ingp":  # rgb_p(x) = MLP_color(e(x); W_p) with the generated weights, by hand
        encoding = field._encode(generator.grid, points)
        raw = torch.bmm(F.silu(torch.bmm(encoding, field.color_hidden)), field.color_out)
    else:
        raw = generator.color_mlp(field.features(points)).float()
    assert color.shape == (2, 50, 4) and torch.allclose(color, raw, atol=1e-5)
    assert field.background(F.normalize(torch.randn(2, 7, 3), dim=-1)).shape == (2, 7, 4)
    rgb_cfg = load_config("shapeworld-16", overrides=[*TINY, "prior.latent=true", f"generator.kind={kind}", *extra])
    torch.manual_seed(0)
    rgb_generator = build_generator(rgb_cfg)
    rgb_field = rgb_generator(text, torch.randn(2, 77, cfg.text.dim))
    _, rgb = rgb_field.sdf_and_color(points)
    if kind == "hyper_ingp":
        rgb_raw = torch.bmm(F.silu(torch.bmm(rgb_field._encode(rgb_generator.grid, points), rgb_field.color_hidden)), rgb_field.color_out)
    else:
        rgb_raw = rgb_generator.color_mlp(rgb_field.features(points)).float()
    assert rgb.shape == (2, 50, 3) and torch.allclose(rgb, torch.sigmoid(rgb_raw), atol=1e-6)


def test_the_prior_sees_the_renders_themselves():
    """prior_space with render.latents: at the prior's latent size for the images they stand for, the renders pass
    unchanged, gradient 1 to every value (no encoder on the gradient path); at another size they are resized as the
    reference's get_latents does; a render of RGB width is refused. For RGB images, the prior's encoder runs."""
    prior = build_prior(load_config("shapeworld-16", overrides=[*TINY, *LATENT]))
    assert prior.space_shape(16, 12) == (4, 8, 6)
    latents = torch.randn(3, 4, 8, 6, requires_grad=True)
    x = prior_space(prior, latents, (16, 12))
    assert torch.equal(x, latents)
    x.sum().backward()
    assert torch.equal(latents.grad, torch.ones_like(latents))
    bigger = torch.randn(3, 4, 16, 12)
    reference = F.interpolate(bigger, (8, 6), mode="bilinear", align_corners=False)
    assert torch.equal(prior_space(prior, bigger, (16, 12)), reference)
    with pytest.raises(ValueError, match="3 channels.*4"):
        prior_space(prior, torch.rand(3, 3, 8, 6), (16, 12))
    images = torch.rand(3, 3, 16, 12)
    assert torch.equal(prior_space(prior, images), prior.encode(images))


class ConstantGenerator(torch.nn.Module):
    """Any text -> ConstantField(latent, latent) for each prompt."""

    z_dim = 0

    def __init__(self, latent: torch.Tensor):
        super().__init__()
        self.latent = latent

    def forward(self, pooled, tokens=None, z=None):
        return ConstantField(self.latent, self.latent)


def test_evaluation_renders_are_decoded_by_the_prior():
    """The latent analytic prior's encoder maps a 2 x 2 block of one color c to (2 c_R, 2 c_G, 2 c_B, 0) (block sums
    over 2, no left-right edge: analytic.py's definition), so a field of that latent everywhere must read as the image
    c at every pixel of the evaluation renders; with no prior to decode, they are refused."""
    from amortized3d.text.hashed_encoder import HashedTextEncoder
    from amortized3d.training.previews import render_validation

    cfg = load_config("shapeworld-16", overrides=[*TINY, *LATENT])
    prior = build_prior(cfg)
    c = torch.tensor([0.9, 0.25, 0.5])
    generator = ConstantGenerator(torch.cat([2 * c, torch.zeros(1)]))
    encoder = HashedTextEncoder(dim=cfg.text.dim)
    images = render_validation(cfg, generator, encoder, ["a large red cube", "a small blue torus"], "cpu", n_views=3, resolution=12,
                               prior=prior)
    assert images.shape == (2, 3, 3, 12, 12)
    assert torch.allclose(images, c.view(1, 1, 3, 1, 1).expand_as(images), atol=1e-5)
    with pytest.raises(ValueError, match="pass its prior"):
        render_validation(cfg, generator, encoder, ["a large red cube"], "cpu", n_views=1, resolution=12)


def test_a_shapeworld_run_trains_evaluates_and_generates(tmp_path, capsys):
    """Training renders 4-channel latents at half the image size (the latent analytic prior's), with a gradient to the
    generator's color head; the oracle evaluation scores the decoded renders; generate writes a colored mesh and the
    decoded turntable; noise-error (it encodes RGB renders) refuses the run, saying why."""
    import trimesh

    from amortized3d.cli import main
    from amortized3d.training.train import train

    cfg = load_config("shapeworld-16", overrides=[*TINY, *LATENT, "train.steps=2"])
    run = train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["skipped_steps"] == 0 and rows[-1]["grad_sd_norm"] > 0
    assert main(["evaluate", "--checkpoint", str(run), "--limit", "2"]) == 0
    report = json.loads((run / "eval_test.json").read_text())["summary"]
    assert 0 <= report["similarity"] <= 1 and report["n_prompts"] == 2
    out = tmp_path / "out"
    assert main(["generate", "a large red cube", "--checkpoint", str(run), "--out", str(out), "--mesh-resolution", "24",
                 "--frames", "4", "--image-size", "16"]) == 0
    mesh = trimesh.load(out / "a_large_red_cube.glb", force="mesh")
    assert len(mesh.faces) > 0 and mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
    assert (out / "a_large_red_cube.png").is_file()
    capsys.readouterr()
    assert main(["noise-error", str(run)]) != 0
    assert "render.latents=true" in capsys.readouterr().err


def test_the_sd_step_skips_the_vae_encoder(tiny_sd, tmp_path):
    """mg15 on the tiny SD folder with render.latents: one profiled step has no VAE stage at all, its UNet stage is still
    5 single-image passes per image (ASD + Perp-Neg), and the floor has no encoder part; the renders are 4 x (r / f)^2."""
    recipe_step = load_benchmark("recipe_step")
    overrides = [f"--set={o}" for o in SD_TINY + [f"prior.model={tiny_sd}", "train.prompts_per_step=2", "train.views_per_prompt=2",
                                                  "render.latents=true", "render.random_background_prob=0"]]
    (row,) = recipe_step.main(["mg15", "--out", str(tmp_path / "steps.json"), *overrides])
    stages, parts = row["stages"], row["floor_parts"]
    assert not any(name.startswith("vae") for name in stages)
    assert parts["vae_encode_forward_backward_per_image"] == 0
    assert stages["unet"]["gflop"] == pytest.approx(4 * 5 * parts["unet_forward_per_image"], rel=1e-9)
    assert row["ratio"] >= 1.0
    prior = build_prior(load_config("mg15", overrides=[*SD_TINY, f"prior.model={tiny_sd}"]))
    C, h, w = prior.space_shape(16, 16)
    assert (C, h, w) == (prior.vae.config.latent_channels, 32 // prior.vae_factor, 32 // prior.vae_factor)
    assert row["render"] == f"{h}x{w} latents (4 channels)"


def test_an_sd_run_decodes_its_validation_clip_and_generate_views(tiny_sd, tmp_path, monkeypatch):
    """A latent run on the tiny SD folder: the VAE's encoder never runs in training, its decoder turns the validation
    views, the CLIP evaluation's views and generate's turntable frames into images."""
    from diffusers import AutoencoderKL

    from amortized3d.cli import main
    from amortized3d.priors.tiny import make_tiny_clip
    from amortized3d.training.train import train

    corpus = tmp_path / "prompts.json"
    corpus.write_text('{"train": ["a frog", "a chair"], "test": ["a frog"]}')
    cfg = load_config(str(corpus), str(REPO / "configs" / "mg15.yaml"),
                      [*SD_TINY, f"prior.model={tiny_sd}", "render.latents=true", "render.random_background_prob=0"])
    decoded = []
    decode = AutoencoderKL.decode

    def refuse_encode(self, *args, **kwargs):
        raise AssertionError("render.latents must not run the VAE encoder")

    def count_decode(self, z, *args, **kwargs):
        decoded.append(z.shape[0])
        return decode(self, z, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", refuse_encode)
    monkeypatch.setattr(AutoencoderKL, "decode", count_decode)
    run = train(cfg, tmp_path / "run")
    assert (run / "validation" / "step_00000002.png").is_file() and sum(decoded) == 2 * 4 + 24  # 2 prompts x 4 views, 24 frames
    clip = make_tiny_clip(tmp_path / "clip", image_size=16)
    out = tmp_path / "clip_eval"
    assert main(["evaluate", "--checkpoint", str(run), "--clip", str(clip), "--views", "3", "--out", str(out), "--gallery", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_prompts"] == 1 and sum(decoded) == 2 * 4 + 24 + 3
    assert main(["generate", "a frog", "--checkpoint", str(run), "--out", str(tmp_path / "gen"), "--mesh-resolution", "24",
                 "--frames", "2", "--image-size", "16"]) == 0
    assert sum(decoded) == 2 * 4 + 24 + 3 + 2 and (tmp_path / "gen" / "a_frog.png").is_file()


class LatentSphere(SDFRepresentation):
    """A sphere of radius 0.5 with latent colors (2 c(p), e(p)) at p, c(p) = (p + 1) / 2 clamped to [0.1, 0.9] and a
    small left-right edge e(p) = 0.2 p_x, in front of the latent (2 b, 0) of a gray b = 0.3."""

    def sdf(self, points):
        return points.norm(dim=-1) - 0.5

    def sdf_and_color(self, points):
        c = ((points + 1) / 2).clamp(0.1, 0.9)
        return self.sdf(points), torch.cat([2 * c, 0.2 * points[..., :1]], -1)

    def background(self, directions):
        return torch.tensor([0.6, 0.6, 0.6, 0.0]).expand(*directions.shape[:2], -1)


def test_the_latent_to_rgb_fit_is_weighted_least_squares():
    """fit_latent_to_rgb against numpy: the normal equations (X^T W X) A = X^T W Y of weighted least squares, with Y
    each 2 x 2 pixel block's mean (the images at twice the latent size), X the latents with a constant 1 and W the
    opacity + BACKGROUND_FIT_WEIGHT per cell; random, not affine, data, so the weights matter."""
    import numpy as np

    from amortized3d.inference.generate import BACKGROUND_FIT_WEIGHT, fit_latent_to_rgb

    g = torch.Generator().manual_seed(0)
    latents, images = torch.randn(3, 4, 5, 6, generator=g), torch.rand(3, 3, 10, 12, generator=g)
    opacity = torch.rand(3, 1, 5, 6, generator=g) ** 4  # far from uniform
    A = fit_latent_to_rgb(latents, images, opacity).numpy()
    z, x, o = latents.double().numpy(), images.double().numpy(), opacity.double().numpy()
    Y = x.reshape(3, 3, 5, 2, 6, 2).mean((3, 5)).transpose(0, 2, 3, 1).reshape(-1, 3)
    X = np.concatenate([z.transpose(0, 2, 3, 1).reshape(-1, 4), np.ones((90, 1))], 1)
    W = o.reshape(-1) + BACKGROUND_FIT_WEIGHT
    expected = np.linalg.solve(X.T @ (W[:, None] * X), X.T @ (W[:, None] * Y))
    assert np.allclose(A, expected, atol=1e-5)
    unweighted = np.linalg.lstsq(X, Y, rcond=None)[0]
    assert not np.allclose(A, unweighted, atol=1e-3)  # the weights changed the answer


def test_the_fitted_latent_to_rgb_map_is_the_analytic_decoder():
    """The latent analytic prior's decoder D = E^T gives each 2 x 2 cell the mean color z_RGB / 2: the edge channel adds
    +-e / (2 sqrt 3) to the left and right pixels and cancels in the mean (analytic.py's definition of E). So generate's
    affine map fitted to the decoded turntable must be A = [[I / 2], [0], [0]] (rows: the 3 color latents, the edge, the
    constant), and the vertex colors of the sphere its colors c(p)."""
    from amortized3d.inference.generate import decoded_turntable

    cfg = load_config("shapeworld-16", overrides=[*TINY, *LATENT])
    prior = build_prior(cfg)
    turntable = orbit_cameras(4, 15.0, 1.5, 50.0)
    rgb, mapped = decoded_turntable(cfg, prior, LatentSphere(), turntable, 16)
    assert rgb.shape == (4, 3, 16, 16)
    expected = torch.cat([torch.eye(3) / 2, torch.zeros(2, 3)])
    assert torch.allclose(mapped.A, expected, atol=1e-4), mapped.A
    points = torch.rand(1, 30, 3) - 0.5
    assert torch.allclose(mapped.sdf_and_color(points)[1], ((points + 1) / 2).clamp(0.1, 0.9), atol=1e-4)
