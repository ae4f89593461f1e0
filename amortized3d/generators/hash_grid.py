"""Multi-resolution hash encoding (Instant-NGP), in pure torch.

A point x in the box [-bound, bound]^3 is mapped to u = (x + bound) / (2 bound)
in [0, 1]^3. Level l is a lattice of resolution

    res_l = floor(base_resolution * per_level_scale^l)

with vertices at u = i / res_l, i in {0, ..., res_l} per axis, each vertex owning
``n_features_per_level`` learned features. The encoding of x at level l is the
trilinear interpolation of the 8 vertices of its cell; the levels are
concatenated, so forward returns [N, n_levels * n_features_per_level].

Where a level's (res_l + 1)^3 vertices fit into the table (2^log2_hashmap_size
rows), it is DENSE: vertex (i, j, k) owns row i + j (res+1) + k (res+1)^2 of its
block. Finer levels are HASHED with the Instant-NGP spatial hash

    h(i, j, k) = (i * 1  xor  j * 2654435761  xor  k * 805459861)  mod  2^log2_hashmap_size.

All levels' rows live in one parameter tensor ``table`` [n_rows, F]; level l owns
rows [level_offsets[l], level_offsets[l] + level_sizes[l]). Hashed levels come
first in the table so that each hashed block starts at a multiple of the table
size: then the offset can be OR-ed (xor-ed) into the hash instead of added in a
separate pass over all corners.

Forward is one vectorized pass over all levels: per-axis integer coordinates of
the two cell faces, the 8 corner rows of every level at once, a single gather,
and trilinear weights. There is no Python loop over levels.
"""

from __future__ import annotations

import math

import torch
from torch import nn

HASH_PRIMES = (1, 2654435761, 805459861)


def level_resolutions(n_levels: int, base_resolution: int, per_level_scale: float) -> list[int]:
    """res_l = floor(base_resolution * per_level_scale^l) for l = 0 .. n_levels - 1."""
    return [int(math.floor(base_resolution * per_level_scale**level)) for level in range(n_levels)]


class HashGrid(nn.Module):
    """Multi-resolution hash encoding: points [N, 3] -> features [N, n_levels * n_features_per_level].

    Points are world coordinates, clamped
    to [-bound, bound]. The table is initialized uniform(-1e-4, 1e-4).
    """

    def __init__(
        self,
        n_levels: int = 16,
        n_features_per_level: int = 2,
        log2_hashmap_size: int = 19,
        base_resolution: int = 16,
        per_level_scale: float = 1.4473,
        bound: float = 2.0,
    ):
        super().__init__()
        if n_levels < 1:
            raise ValueError(f"n_levels={n_levels} must be >= 1; use e.g. 16")
        if base_resolution < 1:
            raise ValueError(f"base_resolution={base_resolution} must be >= 1; use e.g. 16")
        if not 1 <= log2_hashmap_size <= 30:
            raise ValueError(f"log2_hashmap_size={log2_hashmap_size} must be in [1, 30]; use e.g. 19")
        if per_level_scale < 1.0:
            raise ValueError(f"per_level_scale={per_level_scale} must be >= 1 so levels get finer; use e.g. 1.4473")
        if bound <= 0:
            raise ValueError(f"bound={bound} must be > 0; use the scene box half-size, e.g. 2.0")
        self.n_levels = n_levels
        self.n_features_per_level = n_features_per_level
        self.output_dim = n_levels * n_features_per_level
        self.bound = float(bound)
        self.hashmap_size = 2**log2_hashmap_size

        resolutions = level_resolutions(n_levels, base_resolution, per_level_scale)
        dense = [(res + 1) ** 3 <= self.hashmap_size for res in resolutions]
        # Resolutions never decrease, so the dense levels are exactly the first n_dense.
        self.n_dense_levels = sum(dense)
        n_hashed = n_levels - self.n_dense_levels
        sizes = [(res + 1) ** 3 if d else self.hashmap_size for res, d in zip(resolutions, dense)]
        offsets, next_dense_row = [], n_hashed * self.hashmap_size
        for level, size in enumerate(sizes):
            if dense[level]:
                offsets.append(next_dense_row)
                next_dense_row += size
            else:
                offsets.append((level - self.n_dense_levels) * self.hashmap_size)
        self.n_rows = next_dense_row
        if self.n_rows >= 2**31:
            raise ValueError(f"table has {self.n_rows} rows, more than int32 indices allow; lower n_levels or log2_hashmap_size")

        # Per level and axis: the multiplier of the integer coordinate (dense strides or hash primes)
        # and the mask applied to it (all bits for dense levels, hashmap_size - 1 for hashed ones).
        multipliers = [[1, res + 1, (res + 1) ** 2] if d else list(HASH_PRIMES) for res, d in zip(resolutions, dense)]
        masks = [-1 if d else self.hashmap_size - 1 for d in dense]
        self.resolutions = resolutions
        self.register_buffer("level_resolutions", torch.tensor(resolutions, dtype=torch.float32), persistent=False)
        self.register_buffer("level_offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        self.register_buffer("level_sizes", torch.tensor(sizes, dtype=torch.int64), persistent=False)
        self.register_buffer("level_is_dense", torch.tensor(dense), persistent=False)
        self.register_buffer("axis_multipliers", torch.tensor(multipliers, dtype=torch.int64), persistent=False)  # [L, 3]
        self.register_buffer("level_masks", torch.tensor(masks, dtype=torch.int64), persistent=False)  # [L]

        self.table = nn.Parameter(torch.empty(self.n_rows, n_features_per_level).uniform_(-1e-4, 1e-4))

    def extra_repr(self) -> str:
        return (
            f"levels={self.n_levels} ({self.n_dense_levels} dense), features/level={self.n_features_per_level}, "
            f"resolutions={self.resolutions[0]}..{self.resolutions[-1]}, rows={self.n_rows}, bound={self.bound}"
        )

    def corner_rows_and_weights(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Table rows and trilinear weights of the 8 cell corners at every level.

        points [N, 3] -> rows [L, 2, 2, 2, N] int32, weights [L, 2, 2, 2, N], corner axes ordered
        (z, y, x); w = prod_axis (frac if the corner is on the upper face else 1 - frac).
        The point axis is innermost so every broadcast below runs over long contiguous rows.
        """
        n_points = points.shape[0]
        unit = ((points.clamp(-self.bound, self.bound) + self.bound) * (0.5 / self.bound)).t()  # [3, N] in [0, 1]
        res = self.level_resolutions.to(points.dtype)[:, None, None]  # [L, 1, 1]
        position = res * unit  # [L, 3, N]
        # The last cell is closed: u = 1 lands in cell res - 1 with frac = 1.
        cell = torch.minimum(position.detach().floor(), res - 1)
        frac = position - cell  # [L, 3, N]

        # Per level, axis and face (lower, upper): coordinate * multiplier, masked; level offset folded into x.
        lower = cell.to(torch.int64)
        multipliers = self.axis_multipliers[:, :, None]  # [L, 3, 1]
        faces = torch.empty(self.n_levels, 3, 2, n_points, dtype=torch.int64, device=points.device)
        torch.mul(lower, multipliers, out=faces[:, :, 0])
        torch.add(faces[:, :, 0], multipliers, out=faces[:, :, 1])
        faces &= self.level_masks[:, None, None, None]
        faces[:, 0] += self.level_offsets[:, None, None]  # hashed offsets are multiples of the table size
        faces = faces.to(torch.int32)
        cx, cy, cz = faces.unbind(1)  # each [L, 2, N]

        n_dense = self.n_dense_levels
        rows = torch.empty(self.n_levels, 2, 2, 2, n_points, dtype=torch.int32, device=points.device)
        if n_dense > 0:
            dense = slice(None, n_dense)
            yz = cz[dense, :, None] + cy[dense, None]  # [Ld, 2, 2, N]
            torch.add(yz[:, :, :, None], cx[dense, None, None], out=rows[dense])
        if n_dense < self.n_levels:
            hashed = slice(n_dense, None)
            yz = cz[hashed, :, None] ^ cy[hashed, None]
            torch.bitwise_xor(yz[:, :, :, None], cx[hashed, None, None], out=rows[hashed])

        wx, wy, wz = torch.stack((1.0 - frac, frac), dim=2).unbind(1)  # each [L, 2, N]
        weights = (wz[:, :, None] * wy[:, None])[:, :, :, None] * wx[:, None, None]
        return rows, weights

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """points [N, 3] world coordinates -> encoding [N, n_levels * n_features_per_level]."""
        if points.dim() != 2 or points.shape[-1] != 3:
            raise ValueError(f"points must have shape [N, 3], got {tuple(points.shape)}; flatten leading dims first")
        n_points = points.shape[0]
        rows, weights = self.corner_rows_and_weights(points)
        corner_features = gather_rows(self.table, rows.view(-1)).view(self.n_levels, 8, n_points, self.n_features_per_level)
        encoding = (corner_features * weights.view(self.n_levels, 8, n_points, 1)).sum(1)  # [L, N, F]
        return encoding.transpose(0, 1).reshape(n_points, self.output_dim)


def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table [S, F], rows [M] -> table[rows] [M, F], with a fast backward.

    The backward of a row gather is a scatter-add. On CPU it is several times faster
    on a 1-D tensor than row by row on a 2-D one, so rows of two features are
    gathered as single complex numbers (complex addition adds the two parts
    independently, exactly the scatter-add wanted); other widths use index_select.
    """
    if table.shape[1] == 2 and table.is_contiguous() and table.dtype in (torch.float32, torch.float64):
        return torch.view_as_real(torch.view_as_complex(table).index_select(0, rows))
    return table.index_select(0, rows)
