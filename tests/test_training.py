"""Training end to end on tiny settings: resume, the blow-up guard, learning, generate and evaluate."""

import json
from pathlib import Path

import pytest
import torch
import trimesh
from safetensors.torch import load_file

from amortized3d.config import save_config
from amortized3d.training import train as train_module
from amortized3d.training.checkpoint import latest_checkpoint, save_checkpoint
from amortized3d.training.train import TrainingDiverged, train
from tests.fixtures import NaNAfter, tiny_config


def cfg_prompts(cfg) -> list[str]:
    from amortized3d.data.corpora import load_corpus

    return load_corpus(cfg.corpus.name).train


def recorded_prompts(run) -> list[list[str]]:
    lines = [json.loads(line) for line in (run / "prompts" / "rank0.jsonl").read_text().splitlines()]
    return [r["prompts"] for r in lines if "prompts" in r]


def test_resume_is_bit_identical(tmp_path):
    # 16 prompts, 3 per step: an epoch is 5 steps (one prompt sits it out). Interrupted mid-epoch, at step 3 of 7.
    cfg = tiny_config("train.steps=7", "train.ckpt_every=3", "train.prompts_per_step=3", "train.record_prompts=true")
    straight = train(cfg, tmp_path / "straight")
    interrupted = tmp_path / "interrupted"
    train(cfg, interrupted, max_steps=3)
    assert latest_checkpoint(interrupted).name == "step_00000003"
    train(cfg, interrupted, resume=True)
    batches = recorded_prompts(straight)
    assert recorded_prompts(interrupted) == batches  # no prompt repeated or skipped by the interruption
    first_epoch = [p for b in batches[:5] for p in b]
    assert len(first_epoch) == len(set(first_epoch)) == 15 and set(first_epoch) < set(cfg_prompts(cfg))
    a = load_file(str(latest_checkpoint(straight) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(interrupted) / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    oa = load_file(str(latest_checkpoint(straight) / "optimizer.safetensors"))
    ob = load_file(str(latest_checkpoint(interrupted) / "optimizer.safetensors"))
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 8)) and rows[5]["epoch"] == 1.0
    assert (straight / "config.yaml").is_file()


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


PEAK_PROBE = """
import torch
from amortized3d.training.monitor import peak_memory_mb, reset_peak_memory
cpu = torch.device("cpu")
block = torch.ones(512 * 2**20 // 4)  # 512 MiB, touched
del block
before = peak_memory_mb(cpu)
reset_peak_memory(cpu)
print(before, peak_memory_mb(cpu))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the resident high-water mark can be reset only on Linux")
def test_peak_memory_counts_from_the_reset():
    """A process that trains twice (amortized3d bench) must not report the first run's peak for the second.

    In a fresh process, so that the freed block goes back to the system (a long test session's heap may keep it).
    """
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", PEAK_PROBE], capture_output=True, text=True, check=True)
    before, after = map(float, probe.stdout.split()[-2:])
    assert before - after > 400, (before, after)
