"""User corpus files (JSON, text, CSV): validation with line numbers, the duplicate policy, and corpus info."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from amortized3d.data.corpora import CorpusError, corpus_info, dedupe, load_corpus


def write(path: Path, data: bytes | str) -> str:
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return str(path)


def test_text_file_one_prompt_per_line(tmp_path):
    corpus = load_corpus(write(tmp_path / "p.txt", "a frog\n  a chair  \na frog\n\n\n"))
    assert corpus.train == ["a frog", "a chair"] and corpus.duplicates["train"] == {"a frog": 1}
    assert corpus.raw_sizes["train"] == 3 and corpus.val == [] and corpus.test == []


@pytest.mark.parametrize("content, line, words", [
    (b"a frog\n   \na chair\n", 2, "empty or only whitespace"),
    (b"a frog\na ch\x07air\n", 2, "control characters"),
    (b"a frog\na chair\na caf\xe9\n", 3, "not valid UTF-8"),
])
def test_text_file_errors_name_the_line(tmp_path, content, line, words):
    with pytest.raises(CorpusError) as err:
        load_corpus(write(tmp_path / "p.txt", content))
    assert f"line {line}" in str(err.value) and words in str(err.value)


def test_csv_named_column(tmp_path):
    path = write(tmp_path / "c.csv", 'uid,caption,other\n1,"a red apple, sliced",x\n2,a wooden chair,y\n')
    assert load_corpus(path).train == ["a red apple, sliced", "a wooden chair"]
    assert load_corpus(path + "#other").train == ["x", "y"]
    with pytest.raises(CorpusError, match="no column 'nope' .*'uid', 'caption', 'other'"):
        load_corpus(path + "#nope")
    bad = write(tmp_path / "b.csv", "prompt\na frog\n\"\"\na dog\n")
    with pytest.raises(CorpusError, match="line 3, column 'prompt': the prompt is empty"):
        load_corpus(bad)


def test_json_errors_name_the_line(tmp_path):
    text = '{\n "train": [\n  "a frog",\n  "  ",\n  "a dog"\n ]\n}\n'
    with pytest.raises(CorpusError, match=r"line 4, train\[1\]: the prompt is empty"):
        load_corpus(write(tmp_path / "j.json", text))
    with pytest.raises(CorpusError, match="line 3, column 12: not valid JSON"):
        load_corpus(write(tmp_path / "k.json", '{\n "train": [\n  "a frog",,\n ]\n}'))


def test_dedupe_keeps_first_occurrences_in_order():
    prompts, dropped = dedupe(["b", "a", "b", "c", "a", "b"])
    assert prompts == ["b", "a", "c"] and dropped == {"b": 2, "a": 1}


REFERENCE = {  # from ../shared/corpora/README.md: (train, val, test)
    "mg15": (15, 15, 15), "df415": (415, 16, 415), "at2520": (2520, 56, 2520), "dl17k": (17241, 100, 100),
}


@pytest.mark.skipif(not os.environ.get("AMORTIZED3D_CORPORA"), reason="AMORTIZED3D_CORPORA (the reference corpora folder) is not set")
def test_corpus_info_matches_the_reference_counts():
    for name, sizes in REFERENCE.items():
        info = corpus_info(load_corpus(name), lambda prompts: [len(p.split()) + 2 for p in prompts])
        assert tuple(info["splits"][s]["prompts"] for s in ("train", "val", "test")) == sizes, name
    assert len(load_corpus("dl17k").train) == 13551  # distinct prompts: the duplicate policy
    dl = corpus_info(load_corpus("dl17k"))["splits"]["train"]
    assert dl["distinct"] == 13551 and dl["most_repeated"]["occurrences"] == 201 and dl["characters"]["max"] == 523


@pytest.mark.skipif(not os.environ.get("AMORTIZED3D_CORPORA"), reason="AMORTIZED3D_CORPORA (the reference corpora folder) is not set")
def test_corpus_info_command_counts_clip_tokens(capsys):
    from amortized3d.cli import main

    assert main(["corpus", "info", "dl17k"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["splits"]["train"]["over_77_tokens"]["count"] == 1  # the one 523-byte prompt
