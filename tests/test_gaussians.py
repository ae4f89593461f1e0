"""The 3D Gaussian rasterizer (amortized3d/rendering/gaussians.py) against independent expectations: a Gaussian's
analytic 2D footprint, the EWA covariance J W Sigma W^T J^T computed by hand in float64 numpy, a per-pixel loop that
writes out gsplat's compositing kernel (RasterizeToPixels3DGSFwd.cu, gsplat 1.5.3), finite differences, and the
orthonormality of the spherical harmonics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from amortized3d.rendering.cameras import camera_rays, look_at_cameras
from amortized3d.rendering.gaussians import (SH_C0, camera_matrices, composite, covariance, project, rasterize, sh_basis)


def one_camera(elevation=20.0, azimuth=30.0, distance=2.0, fovy=45.0, dtype=torch.float32):
    t = lambda v: torch.tensor([v], dtype=dtype)  # noqa: E731
    return look_at_cameras(t(elevation), t(azimuth), t(distance), t(fovy))


def rotation_from_axis_angle(axis, angle):
    """Rodrigues' formula, float64 numpy: the rotation by ``angle`` about the unit ``axis``."""
    k = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_an_isotropic_gaussian_on_the_axis_draws_its_analytic_footprint(mode):
    # An isotropic Gaussian (std s) at depth D on the optical axis projects to an isotropic 2D Gaussian of variance
    # v = (f s / D)^2 + 0.3 centered on the image center: alpha(p) = o' exp(-|p - c|^2 / (2 v)), cut below 1/255, with
    # o' = o (classic) or, antialiased (gsplat's compensation sqrt(det(Sigma - 0.3 I) / det Sigma)), o (v - 0.3) / v.
    H = W = 32
    cams = one_camera(elevation=0.0, azimuth=0.0, distance=2.0, fovy=40.0)
    s, o = 0.05, 0.8
    means = torch.zeros(1, 3)  # the camera looks at the origin from distance 2
    sh = torch.zeros(1, 1, 3)
    sh[0, 0] = (torch.tensor([0.9, 0.2, 0.4]) - 0.5) / SH_C0
    out = rasterize(means, torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), s), torch.tensor([o]), sh, cams, H, W, mode=mode)
    f = 0.5 * H / math.tan(math.radians(20.0))
    var = (f * s / 2.0) ** 2 + 0.3
    jj, ii = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    o = o if mode == "classic" else o * (var - 0.3) / var
    alpha = o * np.exp(-((ii - W / 2) ** 2 + (jj - H / 2) ** 2) / (2 * var))
    alpha = np.where(alpha >= 1 / 255, alpha, 0.0)
    np.testing.assert_allclose(out.opacity[0, 0].numpy(), alpha, atol=1e-6)
    np.testing.assert_allclose(out.rgb[0].numpy(), np.array([0.9, 0.2, 0.4])[:, None, None] * alpha, atol=1e-6)
    assert torch.allclose(out.depth[0, 0][alpha > 0], torch.tensor(2.0), atol=1e-5)  # every drawn pixel: depth D
    assert out.z_variance.abs().max() < 1e-4  # one Gaussian: no spread of depths


def test_the_2d_covariance_is_j_w_sigma_wt_jt_by_hand():
    cams = one_camera(elevation=25.0, azimuth=-40.0, distance=2.2, fovy=50.0, dtype=torch.float64)
    H, W = 48, 64
    axis, angle = np.array([0.3, -0.5, 0.8]), 0.9
    q = np.concatenate([[math.cos(angle / 2)], math.sin(angle / 2) * axis / np.linalg.norm(axis)])
    scales = np.array([0.12, 0.04, 0.07])
    mu = np.array([0.15, -0.1, 0.2])
    Rg = rotation_from_axis_angle(axis, angle)
    sigma = Rg @ np.diag(scales**2) @ Rg.T
    # by hand: world -> OpenCV camera (the OpenGL c2w with y and z flipped), the perspective Jacobian at the mean
    c2w = cams.c2w[0].numpy()
    rot = c2w[:3, :3] @ np.diag([1, -1, -1])
    Wm = rot.T
    t = Wm @ (mu - c2w[:3, 3])
    f = 0.5 * H / math.tan(math.radians(25.0))
    J = np.array([[f / t[2], 0, -f * t[0] / t[2] ** 2], [0, f / t[2], -f * t[1] / t[2] ** 2]])
    expected = J @ Wm @ sigma @ Wm.T @ J.T + 0.3 * np.eye(2)
    expected_mean = np.array([f * t[0] / t[2] + W / 2, f * t[1] / t[2] + H / 2])

    covars = covariance(torch.tensor(q)[None], torch.tensor(scales)[None])
    np.testing.assert_allclose(covars[0].numpy(), sigma, atol=1e-12)
    viewmats, Ks = camera_matrices(cams, H, W)
    means2d, conics, depths, radii = project(torch.tensor(mu)[None], covars, viewmats, Ks, H, W)
    a, b, c = conics[0, 0].numpy()
    np.testing.assert_allclose(np.linalg.inv(np.array([[a, b], [b, c]])), expected, rtol=1e-10)
    np.testing.assert_allclose(means2d[0, 0].numpy(), expected_mean, rtol=1e-12)
    assert depths[0, 0].item() == pytest.approx(t[2], rel=1e-12)
    assert radii[0, 0].tolist() == [math.ceil(3.33 * math.sqrt(expected[0, 0])), math.ceil(3.33 * math.sqrt(expected[1, 1]))]


def test_a_gaussian_lands_on_the_pixel_whose_ray_passes_through_it():
    # The volume renderer's rays (camera_rays) and the rasterizer's projection are the same camera.
    cams = one_camera(elevation=35.0, azimuth=110.0, distance=1.8, fovy=55.0, dtype=torch.float64)
    H, W = 24, 40
    origins, dirs = camera_rays(cams, H, W)
    viewmats, Ks = camera_matrices(cams, H, W)
    for row, col in [(0, 0), (5, 31), (23, 39), (12, 20)]:
        point = origins[0, row * W + col] + 1.3 * dirs[0, row * W + col]
        means2d, *_ = project(point[None], torch.eye(3, dtype=torch.float64)[None] * 1e-4, viewmats, Ks, H, W)
        np.testing.assert_allclose(means2d[0, 0].numpy(), [col + 0.5, row + 0.5], atol=1e-9)


def brute_force_composite(means2d, conics, depths, radii, opacities, features, H, W, tile=16):
    """gsplat's forward kernel, one pixel and one Gaussian at a time (float64 Python): the tiles a Gaussian's box
    overlaps, depth order, sigma < 0 or alpha < 1/255 skipped, alpha clamped at 0.999, the pixel done before the
    Gaussian whose next_T <= 1e-4."""
    C, N, F = features.shape
    out = np.zeros((C, F, H, W))
    opacity = np.zeros((C, H, W))
    for c in range(C):
        order = sorted(range(N), key=lambda i: (depths[c, i], i))
        for row in range(H):
            for col in range(W):
                T, acc = 1.0, np.zeros(F)
                for i in order:
                    if radii[c, i, 0] <= 0 or radii[c, i, 1] <= 0:
                        continue
                    tx0 = math.floor((means2d[c, i, 0] - radii[c, i, 0]) / tile)
                    tx1 = math.ceil((means2d[c, i, 0] + radii[c, i, 0]) / tile)
                    ty0 = math.floor((means2d[c, i, 1] - radii[c, i, 1]) / tile)
                    ty1 = math.ceil((means2d[c, i, 1] + radii[c, i, 1]) / tile)
                    if not (tx0 <= col // tile < tx1 and ty0 <= row // tile < ty1):
                        continue
                    dx, dy = means2d[c, i, 0] - (col + 0.5), means2d[c, i, 1] - (row + 0.5)
                    a, b, cc = conics[c, i]
                    sigma = 0.5 * (a * dx * dx + cc * dy * dy) + b * dx * dy
                    alpha = min(0.999, opacities[i] * math.exp(-sigma))
                    if sigma < 0 or alpha < 1 / 255:
                        continue
                    next_T = T * (1 - alpha)
                    if next_T <= 1e-4:
                        break
                    acc += features[c, i] * alpha * T
                    T = next_T
                out[c, :, row, col] = acc
                opacity[c, row, col] = 1 - T
    return out, opacity


@pytest.mark.parametrize("chunk", [512, 2])
def test_compositing_matches_a_per_pixel_loop_of_gsplats_kernel(chunk, monkeypatch):
    # chunk 2: the pass that finds where each tile's pixels stop runs over several chunks and stops early
    import amortized3d.rendering.gaussians as module

    monkeypatch.setattr(module, "TILE_CHUNK", chunk)
    gen = torch.Generator().manual_seed(0)
    C, N, H, W = 2, 7, 20, 36  # two bands of tiles, a partial last one in each direction
    means2d = torch.rand(C, N, 2, generator=gen, dtype=torch.float64) * torch.tensor([W, H]) 
    L = torch.rand(C, N, 2, 2, generator=gen, dtype=torch.float64) * 4
    cov = L @ L.transpose(-1, -2) + 0.3 * torch.eye(2, dtype=torch.float64)
    inv = torch.linalg.inv(cov)
    conics = torch.stack([inv[..., 0, 0], inv[..., 0, 1], inv[..., 1, 1]], -1)
    radii = torch.ceil(3.33 * torch.stack([cov[..., 0, 0], cov[..., 1, 1]], -1).sqrt()).int()
    radii[1, 2] = 0  # culled in camera 1
    depths = torch.rand(C, N, generator=gen, dtype=torch.float64)
    depths[0, 3] = depths[0, 4]  # a tie: index order decides, as gsplat's stable sort
    opacities = torch.rand(N, generator=gen, dtype=torch.float64) * 0.6 + 0.4
    opacities[:3] = 0.9999  # near-opaque: the 1e-4 transmittance cut-off ends pixels early
    means2d[:, :3] = means2d[:, :1]
    features = torch.rand(C, N, 4, generator=gen, dtype=torch.float64)
    got, got_opacity = composite(means2d, conics, depths, radii, opacities, features, H, W)
    want, want_opacity = brute_force_composite(means2d.numpy(), conics.numpy(), depths.numpy(), radii.numpy(), opacities.numpy(),
                                               features.numpy(), H, W)
    np.testing.assert_allclose(got.numpy(), want, atol=1e-10)
    np.testing.assert_allclose(got_opacity[:, 0].numpy(), want_opacity, atol=1e-10)
    assert (want_opacity > 0.99).any()  # the cut-off was reached somewhere


def test_gaussians_hidden_behind_opaque_ones_change_neither_images_nor_gradients():
    # Two nearly flat Gaussians of alpha 0.999 (the clamp) over the whole tile in front of 600 others: every pixel
    # stops at the second (next T = 1e-6 <= 1e-4, gsplat excludes it), so the image and the gradients equal those of
    # the first Gaussian alone, and the 600 behind get no gradient (the compositing cuts them; chunks of 512 and more).
    gen = torch.Generator().manual_seed(1)
    C, N, H, W = 1, 602, 16, 16
    means2d = torch.cat([torch.full((C, 2, 2), 8.0), 8 + torch.randn(C, N - 2, 2, generator=gen)], 1).double().requires_grad_()
    conics = torch.cat([torch.tensor([1e-5, 0.0, 1e-5]).repeat(C, 2, 1), torch.tensor([0.05, 0.0, 0.05]).repeat(C, N - 2, 1)], 1).double()
    radii = torch.full((C, N, 2), 30, dtype=torch.int32)
    depths = torch.cat([torch.tensor([[0.0, 0.5]]), 1 + torch.rand(C, N - 2, generator=gen)], 1).double()
    opacities = torch.cat([torch.tensor([0.9999, 0.9999]), torch.rand(N - 2, generator=gen) * 0.5 + 0.1]).double().requires_grad_()
    features = torch.rand(C, N, 3, generator=gen, dtype=torch.float64)
    weights = torch.rand(C, 3, H, W, generator=gen, dtype=torch.float64)

    def run(n):
        image, opacity = composite(means2d[:, :n], conics[:, :n], depths[:, :n], radii[:, :n], opacities[:n], features[:, :n], H, W)
        return image, opacity, torch.autograd.grad((image * weights).sum() + opacity.sum(), [means2d, opacities])

    image, opacity, (g_means, g_opacities) = run(N)
    alone, alone_opacity, (a_means, a_opacities) = run(1)
    assert torch.equal(image, alone) and torch.equal(opacity, alone_opacity)
    torch.testing.assert_close(opacity, torch.full_like(opacity, 0.999), atol=1e-6, rtol=0)
    assert torch.equal(g_means, a_means) and torch.equal(g_opacities, a_opacities)
    assert (g_opacities[1:] == 0).all() and (g_means[:, 1:] == 0).all()


def test_gradients_match_finite_differences():
    torch.manual_seed(0)
    cams = one_camera(elevation=15.0, azimuth=10.0, distance=2.0, fovy=45.0, dtype=torch.float64)
    H = W = 16
    N = 4
    params = {"means": (torch.rand(N, 3, dtype=torch.float64) - 0.5) * 0.3,
              "quats": torch.randn(N, 4, dtype=torch.float64),
              "log_scales": torch.log(torch.rand(N, 3, dtype=torch.float64) * 0.1 + 0.08),
              "logit_opacities": torch.randn(N, dtype=torch.float64) * 0.5,
              "sh": torch.randn(N, 4, 3, dtype=torch.float64) * 0.3}
    weights = torch.rand(3, H, W, dtype=torch.float64)
    dweights = torch.rand(1, H, W, dtype=torch.float64)

    def loss(p):
        out = rasterize(p["means"], p["quats"], p["log_scales"].exp(), torch.sigmoid(p["logit_opacities"]), p["sh"], cams, H, W)
        return (out.rgb[0] * weights).sum() + (out.opacity[0] * dweights).sum()

    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss(leaves).backward()
    eps = 1e-6
    for name, value in params.items():
        flat = value.reshape(-1)
        for k in range(0, flat.numel(), max(1, flat.numel() // 6)):
            plus, minus = dict(params), dict(params)
            plus[name] = (flat + eps * (torch.arange(flat.numel()) == k)).reshape(value.shape)
            minus[name] = (flat - eps * (torch.arange(flat.numel()) == k)).reshape(value.shape)
            fd = (loss(plus) - loss(minus)).item() / (2 * eps)
            assert leaves[name].grad.reshape(-1)[k].item() == pytest.approx(fd, rel=1e-4, abs=1e-7), (name, k)


def test_the_spherical_harmonics_are_orthonormal():
    # int_S2 Y_i Y_j = delta_ij, by a Fibonacci-lattice quadrature of 200k points (error ~1e-5).
    n = 200_000
    k = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * k / n
    phi = math.pi * (1 + 5**0.5) * k
    r = (1 - z**2).sqrt()
    dirs = torch.stack([r * phi.cos(), r * phi.sin(), z], -1)
    Y = sh_basis(3, dirs)
    gram = 4 * math.pi * Y.T @ Y / n
    np.testing.assert_allclose(gram.numpy(), np.eye(16), atol=1e-4)


def test_the_view_dependent_color_follows_the_degree_one_harmonic():
    # One Gaussian with only the degree-1 coefficient of -Y (the first of the three) set: its color from a camera
    # in direction d from it is 0.5 + k * 0.4886 * d_y (3DGS: Y_1^-1 = -0.4886 y, times the coefficient -k).
    means = torch.zeros(1, 3)
    sh = torch.zeros(1, 4, 3)
    sh[0, 1] = -0.5
    for azimuth in (0.0, 90.0, -90.0):
        cams = one_camera(elevation=0.0, azimuth=azimuth, distance=2.0)
        out = rasterize(means, torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.1), torch.tensor([0.99]), sh, cams, 16, 16)
        d_y = -math.sin(math.radians(azimuth))  # direction camera -> Gaussian
        center = out.rgb[0, :, 8, 8] / out.opacity[0, 0, 8, 8]
        assert center.tolist() == pytest.approx([0.5 + 0.5 * 0.4886025119029199 * d_y] * 3, abs=1e-5)


def test_the_gsplat_backend_refuses_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA only.*rasterizer=torch"):
        rasterize(torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.1), torch.tensor([0.5]),
                  torch.zeros(1, 1, 3), one_camera(), 8, 8, backend="gsplat")


# ----------------------------------------------------------------------------- the per-prompt Gaussian runs

import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402

from amortized3d.cli import main  # noqa: E402
from tests.fixtures import REPO, TINY, evaluate_and_generate, load_benchmark  # noqa: E402

PROMPT = "a large red cube"
GS_TINY = [*TINY, "train.prompts_per_step=1", "train.views_per_prompt=1", "train.steps=4", "train.ckpt_every=2",
           "generator.n_gaussians=200", "splats.densify_from=1", "splats.densify_every=2", "splats.grad_threshold=1e-9"]


def test_train_evaluate_generate_gallery_and_plot_a_gaussian_run(tmp_path, capsys, monkeypatch):
    from tests.fixtures import hide_viewer

    run = tmp_path / "run"
    assert main(["train", "--prompt", PROMPT, "--representation", "gaussians", "--output", str(run), *GS_TINY]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["step"] == 2 and rows[1]["n_gaussians"] > 200 and rows[1]["cloned"] + rows[1]["split"] > 0  # densified
    assert all(r["raster_ms"] > 0 for r in rows)
    out = tmp_path / "out"
    _, result = evaluate_and_generate(run, PROMPT, out, capsys)
    assert {"mesh_glb", "splats_ply", "video", "contact_sheet"} <= set(result)
    assert (out / "a_large_red_cube_splats.ply").is_file()
    assert main(["generate", "a large blue cube", "--checkpoint", str(run), "--out", str(out)]) == 2
    assert "per-prompt run" in capsys.readouterr().err
    hide_viewer(monkeypatch, tmp_path / "no_viewer")
    assert main(["gallery", str(run), "--out", str(tmp_path / "gallery")]) == 0
    assert main(["plot", str(run)]) == 0
    assert main(["train", "--corpus", "shapeworld-16", "--representation", "gaussians", "--output", str(tmp_path / "x")]) == 2
    assert "--prompt TEXT" in capsys.readouterr().err


def small_gaussians(n=50, sh_degree=1, seed=0, color_field=False):
    from amortized3d.builders import build_generator
    from amortized3d.config import load_config

    torch.manual_seed(seed)
    cfg = load_config("prompt:" + PROMPT, overrides=[*TINY, "generator.kind=gaussians", "regularizers.eikonal=[]",
                                                     f"generator.n_gaussians={n}", f"generator.sh_degree={sh_degree}",
                                                     f"generator.color_field={str(color_field).lower()}"])
    model = build_generator(cfg)
    with torch.no_grad():
        for p in model.splats.values():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_the_splat_ply_round_trips_with_3dgs_property_names(tmp_path):
    from amortized3d.inference.export import load_splats_ply, save_splats_ply

    model = small_gaussians(sh_degree=2)
    path = save_splats_ply(model.splats, tmp_path / "splats.ply")
    header = path.read_bytes().split(b"end_header")[0].decode()
    names = [line.split()[-1] for line in header.splitlines() if line.startswith("property")]
    # graphdeco-inria/gaussian-splatting's construct_list_of_attributes, with 8 higher coefficients per channel
    assert names == (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(24)]
                     + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])
    assert "format binary_little_endian 1.0" in header and "element vertex 50" in header
    loaded = load_splats_ply(path)
    assert loaded.keys() == dict(model.splats).keys()
    for name, value in model.splats.items():
        assert torch.equal(loaded[name], value.detach()), name
    cams = one_camera()
    original = model(torch.zeros(1, 4)).render(cams.reshape(1, 1), 24, 24)
    with torch.no_grad():
        for name, value in loaded.items():
            model.splats[name].copy_(value)
    again = model(torch.zeros(1, 4)).render(cams.reshape(1, 1), 24, 24)
    assert torch.allclose(original.rgb, again.rgb, atol=1e-6)
    with pytest.raises(ValueError, match="not a 3D Gaussian Splatting .ply.*opacity"):
        bad = tmp_path / "mesh.ply"
        from plyfile import PlyData, PlyElement

        PlyData([PlyElement.describe(np.zeros(3, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")]), "vertex")]).write(str(bad))
        load_splats_ply(bad)


def test_a_color_field_starts_gray_and_its_colors_export_into_the_ply(tmp_path):
    # The color field (generator.color_field) replaces each Gaussian's sh0 by the field's color at its center: gray
    # (rgb 0.5, i.e. sh0 = 0 as 3DGS's rgb = 0.5 + SH_C0 sh0) at the start, like per-Gaussian colors; its export bakes
    # the colors into f_dc, so the .ply loaded into Gaussians with their own colors renders the same image.
    from amortized3d.inference.export import load_splats_ply, save_splats_ply

    model = small_gaussians(sh_degree=1, color_field=True)
    assert "sh0" not in model.splats and torch.equal(model.sh()[:, 0], torch.zeros(50, 3))
    with torch.no_grad():
        for p in [*model.color_grid.parameters(), *model.color_mlp.parameters()]:
            p.add_(torch.randn_like(p) * 0.5)
    colors = 0.5 + 0.28209479177387814 * model.sh()[:, 0]  # SH_C0 = 1 / (2 sqrt(pi))
    assert colors.std() > 0.01 and torch.allclose(colors, model.field_colors(model.splats["means"]), atol=1e-6)
    cams = one_camera()
    original = model(torch.zeros(1, 4)).render(cams.reshape(1, 1), 24, 24)
    plain = small_gaussians(sh_degree=1)
    with torch.no_grad():
        for name, value in load_splats_ply(save_splats_ply(model.export_splats(), tmp_path / "splats.ply")).items():
            plain.splats[name].copy_(value)
        plain.background.load_state_dict(model.background.state_dict())
    again = plain(torch.zeros(1, 4)).render(cams.reshape(1, 1), 24, 24)
    assert torch.allclose(original.rgb, again.rgb, atol=1e-5)


def test_starting_from_points_fits_the_color_field_to_their_colors():
    # --init-from with a color field: the field is fitted to the asset's colors at the points; a smooth color function
    # is reproduced there (root-mean-square error under 0.03).
    model = small_gaussians(n=400, sh_degree=0, color_field=True)
    points = (torch.rand(400, 3, generator=torch.Generator().manual_seed(3)) - 0.5) * 0.8
    colors = torch.stack([0.5 + points[:, 0], torch.full((400,), 0.3), 0.5 - points[:, 2]], -1)
    with torch.no_grad():
        model.start_from_points(points, colors)
    assert model.n_gaussians == 400 and torch.equal(model.splats["means"], points)
    assert (model.field_colors(points) - colors).pow(2).mean().sqrt() < 0.03


def test_the_carved_solid_follows_its_definition_per_point_and_view():
    # Brute force, per point and per carve view in Python: the pinhole projection written from the OpenGL camera
    # (camera looks down -z, y up; u = W/2 + f x / d, v = H/2 - f y / d, d = -z, f = H / (2 tan(fovy / 2))), the
    # rendered opacity and expected depth read at the pixel containing (u, v); s(x) = the max over the views whose
    # image holds x of (depth - d - half a pixel's width d / (2 f)) where the pixel is opaque (> 0.5), else one pixel's
    # width d / f; the color that of the view whose surface is nearest in depth (module docstring of
    # amortized3d/generators/gaussians.py).
    model = small_gaussians(n=60, sh_degree=0)
    with torch.no_grad():
        model.splats["opacities"].fill_(2.0)
        model.splats["scales"].fill_(math.log(0.06))
    rep = model(torch.zeros(1, 4))
    cams, out = rep.carve_views()
    R = model.config.carve_resolution
    points = (torch.rand(1, 300, 3, generator=torch.Generator().manual_seed(0)) - 0.5) * 1.4
    value, color = rep.sdf_and_color(points)
    c2w = cams.c2w.double().numpy()
    for m in range(points.shape[1]):
        x = points[0, m].double().numpy()
        best, nearest, want_color = -np.inf, np.inf, np.zeros(3)
        for c in range(len(c2w)):
            local = np.linalg.inv(c2w[c]) @ np.append(x, 1.0)
            d = -local[2]
            f = R / (2 * math.tan(cams.fovy[c].item() / 2))
            u, v = R / 2 + f * local[0] / d, R / 2 - f * local[1] / d
            if d <= 0.01 or not (0 <= u < R and 0 <= v < R):
                continue
            if min(abs(u - round(u)), abs(v - round(v))) < 1e-3:
                break  # on a pixel border: float32 may pick the other pixel
            opacity = out.opacity[c, 0, int(v), int(u)].item()
            depth = out.depth[c, 0, int(v), int(u)].item()
            best = max(best, depth - d - d / (2 * f) if opacity > 0.5 else d / f)
            if opacity > 0.5 and abs(depth - d) < nearest:
                nearest, want_color = abs(depth - d), out.rgb[c, :, int(v), int(u)].numpy() / opacity
        else:
            want = model.config.bound if best == -np.inf else best
            assert value[0, m].item() == pytest.approx(want, abs=2e-4), m
            np.testing.assert_allclose(color[0, m].numpy(), np.clip(want_color, 0, 1), atol=1e-4)
    assert torch.equal(rep.occupancy(points), value < 0)


def test_gaussians_on_a_sphere_carve_the_solid_ball():
    # Property: opaque Gaussians covering only the surface of a ball render as that ball from every view, so the
    # carved solid is the ball, inside included (where no Gaussian is); its IoU with the exact ball at 32^3 cell
    # centers is high, and the summed Gaussian density there would be 0. The rendered ball is the shell's outer edge:
    # where one opaque Gaussian's alpha exp(-d^2 / (2 sigma^2)) falls to the carve's level 0.5, d = sigma sqrt(2 ln 2)
    # outside the centers' radius.
    from amortized3d.fields import grid_points

    model = small_gaussians(n=6000, sh_degree=0)
    model.config.carve_resolution = 64  # pixels of 0.03 at the ball (the tiny recipe's 16: 0.12, too coarse for 32^3 cells)
    radius = 0.4
    with torch.no_grad():
        directions = torch.nn.functional.normalize(torch.randn(6000, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
        model.splats["means"].copy_(radius * directions)
        model.splats["scales"].fill_(math.log(0.015))
        model.splats["opacities"].fill_(6.0)
    points = grid_points(32, 1.0, cell_centers=True).unsqueeze(0)
    inside = model(torch.zeros(1, 4)).occupancy(points)[0]
    ball = points[0].norm(dim=-1) < radius + 0.015 * math.sqrt(2 * math.log(2))
    assert (inside & ball).sum() / (inside | ball).sum() > 0.9
    assert inside[points[0].norm(dim=-1) < 0.2].all()  # the hollow center is solid


def test_the_exact_scene_read_through_the_carve_is_close_to_it():
    # benchmarks/carve_ceiling.py feeds the carve rule the exact ShapeWorld scene's own renders (the IoU a perfect asset
    # would get through this reading). Properties: a sphere, seen from rings of views all around it, is read nearly
    # exactly on the oracle's grid, and finer carve pixels read it no worse; a cube, whose faces the rings at +-80
    # degrees and the side rings see face-on, is read as itself (from the training elevations alone, -10 to 45
    # degrees, a slab under it stayed solid: IoU 0.91).
    ceiling = load_benchmark("carve_ceiling")
    config = str(REPO / "configs" / "prompt-gaussians.yaml")
    coarse = ceiling.exact_carve_iou("a large green sphere", config, 32)
    fine = ceiling.exact_carve_iou("a large green sphere", config, 64)
    assert coarse > 0.95 and fine >= coarse
    assert ceiling.exact_carve_iou("a large red cube", config, 32) > 0.98


def test_the_carve_views_default_to_the_training_cameras_and_near_polar_rings():
    from amortized3d.builders import build_generator
    from amortized3d.config import load_config

    cfg = load_config("prompt:" + PROMPT, overrides=[*TINY, "generator.kind=gaussians", "regularizers.eikonal=[]",
                                                     "camera.elevation_range=[-10.0, 50.0]", "camera.distance_range=[1.2, 1.8]",
                                                     "camera.fovy_range=[40.0, 55.0]", "render.height=24", "render.width=24",
                                                     "render.size_schedule=[[0.5, 40]]"])
    model = build_generator(cfg)
    c = model.config
    # rings at the ends and middle of the training elevations, and near-polar rings at +-80 degrees
    assert c.carve_elevations == [-80.0, -10.0, 20.0, 50.0, 80.0]
    assert (c.carve_distance, c.carve_fovy, c.carve_resolution) == (1.5, 55.0, 40)
    cams = model(torch.zeros(1, 4)).carve_cameras()
    assert cams.shape == (80,) and torch.allclose(cams.distance, torch.tensor(1.5))  # 5 rings of carve_azimuths (16)
    assert sorted(set(cams.elevation.round().tolist())) == [-80.0, -10.0, 20.0, 50.0, 80.0]
    positions = cams.c2w[:, :3, 3]
    assert torch.allclose((positions @ cams.c2w[:, :3, 2].T).diagonal(), cams.distance, atol=1e-5)  # they look at the origin
    fixed = build_generator(load_config("prompt:" + PROMPT, overrides=[*TINY, "generator.kind=gaussians", "regularizers.eikonal=[]",
                                                                       "generator.carve_resolution=64"]))
    assert fixed.config.carve_resolution == 64


def test_the_mesh_of_gaussians_passes_the_gltf_validator(tmp_path):
    validator = REPO / "node_modules" / "gltf-validator"
    if shutil.which("node") is None or not validator.is_dir():
        pytest.skip("the Khronos glTF validator (npm gltf-validator) is not installed: run `npm ci` (Node.js 18+)")
    from amortized3d.inference.baked import bake_representation
    from amortized3d.inference.export import extract_mesh, save_mesh

    model = small_gaussians(n=300, sh_degree=0)
    with torch.no_grad():
        model.splats["opacities"].fill_(3.0)  # a solid blob
        model.splats["scales"].fill_(math.log(0.08))
    glb, _ = save_mesh(extract_mesh(bake_representation(model(torch.zeros(1, 4)), 40, 1.0)), tmp_path / "blob")
    script = ("const v = require(process.argv[1]); const fs = require('fs');"
              "v.validateBytes(new Uint8Array(fs.readFileSync(process.argv[2]))).then(r => console.log(JSON.stringify(r.issues)));")
    done = subprocess.run(["node", "-e", script, str(validator), str(glb)], capture_output=True, text=True, timeout=120)
    issues = json.loads(done.stdout)
    assert issues["numErrors"] == 0, issues["messages"][:5]


def test_gaussians_start_on_the_surface_of_another_runs_asset(tmp_path, capsys):
    # Expected from the source itself: its SDF at the started Gaussians' centers is about 0 (within a voxel of the 64^3
    # grid its mesh was extracted on; one training step moves them by about the position rate).
    from safetensors.torch import load_file

    from amortized3d.builders import build_text_encoder, load_run

    source = tmp_path / "amortized"
    assert main(["train", "--corpus", "shapeworld-16", "--output", str(source), *TINY, "train.steps=2", "train.ckpt_every=2"]) == 0
    run = tmp_path / "refined"
    assert main(["train", "--prompt", PROMPT, "--representation", "gaussians", "--init-from", str(source), "--output", str(run),
                 *GS_TINY, "train.steps=1", "train.ckpt_every=1", "splats.densify_until=0"]) == 0
    means = load_file(run / "checkpoints" / "step_00000001" / "model.safetensors")["splats.means"]
    cfg, generator, _ = load_run(source)
    text = build_text_encoder(cfg).encode([PROMPT])
    with torch.no_grad():
        sdf = generator(text.pooled, text.tokens).sdf(means.unsqueeze(0))[0]
    voxel = 2 * cfg.sampling_radius() / 63
    assert means.shape[0] == 200 and sdf.abs().max() < voxel
    assert main(["train", "--prompt", PROMPT, "--init-from", str(source), "--output", str(tmp_path / "x")]) == 2
    assert "--representation gaussians" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["asd", "sds", "csd", "vsd", "lods-embedding", "lods-lora"])
def test_every_distillation_method_trains_gaussians(tmp_path, method):
    from amortized3d.config import load_config
    from amortized3d.training.train import train

    cfg = load_config("prompt:" + PROMPT, str(REPO / "configs" / "prompt-gaussians.yaml"),
                      [*GS_TINY, f"distill.method={method}", "train.steps=2", "train.ckpt_every=1", "splats.densify_until=0"])
    train(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["skipped_steps"] == 0
    from safetensors.torch import load_file

    first, second = (load_file(tmp_path / "run" / "checkpoints" / f"step_0000000{k}" / "model.safetensors") for k in (1, 2))
    # the second step's gradient reached every attribute and the recipe's color field (generator.color_field)
    for name in ("splats.means", "splats.scales", "splats.opacities", "color_grid.table"):
        assert torch.isfinite(second[name]).all() and not torch.equal(first[name], second[name]), name


def test_the_position_rate_decays_exponentially_over_the_run(tmp_path):
    # 3DGS's position schedule: lr(p) = lr_0 (lr_final / lr_0)^p at progress p = step / (steps - 1); each checkpoint's
    # optimizer holds the rate its last step used (p = 0, 1/3, 2/3, 1 for the 4 steps), the other attributes' unchanged.
    from amortized3d.config import load_config
    from amortized3d.training.train import train

    cfg = load_config("prompt:" + PROMPT, str(REPO / "configs" / "prompt-gaussians.yaml"),
                      [*GS_TINY, "train.ckpt_every=1", "train.keep_checkpoints=4", "splats.densify_until=0", "splats.lr_means=1e-3",
                       "splats.lr_means_final=1e-5"])
    train(cfg, tmp_path / "run")
    for step in range(1, 5):
        state = json.loads((tmp_path / "run" / "checkpoints" / f"step_{step:08d}" / "state.json").read_text())
        rates = {g["name"]: g["lr"] for g in state["optimizer"]["param_groups"]}
        assert rates["means"] == pytest.approx(1e-3 * 0.01 ** ((step - 1) / 3), rel=1e-9)
        assert rates["color_grid"] == cfg.splats.lr_color_grid and rates["opacities"] == cfg.splats.lr_opacities


def test_gaussians_with_stable_diffusion_and_the_two_phases(tiny_sd, tiny_if, tmp_path):
    """The real-prior recipes on the tiny random SD / IF folders: configs/gaussians-sd.yaml through --prior, and
    configs/stabledreamer.yaml's two phases (IF, then SD from half-way) in one run."""
    run = tmp_path / "sd"
    tiny = ["train.wandb=disabled", "render.height=16", "render.width=16", "prior.resolution=32", "eval.resolution=16",
            "eval.n_views=2", "train.val_every=1000", "train.ckpt_every=1000", "train.steps=2", "train.log_every=1",
            "generator.n_gaussians=100", "train.views_per_prompt=2"]
    assert main(["train", "--prompt", "a hamburger", "--representation", "gaussians", "--prior", str(tiny_sd), "--output", str(run),
                 *tiny]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["n_gaussians"] == 100
    run = tmp_path / "two"
    assert main(["train", "--prompt", "a hamburger", "--representation", "gaussians", "--config", str(REPO / "configs" / "stabledreamer.yaml"),
                 "--output", str(run), *tiny, "render.size_schedule=[[0.5, 24]]", f"prior.model={tiny_if}",
                 f"phase2.prior={{kind: stable_diffusion, model: {tiny_sd}, resolution: 32}}"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == [1, 2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat rasterizes on CUDA only; this machine has no GPU "
                    "(the same comparison: python benchmarks/rasterizer.py on a CUDA machine)")
@pytest.mark.parametrize("mode", ["classic", "antialiased"])
def test_the_torch_rasterizer_matches_gsplat_on_cuda(mode):
    model = small_gaussians(n=500, sh_degree=1)
    s = {k: v.detach().cuda() for k, v in model.splats.items()}
    cams = one_camera().to("cuda")
    outs = {}
    for backend in ("torch", "gsplat"):
        leaves = {k: v.clone().requires_grad_() for k, v in s.items()}
        sh = torch.cat([leaves["sh0"], leaves["shN"]], 1)
        out = rasterize(leaves["means"], leaves["quats"], leaves["scales"].exp(), torch.sigmoid(leaves["opacities"]), sh, cams, 48, 64,
                        backend, mode)
        (out.rgb.square().sum() + out.opacity.sum()).backward()
        outs[backend] = (out, {k: leaves[k].grad for k in ("means", "scales", "opacities", "sh0")})
    (a, ga), (b, gb) = outs["torch"], outs["gsplat"]
    assert (a.rgb - b.rgb).abs().max() < 1e-4 and (a.opacity - b.opacity).abs().max() < 1e-4
    assert (a.depth - b.depth).abs().max() < 1e-3 and torch.equal(a.radii, b.radii)
    for k in ga:
        assert (ga[k] - gb[k]).norm() <= 1e-3 * gb[k].norm() + 1e-6, k
