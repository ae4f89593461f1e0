"""Streaming batches from the store: ranks disjoint with equal step counts, per-epoch shuffles, the same
order for any number of data-loader workers, resuming at any micro-batch, and a damaged shard named."""

from __future__ import annotations

import pytest

from amortized3d.data.embedding_store import StoreError, build_store
from amortized3d.data.loader import EpochPlan, batch_loader
from amortized3d.data.shapeworld import shapeworld_corpus
from amortized3d.text.hashed_encoder import HashedTextEncoder

PROMPTS = shapeworld_corpus("shapeworld-4k")["train"][:50]


@pytest.mark.parametrize("sizes, batch, world", [([10, 10, 10, 10, 10], 4, 3), ([16, 16, 16, 2], 3, 2), ([7], 2, 1), ([4] * 8, 2, 4)])
def test_plan_splits_each_epoch_disjointly_with_equal_counts(sizes, batch, world):
    plan = EpochPlan(sizes, batch, world, seed=5)
    n = sum(sizes)
    nb = n // (world * batch)
    assert plan.batches_per_epoch == nb
    every = {(s, k) for s, size in enumerate(sizes) for k in range(size)}
    orders = []
    for epoch in range(3):
        per_rank = [[item for i in range(nb) for item in plan.batch(r, epoch * nb + i)] for r in range(world)]
        flat = [item for items in per_rank for item in items]
        assert all(len(items) == nb * batch for items in per_rank)  # equal step counts
        assert len(set(flat)) == len(flat) == nb * world * batch  # no sample twice in an epoch, across all ranks
        assert set(flat) <= every and len(every - set(flat)) == n - nb * world * batch  # all but the remainder
        # locality: a rank reads a run of consecutive shards of the epoch order, not all of them
        shards_read = [len({s for s, _ in items}) for items in per_rank]
        assert max(shards_read) <= -(-nb * batch // min(sizes)) + 1
        orders.append(flat)
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch


def test_plan_refuses_a_corpus_smaller_than_one_step():
    with pytest.raises(StoreError, match="fewer than the 8 one step takes"):
        EpochPlan([5], 4, 2, seed=0)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("store")
    build_store(PROMPTS, HashedTextEncoder(dim=16), folder, shard_size=8, progress=False)
    return folder


def prompts_of(loader) -> list[list[str]]:
    return [b.prompts for b in loader]


def test_ranks_stream_disjoint_batches_that_cover_the_epoch(store):
    world, batch = 3, 4  # 50 prompts: 4 batches of 4 per rank and epoch, 2 prompts sit each epoch out
    epochs = []
    for epoch in range(2):
        seen = [prompts_of(batch_loader(store, batch, rank=r, world=world, seed=7, start=4 * epoch, stop=4 * (epoch + 1))) for r in range(world)]
        flat = [p for rank in seen for b in rank for p in b]
        assert all(len(rank) == 4 and all(len(b) == batch for b in rank) for rank in seen)
        assert len(set(flat)) == 48 and set(flat) <= set(PROMPTS)
        epochs.append(set(PROMPTS) - set(flat))
    assert epochs[0] != epochs[1]  # a different two sit out each epoch


def test_order_is_the_same_for_any_number_of_workers(store):
    reference = prompts_of(batch_loader(store, 3, rank=1, world=2, seed=7, start=0, stop=20))  # 8 batches per epoch: 2.5 epochs
    for workers in (2, 3):
        assert prompts_of(batch_loader(store, 3, rank=1, world=2, seed=7, start=0, stop=20, num_workers=workers)) == reference


def test_resuming_at_any_micro_batch_continues_the_same_stream(store):
    full = prompts_of(batch_loader(store, 3, rank=0, world=2, seed=7, start=0, stop=20))
    for start in (5, 8, 13):
        assert prompts_of(batch_loader(store, 3, rank=0, world=2, seed=7, start=start, stop=20, num_workers=2)) == full[start:]


def test_damaged_shard_is_named(tmp_path):
    build_store(PROMPTS[:20], HashedTextEncoder(dim=16), tmp_path, shard_size=10, progress=False)
    shard = tmp_path / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(StoreError, match="shard-000001.tar"):
        prompts_of(batch_loader(tmp_path, 10, rank=0, world=1, seed=0, start=0, stop=2))
