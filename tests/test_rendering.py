"""Volume renderer against formulas, a dense brute-force reference, and properties."""

from __future__ import annotations

import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from amortized3d.rendering.cameras import camera_rays, look_at_cameras, orbit_cameras, sample_training_cameras
from amortized3d.rendering.volume import (
    ray_sphere_near_far,
    render_images,
    rays_per_chunk,
    render_rays,
    sample_from_pdf,
    volsdf_density,
)

BACKGROUND = (0.2, 0.4, 0.9)


class SphereField(torch.nn.Module):
    """P spheres with radii [P] and centers [P, 3]; color = clamp(0.5 + x / 2) * tint; constant background."""

    def __init__(self, radii, centers=None, tint=(1.0, 1.0, 1.0)):
        super().__init__()
        radii = torch.as_tensor(radii, dtype=torch.float32)
        self.radii = torch.nn.Parameter(radii.clone())
        self.centers = torch.zeros(len(radii), 3) if centers is None else torch.as_tensor(centers, dtype=torch.float32)
        self.tint = torch.nn.Parameter(torch.tensor(tint))

    def select(self, p):
        single = SphereField(self.radii.detach()[p : p + 1], self.centers[p : p + 1], tuple(self.tint.tolist()))
        return single

    def sdf(self, points):
        return (points - self.centers[:, None]).norm(dim=-1) - self.radii[:, None]

    def sdf_and_color(self, points):
        return self.sdf(points), (0.5 + 0.5 * points).clamp(0.0, 1.0) * self.tint

    def background(self, directions):
        return torch.tensor(BACKGROUND, device=directions.device).expand(*directions.shape[:-1], 3)


def axis_rays(offsets, distance=2.0):
    """Rays from (offset, 0, distance)... looking down -z: origins, dirs [1, R, 3]."""
    offsets = torch.as_tensor(offsets, dtype=torch.float32)
    origins = torch.stack([offsets, torch.zeros_like(offsets), torch.full_like(offsets, distance)], -1)[None]
    dirs = torch.tensor([0.0, 0.0, -1.0]).expand_as(origins)
    return origins, dirs


def dense_reference(field, origins, dirs, near, far, inv_std, n=20000):
    """Brute-force compositing with n uniform intervals and explicit cumulative products (float64)."""
    edges = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    t = near.double()[..., None] + (far - near).double()[..., None] * edges  # [P, R, n + 1]
    mids = 0.5 * (t[..., 1:] + t[..., :-1])
    delta = t[..., 1:] - t[..., :-1]
    pts = (origins.double()[:, :, None] + mids[..., None] * dirs.double()[:, :, None]).float()
    P, R = near.shape
    with torch.no_grad():
        sdf, color = field.sdf_and_color(pts.reshape(P, -1, 3))
    sdf = sdf.double().reshape(P, R, n).numpy()
    color = color.double().reshape(P, R, n, 3).numpy()
    s = inv_std
    sigma = np.where(sdf > 0, s * 0.5 * np.exp(-s * np.maximum(sdf, 0)), s * (1 - 0.5 * np.exp(s * np.minimum(sdf, 0))))
    alpha = 1 - np.exp(-sigma * delta.numpy())
    trans = np.cumprod(np.concatenate([np.ones_like(alpha[..., :1]), 1 - alpha[..., :-1]], -1), -1)
    w = trans * alpha
    opacity = w.sum(-1)
    rgb = (w[..., None] * color).sum(-2) + np.array(BACKGROUND) * (1 - opacity[..., None])
    depth = (w * mids.numpy()).sum(-1)
    return rgb, opacity, depth


def test_volsdf_density_matches_piecewise_formula():
    sdf = np.array([-2.0, -0.3, -0.01, 0.0, 0.01, 0.3, 2.0, 50.0, -50.0])
    s = 30.0
    expected = np.array([s * 0.5 * math.exp(-x * s) if x > 0 else s * (1 - 0.5 * math.exp(x * s)) for x in sdf])
    got = volsdf_density(torch.tensor(sdf), s).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    big = volsdf_density(torch.tensor([-1e4, 1e4], requires_grad=True), s)
    big.sum().backward()
    assert torch.isfinite(big).all()


def test_ray_sphere_near_far():
    origins, dirs = axis_rays([0.0, 0.6, 2.0])
    near, far = ray_sphere_near_far(origins, dirs, radius=1.0)
    np.testing.assert_allclose(near[0].numpy()[:2], [1.0, 2.0 - 0.8], atol=1e-6)
    np.testing.assert_allclose(far[0].numpy()[:2], [3.0, 2.0 + 0.8], atol=1e-6)
    assert near[0, 2] == far[0, 2]
    inside_near, _ = ray_sphere_near_far(torch.zeros(1, 1, 3), dirs[:, :1], radius=1.0, min_near=0.1)
    assert inside_near.item() == pytest.approx(0.1)


def test_compositing_matches_dense_reference():
    field = SphereField([0.5])
    origins, dirs = axis_rays([0.0, 0.2, 0.4, 0.49, 0.52, 0.7])
    near, far = ray_sphere_near_far(origins, dirs, radius=1.0)
    with torch.no_grad():
        out = render_rays(field, origins, dirs, near, far, inv_std=30.0)
    rgb, opacity, depth = dense_reference(field, origins, dirs, near, far, 30.0)
    np.testing.assert_allclose(out.opacity.numpy(), opacity, atol=2e-3)
    np.testing.assert_allclose(out.rgb.numpy(), rgb, atol=2e-3)
    np.testing.assert_allclose(out.depth.numpy(), depth, atol=2e-3)
    # Center ray: opaque, surface at distance 1.5 from the camera.
    assert out.opacity[0, 0] > 0.99
    assert out.depth_normalized[0, 0].item() == pytest.approx(1.5, abs=0.03)


def test_weights_are_a_subprobability():
    field = SphereField([0.5, 0.8])
    gen = torch.Generator().manual_seed(0)
    origins = torch.randn(2, 64, 3, generator=gen)
    origins = 2.0 * origins / origins.norm(dim=-1, keepdim=True)
    dirs = -origins / 2.0 + 0.3 * torch.randn(2, 64, 3, generator=gen)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    near, far = ray_sphere_near_far(origins, dirs, 1.0)
    out = render_rays(field, origins, dirs, near, far, n_proposal=32, n_importance=16, generator=gen)
    assert out.weights.shape == (2, 64, 48)
    assert (out.weights >= 0).all()
    assert (out.weights.sum(-1) <= 1 + 1e-5).all()
    assert (out.z_variance >= 0).all()
    assert (out.t_mid[..., 1:] >= out.t_mid[..., :-1]).all()
    assert ((out.t_mid >= near[..., None] - 1e-6) & (out.t_mid <= far[..., None] + 1e-6)).all()


def test_inverse_cdf_reproduces_piecewise_constant_pdf():
    edges = torch.tensor([0.0, 1.0, 1.5, 3.0, 4.0])
    mass = torch.tensor([0.1, 0.5, 0.0, 0.4])

    def cdf(x):
        return np.interp(x, edges.numpy(), np.concatenate([[0.0], np.cumsum(mass.numpy())]))

    # Deterministic quantiles: KS distance at most half a step.
    n = 1000
    t = sample_from_pdf(edges[None], mass[None], n)[0].numpy()
    empirical = (np.arange(n) + 0.5) / n
    assert np.abs(cdf(t) - empirical).max() < 1e-4
    # Stratified: histogram over many rays matches the masses.
    gen = torch.Generator().manual_seed(1)
    rays = 4000
    bias = torch.rand(rays, 1, generator=gen)
    t = sample_from_pdf(edges.expand(rays, 5), mass.expand(rays, 4), 8, bias).numpy().ravel()
    hist, _ = np.histogram(t, bins=edges.numpy())
    np.testing.assert_allclose(hist / t.size, mass.numpy(), atol=0.01)
    assert (np.diff(np.sort(t)) >= 0).all() and t.min() >= 0 and t.max() <= 4


def test_importance_samples_concentrate_near_surface():
    field = SphereField([0.5])
    origins, dirs = axis_rays([0.0])
    near, far = ray_sphere_near_far(origins, dirs, radius=1.0)
    coarse = render_rays(field, origins, dirs, near, far, n_proposal=64, n_importance=0)
    fine = render_rays(field, origins, dirs, near, far, n_proposal=64, n_importance=64)
    surface = 1.5

    def count_near(t):
        return ((t - surface).abs() < 0.1).sum().item()

    assert count_near(fine.t_mid) - count_near(coarse.t_mid) >= 0.8 * 64


def test_missing_rays_give_background():
    field = SphereField([0.5])
    origins, dirs = axis_rays([1.5, -3.0])
    near, far = ray_sphere_near_far(origins, dirs, radius=1.0)
    out = render_rays(field, origins, dirs, near, far, n_proposal=16, n_importance=8)
    assert torch.equal(out.opacity, torch.zeros(1, 2))
    np.testing.assert_allclose(out.rgb.detach().numpy(), np.broadcast_to(BACKGROUND, (1, 2, 3)), atol=1e-7)


def test_prompts_together_equal_one_by_one():
    field = SphereField([0.3, 0.6, 0.45], centers=[[0.0, 0.0, 0.0], [0.1, -0.1, 0.0], [-0.2, 0.0, 0.1]])
    cams = sample_training_cameras(3, 2, (-10.0, 40.0), (2.0, 2.5), (40.0, 60.0), torch.Generator().manual_seed(3))
    kwargs = dict(scene_radius=1.0, n_proposal=24, n_importance=12, with_normals=True)
    together = render_images(field, cams, 8, 8, **kwargs)
    for p in range(3):
        alone = render_images(field.select(p), cams[p : p + 1], 8, 8, **kwargs)
        torch.testing.assert_close(together.rgb[p : p + 1], alone.rgb, atol=1e-5, rtol=0)
        torch.testing.assert_close(together.depth[p : p + 1], alone.depth, atol=1e-4, rtol=0)
        torch.testing.assert_close(together.normal[p : p + 1], alone.normal, atol=1e-4, rtol=0)


def test_chunked_equals_unchunked_for_several_prompts():
    field = SphereField([0.4, 0.7], centers=[[0.1, 0.0, 0.0], [0.0, 0.2, -0.1]])
    cams = sample_training_cameras(2, 3, (-10.0, 40.0), (2.0, 2.5), (40.0, 60.0), torch.Generator().manual_seed(4))
    kwargs = dict(scene_radius=1.0, n_proposal=16, n_importance=8, with_normals=True)
    full = render_images(field, cams, 6, 5, generator=torch.Generator().manual_seed(5), **kwargs)
    chunked = render_images(field, cams, 6, 5, generator=torch.Generator().manual_seed(5), chunk_rays=14, **kwargs)  # 7 per prompt
    assert full.rgb.shape == (2, 3, 3, 6, 5) and full.opacity.shape == (2, 3, 1, 6, 5)
    for name in ("rgb", "opacity", "depth", "z_variance", "normal"):
        torch.testing.assert_close(getattr(chunked, name), getattr(full, name), atol=1e-5, rtol=0)
    # The two prompts really differ, so a mix-up along the prompt axis would show.
    assert (full.opacity[0] - full.opacity[1]).abs().max() > 0.1


class CountingField(SphereField):
    """SphereField that records the number of points of every query."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.queries = []

    def sdf(self, points):  # every query goes through here (sdf_and_color too)
        self.queries.append(points.shape[0] * points.shape[1])
        return super().sdf(points)


def test_chunk_rays_bounds_the_points_of_every_query_over_all_prompts():
    """The oracle renders 8 prompts (and 16 scenes each for "a cube") at once: a chunk is shared by the prompts."""
    n_proposal, n_importance, budget = 16, 8, 4096
    for prompts in (1, 3, 8):
        field = CountingField([0.5] * prompts, centers=[[0.0, 0.0, 0.0]] * prompts)
        cams = orbit_cameras(4, 15.0, 2.5, 40.0).reshape(1, 4)[[0] * prompts]
        with torch.no_grad():
            render_images(field, cams, 16, 16, scene_radius=1.0, n_proposal=n_proposal, n_importance=n_importance,
                          chunk_rays=rays_per_chunk(n_proposal, n_importance, budget))
        assert max(field.queries) <= budget, (prompts, max(field.queries))
        assert sum(field.queries) >= prompts * 4 * 16 * 16 * (n_proposal + n_importance - 1)  # every sample evaluated


MEMORY_PROBE = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from test_rendering import SphereField
from amortized3d.rendering.cameras import orbit_cameras
from amortized3d.rendering.volume import rays_per_chunk, render_images
from amortized3d.training.monitor import peak_memory_mb, reset_peak_memory
cpu = torch.device("cpu")
with torch.no_grad():
    for views in (32, 192):  # the first run warms up: code pages, thread pools, the allocator's own growth
        cams = orbit_cameras(views, 15.0, 2.5, 40.0).reshape(1, views)
        reset_peak_memory(cpu)
        start = peak_memory_mb(cpu)
        out = render_images(SphereField([0.5], centers=[[0.0, 0.0, 0.0]]), cams, 64, 64, scene_radius=1.0, n_proposal=32,
                            n_importance=16, with_normals=True, chunk_rays=rays_per_chunk(32, 16, 2**15))
        assert out.rgb.shape == (1, views, 3, 64, 64) and out.opacity.mean() > 0.1
        del out
print(peak_memory_mb(cpu) - start)
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="the resident high-water mark can be reset only on Linux")
def test_chunked_rendering_memory_grows_with_rays_not_samples():
    """Evaluation renders 120 views at the CLIP input size: the per-sample tensors of every ray must not pile up.

    192 views of 64 x 64 in small chunks, in a fresh process (a clean memory baseline) after a warm-up render:
    the peak may grow by the per-ray outputs and one chunk's working memory, far less than the per-sample
    tensors of all rays would take.
    """
    import subprocess
    import sys

    rays, samples = 192 * 64 * 64, 32 + 16 - 1
    per_sample_mb = rays * samples * 4 * 5 / 2**20  # weights, t_mid, sdf_grad [.., 3]
    per_ray_mb = rays * 9 * 4 / 2**20  # rgb, opacity, depth, z_variance, normal
    assert per_sample_mb > 700 and per_ray_mb < 30
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(Path(__file__).parent)], capture_output=True, text=True,
                           check=True)
    grown = float(probe.stdout.strip().splitlines()[-1])
    assert grown < per_sample_mb / 2, f"rendering 192 views grew the peak by {grown:.0f} MB"


def test_gradients_reach_field_parameters():
    field = SphereField([0.5], tint=(0.8, 0.7, 0.6))
    origins, dirs = axis_rays([0.0, 0.3, 0.45])
    near, far = ray_sphere_near_far(origins, dirs, radius=1.0)
    out = render_rays(field, origins, dirs, near, far, n_proposal=32, n_importance=16, with_normals=True)
    (out.rgb.sum() + out.normal.sum() + out.sdf_grad.norm(dim=-1).sum()).backward()
    assert field.tint.grad is not None and field.tint.grad.abs().min() > 0
    assert field.radii.grad is not None and field.radii.grad.abs().item() > 0


def test_normals_point_outward():
    field = SphereField([0.5])
    origins, dirs = axis_rays([0.0, 0.25])
    near, far = ray_sphere_near_far(origins, dirs, radius=1.0)
    out = render_rays(field, origins, dirs, near, far, n_proposal=64, n_importance=32, with_normals=True)
    hit = origins[0] + out.depth_normalized[0, :, None] * dirs[0]
    expected = hit / hit.norm(dim=-1, keepdim=True)
    normal = out.normal[0] / out.normal[0].norm(dim=-1, keepdim=True)
    assert (normal * expected).sum(-1).min() > 0.99
    assert out.sdf_grad.shape == (1, 2, 96, 3)
    # |grad sdf| = 1 for an exact SDF (forward differences, exact up to O(eps / radius) at the surface).
    at_surface = out.weights > 1e-3
    assert (out.sdf_grad.norm(dim=-1) - 1).abs()[at_surface].max() < 0.02


def test_centered_sphere_is_centered_and_symmetric():
    field = SphereField([0.5])
    H = W = 16
    cams = look_at_cameras(torch.tensor([[20.0]]), torch.tensor([[30.0]]), torch.tensor([[2.5]]), torch.tensor([[40.0]]))
    with torch.no_grad():
        out = render_images(field, cams, H, W, scene_radius=1.0, n_proposal=32, n_importance=16)
    alpha = out.opacity[0, 0, 0]
    torch.testing.assert_close(alpha, alpha.flip(0), atol=1e-3, rtol=0)
    torch.testing.assert_close(alpha, alpha.flip(1), atol=1e-3, rtol=0)
    assert alpha[H // 2, W // 2] > 0.99 and alpha[0, 0] < 1e-3
    # Silhouette: rays passing well inside the sphere are opaque, rays passing well outside are clear.
    origins, dirs = camera_rays(cams, H, W)
    miss_distance = torch.linalg.cross(origins, dirs).norm(dim=-1).reshape(H, W)  # distance of the ray to the center
    assert alpha[miss_distance < 0.45].min() > 0.95
    assert alpha[miss_distance > 0.65].max() < 0.05
    assert (miss_distance < 0.45).sum() > 20 and (miss_distance > 0.65).sum() > 100
    depth = out.depth[0, 0, 0, H // 2, W // 2].item()
    assert depth == pytest.approx(2.5 - 0.5, abs=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nerfacc importance sampling needs CUDA")
def test_cuda_importance_sampling_matches_cpu():
    field = SphereField([0.5])
    origins, dirs = axis_rays(torch.linspace(-0.6, 0.6, 9).tolist())
    near, far = ray_sphere_near_far(origins, dirs, radius=1.0)
    cpu = render_rays(field, origins, dirs, near, far, n_proposal=32, n_importance=16)
    field_cuda = SphereField([0.5]).cuda()
    field_cuda.centers = field_cuda.centers.cuda()
    gpu = render_rays(field_cuda, origins.cuda(), dirs.cuda(), near.cuda(), far.cuda(), n_proposal=32, n_importance=16)
    torch.testing.assert_close(gpu.t_mid.cpu(), cpu.t_mid, atol=1e-4, rtol=0)
    torch.testing.assert_close(gpu.rgb.cpu(), cpu.rgb, atol=1e-4, rtol=0)


@pytest.mark.parametrize("backend, reason", [(None, "ModuleNotFoundError"), (types.SimpleNamespace(_C=None), "no CUDA toolkit")])
def test_nerfacc_kernels_unavailable_means_torch_paths_with_a_warning(monkeypatch, backend, reason):
    """A failed nerfacc build (the import raises) or no nvcc (nerfacc leaves _C = None, its _backend.py) must not
    stop CUDA rendering: nerfacc_cuda_available says False once, with the reason, and the torch paths are used."""
    from amortized3d.rendering import volume

    monkeypatch.setitem(sys.modules, "nerfacc.cuda._backend", backend)
    volume.nerfacc_cuda_available.cache_clear()
    try:
        with pytest.warns(UserWarning, match=f"{reason}.*pure-torch"):
            assert volume.nerfacc_cuda_available() is False
    finally:
        volume.nerfacc_cuda_available.cache_clear()
