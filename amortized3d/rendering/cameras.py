"""Cameras: training-time sampling, evaluation orbits, and per-pixel rays.

World frame is z-up; the object sits at the origin. Cameras follow the OpenGL
convention (the camera looks down its -z axis, y is up in the image). A camera at
elevation e, azimuth a and distance d is at

    position = d * (cos e cos a, cos e sin a, sin e)

looking at the origin. Azimuth 0 is the front view (+x), in degrees in [-180, 180).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Cameras:
    """A batch of pinhole cameras with any leading shape S (e.g. [P, V]).

    c2w [*S, 4, 4] camera-to-world; fovy [*S] radians (vertical field of view);
    elevation, azimuth [*S] degrees; distance [*S] world units.
    """

    c2w: torch.Tensor
    fovy: torch.Tensor
    elevation: torch.Tensor
    azimuth: torch.Tensor
    distance: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.fovy.shape

    def reshape(self, *shape: int) -> "Cameras":
        return Cameras(
            self.c2w.reshape(*shape, 4, 4),
            self.fovy.reshape(*shape),
            self.elevation.reshape(*shape),
            self.azimuth.reshape(*shape),
            self.distance.reshape(*shape),
        )

    def __getitem__(self, index) -> "Cameras":
        return Cameras(self.c2w[index], self.fovy[index], self.elevation[index], self.azimuth[index], self.distance[index])

    def to(self, device) -> "Cameras":
        return Cameras(*(t.to(device) for t in (self.c2w, self.fovy, self.elevation, self.azimuth, self.distance)))

    @staticmethod
    def cat(cameras: list["Cameras"], dim: int = 0) -> "Cameras":
        return Cameras(
            torch.cat([c.c2w for c in cameras], dim),
            torch.cat([c.fovy for c in cameras], dim),
            torch.cat([c.elevation for c in cameras], dim),
            torch.cat([c.azimuth for c in cameras], dim),
            torch.cat([c.distance for c in cameras], dim),
        )


def look_at_cameras(elevation_deg: torch.Tensor, azimuth_deg: torch.Tensor, distance: torch.Tensor, fovy_deg: torch.Tensor) -> Cameras:
    """Cameras on spheres around the origin, looking at it, z-up. All inputs [*S]."""
    elevation_deg, azimuth_deg, distance, fovy_deg = torch.broadcast_tensors(elevation_deg, azimuth_deg, distance, fovy_deg)
    el, az = torch.deg2rad(elevation_deg), torch.deg2rad(azimuth_deg)
    position = distance.unsqueeze(-1) * torch.stack([el.cos() * az.cos(), el.cos() * az.sin(), el.sin()], -1)
    forward = -position / position.norm(dim=-1, keepdim=True)
    up = torch.tensor([0.0, 0.0, 1.0], dtype=position.dtype, device=position.device).expand_as(forward)
    right = torch.linalg.cross(forward, up)
    # Straight overhead or below: any horizontal right vector is fine; pick one from the azimuth.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    fallback = torch.stack([-az.sin(), az.cos(), torch.zeros_like(az)], -1)
    right = torch.where(degenerate, fallback, right)
    right = right / right.norm(dim=-1, keepdim=True)
    true_up = torch.linalg.cross(right, forward)
    c2w = torch.zeros(*position.shape[:-1], 4, 4, dtype=position.dtype, device=position.device)
    c2w[..., :3, 0] = right
    c2w[..., :3, 1] = true_up
    c2w[..., :3, 2] = -forward
    c2w[..., :3, 3] = position
    c2w[..., 3, 3] = 1.0
    wrapped_azimuth = torch.remainder(azimuth_deg + 180.0, 360.0) - 180.0
    return Cameras(c2w, torch.deg2rad(fovy_deg), elevation_deg, wrapped_azimuth, distance)


def sample_training_cameras(
    n_prompts: int,
    n_views: int,
    elevation_range: tuple[float, float],
    distance_range: tuple[float, float],
    fovy_range: tuple[float, float],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    *,
    group_views: bool = False,
    relative_distance: bool = False,
) -> Cameras:
    """Random training cameras, shape [n_prompts, n_views].

    Elevation: half the cameras uniform in angle, half uniform on the sphere
    (sin(elevation) uniform) within ``elevation_range`` degrees. Azimuth:
    stratified over all n_prompts * n_views cameras so every batch covers 360
    degrees. Distance and fovy (degrees): uniform in their ranges.

    group_views (multi-view priors: MVDream's and the reference's multi-view sampler): the views of each prompt are
    one object's orbit, azimuths -180 + 360 (u + k) / n_views (k = 0..n_views-1, one u ~ U(0, 1) per prompt), with one
    elevation, distance and fovy per prompt. relative_distance: distance = U(distance_range) / tan(fovy / 2), so the
    object fills the same part of the image at every field of view.
    """
    n = n_prompts * n_views
    draws = n_prompts if group_views else n  # one elevation, distance and fovy per prompt, or per camera

    def uniform(low: float, high: float, size: int = draws) -> torch.Tensor:
        return low + (high - low) * torch.rand(size, generator=generator)

    el_lo, el_hi = elevation_range
    by_angle = uniform(el_lo, el_hi)
    s = uniform(math.sin(math.radians(el_lo)), math.sin(math.radians(el_hi)))
    by_area = torch.rad2deg(torch.asin(s.clamp(-1.0, 1.0)))
    elevation = torch.where(torch.rand(draws, generator=generator) < 0.5, by_angle, by_area)
    if group_views:
        offset = torch.rand(n_prompts, 1, generator=generator)
        azimuth = (-180.0 + 360.0 * (offset + torch.arange(n_views, dtype=torch.float32)) / n_views).reshape(n)
    else:
        azimuth = -180.0 + 360.0 * (torch.arange(n, dtype=torch.float32) + torch.rand(n, generator=generator)) / n
    distance = uniform(*distance_range)
    fovy = uniform(*fovy_range)
    if relative_distance:
        distance = distance / torch.tan(torch.deg2rad(fovy) / 2)
    if group_views:
        elevation, distance, fovy = (v.repeat_interleave(n_views) for v in (elevation, distance, fovy))
    cams = look_at_cameras(elevation, azimuth, distance, fovy).reshape(n_prompts, n_views)
    return cams.to(device)


def orbit_cameras(n_views: int, elevation_deg: float, distance: float, fovy_deg: float, device: torch.device | str = "cpu") -> Cameras:
    """n_views cameras evenly spaced in azimuth from -180 degrees, shape [n_views]."""
    azimuth = -180.0 + 360.0 * torch.arange(n_views, dtype=torch.float32) / n_views
    full = torch.full((n_views,), 1.0)
    return look_at_cameras(full * elevation_deg, azimuth, full * distance, full * fovy_deg).to(device)


def camera_rays(cameras: Cameras, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through pixel centers, row-major from the top-left pixel.

    cameras [*S] -> origins [*S, H*W, 3], unit directions [*S, H*W, 3].
    """
    device, dtype = cameras.c2w.device, cameras.c2w.dtype
    focal = 0.5 * height / torch.tan(0.5 * cameras.fovy)  # [*S] in pixels
    j, i = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype) + 0.5,
        torch.arange(width, device=device, dtype=dtype) + 0.5,
        indexing="ij",
    )
    x = (i - 0.5 * width).reshape(-1)  # [H*W]
    y = -(j - 0.5 * height).reshape(-1)
    f = focal.unsqueeze(-1)  # [*S, 1]
    dirs_cam = torch.stack(torch.broadcast_tensors(x / f, y / f, -torch.ones_like(x / f)), -1)  # [*S, H*W, 3]
    rot = cameras.c2w[..., :3, :3]
    dirs = torch.einsum("...ij,...nj->...ni", rot, dirs_cam)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    origins = cameras.c2w[..., :3, 3].unsqueeze(-2).expand_as(dirs)
    return origins, dirs
