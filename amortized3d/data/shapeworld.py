"""ShapeWorld: a procedural world of colored SDF primitives with exact prompt -> scene ground truth.

Grammar (words are case-insensitive; surrounding whitespace, repeated spaces and a
trailing period are ignored; "a" and "an" are both accepted):

    object := article [size] [color] shape
    prompt := object | object " " relation " " object

A missing size means any size and a missing color any color, so a prompt denotes an
equal-weight mixture of scenes: ``parse_prompt("a cube")`` gives 16 scenes
(2 sizes x 8 colors), ``parse_prompt("a small red cube")`` gives 1.

Shapes (unit versions, half-extent 1, upright along z, centered at the origin; a
primitive of size s is the unit shape scaled by SIZES[s] and translated to its center):

    cube        box [-1, 1]^3
    sphere      radius 1
    cylinder    radius 1, z in [-1, 1]
    cone        base radius 1 at z = -1, apex at z = +1
    torus       lying flat in the xy plane, major radius 0.7, tube radius 0.3 (z in [-0.3, 0.3])
    capsule     vertical segment z in [-0.5, 0.5], radius 0.5
    octahedron  |x| + |y| + |z| <= 1
    pyramid     square base [-1, 1]^2 at z = -1, apex at (0, 0, 1)

The SDFs are Inigo Quilez's exact formulas; uniform scaling keeps them exact:
sdf_s(p) = h * sdf_unit((p - center) / h). Union of primitives: sdf = min_k sdf_k,
color = color of the primitive with the smallest SDF.

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
"""

from __future__ import annotations

import functools
import itertools
import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch

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

SCENE_RADIUS = 0.8
LAYOUT_GAP = 0.08  # gap between the footprints of side-by-side objects

EXAMPLE_PROMPT = "a small red cube on top of a large blue cylinder"

# Unit-shape extents: (half-width of the footprint along x and y, bottom z, top z), in units of the half-extent.
SHAPE_EXTENTS: dict[str, tuple[float, float, float]] = {
    "cube": (1.0, -1.0, 1.0),
    "sphere": (1.0, -1.0, 1.0),
    "cylinder": (1.0, -1.0, 1.0),
    "cone": (1.0, -1.0, 1.0),
    "torus": (1.0, -0.3, 0.3),
    "capsule": (0.5, -1.0, 1.0),
    "octahedron": (1.0, -1.0, 1.0),
    "pyramid": (1.0, -1.0, 1.0),
}

TORUS_MAJOR_RADIUS, TORUS_TUBE_RADIUS = 0.7, 0.3
CAPSULE_HALF_SEGMENT, CAPSULE_RADIUS = 0.5, 0.5


class PromptError(ValueError):
    """A prompt outside the ShapeWorld grammar."""


# ----------------------------------------------------------------------------- data types


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


class ObjectSpec(NamedTuple):
    """A fully specified object phrase."""

    shape: str
    color: str
    size: str


# ----------------------------------------------------------------------------- prompts


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


def _choices(size: str | None, color: str | None, shape: str) -> list[ObjectSpec]:
    sizes = [size] if size is not None else list(SIZES)
    colors = [color] if color is not None else list(COLORS)
    return [ObjectSpec(shape, c, s) for s in sizes for c in colors]


@functools.lru_cache(maxsize=1 << 15)
def _parse_cached(prompt: str) -> tuple[Scene, ...]:
    first, relation, second = parse_structure(prompt)
    if relation is None:
        return tuple(build_scene(a) for a in _choices(*first))
    return tuple(build_scene(a, relation, b) for a in _choices(*first) for b in _choices(*second))


def parse_prompt(prompt: str) -> list[Scene]:
    """All scenes consistent with the prompt (equal-weight mixture), ordered by (first size, first color, second size, second color)."""
    if not isinstance(prompt, str):
        _normalize(prompt)  # raises a PromptError naming the bad type
    return list(_parse_cached(prompt))


# ----------------------------------------------------------------------------- layout


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


# ----------------------------------------------------------------------------- exact unit SDFs (q [..., 3] -> [...])


def _hypot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(a * a + b * b)


def sdf_unit_box(q: torch.Tensor) -> torch.Tensor:
    """Box [-1,1]^3: |max(|q|-1, 0)| + min(max_i(|q_i|-1), 0). q [..., 3] -> [...]."""
    d = q.abs() - 1.0
    return d.clamp(min=0).norm(dim=-1) + d.max(dim=-1).values.clamp(max=0)


def sdf_unit_sphere(q: torch.Tensor) -> torch.Tensor:
    """Sphere radius 1: |q| - 1. q [..., 3] -> [...]."""
    return q.norm(dim=-1) - 1.0


def sdf_unit_cylinder(q: torch.Tensor) -> torch.Tensor:
    """Capped cylinder r=1, |z|<=1: d=(|q_xy|-1, |z|-1); min(max(d),0) + |max(d,0)|. q [..., 3] -> [...]."""
    dx = q[..., :2].norm(dim=-1) - 1.0
    dz = q[..., 2].abs() - 1.0
    return torch.maximum(dx, dz).clamp(max=0) + _hypot(dx.clamp(min=0), dz.clamp(min=0))


def sdf_unit_cone(q: torch.Tensor) -> torch.Tensor:
    """Capped cone (IQ), half-height 1, base radius 1 at z=-1, tip radius 0: min distance to cap and slant segments, signed. q [..., 3] -> [...]."""
    r, z = q[..., :2].norm(dim=-1), q[..., 2]
    ca_x = r - torch.minimum(r, torch.where(z < 0, torch.ones_like(r), torch.zeros_like(r)))
    ca_y = z.abs() - 1.0
    # k1 = (r2, h) = (0, 1), k2 = (r2 - r1, 2h) = (-1, 2), |k2|^2 = 5
    t = ((r + 2.0 * (1.0 - z)) / 5.0).clamp(0.0, 1.0)
    cb_x = r - t
    cb_y = z - 1.0 + 2.0 * t
    sign = torch.where((cb_x < 0) & (ca_y < 0), -torch.ones_like(r), torch.ones_like(r))
    return sign * torch.sqrt(torch.minimum(ca_x * ca_x + ca_y * ca_y, cb_x * cb_x + cb_y * cb_y))


def sdf_unit_torus(q: torch.Tensor) -> torch.Tensor:
    """Flat torus: |(|q_xy| - 0.7, z)| - 0.3. q [..., 3] -> [...]."""
    return _hypot(q[..., :2].norm(dim=-1) - TORUS_MAJOR_RADIUS, q[..., 2]) - TORUS_TUBE_RADIUS


def sdf_unit_capsule(q: torch.Tensor) -> torch.Tensor:
    """Vertical capsule: |q - (0, 0, clamp(z, -0.5, 0.5))| - 0.5. q [..., 3] -> [...]."""
    z = q[..., 2]
    dz = z - z.clamp(-CAPSULE_HALF_SEGMENT, CAPSULE_HALF_SEGMENT)
    return torch.sqrt(q[..., 0] ** 2 + q[..., 1] ** 2 + dz * dz) - CAPSULE_RADIUS


def sdf_unit_octahedron(q: torch.Tensor) -> torch.Tensor:
    """Exact octahedron |x|+|y|+|z|<=1 (IQ): distance to the nearest face region, else (sum|q|-1)/sqrt(3). q [..., 3] -> [...]."""
    p = q.abs()
    m = p.sum(dim=-1) - 1.0
    px, py, pz = p.unbind(-1)
    cx, cy, cz = 3.0 * px < m, 3.0 * py < m, 3.0 * pz < m
    # q = p.xyz if cx else p.yzx if cy else p.zxy
    a = torch.where(cx, px, torch.where(cy, py, pz))
    b = torch.where(cx, py, torch.where(cy, pz, px))
    c = torch.where(cx, pz, torch.where(cy, px, py))
    k = (0.5 * (c - b + 1.0)).clamp(0.0, 1.0)
    edge = torch.sqrt(a * a + (b - 1.0 + k) ** 2 + (c - k) ** 2)
    return torch.where(cx | cy | cz, edge, m * 0.57735027)


def sdf_unit_pyramid(q: torch.Tensor) -> torch.Tensor:
    """Exact square pyramid, base [-1,1]^2 at z=-1, apex (0,0,1): sign(s) * min(|s|, dist(q, base square)), s = 2 * sdPyramid_IQ((q + e_z) / 2, h=1). q [..., 3] -> [...]."""
    h = 1.0
    m2 = h * h + 0.25
    x, y = (0.5 * q[..., 0]).abs(), (0.5 * q[..., 1]).abs()
    up = 0.5 * (q[..., 2] + 1.0)
    px = torch.maximum(x, y) - 0.5
    pz = torch.minimum(x, y) - 0.5
    qx, qy, qz = pz, h * up - 0.5 * px, h * px + 0.5 * up
    s = (-qx).clamp(min=0)
    t = ((qy - 0.5 * pz) / (m2 + 0.25)).clamp(0.0, 1.0)
    a = m2 * (qx + s) ** 2 + qy * qy
    b = m2 * (qx + 0.5 * t) ** 2 + (qy - m2 * t) ** 2
    d2 = torch.where(torch.minimum(qy, -qx * m2 - qy * 0.5) > 0, torch.zeros_like(a), torch.minimum(a, b))
    iq = 2.0 * torch.sqrt((d2 + qz * qz) / m2) * torch.sign(torch.maximum(qz, -up))
    # IQ's distance covers the four side triangles only (its sign is exact); add the base square.
    beyond = (q[..., :2].abs() - 1.0).clamp(min=0)
    base = torch.sqrt(beyond[..., 0] ** 2 + beyond[..., 1] ** 2 + (q[..., 2] + 1.0) ** 2)
    distance = torch.minimum(iq.abs(), base)
    return torch.where(iq < 0, -distance, distance)


UNIT_SDFS = {
    "cube": sdf_unit_box,
    "sphere": sdf_unit_sphere,
    "cylinder": sdf_unit_cylinder,
    "cone": sdf_unit_cone,
    "torus": sdf_unit_torus,
    "capsule": sdf_unit_capsule,
    "octahedron": sdf_unit_octahedron,
    "pyramid": sdf_unit_pyramid,
}


# ----------------------------------------------------------------------------- batched field


class SceneField:
    """Exact fields of P scenes, padded to K = max primitive count (padding slots have sdf = +inf).

    shape_index [P, K] long (-1 = padding), centers [P, K, 3], half_extents [P, K], colors [P, K, 3]
    (float64, cast to the points' dtype and device on each call), background_rgb [3].
    Each slot evaluates only its own shape's SDF, so the cost is one SDF per (prompt, slot, point).
    """

    def __init__(self, scenes: list[Scene], background: tuple[float, float, float] = (1.0, 1.0, 1.0)):
        if len(scenes) == 0 or any(len(s.primitives) == 0 for s in scenes):
            raise ValueError(f"scene_field needs at least one scene and every scene at least one primitive; got {len(scenes)} scenes")
        self.scenes = list(scenes)
        P, K = len(scenes), max(len(s.primitives) for s in scenes)
        self.shape_index = torch.full((P, K), -1, dtype=torch.long)
        self.centers = torch.zeros(P, K, 3, dtype=torch.float64)
        self.half_extents = torch.ones(P, K, dtype=torch.float64)
        self.colors = torch.zeros(P, K, 3, dtype=torch.float64)
        for p, scene in enumerate(scenes):
            for k, primitive in enumerate(scene.primitives):
                self.shape_index[p, k] = SHAPES.index(primitive.shape)
                self.centers[p, k] = torch.tensor(primitive.center, dtype=torch.float64)
                self.half_extents[p, k] = primitive.half_extent
                self.colors[p, k] = torch.tensor(primitive.rgb, dtype=torch.float64)
        self.background_rgb = torch.tensor(background, dtype=torch.float32)
        # Per shape: (prompt indices [M], slot indices [M]) of the slots holding that shape.
        self._slots = {}
        for s, shape in enumerate(SHAPES):
            p_idx, k_idx = torch.nonzero(self.shape_index == s, as_tuple=True)
            if len(p_idx):
                self._slots[shape] = (p_idx, k_idx)

    @property
    def n_prompts(self) -> int:
        return self.shape_index.shape[0]

    def slot_sdf(self, points: torch.Tensor) -> torch.Tensor:
        """Per-primitive SDF: sdf_k(x) = h_k * unit_k((x - c_k) / h_k). points [P, N, 3] -> [P, N, K]."""
        if points.dim() != 3 or points.shape[0] != self.n_prompts or points.shape[-1] != 3:
            raise ValueError(f"points must have shape [P={self.n_prompts}, N, 3], got {tuple(points.shape)}")
        P, N, _ = points.shape
        K = self.shape_index.shape[1]
        centers = self.centers.to(points)
        scale = self.half_extents.to(points)
        out = points.new_full((P, K, N), math.inf)
        for shape, (p_idx, k_idx) in self._slots.items():
            p_idx, k_idx = p_idx.to(points.device), k_idx.to(points.device)
            h = scale[p_idx, k_idx]  # [M]
            local = (points[p_idx] - centers[p_idx, k_idx].unsqueeze(1)) / h[:, None, None]  # [M, N, 3]
            out[p_idx, k_idx] = UNIT_SDFS[shape](local) * h[:, None]
        return out.transpose(1, 2)

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """Union SDF: min_k sdf_k(x). points [P, N, 3] -> [P, N]."""
        return self.slot_sdf(points).min(dim=-1).values

    def sdf_and_color(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Union SDF and the color of the argmin primitive. points [P, N, 3] -> (sdf [P, N], rgb [P, N, 3])."""
        sdf, nearest = self.slot_sdf(points).min(dim=-1)  # [P, N], [P, N]
        colors = self.colors.to(points)  # [P, K, 3]
        rgb = torch.gather(colors, 1, nearest.unsqueeze(-1).expand(-1, -1, 3))
        return sdf, rgb

    def background(self, directions: torch.Tensor) -> torch.Tensor:
        """Constant background. directions [P, R, 3] -> rgb [P, R, 3]."""
        return self.background_rgb.to(directions).expand(directions.shape).clone()


def scene_field(scenes: list[Scene], background: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> SceneField:
    """Batched exact field for P = len(scenes) scenes (implements amortized3d.fields.Field)."""
    return SceneField(scenes, background)


# ----------------------------------------------------------------------------- corpora

SHAPEWORLD_CORPORA: tuple[str, ...] = ("shapeworld-16", "shapeworld-4k", "shapeworld-120k")

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

# name -> (pairs in train, held-out test prompts, val prompts)
_CORPUS_SIZES = {"shapeworld-4k": (3800, 200, 40), "shapeworld-120k": (None, 1000, 1200)}


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
