"""Training steps of the recipes at their real size: FLOPs, time and memory by stage, against the method's floor.

    python benchmarks/recipe_step.py cp100k [mg15 df415 at2520 ...] [--steps N] [--dtype fp16|bf16|fp32]
                                     [--progress 0.9] [--out benchmarks/results/recipe_step.json] [--set KEY=VALUE ...]

Each recipe (a corpus name with a recipe in configs/, or a config file) is built as a training run builds it, with
prior.model=random:stable-diffusion-2-1-base for the diffusers recipes: the real architectures with random weights
(amortized3d.priors.pretrained), so no download is needed and every FLOP and byte is the real model's; the images
and gradients are meaningless. The prompts are the corpus's first training prompts (placeholders when its files are
not here: the text encoders always read 77 tokens, so prompts do not change the cost), encoded as the embedding
store would hold them. One step runs under the stage profiler
(amortized3d.training.profiler): the recipe's forward (text encoder, generator, render, vae encode, unet, learned
branch, regularizers, other), the backward of each stage, the optimizer; progress 0.9 by default, where every
regularizer of the recipes is on. With --steps N (default: 0 on the CPU, 5 on a GPU) N more steps run unprofiled
after it and give the step time and TFLOP/s.

The floor is what the method cannot avoid per step: per image, the UNet forward passes it needs (ScaleDreamer
Table 1: SDS and CSD 2, ASD 3; VSD 2 + its LoRA branch 1 + the branch's training forward and backward, counted as 2
forward passes since the frozen weights need no weight gradients; LODS 1 + 1 + 2; Perp-Neg 2 more for the guided
methods), each priced by counting one UNet forward on one image alone, plus the VAE encoder's forward and backward
on one render alone (none with render.latents, whose renders are the latents), plus the generator and the renderer as measured in the step (what is trained). The ratio
measured / floor shows what the step spends beyond that. Memory: on CUDA, the allocator's peak during the
profiled step; on the CPU, the largest resident memory after any op of the step minus the resident memory before
it (the loaded weights), labeled as such. Results are merged into --out (one entry per recipe, device, dtype and overrides)
and printed as a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from amortized3d.builders import build_adapter, build_generator, build_optimizer, build_prior, build_text_encoder, prior_store_suffixes
from amortized3d.config import ConfigError, load_config
from amortized3d.data.corpora import CorpusError, load_corpus
from amortized3d.data.loader import PromptBatch
from amortized3d.priors.pretrained import RANDOM_MODELS
from amortized3d.training.guard import guarded_optimizer_step
from amortized3d.training.profiler import StageProfiler, resident_bytes
from amortized3d.training.step import distillation_step

PROMPTS = [  # used when the recipe's corpus is not on this machine
   "a hamburger", "a frog wearing a sweater", "a red motorcycle", "a wooden chair", "a ceramic teapot",
           "a castle on a hill", "an astronaut riding a horse", "a bowl of ramen"]
# UNet forward passes per image (ScaleDreamer Table 1, LODS Eq. 7): pretrained passes, learned-branch passes without
# gradient, learned-branch training passes (forward + backward = 2 forward passes each)
PASSES = {"sds": (2, 0, 0), "sds-star": (2, 0, 0), "csd": (2, 0, 0), "asd": (3, 0, 0), "vsd": (2, 1, 1), "lods-embedding": (1, 1, 1), "lods-lora": (1, 1, 1)}
PERP_NEG_PASSES = 2  # the two negative view prompts of the guided prediction (not LODS, which has no CFG)
GENERATOR_STAGES = ("generator", "render", "generator backward", "render backward")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unet_passes(cfg) -> float:
    """UNet forward passes per image the method needs (PASSES), learned-branch training counted twice."""
    pretrained, learned, trained = PASSES[cfg.distill.method]
    extra = PERP_NEG_PASSES if getattr(cfg.prior, "perp_neg", False) and not cfg.distill.method.startswith("lods") else 0
    return pretrained + extra + learned + 2 * trained


def floor_prices(prior, cfg, device) -> dict:
    """FLOPs of one UNet forward on one image and of the VAE encoder's forward + backward on one render (0 with
    render.latents: no encoder), each counted alone with FlopCounterMode. A multi-view prior (MVDream) prices one image
    as 1 / V of a V-view object's call (its self-attention runs over all V views at once)."""
    side = prior.resolution // prior.vae_factor
    V = cfg.train.views_per_prompt if prior.multiview else 1
    x = torch.randn(V, prior.channels, side, side, device=device)
    tokens = prior.text_encoder.encode([""] * V).tokens.to(device)
    camera = torch.zeros(V, 16, device=device) if prior.multiview else None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        prior.unet_noise(x, torch.full((V,), 500, device=device), tokens, camera, num_frames=V)
    unet = counter.get_total_flops() / V
    if cfg.render.latents:
        return {"unet_forward_per_image": unet, "vae_encode_forward_backward_per_image": 0}
    render = torch.rand(1, 3, cfg.render.height, cfg.render.width, device=device, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        prior.encode(render).float().sum().backward()
    return {"unet_forward_per_image": unet, "vae_encode_forward_backward_per_image": counter.get_total_flops()}


class Recipe:
    """A recipe's models, optimizers and one fixed batch, built as train() builds them."""

    def __init__(self, recipe: str, overrides: list[str], device: torch.device, prior_cache: dict):
        from accelerate import Accelerator

        cfg = load_config(recipe, overrides=overrides)
        if cfg.prior.kind in RANDOM_MODELS and not any(o.startswith("prior.model=") for o in overrides):
            cfg.prior.model = RANDOM_MODELS[cfg.prior.kind]
        self.cfg, self.device = cfg, device
        key = json.dumps(cfg.prior.model_dump(), sort_keys=True, default=str)
        if key not in prior_cache:  # recipes with the same prior share it
            text_encoder = build_text_encoder(cfg, device)
            prior_cache[key] = (text_encoder, build_prior(cfg, text_encoder, device))
        self.text_encoder, self.prior = prior_cache[key]
        cfg.text.dim = self.text_encoder.dim
        self.generator = build_generator(cfg).to(device)
        self.z_dim = self.generator.z_dim
        self.adapter, self.adapter_optimizer = build_adapter(cfg, self.prior)
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision)
        optimizer = build_optimizer(cfg, self.generator)
        self.wrapped, self.optimizer = self.accelerator.prepare(self.generator, optimizer)
        self.suffixes = prior_store_suffixes(cfg)
        try:
            prompts = load_corpus(cfg.corpus.name, cfg.corpus.dir).train
        except CorpusError:  # the corpus files are not on this machine: any prompts cost the same
            prompts = PROMPTS
        prompts = (prompts * cfg.train.prompts_per_step)[: cfg.train.prompts_per_step]
        prior_encoder = getattr(self.prior, "text_encoder", None) if self.suffixes else None
        self.batch = PromptBatch.encode(prompts, self.text_encoder, prior_encoder, self.suffixes)
        if getattr(self.prior, "text_encoder", None) is not None:
            self.prior.text_encoder.encode([""])  # the empty prompt, encoded once per run and cached: not a cost of a step

    def step(self, seed: int, progress: float, profiler: StageProfiler | None = None) -> float:
        """One optimizer step (forward, backward, guarded update); -> the loss."""
        cfg = self.cfg
        rng = torch.Generator().manual_seed(seed)
        with self.accelerator.autocast():
            result = distillation_step(cfg, self.wrapped, self.prior, self.batch, progress, rng, self.device, self.adapter,
                                       z_dim=self.z_dim, prior_suffixes=self.suffixes)
        self.accelerator.backward(result.loss)
        optimizer_step = lambda: guarded_optimizer_step(self.accelerator, self.wrapped, self.optimizer, self.adapter,  # noqa: E731
                                                         self.adapter_optimizer, True)
        (profiler.wrap(optimizer_step, "optimizer") if profiler else optimizer_step)()
        return result.loss.item()

    def profiled_step(self, seed: int, progress: float) -> StageProfiler:
        """step() under a StageProfiler, with the stages attached to the models for this step only."""
        profiler = StageProfiler(self.device)
        prior = self.prior
        handles = profiler.attach_stage(self.generator, "generator")

        def wrap_representation(_module, _args, representation):
            representation.render = profiler.wrap(representation.render, "render")
            representation.regularizers = profiler.wrap(representation.regularizers, "regularizers")

        handles.append(self.generator.register_forward_hook(wrap_representation))
        if hasattr(prior, "unet"):
            handles += profiler.attach_stage(prior.unet, "unet", when=lambda: not torch.is_grad_enabled())
            handles += profiler.attach_stage(prior.unet, "learned branch", when=torch.is_grad_enabled)
        if getattr(prior, "text_encoder", None) is not None:
            handles += profiler.attach_stage(prior.text_encoder.model, "text encoder")
        prior.encode = profiler.wrap(type(prior).encode.__get__(prior), "vae encode")
        try:
            with profiler:
                self.step(seed, progress, profiler)
        finally:
            del prior.encode  # back to the class's method
            for handle in handles:
                handle.remove()
        return profiler


def measure(recipe: Recipe, steps: int, progress: float) -> dict:
    cfg, device = recipe.cfg, recipe.device
    if device.type == "cuda":  # a warm-up step (kernels, allocator), then the profiled one
        recipe.step(0, progress)
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    resident_before = resident_bytes()
    sync(device)
    start = time.perf_counter()
    profiler = recipe.profiled_step(1, progress)
    sync(device)
    profiled_seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else max(r["peak_bytes"] for r in profiler.stats.values()) - resident_before
    step_seconds = None
    if steps:
        sync(device)
        start = time.perf_counter()
        for i in range(steps):
            recipe.step(2 + i, progress)
        sync(device)
        step_seconds = (time.perf_counter() - start) / steps
    stages = {name: {"gflop": row["flops"] / 1e9, "seconds": row["seconds"], "ops": row["ops"],
                     "peak_gb": (row["peak_bytes"] - (0 if device.type == "cuda" else resident_before)) / 2**30}
              for name, row in profiler.table().items()}
    total = profiler.total_flops()
    images = cfg.train.prompts_per_step * cfg.train.views_per_prompt
    row = {"recipe": cfg.corpus.name, "device": device_name(device), "prior": cfg.prior.kind if cfg.prior.analytic else cfg.prior.model,
           "prior_dtype": str(getattr(recipe.prior, "dtype", "n/a")).removeprefix("torch."), "method": cfg.distill.method,
           "generator": cfg.generator.kind, "generator_parameters": sum(p.numel() for p in recipe.generator.parameters()),
           "images_per_step": images, "render": render_label(cfg, recipe.prior),
           "prior_resolution": getattr(recipe.prior, "resolution", None), "progress": progress, "total_tflop": total / 1e12,
           "profiled_step_seconds": profiled_seconds, "step_seconds": step_seconds,
           "achieved_tflop_per_s": total / 1e12 / step_seconds if step_seconds else None,
           "peak_memory_gb": peak / 2**30,
           "peak_memory_kind": "CUDA allocator peak" if device.type == "cuda" else "resident memory above the loaded weights (CPU)",
           "stages": stages}
    if hasattr(recipe.prior, "unet"):
        prices = floor_prices(recipe.prior, cfg, device)
        passes = unet_passes(cfg)
        generator_flops = sum(profiler.stats.get(name, {}).get("flops", 0) for name in GENERATOR_STAGES)
        floor = images * (passes * prices["unet_forward_per_image"] + prices["vae_encode_forward_backward_per_image"]) + generator_flops
        row.update(floor_tflop=floor / 1e12, ratio=total / floor, unet_passes_per_image=passes,
                   floor_parts={**{k: v / 1e9 for k, v in prices.items()}, "generator_and_render_gflop": generator_flops / 1e9})
    return row


def render_label(cfg, prior) -> str:
    """The training renders' size, and what they hold with render.latents ("64x64 latents")."""
    if cfg.render.latents:
        C, h, w = prior.space_shape(cfg.render.height, cfg.render.width)
        return f"{h}x{w} latents ({C} channels)"
    return f"{cfg.render.height}x{cfg.render.width}"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def print_table(rows: list[dict]) -> None:
    for row in rows:
        print(f"\n{row['recipe']}: {row['generator']} ({row['generator_parameters'] / 1e6:.1f} M), {row['method']}, {row['prior']} "
              f"({row['prior_dtype']}), {row['images_per_step']} image(s) of {row['render']}, on {row['device']}")
        print(f"{'stage':<28} {'GFLOP':>10} {'seconds':>9} {'peak GB':>8}")
        for name, s in row["stages"].items():
            print(f"{name:<28} {s['gflop']:>10.2f} {s['seconds']:>9.3f} {s['peak_gb']:>8.2f}")
        line = f"total {row['total_tflop']:.3f} TFLOP"
        if "floor_tflop" in row:
            line += f", floor {row['floor_tflop']:.3f} TFLOP ({row['unet_passes_per_image']:g} UNet passes per image), ratio {row['ratio']:.3f}"
        print(line)
        print(f"profiled step {row['profiled_step_seconds']:.1f} s" + (f", step {row['step_seconds']:.3f} s, "
              f"{row['achieved_tflop_per_s']:.1f} TFLOP/s" if row["step_seconds"] else "")
              + f"; peak memory {row['peak_memory_gb']:.2f} GB ({row['peak_memory_kind']})")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="+", help="corpus names with a recipe (mg15, df415, at2520, cp100k, ...)")
    parser.add_argument("--steps", type=int, default=None, help="unprofiled steps to time (default 0 on CPU, 5 on GPU)")
    parser.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto", help="prior weights (auto: fp16 on GPU)")
    parser.add_argument("--progress", type=float, default=0.9, help="training progress of the step (regularizer schedules)")
    parser.add_argument("--out", default="benchmarks/results/recipe_step.json")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = args.steps if args.steps is not None else (5 if device.type == "cuda" else 0)
    overrides = ["train.wandb=disabled", *args.overrides] + ([f"prior.dtype={args.dtype}"] if args.dtype != "auto" else [])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    merged = json.loads(out.read_text()) if out.is_file() else {}
    rows, prior_cache = [], {}
    for name in args.recipes:
        try:
            recipe = Recipe(name, overrides, device, prior_cache)
        except ConfigError as err:
            print(f"\n{name}: not run: {err}")
            row = {"recipe": name, "device": device_name(device), "not_run": str(err)}
        else:
            row = measure(recipe, steps, args.progress)
            print_table([row])
            del recipe
        row["overrides"] = args.overrides
        rows.append(row)
        merged[" | ".join([row["recipe"], row["device"], row.get("prior_dtype", ""), *args.overrides])] = row
        out.write_text(json.dumps(merged, indent=1))  # after every recipe: a run stopped part-way keeps what finished
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()
