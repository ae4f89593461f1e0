"""Text-embedding store: a corpus split encoded once, in batches, into webdataset tar shards.

    STORE/manifest.json        encoder ids, prior suffixes, corpus, split, prompt count, shard size,
                               order-independent sha256 of the prompt set, shard names
    STORE/shard-000000.tar     prompts [s * shard_size, (s + 1) * shard_size) of the store order, one sample each:
                               __key__      sha256 of the prompt (first 32 hex digits)
                               txt          the prompt
                               tokens.npy   float16 [T, D]  the generator's text encoder (text.encoder)
                               pooled.npy   float16 [D]
                               mask.npy     bool [T]
                               and with prior suffixes (S > 0), the prior's own encoder on prompt + suffix:
                               prior_tokens.npy float16 [S, 77, C], prior_pooled.npy [S, C], prior_mask.npy [S, 77]

The store order sorts prompts by their sha256, so every shard is a uniform random subset of the
corpus whatever order its file lists them in, and the manifest's digest covers the prompt set,
not its order. A few files per thousand prompts, not files per prompt; shards hold about
TARGET_SHARD_BYTES each unless shard_size is given.

``build_store`` splits the work over ranks (shard s is built by rank s % world) and encodes in
batches. Rank 0 writes the manifest first, and after a barrier every rank checks it; each
shard is written to a temporary name and renamed when complete, so a store is complete when all its manifest's shards exist, and an interrupted
build resumes by skipping the shards that exist. A store built for other prompts or other
encoders is refused rather than mixed. Training reads
stores through amortized3d.data.loader.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

MANIFEST = "manifest.json"
TARGET_SHARD_BYTES = 64 * 2**20
SHARD_SIZE_LIMITS = (16, 4096)


class StoreError(ValueError):
    """A store that does not match the corpus or encoders asked for, is incomplete, or is damaged."""


def prompt_key(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


def store_order(prompts: Sequence[str]) -> list[int]:
    """Indices of ``prompts`` sorted by prompt_key: the order of the store's samples."""
    keys = [prompt_key(p) for p in prompts]
    return sorted(range(len(prompts)), key=keys.__getitem__)


def prompts_digest(prompts: Sequence[str]) -> str:
    """sha256 of the prompt set (independent of the order the corpus lists it in)."""
    return hashlib.sha256("\n".join(sorted(prompt_key(p) for p in prompts)).encode()).hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def cache_root() -> Path:
    """$AMORTIZED3D_CACHE, else ~/.cache/amortized3d."""
    return Path(os.environ.get("AMORTIZED3D_CACHE") or Path.home() / ".cache" / "amortized3d").expanduser()


def default_store_dir(corpus: str, split: str, prompts_sha256: str, encoder_id: str, prior_encoder_id: str | None,
                      prior_suffixes: Sequence[str], shard_size: int | None = None) -> Path:
    """CACHE/stores/<corpus>-<split>-<16 hex digits of (prompt set, encoders, suffixes, shard size)>: one store per content."""
    key = hashlib.sha256(json.dumps([prompts_sha256, encoder_id, prior_encoder_id, list(prior_suffixes), shard_size]).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(corpus).name or "corpus")
    return cache_root() / "stores" / f"{name}-{split}-{key}"


def auto_shard_size(tokens: int, dim: int, prior_suffixes: int = 0, prior_dim: int = 0) -> int:
    """Prompts per shard so that a shard holds about TARGET_SHARD_BYTES (fp16 arrays), within SHARD_SIZE_LIMITS."""
    per_prompt = 2 * (tokens * dim + dim) + tokens + prior_suffixes * (2 * (tokens * prior_dim + prior_dim) + tokens)
    lo, hi = SHARD_SIZE_LIMITS
    return int(min(hi, max(lo, TARGET_SHARD_BYTES // per_prompt)))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def build_store(
    prompts: Sequence[str],
    encoder,
    store_dir: str | Path,
    *,
    prior_encoder=None,
    prior_suffixes: Sequence[str] = (),
    corpus: str = "",
    split: str = "train",
    shard_size: int | None = None,
    batch_size: int = 256,
    rank: int = 0,
    world: int = 1,
    barrier: Callable[[], None] | None = None,
    progress: bool = True,
) -> dict:
    """Encode ``prompts`` into shards; -> the manifest.

    encoder / prior_encoder: ``encode(list[str]) -> TextEmbedding`` with an ``identity`` string
    (the store is bound to it). With prior_suffixes, prompt + suffix is also encoded by
    prior_encoder for each suffix ('' is the plain prompt). Every rank calls this with the same
    arguments; ``barrier`` (e.g. accelerator.wait_for_everyone) is called once the manifest exists and again at
    the end, so all shards exist on return.
    """
    if batch_size < 1 or (shard_size is not None and shard_size < 1):
        raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be >= 1")
    if prior_suffixes and prior_encoder is None:
        raise ValueError("prior_suffixes need a prior_encoder")
    if not prompts:
        raise StoreError("the prompt list is empty; there is nothing to store")
    import webdataset as wds

    store = Path(store_dir)
    store.mkdir(parents=True, exist_ok=True)
    suffixes = list(prior_suffixes)
    if shard_size is None:
        probe = encoder.encode([prompts[0]])
        prior_dim = prior_encoder.dim if suffixes else 0
        shard_size = auto_shard_size(probe.tokens.shape[1], probe.tokens.shape[2], len(suffixes), prior_dim)
    order = store_order(prompts)
    n_shards = math.ceil(len(prompts) / shard_size)
    manifest = {
        "encoder_id": encoder.identity, "prior_encoder_id": prior_encoder.identity if suffixes else None, "prior_suffixes": suffixes,
        "corpus": corpus, "split": split, "n_prompts": len(prompts), "shard_size": shard_size, "prompts_sha256": prompts_digest(prompts),
        "order": "sha256 of the prompt", "dtype": "float16", "shards": [shard_name(s) for s in range(n_shards)],
    }
    existing = store / MANIFEST
    if rank == 0 and not existing.is_file():  # written first, so that a resumed build can check what the shards were built with
        tmp = store / f".{MANIFEST}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.rename(existing)
    if barrier is not None:
        barrier()  # no rank writes a shard before the manifest exists
    if existing.is_file():
        old = _read_manifest(store)
        for key in ("encoder_id", "prior_encoder_id", "prior_suffixes", "prompts_sha256", "shard_size"):
            if old.get(key) != manifest[key]:
                raise StoreError(f"{store} holds a store with another {key} ({old.get(key)!r}, not {manifest[key]!r}); "
                                 "use a new folder (data.store) or delete it")
    mine = [s for s in range(n_shards) if s % world == rank and not (store / shard_name(s)).is_file()]
    for s in tqdm(mine, desc=f"embedding store (rank {rank})", disable=not progress):
        chunk = [prompts[i] for i in order[s * shard_size : (s + 1) * shard_size]]
        tmp = store / f".{shard_name(s)}.{os.getpid()}.tmp"
        with wds.TarWriter(str(tmp)) as sink:
            for start in range(0, len(chunk), batch_size):
                batch = chunk[start : start + batch_size]
                emb = encoder.encode(batch)
                _check_finite(emb, batch, "text encoder")
                if suffixes:
                    pri = prior_encoder.encode([p + suffix for p in batch for suffix in suffixes])
                    _check_finite(pri, [p + suffix for p in batch for suffix in suffixes], "prior's text encoder")
                    pri_tokens = pri.tokens.view(len(batch), len(suffixes), *pri.tokens.shape[1:])
                    pri_pooled = pri.pooled.view(len(batch), len(suffixes), -1)
                    pri_mask = pri.mask.view(len(batch), len(suffixes), -1)
                for j, prompt in enumerate(batch):
                    sample = {
                        "__key__": prompt_key(prompt),
                        "txt": prompt,
                        "tokens.npy": _npy(emb.tokens[j].to(torch.float16).numpy()),
                        "pooled.npy": _npy(emb.pooled[j].to(torch.float16).numpy()),
                        "mask.npy": _npy(emb.mask[j].numpy()),
                    }
                    if suffixes:
                        sample["prior_tokens.npy"] = _npy(pri_tokens[j].to(torch.float16).numpy())
                        sample["prior_pooled.npy"] = _npy(pri_pooled[j].to(torch.float16).numpy())
                        sample["prior_mask.npy"] = _npy(pri_mask[j].numpy())
                    sink.write(sample)
        tmp.rename(store / shard_name(s))
    if barrier is not None:
        barrier()
    return manifest


def _check_finite(emb, texts: list[str], what: str) -> None:
    bad = (~torch.isfinite(emb.tokens.flatten(1)).all(1)) | (~torch.isfinite(emb.pooled).all(1))
    if bad.any():
        raise StoreError(f"the {what} gave non-finite embeddings for {texts[int(bad.nonzero()[0])]!r} (and {int(bad.sum()) - 1} more); "
                         "half precision can overflow (T5): build the store with prior.dtype=fp32 or bf16")
    if emb.tokens.abs().max() > 65504 or emb.pooled.abs().max() > 65504:
        raise StoreError(f"the {what} gave embeddings beyond float16's range (65504); they cannot be stored as fp16")


def _read_manifest(store: Path) -> dict:
    try:
        manifest = json.loads((store / MANIFEST).read_text())
        for key in ("encoder_id", "prior_encoder_id", "prior_suffixes", "prompts_sha256", "shard_size", "n_prompts", "shards"):
            manifest[key]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise StoreError(f"{store / MANIFEST} is damaged ({type(err).__name__}: {err}); delete the folder {store} and build the store again") from None
    return manifest


def load_manifest(store_dir: str | Path, prompts: Sequence[str] | None = None, encoder_id: str | None = None,
                  prior_encoder_id: str | None = None, prior_suffixes: Sequence[str] | None = None) -> dict:
    """The store's manifest, checked against what is expected (the arguments given) and for missing shards."""
    store = Path(store_dir)
    path = store / MANIFEST
    if not path.is_file():
        raise StoreError(f"{store} is not an embedding store (no {MANIFEST}); build it with `amortized3d store build`")
    manifest = _read_manifest(store)
    if prompts is not None and manifest["prompts_sha256"] != prompts_digest(prompts):
        raise StoreError(f"{store} was built for other prompts than this corpus split; rebuild it")
    if encoder_id is not None and manifest["encoder_id"] != encoder_id:
        raise StoreError(f"{store} was built with text encoder {manifest['encoder_id']!r}, not {encoder_id!r}; rebuild it")
    if prior_suffixes is not None and (manifest["prior_suffixes"] != list(prior_suffixes)
                                       or (prior_suffixes and manifest["prior_encoder_id"] != prior_encoder_id)):
        raise StoreError(
            f"{store} holds the prior texts {manifest['prior_suffixes']!r} of {manifest['prior_encoder_id']!r}, not "
            f"{list(prior_suffixes)!r} of {prior_encoder_id!r} (the prior or its view-dependent settings changed); rebuild it"
        )
    missing = [name for name in manifest["shards"] if not (store / name).is_file()]
    if missing:
        raise StoreError(f"{store} is incomplete: {len(missing)} shards missing (first {missing[0]}); run the build again to finish it")
    return manifest


def shard_sizes(manifest: dict) -> list[int]:
    """Samples per shard: shard_size each, the remainder in the last."""
    n, size = manifest["n_prompts"], manifest["shard_size"]
    return [min(size, n - s * size) for s in range(len(manifest["shards"]))]
