"""The CP100k builder on a caption CSV the test writes: filter rules, order independence, split sizes, manifest."""

from __future__ import annotations

import csv
import hashlib
import json
import random

import pytest

from amortized3d.data.corpora import CorpusError, load_corpus
from amortized3d.data.cp100k import build_cp100k


def write_captions(path, rows, header=True):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(["uid", "caption"])
        writer.writerows(rows)
    return path


def rows():
    good = [(f"{i:06x}", f"a {c} wooden object number {i}") for i, c in enumerate(["red", "blue", "green"] * 400)]
    bad = [
        ("b0", ""), ("b1", "two words"), ("b2", " ".join(["word"] * 41)), ("b3", "a ctrl\x07 character here"),
        ("b4", "A RED WOODEN OBJECT NUMBER 0"),  # a repeat of uid 000000's caption, larger uid
        ("000001", "zz a repeated uid keeps its smallest caption"),
    ]
    return good + bad


def test_filter_split_and_manifest(tmp_path):
    source = write_captions(tmp_path / "captions.csv", rows())
    manifest = build_cp100k(source, tmp_path / "corpora", train_size=1000, test_size=100)
    counts = manifest["counts"]
    assert counts["rows"] == 1206 and counts["repeated_uid"] == 1 and counts["empty_or_control"] == 2
    assert counts["length"] == 2 and counts["repeated_caption"] == 1 and counts["kept"] == 1200
    assert (counts["train"], counts["test"]) == (1000, 100)
    assert manifest["source_sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    corpus = load_corpus("cp100k", str(tmp_path / "corpora"))
    assert len(corpus.train) == 1000 and len(corpus.test) == 100 and not set(corpus.train) & set(corpus.test)
    assert all(c.startswith("a ") and "object number" in c for c in corpus.train + corpus.test)
    saved = json.loads((tmp_path / "corpora" / "cap3d_100k_prompt_library_manifest.json").read_text())
    assert saved["counts"] == counts and saved["rules"]


def test_result_does_not_depend_on_row_order_or_header(tmp_path):
    shuffled = rows()
    random.Random(3).shuffle(shuffled)
    a = build_cp100k(write_captions(tmp_path / "a.csv", rows()), tmp_path / "a", train_size=1000, test_size=100)
    b = build_cp100k(write_captions(tmp_path / "b.csv", shuffled, header=False), tmp_path / "b", train_size=1000, test_size=100)
    assert a["counts"] == b["counts"]
    assert load_corpus("cp100k", str(tmp_path / "a")).train == load_corpus("cp100k", str(tmp_path / "b")).train


def test_too_few_captions_is_a_clear_error(tmp_path):
    with pytest.raises(CorpusError, match="1200 captions pass the filter, fewer than the 100000 train"):
        build_cp100k(write_captions(tmp_path / "c.csv", rows()), tmp_path / "c")
