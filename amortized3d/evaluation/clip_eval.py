"""CLIP R@1 and similarity of a trained generator over a corpus split (the paper's Sec. 4.1 protocol).

For each evaluated prompt p, its asset is rendered straight from the generator at V orbit views
(120 at elevation 15 degrees by default, at the CLIP model's input size), and every view is
scored against every candidate prompt c (by default all prompts of the split):

    s(p, v, c) = cos(image_features(x_pv), text_features(c))
    R@1(p)     = mean_v [s(p, v, p) >= max_{c != p} s(p, v, c)]     (a tie counts as a hit)
    Sim(p)     = mean_v s(p, v, p)

then both are averaged over prompts. Candidate text features are computed once, in batches, and
cached on disk (one .npy per block of 4,096 prompts); the scores are taken a block at a time,
so memory stays bounded by one block and V x 4,096 scores whatever the number of candidates. Prompts are split over ranks (prompt i to rank i mod world); every rank appends its
per-prompt rows to its own file as it goes, so an interrupted evaluation resumes where it stopped,
and rank 0 merges the files by prompt index (each prompt's row is computed once, by one rank, so
the merge is exact).

    OUT/summary.json      settings and the averages (overall, seen and unseen in training)
    OUT/scores.csv        per prompt: index, prompt, seen_in_training, r_at_1, similarity
    OUT/parts/rank<r>.jsonl, OUT/text_features/   resume state and the cache
    OUT/views/<index>.png (with save_views) the rendered views of each prompt, as a contact sheet
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from amortized3d.run_dir import RunDir

TEXT_BLOCK = 4096
DEFAULT_VIEWS = 120
DEFAULT_ELEVATION = 15.0


def candidate_digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def text_feature_blocks(clip, prompts: list[str], folder: Path, *, rank: int = 0, world: int = 1, batch_size: int = 256,
                        barrier=None, progress: bool = True) -> list[Path]:
    """Unit-norm text features of ``prompts``, computed once, as .npy files of float16 blocks [<=TEXT_BLOCK, E].

    The cache folder is keyed by the CLIP model and the candidate list; block b is computed by rank b mod world.
    """
    key = hashlib.sha256(f"{clip.identity}\n{candidate_digest(prompts)}".encode()).hexdigest()[:16]
    cache = folder / key
    cache.mkdir(parents=True, exist_ok=True)
    n_blocks = math.ceil(len(prompts) / TEXT_BLOCK)
    paths = [cache / f"block-{b:05d}.npy" for b in range(n_blocks)]
    mine = [b for b in range(n_blocks) if b % world == rank and not paths[b].is_file()]
    for b in tqdm(mine, desc="text features", disable=not progress or not mine):
        block = prompts[b * TEXT_BLOCK : (b + 1) * TEXT_BLOCK]
        feats = torch.cat([clip.encode_text(block[i : i + batch_size]).cpu() for i in range(0, len(block), batch_size)])
        tmp = paths[b].with_suffix(f".rank{rank}.tmp.npy")
        np.save(tmp, feats.half().numpy())
        tmp.rename(paths[b])
    if barrier is not None:
        barrier()
    return paths


def score_views(image_features: torch.Tensor, blocks: list[np.ndarray | Path], own: int) -> tuple[torch.Tensor, torch.Tensor]:
    """image_features [V, E] of prompt ``own``'s views; blocks of candidate text features [b, E] (arrays or .npy files,
    in candidate order) -> (hit [V] bool, own cosine [V]).

    Scores are taken block by block with a running maximum over the other candidates (ties count as hits); one
    block is in memory at a time.
    """
    V = image_features.shape[0]
    best_other = torch.full((V,), -math.inf)
    own_score = None
    start = 0
    for block in blocks:
        feats = torch.from_numpy(np.load(block) if isinstance(block, Path) else np.asarray(block)).float()
        scores = image_features.float() @ feats.T  # [V, b]
        if start <= own < start + feats.shape[0]:
            own_score = scores[:, own - start].clone()
            scores[:, own - start] = -math.inf
        best_other = torch.maximum(best_other, scores.max(dim=1).values)
        start += feats.shape[0]
    if own_score is None:
        raise IndexError(f"prompt index {own} is not among the {start} candidates")
    return own_score >= best_other, own_score


def _read_rows(folder: Path) -> dict[int, dict]:
    """Per-prompt rows of every part file in ``folder`` (a line cut short by a crash is skipped: recomputed)."""
    rows = {}
    for path in sorted(folder.glob("rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["index"]] = row
    return rows


def summarize(rows: list[dict], keys: tuple[str, ...] = ("r_at_1", "similarity")) -> dict:
    """Averages over prompts of each key: all (key), seen (key_seen) and unseen (key_unseen) in training; None when empty."""
    out = {}
    for key in keys:
        for suffix, subset in (("", rows), ("_seen", [r for r in rows if r["seen_in_training"]]),
                               ("_unseen", [r for r in rows if not r["seen_in_training"]])):
            out[key + suffix] = sum(r[key] for r in subset) / len(subset) if subset else None
    return out


def select_prompts(cfg, corpus, split: str = "test", prompts: list[str] | None = None, candidates: list[str] | None = None,
                   limit: int | None = None, balanced: int | None = None, run_dir: str | Path = "the run") -> tuple[list[str], list[str]]:
    """The prompts an evaluation scores and the candidates it retrieves among, for both protocols (CLIP and the oracle).

    evaluated: ``prompts`` when given, else the corpus split's prompts: with ``balanced`` N of them, half seen in
    training and half held out (balanced_prompts), with ``limit`` the first N. candidates: ``candidates`` when given,
    else the evaluated prompts when ``prompts`` or ``balanced`` chose them, else the whole split. Each evaluated prompt
    must be a candidate; a per-prompt run (one asset) can only be evaluated on its own prompt.
    -> (evaluated, candidates), each without repeats, in the given order.
    """
    from amortized3d.builders import check_trained_prompts

    if prompts is not None and (limit or balanced):
        raise ValueError(f"explicit prompts replace --limit and --balanced; drop {'--limit' if limit else '--balanced'}")
    if prompts is None:
        split_prompts = corpus.split(split)
        if not split_prompts:
            raise ValueError(f"split {split!r} of corpus {cfg.corpus.name!r} is empty; choose another --split")
        prompts = balanced_prompts(split_prompts, set(corpus.train), balanced) if balanced else split_prompts
        prompts, default_candidates = prompts[:limit] if limit else prompts, prompts
    else:
        default_candidates = prompts
    evaluated = list(dict.fromkeys(prompts))
    candidates = list(dict.fromkeys(default_candidates if candidates is None else candidates))
    if not evaluated:
        raise ValueError("no prompt to evaluate; pass one or more prompts")
    check_trained_prompts(cfg, evaluated, run_dir)
    known = set(candidates)
    missing = [p for p in evaluated if p not in known]
    if missing:
        raise ValueError(f"{len(missing)} evaluated prompt(s) are not among the {len(candidates)} candidates (first: {missing[0]!r}); "
                         "add them to the candidate file")
    return evaluated, candidates


def balanced_prompts(prompts: list[str], train: set[str], n: int) -> list[str]:
    """n of ``prompts``: half seen in training and half held out, the first of each in order (the other kind fills in
    where one runs short), in their order in ``prompts``."""
    seen = [p for p in prompts if p in train]
    unseen = [p for p in prompts if p not in train]
    n_unseen = min(len(unseen), n - min(len(seen), n // 2))
    chosen = set(unseen[:n_unseen] + seen[: n - n_unseen])
    return [p for p in prompts if p in chosen]


def evaluate_clip(run_dir: str | Path, clip: str, *, split: str = "test", prompts: list[str] | None = None,
                  candidates: list[str] | None = None, n_views: int = DEFAULT_VIEWS, elevation: float = DEFAULT_ELEVATION,
                  resolution: int | None = None, out: str | Path | None = None, limit: int | None = None,
                  save_views: bool = False, progress: bool = True) -> dict | None:
    """Run the protocol on RUN_DIR's latest checkpoint (module docstring); every rank calls it.

    clip: a load_clip spec. prompts / candidates / limit: the evaluated prompts and the candidates (select_prompts;
    default: the split, each prompt among all of the split's). resolution: render size (default: the CLIP input size).
    -> the summary (on rank 0; None on the other ranks).
    """
    from accelerate import Accelerator

    from amortized3d.builders import build_decoding_prior, build_text_encoder, load_run
    from amortized3d.data.corpora import load_corpus
    from amortized3d.evaluation.clip_models import load_clip
    from amortized3d.training.previews import render_validation

    start_time = time.perf_counter()
    accelerator = Accelerator()
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    run_dir = Path(run_dir)
    cfg, generator, state = load_run(run_dir, device)
    corpus = load_corpus(cfg.corpus.name, cfg.corpus.dir)
    evaluated, candidates = select_prompts(cfg, corpus, split, prompts, candidates, limit, run_dir=run_dir)
    position = {c: i for i, c in enumerate(candidates)}
    model = load_clip(clip, device)
    R = resolution or model.image_size
    out = Path(out) if out else RunDir(run_dir).clip_eval(split)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    settings = {"checkpoint_step": state["step"], "corpus": cfg.corpus.name, "split": split, "method": cfg.distill.method,
                "generator": cfg.generator.kind, "clip": clip, "clip_identity": model.identity, "n_prompts": len(evaluated),
                "n_candidates": len(candidates), "candidates_sha256": candidate_digest(candidates), "n_views": n_views,
                "elevation": elevation, "distance": cfg.camera.eval_distance, "fovy": cfg.camera.eval_fovy,
                "render_resolution": R, "clip_input_size": model.image_size}
    settings_file = out / "settings.json"
    if settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        raise ValueError(f"{out} holds an evaluation with other settings ({settings_file}); pass another --out or delete it")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        settings_file.write_text(json.dumps(settings, indent=1))
    done = _read_rows(out / "parts")  # read before the barrier in text_feature_blocks: no rank writes until after it
    blocks = text_feature_blocks(model, candidates, out / "text_features", rank=rank, world=world,
                                 barrier=accelerator.wait_for_everyone, progress=progress and accelerator.is_local_main_process)
    text_encoder = build_text_encoder(cfg, device)
    decoder = build_decoding_prior(cfg, text_encoder, device)
    seen = set(corpus.train)
    part = out / "parts" / f"rank{rank}.jsonl"
    todo = [i for i in range(rank, len(evaluated), world) if i not in done]
    if part.is_file() and part.stat().st_size and not part.read_bytes().endswith(b"\n"):
        with open(part, "a") as sink:  # a row cut short by a crash: end its line, so that the next row is whole
            sink.write("\n")
    with open(part, "a") as sink:
        for i in tqdm(todo, desc=f"CLIP evaluation (rank {rank})", disable=not progress or not accelerator.is_local_main_process):
            prompt = evaluated[i]
            views = render_validation(cfg, generator, text_encoder, [prompt], device, n_views, R, elevation, decoder)[0]
            hit, sim = score_views(model.encode_images(views).cpu(), blocks, position[prompt])
            row = {"index": i, "prompt": prompt, "seen_in_training": prompt in seen,
                   "r_at_1": hit.float().mean().item(), "similarity": sim.mean().item()}
            sink.write(json.dumps(row) + "\n")
            sink.flush()
            if save_views:
                from amortized3d.inference.export import contact_sheet, to_uint8

                (out / "views").mkdir(exist_ok=True)
                contact_sheet(to_uint8(views), out / "views" / f"{i:06d}.png", ncols=min(10, n_views))
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return None
    rows = _read_rows(out / "parts")
    ordered = [rows[i] for i in range(len(evaluated))]
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["index", "prompt", "seen_in_training", "r_at_1", "similarity"])
        writer.writeheader()
        writer.writerows(ordered)
    summary = {**settings, **summarize(ordered), "seconds": round(time.perf_counter() - start_time, 1), "world_size": world,
               "output": str(out)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
