"""Training batches streamed from an embedding store, split by rank and by data-loader worker.

The order is a pure function of (seed, epoch, world, batch size), so a run resumed from a
checkpoint at any micro-batch continues exactly where it stopped, whatever the number of
data-loader workers:

    epoch order   shards in a permutation seeded by (seed, epoch); inside each shard its samples in
                  a permutation seeded by (seed, epoch, shard); concatenated: N positions
    rank r        positions [r q, (r + 1) q) of the epoch order, q = nb B, nb = N // (world B):
                  every rank runs nb micro-batches of B prompts per epoch (equal step counts); the
                  N - world q < world B prompts at the end of an epoch's order sit that epoch out
                  (a different few each epoch), and no prompt is seen twice in an epoch
    micro-batch m the run's m-th micro-batch on this rank: epoch m // nb, batch m % nb of the range
    worker k      of K: micro-batches start + k, start + k + K, ...; PyTorch's DataLoader takes one
                  batch from each worker in turn, so the batches arrive in micro-batch order

A rank reads the few consecutive shards its range covers (two of them partly); a worker keeps
the samples of the shards its current batch needs (arrays viewing the shard's bytes, read once)
and stacks only that batch.

Integrity: the store's manifest is checked when the loader is made (every shard recorded, with
its recorded size: embedding_store.load_manifest), and each time a worker reads a shard it
checks the file's size and sha256 against the manifest and parses it fully
(embedding_store.read_shard: tar structure, members, each key against the sha256 of its own
text, the shard's keys against the ones the manifest expects, every array's dtype, shape and
finiteness). A shard that fails is a StoreError naming it and the fix, raised before any of its
samples is yielded. A worker reads, hashes and checks a shard once when its batches first need
it, not once per batch: for a 64 MB shard about 0.2 s on one core (0.05 s of it the sha256),
where reading it without the checks took about 0.15 s.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from amortized3d.data.embedding_store import StoreError, load_manifest, prompt_key, read_shard, shard_sizes
from amortized3d.seeding import derived_seed
from amortized3d.text.hashed_encoder import TextEmbedding

LOADER_STREAM = -2  # in the second place of the loader's seeds, where the trainer's (seed, rank >= 0, ...) never has it


@dataclass
class PromptBatch:
    """B prompts with their stored embeddings.

    prompts (B); keys (B) the prompts' store keys; text: tokens [B, T, D], pooled [B, D], mask [B, T]
    (float32 from the fp16 store); prior_texts (B x S) prompt + suffix for each of the store's S prior
    suffixes, row-major; prior_text: their encodings [B S, 77, C] (None when S = 0).
    """

    prompts: list[str]
    keys: list[str]
    text: TextEmbedding
    prior_texts: list[str]
    prior_text: TextEmbedding | None

    def pin_memory(self) -> "PromptBatch":
        """Called by DataLoader(pin_memory=True): the embeddings in page-locked memory, for asynchronous copies to the GPU."""
        pin = lambda e: None if e is None else TextEmbedding(e.tokens.pin_memory(), e.pooled.pin_memory(), e.mask.pin_memory())  # noqa: E731
        return PromptBatch(self.prompts, self.keys, pin(self.text), self.prior_texts, pin(self.prior_text))

    @classmethod
    def encode(cls, prompts: list[str], text_encoder, prior_encoder=None, prior_suffixes: list[str] = ()) -> "PromptBatch":
        """A batch encoded on the spot instead of read from a store, for benchmarks and tests: the generator's text by
        ``text_encoder``, and with ``prior_encoder``, each prompt + suffix of ``prior_suffixes`` (what the store holds for the
        prior: builders.prior_store_suffixes) by it."""
        prompts = list(prompts)
        prior_texts = [p + s for p in prompts for s in prior_suffixes] if prior_encoder is not None else []
        prior_text = prior_encoder.encode(prior_texts) if prior_texts else None
        return cls(prompts, [prompt_key(p) for p in prompts], text_encoder.encode(prompts), prior_texts, prior_text)


def check_corpus_fits_a_step(n_prompts: int, batch_size: int, world: int) -> None:
    """One step takes world x batch_size distinct prompts; a smaller corpus split cannot fill it."""
    if n_prompts < world * batch_size:
        raise StoreError(
            f"the corpus split has {n_prompts} prompts, fewer than the {world * batch_size} one step takes "
            f"({world} processes x train.prompts_per_step={batch_size}); lower train.prompts_per_step or use fewer processes"
        )


class EpochPlan:
    """Which stored sample each rank's micro-batches hold (module docstring)."""

    def __init__(self, sizes: list[int], batch_size: int, world: int, seed: int):
        self.sizes, self.batch_size, self.world, self.seed = list(sizes), int(batch_size), int(world), int(seed)
        self.n = sum(self.sizes)
        self.batches_per_epoch = self.n // (self.world * self.batch_size)
        check_corpus_fits_a_step(self.n, self.batch_size, self.world)
        self._epoch, self._within = None, {}

    def _order(self, epoch: int) -> tuple[list[int], list[int]]:
        if self._epoch != epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, LOADER_STREAM, epoch))
            shards = torch.randperm(len(self.sizes), generator=g).tolist()
            starts = [0]
            for s in shards:
                starts.append(starts[-1] + self.sizes[s])
            self._epoch, self._shards, self._starts, self._within = epoch, shards, starts, {}
        return self._shards, self._starts

    def _within_shard(self, epoch: int, shard: int) -> list[int]:
        perm = self._within.get(shard)
        if perm is None:
            g = torch.Generator().manual_seed(derived_seed(self.seed, LOADER_STREAM, epoch, shard))
            perm = self._within[shard] = torch.randperm(self.sizes[shard], generator=g).tolist()
        return perm

    def batch(self, rank: int, m: int) -> list[tuple[int, int]]:
        """Micro-batch m of rank ``rank`` -> B (shard, sample index within the shard's tar) pairs."""
        epoch, i = divmod(m, self.batches_per_epoch)
        shards, starts = self._order(epoch)
        first = (rank * self.batches_per_epoch + i) * self.batch_size
        out = []
        for position in range(first, first + self.batch_size):
            j = bisect.bisect_right(starts, position) - 1
            shard = shards[j]
            out.append((shard, self._within_shard(epoch, shard)[position - starts[j]]))
        return out


class StoreBatches(IterableDataset):
    """Micro-batches [start, stop) of one rank as PromptBatch objects (see the module docstring)."""

    def __init__(self, store_dir: str | Path, batch_size: int, *, rank: int, world: int, seed: int, start: int, stop: int):
        self.store = Path(store_dir)
        self.manifest = load_manifest(self.store)
        self.plan = EpochPlan(shard_sizes(self.manifest), batch_size, world, seed)
        self.rank, self.start, self.stop = rank, start, stop
        self.suffixes = self.manifest["prior_suffixes"]

    def _read_shard(self, shard: int) -> list[dict]:
        """The shard's samples, checked (size, sha256, keys, texts, arrays); StoreError naming it if any check fails."""
        return read_shard(self.store, self.manifest, shard)

    def _collate(self, samples: list[dict]) -> PromptBatch:
        prompts = [s["txt"] for s in samples]
        stack = lambda name, dtype: torch.from_numpy(np.stack([s[name] for s in samples])).to(dtype)  # noqa: E731
        text = TextEmbedding(stack("tokens.npy", torch.float32), stack("pooled.npy", torch.float32), stack("mask.npy", torch.bool))
        prior_texts, prior_text = [], None
        if self.suffixes:
            prior_texts = [p + suffix for p in prompts for suffix in self.suffixes]
            tokens, pooled, mask = stack("prior_tokens.npy", torch.float32), stack("prior_pooled.npy", torch.float32), stack("prior_mask.npy", torch.bool)
            prior_text = TextEmbedding(tokens.flatten(0, 1), pooled.flatten(0, 1), mask.flatten(0, 1))
        return PromptBatch(prompts, [s["__key__"] for s in samples], text, prior_texts, prior_text)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cache: dict[int, list[dict]] = {}
        for m in range(self.start + worker, self.stop, workers):
            members = self.plan.batch(self.rank, m)
            needed = {shard for shard, _ in members}
            try:
                cache = {shard: cache[shard] if shard in cache else self._read_shard(shard) for shard in sorted(needed)}
            except StoreError as err:  # handed over as data: PyTorch would re-raise it with the worker's traceback in its text
                yield StoreFailure(str(err))
                return
            yield self._collate([cache[shard][k] for shard, k in members])


@dataclass
class StoreFailure:
    """A StoreError met while reading a batch (in a data-loader worker), re-raised by StoreLoader in the training process."""

    message: str


class StoreLoader(DataLoader):
    """DataLoader over StoreBatches whose iteration raises a worker's StoreError as a plain StoreError (its message only)."""

    def __iter__(self):
        for item in super().__iter__():
            if isinstance(item, StoreFailure):
                raise StoreError(item.message)
            yield item


def batch_loader(store_dir: str | Path, batch_size: int, *, rank: int, world: int, seed: int, start: int, stop: int,
                 num_workers: int = 0, pin_memory: bool = False) -> StoreLoader:
    """A DataLoader yielding this rank's micro-batches start, start + 1, ..., stop - 1 in order."""
    dataset = StoreBatches(store_dir, batch_size, rank=rank, world=world, seed=seed, start=start, stop=stop)
    workers = max(0, min(num_workers, stop - start))
    return StoreLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                       prefetch_factor=2 if workers else None, persistent_workers=False)
