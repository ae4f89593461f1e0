"""ShapeWorld: a procedural world of colored SDF primitives with exact prompt -> scene ground truth.

    grammar   the prompt words and syntax, PromptError           parse_structure, object_choices
    layout    where the objects of a prompt go                   parse_prompt, build_scene, Scene
    sdf       the eight unit shapes and their exact SDFs          UNIT_SDFS, sdf_unit_*
    scene     the batched exact field of P scenes                 scene_field, SceneField
    corpora   the generated corpora shapeworld-16/-4k/-120k       shapeworld_corpus

``parse_prompt("a cube")`` gives every scene the prompt may mean (here 16: 2 sizes x 8
colors); ``scene_field(scenes)`` evaluates their exact SDF and color at points [P, N, 3].
"""

from amortized3d.shapeworld.corpora import CORPUS_SEED, SHAPEWORLD_CORPORA, prompt_space, shapeworld_corpus, unseen_prompts
from amortized3d.shapeworld.grammar import (
    ARTICLES,
    COLORS,
    EXAMPLE_PROMPT,
    RELATIONS,
    SHAPES,
    SIZES,
    ObjectSpec,
    PromptError,
    object_choices,
    object_phrase,
    pair_prompt,
    parse_structure,
)
from amortized3d.shapeworld.layout import LAYOUT_GAP, SCENE_RADIUS, Primitive, Scene, build_scene, parse_prompt
from amortized3d.shapeworld.scene import SceneField, scene_field
from amortized3d.shapeworld.sdf import (
    CAPSULE_HALF_SEGMENT,
    CAPSULE_RADIUS,
    SHAPE_EXTENTS,
    TORUS_MAJOR_RADIUS,
    TORUS_TUBE_RADIUS,
    UNIT_SDFS,
    sdf_unit_box,
    sdf_unit_capsule,
    sdf_unit_cone,
    sdf_unit_cylinder,
    sdf_unit_octahedron,
    sdf_unit_pyramid,
    sdf_unit_sphere,
    sdf_unit_torus,
)

__all__ = [
    "ARTICLES",
    "CAPSULE_HALF_SEGMENT",
    "CAPSULE_RADIUS",
    "COLORS",
    "CORPUS_SEED",
    "EXAMPLE_PROMPT",
    "LAYOUT_GAP",
    "ObjectSpec",
    "Primitive",
    "PromptError",
    "RELATIONS",
    "SCENE_RADIUS",
    "SHAPES",
    "SHAPEWORLD_CORPORA",
    "SHAPE_EXTENTS",
    "SIZES",
    "Scene",
    "SceneField",
    "TORUS_MAJOR_RADIUS",
    "TORUS_TUBE_RADIUS",
    "UNIT_SDFS",
    "build_scene",
    "object_choices",
    "object_phrase",
    "pair_prompt",
    "parse_prompt",
    "parse_structure",
    "prompt_space",
    "scene_field",
    "sdf_unit_box",
    "sdf_unit_capsule",
    "sdf_unit_cone",
    "sdf_unit_cylinder",
    "sdf_unit_octahedron",
    "sdf_unit_pyramid",
    "sdf_unit_sphere",
    "sdf_unit_torus",
    "shapeworld_corpus",
    "unseen_prompts",
]
