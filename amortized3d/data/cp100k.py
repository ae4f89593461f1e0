"""Build the CP100k corpus from Cap3D's caption CSV (rows of uid, caption; a header row is optional).

    amortized3d corpus build cp100k --captions Cap3D_automated_Objaverse.csv [--corpus-dir DIR]

Deterministic filter, applied in this order (the manifest counts what each rule drops):
  1. the caption is decoded as UTF-8 and its whitespace collapsed to single spaces;
  2. empty captions and captions with control characters are dropped;
  3. captions of fewer than MIN_WORDS or more than MAX_WORDS words, or more than MAX_CHARACTERS
     characters, are dropped (so every prompt fits CLIP's 77 tokens with room to spare);
  4. repeated captions (compared case-insensitively) are dropped after the one with the
     smallest uid; a uid with several rows keeps its lexicographically smallest caption.
The kept captions are sorted by uid, shuffled with random.Random(seed), and the first
test_size become the test split and the next train_size the train split (val = test), so the
result depends only on the CSV's rows, not on their order. The corpus JSON and a manifest
(source file name and sha256, rules, counts, seed) are written to the corpus folder.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import re
import unicodedata
from pathlib import Path

from amortized3d.data.corpora import CorpusError, catalog, corpus_dir

MIN_WORDS, MAX_WORDS, MAX_CHARACTERS = 3, 40, 300
SEED = 100_000
TRAIN_SIZE, TEST_SIZE = 100_000, 1_000
RULES = [
    "decode UTF-8, collapse whitespace",
    "drop empty captions and captions with control characters",
    f"keep {MIN_WORDS}-{MAX_WORDS} words and at most {MAX_CHARACTERS} characters",
    "drop repeated captions (case-insensitive) after the smallest uid; a uid with several rows keeps its smallest caption",
    f"sort by uid, shuffle with random.Random(seed), test = first test_size, train = next train_size, val = test",
]


def build_cp100k(captions: str | Path, out_dir: str | Path | None = None, *, train_size: int = TRAIN_SIZE,
                 test_size: int = TEST_SIZE, seed: int = SEED) -> dict:
    """Filter and split the Cap3D captions; write the corpus JSON and its manifest. -> the manifest."""
    captions = Path(captions).expanduser()
    if not captions.is_file():
        raise CorpusError(f"caption file {str(captions)!r} does not exist; download Cap3D's caption CSV (uid, caption) first")
    data = captions.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CorpusError(f"{captions}: line {line}: not valid UTF-8 ({err.reason}); the Cap3D CSV is UTF-8") from err
    counts = {"rows": 0, "repeated_uid": 0, "empty_or_control": 0, "length": 0, "repeated_caption": 0}
    by_uid: dict[str, str] = {}
    reader = csv.reader(io.StringIO(text))
    for row in reader:
        if reader.line_num == 1 and [c.strip().lower() for c in row[:2]] == ["uid", "caption"]:
            continue
        if len(row) < 2:
            raise CorpusError(f"{captions}: line {reader.line_num}: expected 'uid,caption', got {row!r}")
        counts["rows"] += 1
        uid, caption = row[0].strip(), " ".join(row[1].split())
        if uid in by_uid:
            counts["repeated_uid"] += 1
            caption = min(caption, by_uid[uid])  # order-independent choice among a uid's rows
        by_uid[uid] = caption
    seen: set[str] = set()
    kept: list[tuple[str, str]] = []
    for uid in sorted(by_uid):
        caption = by_uid[uid]
        if not caption or any(unicodedata.category(c) == "Cc" for c in caption):
            counts["empty_or_control"] += 1
        elif not (MIN_WORDS <= len(caption.split()) <= MAX_WORDS) or len(caption) > MAX_CHARACTERS:
            counts["length"] += 1
        elif caption.lower() in seen:
            counts["repeated_caption"] += 1
        else:
            seen.add(caption.lower())
            kept.append((uid, caption))
    if len(kept) < train_size + test_size:
        raise CorpusError(
            f"{captions}: {len(kept)} captions pass the filter, fewer than the {train_size} train + {test_size} test needed; "
            "use the full Cap3D caption CSV (or smaller --train-size / --test-size)"
        )
    random.Random(seed).shuffle(kept)
    test = [c for _, c in kept[:test_size]]
    train = [c for _, c in kept[test_size : test_size + train_size]]
    folder = corpus_dir(str(out_dir) if out_dir else None)
    folder.mkdir(parents=True, exist_ok=True)
    corpus_path = folder / catalog()["cp100k"]["file"]
    corpus_path.write_text(json.dumps({"train": train, "val": test, "test": test}, ensure_ascii=False), encoding="utf-8")
    manifest = {
        "corpus": "cp100k", "file": corpus_path.name, "source": captions.name,
        "source_sha256": hashlib.sha256(data).hexdigest(), "rules": RULES, "seed": seed,
        "counts": {**counts, "kept": len(kept), "train": len(train), "test": len(test)},
    }
    (folder / re.sub(r"\.json$", "_manifest.json", corpus_path.name)).write_text(json.dumps(manifest, indent=1))
    return manifest
