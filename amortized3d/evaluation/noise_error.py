"""The noise-prediction error e(t) of a prior on a run's renders (ScaleDreamer Fig. 2 and Fig. 12).

    amortized3d noise-error RUN_DIR [--prompts 4] [--views 4] [--timesteps 100] [--eta 0.1] [--out DIR]
        -> DIR/noise_error.json and DIR/noise_error.png (DIR: RUN_DIR/plots)

For fixed renders x of the run's generator (the first --prompts test prompts, --views orbit views at the
evaluation camera, in the prior's space after prior.encode), one fixed noise eps per image and T timesteps t
evenly spaced over [T_lo, T_hi], every timestep the run's annealed range reached (score_distillation.timestep_range
at the start and the end of training; the recipes: 20 .. 980):

    x_t      = sqrt(abar_t) x + sqrt(1 - abar_t) eps
    e_PT(t)  = mean ||eps_phi(x_t, t, y) - eps||^2         the pretrained prior's conditional branch (no guidance)
    e_FT(t)  = mean ||eps_phi'(x_t, t, pi, y) - eps||^2    VSD's fine-tuned branch, for a VSD run (its checkpoint's)
    e_PT(t + dt), dt = floor(eta (t - T_min))             the pretrained error at ASD's shifted timestep (the
                                                           deterministic shift; T_min the run's final lower bound),
                                                           kept where t + dt <= T_hi

Each error is the mean over images and over the values of an image (||.||^2 / its size, so that priors with
different image sizes share a scale). ScaleDreamer's argument: e_PT falls as t grows (Eq. 3), e_FT lies below e_PT,
and e_PT(t + dt) approximates e_FT(t). The JSON holds every curve and, for a VSD run, the fraction of timesteps
where e_FT(t) < e_PT(t).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from amortized3d.interfaces import Conditioning
from amortized3d.priors.branches import COND
from amortized3d.priors.schedule import add_noise


def error_curve(predict, x: torch.Tensor, noise: torch.Tensor, timesteps: list[int], abar: torch.Tensor) -> list[float]:
    """mean ||predict(x_t, t) - eps||^2 / size over the images, for each t. x, noise [N, C, h, w]."""
    curve = []
    for t in timesteps:
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x_t = add_noise(x, noise, tt, abar)
        curve.append(float((predict(x_t, tt).float() - noise.float()).pow(2).mean()))
    return curve


@torch.no_grad()
def noise_error(run_dir: str | Path, *, n_prompts: int = 4, n_views: int = 4, n_timesteps: int = 100, eta: float | None = None,
                seed: int = 0, out: str | Path | None = None, device: str | torch.device = "cpu") -> dict:
    """Compute, write (JSON and PNG) and return the e(t) curves of the run's prior on the run's renders."""
    from amortized3d.builders import build_adapter, build_prior, build_text_encoder, load_run
    from amortized3d.config import MULTIVIEW_PRIORS, ConfigError
    from amortized3d.data.corpora import load_corpus
    from amortized3d.distillation.score_distillation import timestep_range
    from amortized3d.rendering.cameras import orbit_cameras
    from amortized3d.run_dir import RunDir
    from amortized3d.training.checkpoint import latest_checkpoint, load_checkpoint
    from amortized3d.training.previews import render_validation

    run_dir = Path(run_dir)
    cfg, generator, state = load_run(run_dir, device)
    if cfg.render.latents:
        raise ConfigError(f"{str(run_dir)!r} renders the prior's latents (render.latents=true); noise-error measures the prior on "
                          "encoded RGB renders, which this run does not make. Evaluate it with `amortized3d evaluate` (CLIP or the "
                          "ShapeWorld oracle), whose renders the prior decodes")
    if cfg.prior.kind in MULTIVIEW_PRIORS and n_views != cfg.train.views_per_prompt:
        views = cfg.train.views_per_prompt
        raise ConfigError(f"--views {n_views}: prior.kind={cfg.prior.kind} denoises the {views} views of one object "
                          f"together (train.views_per_prompt of this run); use --views {views}")
    prompts = load_corpus(cfg.corpus.name, cfg.corpus.dir).test[:n_prompts]
    text_encoder = build_text_encoder(cfg, device)
    prior = build_prior(cfg, text_encoder if cfg.text.encoder == "prior" else None, device)
    finetuned = None
    if cfg.distill.method == "vsd":
        finetuned, _ = build_adapter(cfg, prior)
        load_checkpoint(latest_checkpoint(run_dir), generator, adapter=finetuned)  # the branch is saved beside the generator
        finetuned.to(device)
        finetuned.eval()
    rgb = render_validation(cfg, generator, text_encoder, prompts, device, n_views)  # [P, V, 3, R, R]
    P, V = rgb.shape[:2]
    rng = torch.Generator().manual_seed(seed)
    x = prior.encode(rgb.reshape(P * V, *rgb.shape[2:]), generator=rng)
    noise = torch.randn(x.shape, generator=rng).to(x.device, x.dtype)
    cams = orbit_cameras(V, cfg.camera.eval_elevation, cfg.camera.eval_distance, cfg.camera.eval_fovy, device)
    cond = Conditioning.orbits(prompts, cams, prior.multiview)
    abar = prior.alphas_cumprod.to(x.device)
    start, end = (timestep_range(p, cfg.distill.t_min, cfg.distill.t_max) for p in (0.0, 1.0))
    lo_t, hi_t = min(start[0], end[0]), max(start[1], end[1])
    timesteps = sorted({round(lo_t + (hi_t - lo_t) * i / max(n_timesteps - 1, 1)) for i in range(n_timesteps)})
    t_min_final = end[0]
    eta = cfg.distill.eta if eta is None else eta

    cond_branch = torch.full((x.shape[0],), COND, dtype=torch.long, device=x.device)
    pretrained = lambda x_t, t: prior.predict_noise(x_t, t, cond, cond_branch)  # noqa: E731
    e_pt = error_curve(pretrained, x, noise, timesteps, abar)
    shifted_t = [t + math.floor(eta * (t - t_min_final)) if t >= t_min_final else t for t in timesteps]
    keep = [i for i, s in enumerate(shifted_t) if s <= hi_t]
    e_shift = error_curve(pretrained, x, noise, [shifted_t[i] for i in keep], abar)
    report = {"run": str(run_dir), "method": cfg.distill.method, "prior": cfg.prior.kind, "step": state["step"],
              "prompts": prompts, "n_views": V, "seed": seed, "eta": eta, "t_min": t_min_final,
              "timesteps": timesteps, "e_pretrained": e_pt,
              "shifted": {"timesteps": [timesteps[i] for i in keep], "t_plus_dt": [shifted_t[i] for i in keep], "e_pretrained": e_shift}}
    if finetuned is not None:
        e_ft = error_curve(lambda x_t, t: finetuned.predict_noise(x_t, t, cond), x, noise, timesteps, abar)
        report["e_finetuned"] = e_ft
        report["finetuned_below_pretrained"] = sum(f < p for f, p in zip(e_ft, e_pt)) / len(timesteps)
    out = Path(out) if out else RunDir(run_dir).plots
    out.mkdir(parents=True, exist_ok=True)
    (out / "noise_error.json").write_text(json.dumps(report, indent=1))
    plot_noise_error(report, out / "noise_error.png")
    return report


def plot_noise_error(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ratio) = plt.subplots(1, 2, figsize=(10, 3.8))
    t, e_pt = report["timesteps"], report["e_pretrained"]
    shifted = report["shifted"]
    curves = [(t, e_pt, "-", "tab:blue", "e_PT(t): pretrained")]
    if "e_finetuned" in report:
        curves.append((t, report["e_finetuned"], "-", "tab:orange", "e_FT(t): VSD fine-tuned branch"))
    curves.append((shifted["timesteps"], shifted["e_pretrained"], "--", "tab:green",
                   f"e_PT(t + dt), dt = {report['eta']:g} (t - {report['t_min']})"))
    by_t = dict(zip(t, e_pt))
    for ts, values, style, color, label in curves:
        ax.plot(ts, values, style, color=color, label=label)
        ratio.plot(ts, [v / by_t[x] for x, v in zip(ts, values)], style, color=color, label=label)
    ax.set_yscale("log")
    ax.set_ylabel("mean ||eps_pred - eps||^2 per value")
    ratio.set_ylabel("e(t) / e_PT(t)")
    ratio.set_yscale("log")
    for a in (ax, ratio):
        a.set_xlabel("timestep t")
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle(f"{Path(report['run']).name} ({report['method']}, step {report['step']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
