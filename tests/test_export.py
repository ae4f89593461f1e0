"""Tests for amortized3d.inference.export against analytic fields, file round trips and name properties."""

from __future__ import annotations

import math
import re

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import trimesh

from amortized3d.inference.export import (
    contact_sheet,
    extract_mesh,
    ffmpeg_available,
    safe_output_names,
    save_mesh,
    to_uint8,
    write_video,
)
from tests.fixtures import SphereField


class ConstantField(SphereField):
    """SDF equal to a constant everywhere (no surface)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def sdf(self, points):
        return torch.full(points.shape[:-1], self.value)


RESOLUTION = 48
BOUND = 1.0
VOXEL = 2 * BOUND / (RESOLUTION - 1)


def analytic_rgba(vertices: np.ndarray) -> np.ndarray:
    """Expected uint8 vertex colors: round(255 (v + 1) / 2) and alpha 255."""
    rgb = np.round(np.clip((vertices + 1.0) / 2.0, 0, 1) * 255.0)
    return np.concatenate([rgb, np.full((len(vertices), 1), 255.0)], axis=1)


@pytest.fixture(scope="module")
def sphere_mesh():
    return extract_mesh(SphereField(0.5, (0.1, -0.2, 0.05)), resolution=RESOLUTION, bound=BOUND, chunk_points=5000)


def test_sphere_vertices_lie_on_radius(sphere_mesh):
    radii = np.linalg.norm(sphere_mesh.vertices - np.array([0.1, -0.2, 0.05]), axis=1)
    assert len(radii) > 100
    assert np.abs(radii - 0.5).max() < VOXEL


def test_sphere_volume_and_watertight(sphere_mesh):
    assert sphere_mesh.is_watertight
    expected = 4.0 / 3.0 * math.pi * 0.5**3
    assert sphere_mesh.volume > 0  # outward normals
    assert abs(sphere_mesh.volume - expected) / expected < 0.03


def test_sphere_vertex_colors_follow_position(sphere_mesh):
    colors = np.asarray(sphere_mesh.visual.vertex_colors)
    assert colors.dtype == np.uint8 and colors.shape == (len(sphere_mesh.vertices), 4)
    assert np.abs(colors.astype(float) - analytic_rgba(np.asarray(sphere_mesh.vertices))).max() <= 1


def test_glb_round_trip_keeps_faces_and_colors(sphere_mesh, tmp_path):
    paths = save_mesh(sphere_mesh, tmp_path / "nested" / "dir" / "sphere")
    assert [p.name for p in paths] == ["sphere.glb", "sphere.ply"]
    assert all(p.is_file() for p in paths)
    loaded = trimesh.load(paths[0], force="mesh")
    assert len(loaded.faces) == len(sphere_mesh.faces)
    colors = np.asarray(loaded.visual.vertex_colors).astype(float)
    assert colors.shape == (len(loaded.vertices), 4)
    assert np.abs(colors - analytic_rgba(np.asarray(loaded.vertices))).max() <= 1


def test_ply_round_trip(sphere_mesh, tmp_path):
    _, ply_path = save_mesh(sphere_mesh, tmp_path / "sphere")
    assert b"binary_little_endian" in ply_path.read_bytes()[:200]
    loaded = trimesh.load(ply_path, force="mesh", process=False)
    np.testing.assert_allclose(loaded.vertices, sphere_mesh.vertices, atol=1e-6)
    np.testing.assert_array_equal(loaded.faces, sphere_mesh.faces)
    np.testing.assert_array_equal(loaded.visual.vertex_colors, sphere_mesh.visual.vertex_colors)


@pytest.mark.parametrize("value, word", [(1.0, "empty"), (-1.0, "fills")])
def test_field_without_surface_raises_clear_error(value, word):
    with pytest.raises(ValueError, match=word) as info:
        extract_mesh(ConstantField(value), resolution=8)
    assert "train longer" in str(info.value)


def test_to_uint8_shapes_and_values():
    images = torch.tensor([0.0, 0.5, 1.0, 2.0, -1.0]).reshape(1, 1, 1, 5).expand(2, 3, 1, 5)
    out = to_uint8(images)
    assert out.dtype == np.uint8 and out.shape == (2, 1, 5, 3)
    np.testing.assert_array_equal(out[0, 0, :, 0], [0, 128, 255, 255, 0])
    assert to_uint8(torch.zeros(3, 4, 6)).shape == (1, 4, 6, 3)


def moving_square_frames(count: int, height: int, width: int) -> np.ndarray:
    """Distinct frames: a white square sliding across a dark background. -> uint8 [count, H, W, 3]."""
    frames = np.full((count, height, width, 3), 30, np.uint8)
    for i in range(count):
        frames[i, 4:12, i * 2 : i * 2 + 8] = 255
    return frames


@pytest.mark.skipif(not ffmpeg_available(), reason="ffmpeg (imageio-ffmpeg) not available")
def test_mp4_round_trip_with_odd_size(tmp_path):
    frames = moving_square_frames(7, 33, 45)
    path = write_video(frames, tmp_path / "out" / "turntable.mp4", fps=10)
    assert path == tmp_path / "out" / "turntable.mp4"
    reader = imageio.get_reader(path, format="FFMPEG")
    read = [frame for frame in reader]
    reader.close()
    assert len(read) == 7
    assert read[0].shape == (34, 46, 3)  # padded to even


def test_gif_frame_count(tmp_path):
    frames = moving_square_frames(5, 16, 24)
    path = write_video(frames, tmp_path / "turntable.gif", fps=12)
    read = imageio.mimread(path)
    assert len(read) == 5
    assert read[0].shape[:2] == (16, 24)


def test_bad_video_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.mp4.*\.gif"):
        write_video(moving_square_frames(2, 16, 16), tmp_path / "turntable.avi")


def test_mp4_falls_back_to_gif_without_ffmpeg(tmp_path, monkeypatch):
    import amortized3d.inference.export as export

    monkeypatch.setattr(export, "ffmpeg_available", lambda: False)
    with pytest.warns(UserWarning, match="ffmpeg"):
        path = write_video(moving_square_frames(3, 16, 16), tmp_path / "turntable.mp4")
    assert path == tmp_path / "turntable.gif" and path.is_file()


def test_contact_sheet_size_and_padding(tmp_path):
    images = np.zeros((5, 10, 20, 3), np.uint8)
    path = contact_sheet(images, tmp_path / "sheet.png")  # 3 columns x 2 rows, 4 px padding
    sheet = imageio.imread(path)
    assert sheet.shape[:2] == (2 * 10 + 3 * 4, 3 * 20 + 4 * 4)
    assert (sheet[:4] == 255).all() and (sheet[4:14, 4:24] == 0).all()
    assert (sheet[18:28, 52:72] == 255).all()  # empty sixth cell stays white
    one_row = imageio.imread(contact_sheet(images, tmp_path / "row.png", ncols=5))
    assert one_row.shape[:2] == (10 + 2 * 4, 5 * 20 + 6 * 4)


SAFE = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def test_names_cannot_escape_directory():
    (name,) = safe_output_names(["../../etc/passwd"])
    assert SAFE.match(name) and "/" not in name and ".." not in name and "\\" not in name
    for prompt in ["..", ".hidden", "-rf", "a\\b/c", "  ", "\x00\n\t"]:
        (name,) = safe_output_names([prompt])
        assert SAFE.match(name), (prompt, name)


def test_long_prompts_are_bounded_and_distinct():
    prefix = "a red cube on a blue sphere " * 40  # > 1000 characters
    prompts = [prefix + "tail one", prefix + "tail two", "x" * 1000]
    names = safe_output_names(prompts, max_bytes=80)
    assert all(len(name.encode("utf-8")) <= 80 for name in names)
    assert len(set(names)) == 3
    assert all(SAFE.match(name) for name in names)


def test_non_ascii_and_empty_prompts():
    names = safe_output_names(["Café crème brûlée", "猫", "", "Straße № 5"])
    assert names[0] == "cafe_creme_brulee"
    assert all(SAFE.match(name) and name.isascii() for name in names)
    assert names[1].startswith("prompt") and names[2].startswith("prompt")
    assert len(set(names)) == 4


def test_duplicates_unique_and_suffix_collisions():
    names = safe_output_names(["a cat", "A cat!", "a cat", "a_cat_2"])
    assert len(set(names)) == 4
    assert names[0] == "a_cat" and names[3] == "a_cat_2"
    assert set(names[1:3]) == {"a_cat_3", "a_cat_4"}


def test_names_are_deterministic():
    prompts = ["a cat", "a cat", "Ünïcödé", "y" * 500, "../x"]
    assert safe_output_names(prompts) == safe_output_names(list(prompts))
    assert safe_output_names(["y" * 500])[0] == safe_output_names(["y" * 500])[0]
