"""Streaming batches from the store: ranks disjoint with equal step counts, per-epoch shuffles, the same
order for any number of data-loader workers, resuming at any micro-batch, and a damaged or foreign shard refused
with a StoreError naming it before any of its samples is yielded (its bytes, keys, texts and arrays are checked)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile

import numpy as np
import pytest
import torch

from amortized3d.data.embedding_store import StoreError, build_store
from amortized3d.data.loader import EpochPlan, batch_loader
from amortized3d.shapeworld import shapeworld_corpus
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


# --- integrity: a damaged or foreign shard is refused with a StoreError naming it, and none of its samples is yielded ---

OTHER_PROMPTS = shapeworld_corpus("shapeworld-4k")["train"][50:100]  # another corpus of the same size
DAMAGED = "shard-000002.tar"


def key_of(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


def shard_prompts(prompts, size: int, index: int) -> list[str]:
    """The prompts shard ``index`` holds by the store format: sorted by key, ``size`` per shard."""
    return sorted(prompts, key=key_of)[index * size : (index + 1) * size]


def tar_members(path) -> list[tuple[str, int, int]]:
    """(name, offset of its data in the file, size) of every member, from Python's tarfile."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar.getmembers()]


def member(path, suffix: str, which: int = 3) -> tuple[str, int, int]:
    return [m for m in tar_members(path) if m[0].endswith(suffix)][which]


def set_byte(path, offset: int, value: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[offset] = data[offset] ^ 0x5A if value is None else value
    path.write_bytes(bytes(data))


def rewrite_tar(path, edit) -> None:
    """The shard rewritten as a valid tar, the members of one sample (the fourth) replaced by edit(name, data) (None: left out)."""
    with tarfile.open(path) as tar:
        items = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    key = member(path, "tokens.npy")[0].split(".")[0]  # only one sample's members are edited
    with tarfile.open(path, "w") as tar:
        for name, data in items:
            data = edit(name, data) if name.startswith(key + ".") else data
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def flip_tokens_data(path, other):
    name, offset, size = member(path, "tokens.npy")
    set_byte(path, offset + size - 7)  # inside the array data, after the 128-byte .npy header


def damage_npy_magic(path, other):
    set_byte(path, member(path, "tokens.npy")[1] + 1, ord("X"))  # b"\x93NUMPY" -> b"\x93XUMPY"


def damage_npy_header(path, other):
    set_byte(path, member(path, "tokens.npy")[1] + 10, ord("("))  # the header dict's opening "{"


def replace_by_other_corpus(path, other):
    shutil.copyfile(other / path.name, path)


def truncate(path, other):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def change_txt(path, other):
    name, offset, size = member(path, ".txt")
    data = path.read_bytes()
    set_byte(path, offset, ord("b") if data[offset] != ord("b") else ord("c"))  # same length, another prompt


def txt_not_utf8(path, other):
    set_byte(path, member(path, ".txt")[1], 0xFF)


def drop_tokens(path, other):
    rewrite_tar(path, lambda name, data: None if name.endswith("tokens.npy") else data)


def tokens_of_another_shape(path, other):
    rewrite_tar(path, lambda name, data: npy(np.zeros((76, 16), np.float16)) if name.endswith("tokens.npy") else data)


def pooled_as_float32(path, other):
    rewrite_tar(path, lambda name, data: npy(np.zeros(16, np.float32)) if name.endswith("pooled.npy") else data)


def non_finite_tokens(path, other):
    def edit(name, data):
        if not name.endswith("tokens.npy"):
            return data
        array = np.load(io.BytesIO(data)).copy()
        array[0, 0] = np.inf
        return npy(array)
    rewrite_tar(path, edit)


# (corruption, whether the shard's contents themselves are refused: then also when its recorded digest matches)
CORRUPTIONS = {
    "tokens data byte flipped": (flip_tokens_data, False),
    "npy magic damaged": (damage_npy_magic, True),
    "npy header dict damaged": (damage_npy_header, True),
    "shard of another corpus": (replace_by_other_corpus, True),
    "truncated": (truncate, True),
    "txt changed": (change_txt, True),
    "txt not utf-8": (txt_not_utf8, True),
    "tokens.npy missing": (drop_tokens, True),
    "tokens of another shape": (tokens_of_another_shape, True),
    "pooled as float32": (pooled_as_float32, True),
    "non-finite tokens": (non_finite_tokens, True),
}


@pytest.fixture(scope="module")
def other_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("other")
    build_store(OTHER_PROMPTS, HashedTextEncoder(dim=16), folder, shard_size=8, progress=False)
    return folder


def record_file_digest(store, name: str) -> None:
    """Write the damaged file's own sha256 and size (hashlib) into the manifest, as if it had been built damaged."""
    manifest = json.loads((store / "manifest.json").read_text())
    data = (store / name).read_bytes()
    manifest["shard_info"][manifest["shards"].index(name)].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (store / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("digest", ["as damaged", "digest re-recorded"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_damaged_shard_is_refused_and_none_of_its_samples_is_yielded(store, other_store, tmp_path, case, digest):
    corrupt, structural = CORRUPTIONS[case]
    if digest == "digest re-recorded" and not structural:
        pytest.skip("a flipped byte in the array data is what only the digest can catch")
    folder = tmp_path / "store"
    shutil.copytree(store, folder)
    corrupt(folder / DAMAGED, other_store)
    if digest == "digest re-recorded":
        record_file_digest(folder, DAMAGED)
    yielded = []
    with pytest.raises(StoreError) as refused:
        for batch in batch_loader(folder, 1, rank=0, world=1, seed=0, start=0, stop=50):  # the whole epoch, one sample a batch
            yielded.append(batch)
    message = str(refused.value)
    assert f"shard {folder / DAMAGED}" in message and "amortized3d store build --rebuild" in message
    if digest == "digest re-recorded":
        assert f"shard {folder / DAMAGED} is damaged: " in message  # refused by the content checks, not the digest
    # what was yielded before the refusal is intact: corpus prompts of the other shards, their keys and embeddings
    damaged = set(shard_prompts(PROMPTS, 8, 2))
    encoder = HashedTextEncoder(dim=16)
    for batch in yielded:
        (prompt,) = batch.prompts
        assert prompt in PROMPTS and prompt not in damaged and batch.keys == [key_of(prompt)]
        expected = encoder.encode([prompt])
        torch.testing.assert_close(batch.text.tokens, expected.tokens, atol=2e-3, rtol=1e-2)
        assert torch.equal(batch.text.mask, expected.mask)


def test_a_damaged_shard_is_refused_in_a_worker_too(store, tmp_path):
    folder = tmp_path / "store"
    shutil.copytree(store, folder)
    flip_tokens_data(folder / DAMAGED, None)
    with pytest.raises(StoreError, match=re.escape(str(folder / DAMAGED))) as err:
        prompts_of(batch_loader(folder, 1, rank=0, world=1, seed=0, start=0, stop=50, num_workers=2))
    # the message a user sees is the shard's, not PyTorch's worker traceback around it
    assert "Traceback" not in str(err.value) and "worker process" not in str(err.value) and "\n" not in str(err.value)


def test_each_shard_is_hashed_once_per_read_not_per_batch(store, monkeypatch):
    from amortized3d.data import embedding_store

    hashed = []
    real = embedding_store._sha256
    monkeypatch.setattr(embedding_store, "_sha256", lambda data: hashed.append(len(data)) or real(data))
    batches = prompts_of(batch_loader(store, 1, rank=0, world=1, seed=0, start=0, stop=100))  # two epochs, 100 batches
    assert len(batches) == 100
    assert len(hashed) == 2 * 7  # 7 shards, each read once per epoch
