"""Embedding store and training data path at 2k and 100k prompts, with the offline ShapeWorld text encoder.

    python benchmarks/embedding_store.py [--sizes 2000 100000] [--root /tmp/a3d-store-bench]
        [--out benchmarks/results/embedding_store.json]

For each size N (the first N train prompts of shapeworld-120k, written as a JSON corpus file):
  build     the store training reads (configs/shapeworld.yaml: 1024-d hashed encoder), prompts/s,
            files and bytes per prompt
  loader    samples/s for rank 0 of 2 over one epoch, batches of 8, with 0 and 2 data-loader workers
  train     `python train.py --corpus FILE --config configs/shapeworld.yaml train.steps=3` from the built
            store, data.num_workers=0 (everything in the rank's process): seconds from launch until the
            first step is logged, and the rank's peak resident memory over its 3 steps (the logged peak_memory_mb)
Prints a table and writes JSON with the machine and the ratio of peak memory at the largest vs the
smallest size. Stores are rebuilt under --root and kept (the 100k store is about 16 GB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from amortized3d.builders import build_text_encoder, prepare_store
from amortized3d.config import load_config
from amortized3d.data.loader import batch_loader
from amortized3d.shapeworld import shapeworld_corpus

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "shapeworld.yaml"


def loader_rate(store: Path, n: int, workers: int) -> float:
    nb = n // 16  # rank 0 of 2, batches of 8: one epoch
    start = time.perf_counter()
    count = sum(len(b.prompts) for b in batch_loader(store, 8, rank=0, world=2, seed=0, start=0, stop=nb, num_workers=workers))
    return count / (time.perf_counter() - start)


def train_from_store(corpus: Path, store: Path, run: Path) -> dict:
    cmd = [sys.executable, str(REPO / "train.py"), "--corpus", str(corpus), "--config", str(CONFIG), "--output", str(run),
           f"data.store={store}", "data.num_workers=0", "train.steps=3", "train.log_every=1", "train.wandb=disabled",
           "train.ckpt_every=1000", "train.val_every=1000"]
    metrics = run / "metrics.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    first = None
    while proc.poll() is None:
        if first is None and metrics.is_file() and metrics.stat().st_size > 0:
            first = time.perf_counter() - start
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.read()[-3000:])
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"first_step_s": round(first, 1), "train_peak_rss_mb": round(rows[2]["peak_memory_mb"]),
            "steps_per_s": round(rows[2]["steps_per_s"], 2)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 100000])
    parser.add_argument("--root", default="/tmp/a3d-store-bench")
    parser.add_argument("--out", default="benchmarks/results/embedding_store.json")
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    source = shapeworld_corpus("shapeworld-120k")
    rows = []
    for n in args.sizes:
        corpus = root / f"shapeworld-{n}.json"
        prompts = source["train"][:n]
        corpus.write_text(json.dumps({"train": prompts, "test": source["test"][:100]}))
        store = root / f"store-{n}"
        if store.exists():  # measure a build from nothing
            subprocess.run(["rm", "-rf", str(store)], check=True)
        cfg = load_config(str(corpus), str(CONFIG), [f"data.store={store}"])
        start = time.perf_counter()
        prepare_store(cfg, prompts, build_text_encoder(cfg), progress=False)
        build_s = time.perf_counter() - start
        files = [p for p in store.iterdir() if p.is_file()]
        row = {
            "prompts": n, "build_prompts_per_s": round(n / build_s), "files_per_prompt": round(len(files) / n, 5),
            "bytes_per_prompt": round(sum(p.stat().st_size for p in files) / n),
            "loader_samples_per_s_0_workers": round(loader_rate(store, n, 0)), "loader_samples_per_s_2_workers": round(loader_rate(store, n, 2)),
        }
        run = root / f"run-{n}"
        if run.exists():
            subprocess.run(["rm", "-rf", str(run)], check=True)
        row.update(train_from_store(corpus, store, run))
        rows.append(row)
        print(json.dumps(row), flush=True)
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[k]) for k in header))
    growth = rows[-1]["train_peak_rss_mb"] / rows[0]["train_peak_rss_mb"] - 1
    print(f"peak memory of a training rank, {rows[-1]['prompts']} vs {rows[0]['prompts']} prompts: {100 * growth:+.1f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "config": str(CONFIG.relative_to(REPO)),
                               "rows": rows, "train_peak_rss_growth": round(growth, 4)}, indent=1))


if __name__ == "__main__":
    main()
