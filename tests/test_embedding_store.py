"""The text-embedding store: contents equal the encoders' output, few files, order-independent identity,
an interrupted build resumes, and a store of other prompts or other encoders is refused."""

from __future__ import annotations

import json
import math

import pytest
import torch

from amortized3d.data.embedding_store import (
    StoreError, auto_shard_size, build_store, load_manifest, prompt_key, prompts_digest, shard_sizes, store_order,
)
from amortized3d.data.loader import batch_loader
from amortized3d.data.shapeworld import shapeworld_corpus
from amortized3d.text.hashed_encoder import HashedTextEncoder

PROMPTS = shapeworld_corpus("shapeworld-4k")["train"][:50]


def read_all(store) -> list:
    """Every stored sample once: one rank, batches of 1, one epoch (50 // 1 batches)."""
    return [b for b in batch_loader(store, 1, rank=0, world=1, seed=0, start=0, stop=load_manifest(store)["n_prompts"])]


def test_store_holds_the_encoder_output_in_few_files(tmp_path):
    encoder = HashedTextEncoder(dim=32)
    manifest = build_store(PROMPTS, encoder, tmp_path, shard_size=16, batch_size=7, progress=False)
    assert manifest["shards"] == [f"shard-{i:06d}.tar" for i in range(math.ceil(50 / 16))] and shard_sizes(manifest) == [16, 16, 16, 2]
    assert len(list(tmp_path.glob("*.tar"))) == 4  # files per prompt: 4 / 50, plus the manifest
    batches = read_all(tmp_path)
    assert sorted(b.prompts[0] for b in batches) == sorted(PROMPTS)
    expected = encoder.encode(PROMPTS)
    for b in batches[::7]:
        i = PROMPTS.index(b.prompts[0])
        assert b.keys == [prompt_key(PROMPTS[i])] and b.prior_text is None
        assert b.text.tokens.shape == (1, 77, 32)
        torch.testing.assert_close(b.text.tokens[0], expected.tokens[i], atol=2e-3, rtol=1e-2)  # fp16 storage
        torch.testing.assert_close(b.text.pooled[0], expected.pooled[i], atol=2e-3, rtol=1e-2)
        assert torch.equal(b.text.mask[0], expected.mask[i])


def test_store_order_and_identity_do_not_depend_on_the_corpus_order(tmp_path):
    shuffled = PROMPTS[::-1]
    assert prompts_digest(shuffled) == prompts_digest(PROMPTS) != prompts_digest(PROMPTS[:-1])
    assert [PROMPTS[i] for i in store_order(PROMPTS)] == [shuffled[i] for i in store_order(shuffled)]
    encoder = HashedTextEncoder(dim=16)
    build_store(PROMPTS, encoder, tmp_path, shard_size=10, progress=False)
    assert load_manifest(tmp_path, shuffled, encoder.identity)["n_prompts"] == 50


def test_prior_suffixes_are_stored_per_prompt(tmp_path):
    encoder, prior_encoder = HashedTextEncoder(dim=16), HashedTextEncoder(dim=24)
    suffixes = ["", ", front view"]
    build_store(PROMPTS[:10], encoder, tmp_path, prior_encoder=prior_encoder, prior_suffixes=suffixes, shard_size=4, progress=False)
    batch = next(iter(batch_loader(tmp_path, 3, rank=0, world=1, seed=0, start=0, stop=1)))
    assert batch.prior_texts == [p + s for p in batch.prompts for s in suffixes]
    expected = prior_encoder.encode(batch.prior_texts)
    assert batch.prior_text.tokens.shape == (6, 77, 24)
    torch.testing.assert_close(batch.prior_text.tokens, expected.tokens, atol=2e-3, rtol=1e-2)
    torch.testing.assert_close(batch.prior_text.pooled, expected.pooled, atol=2e-3, rtol=1e-2)
    with pytest.raises(StoreError, match="prior texts"):
        load_manifest(tmp_path, PROMPTS[:10], encoder.identity, prior_encoder.identity, [""])


def test_interrupted_build_resumes_and_foreign_stores_are_refused(tmp_path):
    encoder = HashedTextEncoder(dim=16)
    build_store(PROMPTS, encoder, tmp_path, shard_size=10, progress=False)
    kept = tmp_path / "shard-000000.tar"
    stamp = kept.stat().st_mtime_ns
    (tmp_path / "shard-000003.tar").unlink()  # as if the build had stopped before it
    with pytest.raises(StoreError, match="incomplete: 1 shards missing"):
        load_manifest(tmp_path)
    build_store(PROMPTS, encoder, tmp_path, shard_size=10, progress=False)
    assert kept.stat().st_mtime_ns == stamp and load_manifest(tmp_path, PROMPTS, encoder.identity)["n_prompts"] == 50
    with pytest.raises(StoreError, match="another encoder_id"):
        build_store(PROMPTS, HashedTextEncoder(dim=8), tmp_path, shard_size=10, progress=False)
    with pytest.raises(StoreError, match="another shard_size"):
        build_store(PROMPTS, encoder, tmp_path, shard_size=5, progress=False)
    with pytest.raises(StoreError, match="other prompts"):
        load_manifest(tmp_path, PROMPTS[:-1])
    with pytest.raises(StoreError, match="text encoder"):
        load_manifest(tmp_path, PROMPTS, "hashed-v1-d8-t77")


def test_a_build_interrupted_before_its_end_keeps_its_identity(tmp_path):
    # The manifest is written first: a resumed build with other settings is refused, not mixed with the old shards.
    encoder = HashedTextEncoder(dim=16)
    build_store(PROMPTS, encoder, tmp_path, shard_size=10, rank=1, world=2, progress=False)  # rank 1 alone: no manifest yet
    assert not (tmp_path / "manifest.json").exists()
    build_store(PROMPTS, encoder, tmp_path, shard_size=10, rank=0, world=2, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shard_size"] == 10 and len(list(tmp_path.glob("*.tar"))) == 5
    assert load_manifest(tmp_path, PROMPTS, encoder.identity)["n_prompts"] == 50


def test_two_ranks_build_their_own_shards(tmp_path):
    encoder = HashedTextEncoder(dim=16)
    build_store(PROMPTS, encoder, tmp_path, shard_size=10, rank=1, world=2, progress=False)
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shard-000001.tar", "shard-000003.tar"]


def test_automatic_shard_size_targets_tens_of_megabytes():
    # 77 x 1024 fp16 tokens are 158 KB a prompt: about 64 MB is 400-odd prompts.
    assert 380 <= auto_shard_size(77, 1024) <= 440
    # plus four 77 x 4096 T5 view prompts (2.5 MB): about 24 prompts
    assert 22 <= auto_shard_size(77, 1024, prior_suffixes=4, prior_dim=4096) <= 26
    assert auto_shard_size(77, 8) == 4096 and auto_shard_size(77, 1024, prior_suffixes=40, prior_dim=4096) == 16  # the limits


def test_damaged_manifest_and_non_finite_embeddings_are_refused(tmp_path):
    encoder = HashedTextEncoder(dim=16)
    build_store(PROMPTS, encoder, tmp_path / "a", shard_size=10, progress=False)
    (tmp_path / "a" / "manifest.json").write_text('{"encoder_id": ')
    with pytest.raises(StoreError, match="manifest.json is damaged"):
        load_manifest(tmp_path / "a")

    class Overflowing(HashedTextEncoder):
        def encode(self, prompts):
            emb = super().encode(prompts)
            emb.tokens[-1, 0, 0] = float("inf")
            return emb

    with pytest.raises(StoreError, match="non-finite embeddings for"):
        build_store(PROMPTS, Overflowing(dim=16), tmp_path / "b", shard_size=10, progress=False)
