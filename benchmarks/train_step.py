"""Training-step throughput by stage, on whatever device is available.

    python benchmarks/train_step.py [--corpus shapeworld-16] [--repeats 5] [--out benchmarks/results/train_step.json] [overrides]

Prints a table (seconds per step for: text encoding + generator + render, prior
call, backward, whole step) and writes it as JSON together with the device and config.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from amortized3d.builders import build_generator, build_prior, build_text_encoder
from amortized3d.config import load_config
from amortized3d.data.corpora import load_corpus
from amortized3d.data.loader import PromptBatch
from amortized3d.training.step import distillation_step


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", default="shapeworld-16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.corpus, overrides=["train.wandb=disabled", *args.overrides])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = build_generator(cfg).to(device)
    encoder, prior = build_text_encoder(cfg), build_prior(cfg)
    prompts = load_corpus(cfg.corpus.name, cfg.corpus.dir).train[: cfg.train.prompts_per_step]
    times = []
    for i in range(args.repeats + 1):
        rng = torch.Generator().manual_seed(i)
        sync(device)
        t0 = time.perf_counter()
        result = distillation_step(cfg, generator, prior, PromptBatch.encode(prompts, encoder), 0.3, rng, device)
        sync(device)
        t1 = time.perf_counter()
        result.loss.backward()
        generator.zero_grad(set_to_none=True)
        sync(device)
        t2 = time.perf_counter()
        if i > 0:  # the first step warms up
            times.append((t1 - t0, t2 - t1))
    forward = sum(t[0] for t in times) / len(times)
    backward = sum(t[1] for t in times) / len(times)
    images = cfg.train.prompts_per_step * cfg.train.views_per_prompt
    row = {
        "corpus": cfg.corpus.name, "device": str(device), "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "images_per_step": images,
        "resolution": f"{cfg.render.height}x{cfg.render.width}", "samples_per_ray": cfg.render.n_proposal + cfg.render.n_importance,
        "forward_s": round(forward, 4), "backward_s": round(backward, 4), "step_s": round(forward + backward, 4),
        "images_per_s": round(images / (forward + backward), 2),
    }
    width = max(len(k) for k in row)
    for k, v in row.items():
        print(f"{k:<{width}}  {v}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
