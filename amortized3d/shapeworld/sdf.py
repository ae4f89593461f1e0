"""The eight ShapeWorld shapes and their exact signed distance functions.

Shapes (unit versions, half-extent 1, upright along z, centered at the origin; a
primitive of size s is the unit shape scaled by SIZES[s] and translated to its center):

    cube        box [-1, 1]^3
    sphere      radius 1
    cylinder    radius 1, z in [-1, 1]
    cone        base radius 1 at z = -1, apex at z = +1
    torus       lying flat in the xy plane, major radius 0.7, tube radius 0.3 (z in [-0.3, 0.3])
    capsule     vertical segment z in [-0.5, 0.5], radius 0.5
    octahedron  |x| + |y| + |z| <= 1
    pyramid     square base [-1, 1]^2 at z = -1, apex at (0, 0, 1)

The SDFs are Inigo Quilez's exact formulas; uniform scaling keeps them exact:
sdf_s(p) = h * sdf_unit((p - center) / h). Each takes points q [..., 3] in the unit
shape's frame and returns the signed distance [...], negative inside.
"""

from __future__ import annotations

import torch

# Unit-shape extents: (half-width of the footprint along x and y, bottom z, top z), in units of the half-extent.
SHAPE_EXTENTS: dict[str, tuple[float, float, float]] = {
    "cube": (1.0, -1.0, 1.0),
    "sphere": (1.0, -1.0, 1.0),
    "cylinder": (1.0, -1.0, 1.0),
    "cone": (1.0, -1.0, 1.0),
    "torus": (1.0, -0.3, 0.3),
    "capsule": (0.5, -1.0, 1.0),
    "octahedron": (1.0, -1.0, 1.0),
    "pyramid": (1.0, -1.0, 1.0),
}

TORUS_MAJOR_RADIUS, TORUS_TUBE_RADIUS = 0.7, 0.3
CAPSULE_HALF_SEGMENT, CAPSULE_RADIUS = 0.5, 0.5


def _hypot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(a * a + b * b)


def sdf_unit_box(q: torch.Tensor) -> torch.Tensor:
    """Box [-1,1]^3: |max(|q|-1, 0)| + min(max_i(|q_i|-1), 0). q [..., 3] -> [...]."""
    d = q.abs() - 1.0
    return d.clamp(min=0).norm(dim=-1) + d.max(dim=-1).values.clamp(max=0)


def sdf_unit_sphere(q: torch.Tensor) -> torch.Tensor:
    """Sphere radius 1: |q| - 1. q [..., 3] -> [...]."""
    return q.norm(dim=-1) - 1.0


def sdf_unit_cylinder(q: torch.Tensor) -> torch.Tensor:
    """Capped cylinder r=1, |z|<=1: d=(|q_xy|-1, |z|-1); min(max(d),0) + |max(d,0)|. q [..., 3] -> [...]."""
    dx = q[..., :2].norm(dim=-1) - 1.0
    dz = q[..., 2].abs() - 1.0
    return torch.maximum(dx, dz).clamp(max=0) + _hypot(dx.clamp(min=0), dz.clamp(min=0))


def sdf_unit_cone(q: torch.Tensor) -> torch.Tensor:
    """Capped cone (IQ), half-height 1, base radius 1 at z=-1, tip radius 0: min distance to cap and slant segments, signed. q [..., 3] -> [...]."""
    r, z = q[..., :2].norm(dim=-1), q[..., 2]
    ca_x = r - torch.minimum(r, torch.where(z < 0, torch.ones_like(r), torch.zeros_like(r)))
    ca_y = z.abs() - 1.0
    # k1 = (r2, h) = (0, 1), k2 = (r2 - r1, 2h) = (-1, 2), |k2|^2 = 5
    t = ((r + 2.0 * (1.0 - z)) / 5.0).clamp(0.0, 1.0)
    cb_x = r - t
    cb_y = z - 1.0 + 2.0 * t
    sign = torch.where((cb_x < 0) & (ca_y < 0), -torch.ones_like(r), torch.ones_like(r))
    return sign * torch.sqrt(torch.minimum(ca_x * ca_x + ca_y * ca_y, cb_x * cb_x + cb_y * cb_y))


def sdf_unit_torus(q: torch.Tensor) -> torch.Tensor:
    """Flat torus: |(|q_xy| - 0.7, z)| - 0.3. q [..., 3] -> [...]."""
    return _hypot(q[..., :2].norm(dim=-1) - TORUS_MAJOR_RADIUS, q[..., 2]) - TORUS_TUBE_RADIUS


def sdf_unit_capsule(q: torch.Tensor) -> torch.Tensor:
    """Vertical capsule: |q - (0, 0, clamp(z, -0.5, 0.5))| - 0.5. q [..., 3] -> [...]."""
    z = q[..., 2]
    dz = z - z.clamp(-CAPSULE_HALF_SEGMENT, CAPSULE_HALF_SEGMENT)
    return torch.sqrt(q[..., 0] ** 2 + q[..., 1] ** 2 + dz * dz) - CAPSULE_RADIUS


def sdf_unit_octahedron(q: torch.Tensor) -> torch.Tensor:
    """Exact octahedron |x|+|y|+|z|<=1 (IQ): distance to the nearest face region, else (sum|q|-1)/sqrt(3). q [..., 3] -> [...]."""
    p = q.abs()
    m = p.sum(dim=-1) - 1.0
    px, py, pz = p.unbind(-1)
    cx, cy, cz = 3.0 * px < m, 3.0 * py < m, 3.0 * pz < m
    # q = p.xyz if cx else p.yzx if cy else p.zxy
    a = torch.where(cx, px, torch.where(cy, py, pz))
    b = torch.where(cx, py, torch.where(cy, pz, px))
    c = torch.where(cx, pz, torch.where(cy, px, py))
    k = (0.5 * (c - b + 1.0)).clamp(0.0, 1.0)
    edge = torch.sqrt(a * a + (b - 1.0 + k) ** 2 + (c - k) ** 2)
    return torch.where(cx | cy | cz, edge, m * 0.57735027)


def sdf_unit_pyramid(q: torch.Tensor) -> torch.Tensor:
    """Exact square pyramid, base [-1,1]^2 at z=-1, apex (0,0,1): sign(s) * min(|s|, dist(q, base square)), s = 2 * sdPyramid_IQ((q + e_z) / 2, h=1). q [..., 3] -> [...]."""
    h = 1.0
    m2 = h * h + 0.25
    x, y = (0.5 * q[..., 0]).abs(), (0.5 * q[..., 1]).abs()
    up = 0.5 * (q[..., 2] + 1.0)
    px = torch.maximum(x, y) - 0.5
    pz = torch.minimum(x, y) - 0.5
    qx, qy, qz = pz, h * up - 0.5 * px, h * px + 0.5 * up
    s = (-qx).clamp(min=0)
    t = ((qy - 0.5 * pz) / (m2 + 0.25)).clamp(0.0, 1.0)
    a = m2 * (qx + s) ** 2 + qy * qy
    b = m2 * (qx + 0.5 * t) ** 2 + (qy - m2 * t) ** 2
    d2 = torch.where(torch.minimum(qy, -qx * m2 - qy * 0.5) > 0, torch.zeros_like(a), torch.minimum(a, b))
    iq = 2.0 * torch.sqrt((d2 + qz * qz) / m2) * torch.sign(torch.maximum(qz, -up))
    # IQ's distance covers the four side triangles only (its sign is exact); add the base square.
    beyond = (q[..., :2].abs() - 1.0).clamp(min=0)
    base = torch.sqrt(beyond[..., 0] ** 2 + beyond[..., 1] ** 2 + (q[..., 2] + 1.0) ** 2)
    distance = torch.minimum(iq.abs(), base)
    return torch.where(iq < 0, -distance, distance)


UNIT_SDFS = {
    "cube": sdf_unit_box,
    "sphere": sdf_unit_sphere,
    "cylinder": sdf_unit_cylinder,
    "cone": sdf_unit_cone,
    "torus": sdf_unit_torus,
    "capsule": sdf_unit_capsule,
    "octahedron": sdf_unit_octahedron,
    "pyramid": sdf_unit_pyramid,
}
