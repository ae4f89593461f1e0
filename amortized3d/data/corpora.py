"""Named prompt corpora: the catalog in corpora/catalog.yaml, user files, splits, and validation.

    load_corpus("shapeworld-16")            generated, nothing to download
    load_corpus("mg15")                     a JSON file in the corpus folder
    load_corpus("/path/to/prompts.json")    {"train": [...], "val": [...], "test": [...]}
    load_corpus("/path/to/prompts.txt")     one prompt per line (all train)
    load_corpus("/path/to/prompts.csv")     the column "prompt" (else "caption", else "text"), all train;
    load_corpus("/path/to/prompts.csv#col") or the column named after '#'

The corpus folder for file corpora is, in order: the ``corpus_dir`` argument
(``--corpus-dir``, ``corpus.dir``), the AMORTIZED3D_CORPORA environment variable,
or ~/.cache/amortized3d/corpora.

Validation: files must be UTF-8; a prompt must be a non-empty string that is not only
whitespace and holds no control characters. Errors name the file, the split and index,
and the line. Surrounding whitespace is stripped. Duplicates policy: within a split, a
prompt that appears again is dropped after its first occurrence (so sampling is uniform
over distinct prompts); ``Corpus.duplicates`` records what was dropped, and
``amortized3d corpus info`` reports it (DL17k's train split holds one prompt 201 times).
"""

from __future__ import annotations

import csv
import io
import json
import os
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from amortized3d.data.shapeworld import shapeworld_corpus

CATALOG_PATH = Path(__file__).resolve().parents[2] / "corpora" / "catalog.yaml"
SPLITS = ("train", "val", "test")


class CorpusError(ValueError):
    """An unknown corpus name, a missing file or malformed prompts."""


@dataclass
class Corpus:
    """Distinct prompts per split; duplicates[split] = {prompt: extra occurrences dropped}."""

    name: str
    train: list[str]
    val: list[str]
    test: list[str]
    duplicates: dict[str, dict[str, int]] = field(default_factory=dict)
    raw_sizes: dict[str, int] = field(default_factory=dict)

    def split(self, name: str) -> list[str]:
        if name not in SPLITS:
            raise CorpusError(f"split {name!r} is not one of {', '.join(SPLITS)}")
        return getattr(self, name)


def catalog() -> dict:
    with open(CATALOG_PATH) as f:
        return yaml.safe_load(f)


def corpus_dir(explicit: str | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    env = os.environ.get("AMORTIZED3D_CORPORA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "amortized3d" / "corpora"


def recipe_for_corpus(name: str) -> str:
    entries = catalog()
    if name not in entries:
        if is_file_spec(name):
            return "shapeworld"  # ShapeWorld prompts train as they are; others need --config or --prior (train() checks)
        raise CorpusError(f"unknown corpus {name!r}; known corpora: {', '.join(entries)} (or a path to a .json, .txt or .csv file)")
    recipe = entries[name].get("recipe")
    if recipe is None:
        trainable = [n for n, e in entries.items() if e.get("recipe")]
        raise CorpusError(
            f"corpus {name!r} has no training recipe yet (its reference recipe uses a generator this version does not "
            f"have). Corpora with a recipe: {', '.join(trainable)}. To train it anyway, give a recipe explicitly, e.g. "
            f"--corpus {name} --config configs/mg15.yaml (Hyper-iNGP with Stable Diffusion)."
        )
    return recipe


def _line_of(text: str, prompt: str, start: int = 0) -> int | None:
    """1-based line of the first JSON-encoded occurrence of ``prompt`` in ``text`` at or after ``start``."""
    encoded = json.dumps(prompt, ensure_ascii=False)
    at = text.find(encoded, start)
    if at < 0:
        at = text.find(json.dumps(prompt), start)
    return None if at < 0 else text.count("\n", 0, at) + 1


def check_prompt(prompt, where: str) -> str:
    """A prompt stripped of surrounding whitespace; CorpusError if it is not a string, empty, or has control characters."""
    if not isinstance(prompt, str):
        raise CorpusError(f"{where}: {prompt!r} is not a prompt: prompts must be strings")
    stripped = prompt.strip()
    if not stripped:
        raise CorpusError(f"{where}: the prompt is empty or only whitespace ({prompt!r}); remove it or write the prompt")
    bad = [c for c in stripped if unicodedata.category(c) == "Cc"]
    if bad:
        raise CorpusError(f"{where}: the prompt {stripped[:60]!r} holds control characters {sorted(set(bad))!r}; remove them")
    return stripped


def dedupe(prompts: list[str]) -> tuple[list[str], dict[str, int]]:
    """Keep each prompt's first occurrence. -> (distinct prompts in order, {prompt: extra occurrences})."""
    counts = Counter(prompts)
    return list(dict.fromkeys(prompts)), {p: n - 1 for p, n in counts.items() if n > 1}


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise CorpusError(f"{path}: line {line}: not valid UTF-8 ({err.reason} at byte {err.start}); save the file as UTF-8") from err


def _corpus(name: str, path: Path, raw: dict[str, list[str]]) -> Corpus:
    if not raw["train"]:
        raise CorpusError(f"corpus file {str(path)!r} has an empty train split")
    splits, duplicates = {}, {}
    for split in SPLITS:
        splits[split], duplicates[split] = dedupe(raw[split])
    return Corpus(name, splits["train"], splits["val"], splits["test"], duplicates, {k: len(v) for k, v in raw.items()})


def _load_json(path: Path, name: str) -> Corpus:
    text = _read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CorpusError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from err
    if not isinstance(data, dict) or "train" not in data:
        raise CorpusError(f"corpus file {str(path)!r} must hold a JSON object with a 'train' list (and optional 'val', 'test')")
    raw = {}
    for split in SPLITS:
        items = data.get(split, [])
        if not isinstance(items, list):
            raise CorpusError(f"{path}: '{split}' must be a list of prompt strings, got {type(items).__name__}")
        start = text.find(f'"{split}"')
        checked = []
        for i, p in enumerate(items):
            try:
                checked.append(check_prompt(p, f"{path}:{split}[{i}]"))
            except CorpusError as err:
                line = _line_of(text, p, max(start, 0)) if isinstance(p, str) else None
                raise CorpusError(str(err).replace(f"{path}:{split}[{i}]", f"{path}: line {line}, {split}[{i}]" if line else f"{path}:{split}[{i}]", 1)) from None
        raw[split] = checked
    return _corpus(name, path, raw)


def _load_lines(path: Path) -> Corpus:
    lines = _read_text(path).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # trailing blank lines at the end of the file
    prompts = [check_prompt(line, f"{path}: line {n}") for n, line in enumerate(lines, 1)]
    return _corpus(path.stem, path, {"train": prompts, "val": [], "test": []})


def _load_csv(path: Path, column: str | None) -> Corpus:
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    if column is None:
        column = next((c for c in ("prompt", "caption", "text") if c in header), None)
    if column not in header:
        raise CorpusError(f"{path}: no column {column!r} (columns: {', '.join(header) or 'none'}); name one as {path}#COLUMN")
    prompts = []
    for row in reader:
        prompts.append(check_prompt(row[column], f"{path}: line {reader.line_num}, column {column!r}"))
    return _corpus(path.stem, path, {"train": prompts, "val": [], "test": []})


def load_file(spec: str) -> Corpus:
    """A user corpus file: .json, .txt (one prompt per line) or .csv[#column]."""
    path_text, _, column = spec.partition("#") if ".csv#" in spec else (spec, "", "")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise CorpusError(f"corpus file {str(path)!r} does not exist")
    if path.suffix == ".json":
        return _load_json(path, path.stem)
    if path.suffix == ".txt":
        return _load_lines(path)
    if path.suffix == ".csv":
        return _load_csv(path, column or None)
    raise CorpusError(f"corpus file {str(path)!r}: unknown format {path.suffix!r}; use .json (train/val/test lists), .txt or .csv")


FILE_SUFFIXES = (".json", ".txt", ".csv")


def is_file_spec(name: str) -> bool:
    return name.endswith(FILE_SUFFIXES) or ".csv#" in name


def load_corpus(name: str, directory: str | None = None) -> Corpus:
    """A named corpus from the catalog, or a JSON file path. -> Corpus with train/val/test lists."""
    entries = catalog()
    if name not in entries:
        if is_file_spec(name):
            return load_file(name)
        raise CorpusError(f"unknown corpus {name!r}; known corpora: {', '.join(entries)} (or a path to a .json, .txt or .csv file)")
    entry = entries[name]
    if entry["source"] == "shapeworld":
        splits = shapeworld_corpus(name)
        return Corpus(name, splits["train"], splits["val"], splits["test"])
    folder = corpus_dir(directory)
    path = folder / entry["file"]
    if not path.is_file():
        raise CorpusError(
            f"corpus {name!r} needs the file {entry['file']} in {folder}; download it with the reference prompt libraries "
            "and point --corpus-dir (or AMORTIZED3D_CORPORA) at its folder"
        )
    return _load_json(path, name)


def corpus_info(corpus: Corpus, count_tokens=None, max_tokens: int = 77) -> dict:
    """Split sizes (as in the file and distinct), duplicates, prompt length statistics and, given
    ``count_tokens(prompts) -> [n]`` (tokens with the begin/end tokens), the prompts over ``max_tokens``."""
    info: dict = {"name": corpus.name, "splits": {}}
    for split in SPLITS:
        prompts = corpus.split(split)
        dropped = corpus.duplicates.get(split, {})
        row = {"prompts": corpus.raw_sizes.get(split, len(prompts)), "distinct": len(prompts),
               "duplicates_dropped": sum(dropped.values())}
        if dropped:
            top, n = max(dropped.items(), key=lambda kv: kv[1])
            row["most_repeated"] = {"prompt": top, "occurrences": n + 1}
        if prompts:
            chars = sorted(len(p) for p in prompts)
            words = sorted(len(p.split()) for p in prompts)
            row["characters"] = {"min": chars[0], "median": chars[len(chars) // 2], "max": chars[-1]}
            row["words"] = {"min": words[0], "median": words[len(words) // 2], "max": words[-1]}
            row["non_ascii_distinct"] = sum(not p.isascii() for p in prompts)
            if count_tokens is not None:
                long = [p for p, n in zip(prompts, count_tokens(prompts)) if n > max_tokens]
                row[f"over_{max_tokens}_tokens"] = {"count": len(long), "examples": [p[:80] for p in long[:3]]}
        info["splits"][split] = row
    return info
