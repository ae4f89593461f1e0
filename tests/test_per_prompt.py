"""Per-prompt runs: `train --prompt TEXT` / `--prompts FILE`, the corpus "prompt:TEXT", the Instant-NGP field of one
prompt (generator.kind=ngp), and the options its recipes need (optimizer groups, render-size schedule)."""

import json

import pytest
import torch

from amortized3d.builders import build_generator, build_optimizer
from amortized3d.cli import main
from amortized3d.config import ConfigError, load_config
from amortized3d.data.corpora import CorpusError, load_corpus
from amortized3d.training.checkpoint import latest_checkpoint, step_of
from tests.fixtures import REPO, SD_TINY, TINY, evaluate_and_generate

PROMPT = "a large red cube"
NGP_TINY = [*TINY, "train.prompts_per_step=1", "train.views_per_prompt=1", "train.steps=4", "train.ckpt_every=2"]


def test_a_prompt_corpus_holds_that_prompt_in_every_split():
    corpus = load_corpus("prompt:  a frog\t")
    assert (corpus.train, corpus.val, corpus.test) == (["a frog"], ["a frog"], ["a frog"])
    with pytest.raises(CorpusError, match="empty"):
        load_corpus("prompt:   ")


def test_the_field_of_one_prompt_needs_a_prompt_corpus():
    with pytest.raises(ConfigError, match="generator.kind=ngp is the asset of one prompt.*--prompt"):
        load_config("shapeworld-16", overrides=["generator.kind=ngp"])
    cfg = load_config("prompt:" + PROMPT)  # its recipe: configs/prompt-shapeworld.yaml
    assert cfg.generator.kind == "ngp" and cfg.optim.lr_decoder == 0.001


def test_the_field_starts_as_the_sphere_and_ignores_the_text():
    cfg = load_config("prompt:" + PROMPT, overrides=TINY)
    model = build_generator(cfg)
    points = (torch.rand(2, 500, 3) * 2 - 1) * cfg.generator.bound
    a = model(torch.randn(2, cfg.text.dim))
    b = model(torch.randn(2, cfg.text.dim))
    sphere = points.norm(dim=-1) - cfg.generator.sphere_radius  # the SDF of the sphere, by definition
    sdf, rgb = a.sdf_and_color(points)
    assert (sdf - sphere).abs().max() < 1e-3
    assert torch.equal(sdf, b.sdf(points)) and torch.equal(rgb, b.sdf_and_color(points)[1])
    assert rgb.shape == (2, 500, 3) and ((rgb >= 0) & (rgb <= 1)).all()


def test_decoders_get_their_own_learning_rate_and_adamw_its_weight_decay():
    cfg = load_config("prompt:" + PROMPT, overrides=[*TINY, "optim.name=adamw"])
    model = build_generator(cfg)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.01  # torch's default
    groups = [{id(p) for p in g["params"]} for g in optimizer.param_groups]
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.003, 0.001]
    assert groups[0] == {id(p) for p in model.grid.parameters()}
    assert groups[2] == {id(p) for p in [*model.sdf_mlp.parameters(), *model.color_mlp.parameters()]}
    assert groups[1] == {id(p) for p in model.background.parameters()}
    assert sum(map(len, groups)) == len(list(model.parameters()))  # a partition of the parameters
    plain = build_optimizer(load_config("prompt:" + PROMPT, overrides=[*TINY, "optim.lr_decoder=null"]), model)
    assert [g["lr"] for g in plain.param_groups] == [0.01, 0.003]


def test_render_size_schedule():
    cfg = load_config("prompt:" + PROMPT, overrides=["render.size_schedule=[[0.4, 256]]", "render.height=64", "render.width=48"])
    assert cfg.render.size_at(0.0) == (64, 48) and cfg.render.size_at(0.3999) == (64, 48)
    assert cfg.render.size_at(0.4) == (256, 256) and cfg.render.size_at(1.0) == (256, 256)
    for bad in ("[[0.5, 64], [0.2, 128]]", "[[0.5, 64.5]]", "[[1.5, 64]]", "[[0.5]]"):
        with pytest.raises(ConfigError, match="render.size_schedule"):
            load_config("prompt:" + PROMPT, overrides=[f"render.size_schedule={bad}"])


def test_train_evaluate_generate_gallery_and_plot_a_per_prompt_run(tmp_path, capsys, monkeypatch):
    from tests.fixtures import hide_viewer

    run = tmp_path / "run"
    assert main(["train", "--prompt", PROMPT, "--output", str(run), *NGP_TINY, "render.size_schedule=[[0.5, 20]]"]) == 0
    assert step_of(latest_checkpoint(run)) == 4
    out = tmp_path / "out"
    evaluate_and_generate(run, PROMPT, out, capsys)
    assert main(["generate", "a large blue cube", "--checkpoint", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "per-prompt run" in err and repr(PROMPT) in err and "train --prompt 'a large blue cube'" in err
    hide_viewer(monkeypatch, tmp_path / "no_viewer")
    assert main(["gallery", str(run), "--out", str(tmp_path / "gallery")]) == 0
    assert (tmp_path / "gallery" / "index.html").is_file()
    assert main(["plot", str(run)]) == 0
    from amortized3d.priors.tiny import make_tiny_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    candidates = tmp_path / "candidates.txt"
    candidates.write_text(f"{PROMPT}\na large blue sphere\n")
    clip = make_tiny_clip(tmp_path / "clip", image_size=16)
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run), "--clip", str(clip), "--views", "2", "--gallery", "0", "--candidates",
                 str(candidates), "--out", str(tmp_path / "clip_eval")]) == 0
    summary = json.loads((tmp_path / "clip_eval" / "summary.json").read_text())
    assert summary["n_prompts"] == 1 and summary["n_candidates"] == 2


def test_a_batch_of_per_prompt_runs_one_folder_each_resumable(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a large red cube\na small blue sphere\n")
    root = tmp_path / "runs"
    assert main(["train", "--prompts", str(prompts), "--output", str(root), *NGP_TINY]) == 0
    assert sorted(p.name for p in root.iterdir()) == ["a_large_red_cube", "a_small_blue_sphere"]
    for name, prompt in (("a_large_red_cube", "a large red cube"), ("a_small_blue_sphere", "a small blue sphere")):
        assert step_of(latest_checkpoint(root / name)) == 4
        assert load_config(None, str(root / name / "config.yaml")).corpus.name == "prompt:" + prompt
    capsys.readouterr()
    assert main(["train", "--prompts", str(prompts), "--output", str(root), "--resume", *NGP_TINY]) == 0
    assert capsys.readouterr().out.count("finished in") == 2
    assert main(["train", "--prompts", str(prompts), "--corpus", "shapeworld-16"]) == 2
    assert "give one" in capsys.readouterr().err
    assert main(["describe", "--prompts", str(prompts)]) == 2


@pytest.mark.parametrize("recipe", [None, "configs/hifa.yaml"])
def test_a_per_prompt_run_with_stable_diffusion(tiny_sd, tmp_path, recipe):
    """--prompt with --prior selects configs/prompt-nerf.yaml: the NGP field, AdamW, Perp-Neg view prompts from the store,
    and a render size that changes mid-run (the prior encodes both sizes); configs/hifa.yaml adds SDS+'s image term
    (decoded by the VAE), the z-variance loss, kernel smoothing and sqrt timesteps."""
    run = tmp_path / "run"
    config = [] if recipe is None else ["--config", str(REPO / recipe)]
    assert main(["train", "--prompt", "a hamburger", "--prior", str(tiny_sd), *config, "--output", str(run), *SD_TINY, "train.steps=2",
                 "render.size_schedule=[[0.5, 24]]", "render.eikonal_points=64", "regularizers.z_variance=[[0.0, 3.0]]"]) == 0
    cfg = load_config(None, str(run / "config.yaml"))
    assert cfg.generator.kind == "ngp" and cfg.prior.perp_neg
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    if recipe is None:
        assert cfg.optim.name == "adamw"
    else:
        assert cfg.distill.rgb_weight == 0.1 and cfg.distill.t_schedule == "sqrt"
        assert (cfg.distill.denoise_steps, cfg.distill.denoise_eta) == (4, 1.0)  # HiFA A.1: DDIM r = 0.25, eta = 1
        assert all(r["loss_rgb"] > 0 and r["z_variance"] >= 0 for r in rows if "loss" in r)
        assert (rows[0]["t_min"], rows[0]["t_max"]) == (20, 980) == (rows[1]["t_min"], rows[1]["t_max"])  # HiFA: fixed bounds


# --- the density twin (generator.geometry=density): threestudio's implicit volume ------------------------------------

DENSITY = ["generator.geometry=density", "regularizers.eikonal=[]"]


class Ball:
    """A density field: sigma inside the ball |x| < radius, 0 outside; albedo (x + 1) / 2; gray background."""

    def __init__(self, sigma: float = 4.0, radius: float = 0.5):
        self.sigma, self.radius = sigma, radius

    def density(self, points):
        return torch.where(points.norm(dim=-1) < self.radius, self.sigma, 0.0)

    def density_and_color(self, points):
        return self.density(points), ((points + 1) / 2).clamp(0, 1)

    def background(self, directions):
        return torch.full_like(directions, 0.5)


def test_the_density_field_starts_as_magic3ds_blob():
    """threestudio's implicit volume with blob_magic3d: sigma = softplus(raw + 10 (1 - |x| / 0.5)), raw ~ 0 at the start."""
    cfg = load_config("prompt:" + PROMPT, overrides=[*TINY, *DENSITY])
    field = build_generator(cfg)(torch.zeros(1, cfg.text.dim))
    points = (torch.rand(1, 400, 3) * 2 - 1) * cfg.generator.bound
    expected = torch.nn.functional.softplus(10 * (1 - points.norm(dim=-1) / 0.5))
    assert torch.allclose(field.density(points), expected, atol=1e-3)
    assert field.geometry == "density" and field.regularizers(points) == {}
    assert torch.equal(field.occupancy(points), field.density(points) > 25.0)


def test_density_compositing_equals_a_per_ray_brute_force_and_the_chord_law():
    from amortized3d.rendering.cameras import camera_rays, orbit_cameras
    from amortized3d.rendering.volume import ray_sphere_near_far, render_rays

    ball = Ball()
    origins, dirs = camera_rays(orbit_cameras(2, 10.0, 1.6, 40.0).reshape(1, 2), 6, 6)
    origins, dirs = origins.reshape(1, -1, 3), dirs.reshape(1, -1, 3)
    near, far = ray_sphere_near_far(origins, dirs, 1.0)
    out = render_rays(ball, origins, dirs, near, far, n_proposal=64, n_importance=64, geometry="density", with_normals=True)
    for r in range(0, out.weights.shape[1], 5):  # w_i = T_i (1 - exp(-sigma_i delta_i)) by hand, ray by ray
        t = out.t_mid[0, r]
        transmittance, expected = 1.0, []
        edges = torch.cat([t[:1] - (t[1] - t[0]) / 2, (t[1:] + t[:-1]) / 2, t[-1:] + (t[-1] - t[-2]) / 2])
        for i in range(len(t)):
            sigma = float(ball.density((origins[0, r] + t[i] * dirs[0, r]).view(1, 1, 3)))
            delta = float(edges[i + 1] - edges[i])
            alpha = 1 - torch.exp(torch.tensor(-sigma * delta)).item()
            expected.append(transmittance * alpha)
            transmittance *= 1 - alpha
        assert abs(sum(expected) - float(out.opacity[0, r])) < 5e-3
    # the chord law: opacity = 1 - exp(-sigma L), L the ray's chord through the ball, up to the sampling's resolution
    b = (origins * dirs).sum(-1)
    chord = 2 * (b**2 - (origins**2).sum(-1) + 0.25).clamp_min(0).sqrt()
    assert torch.allclose(out.opacity, 1 - torch.exp(-4.0 * chord), atol=0.03)


def test_density_normals_are_minus_the_density_gradient():
    """A Gaussian density sigma = 20 exp(-|x|^2 / (2 0.2^2)): -grad sigma / |.| = x / |x|, so the composited normal is
    sum_i w_i x_i / |x_i| over the renderer's own samples (up to the finite differences' 0.01 step)."""
    from amortized3d.rendering.cameras import camera_rays, orbit_cameras
    from amortized3d.rendering.volume import ray_sphere_near_far, render_rays

    class Gaussian(Ball):
        def density(self, points):
            return 20 * torch.exp(-points.square().sum(-1) / (2 * 0.2**2))

    origins, dirs = camera_rays(orbit_cameras(1, 10.0, 1.6, 40.0).reshape(1, 1), 6, 6)
    origins, dirs = origins.reshape(1, -1, 3), dirs.reshape(1, -1, 3)
    near, far = ray_sphere_near_far(origins, dirs, 1.0)
    out = render_rays(Gaussian(), origins, dirs, near, far, n_proposal=64, n_importance=32, geometry="density", with_normals=True)
    points = origins.unsqueeze(2) + out.t_mid.unsqueeze(-1) * dirs.unsqueeze(2)
    expected = (out.weights.unsqueeze(-1) * points / points.norm(dim=-1, keepdim=True)).sum(2)
    assert out.sdf_grad is None and torch.allclose(out.normal, expected, atol=0.02)


def test_the_density_fields_mesh_is_its_iso_surface():
    """At iso 5 the blob's surface is the sphere 10 (1 - r / 0.5) = log(e^5 - 1), r = 0.2503 (solved by hand)."""
    import math

    from amortized3d.inference.baked import bake_field, render_baked
    from amortized3d.inference.export import extract_mesh
    from amortized3d.rendering.cameras import orbit_cameras

    cfg = load_config("prompt:" + PROMPT, overrides=[*TINY, *DENSITY, "generator.iso_density=5"])
    with torch.no_grad():
        field = build_generator(cfg)(torch.zeros(1, cfg.text.dim))
        baked = bake_field(field, 64, 1.0, geometry="density", iso=5.0)
        mesh = extract_mesh(baked)
        radius = 0.5 * (1 - math.log(math.exp(5) - 1) / 10)
        assert abs(float(torch.from_numpy(mesh.vertices).norm(dim=-1).mean()) - radius) < 0.01
        assert mesh.is_watertight and mesh.volume > 0  # outward faces
        cams = orbit_cameras(2, 15.0, 1.6, 50.0)
        fast = render_baked(baked, cams, 16, 16, **cfg.render.volume_kwargs())
        exact = field.render(cams.reshape(1, 2), 16, 16, cfg.render).rgb[0]
        assert (fast - exact).abs().mean() < 0.02


def test_a_density_run_trains_evaluates_and_generates(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--prompt", PROMPT, "--output", str(run), *NGP_TINY, *DENSITY, "generator.iso_density=5"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run)]) == 0
    assert 0 < json.loads(capsys.readouterr().out)["iou"] <= 1
    assert main(["generate", PROMPT, "--checkpoint", str(run), "--out", str(tmp_path / "out"), "--mesh-resolution", "32",
                 "--frames", "2", "--image-size", "16"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["faces"] > 0
    with pytest.raises(ConfigError, match="eikonal"):
        load_config("prompt:" + PROMPT, overrides=["generator.geometry=density"])
    with pytest.raises(ConfigError, match="generator.kind=ngp"):
        load_config("shapeworld-16", overrides=["generator.geometry=density", "regularizers.eikonal=[]"])
