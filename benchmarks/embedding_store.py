"""Embedding-store build and read throughput with the offline ShapeWorld text encoder.

    python benchmarks/embedding_store.py [--sizes 2000 100000] [--dim 1024] [--store-root /tmp/a3d-stores]
        [--out benchmarks/results/embedding_store.json]

For each size N (the first N train prompts of shapeworld-120k): build prompts/s, files and
bytes per prompt on disk, and read samples/s for one rank streaming a whole epoch. Prints a
table and writes JSON. Stores are written under --store-root and kept (delete them after).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

from amortized3d.data.embedding_store import build_store, stream
from amortized3d.data.shapeworld import shapeworld_corpus
from amortized3d.text.hashed_encoder import HashedTextEncoder


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--store-root", default="/tmp/a3d-stores")
    parser.add_argument("--out", default="benchmarks/results/embedding_store.json")
    args = parser.parse_args()
    prompts_all = shapeworld_corpus("shapeworld-120k")["train"]
    rows = []
    for n in args.sizes:
        prompts = prompts_all[:n]
        store = Path(args.store_root) / f"n{n}-d{args.dim}"
        encoder = HashedTextEncoder(dim=args.dim)
        start = time.perf_counter()
        build_store(prompts, encoder, store, encoder_id=f"hashed-{args.dim}", corpus="shapeworld-120k",
                    shard_size=args.shard_size, progress=False)
        build_s = time.perf_counter() - start
        files = [p for p in store.iterdir() if p.is_file()]
        start = time.perf_counter()
        count = sum(1 for _ in stream(store))
        read_s = time.perf_counter() - start
        rows.append({
            "prompts": n, "dim": args.dim, "build_prompts_per_s": round(n / build_s, 1), "read_samples_per_s": round(count / read_s, 1),
            "files": len(files), "files_per_prompt": round(len(files) / n, 5),
            "bytes_per_prompt": round(sum(p.stat().st_size for p in files) / n), "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        })
    header = list(rows[0])
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[k]) for k in header))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": platform.processor() or platform.machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
