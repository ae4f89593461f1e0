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
from tests.fixtures import REPO, SD_TINY, TINY

PROMPT = "a large red cube"
NGP_TINY = [*TINY, "train.prompts_per_step=1", "train.views_per_prompt=1", "train.steps=4", "train.ckpt_every=2"]


def test_a_prompt_corpus_holds_that_prompt_in_every_split():
    corpus = load_corpus("prompt:  a frog\t")
    assert (corpus.train, corpus.val, corpus.test) == (["a frog"], ["a frog"], ["a frog"])
    with pytest.raises(CorpusError, match="empty"):
        load_corpus("prompt:   ")


def test_the_field_of_one_prompt_needs_a_prompt_corpus():
    with pytest.raises(ConfigError, match="generator.kind=ngp is the field of one prompt.*--prompt"):
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
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["corpus"] == "prompt:" + PROMPT and report["n_prompts"] == 1 and 0 <= report["iou"] <= 1
    out = tmp_path / "out"
    assert main(["generate", PROMPT, "--checkpoint", str(run), "--out", str(out), "--mesh-resolution", "24", "--frames", "2",
                 "--image-size", "16"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["prompt"] == PROMPT
    assert main(["generate", "a large blue cube", "--checkpoint", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "per-prompt run" in err and repr(PROMPT) in err and "train --prompt 'a large blue cube'" in err
    hide_viewer(monkeypatch, tmp_path / "no_viewer")
    assert main(["gallery", str(run), "--out", str(tmp_path / "gallery")]) == 0
    assert (tmp_path / "gallery" / "index.html").is_file()
    assert main(["plot", str(run)]) == 0


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
        assert all(r["loss_rgb"] > 0 and r["z_variance"] >= 0 for r in rows if "loss" in r)
        assert (rows[0]["t_min"], rows[0]["t_max"]) == (20, 980) == (rows[1]["t_min"], rows[1]["t_max"])  # HiFA: fixed bounds
