"""The text-embedding store: contents equal the encoder's output, ranks split it disjointly and cover it,
an interrupted build resumes, and a store of other prompts or another encoder is refused."""

from __future__ import annotations

import math

import pytest
import torch

from amortized3d.data.embedding_store import StoreError, build_store, load_manifest, stream
from amortized3d.data.shapeworld import shapeworld_corpus
from amortized3d.text.hashed_encoder import HashedTextEncoder

PROMPTS = shapeworld_corpus("shapeworld-4k")["train"][:50]


def test_store_holds_the_encoder_output_in_few_files(tmp_path):
    encoder = HashedTextEncoder(dim=32)
    manifest = build_store(PROMPTS, encoder, tmp_path, encoder_id="hashed-32", shard_size=16, batch_size=7, progress=False)
    assert manifest["shards"] == [f"shard-{i:06d}.tar" for i in range(math.ceil(50 / 16))]
    assert len(list(tmp_path.glob("*.tar"))) == 4  # files per prompt: 4 / 50, plus the manifest
    samples = sorted(stream(tmp_path), key=lambda s: s["index"])
    assert [s["index"] for s in samples] == list(range(50)) and [s["prompt"] for s in samples] == PROMPTS
    expected = encoder.encode(PROMPTS)
    for s in samples[::7]:
        i = s["index"]
        assert s["tokens"].dtype == torch.float16 and s["tokens"].shape == (77, 32)
        torch.testing.assert_close(s["tokens"].float(), expected.tokens[i], atol=2e-3, rtol=1e-2)
        torch.testing.assert_close(s["pooled"].float(), expected.pooled[i], atol=2e-3, rtol=1e-2)
        assert torch.equal(s["mask"], expected.mask[i])


def test_ranks_split_each_epoch_disjointly_and_cover_the_split(tmp_path):
    build_store(PROMPTS, HashedTextEncoder(dim=16), tmp_path, encoder_id="hashed-16", shard_size=5, progress=False)
    orders = []
    for epoch in (0, 1):
        seen = [[s["index"] for s in stream(tmp_path, rank=r, world=3, seed=7, epoch=epoch)] for r in range(3)]
        assert sum(len(x) for x in seen) == 50 and sorted(sum(seen, [])) == list(range(50))
        assert not (set(seen[0]) & set(seen[1]) or set(seen[0]) & set(seen[2]) or set(seen[1]) & set(seen[2]))
        orders.append(seen[0])
    assert orders[0] != orders[1]  # a new shard order each epoch


def test_interrupted_build_resumes_and_foreign_stores_are_refused(tmp_path):
    encoder = HashedTextEncoder(dim=16)
    build_store(PROMPTS, encoder, tmp_path, encoder_id="hashed-16", shard_size=10, progress=False)
    kept = tmp_path / "shard-000000.tar"
    stamp = kept.stat().st_mtime_ns
    (tmp_path / "shard-000003.tar").unlink()  # as if the build had stopped before it
    with pytest.raises(StoreError, match="incomplete: 1 shards missing"):
        load_manifest(tmp_path)
    build_store(PROMPTS, encoder, tmp_path, encoder_id="hashed-16", shard_size=10, progress=False)
    assert kept.stat().st_mtime_ns == stamp and load_manifest(tmp_path, PROMPTS, "hashed-16")["n_prompts"] == 50
    with pytest.raises(StoreError, match="another encoder_id"):
        build_store(PROMPTS, encoder, tmp_path, encoder_id="clip", shard_size=10, progress=False)
    with pytest.raises(StoreError, match="other prompts"):
        load_manifest(tmp_path, PROMPTS[:-1])


def test_two_ranks_build_their_own_shards(tmp_path):
    encoder = HashedTextEncoder(dim=16)
    build_store(PROMPTS, encoder, tmp_path, encoder_id="h", shard_size=10, rank=1, world=2, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000001.tar", "shard-000003.tar"]
    build_store(PROMPTS, encoder, tmp_path, encoder_id="h", shard_size=10, rank=0, world=2, progress=False)
    assert len(list(tmp_path.glob("*.tar"))) == 5 and load_manifest(tmp_path, PROMPTS, "h")["n_prompts"] == 50
