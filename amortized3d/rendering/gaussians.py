"""3D Gaussian splatting: N anisotropic Gaussians projected into C cameras and composited front to back.

The math of 3DGS (Kerbl et al. 2023; EWA splatting, Zwicker et al. 2002) in the conventions of gsplat, whose CUDA
kernels draw on GPUs (backend "gsplat"); the pure-PyTorch path (backend "torch", for CPUs, where gsplat cannot
rasterize) follows them step by step:

    Sigma       = R S S^T R^T                 R of the unit quaternion (w, x, y, z), S = diag(scales)
    t           = W mu + w                    camera coordinates (OpenCV: x right, y down, z forward)
    J           = [[fx/tz, 0, -fx tx'/tz^2],  tx', ty': tx, ty clamped to 1.3 x the half field of view (gsplat)
                   [0, fy/tz, -fy ty'/tz^2]]
    Sigma_2D    = J W Sigma W^T J^T + 0.3 I   the 0.3-pixel dilation
    mu_2D       = (fx tx / tz + cx, fy ty / tz + cy)
    alpha_i(p)  = min(0.999, o_i exp(-1/2 d^T Sigma_2D^-1 d)),   d = p - mu_2D, p a pixel center (col + 0.5, row + 0.5)
    F(p)        = sum_i f_i alpha_i T_i,   T_i = prod_{j<i} (1 - alpha_j),   nearest (smallest tz) first

and gsplat's cut-offs: Gaussians with tz <= 0.01 are culled; a Gaussian reaches only the pixels of the 16 x 16 tiles
that its box mu_2D +- ceil(3.33 sqrt(diag Sigma_2D)) overlaps; terms with sigma < 0 or alpha < 1/255 are skipped; a
pixel stops at the first Gaussian that would bring its transmittance to 1e-4 or below (that one excluded). The
features f_i are the color (spherical harmonics of degree 0-3 for the direction from the camera, + 0.5, clamped at 0,
as 3DGS), the depth tz and tz^2, so each pixel also gets its opacity sum_i alpha_i T_i, its expected depth and the
depth variance (HiFA's z-variance).

Our cameras (amortized3d.rendering.cameras) are OpenGL camera-to-world matrices with a vertical field of view; the
world-to-camera OpenCV matrix is W = (c2w diag(1, -1, -1, 1))^-1 and K = [[f, 0, w/2], [0, f, h/2], [0, 0, 1]] with
f = h / (2 tan(fovy / 2)), so a Gaussian's center lands on the pixel whose volume-rendering ray passes through it.

Shapes: N Gaussians, C cameras, K = (degree + 1)^2 SH coefficients, F features, H x W pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from amortized3d.rendering.cameras import Cameras

TILE = 16  # gsplat's tile size: a Gaussian reaches the pixels of the tiles its 3.33-sigma box overlaps
ALPHA_MIN = 1.0 / 255.0  # terms below this are skipped
ALPHA_MAX = 0.999  # alpha is clamped to this
T_MIN = 1e-4  # a pixel stops before the Gaussian that would bring its transmittance to this or below
EPS_2D = 0.3  # the dilation of the 2D covariance, in pixels^2
NEAR = 0.01  # Gaussians at camera depth <= NEAR are culled
RADIUS_SIGMAS = 3.33  # the screen-space box half-width in standard deviations (gsplat 1.5)
TILE_CHUNK = 512  # Gaussians per step of the pass that finds where a tile's pixels stop compositing
SH_C0 = 0.28209479177387814  # the degree-0 spherical harmonic, 1 / (2 sqrt(pi))

Backend = Literal["auto", "torch", "gsplat"]


@dataclass
class SplatRender:
    """C images of one set of N Gaussians.

    rgb [C, 3, H, W] (not composited on a background: premultiplied by the opacity); opacity [C, 1, H, W];
    depth [C, 1, H, W] (expected depth sum_i w_i tz_i / opacity, 0 where empty); z_variance [C, 1, H, W];
    means2d [C, N, 2] pixel positions of the centers, a tensor that keeps its gradient after backward (what density
    control reads); radii [C, N] int, 0 for Gaussians culled in that camera; seconds: the time the caller measured.
    """

    rgb: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    z_variance: torch.Tensor
    means2d: torch.Tensor
    radii: torch.Tensor
    seconds: float = 0.0


# ----------------------------------------------------------------------------- geometry


def quaternion_to_rotation(quats: torch.Tensor) -> torch.Tensor:
    """Quaternions (w, x, y, z) [..., 4], normalized here -> rotation matrices [..., 3, 3]."""
    w, x, y, z = torch.nn.functional.normalize(quats, dim=-1).unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], -1).reshape(*quats.shape[:-1], 3, 3)


def covariance(quats: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Sigma = R S S^T R^T: quats [N, 4], scales [N, 3] (standard deviations along the rotated axes) -> [N, 3, 3]."""
    m = quaternion_to_rotation(quats) * scales.unsqueeze(-2)  # R S
    return m @ m.transpose(-1, -2)


def camera_matrices(cameras: Cameras, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cameras [C] (OpenGL camera-to-world, vertical fov) -> (world-to-camera OpenCV viewmats [C, 4, 4], intrinsics
    Ks [C, 3, 3]): the matrices gsplat takes, for the pixel grid camera_rays uses."""
    flip = torch.tensor([1.0, -1.0, -1.0], dtype=cameras.c2w.dtype, device=cameras.c2w.device)
    rot = cameras.c2w[:, :3, :3] * flip  # camera-to-world rotation, OpenCV axes
    viewmats = torch.zeros_like(cameras.c2w)
    viewmats[:, :3, :3] = rot.transpose(-1, -2)
    viewmats[:, :3, 3] = -(rot.transpose(-1, -2) @ cameras.c2w[:, :3, 3:]).squeeze(-1)
    viewmats[:, 3, 3] = 1.0
    focal = 0.5 * height / torch.tan(0.5 * cameras.fovy)
    Ks = torch.zeros(len(focal), 3, 3, dtype=focal.dtype, device=focal.device)
    Ks[:, 0, 0], Ks[:, 1, 1], Ks[:, 0, 2], Ks[:, 1, 2], Ks[:, 2, 2] = focal, focal, 0.5 * width, 0.5 * height, 1.0
    return viewmats, Ks


def project(means: torch.Tensor, covars: torch.Tensor, viewmats: torch.Tensor, Ks: torch.Tensor, height: int,
            width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EWA projection, as gsplat's: means [N, 3], covars [N, 3, 3], viewmats [C, 4, 4], Ks [C, 3, 3] ->
    (means2d [C, N, 2], conics [C, N, 3] (the upper triangle a, b, c of Sigma_2D^-1), depths tz [C, N],
    radii [C, N, 2] int (0 where culled: behind the near plane or off the image))."""
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    mc = torch.einsum("cij,nj->cni", R, means) + t.unsqueeze(1)  # [C, N, 3]
    cc = R.unsqueeze(1) @ covars.unsqueeze(0) @ R.transpose(-1, -2).unsqueeze(1)  # [C, N, 3, 3]
    tx, ty, tz = mc.unbind(-1)
    valid = tz > NEAR
    tz = torch.where(valid, tz, torch.ones_like(tz))  # culled ones: finite values whose gradient is masked below
    fx, fy, cx, cy = (Ks[:, 0, 0, None], Ks[:, 1, 1, None], Ks[:, 0, 2, None], Ks[:, 1, 2, None])
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    lim_x = ((width - cx) / fx + 0.3 * tan_x, cx / fx + 0.3 * tan_x)
    lim_y = ((height - cy) / fy + 0.3 * tan_y, cy / fy + 0.3 * tan_y)
    txc = tz * torch.maximum(torch.minimum(tx / tz, lim_x[0]), -lim_x[1])
    tyc = tz * torch.maximum(torch.minimum(ty / tz, lim_y[0]), -lim_y[1])
    zero = torch.zeros_like(tz)
    J = torch.stack([fx / tz, zero, -fx * txc / tz**2, zero, fy / tz, -fy * tyc / tz**2], -1).reshape(*tz.shape, 2, 3)
    cov2d = J @ cc @ J.transpose(-1, -2) + EPS_2D * torch.eye(2, dtype=means.dtype, device=means.device)
    a, b, c = cov2d[..., 0, 0], 0.5 * (cov2d[..., 0, 1] + cov2d[..., 1, 0]), cov2d[..., 1, 1]
    det = (a * c - b * b).clamp_min(1e-10)
    conics = torch.stack([c / det, -b / det, a / det], -1)
    means2d = torch.stack([fx * tx / tz + cx, fy * ty / tz + cy], -1)
    radius = torch.ceil(RADIUS_SIGMAS * torch.stack([a, c], -1).sqrt())
    inside = ((means2d[..., 0] + radius[..., 0] > 0) & (means2d[..., 0] - radius[..., 0] < width)
              & (means2d[..., 1] + radius[..., 1] > 0) & (means2d[..., 1] - radius[..., 1] < height))
    radii = torch.where((valid & inside).unsqueeze(-1), radius, torch.zeros_like(radius)).int()
    return means2d, conics, torch.where(valid, mc[..., 2], zero), radii.detach()


# ----------------------------------------------------------------------------- color


def sh_basis(degree: int, dirs: torch.Tensor) -> torch.Tensor:
    """Real spherical harmonics up to ``degree`` (0-3) at unit directions [..., 3] -> [..., (degree + 1)^2], with the
    constants and signs of 3DGS (and gsplat): orthonormal on the sphere."""
    x, y, z = dirs.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        c1 = 0.4886025119029199
        out += [-c1 * y, c1 * z, -c1 * x]
    if degree >= 2:
        xx, yy, zz, xy, yz, xz = x * x, y * y, z * z, x * y, y * z, x * z
        out += [1.0925484305920792 * xy, -1.0925484305920792 * yz, 0.31539156525252005 * (2 * zz - xx - yy),
                -1.0925484305920792 * xz, 0.5462742152960396 * (xx - yy)]
    if degree >= 3:
        out += [-0.5900435899266435 * y * (3 * xx - yy), 2.890611442640554 * xy * z, -0.4570457994644658 * y * (4 * zz - xx - yy),
                0.3731763325901154 * z * (2 * zz - 3 * xx - 3 * yy), -0.4570457994644658 * x * (4 * zz - xx - yy),
                1.445305721320277 * z * (xx - yy), -0.5900435899266435 * x * (xx - 3 * yy)]
    return torch.stack(out, -1)


def sh_colors(coeffs: torch.Tensor, means: torch.Tensor, viewmats: torch.Tensor) -> torch.Tensor:
    """Colors of the Gaussians in each camera: coeffs [N, K, 3] (K = (degree + 1)^2), means [N, 3],
    viewmats [C, 4, 4] -> rgb [C, N, 3] = max(0, sum_k coeffs_k Y_k(d) + 0.5), d the unit direction camera -> mean."""
    degree = math.isqrt(coeffs.shape[1]) - 1
    R, t = viewmats[:, :3, :3], viewmats[:, :3, 3]
    centers = -(R.transpose(-1, -2) @ t.unsqueeze(-1)).squeeze(-1)  # camera positions [C, 3]
    dirs = torch.nn.functional.normalize(means.unsqueeze(0) - centers.unsqueeze(1), dim=-1)  # [C, N, 3]
    return (torch.einsum("cnk,nkj->cnj", sh_basis(degree, dirs), coeffs) + 0.5).clamp_min(0.0)


# ----------------------------------------------------------------------------- compositing


def composite(means2d: torch.Tensor, conics: torch.Tensor, depths: torch.Tensor, radii: torch.Tensor,
              opacities: torch.Tensor, features: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Front-to-back alpha compositing with gsplat's tiles and cut-offs (module docstring), in PyTorch.

    means2d [C, N, 2], conics [C, N, 3], depths [C, N], radii [C, N, 2], opacities [N] or per camera [C, N] in
    (0, 1), features [C, N, F] -> (features [C, F, H, W], opacity [C, 1, H, W]). Each 16 x 16 tile composites, as one dense [n, 256]
    block, the depth-sorted Gaussians whose boxes reach it, cut after the last one that any of its pixels still
    composites: a pass without gradient over chunks of TILE_CHUNK Gaussians finds where every pixel's transmittance
    has run out, so Gaussians hidden behind an opaque surface cost neither memory nor backward time.
    """
    C, N, F = features.shape
    tiles_x, tiles_y = (width + TILE - 1) // TILE, (height + TILE - 1) // TILE
    lo = torch.floor((means2d - radii) / TILE).long()  # gsplat: floor(mean / tile - radius / tile)
    hi = torch.ceil((means2d + radii) / TILE).long()
    lo_x, lo_y = lo[..., 0].clamp(0, tiles_x), lo[..., 1].clamp(0, tiles_y)
    hi_x, hi_y = hi[..., 0].clamp(0, tiles_x), hi[..., 1].clamp(0, tiles_y)
    drawn = (radii > 0).all(-1)
    out_features = means2d.new_zeros(C, F, height, width)
    out_opacity = means2d.new_zeros(C, 1, height, width)
    log_t_min = math.log(T_MIN)

    def alphas(c: int, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """alpha_i(p) of Gaussians ids at pixels [Q, 2], zero where gsplat skips the term. -> [n, Q]."""
        d = pixels.unsqueeze(0) - means2d[c, ids].unsqueeze(1)  # [n, Q, 2]
        a, b, cc = conics[c, ids].unsqueeze(1).unbind(-1)
        sigma = 0.5 * (a * d[..., 0] ** 2 + cc * d[..., 1] ** 2) + b * d[..., 0] * d[..., 1]  # [n, Q]
        alpha = ((opacities[c] if opacities.dim() == 2 else opacities)[ids].unsqueeze(1) * torch.exp(-sigma)).clamp_max(ALPHA_MAX)
        return torch.where((sigma >= 0) & (alpha >= ALPHA_MIN), alpha, torch.zeros_like(alpha))

    for c in range(C):
        order = torch.sort(depths[c], stable=True).indices  # nearest first; ties keep the index order
        drawn_c, lo_xc, hi_xc, lo_yc, hi_yc = (v[c][order] for v in (drawn, lo_x, hi_x, lo_y, hi_y))  # in depth order
        for ty in range(tiles_y):
            rows = torch.arange(ty * TILE, min(height, (ty + 1) * TILE), device=means2d.device)
            in_band = drawn_c & (lo_yc <= ty) & (hi_yc > ty)
            for tx in range(tiles_x):
                ids = order[in_band & (lo_xc <= tx) & (hi_xc > tx)]
                if ids.numel() == 0:
                    continue
                cols = torch.arange(tx * TILE, min(width, (tx + 1) * TILE), device=means2d.device)
                py, px = torch.meshgrid(rows, cols, indexing="ij")
                pixels = torch.stack([px.reshape(-1), py.reshape(-1)], -1).to(means2d.dtype) + 0.5  # [Q, 2]
                with torch.no_grad():  # how many Gaussians the tile's pixels composite before they all stop
                    log_t, used = pixels.new_zeros(len(pixels)), 0
                    for start in range(0, len(ids), TILE_CHUNK):
                        log_next = log_t + torch.cumsum(torch.log1p(-alphas(c, ids[start : start + TILE_CHUNK], pixels)), 0)
                        used = start + int((log_next > log_t_min).sum(0).max())
                        log_t = log_next[-1]
                        if (log_t <= log_t_min).all():
                            break
                    else:
                        used = len(ids)
                ids = ids[:used]
                if ids.numel() == 0:
                    continue
                alpha = alphas(c, ids, pixels)
                log_next = torch.cumsum(torch.log1p(-alpha), 0)  # log of the transmittance after each Gaussian
                log_before = torch.cat([torch.zeros_like(log_next[:1]), log_next[:-1]])
                weights = alpha * torch.exp(log_before) * (log_next > log_t_min).to(alpha.dtype)  # [n, Q]
                block = torch.einsum("nq,nf->fq", weights, features[c, ids])
                out_features[c, :, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = block.reshape(F, len(rows), len(cols))
                out_opacity[c, 0, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = weights.sum(0).reshape(len(rows), len(cols))
    return out_features, out_opacity


def antialias_compensation(conics: torch.Tensor) -> torch.Tensor:
    """gsplat's "antialiased" mode (Mip-Splatting's 2D filter): the opacity factor sqrt(det(Sigma_2D - 0.3 I) /
    det(Sigma_2D)) that keeps a Gaussian's total footprint as the dilation widens it, so one smaller than a pixel
    fades instead of growing to a pixel. conics [C, N, 3] (of the dilated Sigma_2D) -> [C, N]."""
    a, b, c = conics.unbind(-1)
    # 2 x 2: det(S - e I) / det(S) = 1 - e tr(S^-1) + e^2 det(S^-1), with S^-1 the conic
    return (1 - EPS_2D * (a + c) + EPS_2D**2 * (a * c - b * b)).clamp_min(0.0).sqrt()


def rasterize(means: torch.Tensor, quats: torch.Tensor, scales: torch.Tensor, opacities: torch.Tensor, sh: torch.Tensor,
              cameras: Cameras, height: int, width: int, backend: Backend = "auto",
              mode: Literal["classic", "antialiased"] = "classic") -> SplatRender:
    """Render N Gaussians into C cameras.

    means [N, 3], quats [N, 4] (w, x, y, z; normalized here), scales [N, 3] (positive), opacities [N] in (0, 1),
    sh [N, K, 3] spherical-harmonic color coefficients; cameras [C]. backend: "gsplat" (CUDA), "torch" (this module's
    compositing; any device), "auto" (gsplat on CUDA tensors, torch otherwise). mode: gsplat's rasterize_mode,
    "classic" (3DGS) or "antialiased" (opacities times antialias_compensation).
    """
    if mode not in ("classic", "antialiased"):
        raise ValueError(f"rasterize mode {mode!r} is not one of classic, antialiased")
    if backend == "auto":
        backend = "gsplat" if means.is_cuda else "torch"
    if backend == "gsplat" and not means.is_cuda:
        raise ValueError(f"the gsplat rasterizer runs on CUDA only, and the Gaussians are on {means.device}; use "
                         "generator.rasterizer=torch (or auto) on this device")
    if backend not in ("torch", "gsplat"):
        raise ValueError(f"rasterizer {backend!r} is not one of auto, torch, gsplat")
    viewmats, Ks = camera_matrices(cameras, height, width)
    colors = sh_colors(sh, means, viewmats)  # [C, N, 3]
    depth_of = (torch.einsum("cij,nj->cni", viewmats[:, :3, :3], means) + viewmats[:, None, :3, 3])[..., 2]  # tz [C, N]
    features = torch.cat([colors, depth_of.unsqueeze(-1), depth_of.unsqueeze(-1) ** 2], -1)  # [C, N, 5]
    if backend == "gsplat":
        from gsplat import rasterization

        image, alpha, info = rasterization(means, quats, scales, opacities, features, viewmats, Ks, width, height,
                                           near_plane=NEAR, eps2d=EPS_2D, packed=False, rasterize_mode=mode)
        image, opacity = image.permute(0, 3, 1, 2), alpha.permute(0, 3, 1, 2)
        means2d, radii = info["means2d"], info["radii"]
        radii = radii.max(-1).values if radii.dim() == 3 else radii
    else:
        means2d, conics, depths, radii2 = project(means, covariance(quats, scales), viewmats, Ks, height, width)
        if mode == "antialiased":
            opacities = opacities.unsqueeze(0) * antialias_compensation(conics)  # [C, N]
        image, opacity = composite(means2d, conics, depths, radii2, opacities, features, height, width)
        radii = radii2.max(-1).values
    if means2d.requires_grad:
        means2d.retain_grad()
    safe = opacity.clamp_min(1e-8)
    depth = image[:, 3:4] / safe
    z_variance = (image[:, 4:5] / safe - depth**2).clamp_min(0.0)
    empty = opacity <= 1e-8
    return SplatRender(image[:, :3], opacity, depth.masked_fill(empty, 0.0), z_variance.masked_fill(empty, 0.0), means2d, radii)
