"""Baked fields: exact at grid vertices, trilinear in between, and turntables that match the exact field's renders."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from amortized3d.inference.baked import BakedField, bake_field, ray_box_near_far, render_baked
from amortized3d.inference.export import extract_mesh
from amortized3d.rendering.cameras import orbit_cameras
from amortized3d.rendering.volume import render_images
from tests.fixtures import SphereField

CENTER = (0.1, -0.2, 0.05)


def test_bake_is_exact_at_vertices_and_close_between():
    field = SphereField(0.4, CENTER)
    baked = bake_field(field, resolution=17, bound=1.0, chunk_points=1000)
    axis = torch.linspace(-1.0, 1.0, 17)
    index = torch.randint(0, 17, (200, 3))
    vertices = axis[index].unsqueeze(0)  # [1, 200, 3]
    sdf, rgb = baked.sdf_and_color(vertices)
    exact_sdf, exact_rgb = field.sdf_and_color(vertices)
    torch.testing.assert_close(sdf, exact_sdf, atol=1e-5, rtol=0)
    torch.testing.assert_close(rgb, exact_rgb, atol=1e-5, rtol=0)
    # The albedo is linear in x, so trilinear interpolation reproduces it everywhere inside the box.
    points = torch.rand(1, 500, 3) * 1.8 - 0.9
    torch.testing.assert_close(baked.sdf_and_color(points)[1], field.sdf_and_color(points)[1], atol=1e-5, rtol=0)
    # Trilinear error <= h^2 / 8 * sum_a max |d^2 f / dx_a^2| over the cell; for f = |x - c| that sum is the
    # Hessian trace 2 / |x - c|. Away from the center every cell stays at |x - c| >= 0.4 - h sqrt(3).
    h = 2.0 / 16
    away = (points[0] - torch.tensor(CENTER)).norm(dim=-1) > 0.4
    error = (baked.sdf(points) - field.sdf(points)).abs()[0, away]
    assert away.sum() > 300 and error.max() <= h**2 / 8 * 2 / (0.4 - h * 3**0.5)
    assert torch.equal(baked.sdf(points), baked.sdf_and_color(points)[0])


def test_coarse_to_fine_bake_is_exact_near_the_surface():
    field = SphereField(0.35, CENTER)
    for resolution in (40, 41):
        baked = bake_field(field, resolution=resolution, bound=1.0, chunk_points=7000)
        points = _grid(resolution)  # [res^3, 3] in the (k, j, i) order of baked.values
        sdf, rgb = field.sdf_and_color(points.unsqueeze(0))
        full = torch.cat([sdf[0, :, None], rgb[0]], -1).t().reshape(4, resolution, resolution, resolution)
        coarse_spacing = 2.0 / ((resolution + 1) // 2 - 1)
        near = full[0].abs() < 6 * coarse_spacing  # inside the refinement band with room for interpolation error
        assert near.sum() > 1000 and (~near).sum() > 1000
        assert torch.equal(baked.values[:, near], full[:, near])
        assert (baked.values[0] - full[0]).abs().max() < coarse_spacing  # far samples: interpolated, close
        mesh_fast = extract_mesh(baked)
        mesh_full = extract_mesh(BakedField(full.contiguous(), 1.0, field))
        assert np.array_equal(mesh_fast.vertices, mesh_full.vertices) and np.array_equal(mesh_fast.faces, mesh_full.faces)


def _grid(resolution: int) -> torch.Tensor:
    axis = torch.linspace(-1.0, 1.0, resolution)
    gz, gy, gx = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([gx, gy, gz], -1).reshape(-1, 3)


BOX = torch.tensor([-0.3, -0.5, -0.2]), torch.tensor([0.4, 0.1, 0.6])  # lo, hi


def _rays_toward_the_box() -> tuple[torch.Tensor, torch.Tensor]:
    """400 rays aimed at random points around BOX, the first 20 parallel to x. -> origins, dirs [400, 3]."""
    gen = torch.Generator().manual_seed(0)
    origins = torch.randn(400, 3, generator=gen) * 2
    targets = torch.rand(400, 3, generator=gen) * 1.6 - 0.8
    dirs = torch.nn.functional.normalize(targets - origins, dim=-1)
    dirs[:20, 1:] = 0.0  # axis-parallel rays
    dirs[:20, 0] = 1.0
    return origins, dirs


def test_ray_box_matches_brute_force_membership():
    origins, dirs = _rays_toward_the_box()
    lo, hi = BOX
    near, far = ray_box_near_far(origins, dirs, lo, hi)
    t = torch.linspace(-8, 8, 16001)
    points = origins[:, None] + t[None, :, None] * dirs[:, None]
    inside = ((points >= lo) & (points <= hi)).all(-1)  # [400, T]
    hit = inside.any(1)
    assert hit.sum() > 20 and (~hit).sum() > 20
    assert torch.equal(hit, far > near)
    first = torch.where(inside, t, torch.inf).amin(1)[hit]
    last = torch.where(inside, t, -torch.inf).amax(1)[hit]
    step = 16.0 / 16000
    assert (first - near[hit]).abs().max() <= step and (last - far[hit]).abs().max() <= step


def test_ray_box_behind_the_origin_is_a_miss():
    lo, hi = BOX
    origins = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, -0.2, 0.2]])
    dirs = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # away, toward, from inside
    near, far = ray_box_near_far(origins, dirs, lo, hi)
    assert near[0] == far[0] == torch.inf
    torch.testing.assert_close(torch.stack([near[1], far[1]]), torch.tensor([1.6, 2.3]))
    torch.testing.assert_close(torch.stack([near[2], far[2]]), torch.tensor([-0.3, 0.3]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nerfacc's ray_aabb_intersect runs on CUDA only")
def test_ray_box_on_cuda_matches_cpu():
    origins, dirs = _rays_toward_the_box()
    origins = torch.cat([origins, -origins])  # the second half starts beyond the box, facing away from most of it
    dirs = torch.cat([dirs, -dirs.flip(0)])
    lo, hi = BOX
    near, far = ray_box_near_far(origins, dirs, lo, hi)  # torch
    near_cuda, far_cuda = ray_box_near_far(origins.cuda(), dirs.cuda(), lo.cuda(), hi.cuda())  # nerfacc
    hit = far > near
    assert hit.sum() > 20 and (~hit).sum() > 20
    assert torch.equal(hit, (far_cuda > near_cuda).cpu())
    # nerfacc multiplies by 1 / d where torch divides by d: float32 rounding apart.
    torch.testing.assert_close(near_cuda.cpu()[hit], near[hit], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(far_cuda.cpu()[hit], far[hit], atol=1e-5, rtol=1e-5)


def test_turntable_of_baked_field_matches_exact_render():
    field = SphereField(0.3, CENTER)
    baked = bake_field(field, resolution=64, bound=1.0)
    cameras = orbit_cameras(3, 15.0, 1.6, 50.0)
    settings = dict(scene_radius=1.0, n_proposal=64, n_importance=32, inv_std=30.0)
    fast = render_baked(baked, cameras, 24, 24, **settings)
    exact = render_images(field, cameras.reshape(1, 3), 24, 24, **settings).rgb[0]
    assert fast.shape == (3, 3, 24, 24)
    assert (fast - exact).abs().mean() < 0.01 and (fast - exact).abs().max() < 0.1
    # Rays outside the surface box are not marched (pure background); the exact render agrees there to 1/255.
    culled = (fast == 0.5).all(1)  # [3, 24, 24]
    assert culled.float().mean() > 0.3
    assert (exact.permute(0, 2, 3, 1)[culled] - 0.5).abs().max() < 1 / 255
