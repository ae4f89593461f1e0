"""The batched exact field of ShapeWorld scenes (implements ``amortized3d.fields.Field``).

A scene is a union of primitives: sdf = min_k sdf_k, color = color of the primitive
with the smallest SDF, where sdf_k(x) = h_k * sdf_unit_k((x - c_k) / h_k) for a
primitive of half-extent h_k centered at c_k (``amortized3d.shapeworld.sdf``).
"""

from __future__ import annotations

import math

import torch

from amortized3d.shapeworld.grammar import SHAPES
from amortized3d.shapeworld.layout import Scene
from amortized3d.shapeworld.sdf import UNIT_SDFS


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
