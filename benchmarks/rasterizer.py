"""3D Gaussian rasterizer throughput and memory against the number of Gaussians, and on CUDA the pure-PyTorch
rasterizer checked against gsplat's on the same inputs.

    python benchmarks/rasterizer.py [--sizes 1000 3000 10000 30000 100000] [--resolution 64] [--views 2]
        [--repeats 3] [--json benchmarks/results/rasterizer.json]

For each N, a fresh process builds N Gaussians (StableDreamer's initialization: uniform in a ball of radius 0.5,
opacity decaying with the radius, nearest-neighbour scales; sh_degree 0) and renders --views cameras at
--resolution^2 (one training step's render: forward, then backward of a random linear function of the images), with
every backend present: "torch" (amortized3d/rendering/gaussians.py, any device) and on CUDA also "gsplat". Reported:

  images_per_s        views / (forward + backward seconds), the median of --repeats after one warm-up
  forward_ms          the forward pass alone, median
  peak_mb             CPU: the process's peak resident memory growth over the renders (ru_maxrss, from after the
                      Gaussians were built); CUDA: torch.cuda.max_memory_allocated during the renders

On CUDA, also (the check named in the README): the torch backend against gsplat on the same Gaussians and cameras:
the largest absolute difference of rgb and opacity, and the relative difference of the gradients of the means,
scales and opacities (norm of the difference / norm of gsplat's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from amortized3d.files import write_text_atomic


def gaussians(n: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    from amortized3d.generators.gaussians import GaussiansConfig, PromptGaussians

    torch.manual_seed(seed)
    model = PromptGaussians(4, GaussiansConfig(n_gaussians=n, bound=1.0))
    return {k: v.detach().to(device) for k, v in model.splats.items()}


def one_size(n: int, resolution: int, views: int, repeats: int, device: str) -> dict:
    """The measurements of one N (module docstring), in this process."""
    import resource

    from amortized3d.rendering.cameras import orbit_cameras
    from amortized3d.rendering.gaussians import rasterize

    splats = gaussians(n, device)
    cams = orbit_cameras(views, 15.0, 1.6, 50.0, device)
    weights = torch.rand(views, 3, resolution, resolution, generator=torch.Generator().manual_seed(1)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = {}
    for backend in ["torch", *(["gsplat"] if device == "cuda" else [])]:
        leaves = {k: v.clone().requires_grad_(k in ("means", "scales", "opacities", "sh0")) for k, v in splats.items()}

        def step(backward: bool = True) -> torch.Tensor:
            out = rasterize(leaves["means"], leaves["quats"], leaves["scales"].exp(), torch.sigmoid(leaves["opacities"]),
                            leaves["sh0"], cams, resolution, resolution, backend)
            if backward:
                (out.rgb * weights).sum().backward()
            return out

        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step()  # warm-up
        total, forward = [], []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            with torch.no_grad():
                step(backward=False)
            sync()
            t1 = time.perf_counter()
            step()
            sync()
            total.append(time.perf_counter() - t1)
            forward.append(t1 - t0)
        peak = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
        rows[backend] = {"images_per_s": round(views / statistics.median(total), 2), "forward_ms": round(1000 * statistics.median(forward), 1),
                         "peak_mb": round(peak, 1)}
    if device == "cuda":
        rows["torch_vs_gsplat"] = compare_backends(splats, cams, resolution)
    return rows


def compare_backends(splats: dict, cams, resolution: int) -> dict:
    """The torch backend against gsplat on the same inputs: image and gradient differences."""
    from amortized3d.rendering.gaussians import rasterize

    results = {}
    for backend in ("torch", "gsplat"):
        leaves = {k: v.clone().requires_grad_() for k, v in splats.items()}
        out = rasterize(leaves["means"], leaves["quats"], leaves["scales"].exp(), torch.sigmoid(leaves["opacities"]), leaves["sh0"],
                        cams, resolution, resolution, backend)
        (out.rgb.square().sum() + out.opacity.sum()).backward()
        results[backend] = (out.rgb.detach(), out.opacity.detach(), {k: leaves[k].grad for k in ("means", "scales", "opacities")})
    (rgb_t, op_t, g_t), (rgb_g, op_g, g_g) = results["torch"], results["gsplat"]
    rel = {f"grad_{k}_rel": float((g_t[k] - g_g[k]).norm() / g_g[k].norm().clamp_min(1e-12)) for k in g_t}
    return {"rgb_max_abs": float((rgb_t - rgb_g).abs().max()), "opacity_max_abs": float((op_t - op_g).abs().max()), **rel}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 3000, 10000, 30000, 100000])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/rasterizer.json")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: measure one size, print JSON
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.one is not None:
        print(json.dumps(one_size(args.one, args.resolution, args.views, args.repeats, device)))
        return {}
    rows = {}
    for n in args.sizes:  # a fresh process each: the peak resident memory is this size's own
        done = subprocess.run([sys.executable, __file__, "--one", str(n), "--resolution", str(args.resolution), "--views", str(args.views),
                               "--repeats", str(args.repeats)], capture_output=True, text=True, check=True)
        rows[n] = json.loads(done.stdout.splitlines()[-1])
        line = " | ".join(f"{b}: {r['images_per_s']} img/s, fwd {r['forward_ms']} ms, {r['peak_mb']} MB"
                          for b, r in rows[n].items() if b != "torch_vs_gsplat")
        print(f"N={n:>7,}: {line}" + (f" | torch vs gsplat: {rows[n]['torch_vs_gsplat']}" if "torch_vs_gsplat" in rows[n] else ""), flush=True)
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    report = {"device": device_name, "resolution": args.resolution, "views": args.views, "repeats": args.repeats,
              "torch": torch.__version__, "sizes": rows}
    write_text_atomic(Path(args.json), json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
