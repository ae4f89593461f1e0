"""Training end to end on tiny settings: resume, the blow-up guard, learning, generate and evaluate."""

import json

import pytest
import torch
import trimesh
from safetensors.torch import load_file

from amortized3d.config import load_config, save_config
from amortized3d.training import train as train_module
from amortized3d.training.checkpoint import latest_checkpoint, save_checkpoint
from amortized3d.training.train import TrainingDiverged, prompt_indices, train

TINY = [
    "train.wandb=disabled", "render.height=16", "render.width=16", "render.n_proposal=16", "render.n_importance=8",
    "prior.n_proposal=16", "prior.n_importance=8", "generator.n_levels=4", "generator.log2_hashmap_size=12",
    "generator.base_resolution=4", "generator.per_level_scale=1.5", "text.dim=64", "train.prompts_per_step=2",
    "eval.resolution=16", "eval.n_views=4", "eval.iou_resolution=16", "render.eikonal_points=256", "train.log_every=1",
    "train.val_every=1000",
]


def tiny_config(*extra):
    return load_config("shapeworld-16", overrides=[*TINY, *extra])


def test_prompt_sampling_covers_each_epoch_and_splits_ranks():
    # Global batches of 4 that tile an 8-prompt epoch: ranks are disjoint within a step.
    n, per_rank, world = 8, 2, 2
    for step in range(6):
        ranks = [prompt_indices(n, step, 0, 1, r, world, per_rank, seed=3) for r in range(world)]
        assert not set(ranks[0]) & set(ranks[1])
    # Any batch size: the stream over steps, micro-batches and ranks is a permutation per epoch.
    n = 10
    stream = []
    for step in range(5):  # 5 steps x 2 micro-batches x 2 ranks x 1 prompt = 20 = two epochs
        for micro in range(2):
            for r in range(2):
                stream += prompt_indices(n, step, micro, 2, r, 2, 1, seed=3)
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]


def test_resume_is_bit_identical(tmp_path):
    cfg = tiny_config("train.steps=4", "train.ckpt_every=2")
    straight = train(cfg, tmp_path / "straight")
    interrupted = tmp_path / "interrupted"
    train(cfg, interrupted, max_steps=2)
    assert latest_checkpoint(interrupted).name == "step_00000002"
    train(cfg, interrupted, resume=True)
    a = load_file(str(latest_checkpoint(straight) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(interrupted) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa = load_file(str(latest_checkpoint(straight) / "optimizer.safetensors"))
    ob = load_file(str(latest_checkpoint(interrupted) / "optimizer.safetensors"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (straight / "config.yaml").is_file()


class NaNAfter:
    """Wraps a prior; its noise predictions turn NaN after ``good_calls`` calls."""

    def __init__(self, prior, good_calls):
        self.prior, self.good_calls, self.calls = prior, good_calls, 0
        self.alphas_cumprod = prior.alphas_cumprod

    def encode(self, x, generator=None):
        return self.prior.encode(x, generator)

    def predict_noise(self, *args):
        self.calls += 1
        eps = self.prior.predict_noise(*args)
        return eps if self.calls <= self.good_calls else eps * float("nan")


def test_guard_skips_non_finite_steps_and_stops_with_checkpoint_intact(tmp_path, monkeypatch):
    original = train_module.build_prior
    monkeypatch.setattr(train_module, "build_prior", lambda cfg, *args, **kwargs: NaNAfter(original(cfg), good_calls=2))
    cfg = tiny_config("train.steps=20", "train.ckpt_every=1", "train.max_bad_steps=3")
    with pytest.raises(TrainingDiverged) as err:
        train(cfg, tmp_path / "run")
    assert "3 consecutive steps" in str(err.value) and "step_00000002" in str(err.value)
    last = latest_checkpoint(tmp_path / "run")
    assert last.name == "step_00000002"
    weights = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_single_nan_step_is_skipped_and_counted(tmp_path, monkeypatch):
    original = train_module.build_prior

    class OneNaN(NaNAfter):
        def predict_noise(self, *args):
            self.calls += 1
            eps = self.prior.predict_noise(*args)
            return eps * float("nan") if self.calls == 2 else eps

    monkeypatch.setattr(train_module, "build_prior", lambda cfg, *args, **kwargs: OneNaN(original(cfg), 0))
    run = train(tiny_config("train.steps=3", "train.ckpt_every=3"), tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] == 1
    weights = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_short_training_improves_oracle_similarity(tmp_path):
    from amortized3d.builders import build_generator
    from amortized3d.evaluation.oracle import evaluate_run

    prompts = ["a large red cube", "a small blue sphere"]
    corpus = tmp_path / "two.json"
    corpus.write_text(json.dumps({"train": prompts, "val": prompts, "test": prompts}))
    extra = ["train.steps=60", "train.ckpt_every=60", "render.height=24", "render.width=24", "eval.resolution=24",
             f"corpus.name={corpus}"]
    cfg = tiny_config(*extra)
    untrained = tmp_path / "untrained"
    save_config(cfg, untrained / "config.yaml")
    model = build_generator(cfg)
    save_checkpoint(untrained, 0, model, torch.optim.Adam(model.parameters()), {})
    before = evaluate_run(untrained)["summary"]
    train(cfg, tmp_path / "trained")
    after = evaluate_run(tmp_path / "trained")["summary"]
    assert after["similarity"] > before["similarity"] + 0.05, (before, after)
