"""Checkpoints and run folders under damage and odd states: every case ends in a CheckpointError naming the folder and
the way out, or recovers exactly; nothing non-finite is ever written or called good."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from amortized3d.builders import load_run
from amortized3d.training import train as train_module
from amortized3d.training.checkpoint import CheckpointError, latest_checkpoint, save_checkpoint, step_folders
from amortized3d.training.train import TrainingDiverged, train
from tests.fixtures import tiny_config


def tiny_model():
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.Adam(model.parameters())


def test_pruning_orders_steps_by_number_past_eight_digits(tmp_path):
    """Folder names are step_%08d: step_100000000 sorts before step_99999999 as text, but is newer."""
    model, optimizer = tiny_model()
    for step in (99_999_998, 99_999_999, 100_000_000):
        save_checkpoint(tmp_path, step, model, optimizer, {}, keep=2)
    assert [p.name for p in step_folders(tmp_path)] == ["step_99999999", "step_100000000"]
    assert latest_checkpoint(tmp_path).name == "step_100000000"


def test_latest_may_only_name_a_step_folder_of_this_run(tmp_path):
    model, optimizer = tiny_model()
    other = tmp_path / "other_run"
    save_checkpoint(other, 9, model, optimizer, {})
    run = tmp_path / "run"
    save_checkpoint(run, 3, model, optimizer, {})
    pointer = run / "checkpoints" / "latest"
    for target in ["../../other_run/checkpoints/step_00000009", str(other / "checkpoints" / "step_00000009"), "step_7", "", "\udcff"]:
        pointer.write_text(target, errors="surrogateescape")
        assert latest_checkpoint(run) == run / "checkpoints" / "step_00000003"  # the newest step folder of this run
    pointer.unlink()
    assert latest_checkpoint(run) == run / "checkpoints" / "step_00000003"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("ckpt") / "run"
    train(tiny_config("train.steps=4", "train.ckpt_every=2", "train.keep_checkpoints=2"), run)
    return run


def damaged_copy(trained_run, tmp_path, damage):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    damage(run / "checkpoints" / "step_00000004")
    return run


def flip_byte(path, offset_from_end=100):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGES = {
    "bit flip in the weights": lambda f: flip_byte(f / "model.safetensors"),
    "truncated weights": lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:200]),
    "state.json not JSON": lambda f: (f / "state.json").write_text("{step: 4"),
    "state.json not an object": lambda f: (f / "state.json").write_text("[4]"),
    "weights missing": lambda f: (f / "model.safetensors").unlink(),
    "bit flip in the optimizer": lambda f: flip_byte(f / "optimizer.safetensors"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoints_are_refused_with_the_way_back(trained_run, tmp_path, damage):
    run = damaged_copy(trained_run, tmp_path, DAMAGES[damage])
    folder = run / "checkpoints" / "step_00000004"
    with pytest.raises(CheckpointError) as err:
        train(tiny_config("train.steps=6", "train.ckpt_every=2"), run, resume=True)
    message = str(err.value)
    assert str(folder) in message and "step_00000002" in message and "mv " in message
    if damage != "bit flip in the optimizer":  # generate and evaluate read only the weights
        with pytest.raises(CheckpointError):
            load_run(run)
    # The recovery the message gives: move the damaged folder away, then --resume continues from step 2.
    os.rename(folder, run / "damaged_step_00000004")
    train(tiny_config("train.steps=6", "train.ckpt_every=2"), run, resume=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # rows 3 and 4 of the first run are replaced, not repeated


def test_resume_with_another_architecture_is_refused(trained_run, tmp_path):
    run = damaged_copy(trained_run, tmp_path, lambda folder: None)
    with pytest.raises(CheckpointError) as err:
        train(tiny_config("train.steps=6", "generator.mlp_hidden=16"), run, resume=True)
    assert "does not fit" in str(err.value) and "config.yaml" in str(err.value)
    with pytest.raises(CheckpointError, match="generator.spectral_norm"):  # a run from before spectral norm became automatic
        train(tiny_config("train.steps=6", "generator.spectral_norm=true"), run, resume=True)


def test_a_run_folder_with_checkpoints_is_not_trained_over(trained_run, tmp_path):
    run = damaged_copy(trained_run, tmp_path, lambda folder: None)
    before = (run / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="--resume"):
        train(tiny_config("train.steps=4"), run)
    assert (run / "metrics.jsonl").read_text() == before
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        train(tiny_config("train.steps=1"), not_a_folder)


def test_resume_after_a_kill_keeps_one_metrics_row_per_step_and_redoes_the_final_views(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config("train.steps=5", "train.ckpt_every=2", "train.keep_checkpoints=5", "train.val_every=5")
    train(cfg, run, max_steps=3)  # checkpoints at 2 and 3, rows 1-3
    # A kill after step 3 was logged but before its checkpoint: drop that checkpoint, leave a half-written row.
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_00000003")
    (run / "checkpoints" / "latest").write_text("step_00000002")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    train(cfg, run, resume=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    views = run / "validation"
    assert (views / "step_00000005.png").is_file() and (views / "step_00000005.mp4").is_file()
    # Killed while writing the final views: a resumed run writes them, and leaves no temporary files.
    for path in views.iterdir():
        path.unlink()
    train(cfg, run, resume=True)
    assert sorted(p.name for p in views.iterdir()) == ["step_00000005.mp4", "step_00000005.png", "step_00000005_denoised.png"]


def test_non_finite_parameters_are_never_checkpointed(tmp_path):
    cfg = tiny_config("train.steps=4", "train.ckpt_every=1")
    train(cfg, tmp_path / "run", max_steps=1)
    cfg.optim.lr_geometry = float("nan")  # past validation (which refuses it), as a broken optimizer would do
    with pytest.raises(TrainingDiverged) as err:
        train(cfg, tmp_path / "run", resume=True)
    assert "parameters are not finite after step 2" in str(err.value) and "step_00000001" in str(err.value)
    assert latest_checkpoint(tmp_path / "run").name == "step_00000001"
    weights = load_file(str(latest_checkpoint(tmp_path / "run") / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


class CPUScalerAccelerator(train_module.Accelerator):
    """Accelerate's fp16 path with a real torch.amp.GradScaler, on CPU (Accelerate creates the scaler only on GPUs)."""

    init_scale = 2.0**16

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaler = torch.amp.GradScaler("cpu", init_scale=self.init_scale, growth_interval=10**6)


def test_gradient_scaler_sees_overflows_and_lowers_its_scale(tmp_path, monkeypatch):
    """GradScaler (torch docs): a step whose scaled gradients hold inf/NaN is skipped and the scale multiplied by
    backoff_factor 0.5. A first scale near float32's limit overflows, so the scaler must see those steps, halve its
    scale each time, and then train; these skips are not divergence (max_bad_steps is 2 here)."""
    class HugeScale(CPUScalerAccelerator):
        init_scale = 2.0**126

    monkeypatch.setattr(train_module, "Accelerator", HugeScale)
    run = train(tiny_config("train.steps=30", "train.max_bad_steps=2", "train.ckpt_every=30"), tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = rows[-1]["skipped_steps"]
    assert 2 < skipped < 30
    assert rows[-1]["grad_scale"] == 2.0 ** (126 - skipped)  # halved once per skipped step, never grown
    counts = [0] + [r["skipped_steps"] for r in rows]  # log_every 1: one row per step
    longest, run_length = 0, 0
    for before, after in zip(counts, counts[1:]):
        run_length = run_length + 1 if after > before else 0
        longest = max(longest, run_length)
    assert longest > 2  # more consecutive overflow skips than max_bad_steps, and the run went on
    weights = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_gradient_scaler_without_overflow_trains_exactly_like_no_scaler(tmp_path, monkeypatch):
    """Scaling by a power of two and unscaling is exact in floating point, so a scaler that never overflows must give
    bit-identical weights to a run without one."""
    cfg = ("train.steps=4", "train.ckpt_every=4")
    plain = train(tiny_config(*cfg), tmp_path / "plain")
    monkeypatch.setattr(train_module, "Accelerator", CPUScalerAccelerator)
    scaled = train(tiny_config(*cfg), tmp_path / "scaled")
    rows = [json.loads(line) for line in (scaled / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_steps"] == 0 and rows[-1]["grad_scale"] == 2.0**16
    a, b = (load_file(str(latest_checkpoint(r) / "model.safetensors")) for r in (plain, scaled))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert math.isfinite(rows[-1]["loss"])


class InfiniteGradient(torch.autograd.Function):
    """Identity forward (a finite loss), infinite backward: gradients that are not finite even unscaled."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class InfiniteGradientPrior:
    def __init__(self, prior):
        self.prior = prior
        self.alphas_cumprod, self.perp_neg, self.text_encoder = prior.alphas_cumprod, prior.perp_neg, prior.text_encoder
        self.multiview = prior.multiview

    def encode(self, x, generator=None):
        return InfiniteGradient.apply(self.prior.encode(x, generator))

    def predict_noise(self, *args):
        return self.prior.predict_noise(*args)


@pytest.mark.parametrize("scaler", [False, True])
def test_gradients_that_are_not_finite_unscaled_stop_the_run(tmp_path, monkeypatch, scaler):
    """Finite losses, infinite gradients: without a scaler the gradient check skips the steps; with one, the scaler's
    overflow at a scale of 1 or less is divergence, not calibration. Either way max_bad_steps ends the run."""
    class ScaleOne(CPUScalerAccelerator):
        init_scale = 1.0

    original = train_module.build_prior
    monkeypatch.setattr(train_module, "build_prior", lambda cfg, *args, **kwargs: InfiniteGradientPrior(original(cfg)))
    if scaler:
        monkeypatch.setattr(train_module, "Accelerator", ScaleOne)
    with pytest.raises(TrainingDiverged, match="3 consecutive steps had non-finite loss or gradients"):
        train(tiny_config("train.steps=10", "train.max_bad_steps=3"), tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run") is None


def test_a_resumed_fp16_run_continues_with_its_gradient_scale(tmp_path, monkeypatch):
    """The scaler's state is part of the checkpoint: an interrupted and resumed run equals the uninterrupted one."""
    class HugeScale(CPUScalerAccelerator):
        init_scale = 2.0**126

    monkeypatch.setattr(train_module, "Accelerator", HugeScale)
    cfg = ("train.steps=12", "train.ckpt_every=6", "train.keep_checkpoints=3")
    straight = train(tiny_config(*cfg), tmp_path / "straight")
    split = tmp_path / "split"
    train(tiny_config(*cfg), split, max_steps=6)
    train(tiny_config(*cfg), split, resume=True)
    rows = {name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for name, run in
            (("straight", straight), ("split", split))}
    assert [r["grad_scale"] for r in rows["straight"]] == [r["grad_scale"] for r in rows["split"]]
    assert rows["straight"][5]["grad_scale"] < 2.0**126  # the scale had moved by the checkpoint
    a, b = (load_file(str(latest_checkpoint(r) / "model.safetensors")) for r in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)
