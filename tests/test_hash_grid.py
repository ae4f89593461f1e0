"""HashGrid: exact at vertices, trilinear in between, continuous, dense levels bijective, differentiable."""

import math

import pytest
import torch

from amortized3d.generators.hash_grid import HashGrid

# Resolutions 8 (9^3 = 729 rows: dense), 16, 32, 64 (17^3 = 4913 > 4096: hashed).
SMALL = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=12, base_resolution=8, per_level_scale=2.0, bound=2.0)
DENSE_LEVEL, HASHED_LEVEL = 0, 2
PRIMES = (1, 2654435761, 805459861)


def random_grid(seed: int = 0, **overrides) -> HashGrid:
    torch.manual_seed(seed)
    grid = HashGrid(**{**SMALL, **overrides})
    with torch.no_grad():
        grid.table.normal_()
    return grid


def vertex_world(vertex: torch.Tensor, resolution: int, bound: float) -> torch.Tensor:
    """Integer lattice coordinates [N, 3] -> world coordinates [N, 3] of those vertices."""
    return -bound + 2.0 * bound * vertex.double() / resolution


def dense_row(i: int, j: int, k: int, resolution: int) -> int:
    side = resolution + 1
    return i + j * side + k * side * side


def hashed_row(i: int, j: int, k: int, table_size: int) -> int:
    return ((i * PRIMES[0]) ^ (j * PRIMES[1]) ^ (k * PRIMES[2])) % table_size


def level_slice(grid: HashGrid, level: int) -> slice:
    f = grid.n_features_per_level
    return slice(level * f, (level + 1) * f)


def test_levels_follow_the_resolution_formula_and_table_budget():
    grid = HashGrid(**SMALL)
    assert grid.resolutions == [8, 16, 32, 64]
    assert grid.level_is_dense.tolist() == [True, False, False, False]
    defaults = HashGrid()
    assert defaults.resolutions == [math.floor(16 * 1.4473**level) for level in range(16)]
    assert defaults.resolutions[-1] == 4097
    for res, dense in zip(defaults.resolutions, defaults.level_is_dense.tolist()):
        assert dense == ((res + 1) ** 3 <= 2**19)
    assert defaults(torch.zeros(5, 3)).shape == (5, 32)


def test_level_blocks_partition_the_single_table():
    grid = HashGrid(**SMALL)
    blocks = sorted(zip(grid.level_offsets.tolist(), grid.level_sizes.tolist()))
    position = 0
    for offset, size in blocks:
        assert offset == position
        position += size
    assert position == grid.table.shape[0] == 9**3 + 3 * 4096
    assert len(list(grid.parameters())) == 1


@pytest.mark.parametrize("level", [DENSE_LEVEL, HASHED_LEVEL])
def test_exact_at_vertices(level):
    grid = random_grid()
    res = grid.resolutions[level]
    torch.manual_seed(1)
    vertices = torch.randint(0, res + 1, (64, 3))
    vertices[:3] = torch.tensor([[0, 0, 0], [res, res, res], [res, 0, res]])  # box corners too
    out = grid(vertex_world(vertices, res, grid.bound).float())[:, level_slice(grid, level)]
    offset = int(grid.level_offsets[level])
    for vertex, features in zip(vertices.tolist(), out):
        within = dense_row(*vertex, res) if level == DENSE_LEVEL else hashed_row(*vertex, 2**SMALL["log2_hashmap_size"])
        torch.testing.assert_close(features, grid.table[offset + within], atol=2e-5, rtol=0)


@pytest.mark.parametrize("level", [DENSE_LEVEL, HASHED_LEVEL])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_edge_midpoint_is_mean_of_endpoints(level, axis):
    grid = random_grid()
    res = grid.resolutions[level]
    torch.manual_seed(2)
    start = torch.randint(0, res, (32, 3))
    step = torch.zeros(3, dtype=torch.long)
    step[axis] = 1
    end = start + step
    midpoint = 0.5 * (vertex_world(start, res, grid.bound) + vertex_world(end, res, grid.bound))
    sl = level_slice(grid, level)
    mid_features = grid(midpoint.float())[:, sl]
    expected = 0.5 * (grid(vertex_world(start, res, grid.bound).float())[:, sl] + grid(vertex_world(end, res, grid.bound).float())[:, sl])
    torch.testing.assert_close(mid_features, expected, atol=2e-5, rtol=0)


def test_trilinear_inside_one_cell_of_the_coarsest_level():
    grid = random_grid()
    res = grid.resolutions[DENSE_LEVEL]
    corner = torch.tensor([3, 5, 1])
    torch.manual_seed(3)
    frac = torch.rand(16, 3, dtype=torch.float64)
    points = vertex_world(corner, res, grid.bound) + frac * (2 * grid.bound / res)
    out = grid(points.float())[:, level_slice(grid, DENSE_LEVEL)].double()
    offset = int(grid.level_offsets[DENSE_LEVEL])
    expected = torch.zeros_like(out)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                weight = (frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1]) * (frac[:, 2] if dz else 1 - frac[:, 2])
                row = offset + dense_row(int(corner[0]) + dx, int(corner[1]) + dy, int(corner[2]) + dz, res)
                expected += weight[:, None] * grid.table[row].double()
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)


def test_continuous_across_cell_faces():
    grid = random_grid()
    finest = grid.resolutions[-1]
    torch.manual_seed(4)
    # Points on faces of the finest lattice (which are faces of every coarser one too, per-level scale 2).
    on_face = vertex_world(torch.randint(1, finest, (256, 3)), finest, grid.bound)
    on_face += torch.rand(256, 3, dtype=torch.float64) * (2 * grid.bound / finest) * torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64)
    delta = 1e-4
    shift = torch.tensor([delta, 0.0, 0.0], dtype=torch.float64)
    change = (grid((on_face + shift).float()) - grid((on_face - shift).float())).abs().max()
    # Lipschitz bound of trilinear interpolation: |d f / d x| <= res / (2 bound) * max|table difference| per axis.
    lipschitz = finest / (2 * grid.bound) * 2 * grid.table.abs().max()
    assert change <= lipschitz * 2 * delta * 1.5
    assert change > 0


def test_points_outside_the_box_are_clamped():
    grid = random_grid()
    inside = torch.tensor([[2.0, -2.0, 0.3], [2.0, 2.0, 2.0]])
    outside = torch.tensor([[5.0, -7.0, 0.3], [2.5, 100.0, 3.0]])
    torch.testing.assert_close(grid(outside), grid(inside))


def test_dense_level_index_is_a_bijection_onto_its_block():
    grid = HashGrid(**SMALL)
    with torch.no_grad():
        grid.table.zero_()
        grid.table[:, 0] = torch.arange(grid.table.shape[0], dtype=torch.float32)  # each row stores its own id
    res = grid.resolutions[DENSE_LEVEL]
    axis = torch.arange(res + 1)
    vertices = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    ids = grid(vertex_world(vertices, res, grid.bound).float())[:, DENSE_LEVEL * 2].round().long()
    offset, size = int(grid.level_offsets[DENSE_LEVEL]), int(grid.level_sizes[DENSE_LEVEL])
    assert size == (res + 1) ** 3
    assert sorted(ids.tolist()) == list(range(offset, offset + size))


def test_gradients_reach_exactly_the_touched_rows():
    grid = random_grid()
    torch.manual_seed(5)
    points = torch.rand(7, 3) * 4 - 2
    grid(points)[:, level_slice(grid, HASHED_LEVEL)][:, 0].sum().backward()
    grad = grid.table.grad
    offset, size = int(grid.level_offsets[HASHED_LEVEL]), int(grid.level_sizes[HASHED_LEVEL])
    inside = torch.zeros(grid.table.shape[0], dtype=torch.bool)
    inside[offset : offset + size] = True
    # Trilinear weights sum to one per point, and only feature 0 of that level is touched.
    torch.testing.assert_close(grad[inside, 0].sum(), torch.tensor(7.0), atol=1e-5, rtol=0)
    assert grad[~inside].abs().sum() == 0 and grad[:, 1].abs().sum() == 0
    assert 0 < int((grad[:, 0] != 0).sum()) <= 8 * 7


def test_gradients_match_finite_differences_in_float64():
    grid = random_grid().double()
    torch.manual_seed(6)
    points = torch.rand(5, 3, dtype=torch.float64) * 4 - 2
    weight = torch.randn(5, grid.output_dim, dtype=torch.float64)
    (grid(points) * weight).sum().backward()
    analytic = grid.table.grad.clone()
    rows = analytic.abs().sum(1).nonzero().flatten()[:6]
    for row in rows.tolist():
        for feature in range(2):
            with torch.no_grad():
                original = grid.table[row, feature].item()
                grid.table[row, feature] = original + 1e-6
                plus = (grid(points) * weight).sum()
                grid.table[row, feature] = original - 1e-6
                minus = (grid(points) * weight).sum()
                grid.table[row, feature] = original
            assert abs((plus - minus).item() / 2e-6 - analytic[row, feature].item()) < 1e-5


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        HashGrid(**SMALL)(torch.zeros(2, 4, 3))
