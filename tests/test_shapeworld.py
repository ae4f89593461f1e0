"""Tests for ShapeWorld: grammar, exact SDFs against independent geometry, layout, batched fields, corpora."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import random
import subprocess
import sys

import pytest
import torch

from amortized3d.shapeworld import (
    COLORS,
    RELATIONS,
    SCENE_RADIUS,
    SHAPES,
    SHAPEWORLD_CORPORA,
    SIZES,
    Primitive,
    PromptError,
    Scene,
    object_phrase,
    parse_prompt,
    parse_structure,
    scene_field,
    shapeworld_corpus,
    unseen_prompts,
)
from amortized3d.rendering.cameras import look_at_cameras

# ----------------------------------------------------------------------------- independent geometry (unit shapes)
# Written from the shape descriptions: half-extent 1, upright along z.
# (footprint half-width along x/y, bottom z, top z)
EXTENTS = {
    "cube": (1.0, -1.0, 1.0),
    "sphere": (1.0, -1.0, 1.0),
    "cylinder": (1.0, -1.0, 1.0),
    "cone": (1.0, -1.0, 1.0),
    "torus": (1.0, -0.3, 0.3),
    "capsule": (0.5, -1.0, 1.0),
    "octahedron": (1.0, -1.0, 1.0),
    "pyramid": (1.0, -1.0, 1.0),
}


def inside_unit(shape: str, q: torch.Tensor) -> torch.Tensor:
    """Membership from the geometric definition. q [N, 3] -> bool [N]."""
    x, y, z = q.unbind(-1)
    r = torch.sqrt(x * x + y * y)
    if shape == "cube":
        return (q.abs() <= 1).all(-1)
    if shape == "sphere":
        return x * x + y * y + z * z <= 1
    if shape == "cylinder":
        return (r <= 1) & (z.abs() <= 1)
    if shape == "cone":  # radius shrinks linearly from 1 at z=-1 to 0 at z=1
        return (z.abs() <= 1) & (r <= (1 - z) / 2)
    if shape == "torus":
        return (r - 0.7) ** 2 + z * z <= 0.09
    if shape == "capsule":
        dz = torch.where(z > 0.5, z - 0.5, torch.where(z < -0.5, z + 0.5, torch.zeros_like(z)))
        return r * r + dz * dz <= 0.25
    if shape == "octahedron":
        return x.abs() + y.abs() + z.abs() <= 1
    if shape == "pyramid":  # square cross-section of half-width (1 - z)/2
        return (z.abs() <= 1) & (torch.maximum(x.abs(), y.abs()) <= (1 - z) / 2)
    raise AssertionError(shape)


def _grid(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    u, v = torch.meshgrid(t, t, indexing="ij")
    return u.reshape(-1), v.reshape(-1)


def _disk(radius: float, z: float, n: int) -> torch.Tensor:
    u, v = _grid(n)
    rho, theta = radius * u, 2 * math.pi * v
    return torch.stack([rho * theta.cos(), rho * theta.sin(), torch.full_like(rho, z)], -1)


def _triangle(a, b, c, n: int) -> torch.Tensor:
    u, v = _grid(n)
    keep = u + v <= 1
    u, v = u[keep], v[keep]
    a, b, c = (torch.tensor(p, dtype=torch.float64) for p in (a, b, c))
    return a + u[:, None] * (b - a) + v[:, None] * (c - a)


def surface_unit(shape: str, n: int = 120) -> torch.Tensor:
    """Dense samples of the unit surface from a parametric description. -> [M, 3]."""
    u, v = _grid(n)
    theta = 2 * math.pi * u
    if shape == "cube":
        a, b = 2 * u - 1, 2 * v - 1
        one = torch.ones_like(a)
        faces = []
        for axis in range(3):
            for sign in (-1.0, 1.0):
                cols = [a, b]
                cols.insert(axis, sign * one)
                faces.append(torch.stack(cols, -1))
        return torch.cat(faces)
    if shape == "sphere":
        phi = math.pi * v
        return torch.stack([phi.sin() * theta.cos(), phi.sin() * theta.sin(), phi.cos()], -1)
    if shape == "cylinder":
        side = torch.stack([theta.cos(), theta.sin(), 2 * v - 1], -1)
        return torch.cat([side, _disk(1, -1, n), _disk(1, 1, n)])
    if shape == "cone":
        z = 2 * v - 1
        r = (1 - z) / 2
        side = torch.stack([r * theta.cos(), r * theta.sin(), z], -1)
        return torch.cat([side, _disk(1, -1, n)])
    if shape == "torus":
        phi = 2 * math.pi * v
        ring = 0.7 + 0.3 * phi.cos()
        return torch.stack([ring * theta.cos(), ring * theta.sin(), 0.3 * phi.sin()], -1)
    if shape == "capsule":
        side = torch.stack([0.5 * theta.cos(), 0.5 * theta.sin(), v - 0.5], -1)
        phi = 0.5 * math.pi * v
        top = torch.stack([0.5 * phi.sin() * theta.cos(), 0.5 * phi.sin() * theta.sin(), 0.5 + 0.5 * phi.cos()], -1)
        bottom = top * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
        return torch.cat([side, top, bottom])
    if shape == "octahedron":
        face = _triangle((1, 0, 0), (0, 1, 0), (0, 0, 1), n)
        signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=3)), dtype=torch.float64)
        return (face[None] * signs[:, None]).reshape(-1, 3)
    if shape == "pyramid":
        a, b = 2 * u - 1, 2 * v - 1
        base = torch.stack([a, b, -torch.ones_like(a)], -1)
        corners = [(1, 1, -1), (-1, 1, -1), (-1, -1, -1), (1, -1, -1)]
        sides = [_triangle(corners[i], corners[(i + 1) % 4], (0, 0, 1), n) for i in range(4)]
        return torch.cat([base, *sides])
    raise AssertionError(shape)


CENTER = (0.1, -0.2, 0.05)
H = SIZES["large"]


def single_field(shape: str):
    return scene_field([Scene((Primitive(shape, "red", "large", CENTER),))])


def to_world(q: torch.Tensor) -> torch.Tensor:
    return q * H + torch.tensor(CENTER, dtype=torch.float64)


def random_unit_points(n: int, half: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g, dtype=torch.float64) * 2 - 1) * half


# ----------------------------------------------------------------------------- grammar


def test_vocabulary():
    assert len(SHAPES) == 8 and len(COLORS) == 8 and len(RELATIONS) == 6 and set(SIZES) == {"small", "large"}
    for rgb in COLORS.values():
        assert all(0 <= c <= 1 for c in rgb) and min(rgb) < 0.5  # none is (near) white
    assert SIZES["small"] < SIZES["large"]


def test_articles():
    assert object_phrase("cube", "orange") == "an orange cube"
    assert object_phrase("octahedron") == "an octahedron"
    assert object_phrase("octahedron", "red", "small") == "a small red octahedron"
    assert object_phrase("cube", "red") == "a red cube"


def test_component_counts():
    assert len(parse_prompt("a cube")) == 16
    assert len(set(parse_prompt("a cube"))) == 16
    assert len(parse_prompt("a small red cube")) == 1
    assert len(parse_prompt("a red cube on top of a blue cylinder")) == 4
    assert len(parse_prompt("a red cube to the left of a large sphere")) == 8 * 2
    assert len(parse_prompt("a cube behind a sphere")) == 16 * 16


def test_components_cover_all_combinations():
    scenes = parse_prompt("a cube")
    combos = {(s.primitives[0].size, s.primitives[0].color) for s in scenes}
    assert combos == set(itertools.product(SIZES, COLORS))
    assert all(s.primitives[0].shape == "cube" for s in scenes)
    pair = parse_prompt("a red cube on top of a blue cylinder")
    assert {(s.primitives[0].size, s.primitives[1].size) for s in pair} == set(itertools.product(SIZES, SIZES))
    assert all((s.primitives[0].color, s.primitives[1].color) == ("red", "blue") for s in pair)


def test_parser_is_lenient_about_form():
    canonical = parse_prompt("a small orange cube")
    for variant in ["A Small Orange Cube.", "  an  small   orange cube ", "an small orange cube.", "A SMALL ORANGE CUBE"]:
        assert parse_prompt(variant) == canonical


@pytest.mark.parametrize(
    "prompt, bad, allowed_word",
    [
        ("a red", "red", "cube"),
        ("a plaid cube", "plaid", "purple"),
        ("a cube on a sphere", "on", "on top of"),
        ("red cube", "red", "an"),
        ("a cube under a sphere red", "red", "end"),
    ],
)
def test_malformed_prompts(prompt, bad, allowed_word):
    with pytest.raises(PromptError) as info:
        parse_prompt(prompt)
    message = str(info.value)
    assert repr(prompt) in message and repr(bad) in message and allowed_word in message
    assert "Example" in message
    assert parse_prompt(message.split("Example of a valid prompt: ")[1].strip(".'\" "))  # the example is valid


@pytest.mark.parametrize("prompt", ["", "   ", ".", 42, None])
def test_empty_or_non_string(prompt):
    with pytest.raises(PromptError, match="Example"):
        parse_prompt(prompt)
    assert issubclass(PromptError, ValueError)


# ----------------------------------------------------------------------------- exact SDFs


@pytest.mark.parametrize("shape", SHAPES)
def test_sdf_sign_matches_inside_test(shape):
    q = random_unit_points(4000, 1.3, seed=1)
    sdf = single_field(shape).sdf(to_world(q)[None])[0]
    inside = inside_unit(shape, q)
    clear = sdf.abs() > 1e-9
    assert inside.any() and (~inside).any()
    assert torch.equal((sdf < 0)[clear], inside[clear])


@pytest.mark.parametrize("shape", SHAPES)
def test_sdf_zero_on_surface(shape):
    surface = to_world(surface_unit(shape, n=40))
    sdf = single_field(shape).sdf(surface[None])[0]
    assert sdf.abs().max() < 1e-7


@pytest.mark.parametrize("shape", SHAPES)
def test_sdf_matches_brute_force_distance(shape):
    surface = to_world(surface_unit(shape, n=120))  # unit spacing <= 2*pi/119 ~ 0.053
    q = random_unit_points(300, 1.8, seed=2)
    points = to_world(q)
    sdf = single_field(shape).sdf(points[None])[0]
    brute = torch.cdist(points, surface).min(dim=1).values
    # Samples lie on the surface, so the true distance is at most the brute-force one,
    # and exceeds it by at most the sampling radius.
    assert (sdf.abs() <= brute + 1e-9).all()
    assert (brute - sdf.abs()).max() < 0.03 * H
    outside = ~inside_unit(shape, q)
    assert outside.sum() > 100


@pytest.mark.parametrize("shape", SHAPES)
def test_sdf_gradient_has_unit_norm(shape):
    field = single_field(shape)
    points = to_world(random_unit_points(2000, 1.6, seed=3))
    sdf = field.sdf(points[None])[0]
    points = points[sdf.abs() > 0.01 * H]
    eps = 1e-5
    offsets = torch.eye(3, dtype=torch.float64) * eps
    plus = field.sdf((points[:, None] + offsets).reshape(1, -1, 3)).reshape(-1, 3)
    minus = field.sdf((points[:, None] - offsets).reshape(1, -1, 3)).reshape(-1, 3)
    norm = ((plus - minus) / (2 * eps)).norm(dim=-1)
    good = (norm - 1).abs() < 1e-3
    assert good.float().mean() > 0.98  # misses only points straddling a medial-axis kink


def test_sdf_float32_points_and_color():
    field = single_field("cone")
    points = torch.tensor([[[0.1, -0.2, 0.05], [3.0, 0.0, 0.0]]])
    sdf, rgb = field.sdf_and_color(points)
    assert sdf.dtype == torch.float32 and rgb.shape == (1, 2, 3)
    assert sdf[0, 0] < 0 and sdf[0, 1] > 0
    assert torch.allclose(rgb, torch.tensor(COLORS["red"]).expand(1, 2, 3))


# ----------------------------------------------------------------------------- layout


def world_box(p: Primitive):
    width, bottom, top = EXTENTS[p.shape]
    h = SIZES[p.size]
    x, y, z = p.center
    return (x - width * h, y - width * h, z + bottom * h), (x + width * h, y + width * h, z + top * h)


def all_geometric_scenes():
    """Layout ignores colors, so one color per object spans every distinct geometry."""
    objects = [(size, shape) for size in SIZES for shape in SHAPES]
    for (sa, a), relation, (sb, b) in itertools.product(objects, RELATIONS, objects):
        prompt = f"a {sa} red {a} {relation} a {sb} blue {b}"
        (scene,) = parse_prompt(prompt)
        yield relation, scene
    for size, shape in objects:
        (scene,) = parse_prompt(f"a {size} red {shape}")
        yield None, scene


def test_every_scene_fits_in_scene_radius():
    count = 0
    for _, scene in all_geometric_scenes():
        for primitive in scene.primitives:
            low, high = world_box(primitive)
            for corner in itertools.product(*zip(low, high)):
                assert math.dist(corner, (0, 0, 0)) <= SCENE_RADIUS + 1e-9, scene
        count += 1
    assert count == 16 * 16 * 6 + 16


def test_layout_does_not_depend_on_color():
    a = parse_prompt("a small red torus in front of a large green cone")[0]
    b = parse_prompt("a small black torus in front of a large cyan cone")[0]
    assert [p.center for p in a.primitives] == [p.center for p in b.primitives]


def test_relation_geometry():
    front = look_at_cameras(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(3.0), torch.tensor(40.0))
    w2c = torch.linalg.inv(front.c2w.double())

    def camera_xz(point):  # image-right coordinate and depth toward the camera (camera looks down -z)
        p = w2c @ torch.tensor([*point, 1.0], dtype=torch.float64)
        return p[0].item(), p[2].item()

    for relation, scene in all_geometric_scenes():
        if relation is None:
            assert scene.primitives[0].center == (0.0, 0.0, 0.0)
            continue
        a, b = scene.primitives
        (alo, ahi), (blo, bhi) = world_box(a), world_box(b)
        if relation in ("on top of", "under"):
            top, bottom = (a, b) if relation == "on top of" else (b, a)
            (tlo, _), (_, bhi_) = world_box(top), world_box(bottom)
            assert top.center[2] > bottom.center[2]
            assert tlo[2] == pytest.approx(bhi_[2], abs=1e-12)  # touching
            assert top.center[:2] == pytest.approx(bottom.center[:2], abs=1e-12)
            continue
        assert alo[2] == pytest.approx(blo[2], abs=1e-12)  # common ground plane
        separated = any(ahi[i] < blo[i] or bhi[i] < alo[i] for i in range(2))
        assert separated
        (ax, adepth), (bx, bdepth) = camera_xz(a.center), camera_xz(b.center)
        if relation == "to the left of":
            assert a.center[1] < b.center[1] and ax < bx
        elif relation == "to the right of":
            assert a.center[1] > b.center[1] and ax > bx
        elif relation == "in front of":
            assert a.center[0] > b.center[0] and adepth > bdepth  # closer to the front camera
        elif relation == "behind":
            assert a.center[0] < b.center[0] and adepth < bdepth


@pytest.mark.parametrize(
    "prompt",
    ["a large red cube on top of a large red sphere", "a large red torus under a small red cone", "a large red pyramid to the left of a large red capsule"],
)
def test_objects_do_not_overlap(prompt):
    (scene,) = parse_prompt(prompt)
    field = scene_field([scene])
    t = torch.linspace(-SCENE_RADIUS, SCENE_RADIUS, 61, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(t, t, t, indexing="ij"), -1).reshape(1, -1, 3)
    slots = field.slot_sdf(grid)[0]  # [N, 2]
    assert (slots < 0).any(dim=0).all()
    assert not ((slots < -1e-9).all(dim=1)).any()


# ----------------------------------------------------------------------------- batched field


def test_batched_field_equals_per_scene_fields():
    scenes = [
        parse_prompt("a small red cube")[0],
        parse_prompt("a large blue torus on top of a small green cone")[0],
        parse_prompt("an orange octahedron behind a black pyramid")[3],
        parse_prompt("a large cyan capsule")[0],
    ]
    g = torch.Generator().manual_seed(4)
    points = torch.rand(len(scenes), 500, 3, generator=g) * 1.6 - 0.8
    sdf, rgb = scene_field(scenes).sdf_and_color(points)
    assert sdf.shape == (4, 500) and rgb.shape == (4, 500, 3)
    assert torch.equal(scene_field(scenes).sdf(points), sdf)
    for p, scene in enumerate(scenes):
        one_sdf, one_rgb = scene_field([scene]).sdf_and_color(points[p : p + 1])
        assert torch.allclose(one_sdf[0], sdf[p]) and torch.allclose(one_rgb[0], rgb[p])
        # Union: min over the primitives' own fields, color of the nearest primitive.
        parts = torch.stack([scene_field([Scene((q,))]).sdf(points[p : p + 1])[0] for q in scene.primitives])
        assert torch.allclose(sdf[p], parts.min(dim=0).values)
        nearest_rgb = torch.tensor([scene.primitives[i].rgb for i in parts.argmin(dim=0).tolist()])
        assert torch.allclose(rgb[p], nearest_rgb)


def test_background_is_constant():
    field = scene_field(parse_prompt("a red cube")[:1] * 2, background=(1.0, 1.0, 1.0))
    dirs = torch.nn.functional.normalize(torch.randn(2, 7, 3), dim=-1)
    assert torch.equal(field.background(dirs), torch.ones(2, 7, 3))


def test_points_batch_must_match_scene_count():
    field = scene_field(parse_prompt("a red cube")[:2])
    with pytest.raises(ValueError, match="P=2"):
        field.sdf(torch.zeros(3, 4, 3))


# ----------------------------------------------------------------------------- corpora


def test_corpus_names():
    assert SHAPEWORLD_CORPORA == ("shapeworld-16", "shapeworld-4k", "shapeworld-20k", "shapeworld-120k")
    with pytest.raises(ValueError, match="shapeworld-4k"):
        shapeworld_corpus("shapeworld-5")


def check_splits(corpus, n_unseen, n_seen=None):
    train, val, test = set(corpus["train"]), set(corpus["val"]), corpus["test"]
    assert len(train) == len(corpus["train"]) and len(val) == len(corpus["val"])
    unseen = unseen_prompts(corpus)
    assert len(unseen) == n_unseen and len(test) == n_unseen + (n_seen or n_unseen) and len(set(test)) == len(test)
    assert not train & set(unseen)
    assert not val & set(unseen) and not val & train
    assert sum(p in train for p in test) == (n_seen or n_unseen)


def test_corpus_4k():
    corpus = shapeworld_corpus("shapeworld-4k")
    assert 3900 <= len(corpus["train"]) <= 4100 and 30 <= len(corpus["val"]) <= 60
    check_splits(corpus, 200)
    for prompt in corpus["train"] + corpus["val"] + corpus["test"]:
        assert parse_prompt(prompt)


def test_corpus_120k():
    corpus = shapeworld_corpus("shapeworld-120k")
    # full space: 128 full + 64 color-only + 8 shape-only singles, 64^2*6 + 128^2*6 pairs
    space = 128 + 64 + 8 + 64 * 64 * 6 + 128 * 128 * 6
    assert len(corpus["train"]) + len(corpus["val"]) + len(unseen_prompts(corpus)) == space
    assert len(corpus["train"]) >= 120_000 and 1000 <= len(corpus["val"]) <= 1500
    check_splits(corpus, 1000)
    for prompt in random.Random(0).sample(corpus["train"] + corpus["val"] + corpus["test"], 2000):
        assert parse_prompt(prompt)


def test_corpus_20k_is_a_subset_of_120k():
    # What the corpus-scale bench needs, a larger subset of shapeworld-120k: every training prompt is one of the 120k
    # corpus's, with the same val and held-out prompts, all singles and 19,800 pairs; the seen test prompts are
    # 1,000 of its own training prompts.
    small, large = shapeworld_corpus("shapeworld-20k"), shapeworld_corpus("shapeworld-120k")
    assert len(small["train"]) == 200 + 19_800 and set(small["train"]) <= set(large["train"])
    assert small["val"] == large["val"] and unseen_prompts(small) == unseen_prompts(large)
    check_splits(small, 1000)
    singles = [p for p in large["train"] if parse_structure(p)[1] is None]  # no relation: one object
    assert set(singles) <= set(small["train"])


def test_corpus_deterministic_across_calls_and_hash_seeds():
    assert shapeworld_corpus("shapeworld-4k") == shapeworld_corpus("shapeworld-4k")
    a = shapeworld_corpus("shapeworld-4k")
    a["train"].append("mutated")
    assert "mutated" not in shapeworld_corpus("shapeworld-4k")["train"]
    code = (
        "import hashlib; from amortized3d.shapeworld import shapeworld_corpus as c; "
        "print(hashlib.sha256(repr(c('shapeworld-4k')).encode()).hexdigest())"
    )
    digests = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        digests.add(out.stdout.strip())
    digests.add(hashlib.sha256(repr(shapeworld_corpus("shapeworld-4k")).encode()).hexdigest())
    assert len(digests) == 1


def test_corpus_quickstart():
    corpus = shapeworld_corpus("shapeworld-16")
    train = corpus["train"]
    assert len(train) == 16 and len(corpus["val"]) == 4 and corpus["test"][:16] == train
    check_splits(corpus, 4, n_seen=16)
    structures = {p: parse_structure(p) for p in train + corpus["val"] + corpus["test"]}
    singles = [p for p in train if structures[p][1] is None]
    pairs = [p for p in train if p not in singles]
    assert any(len(parse_prompt(p)) > 1 for p in singles)  # an under-specified prompt (a mixture)
    assert len({structures[p][1] for p in pairs}) >= 3  # relations
    objects = [obj for p in train for obj in (structures[p][0], structures[p][2]) if obj]
    assert {obj[2] for obj in objects} == set(SHAPES) and {obj[1] for obj in objects} == set(COLORS) | {None}
    # Each unseen prompt recombines a color and a shape that each occur in two or more seen single objects.
    for prompt in unseen_prompts(corpus):
        (size, color, shape), relation, _ = structures[prompt]
        assert relation is None and color and size
        assert sum(structures[p][0][1] == color for p in singles) >= 2, prompt
        assert sum(structures[p][0][2] == shape for p in singles) >= 2, prompt
        assert (size, color, shape) not in {structures[p][0] for p in singles}
    for prompt in train + corpus["val"] + corpus["test"]:
        assert parse_prompt(prompt)
