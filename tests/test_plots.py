"""Training curves: one PNG per panel with logged keys, lines drawn where the values are, evaluation points read."""

import json

import numpy as np
from PIL import Image

from amortized3d.cli import main
from amortized3d.evaluation.plots import plot_run
from tests.fixtures import tiny_config


def test_panels_are_drawn_from_the_metrics(tmp_path):
    rows = [{"step": s, "loss": 1000.0 / s, "loss_sd": 900.0 / s, "grad_sd_norm": float(s), "t_min": 500.0 - s, "t_max": 900.0,
             "steps_per_s": 2.0, "peak_memory_mb": 900.0} for s in range(1, 201)]
    rows[50]["loss"] = float("nan")  # a skipped step
    text = "\n".join(json.dumps(r) for r in rows) + "\n" + '{"step": 201, "loss": 1'  # and a line cut short
    (tmp_path / "metrics.jsonl").write_text(text)
    (tmp_path / "eval_test.json").write_text(json.dumps({"summary": {"step": 200, "r_at_1": 0.9, "similarity": 0.95}}))
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["evaluation.png", "gradient.png", "losses.png", "schedule.png", "throughput.png"]
    image = np.asarray(Image.open(tmp_path / "plots" / "losses.png").convert("RGB"))
    assert image.shape[1] == 2 * 420 and image.shape[0] == 320  # two losses, 4.2 x 3.2 inches at 100 dpi
    blue = (image[..., 2] > 150) & (image[..., 0] < 100)  # matplotlib's first line color, #1f77b4
    assert blue[:, :420].sum() > 200 and blue[:, 420:].sum() > 200  # a line in each subplot


def test_plot_command_names_a_missing_run(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err


def test_periodic_oracle_evaluation_gives_points_over_steps(tmp_path):
    from amortized3d.training.train import train

    from amortized3d.evaluation.oracle import eval_every_hook

    cfg = tiny_config("train.steps=4", "train.ckpt_every=2", "train.eval_every=2", "eval.n_views=2")
    run = train(cfg, tmp_path / "run", hooks=eval_every_hook(cfg))
    reports = sorted((run / "evals").glob("step_*.json"))
    assert [p.name for p in reports] == ["step_00000002.json", "step_00000004.json"]
    assert [json.loads(p.read_text())["summary"]["step"] for p in reports] == [2, 4]
    from amortized3d.evaluation.plots import evaluation_points

    points = evaluation_points(run)
    assert [step for step, _ in points["oracle test r_at_1"]] == [2, 4]
    assert run / "plots" / "evaluation.png" in plot_run(run)


def test_eval_every_must_follow_checkpoints():
    import pytest

    from amortized3d.config import ConfigError

    with pytest.raises(ConfigError, match="multiple of train.ckpt_every"):
        tiny_config("train.ckpt_every=2", "train.eval_every=3")
