"""A field baked on a regular grid, for fast turntables and mesh export of one prompt.

``generate`` evaluates the generator's field once on the export grid (the same
samples marching cubes needs) and keeps SDF and albedo there:

    x_ijk = (x_i, x_j, x_k),  x_i = -bound + i h,  h = 2 bound / (res - 1)

``BakedField`` answers sdf and color by trilinear interpolation of those samples
(``grid_sample`` with align_corners=True) and delegates the background to the
generator's field. Rendering a turntable from it costs a few table lookups per
sample instead of a network evaluation, and ``render_baked`` renders only the
rays that pass through the box around the surface and whose SDF-only proposal pass
collects some opacity (every other pixel is pure background), so a 36-frame
turntable takes seconds on a CPU.

The box is conservative: it holds every grid sample with sdf < margin, margin =
7 / inv_std + one voxel diagonal. A ray that stays farther than that from the
surface collects opacity below about 1/255 under VolSDF density with that inv_std.
"""

from __future__ import annotations

from dataclasses import dataclass

import nerfacc
import numpy as np
import torch
import torch.nn.functional as F

from amortized3d.fields import Field, grid_points, values_and_color
from amortized3d.rendering.cameras import Cameras, camera_rays
from amortized3d.rendering.volume import nerfacc_cuda_available, proposal_weights, ray_sphere_near_far, render_rays

BOX_MARGIN_IN_LAPLACE_SCALES = 7.0
EMPTY_RAY_OPACITY = 1e-3
REFINE_BAND = 8.0  # coarse voxels: fine samples with |sdf| below this many coarse spacings are evaluated exactly  # rays whose proposal pass collects less opacity than this show only the background


EMPTY_DENSITY = 1e-2  # a density field's box holds the samples above this (a ray through 2 units of it collects 0.02)


@dataclass
class BakedField:
    """SDF (or density) and albedo of one prompt sampled on a res^3 grid over [-bound, bound]^3.

    values [4, res, res, res]: channel 0 the SDF (geometry "sdf") or the density (geometry "density", whose surface
    is the level ``iso``), channels 1-3 the albedo, indexed [c, k, j, i] for the grid point (x_i, x_j, x_k)
    (grid_sample's depth, height, width order); ``source`` is the field it was baked from (background and exact colors).
    """

    values: torch.Tensor
    bound: float
    source: Field
    geometry: str = "sdf"
    iso: float = 0.0

    @property
    def resolution(self) -> int:
        return self.values.shape[-1]

    @property
    def voxel(self) -> float:
        return 2.0 * self.bound / (self.resolution - 1)

    def sdf_grid(self) -> np.ndarray:
        """SDF samples indexed [i, j, k] (world x, y, z) -> float32 [res, res, res]."""
        return self.values[0].permute(2, 1, 0).cpu().numpy()

    def _lookup(self, volume: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """volume [C, r, r, r], points [1, N, 3] -> [N, C]; outside the box the border value is used."""
        if points.dim() != 3 or points.shape[0] != 1 or points.shape[2] != 3:
            raise ValueError(f"a BakedField holds one prompt: points must be [1, N, 3], got {tuple(points.shape)}")
        coords = (points / self.bound).to(volume.dtype).view(1, 1, 1, -1, 3)
        out = F.grid_sample(volume.unsqueeze(0), coords, mode="bilinear", padding_mode="border", align_corners=True)
        return out.view(volume.shape[0], -1).t()

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """points [1, N, 3] -> sdf [1, N]."""
        return self._lookup(self.values[:1], points)[:, 0].unsqueeze(0)

    def sdf_and_color(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points [1, N, 3] -> (sdf [1, N], rgb [1, N, 3] clamped to [0, 1])."""
        out = self._lookup(self.values, points)
        return out[:, 0].unsqueeze(0), out[:, 1:].clamp(0.0, 1.0).unsqueeze(0)

    density = sdf  # a density field's grid holds the density in channel 0
    density_and_color = sdf_and_color

    def background(self, directions: torch.Tensor) -> torch.Tensor:
        """Unit directions [1, R, 3] -> rgb [1, R, 3], from the source field."""
        return self.source.background(directions)

    def surface_box(self, inv_std: float) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Corners (lo [3], hi [3]) of the box holding every sample with sdf < margin (a density field: density above
        EMPTY_DENSITY, with one voxel diagonal around); None if there is none."""
        if self.geometry == "density":
            margin = self.voxel * 3**0.5
            near_surface = (self.values[0] > EMPTY_DENSITY).nonzero()
        else:
            margin = BOX_MARGIN_IN_LAPLACE_SCALES / inv_std + self.voxel * 3**0.5
            near_surface = (self.values[0] < margin).nonzero()  # [M, 3] as (k, j, i)
        if near_surface.numel() == 0:
            return None
        index_lo, index_hi = near_surface.min(0).values.flip(0), near_surface.max(0).values.flip(0)  # (i, j, k)
        lo = (-self.bound + index_lo.to(torch.float32) * self.voxel - margin).clamp(min=-self.bound)
        hi = (-self.bound + index_hi.to(torch.float32) * self.voxel + margin).clamp(max=self.bound)
        return lo.to(self.values.device), hi.to(self.values.device)


def _evaluate(field: Field, points: torch.Tensor, chunk_points: int, geometry: str = "sdf") -> torch.Tensor:
    """sdf (or density) and albedo of a single-prompt field at points [N, 3] -> [N, 4] float32 (sdf, r, g, b)."""
    values = []
    for start in range(0, points.shape[0], chunk_points):
        sdf, rgb = values_and_color(field, points[start : start + chunk_points].unsqueeze(0), geometry)  # [P, n], [P, n, 3]
        if sdf.shape[0] != 1:
            raise ValueError(
                f"baking needs a field for exactly one prompt, but the field returned a batch of {sdf.shape[0]}; "
                "slice the generator output to one prompt before exporting."
            )
        values.append(torch.cat([sdf[0].unsqueeze(-1), rgb[0]], -1).float())
    return torch.cat(values) if values else points.new_zeros(0, 4)


@torch.no_grad()
def bake_field(field: Field, resolution: int = 128, bound: float = 1.0, chunk_points: int = 262144,
               device: str | torch.device = "cpu", geometry: str = "sdf", iso: float = 0.0) -> BakedField:
    """Sdf and albedo of a single-prompt field on the res^3 grid over [-bound, bound]^3, evaluated on ``device``
    (the field's: where its generator's parameters are). A density field (geometry "density", surface at the density
    ``iso``) is evaluated exactly at every sample.

    Coarse to fine: the field is evaluated on a grid of c = (res + 1) // 2 samples per axis over
    the same box, that grid is upsampled trilinearly to res, and every fine sample whose upsampled
    |sdf| is below REFINE_BAND coarse spacings is evaluated exactly (res < 9: all of them). So
    samples near the surface (all that marching cubes and the visible part of a render read) are
    exact, and far ones are interpolated from samples about 2 voxels apart; this assumes the SDF
    changes by about a distance (|grad sdf| near 1, which the eikonal term keeps).
    """
    if resolution < 2:
        raise ValueError(f"resolution must be >= 2 grid samples per axis, got {resolution}; use e.g. 128.")
    if bound <= 0:
        raise ValueError(f"bound must be positive (half-width of the box [-bound, bound]^3), got {bound}; use e.g. 1.0.")
    if chunk_points < 1:
        raise ValueError(f"chunk_points must be >= 1, got {chunk_points}; use e.g. 262144.")
    device = torch.device(device)
    if resolution < 9 or geometry == "density":
        values = _evaluate(field, grid_points(resolution, bound, device=device), chunk_points, geometry)
        return BakedField(values.t().reshape(4, resolution, resolution, resolution).contiguous(), float(bound), field, geometry, iso)
    coarse_res = (resolution + 1) // 2
    coarse = _evaluate(field, grid_points(coarse_res, bound, device=device), chunk_points)
    coarse = coarse.t().reshape(1, 4, coarse_res, coarse_res, coarse_res)
    values = F.interpolate(coarse, size=(resolution,) * 3, mode="trilinear", align_corners=True)[0]  # [4, r, r, r]
    band = REFINE_BAND * 2.0 * bound / (coarse_res - 1)
    near = (values[0].abs() < band).reshape(-1).nonzero()[:, 0]  # flat (k, j, i) indices
    if near.numel():
        flat = values.reshape(4, -1)
        flat[:, near] = _evaluate(field, grid_points(resolution, bound, device=device)[near], chunk_points).t()
    return BakedField(values.contiguous(), float(bound), field)


def bake_representation(representation, resolution: int = 128, bound: float = 1.0, **kwargs) -> BakedField:
    """bake_field of a one-prompt Representation with its geometry and surface level (0 for an SDF, iso_density for a
    density field); kwargs: bake_field's chunk_points and device."""
    iso = representation.iso_density if representation.geometry == "density" else 0.0
    return bake_field(representation, resolution, bound, geometry=representation.geometry, iso=iso, **kwargs)


def ray_box_near_far(origins: torch.Tensor, dirs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slab test: entry and exit distances of rays through the box [lo, hi]; near >= far means a miss.

    For each axis a the ray o + t d is inside the slab between t = (lo_a - o_a) / d_a and
    t = (hi_a - o_a) / d_a; near is the largest entry, far the smallest exit. A ray that misses
    the box, or whose box lies wholly behind its origin (far <= 0), gets near = far = inf.
    On CUDA this is nerfacc.ray_aabb_intersect; nerfacc has no CPU kernel for it, so on the CPU
    the same test runs in torch (``_ray_box_near_far_torch``), as it does on CUDA when nerfacc's kernels cannot
    be built (nerfacc_cuda_available). The two agree up to float rounding
    (nerfacc multiplies by 1 / d_a where torch divides by d_a).

    origins, dirs [..., 3], lo, hi [3] -> near, far [...].
    """
    if not (origins.is_cuda and nerfacc_cuda_available()):
        return _ray_box_near_far_torch(origins, dirs, lo, hi)
    box = torch.cat([lo, hi]).to(device=origins.device, dtype=torch.float32).unsqueeze(0)  # [1, 6]
    near, far, _ = nerfacc.ray_aabb_intersect(origins.reshape(-1, 3).float(), dirs.reshape(-1, 3).float(), box)
    return near.reshape(origins.shape[:-1]).to(origins.dtype), far.reshape(origins.shape[:-1]).to(origins.dtype)


def _ray_box_near_far_torch(origins: torch.Tensor, dirs: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ray_box_near_far in torch, for the CPU. origins, dirs [..., 3], lo, hi [3] -> near, far [...]."""
    tiny = torch.full_like(dirs, 1e-12)
    safe = torch.where(dirs.abs() < 1e-12, torch.where(dirs < 0, -tiny, tiny), dirs)
    t_lo, t_hi = (lo - origins) / safe, (hi - origins) / safe
    near = torch.minimum(t_lo, t_hi).amax(-1)
    far = torch.maximum(t_lo, t_hi).amin(-1)
    hit = (far > near) & (far > 0)
    return near.where(hit, torch.inf), far.where(hit, torch.inf)


@torch.no_grad()
def proposal_opacity(field, origins, dirs, near, far, n_proposal: int, inv_std: float, chunk_rays: int = 65536,
                     geometry: str = "sdf") -> torch.Tensor:
    """Opacity sum_k w_k of the uniform proposal pass (bin midpoints, geometry only), as render_rays' first pass sees it.

    origins, dirs [1, R, 3], near, far [1, R] -> opacity [1, R].
    """
    parts = []
    for start in range(0, origins.shape[1], chunk_rays):
        rays = slice(start, start + chunk_rays)
        _, weights = proposal_weights(field, origins[:, rays], dirs[:, rays], near[:, rays], far[:, rays], n_proposal, inv_std,
                                      geometry=geometry)
        parts.append(weights.sum(-1))
    return torch.cat(parts, 1) if parts else near.new_zeros(near.shape)


@torch.no_grad()
def render_baked(
    baked: BakedField,
    cameras: Cameras,
    height: int,
    width: int,
    *,
    scene_radius: float,
    n_proposal: int,
    n_importance: int,
    inv_std: float,
    chunk_rays: int = 65536,
    importance_kernel: tuple[float, ...] = (),
) -> torch.Tensor:
    """Deterministic renders of a baked field from V cameras; only rays through its surface box are marched.

    cameras [V] (or [1, V]) -> rgb [V, 3, H, W] in [0, 1].
    """
    cameras = cameras.reshape(1, -1)
    V = cameras.shape[1]
    origins, dirs = camera_rays(cameras, height, width)  # [1, V, H*W, 3]
    origins, dirs = origins.reshape(1, -1, 3), dirs.reshape(1, -1, 3)
    rgb = baked.background(dirs)  # [1, R, 3]
    box = baked.surface_box(inv_std)
    if box is not None:
        near, far = ray_sphere_near_far(origins, dirs, scene_radius)
        box_near, box_far = ray_box_near_far(origins, dirs, *box)
        near, far = torch.maximum(near, box_near), torch.minimum(far, box_far)
        hits = (far > near).nonzero()[:, 1]  # ray indices
        opacity = proposal_opacity(baked, origins[:, hits], dirs[:, hits], near[:, hits], far[:, hits], n_proposal, inv_std,
                                   geometry=baked.geometry)
        hits = hits[opacity[0] > EMPTY_RAY_OPACITY]
        for start in range(0, hits.numel(), chunk_rays):
            rays = hits[start : start + chunk_rays]
            part = render_rays(
                baked, origins[:, rays], dirs[:, rays], near[:, rays], far[:, rays],
                n_proposal=n_proposal, n_importance=n_importance, inv_std=inv_std, importance_kernel=importance_kernel,
                geometry=baked.geometry,
            )
            rgb[:, rays] = part.rgb
    return rgb.reshape(V, height, width, 3).permute(0, 3, 1, 2).clamp(0.0, 1.0)
