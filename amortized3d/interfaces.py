"""The four interfaces the training data path plugs into, side by side:

    prompt -> text embedding -> Generator -> Representation -> render -> Prior (with a Conditioning) -> loss

    Generator        text embedding (+ optional latent z) -> a Representation of each prompt
    Representation   a batch of P 3D assets that renders images for P x V cameras (signed-distance or density
                     fields drawn by the volume renderer: amortized3d.rendering.volume.SDFRepresentation and
                     DensityRepresentation)
    Conditioning     what a prior conditions each noisy image on: prompt, camera, and the prior's own text
                     embeddings when they were read from the embedding store; plain data, passed explicitly
    Prior            a frozen diffusion model: images <-> its space, and one batched noise prediction

Implementations: generators in amortized3d/generators/ (hyper_ingp.py, conv3d.py, triplane.py; ngp.py, the field of
one prompt that a per-prompt run optimizes),
representations in amortized3d/rendering/volume.py (SDFRepresentation) and the generators' field classes, priors in
amortized3d/priors/ (analytic.py, diffusers_prior.py). Every attribute named here exists on every
implementation (no probing with getattr); a new implementation is one file that provides them,
plus one entry in the mapping that names it (amortized3d.generators.GENERATORS, amortized3d.priors.PRIORS,
amortized3d.distillation.methods.METHODS), from which amortized3d/builders.py builds what the config names.

Shapes: P prompts, V views per prompt, N rows of a batched prior call, C channels of the prior's space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from amortized3d.rendering.cameras import Cameras
from amortized3d.rendering.volume import ImageRender


class Representation(Protocol):
    """P 3D assets (one per prompt) that render images.

    geometry: "sdf" (a signed-distance field, rendered with VolSDF density) or "density" (a density field), which
    the renderer, the baked grids of `generate` and the mesh export read."""

    geometry: str

    def render(self, cameras: Cameras, height: int, width: int, settings, *, generator: torch.Generator | None = None,
               background: tuple[torch.Tensor, torch.Tensor] | None = None) -> ImageRender:
        """cameras [P, V] -> ImageRender with rgb [P, V, 3, H, W] in [0, 1] and opacity [P, V, 1, H, W].

        settings: the render section of the config (amortized3d.config.RenderConfig); generator: the random
        stream of the renderer's stratified sampling (None: deterministic); background (colors [P, 3],
        mask bool [P]): a solid background color for the masked prompts."""

    def regularizers(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        """The representation's own regularization terms by name (e.g. {"eikonal": scalar}) at points [P, N, 3]
        (random points in the scene, one set per prompt); the config's regularizers section weights them by name."""

    def occupancy(self, points: torch.Tensor) -> torch.Tensor:
        """Whether points [P, N, 3] lie inside each asset -> bool [P, N] (the oracle's 3D IoU)."""


class Generator(Protocol):
    """A torch.nn.Module mapping text embeddings to representations.

    Built as ``Generator(text_dim, config)`` with ``config`` an instance of its ``Config`` class (a pydantic model of
    its constructor arguments, kept as ``config``); z_dim: the width of the latent z it also takes (0: none)."""

    z_dim: int
    config: object

    def __call__(self, text_pooled: torch.Tensor, text_tokens: torch.Tensor | None = None,
                 z: torch.Tensor | None = None) -> Representation:
        """text_pooled [P, D], text_tokens [P, T, D], z [P, z_dim] or None -> a Representation of the P prompts."""

    def geometry_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters of shape and color (optimizer group at optim.lr_geometry)."""

    def decoder_parameters(self) -> list[torch.nn.Parameter]:
        """The MLPs that decode features into SDF and color, a part of geometry_parameters (their own optimizer group
        at optim.lr_decoder when it is set; [] where the decoders are not parameters, as Hyper-iNGP's)."""

    def background_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters of the background (optimizer group at optim.lr_background)."""


@dataclass
class Conditioning:
    """What a prior conditions N noisy images on, row by row.

    prompts (N): the prompt texts. cameras [N]: each image's camera.
    tokens [N, 77, C] or None: the prior's own text encoder on each prompt, when the batch carries it (read
    from the embedding store); None: the prior encodes ``prompts`` itself (the analytic prior reads the text).
    view_tokens [N, 4, 77, C] or None: the same on prompt + each of the prior's view suffixes
    (amortized3d.priors.diffusers_prior.VIEW_SUFFIXES), for view-dependent prompting and Perp-Neg.
    views_per_object: the rows come in consecutive groups of this many views of one object (one prompt, one
    timestep), which a multi-view prior (Prior.multiview) denoises jointly; 1 for single-view priors.
    """

    prompts: list[str]
    cameras: Cameras
    tokens: torch.Tensor | None = None
    view_tokens: torch.Tensor | None = None
    views_per_object: int = 1

    def __len__(self) -> int:
        return len(self.prompts)

    def select(self, rows: torch.Tensor) -> "Conditioning":
        """The rows ``rows`` (long [M]) of the N, in that order (M rows)."""
        pick = lambda x: None if x is None else x[rows.to(x.device)]  # noqa: E731
        return Conditioning([self.prompts[i] for i in rows.tolist()], self.cameras[rows.to(self.cameras.fovy.device)],
                            pick(self.tokens), pick(self.view_tokens), self.views_per_object)

    @staticmethod
    def orbits(prompts: list[str], cameras: Cameras, multiview: bool) -> "Conditioning":
        """Every prompt of ``prompts`` (P) seen from the same cameras [V], prompt-major (P V rows); with ``multiview``
        (the prior's) each prompt's V views are one object."""
        V = cameras.shape[0]
        return Conditioning([p for p in prompts for _ in range(V)], cameras.reshape(1, V)[[0] * len(prompts)].reshape(len(prompts) * V),
                            views_per_object=V if multiview else 1)

    def object_groups(self, timesteps: torch.Tensor, branch: torch.Tensor) -> int:
        """For a multi-view prior's call: check that the N rows form consecutive groups of views_per_object rows, each
        one prompt at one timestep on one branch, and return the group size V (ValueError naming the first bad group).
        timesteps, branch long [N]."""
        V, N = self.views_per_object, len(self)
        if V < 1 or N % V:
            raise ValueError(f"a multi-view prior denoises groups of views_per_object={V} views of one object, but the call "
                             f"has {N} rows; render train.views_per_prompt views per prompt and keep each prompt's views together")
        for name, values in (("timestep", timesteps.cpu()), ("branch", branch.cpu())):
            grouped = values.reshape(N // V, V)
            bad = (grouped != grouped[:, :1]).any(1).nonzero()
            if len(bad):
                g = int(bad[0])
                raise ValueError(f"the views of object {g} (rows {g * V}-{g * V + V - 1}) have different {name}s "
                                 f"{grouped[g].tolist()}; a multi-view prior takes one {name} per object")
        for g in range(N // V):
            if len(set(self.prompts[g * V:(g + 1) * V])) > 1:
                raise ValueError(f"the views of object {g} (rows {g * V}-{g * V + V - 1}) mix prompts "
                                 f"{sorted(set(self.prompts[g * V:(g + 1) * V]))}; a multi-view prior's object has one prompt")
        return V

    def repeat(self, n: int) -> "Conditioning":
        """The N rows n times over (n N rows): the condition of n branches batched into one prior call."""
        tile = lambda x: None if x is None else torch.cat([x] * n)  # noqa: E731
        return Conditioning(self.prompts * n, Cameras.cat([self.cameras] * n), tile(self.tokens), tile(self.view_tokens),
                            self.views_per_object)


class Prior(Protocol):
    """A frozen text-to-image diffusion model used as a score-distillation prior.

    alphas_cumprod [T]: its noise schedule. perp_neg: whether its guidance uses Perp-Neg's negative views
    (then predict_noise also answers the NEGATIVE_1 / NEGATIVE_2 branches and perp_neg_weights gives their
    weights). text_encoder: its own text encoder (what the embedding store encodes for it), or None when it
    reads prompts as text. multiview: whether it denoises the views of one object jointly (MVDream, the
    multi-view analytic prior): then its conditions group rows by Conditioning.views_per_object, and every group
    shares one prompt, timestep and branch.
    """

    alphas_cumprod: torch.Tensor
    perp_neg: bool
    text_encoder: object | None
    multiview: bool

    @classmethod
    def from_config(cls, cfg, text_encoder=None, device: str | torch.device = "cpu") -> "Prior":
        """The prior the experiment config ``cfg`` names (its ``Config`` is the prior section's part it reads);
        text_encoder: the generator's, shared when it is the prior's own (text.encoder=prior)."""

    def space_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w): the shape of encode's output for images of height x width (what a render.latents field renders
        directly, amortized3d.training.step.prior_space)."""

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> x [B, C, h, w] in the prior's space, differentiable."""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, h, w] -> images [B, 3, H', W'] in [0, 1]."""

    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                      branch: torch.Tensor) -> torch.Tensor:
        """eps(x_t, t, condition) for N rows at once: noisy [N, C, h, w], timesteps long [N], cond of N rows,
        branch long [N] (amortized3d.priors.branches: COND, UNCOND, NEGATIVE_1, NEGATIVE_2) -> eps [N, C, h, w]."""

    def perp_neg_weights(self, cameras: Cameras) -> torch.Tensor:
        """Perp-Neg's weights of the two negative views per camera: cameras [N] -> [N, 2]."""
