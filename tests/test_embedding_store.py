"""The text-embedding store: contents equal the encoders' output, few files, order-independent identity,
an interrupted build resumes, a store of other prompts or other encoders is refused, and every shard's
sha256, size and prompt keys are recorded and checked: a damaged or foreign shard is rebuilt, never adopted."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tarfile
import threading

import pytest
import torch

from amortized3d.data.embedding_store import (
    StoreError, auto_shard_size, build_store, load_manifest, prompt_key, prompts_digest, shard_sizes, store_order,
)
from amortized3d.data.loader import batch_loader
from amortized3d.shapeworld import shapeworld_corpus
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


# --- integrity: shard digests and keys in the manifest, checks at load, foreign shards rebuilt, --rebuild ---

def key_of(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32]


def expected_chunks(prompts, size: int) -> list[list[str]]:
    """The prompts of each shard by the store format: sorted by their key, ``size`` per shard."""
    ordered = sorted(prompts, key=key_of)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def shard_texts(path) -> list[str]:
    """The txt members of a shard in file order, read with tarfile."""
    with tarfile.open(path) as tar:
        return [tar.extractfile(m).read().decode("utf-8") for m in tar.getmembers() if m.name.endswith(".txt")]


def file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip_a_data_byte(path) -> None:
    """Flip a byte inside the first sample's tokens.npy array data; the tar stays valid and the size the same."""
    with tarfile.open(path) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith("tokens.npy"))
    data = bytearray(path.read_bytes())
    data[m.offset_data + m.size - 5] ^= 0x5A
    path.write_bytes(bytes(data))


def assert_recorded_as_built(store, prompts, size: int) -> None:
    """The manifest records, per shard, the sha256 and size of its file and the digest of its keys, and every shard
    holds exactly its prompts; no record files are left over."""
    manifest = json.loads((store / "manifest.json").read_text())
    chunks = expected_chunks(prompts, size)
    assert manifest["format"] == 2 and manifest["shards"] == [f"shard-{i:06d}.tar" for i in range(len(chunks))]
    for name, info, chunk in zip(manifest["shards"], manifest["shard_info"], chunks):
        assert shard_texts(store / name) == chunk
        assert info == {"samples": len(chunk), "keys_sha256": hashlib.sha256("\n".join(map(key_of, chunk)).encode()).hexdigest(),
                        "sha256": file_digest(store / name), "bytes": (store / name).stat().st_size}
    assert not list(store.glob("*.tar.json")) and not list(store.glob(".*.tmp"))


def test_the_manifest_records_each_shards_digest_and_keys(tmp_path):
    build_store(PROMPTS, HashedTextEncoder(dim=16), tmp_path, shard_size=16, progress=False)
    assert_recorded_as_built(tmp_path, PROMPTS, 16)
    arrays = json.loads((tmp_path / "manifest.json").read_text())["arrays"]
    assert arrays == {"tokens.npy": {"dtype": "float16", "shape": [77, 16]}, "pooled.npy": {"dtype": "float16", "shape": [16]},
                      "mask.npy": {"dtype": "bool", "shape": [77]}}


def test_load_manifest_checks_sizes_and_with_sha256_every_byte(tmp_path):
    build_store(PROMPTS, HashedTextEncoder(dim=16), tmp_path, shard_size=10, progress=False)
    flip_a_data_byte(tmp_path / "shard-000001.tar")
    load_manifest(tmp_path)  # the same size: only a hash finds it (the loader hashes each shard it reads)
    with pytest.raises(StoreError, match=r"shard-000001\.tar does not match its sha256.*store build --rebuild"):
        load_manifest(tmp_path, verify="sha256")
    shard = tmp_path / "shard-000003.tar"
    shard.write_bytes(shard.read_bytes()[:-512])
    with pytest.raises(StoreError, match=r"shard-000003\.tar is \d+ bytes, the manifest records \d+.*store build --rebuild"):
        load_manifest(tmp_path)


def test_a_build_rebuilds_the_shards_that_do_not_match_their_record(tmp_path, capsys):
    encoder = HashedTextEncoder(dim=16)
    build_store(PROMPTS, encoder, tmp_path, shard_size=10, progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    truncated, flipped = tmp_path / "shard-000003.tar", tmp_path / "shard-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[:1000])
    flip_a_data_byte(flipped)
    build_store(PROMPTS, encoder, tmp_path, shard_size=10, progress=False)  # as at training start: sizes only
    assert "shard-000003.tar is 1000 bytes" in capsys.readouterr().err
    assert file_digest(truncated) == json.loads((tmp_path / "manifest.json").read_text())["shard_info"][3]["sha256"]
    with pytest.raises(StoreError, match="shard-000001.tar"):
        load_manifest(tmp_path, verify="sha256")
    build_store(PROMPTS, encoder, tmp_path, shard_size=10, progress=False, verify="sha256")  # as `amortized3d store build`
    assert "shard-000001.tar does not match its recorded sha256; rebuilding it" in capsys.readouterr().err
    assert_recorded_as_built(tmp_path, PROMPTS, 10)
    load_manifest(tmp_path, PROMPTS, encoder.identity, verify="sha256")
    assert all(p.stat().st_mtime_ns == stamps[p.name] for p in tmp_path.glob("*.tar") if p.name not in (truncated.name, flipped.name))


class NegatedEncoder(HashedTextEncoder):
    """Another encoder of the same width: a shard it built holds the right keys and shapes but other embeddings."""

    def __init__(self, dim):
        super().__init__(dim)
        self.identity = f"negated-{self.identity}"

    def encode(self, prompts):
        emb = super().encode(prompts)
        return type(emb)(-emb.tokens, -emb.pooled, emb.mask)


@pytest.mark.parametrize("foreign", ["another corpus", "another encoder"])
def test_a_foreign_shard_is_rebuilt_when_the_manifest_was_deleted(tmp_path, foreign, capsys):
    from amortized3d.builders import build_text_encoder, prepare_store
    from amortized3d.config import load_config
    from amortized3d.data.corpora import load_corpus

    store = tmp_path / "store"
    cfg = load_config("shapeworld-16", overrides=[f"data.store={store}", "text.dim=16", "data.shard_size=4"])
    prompts = load_corpus("shapeworld-16").train
    encoder = build_text_encoder(cfg)
    prepare_store(cfg, prompts, encoder, progress=False)
    if foreign == "another corpus":
        build_store(PROMPTS[:16], HashedTextEncoder(dim=16), tmp_path / "other", shard_size=4, progress=False)
    else:
        build_store(prompts, NegatedEncoder(dim=16), tmp_path / "other", shard_size=4, progress=False)
    shutil.copyfile(tmp_path / "other" / "shard-000001.tar", store / "shard-000001.tar")
    (store / "manifest.json").unlink()
    stamps = {p.name: p.stat().st_mtime_ns for p in store.glob("*.tar")}
    prepare_store(cfg, prompts, encoder, progress=False)
    assert "shard-000001.tar is not recorded as a shard of this store" in capsys.readouterr().err
    assert_recorded_as_built(store, prompts, 4)
    assert [name for name, stamp in stamps.items() if (store / name).stat().st_mtime_ns != stamp] == ["shard-000001.tar"]  # the others adopted
    batches = list(batch_loader(store, 1, rank=0, world=1, seed=0, start=0, stop=16))
    assert sorted(b.prompts[0] for b in batches) == sorted(prompts)
    for b in batches:
        torch.testing.assert_close(b.text.tokens, encoder.encode(b.prompts).tokens, atol=2e-3, rtol=1e-2)


def test_a_store_of_the_previous_format_is_refused_then_upgraded_by_a_build(tmp_path):
    encoder = HashedTextEncoder(dim=16)
    build_store(PROMPTS, encoder, tmp_path, shard_size=10, progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for key in ("format", "arrays", "shard_info"):
        del manifest[key]  # as the previous version wrote it
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match=r"earlier version.*without per-shard sha256.*--rebuild"):
        load_manifest(tmp_path)
    with pytest.raises(StoreError, match="earlier version"):
        batch_loader(tmp_path, 1, rank=0, world=1, seed=0, start=0, stop=1)
    change = tmp_path / "shard-000004.tar"  # and one shard whose text no longer matches its key
    with tarfile.open(change) as tar:
        m = next(m for m in tar.getmembers() if m.name.endswith(".txt"))
    data = bytearray(change.read_bytes())
    data[m.offset_data] = ord("b") if data[m.offset_data] != ord("b") else ord("c")
    change.write_bytes(bytes(data))
    stamps = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.tar")}
    build_store(PROMPTS, encoder, tmp_path, shard_size=10, progress=False)
    assert_recorded_as_built(tmp_path, PROMPTS, 10)
    assert [name for name, stamp in stamps.items() if (tmp_path / name).stat().st_mtime_ns != stamp] == ["shard-000004.tar"]
    assert load_manifest(tmp_path, PROMPTS, encoder.identity)["n_prompts"] == 50


def test_rebuild_replaces_every_shard_and_keeps_other_files(tmp_path):
    encoder = HashedTextEncoder(dim=16)
    build_store(PROMPTS, encoder, tmp_path, shard_size=10, progress=False)
    (tmp_path / "manifest.json").write_text('{"encoder_id": ')  # damaged: a plain build refuses it
    (tmp_path / "notes.txt").write_text("mine")
    inodes = {p.name: p.stat().st_ino for p in tmp_path.glob("*.tar")}
    with pytest.raises(StoreError, match="damaged"):
        build_store(PROMPTS, encoder, tmp_path, shard_size=10, progress=False)
    build_store(PROMPTS, encoder, tmp_path, shard_size=10, progress=False, rebuild=True)
    assert_recorded_as_built(tmp_path, PROMPTS, 10)
    assert all((tmp_path / name).stat().st_ino != inode for name, inode in inodes.items())
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="needs a barrier"):
        build_store(PROMPTS, encoder, tmp_path, shard_size=10, progress=False, rebuild=True, rank=0, world=2)


def test_ranks_building_concurrently_record_every_shard(tmp_path):
    # Two ranks as threads with a real barrier, on a store with a damaged shard and a foreign file, rebuilding:
    # rank 0 deletes, both build their shards and write their records, rank 0 folds them into the manifest.
    encoder = HashedTextEncoder(dim=16)
    build_store(PROMPTS, encoder, tmp_path, shard_size=10, progress=False)
    flip_a_data_byte(tmp_path / "shard-000002.tar")
    barrier = threading.Barrier(2, timeout=120)
    results, errors = {}, []

    def rank(r):
        try:
            results[r] = build_store(PROMPTS, HashedTextEncoder(dim=16), tmp_path, shard_size=10, rank=r, world=2,
                                     barrier=barrier.wait, progress=False, rebuild=True)
        except Exception as err:  # noqa: BLE001 - re-raised below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert_recorded_as_built(tmp_path, PROMPTS, 10)
    assert results[0]["shard_info"] == results[1]["shard_info"] == json.loads((tmp_path / "manifest.json").read_text())["shard_info"]
    load_manifest(tmp_path, PROMPTS, encoder.identity, verify="sha256")


def test_store_build_command_repairs_and_rebuilds_a_damaged_store(tmp_path, capsys):
    from amortized3d.cli import main
    from amortized3d.data.corpora import load_corpus

    store = tmp_path / "store"
    args = ["--corpus", "shapeworld-16", f"data.store={store}", "text.dim=16", "data.shard_size=4"]
    prompts = load_corpus("shapeworld-16").train
    assert main(["store", "build", *args]) == 0
    assert json.loads(capsys.readouterr().out)["n_prompts"] == 16
    assert_recorded_as_built(store, prompts, 4)
    flip_a_data_byte(store / "shard-000001.tar")
    assert main(["store", "info", *args]) == 2  # info hashes every shard
    assert "shard-000001.tar does not match its sha256" in capsys.readouterr().err
    assert main(["store", "build", *args]) == 0  # build re-hashes and rebuilds the damaged shard
    assert_recorded_as_built(store, prompts, 4)
    (store / "manifest.json").write_text("{")
    (store / "shard-000002.tar").write_bytes(b"junk")
    assert main(["store", "build", *args]) == 2
    assert "manifest.json is damaged" in capsys.readouterr().err
    assert main(["store", "build", "--rebuild", *args]) == 0
    assert_recorded_as_built(store, prompts, 4)
    assert main(["store", "info", *args]) == 0


@pytest.mark.parametrize("version", [(1, 0), (2, 0)])
def test_npy_members_read_exactly_as_numpy_reads_them(version):
    """Reference: numpy.lib.format.read_array on the bytes numpy.lib.format.write_array wrote, for the dtypes and
    shapes a store holds and the corner shapes (0-d, 1-d, a zero-length axis, axes past 2**16); any other header
    form, dtype or data length is refused with ValueError."""
    import io

    import numpy as np

    from amortized3d.data.embedding_store import _npy_view

    rng = np.random.default_rng(0)
    cases = [rng.standard_normal((77, 16)).astype(np.float16), rng.standard_normal(16).astype(np.float32),
             rng.random(77) > 0.5, np.float16(3.5).reshape(()), np.zeros((0, 4), np.float16),
             np.arange(70_000, dtype=np.int64), rng.standard_normal((2, 77, 8)).astype(">f4")]
    for array in cases:
        out = io.BytesIO()
        np.lib.format.write_array(out, array, version=version)
        data = out.getvalue()
        want = np.lib.format.read_array(io.BytesIO(data))
        got = _npy_view(memoryview(data))
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)
        for bad in (data[:-1], data + b"\0", data.replace(b"'fortran_order': False", b"'fortran_order': True "),
                    data.replace(b"'descr'", b"'DESCR'"), b"\x93NUMPX" + data[6:], data[:9]):
            with pytest.raises(ValueError):
                _npy_view(memoryview(bad))
    objects = io.BytesIO()
    np.lib.format.write_array(objects, np.array([{}, 1], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        _npy_view(memoryview(objects.getvalue()))
