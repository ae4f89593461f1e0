"""One training micro-batch, forward only: the data path of the whole system in one function.

    batch (prompts + stored text embeddings)
      -> generator(text, z)                      a Representation per prompt      (amortized3d.generators)
      -> representation.render(cameras)          P x V images                     (amortized3d.rendering)
      -> prior.encode (prior_space)              the prior's space                (amortized3d.priors)
      -> score_distillation(prior, x, cond)      the distillation loss            (amortized3d.distillation)
      + the representation's regularizers and the learned branch's alignment loss

Every random number comes from the micro-batch's generator ``rng``, in a fixed order (cameras, latent,
backgrounds, renderer, VAE posterior, timesteps and noise, the learned branch, regularizer points), so
a step is a pure function of (parameters, batch, rng).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from amortized3d.config import ExperimentConfig
from amortized3d.data.loader import PromptBatch
from amortized3d.distillation.regularizers import opacity_entropy_loss, scheduled_weight, sparsity_loss, z_variance_loss
from amortized3d.distillation.score_distillation import guidance_scale, image_residual_loss, score_distillation, timestep_range
from amortized3d.interfaces import Conditioning, Generator, Prior
from amortized3d.priors.diffusers_prior import VIEW_SUFFIXES
from amortized3d.rendering.cameras import Cameras, sample_training_cameras
from amortized3d.rendering.volume import ImageRender


@dataclass
class StepResult:
    """The micro-batch's total loss, its metrics, and its render (3D Gaussians: ImageRender.splats for density control)."""

    loss: torch.Tensor
    metrics: dict[str, float]
    render: ImageRender | None = None


def batch_conditioning(batch: PromptBatch, cameras: Cameras, views_per_prompt: int, prior_suffixes: list[str],
                       text_is_prior_encoding: bool, multiview: bool = False) -> Conditioning:
    """The prior's condition for the batch's P x V images (prompt-major): its prompts and cameras, and the prior's
    own text embeddings where the batch carries them.

    cameras [P V]; prior_suffixes: the store's suffixes of each prompt (builders.prior_store_suffixes: '' for the
    plain prompt, then the four VIEW_SUFFIXES for view-dependent prompting and Perp-Neg), the batch's prior_text
    holding [P S, 77, C] rows prompt-major (no suffixes: the prior encodes the prompts itself, as the second prior of
    a two-phase run does); text_is_prior_encoding: the generator's embedding (batch.text) is the prior's own encoding
    of the plain prompt (text.encoder=prior); multiview: the prior's (Prior.multiview): each prompt's V views are one object.
    """
    P, V = len(batch.prompts), views_per_prompt
    rows = torch.arange(P).repeat_interleave(V)  # image -> its prompt
    stored = None if batch.prior_text is None or not prior_suffixes else batch.prior_text.tokens.view(P, len(prior_suffixes), *batch.prior_text.tokens.shape[1:])
    tokens = view_tokens = None
    if text_is_prior_encoding:
        tokens = batch.text.tokens
    elif "" in prior_suffixes and stored is not None:
        tokens = stored[:, prior_suffixes.index("")]
    if stored is not None and all(s in prior_suffixes for s in VIEW_SUFFIXES):
        view_tokens = stored[:, [prior_suffixes.index(s) for s in VIEW_SUFFIXES]]
    pick = lambda x: None if x is None else x[rows]  # noqa: E731
    return Conditioning([batch.prompts[i] for i in rows.tolist()], cameras, pick(tokens), pick(view_tokens), V if multiview else 1)


def prior_space(prior: Prior, renders: torch.Tensor, latents_of: tuple[int, int] | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """What the prior denoises of renders [B, C, H, W]: prior.encode of RGB images (latents_of None), or with
    render.latents the renders themselves, which are the prior's latents (C its latent channels) for images of size
    latents_of = (height, width), resized (bilinear, as the reference's rgb_as_latents) to the prior's latent size for
    that image size where theirs differs (training renders at that size) -> x [B, C', h, w], differentiable."""
    if latents_of is None:
        return prior.encode(renders, generator=generator)
    C, h, w = prior.space_shape(*latents_of)
    if renders.shape[1] != C:
        raise ValueError(f"the renders have {renders.shape[1]} channels, but the prior's latents have {C}: render.latents "
                         "takes a generator built by builders.build_generator (its colors are the priors' 4 latent channels) "
                         "and a prior whose latents have 4 channels (Stable Diffusion, MVDream, the latent analytic prior)")
    if renders.shape[-2:] != (h, w):
        renders = torch.nn.functional.interpolate(renders, size=(h, w), mode="bilinear", align_corners=False)
    return renders.float()


def distillation_step(cfg: ExperimentConfig, generator: Generator, prior: Prior, batch: PromptBatch, progress: float,
                      rng: torch.Generator, device, adapter=None, *, z_dim: int = 0, prior_suffixes: list[str] = ()) -> StepResult:
    """Forward pass and total loss for one micro-batch of P prompts x V views.

    generator: the (possibly data-parallel wrapped) generator; z_dim: its latent width (0: none); prior_suffixes:
    what the batch's stored prior embeddings hold (batch_conditioning). With a learned branch (VSD, LODS) the total
    also holds its alignment loss on the detached renders; it reaches only the adapter's parameters, the
    distillation loss only the generator's.
    """
    P, V = len(batch.prompts), cfg.train.views_per_prompt
    H, W = cfg.render.size_at(progress)
    latents_of = (H, W) if cfg.render.latents else None  # the field renders the prior's latents for H x W images
    if latents_of:  # at their own size (SD at 512: 64 x 64; the latent analytic prior: H/2 x W/2)
        H, W = prior.space_shape(H, W)[1:]
    text = batch.text.to(device)
    cameras = sample_training_cameras(P, V, cfg.camera.elevation_range, cfg.camera.distance_range, cfg.camera.fovy_range, rng, device,
                                      group_views=cfg.camera.group_views, relative_distance=cfg.camera.relative_distance)
    z = torch.randn(P, z_dim, generator=rng).to(device) if z_dim else None  # conv3d: a fresh latent per prompt and step
    representation = generator(text.pooled, text.tokens, z=z)
    background = None
    if cfg.render.random_background_prob > 0:
        mask = torch.rand(P, generator=rng) < cfg.render.random_background_prob
        background = (torch.rand(P, 3, generator=rng).to(device), mask.to(device))
    render = representation.render(cameras, H, W, cfg.render, generator=rng, background=background)
    images = prior_space(prior, render.rgb.reshape(P * V, -1, H, W), latents_of, generator=rng)
    cond = batch_conditioning(batch, cameras.reshape(P * V), V, list(prior_suffixes), cfg.text.encoder == "prior", prior.multiview)
    t_range = timestep_range(progress, cfg.distill.t_min, cfg.distill.t_max)
    out = score_distillation(prior, images, cond, method=cfg.distill.method, guidance_scale=guidance_scale(cfg.distill), t_range=t_range,
                             eta=cfg.distill.eta, generator=rng, adapter=adapter, asd_shift=cfg.distill.asd_shift,
                             t_schedule=cfg.distill.t_schedule, progress=progress, denoise_steps=cfg.distill.denoise_steps,
                             denoise_eta=cfg.distill.denoise_eta, recon_rescale=cfg.distill.recon_rescale)
    loss_sd = out.loss.mean()
    total = loss_sd
    metrics = {"loss_sd": loss_sd.item(), "t_min": t_range[0], "t_max": t_range[1], "grad_sd_norm": out.grad.flatten(1).norm(dim=1).mean().item()}
    if cfg.distill.rgb_weight > 0:  # HiFA's SDS+: the image-space residual to the decoded z_hat
        loss_rgb = image_residual_loss(prior, render.rgb.reshape(P * V, 3, H, W), out.denoised, out.timesteps, cfg.distill.rgb_weight).mean()
        total = total + loss_rgb
        metrics["loss_rgb"] = loss_rgb.item()
    if adapter is not None:
        alignment = adapter.alignment_loss(images, cond, rng)
        total = total + alignment
        metrics["adapter_loss"] = alignment.item()
    opacity = render.opacity
    terms = {"sparsity": lambda: sparsity_loss(opacity), "opacity_entropy": lambda: opacity_entropy_loss(opacity),
             "z_variance": lambda: z_variance_loss(opacity, render.z_variance)}
    for name, term in terms.items():
        w = scheduled_weight(getattr(cfg.regularizers, name), progress)
        if w > 0:
            reg = term()
            total = total + w * reg
            metrics[name] = reg.item()
    w = scheduled_weight(cfg.regularizers.eikonal, progress)
    if w > 0 and cfg.render.eikonal_points > 0:  # the representation's own terms (an SDF's eikonal term; a density field has none)
        n = max(1, cfg.render.eikonal_points // P)
        r = cfg.sampling_radius()
        points = (torch.rand(P, n, 3, generator=rng) * 2 - 1).to(device) * r
        for name, reg in representation.regularizers(points).items():
            total = total + scheduled_weight(getattr(cfg.regularizers, name), progress) * reg
            metrics[name] = reg.item()
    metrics["opacity"] = opacity.mean().item()
    if render.splats is not None:
        metrics["raster_ms"] = 1000 * render.splats.seconds
    return StepResult(total, metrics, render)
