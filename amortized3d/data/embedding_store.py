"""Text-embedding store: a corpus split encoded once, in batches, into webdataset tar shards.

    STORE/manifest.json        format 2: encoder ids, prior suffixes, corpus, split, prompt count, shard size,
                               order-independent sha256 of the prompt set, the arrays' dtypes and shapes,
                               shard names, and per shard (shard_info) its sample count, the sha256 of its
                               prompt keys in order (known before it is built) and, once it is built, the
                               sha256 and size in bytes of its tar file
    STORE/shard-000000.tar     prompts [s * shard_size, (s + 1) * shard_size) of the store order, one sample each:
                               __key__      sha256 of the prompt (first 32 hex digits)
                               txt          the prompt
                               tokens.npy   float16 [T, D]  the generator's text encoder (text.encoder)
                               pooled.npy   float16 [D]
                               mask.npy     bool [T]
                               and with prior suffixes (S > 0), the prior's own encoder on prompt + suffix:
                               prior_tokens.npy float16 [S, 77, C], prior_pooled.npy [S, C], prior_mask.npy [S, 77]
    STORE/shard-000000.tar.json  while a build runs: the record (sha256, bytes) of a shard its rank finished,
                               until rank 0 folds the records into the manifest at the end of the build

The store order sorts prompts by their sha256, so every shard is a uniform random subset of the
corpus whatever order its file lists them in, and the manifest's digest covers the prompt set,
not its order. A few files per thousand prompts, not files per prompt; shards hold about
TARGET_SHARD_BYTES each unless shard_size is given.

``build_store`` splits the work over ranks (shard s is built by rank s % world) and encodes in
batches. Rank 0 writes the manifest first (after deleting the old store with ``rebuild``), and
after a barrier every rank checks it. A rank writes each shard to a temporary name, hashes it,
renames it and then writes its record next to it (``shard-XXXXXX.tar.json``, also atomically);
after the final barrier rank 0 folds the records into the manifest (a temporary file and
os.replace), deletes them, and a last barrier lets the ranks read the complete manifest. So the
ranks never write the same file, and an interrupted build resumes: a shard whose file matches
its record (by size; by sha256 with ``verify="sha256"``, as `amortized3d store build` does) is
kept, one that does not is rebuilt. A shard file without a record for this manifest (the
manifest was deleted and written anew, the store was built by an earlier version without
digests, or the file was copied in) is never adopted blindly: it is read in full and kept only
if its keys are exactly the prompt keys this shard must hold, every sample passes the checks
below, and its first sample equals the encoders' output for that prompt; otherwise it is rebuilt.
A store built for other prompts or other encoders is refused rather than mixed.

Integrity checks. At training start (builders.prepare_store) every rank runs the build, which
rebuilds its shards whose size differs from their record, and then ``load_manifest``, which checks
that every shard is recorded and has the recorded size: a stat per shard (about 250 for a 16 GB
store). It does not hash them: sha256 runs at about 1 GB/s on one core, so hashing a 16 GB store
at every start would add 15 s or more (more from a cold disk) and would only repeat the loader's
check. ``read_shard`` (the loader, once per shard a worker reads) checks the file's size and
sha256 against the manifest and then parses it: the tar structure, the members of each sample,
that each key equals prompt_key of its UTF-8 text, that the shard's keys are exactly the expected
ones in order, and every array's dtype and shape against the manifest, with finite values. Any
failure is a StoreError naming the shard and the fix (`amortized3d store build --rebuild ...`),
so training never sees a sample whose bytes, key or text do not match. `amortized3d store build`
hashes every finished shard (``verify="sha256"``, each rank its own) and rebuilds the damaged
ones; `amortized3d store info` hashes them all (``load_manifest(verify="sha256")``). A store of
format 1 (no digests) is refused by load_manifest with that advice, and upgraded by any build:
its shards are checked as files without a record and their digests recorded. Training reads
stores through amortized3d.data.loader.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import sys
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from amortized3d.files import atomic_path, sha256_file, write_text_atomic

MANIFEST = "manifest.json"
FORMAT = 2
TARGET_SHARD_BYTES = 64 * 2**20
SHARD_SIZE_LIMITS = (16, 4096)
RECORD_SUFFIX = ".json"  # shard-000000.tar.json: a finished shard's record until it is folded into the manifest
# What a store is bound to: a shard record (and a shard file found in the folder) belongs to this store only if built for all of it.
IDENTITY = ("format", "encoder_id", "prior_encoder_id", "prior_suffixes", "prompts_sha256", "n_prompts", "shard_size", "dtype", "arrays")
LEGACY_IDENTITY = ("encoder_id", "prior_encoder_id", "prior_suffixes", "prompts_sha256", "shard_size")  # what format 1 recorded
# the store's files, and the temporary names amortized3d.files.atomic_path gives them while they are written
_STORE_FILE = re.compile(r"^(manifest\.json|shard-\d{6}\.tar(\.json)?)$|^\.(manifest|shard-\d{6}|shard-\d{6}\.tar)\.\d+\.tmp\.(json|tar)$")


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


def keys_digest(keys: Sequence[str]) -> str:
    """sha256 of a shard's prompt keys in their order: the manifest's shard_info[s]["keys_sha256"]."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


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


def rebuild_hint(store: Path, manifest: dict | None = None) -> str:
    """The fix for a damaged store, for error messages (the loader does not know the run's exact arguments)."""
    corpus = (manifest or {}).get("corpus") or "NAME"
    return (f"rebuild the store: `amortized3d store build --rebuild --corpus {corpus}` with the same --config/overrides as the "
            f"training run (without --rebuild it re-checks every shard's sha256 and rebuilds only the damaged ones), "
            f"or delete the folder {store}")


def _sha256(data) -> str:
    return hashlib.sha256(data).hexdigest()


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def store_id(manifest: dict) -> str:
    """sha256 of the manifest's IDENTITY fields: the store a shard record was written for."""
    return _sha256(json.dumps([manifest.get(key) for key in IDENTITY]).encode())


def _array_specs(emb, prior=None, n_suffixes: int = 0) -> dict:
    specs = {"tokens.npy": ("float16", emb.tokens.shape[1:]), "pooled.npy": ("float16", emb.pooled.shape[1:]),
             "mask.npy": ("bool", emb.mask.shape[1:])}
    if prior is not None:
        specs.update({"prior_tokens.npy": ("float16", (n_suffixes, *prior.tokens.shape[1:])),
                      "prior_pooled.npy": ("float16", (n_suffixes, *prior.pooled.shape[1:])),
                      "prior_mask.npy": ("bool", (n_suffixes, *prior.mask.shape[1:]))})
    return {name: {"dtype": dtype, "shape": [int(n) for n in shape]} for name, (dtype, shape) in specs.items()}


def _record_path(store: Path, name: str) -> Path:
    return store / f"{name}{RECORD_SUFFIX}"


def _write_record(store: Path, manifest: dict, index: int, sha256: str, size: int) -> None:
    info = manifest["shard_info"][index]
    record = {"store": store_id(manifest), "shard": manifest["shards"][index], "keys_sha256": info["keys_sha256"], "sha256": sha256, "bytes": size}
    write_text_atomic(_record_path(store, manifest["shards"][index]), json.dumps(record))


def _read_record(store: Path, manifest: dict, index: int) -> dict | None:
    """The shard's record file, if it was written for this store and this shard's keys."""
    name = manifest["shards"][index]
    try:
        record = json.loads(_record_path(store, name).read_text())
        ok = (record["store"] == store_id(manifest) and record["shard"] == name
              and record["keys_sha256"] == manifest["shard_info"][index]["keys_sha256"]
              and isinstance(record["sha256"], str) and isinstance(record["bytes"], int))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {"sha256": record["sha256"], "bytes": record["bytes"]} if ok else None


def _with_records(store: Path, manifest: dict) -> dict:
    """A copy of the manifest whose shard_info holds each shard's record: from its record file if there is a valid
    one (a shard finished but not yet folded, or rebuilt since), else as the manifest has it."""
    out = dict(manifest, shard_info=[dict(info) for info in manifest["shard_info"]])
    for s, info in enumerate(out["shard_info"]):
        record = _read_record(store, out, s)
        if record is not None:
            info.update(record)
    return out


def _fold_records(store: Path) -> None:
    """Rank 0 at the end of a build: the shards' record files into the manifest (rewritten atomically), then deleted."""
    manifest = _read_manifest(store)
    if manifest.get("format") != FORMAT:
        return
    merged = _with_records(store, manifest)
    if merged["shard_info"] != manifest["shard_info"]:
        write_text_atomic(store / MANIFEST, json.dumps(merged, indent=1))
    for name in manifest["shards"]:
        _record_path(store, name).unlink(missing_ok=True)


def _clear_store(store: Path) -> int:
    """Delete the store's manifest, shards, shard records and temporary files (nothing else in the folder)."""
    removed = 0
    for path in store.iterdir():
        if _STORE_FILE.match(path.name) and path.is_file():
            path.unlink()
            removed += 1
    return removed


def _warn(message: str) -> None:
    print(f"embedding store: {message}", file=sys.stderr, flush=True)


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
    rebuild: bool = False,
    verify: str = "size",
) -> dict:
    """Encode ``prompts`` into shards; -> the manifest (with the records known to this rank).

    encoder / prior_encoder: ``encode(list[str]) -> TextEmbedding`` with an ``identity`` string
    (the store is bound to it). With prior_suffixes, prompt + suffix is also encoded by
    prior_encoder for each suffix ('' is the plain prompt). Every rank calls this with the same
    arguments; ``barrier`` (e.g. accelerator.wait_for_everyone) is called once the manifest exists, again
    when all shards are written and once more after rank 0 has folded their records into the manifest,
    so all shards exist and are recorded on return.
    rebuild: rank 0 first deletes the store's files (manifest, shards, records), so everything is built anew.
    verify: how a shard file that has a record is checked before it is kept: "size" (a stat; training start)
    or "sha256" (reads it; `amortized3d store build`). A shard that fails is rebuilt.
    """
    if batch_size < 1 or (shard_size is not None and shard_size < 1):
        raise ValueError(f"shard_size={shard_size} and batch_size={batch_size} must be >= 1")
    if prior_suffixes and prior_encoder is None:
        raise ValueError("prior_suffixes need a prior_encoder")
    if verify not in ("size", "sha256"):
        raise ValueError(f"verify={verify!r}: use 'size' or 'sha256'")
    if rebuild and world > 1 and barrier is None:
        raise ValueError("rebuild with several ranks needs a barrier (rank 0 deletes the old store before the others build)")
    if not prompts:
        raise StoreError("the prompt list is empty; there is nothing to store")
    import webdataset as wds

    store = Path(store_dir)
    store.mkdir(parents=True, exist_ok=True)
    suffixes = list(prior_suffixes)
    probe = encoder.encode([prompts[0]])
    # the array shapes; every text encodes to the same shape, so the plain prompt stands for prompt + suffix (and
    # costs nothing more when the prior's encoder is the generator's)
    prior_probe = prior_encoder.encode([prompts[0]]) if suffixes else None
    if shard_size is None:
        prior_dim = prior_encoder.dim if suffixes else 0
        shard_size = auto_shard_size(probe.tokens.shape[1], probe.tokens.shape[2], len(suffixes), prior_dim)
    order = store_order(prompts)
    n_shards = math.ceil(len(prompts) / shard_size)
    chunks = [[prompts[i] for i in order[s * shard_size : (s + 1) * shard_size]] for s in range(n_shards)]
    manifest = {
        "format": FORMAT, "encoder_id": encoder.identity, "prior_encoder_id": prior_encoder.identity if suffixes else None,
        "prior_suffixes": suffixes, "corpus": corpus, "split": split, "n_prompts": len(prompts), "shard_size": shard_size,
        "prompts_sha256": prompts_digest(prompts), "order": "sha256 of the prompt", "dtype": "float16",
        "arrays": _array_specs(probe, prior_probe, len(suffixes)), "shards": [shard_name(s) for s in range(n_shards)],
        "shard_info": [{"samples": len(chunk), "keys_sha256": keys_digest([prompt_key(p) for p in chunk]), "sha256": None, "bytes": None}
                       for chunk in chunks],
    }
    path = store / MANIFEST
    if rank == 0:
        if rebuild:
            _clear_store(store)
        try:  # written first, so that a resumed build can check what the shards were built with
            old = _read_manifest(store) if path.is_file() else None
        except StoreError:
            old = manifest  # damaged: every rank refuses it after the barrier
        if old is None or ("format" not in old and all(old.get(k) == manifest[k] for k in LEGACY_IDENTITY)):
            write_text_atomic(path, json.dumps(manifest, indent=1))  # new, or a format-1 store's manifest upgraded
    if barrier is not None:
        barrier()  # no rank writes a shard before the manifest exists
    current = manifest  # the manifest on disk when it is this store's (format 2): its records
    if path.is_file():
        old = _read_manifest(store)
        legacy = "format" not in old  # format 1 (only without a barrier: rank 0 has not upgraded it yet)
        for key in LEGACY_IDENTITY if legacy else IDENTITY:
            if old.get(key) != manifest[key]:
                raise StoreError(f"{store} holds a store with another {key} ({old.get(key)!r}, not {manifest[key]!r}); "
                                 "use a new folder (data.store), or replace it: `amortized3d store build --rebuild` or delete it")
        if not legacy:
            current = old
    current = _with_records(store, current)
    todo = []
    for s in range(rank, n_shards, world):
        shard = store / manifest["shards"][s]
        if not shard.is_file():
            todo.append(s)
            continue
        info = current["shard_info"][s]
        if info["sha256"] is not None:
            problem = _record_mismatch(shard, info, verify)
            if problem is None:
                continue
            _warn(f"{shard} {problem}; rebuilding it")
        else:
            problem, digest = _check_unrecorded(store, manifest, s, encoder, prior_encoder, suffixes)
            if problem is None:
                _write_record(store, manifest, s, digest, shard.stat().st_size)
                continue
            _warn(f"{shard} is not recorded as a shard of this store, and it does not check out ({problem}); rebuilding it")
        todo.append(s)
    for s in tqdm(todo, desc=f"embedding store (rank {rank})", disable=not progress):
        name = manifest["shards"][s]
        _record_path(store, name).unlink(missing_ok=True)
        with atomic_path(store / name) as tmp:
            with wds.TarWriter(str(tmp)) as sink:
                chunk = chunks[s]
                for start in range(0, len(chunk), batch_size):
                    for sample in _encode_samples(chunk[start : start + batch_size], encoder, prior_encoder, suffixes):
                        sink.write(sample)
            digest, size = sha256_file(tmp)
        _write_record(store, manifest, s, digest, size)
    if barrier is not None:
        barrier()  # every shard is written and has its record
    if rank == 0 and path.is_file():
        _fold_records(store)
    if barrier is not None:
        barrier()  # the manifest holds every record
    if path.is_file() and (final := _read_manifest(store)).get("format") == FORMAT:
        return _with_records(store, final)
    return _with_records(store, manifest)


def _encode_samples(batch: list[str], encoder, prior_encoder, suffixes: list[str]) -> list[dict]:
    emb = encoder.encode(batch)
    _check_finite(emb, batch, "text encoder")
    if suffixes:
        texts = [p + suffix for p in batch for suffix in suffixes]
        pri = prior_encoder.encode(texts)
        _check_finite(pri, texts, "prior's text encoder")
        pri_tokens = pri.tokens.view(len(batch), len(suffixes), *pri.tokens.shape[1:])
        pri_pooled = pri.pooled.view(len(batch), len(suffixes), -1)
        pri_mask = pri.mask.view(len(batch), len(suffixes), -1)
    samples = []
    for j, prompt in enumerate(batch):
        sample = {
            "__key__": prompt_key(prompt),
            "txt": prompt,
            "tokens.npy": _npy(emb.tokens[j].to(torch.float16).numpy()),
            "pooled.npy": _npy(emb.pooled[j].to(torch.float16).numpy()),
            "mask.npy": _npy(emb.mask[j].to(torch.bool).numpy()),
        }
        if suffixes:
            sample["prior_tokens.npy"] = _npy(pri_tokens[j].to(torch.float16).numpy())
            sample["prior_pooled.npy"] = _npy(pri_pooled[j].to(torch.float16).numpy())
            sample["prior_mask.npy"] = _npy(pri_mask[j].to(torch.bool).numpy())
        samples.append(sample)
    return samples


def _record_mismatch(shard: Path, info: dict, verify: str) -> str | None:
    """Why a recorded shard's file does not match its record (None: it matches)."""
    size = shard.stat().st_size
    if size != info["bytes"]:
        return f"is {size} bytes, its record says {info['bytes']}"
    if verify == "sha256" and sha256_file(shard)[0] != info["sha256"]:
        return "does not match its recorded sha256"
    return None


def _check_unrecorded(store: Path, manifest: dict, index: int, encoder, prior_encoder, suffixes) -> tuple[str | None, str]:
    """A shard file found without a record: (None, its sha256) if it holds exactly this shard's prompts, passes
    read_shard's checks and its first sample equals the encoders' output for its prompt; else (why not, '')."""
    path = store / manifest["shards"][index]
    try:
        data = path.read_bytes()
        samples = parse_shard(data, path, manifest, index)
    except OSError as err:
        return f"cannot be read ({type(err).__name__}: {err})", ""
    except StoreError as err:
        return getattr(err, "reason", str(err)), ""
    first = samples[0]
    expected = _encode_samples([first["txt"]], encoder, prior_encoder, suffixes)[0]
    for name in manifest["arrays"]:
        want = np.lib.format.read_array(io.BytesIO(expected[name]), allow_pickle=False)
        if not _close(first[name], want):
            return f"its {name} of {first['txt']!r} is not what the text encoder gives (built with another encoder?)", ""
    return None, _sha256(data)


def _close(stored: np.ndarray, fresh: np.ndarray) -> bool:
    """Equal up to the encoders' run-to-run noise (batch composition, reduced precision); another encoder is far off."""
    if stored.shape != fresh.shape:
        return False
    if stored.dtype == np.bool_:
        return bool(np.array_equal(stored, fresh))
    a, b = stored.astype(np.float64), fresh.astype(np.float64)
    return float(np.linalg.norm(a - b)) <= 0.05 * float(np.linalg.norm(b)) + 1e-3


def _check_finite(emb, texts: list[str], what: str) -> None:
    bad = (~torch.isfinite(emb.tokens.flatten(1)).all(1)) | (~torch.isfinite(emb.pooled).all(1))
    if bad.any():
        raise StoreError(f"the {what} gave non-finite embeddings for {texts[int(bad.nonzero()[0])]!r} (and {int(bad.sum()) - 1} more); "
                         "half precision can overflow (T5): build the store with prior.dtype=fp32 or bf16")
    if emb.tokens.abs().max() > 65504 or emb.pooled.abs().max() > 65504:
        raise StoreError(f"the {what} gave embeddings beyond float16's range (65504); they cannot be stored as fp16")


# The header numpy.lib.format writes (versions 1.0 and 2.0): a dict literal with these three keys in this order,
# padded with spaces to a multiple of 64 bytes and ended by a newline. numpy reads it with ast.literal_eval, which
# on CPython before 3.11.8 can fail spuriously ("AST constructor recursion depth mismatch") when a garbage-collector
# callback parses Python source during the call; an exact pattern has no such failure and rejects any other form.
_NPY_HEADER = re.compile(r"\{'descr': '([<>|=][a-z]\d+)', 'fortran_order': (False|True), "
                         r"'shape': \(((?:\d+, )*(?:\d+,?)?)\), \} *\n")
_NPY_MAGIC = b"\x93NUMPY"


def _npy_view(buf: memoryview) -> np.ndarray:
    """A .npy member as an array viewing ``buf`` (no copy); ValueError if it is not exactly one well-formed array
    of a plain numeric or bool dtype in C order."""
    if bytes(buf[:6]) != _NPY_MAGIC or len(buf) < 10:
        raise ValueError("no .npy magic string")
    major = buf[6]
    if major not in (1, 2):
        raise ValueError(f"unsupported .npy version {major}.{buf[7]}")
    size_bytes = 2 if major == 1 else 4
    start = 8 + size_bytes
    offset = start + int.from_bytes(buf[8:start], "little")
    if offset > len(buf):
        raise ValueError(f"the header claims {offset - start} bytes, the member has {len(buf) - start}")
    match = _NPY_HEADER.fullmatch(bytes(buf[start:offset]).decode("latin-1"))
    if match is None:
        raise ValueError(f"malformed header {bytes(buf[start:min(offset, start + 100)])!r}")
    descr, fortran, dims = match.groups()
    dtype = np.dtype(descr)
    if fortran == "True" or dtype.kind not in "biuf":
        raise ValueError(f"unexpected .npy layout (fortran_order={fortran}, dtype {dtype})")
    shape = tuple(int(d) for d in dims.replace(" ", "").split(",") if d)
    count = math.prod(shape)
    if offset + count * dtype.itemsize != len(buf):
        raise ValueError(f"{len(buf) - offset} data bytes for an array of shape {shape} and dtype {dtype}")
    return np.frombuffer(buf, dtype=dtype, count=count, offset=offset).reshape(shape)


def _all_finite(array: np.ndarray) -> bool:
    if array.dtype == np.float16:  # inf and nan have all exponent bits set; 8x faster than np.isfinite on float16
        return not ((array.view(np.uint16) & 0x7C00) == 0x7C00).any()
    return bool(np.isfinite(array).all())


def read_shard(store_dir: str | Path, manifest: dict, index: int) -> list[dict]:
    """Shard ``index`` of a store whose manifest (from load_manifest) records it, checked (module docstring) -> its
    samples in order: {"__key__", "txt": str, "tokens.npy": array, ...}, arrays viewing the file's bytes read once."""
    store = Path(store_dir)
    path = store / manifest["shards"][index]
    info = manifest["shard_info"][index]
    try:
        data = path.read_bytes()
    except OSError as err:
        raise StoreError(f"shard {path} is unreadable ({type(err).__name__}: {err}); {rebuild_hint(store, manifest)}") from None
    if info.get("sha256") is None:
        raise StoreError(f"shard {path} has no recorded sha256 in {store / MANIFEST}; {rebuild_hint(store, manifest)}")
    if len(data) != info["bytes"]:
        raise StoreError(f"shard {path} is {len(data)} bytes, the manifest records {info['bytes']} (truncated or replaced); "
                         f"{rebuild_hint(store, manifest)}")
    if _sha256(data) != info["sha256"]:
        raise StoreError(f"shard {path} does not match its sha256 in the manifest (damaged or replaced); {rebuild_hint(store, manifest)}")
    return parse_shard(data, path, manifest, index)


def parse_shard(data: bytes, path: Path, manifest: dict, index: int) -> list[dict]:
    """The samples of shard ``index``'s tar bytes, checked against the manifest: members, keys, texts, arrays."""
    def damaged(reason: str) -> StoreError:
        err = StoreError(f"shard {path} is damaged: {reason}; {rebuild_hint(path.parent, manifest)}")
        err.reason = reason  # for build_store's message about a shard it will not adopt
        return err

    info, arrays = manifest["shard_info"][index], manifest["arrays"]
    members = {"txt", *arrays}
    view = memoryview(data)
    samples: list[dict] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            entries = tar.getmembers()
    except Exception as err:  # tarfile.ReadError, EOFError, ... from the tar headers
        raise damaged(f"not a readable tar file ({type(err).__name__}: {err})") from None
    current: dict | None = None
    for entry in entries:
        key, dot, ext = entry.name.partition(".")
        if not entry.isfile() or not dot or "/" in entry.name:
            raise damaged(f"unexpected tar member {entry.name!r}")
        if entry.offset_data + entry.size > len(data):
            raise damaged(f"member {entry.name!r} ends after the end of the file (truncated)")
        if current is None or key != current["__key__"] or ext in current:  # as webdataset groups members into samples
            current = {"__key__": key}
            samples.append(current)
        current[ext] = view[entry.offset_data : entry.offset_data + entry.size]
    if len(samples) != info["samples"]:
        raise damaged(f"it holds {len(samples)} samples, the manifest says {info['samples']}")
    for sample in samples:
        key = sample["__key__"]
        if set(sample) - {"__key__"} != members:
            missing, extra = sorted(members - set(sample)), sorted(set(sample) - members - {"__key__"})
            raise damaged(f"sample {key} " + (f"lacks {', '.join(missing)}" if missing else f"has unexpected members {', '.join(extra)}"))
        try:
            sample["txt"] = str(sample["txt"], "utf-8")
        except UnicodeDecodeError as err:
            raise damaged(f"the text of sample {key} is not UTF-8 ({err})") from None
        if prompt_key(sample["txt"]) != key:
            raise damaged(f"sample {key} holds the text {sample['txt']!r}, whose key is {prompt_key(sample['txt'])}")
        for name, spec in arrays.items():
            try:
                array = _npy_view(sample[name])
            except (ValueError, TypeError) as err:  # TypeError: np.dtype of an unknown descr
                raise damaged(f"{name} of sample {key} is not a valid .npy array ({type(err).__name__}: {err})") from None
            if array.dtype != np.dtype(spec["dtype"]) or list(array.shape) != spec["shape"]:
                raise damaged(f"{name} of sample {key} is {array.dtype} {list(array.shape)}, the manifest says {spec['dtype']} {spec['shape']}")
            if array.dtype.kind == "f" and not _all_finite(array):
                raise damaged(f"{name} of sample {key} holds non-finite values")
            sample[name] = array
    if keys_digest([s["__key__"] for s in samples]) != info["keys_sha256"]:
        raise damaged("its prompts are not the ones this shard of the store must hold (a shard of another store copied in?)")
    return samples


def _read_manifest(store: Path) -> dict:
    try:
        manifest = json.loads((store / MANIFEST).read_text())
        for key in ("encoder_id", "prior_encoder_id", "prior_suffixes", "prompts_sha256", "shard_size", "n_prompts", "shards"):
            manifest[key]
        if manifest.get("format") == FORMAT:
            for key in ("arrays", "shard_info"):
                manifest[key]
            if len(manifest["shard_info"]) != len(manifest["shards"]):
                raise KeyError("shard_info does not list every shard")
            for info in manifest["shard_info"]:
                info["samples"], info["keys_sha256"], info["sha256"], info["bytes"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise StoreError(f"{store / MANIFEST} is damaged ({type(err).__name__}: {err}); delete the folder {store} and build the store again") from None
    return manifest


def load_manifest(store_dir: str | Path, prompts: Sequence[str] | None = None, encoder_id: str | None = None,
                  prior_encoder_id: str | None = None, prior_suffixes: Sequence[str] | None = None, *, verify: str = "size") -> dict:
    """The store's manifest, checked against what is expected (the arguments given), for missing or unrecorded shards
    and for shards whose size (verify="size") or also sha256 (verify="sha256", reads the whole store) is not the
    recorded one. -> the manifest with every shard's record (shard_info[s]: samples, keys_sha256, sha256, bytes)."""
    if verify not in ("size", "sha256"):
        raise ValueError(f"verify={verify!r}: use 'size' or 'sha256'")
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
    version = manifest.get("format", 1)
    if version == 1:
        raise StoreError(f"{store} was built by an earlier version of amortized3d, without per-shard sha256 digests; run "
                         f"`amortized3d store build --corpus {manifest.get('corpus') or 'NAME'}` with the same --config/overrides as "
                         "the training run (it checks the shards and records their digests; training start does the same) or "
                         f"add --rebuild to build it anew, or delete the folder {store}")
    if version != FORMAT:
        raise StoreError(f"{store} has store format {version!r}, which this version of amortized3d does not read (it reads {FORMAT}); "
                         f"rebuild it: `amortized3d store build --rebuild --corpus {manifest.get('corpus') or 'NAME'}` with the same "
                         f"--config/overrides as the training run, or delete the folder {store}")
    manifest = _with_records(store, manifest)
    missing = [name for name in manifest["shards"] if not (store / name).is_file()]
    if missing:
        raise StoreError(f"{store} is incomplete: {len(missing)} shards missing (first {missing[0]}); run the build again to finish it")
    unrecorded = [name for name, info in zip(manifest["shards"], manifest["shard_info"]) if info["sha256"] is None]
    if unrecorded:
        raise StoreError(f"{store} is incomplete: {len(unrecorded)} shards are not recorded as built for it (first {unrecorded[0]}: "
                         "an interrupted build, or files copied in); run the build again, which checks them and finishes it")
    for name, info in zip(manifest["shards"], manifest["shard_info"]):
        shard = store / name
        size = shard.stat().st_size
        if size != info["bytes"]:
            raise StoreError(f"shard {shard} is {size} bytes, the manifest records {info['bytes']} (truncated or replaced); "
                             f"{rebuild_hint(store, manifest)}")
        if verify == "sha256" and sha256_file(shard)[0] != info["sha256"]:
            raise StoreError(f"shard {shard} does not match its sha256 in the manifest (damaged or replaced); {rebuild_hint(store, manifest)}")
    return manifest


def shard_sizes(manifest: dict) -> list[int]:
    """Samples per shard: shard_size each, the remainder in the last."""
    n, size = manifest["n_prompts"], manifest["shard_size"]
    return [min(size, n - s * size) for s in range(len(manifest["shards"]))]
