"""3D Gaussians of one prompt: what `amortized3d train --prompt P --representation gaussians` optimizes.

Like the per-prompt Instant-NGP field (ngp.py), a representation behind the Generator interface, so the training
loop, checkpoints, `generate` and the evaluations take it as they take the amortized generators. Its parameters
(the ``splats`` ParameterDict, with the names and activations of gsplat and 3DGS):

    means [N, 3]        centers
    scales [N, 3]       log standard deviations along the rotated axes (exp)
    quats [N, 4]        rotations, quaternions (w, x, y, z) (normalized when used)
    opacities [N]       logits of the opacities (sigmoid)
    sh0 [N, 1, 3]       degree-0 color coefficient: rgb = 0.5 + SH_C0 sh0 (clamped at 0)
    shN [N, K - 1, 3]   the higher spherical-harmonic coefficients, K = (sh_degree + 1)^2 (only when sh_degree > 0)

With color_field (as Compact 3D Gaussian Representation for Radiance Field, Lee et al. 2024, reads view-dependent
colors from a grid-based neural field; here the diffuse color) the Gaussians have no sh0 of their own: each one's
diffuse color is read at its center from a field, a hash grid (HashGrid, with the sizes of the section's hash-grid keys
n_levels ... per_level_scale) and a two-layer MLP of width mlp_hidden (``color_grid``, ``color_mlp``; sigmoid, gray at
the start), so neighbouring Gaussians share their colors as a field's neighbouring points do. Under score
distillation's noisy gradients, per-Gaussian colors each follow their own noise (mottled renders); the shared field
averages it. The lookup does not move the Gaussians (their centers enter it detached); exports bake the colors into
sh0 (export_splats).

Initialization (StableDreamer, Sec. 4.3 and Appendix B/C): n_gaussians centers uniform in the ball of radius
sphere_radius, opacity decaying linearly with the distance r from the origin, init_opacity (1 - r / sphere_radius)
(at least 0.01), gray color, isotropic scales from the 3 nearest neighbours (3DGS: the root of their mean squared
distance). The number of Gaussians changes during training (amortized3d/training/densify.py); a checkpoint holds
however many it had, and loading one resizes the parameters to it. The buffers grad2d and count are density
control's running sums, saved with the parameters so a resumed run densifies as the uninterrupted one.

As a field (for meshes, baked grids and the oracle's occupancy) the Gaussians are what their renders show: a solid
carved out of space by carve views (rings of carve_azimuths cameras at the elevations carve_elevations, distance
carve_distance, field of view carve_fovy, carve_resolution^2 pixels: by default rings at the ends and middle of the
training cameras' elevations and at +-POLAR_RING, at the training render size; without the near-polar rings the
underside is seen only at grazing angles, where a render's opacity reaches 0.5 before the surface, and a slab under
every object stays solid), as 3D Gaussians' surfaces are read from their rendered opacity and depth (the opacity
field of Gaussian Opacity Fields, Yu et al. 2024, at its level 0.5, through each view's expected depth):

    s(x) = max over the views v whose image x falls in of  D_v(p) - z_v(x) - w_v(x) / 2   where the pixel p of x is
                                                                                           opaque (> 0.5)
                                                           w_v(x) = z_v(x) / f_v            where it is not
    (x in no view: + bound)

with z_v(x) the depth of x in view v, w_v(x) one pixel's width at that depth and D_v(p) the rendered expected depth of
p. s < 0 (inside) where every view sees x opaque and behind its surface less half a pixel: D is the depth at the
pixel's center, and across the pixel a surface at slope 1 to the view moves by half a pixel's width, so without that
margin points just inside slanted surfaces (the sides of a cone) would be carved away. s is a signed depth (0 on the
surface), read as an SDF (geometry "sdf") for marching cubes and the oracle's occupancy. The color at x is the rendered
color of the view whose surface lies nearest x in depth (the function carve).

Shapes: N Gaussians, P prompts (1 in a per-prompt run), V views, M points.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from amortized3d.generators.common import EnvironmentMap, HashGridConfig
from amortized3d.generators.hash_grid import HashGrid
from amortized3d.generators.ngp import decoder
from amortized3d.rendering.cameras import Cameras, camera_rays, look_at_cameras
from amortized3d.rendering.gaussians import NEAR, SH_C0, SplatRender, camera_matrices, rasterize
from amortized3d.rendering.volume import ImageRender
from amortized3d.schema import Int

MIN_INIT_OPACITY = 0.01
POLAR_RING = 80.0  # the default carve views add rings at +-80 degrees elevation: the top and bottom seen face-on


def splat_names(sh_degree: int, color_field: bool = False) -> list[str]:
    """The splat attributes, in PromptGaussians.splats order (no sh0 with a color field, shN only with sh_degree > 0)."""
    return ["means", "scales", "quats", "opacities", *([] if color_field else ["sh0"]), *(["shN"] if sh_degree > 0 else [])]


def parameter_group_names(sh_degree: int, color_field: bool = False) -> list[str]:
    """The optimizer's groups of PromptGaussians, in build_optimizer's order before the background: the splat
    attributes, then the color field's grid and MLP; each trains at splats.lr_<name>."""
    return splat_names(sh_degree, color_field) + (["color_grid", "color_mlp"] if color_field else [])


class GaussiansConfig(HashGridConfig):
    """The Gaussians' initialization (n_gaussians in the ball of radius sphere_radius, opacity init_opacity at the
    center), their color model (sh_degree; color_field, whose grid and MLP take the hash-grid keys), the rasterizer
    (auto: gsplat on CUDA, this project's PyTorch one elsewhere) and the views that carve their solid (module
    docstring)."""

    n_gaussians: Int = Field(1000, ge=1, le=10_000_000)
    init_opacity: float = Field(0.5, gt=0, lt=1)
    # start from an existing asset instead of the ball: n_gaussians points on the surface of the mesh of run init_from
    # for the prompt init_prompt (null: the run's own prompt), its colors, opacity init_opacity (builders.init_from_run)
    init_from: str | None = None
    init_prompt: str | None = None
    sh_degree: Int = Field(0, ge=0, le=3)
    # each Gaussian's diffuse color read from a hash-grid field at its center (module docstring); false: its own sh0
    color_field: bool = False
    rasterizer: Literal["auto", "torch", "gsplat"] = "auto"
    rasterize_mode: Literal["classic", "antialiased"] = "classic"  # gsplat's; antialiased: Mip-Splatting's 2D filter
    # the carve views (module docstring); null: from the training cameras and renders (builders.build_generator):
    # elevations the ends and middle of camera.elevation_range and +-POLAR_RING, distance the middle of
    # camera.distance_range (its distance at the carve fovy with camera.relative_distance), fovy the widest of
    # camera.fovy_range, resolution the last training render height
    carve_elevations: list[Annotated[float, Field(ge=-90, le=90)]] | None = Field(None, min_length=1)
    carve_distance: float | None = Field(None, gt=0, le=1000)
    carve_fovy: float | None = Field(None, gt=0, lt=180)
    carve_resolution: Int | None = Field(None, ge=8, le=4096)
    carve_azimuths: Int = Field(16, ge=1, le=360)  # cameras per ring, evenly spaced


def nearest_neighbour_scale(points: torch.Tensor, k: int = 3, chunk: int = 4096) -> torch.Tensor:
    """3DGS's initial scale: sqrt of the mean squared distance to the k nearest other points; points [N, 3] -> [N]."""
    out = []
    for start in range(0, len(points), chunk):
        d2 = torch.cdist(points[start : start + chunk], points).pow(2)
        d2[torch.arange(d2.shape[0]), torch.arange(start, start + d2.shape[0])] = float("inf")  # not itself
        out.append(d2.topk(min(k, len(points) - 1), largest=False).values.mean(-1).clamp_min(1e-14).sqrt())
    return torch.cat(out)


class PromptGaussians(nn.Module):
    """One prompt's 3D Gaussians: text [P, D] (unread) -> a GaussianRepresentation; ``config`` is its GaussiansConfig."""

    Config = GaussiansConfig
    z_dim = 0

    def __init__(self, text_dim: int, config: GaussiansConfig):
        super().__init__()
        self.config, self.text_dim = config, text_dim
        N, R = config.n_gaussians, config.sphere_radius
        direction = torch.nn.functional.normalize(torch.randn(N, 3), dim=-1)
        r = R * torch.rand(N).pow(1 / 3)  # uniform in the ball
        means = direction * r.unsqueeze(-1)
        opacity = (config.init_opacity * (1 - r / R)).clamp_min(MIN_INIT_OPACITY)
        scale = nearest_neighbour_scale(means) if N > 1 else torch.full((1,), R)
        K = (config.sh_degree + 1) ** 2
        splats = {"means": means, "scales": scale.log().unsqueeze(-1).repeat(1, 3), "quats": torch.tensor([1.0, 0, 0, 0]).repeat(N, 1),
                  "opacities": torch.logit(opacity), "sh0": torch.zeros(N, 1, 3), "shN": torch.zeros(N, K - 1, 3)}
        self.splats = nn.ParameterDict({name: nn.Parameter(splats[name]) for name in splat_names(config.sh_degree, config.color_field)})
        if config.color_field:
            self.color_grid = HashGrid(**config.grid_sizes())
            self.color_mlp = decoder(self.color_grid.output_dim, config.mlp_hidden, 3)
            nn.init.zeros_(self.color_mlp[-1].weight)  # gray everywhere, as the per-Gaussian colors start
        self.register_buffer("grad2d", torch.zeros(N))  # density control's running sums (training/densify.py)
        self.register_buffer("count", torch.zeros(N))
        self.background = EnvironmentMap()
        self._register_load_state_dict_pre_hook(self._resize_to_checkpoint)

    def _resize_to_checkpoint(self, state_dict, prefix, *args) -> None:
        """Loading a checkpoint with another number of Gaussians: take its sizes (in place, so an optimizer built on
        these parameters keeps them)."""
        for name, tensor in [*(("splats." + k, p) for k, p in self.splats.items()), ("grad2d", self.grad2d), ("count", self.count)]:
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape[0] != tensor.shape[0] and saved.shape[1:] == tensor.shape[1:]:
                tensor.data = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)

    @torch.no_grad()
    def start_from_points(self, points: torch.Tensor, colors: torch.Tensor) -> None:
        """Replace the Gaussians (in place, before training) by isotropic ones at points [N, 3] with colors [N, 3] in
        [0, 1], opacity init_opacity, nearest-neighbour scales, no rotation, no view dependence. With a color field,
        the field is fitted to the colors at the points (fit_color_field)."""
        N = points.shape[0]
        values = {"means": points, "scales": nearest_neighbour_scale(points).log().unsqueeze(-1).repeat(1, 3),
                  "quats": torch.tensor([1.0, 0, 0, 0]).repeat(N, 1), "opacities": torch.full((N,), self.config.init_opacity).logit(),
                  "sh0": ((colors - 0.5) / SH_C0).unsqueeze(1)}
        for name, p in self.splats.items():
            p.data = values.get(name, torch.zeros(N, *p.shape[1:])).to(p)
        self.grad2d.data, self.count.data = torch.zeros(N).to(self.grad2d), torch.zeros(N).to(self.count)
        if self.config.color_field:
            self.fit_color_field(points.to(self.splats["means"]), colors.to(self.splats["means"]))

    def fit_color_field(self, points: torch.Tensor, colors: torch.Tensor, steps: int = 500, lr: float = 1e-2) -> None:
        """Fit the color field to colors [N, 3] in [0, 1] at points [N, 3]: Adam on the mean squared error, ``steps``
        full-batch steps at ``lr``."""
        parameters = [*self.color_grid.parameters(), *self.color_mlp.parameters()]
        optimizer = torch.optim.Adam(parameters, lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                loss = (self.field_colors(points) - colors).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

    def field_colors(self, points: torch.Tensor) -> torch.Tensor:
        """The color field at points [M, 3] -> rgb [M, 3] in (0, 1) (color_field only)."""
        return torch.sigmoid(self.color_mlp(self.color_grid(points)))

    def export_splats(self) -> dict[str, torch.Tensor]:
        """The splat attributes with sh0 (a color field's colors baked in): what a 3DGS .ply holds (detached)."""
        splats = {name: p.detach() for name, p in self.splats.items()}
        return {**splats, "sh0": self.sh()[:, :1].detach()}

    @property
    def n_gaussians(self) -> int:
        return self.splats["means"].shape[0]

    def describe(self) -> dict[str, int]:
        """Sizes for a memory estimate (builders.describe_generator): nothing per prompt or per ray sample."""
        return {"activations_per_prompt": 0, "values_per_sample": 0}

    def geometry_parameters(self) -> list[nn.Parameter]:
        """Every splat attribute and the color field (build_optimizer gives each its own group: parameter_groups)."""
        return [p for params in self.parameter_groups().values() for p in params]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The parameters of each optimizer group of parameter_group_names, by name."""
        groups = {name: [p] for name, p in self.splats.items()}
        if self.config.color_field:
            groups.update(color_grid=list(self.color_grid.parameters()), color_mlp=list(self.color_mlp.parameters()))
        return groups

    def decoder_parameters(self) -> list[nn.Parameter]:
        return []

    def background_parameters(self) -> list[nn.Parameter]:
        return list(self.background.parameters())

    def sh(self) -> torch.Tensor:
        """The color coefficients [N, K, 3] (with a color field, sh0 = (rgb - 0.5) / SH_C0 of its color at each center)."""
        if self.config.color_field:
            sh0 = ((self.field_colors(self.splats["means"].detach()) - 0.5) / SH_C0).unsqueeze(1)
        else:
            sh0 = self.splats["sh0"]
        return torch.cat([sh0, self.splats["shN"]], 1) if "shN" in self.splats else sh0

    def forward(self, text_pooled: torch.Tensor, text_tokens: torch.Tensor | None = None,
                z: torch.Tensor | None = None) -> "GaussianRepresentation":
        """text_pooled [P, D] (only P is read) -> the Gaussians, answered for each of the P rows."""
        if text_pooled.dim() != 2:
            raise ValueError(f"text_pooled must have shape [P, D], got {tuple(text_pooled.shape)}")
        return GaussianRepresentation(self, text_pooled.shape[0])


class GaussianRepresentation:
    """The Gaussians of a PromptGaussians as an amortized3d.interfaces.Representation (for P rows, all the same
    asset): rasterized (amortized3d.rendering.gaussians) over the environment-map background, and the solid their
    carve views show (module docstring; geometry "sdf") for meshes, baked grids and occupancy."""

    geometry = "sdf"

    def __init__(self, model: PromptGaussians, n_prompts: int):
        self.model, self.n_prompts = model, n_prompts
        self._carve = None

    def render(self, cameras: Cameras, height: int, width: int, settings=None, *, generator: torch.Generator | None = None,
               background: tuple[torch.Tensor, torch.Tensor] | None = None, chunk_rays: int | None = None) -> ImageRender:
        """cameras [P, V] -> ImageRender (rgb [P, V, 3, H, W] over the background, opacity, depth, z_variance
        [P, V, 1, H, W]; splats: the SplatRender of all P V cameras, whose means2d gradient density control reads).
        settings, generator and chunk_rays are the volume renderer's and unused; background (colors [P, 3], mask
        bool [P]): a solid background color for the masked prompts."""
        P, V = cameras.shape
        s = self.model.splats
        start = time.perf_counter()
        out = rasterize(s["means"], s["quats"], s["scales"].exp(), torch.sigmoid(s["opacities"]), self.model.sh(),
                        cameras.reshape(P * V), height, width, self.model.config.rasterizer, self.model.config.rasterize_mode)
        out.seconds = time.perf_counter() - start  # the rasterizer's time (CUDA: its launch, not its kernels)
        _, dirs = camera_rays(cameras, height, width)  # [P, V, H W, 3]
        bg = self.model.background(dirs.reshape(P, V * height * width, 3)).reshape(P, V, height, width, 3)
        if background is not None:
            colors, mask = background
            bg = torch.where(mask.reshape(P, 1, 1, 1, 1), colors.reshape(P, 1, 1, 1, 3).to(bg.dtype), bg)
        shape = (P, V, 1, height, width)
        opacity = out.opacity.reshape(shape)
        rgb = out.rgb.reshape(P, V, 3, height, width) + (1 - opacity) * bg.permute(0, 1, 4, 2, 3)
        return ImageRender(rgb, opacity, out.depth.reshape(shape), out.z_variance.reshape(shape), None, splats=out)

    def regularizers(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gaussians have no regularizer of their own."""
        return {}

    def carve_cameras(self) -> Cameras:
        """The carve views: a ring of A = carve_azimuths cameras per carve elevation, 360 / A degrees apart (each ring
        turned by 360 / (A rings) degrees), at carve_distance with carve_fovy, looking at the origin.
        -> Cameras [len(elevations) A]."""
        cfg = self.model.config
        if None in (cfg.carve_elevations, cfg.carve_distance, cfg.carve_fovy, cfg.carve_resolution):
            raise ValueError("the carve views are not set: build the Gaussians with builders.build_generator, which takes "
                             "them from the training cameras, or set generator.carve_elevations, carve_distance, "
                             "carve_fovy and carve_resolution")
        rings, A = len(cfg.carve_elevations), cfg.carve_azimuths
        elevation = torch.tensor(cfg.carve_elevations, dtype=torch.float32).repeat_interleave(A)
        azimuth = -180.0 + (360.0 / A) * torch.arange(A).repeat(rings) + (360.0 / A / rings) * torch.arange(rings).repeat_interleave(A)
        return look_at_cameras(elevation, azimuth, torch.tensor(cfg.carve_distance), torch.tensor(cfg.carve_fovy))

    @torch.no_grad()
    def carve_views(self) -> tuple[Cameras, SplatRender]:
        """The carve cameras and their renders at carve_resolution^2 (rendered once per representation)."""
        if self._carve is None:
            s, R = self.model.splats, self.model.config.carve_resolution
            cams = self.carve_cameras().to(s["means"].device)
            out = rasterize(s["means"], s["quats"], s["scales"].exp(), torch.sigmoid(s["opacities"]), self.model.sh(), cams, R, R,
                            self.model.config.rasterizer, self.model.config.rasterize_mode)
            self._carve = (cams, out)
        return self._carve

    @torch.no_grad()
    def sdf_and_color(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points [P, M, 3] -> (s [P, M], rgb [P, M, 3]): the carved signed depth (module docstring) and the color of
        the view whose surface lies nearest in depth (0 where no view sees x opaque)."""
        cams, out = self.carve_views()
        P, M, _ = points.shape
        value, color = carve(points.reshape(P * M, 3), cams, out.opacity, out.depth, out.rgb, self.model.config.bound)
        return value.reshape(P, M).to(points.dtype), color.reshape(P, M, 3).to(points.dtype)

    def sdf(self, points: torch.Tensor) -> torch.Tensor:
        """points [P, M, 3] -> s [P, M]."""
        return self.sdf_and_color(points)[0]

    def background(self, directions: torch.Tensor) -> torch.Tensor:
        """Unit directions [P, R, 3] -> rgb [P, R, 3]."""
        return self.model.background(directions)

    def occupancy(self, points: torch.Tensor) -> torch.Tensor:
        """Inside the carved solid: points [P, M, 3] -> bool [P, M] (s < 0)."""
        return self.sdf(points) < 0


def carve(points: torch.Tensor, cameras: Cameras, opacity: torch.Tensor, depth: torch.Tensor, rgb: torch.Tensor,
          outside: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The solid that C square views show (module docstring): points [M, 3], cameras [C], their renders' opacity and
    expected camera depth [C, 1, R, R] and color premultiplied by the opacity [C, 3, R, R] -> (s [M], rgb [M, 3]): the
    signed depth (``outside`` where no view holds x) and the color of the view whose surface lies nearest x in depth."""
    R = opacity.shape[-1]
    viewmats, Ks = camera_matrices(cameras, R, R)  # [C, 4, 4], [C, 3, 3]
    x = points.to(viewmats.dtype)
    cam = torch.einsum("cij,mj->cmi", viewmats[:, :3, :3], x) + viewmats[:, None, :3, 3]  # [C, M, 3]
    z = cam[..., 2]
    zs = z.clamp_min(NEAR)
    u = Ks[:, None, 0, 0] * cam[..., 0] / zs + Ks[:, None, 0, 2]  # pixel coordinates, [C, M]
    v = Ks[:, None, 1, 1] * cam[..., 1] / zs + Ks[:, None, 1, 2]
    seen = (z > NEAR) & (u >= 0) & (u < R) & (v >= 0) & (v < R)
    pixel = v.floor().long().clamp(0, R - 1) * R + u.floor().long().clamp(0, R - 1)  # [C, M]
    alpha = opacity.flatten(1).gather(1, pixel)
    surface = depth.flatten(1).gather(1, pixel)
    opaque = alpha > 0.5
    pixel_width = zs / Ks[:, None, 1, 1]  # at x's depth
    per_view = torch.where(opaque, surface - z - 0.5 * pixel_width, pixel_width)
    per_view = torch.where(seen, per_view, torch.full_like(per_view, -float("inf")))
    value = per_view.max(0).values
    value = torch.where(torch.isinf(value), torch.full_like(value, outside), value)
    gap = torch.where(seen & opaque, (surface - z).abs(), torch.full_like(z, float("inf")))
    best = gap.argmin(0)  # [M]
    colors = rgb.flatten(2).permute(0, 2, 1)  # [C, R R, 3]
    at = pixel.gather(0, best.unsqueeze(0))[0]
    color = colors[best, at] / opacity.flatten(1)[best, at].clamp_min(1e-8).unsqueeze(-1)
    color = torch.where(torch.isinf(gap.min(0).values).unsqueeze(-1), torch.zeros_like(color), color.clamp(0, 1))
    return value, color
