"""Named prompt corpora: the catalog in corpora/catalog.yaml, splits, and validation.

    load_corpus("shapeworld-16")        generated, nothing to download
    load_corpus("mg15")           a JSON file in the corpus folder
    load_corpus("/path/to/prompts.json") any JSON file with train/val/test lists

The corpus folder for file corpora is, in order: the ``corpus_dir`` argument
(``--corpus-dir``, ``corpus.dir``), the AMORTIZED3D_CORPORA environment variable,
or ~/.cache/amortized3d/corpora.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from amortized3d.data.shapeworld import shapeworld_corpus

CATALOG_PATH = Path(__file__).resolve().parents[2] / "corpora" / "catalog.yaml"
SPLITS = ("train", "val", "test")


class CorpusError(ValueError):
    """An unknown corpus name, a missing file or malformed prompts."""


@dataclass
class Corpus:
    name: str
    train: list[str]
    val: list[str]
    test: list[str]

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
        if name.endswith(".json"):
            return "shapeworld"  # the only prior shipped is the analytic one; train() checks the prompts parse
        raise CorpusError(f"unknown corpus {name!r}; known corpora: {', '.join(entries)} (or a path to a .json file)")
    recipe = entries[name].get("recipe")
    if recipe is None:
        trainable = [n for n, e in entries.items() if e.get("recipe")]
        raise CorpusError(
            f"corpus {name!r} has no training recipe yet (its reference recipe uses a generator this version does not "
            f"have). Corpora with a recipe: {', '.join(trainable)}. To train it anyway, give a recipe explicitly, e.g. "
            f"--corpus {name} --config configs/mg15.yaml (Hyper-iNGP with Stable Diffusion)."
        )
    return recipe


def validate_prompts(prompts, where: str) -> list[str]:
    """Every prompt must be a non-empty string; returns the list unchanged."""
    if not isinstance(prompts, list):
        raise CorpusError(f"{where} must be a list of prompt strings, got {type(prompts).__name__}")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise CorpusError(f"{where}[{i}]={p!r} is not a prompt: prompts must be non-empty strings")
    return prompts


def _load_json(path: Path, name: str) -> Corpus:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise CorpusError(f"corpus file {str(path)!r} is not valid JSON: {err}") from err
    if not isinstance(data, dict) or "train" not in data:
        raise CorpusError(f"corpus file {str(path)!r} must hold a JSON object with a 'train' list (and optional 'val', 'test')")
    splits = {}
    for split in SPLITS:
        splits[split] = validate_prompts(data.get(split, []), f"{path.name}:{split}")
    if not splits["train"]:
        raise CorpusError(f"corpus file {str(path)!r} has an empty train split")
    return Corpus(name, splits["train"], splits["val"], splits["test"])


def load_corpus(name: str, directory: str | None = None) -> Corpus:
    """A named corpus from the catalog, or a JSON file path. -> Corpus with train/val/test lists."""
    entries = catalog()
    if name not in entries:
        path = Path(name).expanduser()
        if path.suffix == ".json" and path.is_file():
            return _load_json(path, path.stem)
        raise CorpusError(f"unknown corpus {name!r}; known corpora: {', '.join(entries)} (or a path to a .json file)")
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
