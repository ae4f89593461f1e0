"""Export utilities for ``generate``: mesh extraction, mesh files, videos, contact sheets, safe file names.

Mesh extraction runs marching cubes at the zero level set of the field's SDF sampled on a
regular grid over [-bound, bound]^3 (``inference.baked``); vertex colors come from the
field's albedo at the vertices.
Images are handled as uint8 arrays [N, H, W, 3] once they leave torch. 3D Gaussians are also written as they are,
in the .ply layout of 3D Gaussian Splatting (save_splats_ply, load_splats_ply).
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
import warnings
from pathlib import Path

import imageio.v2 as imageio
import mcubes
import numpy as np
import torch
import trimesh

from amortized3d.fields import Field, values_and_color
from amortized3d.files import atomic_path
from amortized3d.inference.baked import BakedField, bake_field

VIDEO_SUFFIXES = (".mp4", ".gif")


def extract_mesh(
    field: Field | BakedField,
    resolution: int = 128,
    bound: float = 1.0,
    chunk_points: int = 262144,
) -> trimesh.Trimesh:
    """Colored mesh of the zero level set {x : sdf(x) = 0} of a single-prompt (P = 1) field.

    The SDF is sampled on the grid x_ijk over [-bound, bound]^3 (``bake_field``); a field that
    is already a BakedField is used as it is (its own resolution and bound). Grid spacing
    h = 2 bound / (resolution - 1); a marching-cubes vertex v (grid index units) maps to world
    x = -bound + h v. Faces are wound so normals point outward (toward sdf > 0). Vertex colors
    are round(255 * rgb(x)) with alpha 255, uint8 [V, 4], rgb evaluated by the field itself
    (not interpolated from the grid).
    """
    baked = field if isinstance(field, BakedField) else bake_field(field, resolution, bound, chunk_points)
    resolution, bound = baked.resolution, baked.bound
    sdf_grid = baked.sdf_grid()  # [res, res, res] indexed (x, y, z); a density field's density
    name = "density" if baked.geometry == "density" else "SDF"
    if not np.isfinite(sdf_grid).all():
        bad = int((~np.isfinite(sdf_grid)).sum())
        raise ValueError(
            f"the field's {name} has {bad} non-finite values (NaN/inf) on the {resolution}^3 export grid; "
            "the generator has diverged - check the training loss and use an earlier checkpoint."
        )
    # PyMCubes treats values above the level as inside: -sdf (inside sdf < 0), or density - iso (inside density > iso)
    inside = sdf_grid - baked.iso if baked.geometry == "density" else -sdf_grid
    lowest, highest = float(sdf_grid.min()), float(sdf_grid.max())
    if not (inside.min() < 0.0 < inside.max()):
        empty = inside.max() <= 0
        state = "is empty" if empty else "fills the whole box"
        level = f"below its surface level {baked.iso:g} everywhere" if baked.geometry == "density" and empty else (
            f"above its surface level {baked.iso:g} everywhere" if baked.geometry == "density" else
            "positive everywhere" if empty else "negative everywhere")
        raise ValueError(
            f"no surface to extract: the field {state} (the {name} is {level}) on [-{bound}, {bound}]^3 "
            f"({name} range [{lowest:.4g}, {highest:.4g}], resolution {resolution}); "
            "train longer, check the prompt, or change bound so the object fits inside the box."
        )
    vertices_index, faces = mcubes.marching_cubes(inside, 0.0)  # [V, 3] in (i, j, k) = (x, y, z) index units, normals outward
    vertices = (vertices_index * baked.voxel - bound).astype(np.float32)  # [V, 3] world
    rgb = vertex_colors(baked.source, torch.from_numpy(vertices), chunk_points, baked.values.device, baked.geometry)  # [V, 3]
    rgba = np.concatenate([to_uint8_colors(rgb), np.full((len(vertices), 1), 255, np.uint8)], axis=1)  # [V, 4]
    return trimesh.Trimesh(vertices=vertices, faces=faces.astype(np.int64), vertex_colors=rgba, process=False)


@torch.no_grad()
def vertex_colors(field: Field, vertices: torch.Tensor, chunk_points: int = 262144, device: torch.device | str = "cpu",
                  geometry: str = "sdf") -> np.ndarray:
    """Albedo of a single-prompt field (an SDF or a density field) at world points. vertices [V, 3] -> rgb float32 [V, 3]."""
    colors = []
    for start in range(0, vertices.shape[0], chunk_points):
        chunk = vertices[start : start + chunk_points].to(device).unsqueeze(0)  # [1, n, 3]
        _, rgb = values_and_color(field, chunk, geometry)  # [1, n, 3]
        colors.append(rgb[0].float().cpu())
    if not colors:
        return np.zeros((0, 3), np.float32)
    return torch.cat(colors).clamp(0.0, 1.0).numpy()


def to_uint8_colors(rgb: np.ndarray) -> np.ndarray:
    """c_uint8 = round(255 clip(c, 0, 1)). rgb float [..., C] -> uint8 [..., C]."""
    return np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_mesh(mesh: trimesh.Trimesh, stem: Path) -> list[Path]:
    """Write ``stem.glb`` and binary ``stem.ply`` (creating parent folders). -> [glb_path, ply_path]."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    glb_path = stem.parent / f"{stem.name}.glb"
    ply_path = stem.parent / f"{stem.name}.ply"
    with atomic_path(glb_path) as tmp:
        mesh.export(tmp, file_type="glb")
    with atomic_path(ply_path) as tmp:
        mesh.export(tmp, file_type="ply", encoding="binary")
    return [glb_path, ply_path]


def splat_ply_properties(n_rest: int) -> list[str]:
    """The vertex properties of the 3D Gaussian Splatting .ply layout (graphdeco-inria's, which splat viewers read), for
    n_rest higher spherical-harmonic coefficients per channel."""
    return (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"] + [f"f_rest_{i}" for i in range(3 * n_rest)]
            + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"])


def save_splats_ply(splats: dict[str, torch.Tensor], path: Path) -> Path:
    """Write 3D Gaussians (PromptGaussians.splats: means, log scales, quats (w, x, y, z), opacity logits, sh0 [N, 1, 3],
    shN [N, K - 1, 3] if any) as a binary little-endian .ply in 3DGS's layout: activations stored raw as 3DGS does
    (log scales, opacity logits), normals 0, f_rest channel by channel (all of R's coefficients, then G's, then B's)."""
    from plyfile import PlyData, PlyElement

    t = {k: v.detach().float().cpu() for k, v in splats.items()}
    n = t["means"].shape[0]
    rest = t.get("shN", torch.zeros(n, 0, 3))
    columns = [t["means"], torch.zeros(n, 3), t["sh0"][:, 0], rest.transpose(1, 2).reshape(n, -1), t["opacities"].reshape(n, 1),
               t["scales"], t["quats"]]
    values = torch.cat(columns, 1).numpy()
    names = splat_ply_properties(rest.shape[1])
    vertices = np.empty(n, dtype=[(name, "<f4") for name in names])
    for i, name in enumerate(names):
        vertices[name] = values[:, i]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        PlyData([PlyElement.describe(vertices, "vertex")], byte_order="<").write(str(tmp))
    return path


def load_splats_ply(path: Path) -> dict[str, torch.Tensor]:
    """A 3DGS-layout .ply (save_splats_ply, or another 3DGS tool's) -> splats as save_splats_ply takes them."""
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"]
    names = [p.name for p in vertex.properties]
    n_rest = sum(name.startswith("f_rest_") for name in names) // 3
    missing = [name for name in splat_ply_properties(n_rest) if name not in names and name not in ("nx", "ny", "nz")]
    if missing:
        raise ValueError(f"{path}: not a 3D Gaussian Splatting .ply: no vertex propert{'y' if len(missing) == 1 else 'ies'} "
                         f"{', '.join(missing)}")
    column = lambda *keys: torch.from_numpy(np.stack([np.asarray(vertex[k], np.float32) for k in keys], -1))  # noqa: E731
    n = len(vertex["x"])
    splats = {"means": column("x", "y", "z"), "scales": column("scale_0", "scale_1", "scale_2"),
              "quats": column("rot_0", "rot_1", "rot_2", "rot_3"), "opacities": column("opacity")[:, 0],
              "sh0": column("f_dc_0", "f_dc_1", "f_dc_2").reshape(n, 1, 3)}
    if n_rest:
        splats["shN"] = column(*(f"f_rest_{i}" for i in range(3 * n_rest))).reshape(n, 3, n_rest).transpose(1, 2).contiguous()
    return splats


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """round(255 clip(x, 0, 1)), channels last. images float [N, 3, H, W] or [3, H, W] -> uint8 [N, H, W, 3]."""
    images = torch.as_tensor(images)
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"to_uint8 expects float images [N, 3, H, W] or [3, H, W] (channels first, RGB), got shape {tuple(images.shape)}; "
            "permute channels-last tensors with .permute(0, 3, 1, 2)."
        )
    array = images.detach().float().cpu().clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()
    return np.round(array * 255.0).astype(np.uint8)


def _check_frames(frames: np.ndarray, what: str) -> np.ndarray:
    """Validate uint8 frames [N, H, W, 3] with N >= 1; returns them as a contiguous array."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(
            f"{what} expects uint8 frames [N, H, W, 3] with N >= 1, got dtype {frames.dtype} shape {frames.shape}; "
            "convert rendered float images with to_uint8."
        )
    return np.ascontiguousarray(frames)


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Edge-pad height and width up to even sizes (yuv420p needs them). [N, H, W, 3] -> [N, H + H%2, W + W%2, 3]."""
    _, height, width, _ = frames.shape
    return np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")


def ffmpeg_available() -> bool:
    """Whether imageio-ffmpeg can find an ffmpeg executable."""
    try:
        import imageio_ffmpeg

        return bool(imageio_ffmpeg.get_ffmpeg_exe())
    except (ImportError, RuntimeError):
        return False


def write_video(frames: np.ndarray, path: Path, fps: int = 24) -> Path:
    """Write frames uint8 [N, H, W, 3] as ``.mp4`` (H.264, yuv420p, odd sizes edge-padded to even) or ``.gif`` (loops forever).

    Without ffmpeg an ``.mp4`` request falls back to a ``.gif`` with the same stem (with a warning).
    Note the GIF writer merges consecutive identical frames. Returns the path actually written.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"unsupported video suffix {path.suffix!r} in {path}; allowed suffixes are {', '.join(VIDEO_SUFFIXES)}.")
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}; use e.g. 24.")
    frames = _check_frames(frames, "write_video")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".mp4" and not ffmpeg_available():
        gif_path = path.with_suffix(".gif")
        warnings.warn(f"ffmpeg is not available (install imageio-ffmpeg); writing {gif_path} instead of {path}.", stacklevel=2)
        path, suffix = gif_path, ".gif"
    with atomic_path(path) as tmp:
        if suffix == ".mp4":
            even = pad_to_even(frames)
            with imageio.get_writer(
                tmp, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=1
            ) as writer:
                for frame in even:
                    writer.append_data(frame)
        else:
            imageio.mimsave(tmp, list(frames), format="GIF", duration=1000.0 / fps, loop=0)
    return path


def contact_sheet(images: np.ndarray, path: Path, ncols: int | None = None, pad: int = 4) -> Path:
    """PNG grid of images uint8 [N, H, W, 3] on white, ``pad`` pixels around and between tiles.

    ncols defaults to ceil(sqrt(N)); nrows = ceil(N / ncols). Output size is
    (nrows H + (nrows + 1) pad) x (ncols W + (ncols + 1) pad). Returns the path written.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"contact_sheet writes PNG, got suffix {path.suffix!r} in {path}; use a path ending in .png.")
    images = _check_frames(images, "contact_sheet")
    count, height, width, _ = images.shape
    ncols = math.ceil(math.sqrt(count)) if ncols is None else ncols
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1 (or None for a near-square grid), got {ncols}.")
    if pad < 0:
        raise ValueError(f"pad must be >= 0 pixels, got {pad}.")
    ncols = min(ncols, count)
    nrows = math.ceil(count / ncols)
    sheet = np.full((nrows * height + (nrows + 1) * pad, ncols * width + (ncols + 1) * pad, 3), 255, np.uint8)
    for index, image in enumerate(images):
        row, col = divmod(index, ncols)
        top, left = pad + row * (height + pad), pad + col * (width + pad)
        sheet[top : top + height, left : left + width] = image
    with atomic_path(path) as tmp:
        imageio.imwrite(tmp, sheet, format="PNG")
    return path


def _slug(prompt: str) -> str:
    """Lowercase ASCII slug of [a-z0-9_-]: NFKD-transliterate, drop the rest, join words with '_', strip leading/trailing '_'/'-'."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9_-]+", "_", ascii_text)
    slug = re.sub(r"_+", "_", slug)
    return slug.strip("_-")


def _prompt_hash(prompt: str, length: int = 8) -> str:
    """Stable short hex digest of the full prompt: sha256(utf-8)[:length]."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:length]


def _fit(head: str, tail: str, max_bytes: int) -> str:
    """head truncated so head + tail fits in max_bytes (ASCII, so bytes = chars), trailing '_'/'-' of head removed."""
    return head[: max_bytes - len(tail)].rstrip("_-") + tail


def safe_output_names(prompts: list[str], max_bytes: int = 80) -> list[str]:
    """Filesystem-safe, unique, deterministic names for prompts (same order).

    Each name matches [a-z0-9][a-z0-9_-]* (so no path separators, no '..', no leading '.' or '-'),
    is at most ``max_bytes`` bytes, and is 'prompt' when nothing survives slugging. A slug longer
    than max_bytes is cut and suffixed with '_' + an 8-hex hash of the full prompt. Repeated names
    get '_2', '_3', ... choosing suffixes that no other prompt's name uses.
    """
    if max_bytes < 16:
        raise ValueError(f"max_bytes must be >= 16 to fit a truncated slug plus its hash, got {max_bytes}; use e.g. 80.")
    bases = []
    for prompt in prompts:
        slug = _slug(prompt) or "prompt"
        if len(slug) > max_bytes:
            slug = _fit(slug, "_" + _prompt_hash(prompt), max_bytes)
        bases.append(slug)
    reserved = set(bases)
    used: set[str] = set()
    names = []
    for base in bases:
        name = base
        if name in used:
            counter = 2
            while True:
                name = _fit(base, f"_{counter}", max_bytes)
                if name not in used and name not in reserved:
                    break
                counter += 1
        used.add(name)
        names.append(name)
    return names
