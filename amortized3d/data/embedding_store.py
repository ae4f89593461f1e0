"""Text-embedding store: a corpus split encoded once, in batches, into webdataset tar shards.

    STORE/manifest.json        encoder id, corpus, split, prompt count, shard size, widths, dtype,
                               sha256 of the prompt list, shard names
    STORE/shard-000000.tar     prompts [s * shard_size, (s + 1) * shard_size) of the split, one sample each:
                               __key__ "%09d" % index, "txt" the prompt, "tokens.npy" float16 [T, D],
                               "pooled.npy" float16 [D], "mask.npy" bool [T]

A few files per thousand prompts, not files per prompt. ``build_store`` splits the work over
ranks (shard s is built by rank s % world) and encodes in batches; each shard is written to a
temporary name and renamed when complete, so an interrupted build resumes by skipping the
shards that exist. A store built for other prompts or another encoder is refused rather than
mixed. ``stream`` reads one rank's share of an epoch: the shard order is a permutation seeded
by (seed, epoch), and rank r of world w takes every w-th shard from position r, so the ranks
see disjoint prompts that together cover the split.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from amortized3d.seeding import derived_seed

MANIFEST = "manifest.json"
STORE_STREAM = 1  # separates the shard-order seeds from the trainer's (seed, epoch) prompt permutations


class StoreError(ValueError):
    """A store that does not match the corpus or encoder asked for, or is incomplete."""


def prompts_digest(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def build_store(prompts: list[str], encoder, store_dir: str | Path, *, encoder_id: str, corpus: str = "", split: str = "train",
                shard_size: int = 1024, batch_size: int = 256, rank: int = 0, world: int = 1, progress: bool = True) -> dict:
    """Encode ``prompts`` with ``encoder.encode(list) -> TextEmbedding`` into shards; -> the manifest."""
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be >= 1")
    import webdataset as wds

    store = Path(store_dir)
    store.mkdir(parents=True, exist_ok=True)
    n_shards = math.ceil(len(prompts) / shard_size)
    manifest = {"encoder_id": encoder_id, "corpus": corpus, "split": split, "n_prompts": len(prompts), "shard_size": shard_size,
                "prompts_sha256": prompts_digest(prompts), "dtype": "float16", "shards": [shard_name(s) for s in range(n_shards)]}
    existing = store / MANIFEST
    if existing.is_file():
        old = json.loads(existing.read_text())
        for key in ("encoder_id", "prompts_sha256", "shard_size"):
            if old.get(key) != manifest[key]:
                raise StoreError(f"{store} holds a store with another {key} ({old.get(key)!r}); use a new folder or delete it")
    mine = [s for s in range(n_shards) if s % world == rank and not (store / shard_name(s)).is_file()]
    for s in tqdm(mine, desc=f"embedding store (rank {rank})", disable=not progress):
        chunk = prompts[s * shard_size : (s + 1) * shard_size]
        tmp = store / f".{shard_name(s)}.tmp"
        with wds.TarWriter(str(tmp)) as sink:
            for start in range(0, len(chunk), batch_size):
                batch = chunk[start : start + batch_size]
                emb = encoder.encode(batch)
                for j, prompt in enumerate(batch):
                    sink.write({
                        "__key__": f"{s * shard_size + start + j:09d}",
                        "txt": prompt,
                        "tokens.npy": _npy(emb.tokens[j].to(torch.float16).numpy()),
                        "pooled.npy": _npy(emb.pooled[j].to(torch.float16).numpy()),
                        "mask.npy": _npy(emb.mask[j].numpy()),
                    })
        tmp.rename(store / shard_name(s))
    if rank == 0:
        tmp = store / f".{MANIFEST}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.rename(existing)
    return manifest


def load_manifest(store_dir: str | Path, prompts: list[str] | None = None, encoder_id: str | None = None) -> dict:
    """The store's manifest, checked against the prompts and encoder expected and for missing shards."""
    store = Path(store_dir)
    path = store / MANIFEST
    if not path.is_file():
        raise StoreError(f"{store} is not an embedding store (no {MANIFEST}); build it first")
    manifest = json.loads(path.read_text())
    if prompts is not None and manifest["prompts_sha256"] != prompts_digest(prompts):
        raise StoreError(f"{store} was built for other prompts than this corpus split; rebuild it")
    if encoder_id is not None and manifest["encoder_id"] != encoder_id:
        raise StoreError(f"{store} was built with encoder {manifest['encoder_id']!r}, not {encoder_id!r}; rebuild it")
    missing = [name for name in manifest["shards"] if not (store / name).is_file()]
    if missing:
        raise StoreError(f"{store} is incomplete: {len(missing)} shards missing (first {missing[0]}); run the build again to finish it")
    return manifest


def epoch_shards(n_shards: int, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """This rank's shards in epoch ``epoch``: a (seed, epoch) permutation, every world-th from position rank."""
    order = torch.randperm(n_shards, generator=torch.Generator().manual_seed(derived_seed(seed, epoch, STORE_STREAM))).tolist()
    return order[rank::world]


def stream(store_dir: str | Path, *, rank: int = 0, world: int = 1, seed: int = 0, epoch: int = 0) -> Iterator[dict]:
    """This rank's samples of one epoch: dicts with index, prompt, tokens [T, D], pooled [D] (float16 tensors), mask [T]."""
    import webdataset as wds

    store = Path(store_dir)
    manifest = load_manifest(store)
    urls = [str(store / manifest["shards"][s]) for s in epoch_shards(len(manifest["shards"]), seed, epoch, rank, world)]
    if not urls:
        return iter(())
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False).decode()
    return (
        {"index": int(sample["__key__"]), "prompt": sample["txt"], "tokens": torch.from_numpy(sample["tokens.npy"]),
         "pooled": torch.from_numpy(sample["pooled.npy"]), "mask": torch.from_numpy(sample["mask.npy"])}
        for sample in dataset
    )
