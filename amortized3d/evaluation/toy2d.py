"""The 2D toy experiment (ScaleDreamer Fig. 3 and Fig. 13; ProlificDreamer's 2D experiments): score distillation
on images directly, without a 3D representation.

    amortized3d toy2d --method asd [--asd-shift paper] [--eta 0.1] [--prompt "a cube"] [--out runs/toy2d]
    amortized3d toy2d --method all                      every method, and ASD with every shift rule and eta 0

N image particles x [N, 3, H, W] (pixels in [0, 1], drawn uniformly) are the parameters. Each step draws t and eps
and applies the method's gradient exactly as training does (score_distillation, same timestep annealing, guidance
defaults and learned branches with their alignment losses), with the analytic ShapeWorld prior of the quickstart
recipe at one fixed camera, so its target is known in closed form: a mixture of the renders mu_k of the K scenes
the prompt can mean (K = 16 for "a cube": any color, any size). Adam on the pixels, clamped to [0, 1] after each
step. Written per setting NAME (the method, and for ASD its shift rule and eta):

    OUT/NAME.png    the particles after the last step
    OUT/NAME.json   grad_norm per step (the mean over particles of ||grad||, the quantity of Fig. 3 right) and,
                    per particle, its nearest mode k and the PSNR to it, with the count of distinct modes reached

and with --method all, OUT/toy2d.png (a row per setting, the modes in the last row), OUT/grad_norms.png and
OUT/toy2d.json (every setting's summary).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from amortized3d.distillation.methods.asd import ASD_SHIFTS

DEFAULT_PROMPT = "a cube"


def settings(method: str, asd_shift: str = "paper", eta: float = 0.1) -> list[tuple[str, str, str, float]]:
    """(name, method, asd_shift, eta) of each run: one, or with method "all" every method and ASD's variants."""
    from amortized3d.config import ConfigError
    from amortized3d.distillation.methods import METHODS

    if asd_shift not in ASD_SHIFTS:
        raise ConfigError(f"--asd-shift {asd_shift!r} is not known; choose one of {', '.join(ASD_SHIFTS)}")
    if method != "all":
        if method not in METHODS:
            raise ConfigError(f"--method {method!r} is not known; choose one of {', '.join(METHODS)} or all")
        return [(method if method != "asd" else f"asd-{asd_shift}-eta{eta:g}", method, asd_shift, eta)]
    runs = [(name, name, "paper", 0.1) for name in METHODS if name != "asd"]
    runs.append(("asd-eta0", "asd", "paper", 0.0))
    runs += [(f"asd-{rule}-eta0.1", "asd", rule, 0.1) for rule in ASD_SHIFTS]
    return runs


def run_toy(method: str, asd_shift: str, eta: float, *, prompt: str = DEFAULT_PROMPT, particles: int = 4, steps: int = 500,
            lr: float = 0.01, seed: int = 0) -> dict:
    """One setting. -> {"images": [N, 3, H, W], "modes": [K, 3, H, W], "grad_norm": [steps], per-particle results}."""
    from amortized3d.builders import build_adapter, build_prior
    from amortized3d.config import load_config
    from amortized3d.distillation.score_distillation import DEFAULT_GUIDANCE, score_distillation, timestep_range
    from amortized3d.interfaces import Conditioning
    from amortized3d.priors.analytic import render_prompt_scenes
    from amortized3d.rendering.cameras import look_at_cameras

    cfg = load_config("shapeworld-16", None, [f"distill.method={method}", f"distill.asd_shift={asd_shift}", f"distill.eta={eta}"])
    prior = build_prior(cfg)
    adapter, adapter_optimizer = build_adapter(cfg, prior)
    H, W = cfg.render.height, cfg.render.width
    one = torch.ones(1)
    camera = look_at_cameras(one * cfg.camera.eval_elevation, one * 30.0, one * cfg.camera.eval_distance, one * cfg.camera.eval_fovy)
    cond = Conditioning([prompt] * particles, camera.reshape(1)[[0] * particles])
    rng = torch.Generator().manual_seed(seed)
    x = torch.nn.Parameter(torch.rand(particles, 3, H, W, generator=rng))
    optimizer = torch.optim.Adam([x], lr=lr)
    guidance = DEFAULT_GUIDANCE[method]
    norms = []
    start = time.perf_counter()
    for step in range(steps):
        t_range = timestep_range(step / steps, cfg.distill.t_min, cfg.distill.t_max)
        out = score_distillation(prior, x, cond, method=method, guidance_scale=guidance, t_range=t_range, eta=eta,
                                 generator=rng, adapter=adapter, asd_shift=asd_shift)
        optimizer.zero_grad()
        out.loss.sum().backward()  # d/dx_b of the sum is each particle's own gradient
        optimizer.step()
        with torch.no_grad():
            x.clamp_(0, 1)
        if adapter is not None:
            adapter_optimizer.zero_grad()
            adapter.alignment_loss(x, cond, rng).backward()
            adapter_optimizer.step()
        norms.append(float(out.grad.flatten(1).norm(dim=1).mean()))
    seconds = time.perf_counter() - start
    rgb, valid = render_prompt_scenes([prompt], camera.reshape(1, 1), H, W, **prior.render_kwargs)
    modes = rgb[0, valid[0], 0]  # [K, 3, H, W]
    images = x.detach()
    mse = (images.unsqueeze(1) - modes.unsqueeze(0)).pow(2).flatten(2).mean(-1)  # [N, K]
    best, nearest = mse.min(1)
    psnr = [float(-10 * math.log10(max(v, 1e-12))) for v in best.tolist()]
    return {"images": images, "modes": modes, "grad_norm": norms, "nearest_mode": nearest.tolist(), "psnr": psnr,
            "distinct_modes": len(set(nearest.tolist())), "seconds": seconds, "guidance": guidance}


def toy2d(method: str, *, asd_shift: str = "paper", eta: float = 0.1, prompt: str = DEFAULT_PROMPT, particles: int = 4,
          steps: int = 500, lr: float = 0.01, seed: int = 0, out: str | Path = "runs/toy2d") -> list[dict]:
    """Run the settings of ``method`` (see ``settings``) and write their files into ``out``. -> their summaries."""
    from amortized3d.inference.export import contact_sheet, to_uint8
    from amortized3d.shapeworld import parse_prompt

    runs = settings(method, asd_shift, eta)
    parse_prompt(prompt)  # a clear error for a prompt the ShapeWorld prior cannot read
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summaries, rows = [], []
    for name, m, rule, e in runs:
        result = run_toy(m, rule, e, prompt=prompt, particles=particles, steps=steps, lr=lr, seed=seed)
        contact_sheet(to_uint8(result["images"]), out / f"{name}.png", ncols=particles)
        summary = {"name": name, "method": m, "asd_shift": rule if m == "asd" else None, "eta": e if m == "asd" else None,
                   "guidance": result["guidance"], "prompt": prompt, "particles": particles, "steps": steps, "lr": lr, "seed": seed,
                   "psnr": result["psnr"], "mean_psnr": sum(result["psnr"]) / particles, "nearest_mode": result["nearest_mode"],
                   "distinct_modes": result["distinct_modes"], "seconds": round(result["seconds"], 1), "grad_norm": result["grad_norm"]}
        (out / f"{name}.json").write_text(json.dumps(summary, indent=1))
        summaries.append(summary)
        rows.append(result)
    if len(summaries) > 1:
        modes = rows[0]["modes"]
        width = max(particles, len(modes))
        tiles = []
        for result in rows:
            tiles += list(result["images"]) + [torch.ones_like(modes[0])] * (width - particles)
        tiles += list(modes) + [torch.ones_like(modes[0])] * (width - len(modes))
        contact_sheet(to_uint8(torch.stack(tiles)), out / "toy2d.png", ncols=width)
        plot_grad_norms(summaries, out / "grad_norms.png")
        (out / "toy2d.json").write_text(json.dumps({"rows": [s["name"] for s in summaries] + ["modes"],
                                                    "settings": [{k: v for k, v in s.items() if k != "grad_norm"} for s in summaries]},
                                                   indent=1))
    return summaries


def plot_grad_norms(summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in summaries:
        values = s["grad_norm"]
        k = max(1, len(values) // 50)  # a running mean over 2% of the steps
        smooth = [sum(values[i : i + k]) / len(values[i : i + k]) for i in range(0, len(values), k)]
        ax.plot([i * k for i in range(len(smooth))], smooth, label=s["name"], linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("mean ||grad|| per particle")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
