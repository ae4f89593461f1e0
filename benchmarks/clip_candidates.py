"""CLIP R@1 over large candidate sets: time and peak memory at 2k vs 100k candidates.

    python benchmarks/clip_candidates.py --checkpoint RUN_DIR [--sizes 2000 100000] [--clip MODEL]
        [--prompts 8] [--views 120] [--out benchmarks/results/clip_candidates.json]

For each size N, a fresh process runs `evaluate_clip` on the first --prompts test prompts of
RUN_DIR's corpus with candidates = those prompts plus the first N train prompts of
shapeworld-120k, and reports the seconds for the candidate text features (computed once,
then cached) and for rendering and scoring, and the process's peak resident memory. Without
--clip, a tiny random CLIP with 768-d projections (ViT-L/14's width) stands in, so the
feature cache and score blocks have the real model's size while the towers cost little.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(args) -> dict:
    import torch

    from amortized3d.builders import load_run
    from amortized3d.data.corpora import load_corpus
    from amortized3d.shapeworld import shapeworld_corpus
    from amortized3d.evaluation import clip_eval
    from amortized3d.training.monitor import peak_memory_mb

    cfg, _, _ = load_run(args.checkpoint)
    evaluated = load_corpus(cfg.corpus.name, cfg.corpus.dir).test[: args.prompts]
    extra = [p for p in shapeworld_corpus("shapeworld-120k")["train"] if p not in set(evaluated)][: args.one]
    candidates = evaluated + extra
    times = {}
    original = clip_eval.text_feature_blocks

    def timed_blocks(*a, **k):
        start = time.perf_counter()
        out = original(*a, **k)
        times["text_features_s"] = time.perf_counter() - start
        return out

    clip_eval.text_feature_blocks = timed_blocks
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = clip_eval.evaluate_clip(args.checkpoint, args.clip, candidates=candidates, n_views=args.views, out=out,
                                          limit=args.prompts, progress=False)
        total = time.perf_counter() - start
    return {"candidates": len(candidates), "prompts": args.prompts, "views": args.views,
            "text_features_s": round(times["text_features_s"], 1), "render_and_score_s": round(total - times["text_features_s"], 1),
            "r_at_1": round(summary["r_at_1"], 4), "peak_rss_mb": round(peak_memory_mb(torch.device("cpu")))}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 100000])
    parser.add_argument("--clip", default=None)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--views", type=int, default=120)
    parser.add_argument("--out", default="benchmarks/results/clip_candidates.json")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(one(args)))
        return
    with tempfile.TemporaryDirectory() as work:
        clip = args.clip
        if clip is None:
            from amortized3d.priors.tiny import make_tiny_clip

            clip = str(make_tiny_clip(Path(work) / "clip", image_size=32, projection_dim=768))
        rows = []
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--checkpoint", args.checkpoint, "--clip", clip, "--prompts", str(args.prompts),
                   "--views", str(args.views), "--one", str(n)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))
            if proc.returncode != 0:
                raise RuntimeError(proc.stderr[-3000:])
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[k]) for k in header))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "checkpoint": args.checkpoint,
                               "clip": args.clip or "tiny random CLIP, 768-d projections", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
