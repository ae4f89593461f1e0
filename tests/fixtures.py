"""Helpers and settings that several test modules share (pytest fixtures are in conftest.py).

REPO                          the checkout's root folder
TINY, tiny_config             tiny ShapeWorld training settings (analytic prior), and a config with them
SD_TINY                       tiny settings for training with a diffusers prior (the tiny SD / IF folders)
NaNAfter                      a prior wrapper whose noise predictions turn NaN after some calls
scaled_linear_alphas_cumprod  Stable Diffusion's noise schedule, written out by hand
cosine_alphas_cumprod         DeepFloyd IF's noise schedule, written out by hand
SphereField                   an analytic single-prompt sphere field
free_port                     a free TCP port on localhost, for multi-process launches
load_benchmark                a script of benchmarks/ imported as a module
hide_viewer                   make an installed 3D model-viewer invisible to the gallery
evaluate_and_generate         the oracle report and generate's first result for a trained one-prompt run (CLI)
"""

from __future__ import annotations

import math
import socket
from pathlib import Path

import torch

from amortized3d.config import load_config
from amortized3d.evaluation import gallery as gallery_module

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "train.wandb=disabled", "render.height=16", "render.width=16", "render.n_proposal=16", "render.n_importance=8",
    "prior.n_proposal=16", "prior.n_importance=8", "generator.n_levels=4", "generator.log2_hashmap_size=12",
    "generator.base_resolution=4", "generator.per_level_scale=1.5", "text.dim=64", "train.prompts_per_step=2",
    "eval.resolution=16", "eval.n_views=4", "eval.iou_resolution=16", "render.eikonal_points=256", "train.log_every=1",
    "train.val_every=1000",
]

SD_TINY = [
    "train.wandb=disabled", "render.height=16", "render.width=16", "render.n_proposal=16", "render.n_importance=8",
    "prior.resolution=32", "generator.n_levels=4", "generator.log2_hashmap_size=12", "generator.base_resolution=4",
    "generator.per_level_scale=1.5", "eval.resolution=16", "eval.n_views=4", "render.eikonal_points=256",
    "train.val_every=1000", "train.ckpt_every=1000", "train.steps=2", "train.log_every=1",
]


def tiny_config(*extra):
    return load_config("shapeworld-16", overrides=[*TINY, *extra])


class NaNAfter:
    """Wraps a prior; its noise predictions turn NaN after ``good_calls`` calls."""

    def __init__(self, prior, good_calls):
        self.prior, self.good_calls, self.calls = prior, good_calls, 0
        self.alphas_cumprod, self.perp_neg, self.text_encoder = prior.alphas_cumprod, prior.perp_neg, prior.text_encoder
        self.multiview = prior.multiview

    def encode(self, x, generator=None):
        return self.prior.encode(x, generator)

    def decode(self, x):
        return self.prior.decode(x)

    def space_shape(self, height, width):
        return self.prior.space_shape(height, width)

    def predict_noise(self, *args):
        self.calls += 1
        eps = self.prior.predict_noise(*args)
        return eps if self.calls <= self.good_calls else eps * float("nan")


def scaled_linear_alphas_cumprod() -> torch.Tensor:
    """Stable Diffusion's schedule by hand: sqrt(beta) linear from sqrt(0.00085) to sqrt(0.012) over 1000 steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


def cosine_alphas_cumprod(T: int = 1000) -> torch.Tensor:
    """IF's schedule by hand: abar(s) = cos((s + 0.008) / 1.008 * pi / 2)^2, beta_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999)."""
    def abar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).float()


class SphereField:
    """Single-prompt sphere: sdf = |p - c| - r, albedo rgb = (p + 1) / 2, constant gray background."""

    def __init__(self, radius: float = 0.5, center=(0.0, 0.0, 0.0)):
        self.radius = radius
        self.center = torch.tensor(center, dtype=torch.float32)

    def sdf(self, points):  # [P, N, 3] -> [P, N]
        return (points - self.center).norm(dim=-1) - self.radius

    def sdf_and_color(self, points):  # -> [P, N], [P, N, 3]
        return self.sdf(points), ((points + 1.0) / 2.0).clamp(0.0, 1.0)

    def background(self, directions):  # [P, R, 3] -> [P, R, 3]
        return torch.full_like(directions, 0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hide_viewer(monkeypatch, empty_dir) -> None:
    """Make an installed model-viewer invisible: no $AMORTIZED3D_MODEL_VIEWER, no checkout node_modules, no global npm root."""
    monkeypatch.delenv(gallery_module.VIEWER_ENV, raising=False)
    monkeypatch.setattr(gallery_module, "CHECKOUT", empty_dir)
    monkeypatch.setattr(gallery_module, "npm_global_root", lambda: None)


def load_benchmark(name: str):
    """benchmarks/NAME.py imported as a module (benchmarks/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evaluate_and_generate(run, prompt: str, out, capsys) -> tuple[dict, dict]:
    """`amortized3d evaluate` (oracle) and a small `generate` of ``prompt`` into ``out`` on the run folder ``run``,
    through the CLI; checks both exit 0 and the report is the run's one prompt. -> (report summary, generate's result)."""
    import json

    from amortized3d.cli import main

    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["corpus"] == "prompt:" + prompt and report["n_prompts"] == 1 and 0 <= report["iou"] <= 1
    assert main(["generate", prompt, "--checkpoint", str(run), "--out", str(out), "--mesh-resolution", "24", "--frames", "2",
                 "--image-size", "16"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["prompt"] == prompt
    return report, result
