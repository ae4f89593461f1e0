"""The checks that need a GPU, in one command (6 minutes on one H200 before the IF
stage I step and the real-size generate runs were added), with a JSON and a Markdown table.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check] [--recipes mg15 df415 at2520 cp100k]
    python benchmarks/gpu_check.py --dry-run        # the parts a CPU can run, at small sizes (about 2 minutes)
    python benchmarks/gpu_check.py --only prior_precision recipe_steps [--dtypes fp16 bf16]

Checks, in this order, each a row with its status (ok / failed / skipped and why), seconds and results:
  prior_precision    the random-weight SD 2.1-base UNet's noise prediction and the VAE's latents in fp16 and bf16
                     against fp32 on the same inputs (relative L2 error); with random weights, so only a check that
                     the half-precision paths run and stay close; the dry run: bf16 on the CPU at a 64 x 64 render
  nerfacc_sampling   nerfacc's CUDA importance sampling inverts the CDF (CDF(t_j) = u_j, in float64), beside its
                     distance from the renderer's pure-torch sampler on the same edges and weights
                     (amortized3d.rendering.volume) and the time nerfacc takes to build or load its kernels; CUDA only
  recipe_steps       benchmarks/recipe_step.py for each recipe in each of --dtypes (fp16, bf16), 3 timed steps each:
                     FLOPs, floor, step time, achieved TFLOP/s, peak memory, written to OUT-recipe_step.json recipe
                     by recipe; then mg15 and cp100k with direct latent rendering (render.latents: no VAE encoder) and
                     mg15 against DeepFloyd IF stage I XL (random:deepfloyd-if-I-XL-v1.0), in the first of --dtypes;
                     the dry run: mg15 in fp32 with a 64 x 64 prior input
  generate_latency   train a ShapeWorld run briefly, then benchmarks/generate.py on it (seconds per prompt by stage),
                     and on the mg15, df415 and cp100k generators at their real size with random weights
  gsplat_rasterizer  benchmarks/rasterizer.py at 1k, 10k and 100k Gaussians with both backends: images/s and memory,
                     and the PyTorch rasterizer against gsplat (image and gradient differences, with tolerances);
                     the dry run: the PyTorch backend at 1k on the CPU
  deepspeed_zero2    the trainer under `accelerate launch --config_file launch/deepspeed_zero2.yaml` on one GPU:
                     15 steps with checkpoints (twice), and resumed from its step-10 checkpoint; the final weights'
                     differences are reported (exactness is tested on the CPU); skipped in the dry run
A failed check does not stop the others; OUT.json and OUT.md are rewritten after every check, so a run stopped
part-way keeps what finished. The exit status is 1 when any failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = ["mg15", "df415", "at2520", "cp100k", "dl17k"]


class Skip(Exception):
    """A check that cannot run here; the message says why."""


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def cdf_at(edges: torch.Tensor, weights: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The piecewise-linear CDF of the pdf with mass weights_k on [edges_k, edges_k+1], at t, in float64.

    edges [N, B + 1], weights [N, B], t [N, S] -> [N, S]."""
    edges, weights, t = edges.double(), weights.double(), t.double()
    cdf = torch.cat([torch.zeros_like(weights[:, :1]), torch.cumsum(weights, -1)], -1) / weights.sum(-1, keepdim=True)
    k = (torch.searchsorted(edges, t, right=True) - 1).clamp(0, weights.shape[-1] - 1)
    lo, hi = edges.gather(-1, k), edges.gather(-1, k + 1)
    return cdf.gather(-1, k) + (cdf.gather(-1, k + 1) - cdf.gather(-1, k)) * ((t - lo) / (hi - lo)).clamp(0, 1)


def nerfacc_sampling(device: torch.device, dry_run: bool, work: Path) -> dict:
    """Both samplers invert the same CDF at u_j = (j + 0.5) / n: the check is that nerfacc's samples satisfy
    CDF(t_j) = u_j (CDF in float64) as closely as the renderer's float32 sampler does, not that the two agree sample
    by sample: where a bin holds almost no mass, float32 rounding of u moves t far within the bin in either sampler,
    and where a bin is very narrow, rounding of t moves the CDF."""
    if device.type != "cuda":
        raise Skip("nerfacc's importance sampling is compiled for CUDA only")
    from amortized3d.rendering.volume import (PDF_FLOOR, _sample_from_pdf_nerfacc, nerfacc_cuda_available, sample_from_pdf,
                                              uniform_edges)

    start = time.perf_counter()
    if not nerfacc_cuda_available():
        raise RuntimeError("nerfacc's CUDA kernels could not be built or loaded (see the warning above)")
    build_seconds = time.perf_counter() - start
    g = torch.Generator().manual_seed(0)
    near, far = torch.zeros(4096), torch.full((4096,), 4.0)
    edges = uniform_edges(near, far, 64, torch.rand(4096, 63, generator=g))  # the renderer's jittered proposal edges
    weights = torch.rand(4096, 64, generator=g) ** 4 + PDF_FLOOR  # peaked, with the renderer's floor
    n = 32
    u = ((torch.arange(n, dtype=torch.float64) + 0.5) / n).expand(4096, n)
    torch_t = sample_from_pdf(edges, weights, n)
    cuda_t = _sample_from_pdf_nerfacc(edges.to(device), weights.to(device), n, stratified=False).cpu()
    cuda_error = float((cdf_at(edges, weights, cuda_t) - u).abs().max())
    torch_error = float((cdf_at(edges, weights, torch_t) - u).abs().max())
    return {"ok": cuda_error <= 2 * torch_error + 1e-6, "max_cdf_error_nerfacc": cuda_error, "max_cdf_error_torch": torch_error,
            "max_abs_t_difference": float((cuda_t - torch_t).abs().max()),
            "median_abs_t_difference": float((cuda_t - torch_t).abs().median()), "rays": 4096, "samples": n,
            "kernel_build_or_load_seconds": build_seconds}


def prior_precision(device: torch.device, dry_run: bool, work: Path) -> dict:
    from amortized3d.config import load_config
    from amortized3d.priors.diffusers_prior import DiffusionPrior
    from amortized3d.priors.pretrained import RANDOM_MODELS

    resolution = 64 if dry_run else 512
    cfg = load_config("mg15", overrides=[f"prior.model={RANDOM_MODELS['stable_diffusion']}", f"prior.resolution={resolution}", "prior.dtype=fp32"])
    prior = DiffusionPrior.from_config(cfg, device=device)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 64, 64, generator=g).to(device)
    side = resolution // prior.vae_factor
    noisy = torch.randn(2, 4, side, side, generator=g).to(device)
    steps = torch.tensor([200, 700], device=device)
    tokens = prior.text_encoder.encode(["a hamburger", ""]).tokens.to(device)
    with torch.no_grad():
        latents32 = prior.vae.encode(2 * images - 1).latent_dist.mean
        eps32 = prior.unet_noise(noisy, steps, tokens)
    result = {"resolution": resolution}
    dtypes = ["bf16"] if device.type == "cpu" else ["fp16", "bf16"]
    for name in dtypes:
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[name]
        prior.unet.to(dtype)
        prior.vae.to(dtype)
        prior.dtype = dtype
        with torch.no_grad():
            latents = prior.vae.encode((2 * images - 1).to(dtype)).latent_dist.mean
            eps = prior.unet_noise(noisy, steps, tokens)
        result[f"unet_{name}_relative_error"] = relative_error(eps, eps32)
        result[f"vae_{name}_relative_error"] = relative_error(latents, latents32)
    result["ok"] = all(v < 0.05 for k, v in result.items() if k.endswith("relative_error"))
    return result


def recipe_steps(device: torch.device, dry_run: bool, out: Path, recipes: list[str], dtypes: list[str]) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import recipe_step

    from amortized3d.priors.pretrained import RANDOM_MODELS

    rows = []
    if dry_run:
        rows += recipe_step.main(["mg15", "--steps", "0", "--dtype", "fp32", "--set", "prior.resolution=64", "--out", str(out)])
    else:
        for dtype in dtypes:
            rows += recipe_step.main([*recipes, "--steps", "3", "--dtype", dtype, "--out", str(out)])
        # the SD recipes with direct latent rendering: the step without the VAE encoder (its GPU time and memory)
        rows += recipe_step.main(["mg15", "cp100k", "--steps", "3", "--dtype", dtypes[0], "--set", "render.latents=true",
                                  "--set", "render.random_background_prob=0", "--out", str(out)])
        # MG15's recipe against DeepFloyd IF stage I XL (4.3 B UNet, 4.8 B T5 encoder) in the first dtype, last: its
        # random weights take minutes to build on the CPU before they move to the GPU
        rows += recipe_step.main(["mg15", "--steps", "3", "--dtype", dtypes[0], "--set", "prior.kind=deepfloyd_if",
                                  "--set", f"prior.model={RANDOM_MODELS['deepfloyd_if']}", "--out", str(out)])
    summary = [{k: row.get(k) for k in ("recipe", "render", "prior_dtype", "total_tflop", "floor_tflop", "ratio", "step_seconds",
                                        "achieved_tflop_per_s", "peak_memory_gb", "not_run")} for row in rows]
    return {"ok": all("not_run" in row or row.get("total_tflop") for row in rows), "rows": summary}


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    return done


def generate_latency(device: torch.device, dry_run: bool, work: Path) -> dict:
    """benchmarks/generate.py on a briefly trained ShapeWorld run, and (not in the dry run) on the recipes' generators at
    their real size with random weights (text to mesh; the turntable from the network field left out)."""
    run_dir = work / "generate-run"
    steps = 2 if dry_run else 200
    small = ["render.height=16", "render.width=16", "render.n_proposal=16", "render.n_importance=8"] if dry_run else []
    run([sys.executable, "train.py", "--corpus", "shapeworld-16", "--output", str(run_dir), f"train.steps={steps}",
         f"train.val_every={steps}", f"train.ckpt_every={steps}", *small])
    size = ["--frames", "4", "--image-size", "32", "--mesh-resolution", "32"] if dry_run else []
    results = {}
    for name, source in [("shapeworld-16 run", ["--checkpoint", str(run_dir)])] + ([] if dry_run else [
            (recipe, ["--recipe", recipe, "--skip-exact", "--prompts", "a hamburger", "a red motorcycle"]) for recipe in ("mg15", "df415", "cp100k")]):
        out = work / "generate.json"
        run([sys.executable, "benchmarks/generate.py", *source, "--out", str(out), *size])
        result = json.loads(out.read_text())
        results[name] = {k: result[k] for k in ("device", "generator", "generator_parameters", "rows")}
    return {"ok": True, "frames": result["frames"], "image_size": result["image_size"], "mesh_resolution": result["mesh_resolution"],
            "rows": results}


RASTER_IMAGE_TOLERANCE = 1e-3  # largest |torch - gsplat| of rgb and opacity, in [0, 1] units
RASTER_GRADIENT_TOLERANCE = 1e-2  # |grad_torch - grad_gsplat| / |grad_gsplat| of means, scales and opacities


def gsplat_rasterizer(device: torch.device, dry_run: bool, work: Path) -> dict:
    """benchmarks/rasterizer.py at 1k, 10k and 100k Gaussians: images/s, forward time and peak memory of both backends,
    and the PyTorch rasterizer against gsplat on the same Gaussians and cameras; ok when every size was compared and
    stays within RASTER_IMAGE_TOLERANCE and RASTER_GRADIENT_TOLERANCE (looser than tests/test_gaussians.py's check
    on 500 Gaussians: with thousands overlapping a pixel, the two sum in different orders). The dry run: the PyTorch
    backend alone at 1k Gaussians on the CPU (gsplat needs CUDA), which checks only that the benchmark runs."""
    sizes = [1000] if dry_run else [1000, 10000, 100000]
    out = work / "rasterizer.json"
    run([sys.executable, "benchmarks/rasterizer.py", "--sizes", *map(str, sizes), "--repeats", "1" if dry_run else "3",
         "--json", str(out)])
    rows = json.loads(out.read_text())["sizes"]
    compared = [row["torch_vs_gsplat"] for row in rows.values() if "torch_vs_gsplat" in row]
    within = all(c["rgb_max_abs"] < RASTER_IMAGE_TOLERANCE and c["opacity_max_abs"] < RASTER_IMAGE_TOLERANCE
                 and all(v < RASTER_GRADIENT_TOLERANCE for k, v in c.items() if k.startswith("grad_")) for c in compared)
    must_compare = device.type == "cuda"
    return {"ok": within and (len(compared) == len(rows) or not must_compare), "gsplat_compared": bool(compared),
            "rows": rows}


def deepspeed_zero2(device: torch.device, dry_run: bool, work: Path) -> dict:
    """A ZeRO-2 run of 15 steps run twice, and resumed from its step-10 checkpoint: it must finish, with its shards.

    The weights of the runs are compared but not required to agree: CUDA's atomic adds (the hash grid's backward) make
    two identical runs differ slightly, and Adam turns that into differences of the order of the learning rate. That
    a resumed ZeRO-2 run equals the uninterrupted one exactly is tested on two CPU processes (tests/test_deepspeed.py).
    """
    if dry_run or device.type != "cuda":
        raise Skip("DeepSpeed's ZeRO-2 run of the trainer is checked on a GPU (tests/test_deepspeed.py runs it on two CPU processes)")
    from safetensors.torch import load_file

    whole, again, resumed = work / "deepspeed-run", work / "deepspeed-again", work / "deepspeed-resumed"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "launch/deepspeed_zero2.yaml", "--num_processes", "1",
              "train.py", "--corpus", "shapeworld-16", "train.ckpt_every=5", "train.val_every=1000", "train.steps=15"]
    run([*launch, "--output", str(whole)])
    run([*launch, "--output", str(again)])
    shutil.copytree(whole, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000015")
    (resumed / "checkpoints" / "latest").write_text("step_00000010")
    run([*launch, "--output", str(resumed), "--resume"])
    final = [load_file(str(r / "checkpoints" / "step_00000015" / "model.safetensors")) for r in (whole, again, resumed)]
    difference = lambda a, b: max(float((a[k] - b[k]).abs().max()) for k in a)  # noqa: E731
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines() if line.strip()]
    shards = sorted(p.name for p in (resumed / "checkpoints" / "step_00000015" / "deepspeed" / "zero").iterdir())
    return {"ok": rows[-1]["step"] == 15 and rows[-1]["skipped_steps"] == 0 and "zero_pp_rank_0_mp_rank_00_optim_states.pt" in shards,
            "last_step": rows[-1]["step"], "loss": rows[-1]["loss"], "shards": shards,
            "run_to_run_max_abs_weight_difference": difference(final[0], final[1]),
            "resumed_vs_uninterrupted_max_abs_weight_difference": difference(final[0], final[2])}


def markdown(report: dict) -> str:
    lines = [f"GPU check, {report['date']}, {report['device']}, torch {report['torch']}" + (" (dry run)" if report["dry_run"] else ""), "",
             "| check | status | seconds | result |", "|---|---|---|---|"]
    for name, row in report["checks"].items():
        shown = {k: v for k, v in row.items() if k not in ("status", "seconds", "rows", "error")}
        if "rows" in row:
            shown["rows"] = row["rows"]
        text = row.get("error") or json.dumps(shown, default=str)
        lines.append(f"| {name} | {row['status']} | {row['seconds']:.1f} | {text.replace('|', '/')[:1500]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="the CPU-possible parts at small sizes")
    parser.add_argument("--out", default="benchmarks/results/gpu_check", help="writes OUT.json and OUT.md")
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--dtypes", nargs="+", choices=("fp16", "bf16", "fp32"), default=["fp16", "bf16"], help="prior weights of recipe_steps")
    parser.add_argument("--only", nargs="+", default=None, metavar="CHECK", help="run only these checks")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.dry_run and device.type != "cuda":
        parser.error("no GPU here: run with --dry-run for the CPU-possible parts")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe_out = out.with_name(out.name + "-recipe_step.json")
    checks = {"prior_precision": prior_precision, "nerfacc_sampling": nerfacc_sampling,
              "recipe_steps": lambda d, dry, w: recipe_steps(d, dry, recipe_out, args.recipes, args.dtypes),
              "generate_latency": generate_latency, "gsplat_rasterizer": gsplat_rasterizer,
              "deepspeed_zero2": deepspeed_zero2}
    unknown = sorted(set(args.only or ()) - set(checks))
    if unknown:
        parser.error(f"--only {' '.join(unknown)}: no such check; the checks are {', '.join(checks)}")
    checks = {name: check for name, check in checks.items() if args.only is None or name in args.only}
    report = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              "torch": torch.__version__, "dry_run": args.dry_run, "checks": {}}
    with tempfile.TemporaryDirectory() as work:
        for name, check in checks.items():
            start = time.perf_counter()
            try:
                row = check(device, args.dry_run, Path(work))
                row = {"status": "ok" if row.pop("ok") else "failed", **row}
            except Skip as why:
                row = {"status": "skipped", "error": str(why)}
            except Exception as err:  # noqa: BLE001 - one failed check must not hide the others
                row = {"status": "failed", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
            row["seconds"] = time.perf_counter() - start
            report["checks"][name] = row
            print(f"{name}: {row['status']} ({row['seconds']:.1f} s)", flush=True)
            out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
            out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    sys.exit(1 if any(row["status"] == "failed" for row in main()["checks"].values()) else 0)
