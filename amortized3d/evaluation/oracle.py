"""Oracle evaluation on ShapeWorld: R@1, similarity, PSNR and 3D IoU against the exact scenes.

For each evaluated prompt p and orbit view v, the generator's render x_pv is
compared with the exact renders of every candidate prompt c (all prompts of the
split) at the same camera; an under-specified candidate ("a cube") is as close as
its nearest scene:

    d(p, c, v) = min_k mean (x_pv - mu_ckv)^2
    R@1(p)     = mean_v [d(p, p, v) <= min_c d(p, c, v)]   (a tie counts: see below)
    sim(p)     = mean_v (1 - sqrt(d(p, p, v)))          (1 - RMSE, in [0, 1])
    PSNR(p)    = mean_v -10 log10 d(p, p, v)
    IoU(p)     = max_k |{sdf_gen < 0} & {sdf_k < 0}| / |{sdf_gen < 0} | {sdf_k < 0}|   at the cell centers of a grid
    view consistency(p) = max_k mean_v [k_v = k],  k_v = argmin_k mean (x_pv - mu_pkv)^2
                 the largest fraction of the orbit views whose nearest exact scene of p is one and the same scene:
                 1 when every view shows the same scene; below 1 when an under-specified prompt ("a cube", any color
                 and size) shows different scenes from different sides (the Janus problem); always 1 for a prompt
                 with one scene

Ties count as hits: when two candidates share the nearest exact render (an under-specified
"a cube" contains the scene of "a large yellow cube"), the render cannot tell them apart, and
the order of the candidate list must not decide. Distances within a relative 1e-5 of the
minimum are ties (the same scene rendered in different batches can differ by rounding).

Per-prompt values are averaged over prompts, as in the CLIP protocol, and also
separately over prompts seen and unseen in training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from amortized3d.builders import build_decoding_prior, build_text_encoder, load_run
from amortized3d.data.corpora import load_corpus
from amortized3d.evaluation.clip_eval import select_prompts, summarize
from amortized3d.fields import grid_points
from amortized3d.priors.analytic import render_prompt_scenes
from amortized3d.rendering.cameras import orbit_cameras
from amortized3d.rendering.volume import rays_per_chunk
from amortized3d.run_dir import RunDir
from amortized3d.shapeworld import parse_prompt, scene_field
from amortized3d.training.previews import render_validation

TIE_TOLERANCE = 1e-5  # relative: distances this close to the nearest count as the nearest


def retrieval_metrics(renders: torch.Tensor, references: torch.Tensor, valid: torch.Tensor, own: torch.Tensor) -> dict[str, torch.Tensor]:
    """renders [P, V, 3, H, W], references [C, K, V, 3, H, W], valid [C, K], own long [P] (index of p among candidates).

    -> per-prompt r_at_1, similarity, psnr, each [P].
    """
    P, V = renders.shape[:2]
    dist = torch.empty(P, references.shape[0], V)
    for p in range(P):
        mse = ((renders[p].unsqueeze(0).unsqueeze(0) - references) ** 2).flatten(3).mean(-1)  # [C, K, V]
        mse = mse.masked_fill(~valid.unsqueeze(-1), float("inf"))
        dist[p] = mse.min(dim=1).values
    nearest = dist.min(dim=1).values  # [P, V]
    own_d = dist[torch.arange(P), own]  # [P, V]
    r_at_1 = (own_d <= nearest * (1 + TIE_TOLERANCE) + 1e-12).float().mean(1)
    own_d = own_d.clamp_min(1e-10)
    return {
        "r_at_1": r_at_1,
        "similarity": (1 - own_d.sqrt()).mean(1),
        "psnr": (-10 * torch.log10(own_d)).mean(1),
    }


def view_consistency(renders: torch.Tensor, scenes: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """renders [P, V, 3, H, W], scenes [P, K, V, 3, H, W] each prompt's own exact scenes, valid [P, K] -> the largest
    fraction of views whose nearest scene is the same one (module docstring), [P]."""
    mse = ((renders.unsqueeze(1) - scenes) ** 2).flatten(3).mean(-1)  # [P, K, V]
    nearest = mse.masked_fill(~valid.unsqueeze(-1), float("inf")).argmin(1)  # [P, V]
    counts = torch.nn.functional.one_hot(nearest, scenes.shape[1]).sum(1)  # [P, K]
    return counts.max(1).values.float() / renders.shape[1]


def occupancy_iou(occupied: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """occupied bool [P, G], reference bool [P, K, G], valid [P, K] -> best IoU over valid k, [P]."""
    inter = (occupied.unsqueeze(1) & reference).sum(-1).float()
    union = (occupied.unsqueeze(1) | reference).sum(-1).float().clamp_min(1)
    iou = (inter / union).masked_fill(~valid, -1.0)
    return iou.max(dim=1).values


@torch.no_grad()
def evaluate_run(run_dir: str | Path, split: str = "test", out: str | Path | None = None, limit: int | None = None,
                 balanced: int | None = None, prompts: list[str] | None = None, candidates: list[str] | None = None) -> dict:
    """Render the split's prompts with the trained generator and score them. Writes and returns the JSON report.

    limit: score only the first ``limit`` prompts, against every prompt of the split as candidates.
    balanced: score ``balanced`` prompts, half seen in training and half held out (balanced_prompts), which are then
    the only candidates: a fixed-size retrieval test for corpora of any size (the corpus-scale bench).
    prompts: score these instead of the split (they are then the candidates); candidates: retrieve among these
    instead (a per-prompt run against a fixed prompt set: the prompt-specific bench). See clip_eval.select_prompts."""
    run_dir = Path(run_dir)
    start = time.perf_counter()
    cfg, generator, state = load_run(run_dir)
    corpus = load_corpus(cfg.corpus.name, cfg.corpus.dir)
    evaluated, candidates = select_prompts(cfg, corpus, split, prompts, candidates, limit, balanced, run_dir)
    for p in candidates:
        parse_prompt(p)  # the oracle needs ShapeWorld prompts; this raises a clear error otherwise
    text_encoder = build_text_encoder(cfg)
    decoder = build_decoding_prior(cfg, text_encoder)
    R, V = cfg.eval.resolution, cfg.eval.n_views
    cams = orbit_cameras(V, cfg.camera.eval_elevation, cfg.camera.eval_distance, cfg.camera.eval_fovy)
    render_kwargs = dict(cfg.render.volume_kwargs(), chunk_rays=rays_per_chunk(cfg.render.n_proposal, cfg.render.n_importance))
    renders = torch.cat([render_validation(cfg, generator, text_encoder, evaluated[i : i + 8], "cpu", V, R, prior=decoder)
                         for i in range(0, len(evaluated), 8)])  # [P, V, 3, R, R], at the same cameras as cams
    refs, valid = [], []
    for i in range(0, len(candidates), 8):
        batch = candidates[i : i + 8]
        rgb, ok = render_prompt_scenes(batch, cams.reshape(1, V)[[0] * len(batch)], R, R, **render_kwargs)
        refs.append(rgb)
        valid.append(ok)
    K = max(r.shape[1] for r in refs)
    references = torch.cat([torch.nn.functional.pad(r, (0, 0, 0, 0, 0, 0, 0, 0, 0, K - r.shape[1])) for r in refs])
    valid_all = torch.cat([torch.nn.functional.pad(v, (0, K - v.shape[1])) for v in valid])
    position = {c: i for i, c in enumerate(candidates)}
    own = torch.tensor([position[p] for p in evaluated])
    metrics = retrieval_metrics(renders, references, valid_all, own)
    metrics["view_consistency"] = view_consistency(renders, references[own], valid_all[own])
    open_prompt = (valid_all[own].sum(1) > 1).tolist()  # under-specified: more than one scene

    bound = cfg.sampling_radius()
    pts = grid_points(cfg.eval.iou_resolution, bound, cell_centers=True)
    ious = []
    for p in evaluated:
        text = text_encoder.encode([p])
        gen_occ = generator(text.pooled, text.tokens).occupancy(pts.unsqueeze(0))  # [1, G]
        scenes = parse_prompt(p)
        ref_occ = scene_field(scenes).sdf(pts.unsqueeze(0).expand(len(scenes), -1, -1)) < 0  # [K, G]
        ious.append(occupancy_iou(gen_occ, ref_occ.unsqueeze(0), torch.ones(1, len(scenes), dtype=torch.bool)))
    metrics["iou"] = torch.cat(ious)

    seen = set(corpus.train)
    per_prompt = [
        {"prompt": p, "seen_in_training": p in seen, **{k: float(v[i]) for k, v in metrics.items()}}
        for i, p in enumerate(evaluated)
    ]
    summary = {"corpus": cfg.corpus.name, "split": split, "method": cfg.distill.method, "step": state["step"],
               "n_prompts": len(evaluated), "n_candidates": len(candidates), "n_views": V, "resolution": R,
               **summarize(per_prompt, ("r_at_1", "similarity", "psnr", "iou", "view_consistency"))}
    open_prompts = [r["view_consistency"] for r, is_open in zip(per_prompt, open_prompt) if is_open]
    summary["view_consistency_open"] = sum(open_prompts) / len(open_prompts) if open_prompts else None  # under-specified prompts only
    summary["seconds"] = time.perf_counter() - start
    report = {"summary": summary, "per_prompt": per_prompt}
    out = Path(out) if out else RunDir(run_dir).oracle_report(split)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    return report


def eval_every_hook(cfg) -> list:
    """The training hooks of train.eval_every: after every checkpoint at a multiple of it, the oracle report of the
    test split into RUN/evals/step_<step>.json (amortized3d.run_dir). [] when train.eval_every is 0."""
    every = cfg.train.eval_every

    def evaluate_checkpoint(run_dir: Path, step: int) -> None:
        if step % every == 0:
            evaluate_run(run_dir, out=RunDir(run_dir).step_eval(step))

    return [evaluate_checkpoint] if every else []
