"""ShapeWorld scene layout: where the objects of a prompt go.

Layout (deterministic, colors do not affect it):
  * a single object sits at the origin;
  * pairs rest on a common ground plane (bottoms aligned), separated by LAYOUT_GAP
    between their axis-aligned footprints, except "on top of" / "under", which stack
    the objects on a common vertical axis touching (top object's bottom = bottom
    object's top);
  * directions are as seen from the front camera (azimuth 0: on +x looking toward -x,
    z up), so image-right is +y: "A to the left of B" puts A at smaller y than B,
    "A in front of B" puts A at larger x than B, "A behind B" at smaller x;
  * the scene is then translated so the center of its bounding box is the origin;
    every scene fits inside the sphere of radius SCENE_RADIUS.

A primitive of size s is its unit shape (``amortized3d.shapeworld.sdf``) scaled by
SIZES[s] and translated to its center.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

from amortized3d.shapeworld.grammar import COLORS, RELATIONS, SIZES, ObjectSpec, object_choices, parse_structure
from amortized3d.shapeworld.sdf import SHAPE_EXTENTS

SCENE_RADIUS = 0.8
LAYOUT_GAP = 0.08  # gap between the footprints of side-by-side objects


@dataclass(frozen=True)
class Primitive:
    """One colored shape: ``shape`` in SHAPES, ``color`` in COLORS, ``size`` in SIZES, ``center`` (x, y, z)."""

    shape: str
    color: str
    size: str
    center: tuple[float, float, float]

    @property
    def rgb(self) -> tuple[float, float, float]:
        return COLORS[self.color]

    @property
    def half_extent(self) -> float:
        return SIZES[self.size]

    def bounds(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Axis-aligned bounding box (low corner, high corner) in world units."""
        width, bottom, top = SHAPE_EXTENTS[self.shape]
        h = self.half_extent
        x, y, z = self.center
        return (x - width * h, y - width * h, z + bottom * h), (x + width * h, y + width * h, z + top * h)


@dataclass(frozen=True)
class Scene:
    """A union of primitives (order follows the prompt: the first object first)."""

    primitives: tuple[Primitive, ...]

    @property
    def rgb(self) -> tuple[tuple[float, float, float], ...]:
        """Color of each primitive, in order."""
        return tuple(p.rgb for p in self.primitives)

    def bounding_radius(self) -> float:
        """Largest distance from the origin to a bounding-box corner of any primitive."""
        radius = 0.0
        for primitive in self.primitives:
            low, high = primitive.bounds()
            for corner in itertools.product(*zip(low, high)):
                radius = max(radius, math.sqrt(sum(c * c for c in corner)))
        return radius


def _vertical(spec: ObjectSpec) -> tuple[float, float, float]:
    """(footprint half-width, bottom offset, top offset) relative to the center, world units."""
    width, bottom, top = SHAPE_EXTENTS[spec.shape]
    h = SIZES[spec.size]
    return width * h, bottom * h, top * h


def build_scene(first: ObjectSpec, relation: str | None = None, second: ObjectSpec | None = None) -> Scene:
    """Place one object, or two objects in a relation, then center the bounding box at the origin (see module docstring)."""
    if relation is None:
        return Scene((Primitive(first.shape, first.color, first.size, (0.0, 0.0, 0.0)),))
    if relation not in RELATIONS or second is None:
        raise ValueError(f"relation {relation!r} with second object {second!r}: relation must be one of {RELATIONS} and second given")
    wa, ba, ta = _vertical(first)
    wb, bb, tb = _vertical(second)
    if relation in ("on top of", "under"):
        lower, upper = (second, first) if relation == "on top of" else (first, second)
        (_, bl, tl), (_, bu, _) = _vertical(lower), _vertical(upper)
        z_lower = -bl
        z_upper = z_lower + tl - bu
        za, zb = (z_upper, z_lower) if relation == "on top of" else (z_lower, z_upper)
        ca, cb = [0.0, 0.0, za], [0.0, 0.0, zb]
    else:
        separation = wa + LAYOUT_GAP + wb
        axis, sign = {"to the left of": (1, -1.0), "to the right of": (1, 1.0), "in front of": (0, 1.0), "behind": (0, -1.0)}[relation]
        ca, cb = [0.0, 0.0, -ba], [0.0, 0.0, -bb]
        ca[axis] = sign * separation
    low = [min(ca[i] - wa, cb[i] - wb) for i in range(2)] + [min(ca[2] + ba, cb[2] + bb)]
    high = [max(ca[i] + wa, cb[i] + wb) for i in range(2)] + [max(ca[2] + ta, cb[2] + tb)]
    mid = [(lo + hi) / 2 for lo, hi in zip(low, high)]
    ca = tuple(c - m + 0.0 for c, m in zip(ca, mid))
    cb = tuple(c - m + 0.0 for c, m in zip(cb, mid))
    return Scene((Primitive(first.shape, first.color, first.size, ca), Primitive(second.shape, second.color, second.size, cb)))


@functools.lru_cache(maxsize=1 << 15)
def _parse_cached(prompt: str) -> tuple[Scene, ...]:
    first, relation, second = parse_structure(prompt)
    if relation is None:
        return tuple(build_scene(a) for a in object_choices(*first))
    return tuple(build_scene(a, relation, b) for a in object_choices(*first) for b in object_choices(*second))


def parse_prompt(prompt: str) -> list[Scene]:
    """All scenes consistent with the prompt (equal-weight mixture), ordered by (first size, first color, second size, second color)."""
    if not isinstance(prompt, str):
        parse_structure(prompt)  # raises a PromptError naming the bad type
    return list(_parse_cached(prompt))
