"""Volume rendering of SDF fields: VolSDF density, two-pass sampling, compositing.

Each ray r of prompt p is cut into intervals [t_k, t_{k+1}] between near and far.
A proposal pass (no gradient) evaluates the field at the midpoints of a uniform
(optionally stratified) partition; importance positions are then drawn by inverse
CDF of the proposal weights, and the sorted union of both sets of edges is
rendered with gradient. Rays of prompt p are only ever evaluated against prompt p
of the field.

Shapes: P prompts, R rays per prompt, S intervals (samples) per ray, V views.
Directions are unit vectors, so t is a distance along the ray.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import nerfacc
import torch

from amortized3d.fields import Field, finite_difference_gradient, values_and_color
from amortized3d.rendering.cameras import Cameras, camera_rays

PDF_FLOOR = 1e-5  # added to every proposal weight so empty or missed rays fall back to uniform sampling


@dataclass
class RayRender:
    """Per-ray renders of P prompts with R rays each and S samples per ray.

    rgb [P, R, 3] composited over the background (C channels for a field with latent colors); opacity [P, R] = sum w;
    depth [P, R] = sum w t (background counts as depth 0); depth_normalized [P, R] = depth / opacity;
    z_variance [P, R] = sum w (t - depth_normalized)^2 / opacity; normal [P, R, 3] = sum w n (or None);
    weights [P, R, S]; t_mid [P, R, S] sample positions (interval midpoints);
    sdf_grad [P, R, S, 3] raw finite-difference SDF gradients at the samples (or None).
    """

    rgb: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    z_variance: torch.Tensor
    normal: torch.Tensor | None
    weights: torch.Tensor
    t_mid: torch.Tensor
    sdf_grad: torch.Tensor | None
    depth_normalized: torch.Tensor


@dataclass
class ImageRender:
    """Images of P prompts seen from V cameras each, H x W pixels.

    rgb [P, V, 3, H, W] (a field with latent colors, render.latents: its C channels of the prior's latents); opacity,
    depth, z_variance [P, V, 1, H, W]; normal [P, V, 3, H, W] or None.
    The per-sample tensors (weights, t_mid, sdf_grad) are not kept: render_rays returns them. splats: the rasterizer's
    output when 3D Gaussians drew the images (amortized3d.rendering.gaussians.SplatRender, for density control), else None.
    """

    rgb: torch.Tensor
    opacity: torch.Tensor
    depth: torch.Tensor
    z_variance: torch.Tensor
    normal: torch.Tensor | None
    splats: object | None = None


# ----------------------------------------------------------------------------- pure math


def volsdf_density(sdf: torch.Tensor, inv_std: float = 30.0) -> torch.Tensor:
    """VolSDF density sigma = s * Psi_s(-sdf), Psi_s the Laplace CDF with scale 1/s.

    sigma = s * 0.5 exp(-s sdf) if sdf > 0 else s * (1 - 0.5 exp(s sdf)); only exp(-s |sdf|) is formed.
    sdf [...] -> sigma [...].
    """
    half_tail = 0.5 * torch.exp(-inv_std * sdf.abs())
    return inv_std * torch.where(sdf > 0, half_tail, 1.0 - half_tail)


def ray_sphere_near_far(
    origins: torch.Tensor, dirs: torch.Tensor, radius: float, min_near: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry and exit distances of rays through the origin-centered sphere |x| = radius.

    Roots of |o + t d|^2 = radius^2, clamped to t >= min_near; rays that miss (or whose
    sphere lies behind min_near) get near == far, a zero-length segment that renders nothing.
    origins [P, R, 3], dirs [P, R, 3] -> near [P, R], far [P, R].
    """
    a = (dirs * dirs).sum(-1)
    b = (origins * dirs).sum(-1)
    c = (origins * origins).sum(-1) - radius * radius
    half_chord = (b * b - a * c).clamp_min(0.0).sqrt()
    near = ((-b - half_chord) / a).clamp_min(min_near)
    far = torch.maximum((-b + half_chord) / a, near)
    return near, far


def uniform_edges(near: torch.Tensor, far: torch.Tensor, n_intervals: int, jitter: torch.Tensor | None = None) -> torch.Tensor:
    """Edges of n_intervals equal intervals from near to far, interior edges optionally jittered.

    frac_k = k / n (k = 0..n); with jitter u_k in [0, 1): frac_k = (k + u_k - 0.5) / n for 0 < k < n (still sorted).
    near, far [P, R]; jitter [P, R, n - 1] or None -> edges [P, R, n + 1].
    """
    frac = torch.linspace(0.0, 1.0, n_intervals + 1, dtype=near.dtype, device=near.device)
    if jitter is not None:
        interior = frac[1:-1] + (jitter - 0.5) / n_intervals
        frac = torch.cat([frac[:1].expand_as(jitter[..., :1]), interior, frac[-1:].expand_as(jitter[..., :1])], -1)
    return torch.lerp(near.unsqueeze(-1), far.unsqueeze(-1), frac)


def sample_from_pdf(edges: torch.Tensor, weights: torch.Tensor, n_samples: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse-CDF samples of the piecewise-constant pdf with mass weights_k on [edges_k, edges_{k+1}].

    u_j = (j + bias) / n (bias 0.5, or one value in [0, 1) per ray), t_j = CDF^{-1}(u_j) by linear interpolation.
    edges [..., B + 1], weights [..., B] (>= 0, not all 0), bias [..., 1] or None -> t [..., n_samples] sorted.
    """
    cdf = torch.cumsum(weights, -1)
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf / cdf[..., -1:]], -1)  # [..., B + 1]
    steps = torch.arange(n_samples, dtype=edges.dtype, device=edges.device)
    u = (steps + (0.5 if bias is None else bias)) / n_samples
    u = u.expand(*edges.shape[:-1], n_samples).contiguous()
    upper = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[-1] - 1)
    lower = upper - 1
    cdf_lo, cdf_hi = cdf.gather(-1, lower), cdf.gather(-1, upper)
    t_lo, t_hi = edges.gather(-1, lower), edges.gather(-1, upper)
    fraction = ((u - cdf_lo) / (cdf_hi - cdf_lo).clamp_min(1e-10)).clamp(0.0, 1.0)
    return t_lo + fraction * (t_hi - t_lo)


@functools.cache
def nerfacc_cuda_available() -> bool:
    """Whether nerfacc's compiled CUDA kernels load (nerfacc builds them on first use with the CUDA toolkit's nvcc).

    When they cannot (no nvcc, or a build error), CUDA tensors take the same pure-torch paths as CPU tensors
    (sample_from_pdf, the torch ray-box test): the same results, slower; a warning says why, once per process.
    """
    try:
        from nerfacc.cuda._backend import _C
    except Exception as err:  # noqa: BLE001 - any build or import failure means: not available
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
    else:
        if _C is not None:
            return True
        reason = "no CUDA toolkit (nvcc) found to build them"
    warnings.warn(f"nerfacc's CUDA kernels are unavailable ({reason}); CUDA tensors use the pure-torch sampling and "
                  "ray-box paths instead (same results, slower). To build them, install the CUDA toolkit whose version "
                  "matches torch.version.cuda and put its nvcc on PATH.", stacklevel=2)
    return False


def _sample_from_pdf_nerfacc(edges: torch.Tensor, weights: torch.Tensor, n_samples: int, stratified: bool) -> torch.Tensor:
    """CUDA twin of sample_from_pdf via nerfacc.importance_sampling (same u_j, same interpolation).

    Its stratified bias is drawn from the default CUDA generator, not ours.
    edges [..., B + 1], weights [..., B] -> t [..., n_samples].
    """
    lead = edges.shape[:-1]
    cdf = torch.cumsum(weights, -1)
    cdf = torch.cat([torch.zeros_like(cdf[..., :1]), cdf / cdf[..., -1:]], -1)
    intervals = nerfacc.RayIntervals(vals=edges.reshape(-1, edges.shape[-1]).float().contiguous())
    _, samples = nerfacc.importance_sampling(intervals, cdf.reshape(-1, cdf.shape[-1]).float().contiguous(), n_samples, stratified)
    return samples.vals.reshape(*lead, n_samples).to(edges.dtype)


def smooth_weights(weights: torch.Tensor, kernel: tuple[float, ...]) -> torch.Tensor:
    """HiFA's kernel smoothing of the coarse weights before importance sampling (Sec. 4.2): the centered weighted
    moving average v_i <- sum_j K_j v_{i + j - N // 2} / sum_j K_j (j = 0..N-1) with zeros past the ray's ends (HiFA's
    code wraps around the ray instead, torch.roll; mass at one end then leaks to the other).

    weights [..., S], kernel of odd length N (HiFA: (1, 1, 1)) -> [..., S]; () returns weights unchanged."""
    if not kernel:
        return weights
    if len(kernel) % 2 == 0:
        raise ValueError(f"importance kernel {tuple(kernel)} must have an odd length (centered), e.g. (1, 1, 1)")
    k = torch.tensor(kernel, dtype=weights.dtype, device=weights.device)
    lead, S = weights.shape[:-1], weights.shape[-1]
    out = torch.nn.functional.conv1d(weights.reshape(-1, 1, S), (k / k.sum()).view(1, 1, -1), padding=len(kernel) // 2)
    return out.reshape(*lead, S)


def composite_weights(t_starts: torch.Tensor, t_ends: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """w_i = T_i (1 - exp(-sigma_i delta_i)), T_i = exp(-sum_{j<i} sigma_j delta_j) = prod_{j<i} (1 - alpha_j).

    t_starts, t_ends, sigmas [P, R, S] -> weights [P, R, S].
    """
    weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, sigmas)
    return weights


def z_variance(weights: torch.Tensor, t_mid: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """HiFA Eq. 6-7: mu = sum w t / sum w, var = sum w (t - mu)^2 / sum w.

    weights, t_mid [P, R, S] -> (mu [P, R], var [P, R]); 0 where sum w is 0.
    """
    opacity = weights.sum(-1)
    safe = opacity.clamp_min(eps)
    mu = (weights * t_mid).sum(-1) / safe
    var = (weights * (t_mid - mu.unsqueeze(-1)).square()).sum(-1) / safe
    return mu, var


# ----------------------------------------------------------------------------- ray rendering


def _points(origins: torch.Tensor, dirs: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x = o + t d. origins, dirs [P, R, 3], t [P, R, S] -> points [P, R*S, 3]."""
    P, R, S = t.shape
    return (origins.unsqueeze(2) + t.unsqueeze(-1) * dirs.unsqueeze(2)).reshape(P, R * S, 3)


GEOMETRIES = ("sdf", "density")


def field_density(field, points: torch.Tensor, inv_std: float, geometry: str = "sdf") -> torch.Tensor:
    """Volume density sigma [P, N] at points [P, N, 3]: VolSDF of an SDF field (geometry "sdf"), or a density field's
    own (geometry "density": amortized3d.fields.DensityField)."""
    if geometry == "density":
        return field.density(points)
    return volsdf_density(field.sdf(points), inv_std)


@torch.no_grad()
def proposal_weights(field, origins, dirs, near, far, n_proposal: int, inv_std: float, proposal_jitter=None, geometry: str = "sdf"):
    """The proposal pass: geometry only, at the midpoints of n_proposal (optionally jittered) intervals, no gradient.

    origins, dirs [P, R, 3], near, far [P, R] -> (edges [P, R, n_proposal + 1], weights [P, R, n_proposal]).
    """
    edges = uniform_edges(near, far, n_proposal, proposal_jitter)
    mids = 0.5 * (edges[..., 1:] + edges[..., :-1])
    sigma = field_density(field, _points(origins, dirs, mids), inv_std, geometry).reshape(mids.shape)
    return edges, composite_weights(edges[..., :-1], edges[..., 1:], sigma)


def _importance_positions(field, origins, dirs, near, far, n_proposal, n_importance, inv_std, proposal_jitter, importance_bias,
                          kernel=(), geometry="sdf"):
    """Proposal edges plus importance positions, sorted: [P, R, n_proposal + n_importance + 1], no gradient; the proposal
    weights are smoothed with ``kernel`` first (smooth_weights)."""
    with torch.no_grad():
        if n_importance == 0:
            return uniform_edges(near, far, n_proposal, proposal_jitter)
        edges, weights = proposal_weights(field, origins, dirs, near, far, n_proposal, inv_std, proposal_jitter, geometry)
        weights = smooth_weights(weights, kernel) + PDF_FLOOR
        if edges.is_cuda and nerfacc_cuda_available():
            extra = _sample_from_pdf_nerfacc(edges, weights, n_importance, stratified=importance_bias is not None)
        else:
            extra = sample_from_pdf(edges, weights, n_importance, importance_bias)
        return torch.sort(torch.cat([edges, extra], -1), -1).values


def _render_rays_with_noise(field, origins, dirs, near, far, n_proposal, n_importance, inv_std, proposal_jitter, importance_bias, with_normals,
                            importance_kernel=(), geometry="sdf") -> RayRender:
    """render_rays with its random numbers given: proposal_jitter [P, R, n_proposal - 1], importance_bias [P, R, 1] or None."""
    if n_proposal < 1 or n_importance < 0:
        raise ValueError(f"n_proposal={n_proposal}, n_importance={n_importance}: need n_proposal >= 1 and n_importance >= 0")
    if geometry not in GEOMETRIES:
        raise ValueError(f"geometry={geometry!r}: a field is an 'sdf' or a 'density' field")
    P, R, _ = origins.shape
    edges = _importance_positions(field, origins, dirs, near, far, n_proposal, n_importance, inv_std, proposal_jitter, importance_bias,
                                  importance_kernel, geometry)
    t_starts, t_ends = edges[..., :-1], edges[..., 1:]
    t_mid = 0.5 * (t_starts + t_ends)  # [P, R, S]
    S = t_mid.shape[-1]
    points = _points(origins, dirs, t_mid)
    values, color = values_and_color(field, points, geometry)  # sdf or density
    sigma = values if geometry == "density" else volsdf_density(values, inv_std)
    weights = composite_weights(t_starts, t_ends, sigma.reshape(P, R, S))
    opacity = weights.sum(-1)
    rgb = nerfacc.accumulate_along_rays(weights, color.reshape(P, R, S, color.shape[-1])) + field.background(dirs) * (1.0 - opacity).unsqueeze(-1)
    depth = (weights * t_mid).sum(-1)
    depth_normalized, variance = z_variance(weights, t_mid)
    normal = sdf_grad = None
    if with_normals:
        if geometry == "density":  # outward: down the density, -grad sigma
            outward = -finite_difference_gradient(field.density, points, values, eps=0.01)
        else:
            sdf_grad = finite_difference_gradient(field.sdf, points, values, eps=0.01).reshape(P, R, S, 3)
            outward = sdf_grad
        unit = outward / outward.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        normal = nerfacc.accumulate_along_rays(weights, unit.reshape(P, R, S, 3))
    return RayRender(rgb, opacity, depth, variance, normal, weights, t_mid, sdf_grad, depth_normalized)


def _draw_noise(generator, P, R, n_proposal, dtype, device):
    """Stratification noise for all rays at once: (proposal_jitter [P, R, n_proposal-1], importance_bias [P, R, 1]) or Nones."""
    if generator is None:
        return None, None
    noise = torch.rand(P, R, n_proposal, generator=generator, dtype=dtype, device=generator.device)
    noise = noise.to(device)
    return noise[..., :-1], noise[..., -1:]


def render_rays(
    field: Field,
    origins: torch.Tensor,
    dirs: torch.Tensor,
    near: torch.Tensor,
    far: torch.Tensor,
    *,
    n_proposal: int = 128,
    n_importance: int = 64,
    inv_std: float = 30.0,
    generator: torch.Generator | None = None,
    with_normals: bool = False,
    importance_kernel: tuple[float, ...] = (),
    geometry: str = "sdf",
) -> RayRender:
    """Render R rays per prompt: S = n_proposal + n_importance samples each.

    rgb = sum w c + bg (1 - sum w); without a generator the sampling is deterministic (bin centers).
    with_normals also returns the composited unit normals and the raw SDF gradients (eikonal term).
    importance_kernel: HiFA's kernel smoothing of the proposal weights before importance sampling (smooth_weights).
    geometry: "sdf" (an amortized3d.fields.Field, VolSDF density with inv_std) or "density" (a DensityField's own
    density; inv_std unused; normals -grad sigma; no sdf_grad).
    origins, dirs [P, R, 3] (dirs unit), near, far [P, R] -> RayRender.
    """
    P, R, _ = origins.shape
    jitter, bias = _draw_noise(generator, P, R, n_proposal, origins.dtype, origins.device)
    return _render_rays_with_noise(field, origins, dirs, near, far, n_proposal, n_importance, inv_std, jitter, bias, with_normals,
                                   importance_kernel, geometry)


def rays_per_chunk(n_proposal: int, n_importance: int, points: int = 2**18) -> int:
    """render_images' chunk_rays so that one chunk evaluates about ``points`` field samples (bounded memory);
    with normals, the finite-difference gradient queries three times as many on top."""
    return max(1, points // (n_proposal + n_importance + 1))


def render_images(
    field: Field,
    cameras: Cameras,
    height: int,
    width: int,
    *,
    scene_radius: float,
    n_proposal: int = 128,
    n_importance: int = 64,
    inv_std: float = 30.0,
    generator: torch.Generator | None = None,
    with_normals: bool = False,
    chunk_rays: int | None = None,
    importance_kernel: tuple[float, ...] = (),
    geometry: str = "sdf",
) -> ImageRender:
    """Render V views of each of P prompts; near/far from the sphere of radius scene_radius.

    The V views of prompt p form its R = V*H*W rays. chunk_rays is the number of rays rendered at
    once over all P prompts: [P, max(1, chunk_rays // P)] slices of the ray axis are rendered in
    turn (same random numbers, identical results), so the field's working memory per chunk does
    not grow with P (at least one ray per prompt). Only the per-ray outputs are kept; under
    torch.no_grad memory then grows with P x R, not with the samples. importance_kernel, geometry: as render_rays.
    cameras [P, V] -> ImageRender.
    """
    if cameras.c2w.dim() != 4:
        raise ValueError(f"cameras must have shape [P, V], got {tuple(cameras.shape)}; reshape with cameras.reshape(P, V)")
    if chunk_rays is not None and chunk_rays < 1:
        raise ValueError(f"chunk_rays={chunk_rays}: use None (all rays at once) or a positive integer")
    P, V = cameras.shape
    origins, dirs = camera_rays(cameras, height, width)  # [P, V, H*W, 3]
    origins, dirs = origins.reshape(P, V * height * width, 3), dirs.reshape(P, V * height * width, 3)
    near, far = ray_sphere_near_far(origins, dirs, scene_radius)
    R = origins.shape[1]
    jitter, bias = _draw_noise(generator, P, R, n_proposal, origins.dtype, origins.device)
    step = R if chunk_rays is None else max(1, chunk_rays // P)
    parts = []  # per chunk, only the per-ray outputs (with no autograd graph, nothing per sample outlives its chunk)
    for start in range(0, R, step):
        rays = slice(start, start + step)
        out = _render_rays_with_noise(
            field, origins[:, rays], dirs[:, rays], near[:, rays], far[:, rays], n_proposal, n_importance, inv_std,
            None if jitter is None else jitter[:, rays], None if bias is None else bias[:, rays], with_normals, importance_kernel,
            geometry,
        )
        parts.append((out.rgb, out.opacity.unsqueeze(-1), out.depth.unsqueeze(-1), out.z_variance.unsqueeze(-1), out.normal))

    def image(i: int) -> torch.Tensor | None:  # the chunks' i-th output [P, r, C] -> [P, V, C, H, W]
        if parts[0][i] is None:
            return None
        x = torch.cat([part[i] for part in parts], dim=1) if len(parts) > 1 else parts[0][i]
        return x.reshape(P, V, height, width, x.shape[-1]).permute(0, 1, 4, 2, 3)

    return ImageRender(rgb=image(0), opacity=image(1), depth=image(2), z_variance=image(3), normal=image(4))


class SolidBackground:
    """A field (SDF or density) whose background is a solid color for the prompts in ``mask``.

    field: Field for P prompts; colors [P, 3]; mask bool [P].
    """

    def __init__(self, field: Field, colors: torch.Tensor, mask: torch.Tensor):
        self.field, self.colors, self.mask = field, colors, mask

    def sdf(self, points):
        return self.field.sdf(points)

    def sdf_and_color(self, points):
        return self.field.sdf_and_color(points)

    def density(self, points):
        return self.field.density(points)

    def density_and_color(self, points):
        return self.field.density_and_color(points)

    def background(self, directions):
        learned = self.field.background(directions)
        solid = self.colors.unsqueeze(1).expand_as(learned).to(learned.dtype)
        return torch.where(self.mask.reshape(-1, 1, 1), solid, learned)


class SDFRepresentation:
    """A signed-distance Field (sdf, sdf_and_color, background) as an amortized3d.interfaces.Representation:
    drawn by this module's volume renderer, regularized by the eikonal term. The generators' field classes
    take it as their base."""

    geometry = "sdf"

    def render(self, cameras: Cameras, height: int, width: int, settings, *, generator: torch.Generator | None = None,
               background: tuple[torch.Tensor, torch.Tensor] | None = None, chunk_rays: int | None = None) -> ImageRender:
        """render_images of this field with the renderer settings of ``settings`` (the config's render section,
        RenderConfig.volume_kwargs); background (colors [P, 3], mask bool [P]): a solid color for the masked
        prompts (SolidBackground)."""
        field = self if background is None else SolidBackground(self, *background)
        return render_images(field, cameras, height, width, **settings.volume_kwargs(), generator=generator, chunk_rays=chunk_rays,
                             geometry=self.geometry)

    def regularizers(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        """points [P, N, 3] -> {"eikonal": mean (|grad sdf| - 1)^2} (amortized3d.distillation.regularizers)."""
        from amortized3d.distillation.regularizers import eikonal_loss

        return {"eikonal": eikonal_loss(finite_difference_gradient(self.sdf, points, self.sdf(points)))}

    def occupancy(self, points: torch.Tensor) -> torch.Tensor:
        """Inside the surface: points [P, N, 3] -> bool [P, N] (sdf < 0)."""
        return self.sdf(points) < 0


class DensityRepresentation(SDFRepresentation):
    """A density field (density, density_and_color, background: amortized3d.fields.DensityField) as a Representation:
    rendered with its own density (no VolSDF), no eikonal term, inside where the density exceeds ``iso_density``
    (the level its meshes are extracted at)."""

    geometry = "density"
    iso_density: float

    def regularizers(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        """A density field has no regularizer of its own (the eikonal term needs a distance)."""
        return {}

    def occupancy(self, points: torch.Tensor) -> torch.Tensor:
        """Inside the surface: points [P, N, 3] -> bool [P, N] (density > iso_density)."""
        return self.density(points) > self.iso_density
