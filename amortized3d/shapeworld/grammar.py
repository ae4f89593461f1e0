"""The ShapeWorld prompt grammar: its words, its syntax, and what an under-specified object means.

Grammar (words are case-insensitive; surrounding whitespace, repeated spaces and a
trailing period are ignored; "a" and "an" are both accepted):

    object := article [size] [color] shape
    prompt := object | object " " relation " " object

A missing size means any size and a missing color any color, so a prompt denotes an
equal-weight mixture of scenes: ``parse_prompt("a cube")`` gives 16 scenes
(2 sizes x 8 colors), ``parse_prompt("a small red cube")`` gives 1. ``parse_structure``
reads the syntax; ``object_choices`` expands an object to the fully specified objects it
may mean; ``parse_prompt`` (``amortized3d.shapeworld.layout``) lays each of them out.
"""

from __future__ import annotations

from typing import NamedTuple

SHAPES: tuple[str, ...] = ("cube", "sphere", "cylinder", "cone", "torus", "capsule", "octahedron", "pyramid")

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.12, 0.12),
    "orange": (1.0, 0.55, 0.05),
    "yellow": (0.95, 0.85, 0.1),
    "green": (0.15, 0.65, 0.2),
    "cyan": (0.1, 0.8, 0.85),
    "blue": (0.12, 0.25, 0.85),
    "purple": (0.55, 0.2, 0.75),
    "black": (0.08, 0.08, 0.08),
}

SIZES: dict[str, float] = {"small": 0.2, "large": 0.3}  # characteristic half-extent in world units

RELATIONS: tuple[str, ...] = ("on top of", "under", "to the left of", "to the right of", "in front of", "behind")

ARTICLES: tuple[str, ...] = ("a", "an")

EXAMPLE_PROMPT = "a small red cube on top of a large blue cylinder"


class PromptError(ValueError):
    """A prompt outside the ShapeWorld grammar."""


class ObjectSpec(NamedTuple):
    """A fully specified object phrase."""

    shape: str
    color: str
    size: str


def object_phrase(shape: str, color: str | None = None, size: str | None = None) -> str:
    """Canonical phrase with the correct article, e.g. ("cube", "orange") -> "an orange cube"."""
    words = [w for w in (size, color, shape) if w is not None]
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article, *words])


def pair_prompt(first: str, relation: str, second: str) -> str:
    """Join two object phrases with a relation: "a red cube" + "under" + "a cone"."""
    return f"{first} {relation} {second}"


def _fail(prompt: str, words: list[str], index: int, slot: str, allowed) -> PromptError:
    if index < len(words):
        where = f"word {index + 1} {words[index]!r} is not allowed here"
    else:
        where = f"the prompt ends after word {index} {words[index - 1]!r}"
    return PromptError(
        f"Cannot parse prompt {prompt!r}: {where}; expected {slot}, one of: "
        f"{', '.join(repr(a) for a in allowed)}. Example of a valid prompt: {EXAMPLE_PROMPT!r}."
    )


def _normalize(prompt) -> list[str]:
    if not isinstance(prompt, str):
        raise PromptError(
            f"A prompt must be a str, got {type(prompt).__name__} {prompt!r}. Example of a valid prompt: {EXAMPLE_PROMPT!r}."
        )
    text = prompt.strip()
    if text.endswith("."):
        text = text[:-1]
    words = text.lower().split()
    if not words:
        raise PromptError(f"The prompt {prompt!r} is empty. Example of a valid prompt: {EXAMPLE_PROMPT!r}.")
    return words


def _parse_object(prompt: str, words: list[str], i: int) -> tuple[str | None, str | None, str, int]:
    """Parse ``article [size] [color] shape`` from word i -> (size, color, shape, next index)."""
    if i >= len(words) or words[i] not in ARTICLES:
        raise _fail(prompt, words, i, "an article", ARTICLES)
    i += 1
    size = color = None
    if i < len(words) and words[i] in SIZES:
        size, i = words[i], i + 1
    if i < len(words) and words[i] in COLORS:
        color, i = words[i], i + 1
    if i >= len(words) or words[i] not in SHAPES:
        allowed = (list(SIZES) if size is None and color is None else []) + (list(COLORS) if color is None else [])
        slot = ("a size, color or shape" if size is None else "a color or shape") if color is None else "a shape"
        raise _fail(prompt, words, i, slot, allowed + list(SHAPES))
    return size, color, words[i], i + 1


def _parse_relation(prompt: str, words: list[str], i: int) -> tuple[str, int]:
    for relation in RELATIONS:
        tokens = relation.split()
        if words[i : i + len(tokens)] == tokens:
            return relation, i + len(tokens)
    raise _fail(prompt, words, i, "a relation", RELATIONS)


def parse_structure(prompt: str) -> tuple[tuple[str | None, str | None, str], str | None, tuple[str | None, str | None, str] | None]:
    """Syntax only: prompt -> ((size, color, shape), relation or None, second object or None); None = unspecified."""
    words = _normalize(prompt)
    size, color, shape, i = _parse_object(prompt, words, 0)
    first = (size, color, shape)
    if i == len(words):
        return first, None, None
    relation, i = _parse_relation(prompt, words, i)
    size, color, shape, i = _parse_object(prompt, words, i)
    if i != len(words):
        raise _fail(prompt, words, i, "the end of the prompt after the second object", ["<end>"])
    return first, relation, (size, color, shape)


def object_choices(size: str | None, color: str | None, shape: str) -> list[ObjectSpec]:
    """The fully specified objects an object phrase may mean, ordered by (size, color); None = any."""
    sizes = [size] if size is not None else list(SIZES)
    colors = [color] if color is not None else list(COLORS)
    return [ObjectSpec(shape, c, s) for s in sizes for c in colors]
