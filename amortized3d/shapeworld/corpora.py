"""The generated ShapeWorld corpora: shapeworld-16 (the quickstart), shapeworld-4k, shapeworld-20k and shapeworld-120k.

Prompt splits {"train", "val", "test"}; test = seen train prompts followed by held-out
prompts never in train. The larger corpora are drawn, with a fixed seed, from the whole
prompt space of the grammar (``prompt_space``).
"""

from __future__ import annotations

import functools
import random

from amortized3d.shapeworld.grammar import COLORS, RELATIONS, SHAPES, SIZES, object_phrase, pair_prompt

SHAPEWORLD_CORPORA: tuple[str, ...] = ("shapeworld-16", "shapeworld-4k", "shapeworld-20k", "shapeworld-120k")

CORPUS_SEED = 20240531

# The quickstart: 12 large objects from a 4 x 4 color x shape grid with one cell per row and
# column held out, an under-specified prompt (a 16-scene mixture) and three relational scenes
# that bring in the other shapes and colors. Its unseen test prompts are the 4 held-out grid
# cells: each recombines a color and a shape the generator saw three times each, never
# together. Recombining relations ("a blue cube on top of a red cylinder" after "a red cube on
# top of a blue cylinder") is tested at scale by shapeworld-4k and shapeworld-120k.
_QUICKSTART_TRAIN = (
    "a large red cube",
    "a large red sphere",
    "a large red cylinder",
    "a large blue cube",
    "a large blue sphere",
    "a large blue cone",
    "a large green cube",
    "a large green cylinder",
    "a large green cone",
    "a large yellow sphere",
    "a large yellow cylinder",
    "a large yellow cone",
    "a cube",
    "a small purple torus on top of a large cyan octahedron",
    "a small orange capsule to the left of a large black pyramid",
    "a red sphere behind a blue cube",
)
_QUICKSTART_VAL = (
    "a small red cube",
    "a large cyan torus",
    "a large blue cube under a small red sphere",
    "a small green cone in front of a large yellow sphere",
)
_QUICKSTART_UNSEEN = (
    "a large red cone",
    "a large blue cylinder",
    "a large green sphere",
    "a large yellow cube",
)

# name -> (pairs in train, held-out test prompts, val prompts). shapeworld-20k is a subset of shapeworld-120k: the
# same held-out and val prompts, the singles and the first 19,800 of its training pairs (the corpus-scale bench).
_CORPUS_SIZES = {"shapeworld-4k": (3800, 200, 40), "shapeworld-20k": (19800, 1000, 1200), "shapeworld-120k": (None, 1000, 1200)}


def prompt_space() -> tuple[list[str], list[str]]:
    """Sorted (singles, pairs): singles = fully specified (128) + color-only (64) + shape-only (8);
    pairs = color+shape objects with any size (64*64*6) + fully specified objects (128*128*6)."""
    full = [object_phrase(shape, color, size) for size in SIZES for color in COLORS for shape in SHAPES]
    colored = [object_phrase(shape, color) for color in COLORS for shape in SHAPES]
    bare = [object_phrase(shape) for shape in SHAPES]
    singles = sorted(full + colored + bare)
    pairs = [pair_prompt(a, r, b) for objects in (colored, full) for a in objects for r in RELATIONS for b in objects]
    return singles, sorted(pairs)


@functools.lru_cache(maxsize=None)
def _build_corpus(name: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    if name == "shapeworld-16":
        return _QUICKSTART_TRAIN, _QUICKSTART_VAL, _QUICKSTART_TRAIN + _QUICKSTART_UNSEEN
    singles, pairs = prompt_space()
    rng = random.Random(CORPUS_SEED)
    rng.shuffle(pairs)
    n_train_pairs, n_test, n_val = _CORPUS_SIZES[name]
    unseen = pairs[:n_test]
    val = pairs[n_test : n_test + n_val]
    rest = pairs[n_test + n_val :]
    train = singles + (rest if n_train_pairs is None else rest[:n_train_pairs])
    rng.shuffle(train)
    seen = rng.sample(train, n_test)
    return tuple(train), tuple(val), tuple(seen + unseen)


def shapeworld_corpus(name: str) -> dict[str, list[str]]:
    """Prompt splits {"train", "val", "test"}; test = seen train prompts followed by held-out prompts never in train."""
    if name not in SHAPEWORLD_CORPORA:
        raise ValueError(f"unknown ShapeWorld corpus {name!r}; allowed names: {', '.join(SHAPEWORLD_CORPORA)}")
    train, val, test = _build_corpus(name)
    return {"train": list(train), "val": list(val), "test": list(test)}


def unseen_prompts(corpus: dict[str, list[str]]) -> list[str]:
    """Test prompts that are not train prompts, in test order."""
    train = set(corpus["train"])
    return [p for p in corpus["test"] if p not in train]
