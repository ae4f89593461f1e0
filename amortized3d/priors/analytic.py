"""The analytic prior: a diffusion prior whose noise prediction is exact in closed form.

It stands in for Stable Diffusion on ShapeWorld prompts, so that the whole pipeline
runs, learns and is measured without weights. Images live in [0, 1] and the
encode/decode pair is the identity.

Conditional distribution. A prompt y parses into K equally likely scenes (K > 1
for under-specified prompts such as "a cube", any color and size). With mu_k(pi)
the render of scene k at camera pi,

    p(x | y, pi) = (1/K) sum_k N(x; mu_k(pi), s^2 I)

Unconditional distribution. A broad isotropic Gaussian around mid-gray that covers
the image cube:

    p(x | pi) = N(x; m 1, S^2 I)        (m = 0.5, S = 0.5 by default)

Noise prediction. With x_t = sqrt(a) x + sqrt(1 - a) eps and a = alphabar_t, each
component diffuses to N(sqrt(a) mu_k, v I) with v = a s^2 + 1 - a, and Tweedie's
formula eps*(x_t) = E[eps | x_t] = -sqrt(1 - a) grad log p_t(x_t) gives

    eps*(x_t, t, y, pi) = sqrt(1 - a) / v * sum_k r_k (x_t - sqrt(a) mu_k),
    r_k = softmax_k( -||x_t - sqrt(a) mu_k||^2 / (2 v) )

and for the unconditional Gaussian eps*(x_t, t, pi) = sqrt(1 - a) / v_u (x_t - sqrt(a) m),
v_u = a S^2 + 1 - a. Classifier-free guidance is eps_u + w (eps_c - eps_u), applied
by the caller as with any prior.

Multi-view (prior.kind=analytic_multiview): the V views of one object (Conditioning.views_per_object consecutive rows,
one prompt and one t) are one sample of the joint

    p(x_1..x_V | y, pi_1..pi_V) = (1/K) sum_k prod_v N(x_v; mu_k(pi_v), s^2 I)

so the scene is drawn once for all views. Every view still diffuses independently, and Tweedie's formula stays exact,
with responsibilities shared by the views:

    eps*_v = sqrt(1 - a) / v * sum_k r_k (x_t,v - sqrt(a) mu_k(pi_v)),
    r_k = softmax_k( -sum_v ||x_t,v - sqrt(a) mu_k(pi_v)||^2 / (2 v) )

For a prompt with one scene (K = 1) both priors coincide; for an under-specified one ("a cube") the per-view prior
lets each view pick its own scene, the joint one makes all views agree (the Janus problem in miniature).

Latent space (prior.latent=true): the exact counterpart of a latent diffusion prior. A fixed linear encoder
z = E(x) maps each 2 x 2 block of RGB pixels (12 values) to 4 channels, with orthonormal rows: the block's mean R, G
and B (each 1/2 times the sum of its four pixels) and a left-minus-right luminance edge (+-1 / (2 sqrt 3) on every
value), so E E^T = I, and the decoder is its pseudo-inverse D = E^T (E D = I; D E the projection onto E's row space).
A Gaussian mixture seen through E stays one: z ~ (1/K) sum_k N(E mu_k, s^2 E E^T) = (1/K) sum_k N(E mu_k, s^2 I), and
the unconditional Gaussian becomes N(E(m 1), S^2 I); so the formulas above hold in z with mu_k -> E mu_k and stay
exact. Latents are [B, 4, H/2, W/2] for renders [B, 3, H, W] (H, W even).
"""

from __future__ import annotations

import torch
from pydantic import Field

from amortized3d.interfaces import Conditioning
from amortized3d.priors.branches import COND, UNCOND
from amortized3d.priors.schedule import stable_diffusion_alphas_cumprod
from amortized3d.rendering.cameras import Cameras
from amortized3d.rendering.volume import render_images
from amortized3d.schema import ConfigModel, Int
from amortized3d.shapeworld import parse_prompt, scene_field


def render_prompt_scenes(
    prompts: list[str],
    cameras: Cameras,
    height: int,
    width: int,
    *,
    scene_radius: float,
    n_proposal: int,
    n_importance: int,
    inv_std: float,
    chunk_rays: int | None = None,
    importance_kernel: tuple[float, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ShapeWorld renders of every scene each prompt can mean.

    prompts (N), cameras [N, V] -> (rgb [N, K, V, 3, H, W], valid [N, K] bool),
    K the largest number of scenes of any prompt; invalid slots are zero.
    """
    singular = cameras.c2w[..., :3, :3].reshape(-1, 9).abs().sum(-1) == 0
    if singular.any():
        raise ValueError(f"{int(singular.sum())} camera(s) have an all-zero camera-to-world rotation, which renders no rays; "
                         "pass real cameras (amortized3d.rendering.cameras.look_at_cameras)")
    scenes_per_prompt = [parse_prompt(p) for p in prompts]
    K = max(len(s) for s in scenes_per_prompt)
    flat_scenes, owner, slot = [], [], []
    for n, scenes in enumerate(scenes_per_prompt):
        for k, scene in enumerate(scenes):
            flat_scenes.append(scene)
            owner.append(n)
            slot.append(k)
    owner_t = torch.tensor(owner, device=cameras.c2w.device)
    with torch.no_grad():
        render = render_images(
            scene_field(flat_scenes),
            cameras[owner_t],
            height,
            width,
            scene_radius=scene_radius,
            n_proposal=n_proposal,
            n_importance=n_importance,
            inv_std=inv_std,
            chunk_rays=chunk_rays,
            importance_kernel=importance_kernel,
        )
    N, V = cameras.shape
    rgb = torch.zeros(N, K, V, 3, height, width, device=render.rgb.device)
    valid = torch.zeros(N, K, dtype=torch.bool, device=render.rgb.device)
    rgb[owner_t, torch.tensor(slot, device=owner_t.device)] = render.rgb
    valid[owner_t, torch.tensor(slot, device=owner_t.device)] = True
    return rgb, valid


def mixture_noise_prediction(noisy: torch.Tensor, alphabar: torch.Tensor, means: torch.Tensor, valid: torch.Tensor, std: float,
                             views_per_object: int = 1) -> torch.Tensor:
    """E[eps | x_t] for x ~ (1/K) sum_k N(mu_k, s^2 I); with views_per_object V > 1, for each group of V consecutive
    rows (sharing alphabar and valid) jointly drawn from (1/K) sum_k prod_v N(mu_kv, s^2 I) (module docstring).

    noisy [N, C, H, W], alphabar [N], means [N, K, C, H, W], valid [N, K] -> eps [N, C, H, W].
    """
    a = alphabar.reshape(-1, 1, 1, 1, 1).to(noisy.dtype)
    v = a * std**2 + 1 - a
    diff = noisy.unsqueeze(1) - a.sqrt() * means  # [N, K, C, H, W]
    logits = -(diff**2).flatten(2).sum(-1) / (2 * v.reshape(-1, 1))
    logits = logits.masked_fill(~valid, float("-inf"))
    if views_per_object > 1:  # one scene for the whole group: the views' log-likelihoods add up
        logits = logits.unflatten(0, (-1, views_per_object)).sum(1).repeat_interleave(views_per_object, 0)
    resp = torch.softmax(logits, dim=1).reshape(*valid.shape, 1, 1, 1)
    return ((1 - a).sqrt() / v * resp * diff).sum(1)


def latent_encoder_weight() -> torch.Tensor:
    """The linear encoder of the latent analytic prior as a stride-2 convolution weight [4, 3, 2, 2] (module docstring):
    channels 0-2 the block means of R, G, B (1/2 on their four pixels), channel 3 the left-minus-right edge
    (+1/(2 sqrt 3) on the left column of every color, -1/(2 sqrt 3) on the right). Its 4 rows (flattened) are orthonormal."""
    weight = torch.zeros(4, 3, 2, 2)
    for c in range(3):
        weight[c, c] = 0.5
    weight[3, :, :, 0], weight[3, :, :, 1] = 1 / (2 * 3**0.5), -1 / (2 * 3**0.5)
    return weight


def gaussian_noise_prediction(noisy: torch.Tensor, alphabar: torch.Tensor, mean: float | torch.Tensor, std: float) -> torch.Tensor:
    """E[eps | x_t] for x ~ N(m, S^2 I), m a number or an image [C, H, W]. noisy [N, C, H, W], alphabar [N] -> [N, C, H, W]."""
    a = alphabar.reshape(-1, 1, 1, 1).to(noisy.dtype)
    v = a * std**2 + 1 - a
    return (1 - a).sqrt() / v * (noisy - a.sqrt() * mean)


class AnalyticPriorConfig(ConfigModel):
    """The analytic prior's config: s (std), m and S of the unconditional Gaussian (uncond_mean, uncond_std), and the
    samples per ray of its ground-truth renders."""

    std: float = Field(0.05, gt=0, le=10)
    latent: bool = False  # the fixed linear 2x2 -> 4-channel encoder (module docstring): an exact latent-space prior
    uncond_mean: float = Field(0.5, ge=0, le=1)
    uncond_std: float = Field(0.5, gt=0, le=100)
    n_proposal: Int = Field(64, ge=1, le=4096)
    n_importance: Int = Field(32, ge=0, le=4096)


class AnalyticPrior:
    """Closed-form diffusion prior over ShapeWorld renders (see the module docstring).

    Same interface as the diffusers priors: ``encode``/``decode`` between images and
    the prior's space, and one batched ``predict_noise`` for all branches. The scenes are
    rendered inside the sphere of ``scene_radius`` with the renderer's ``inv_std`` (render.*).
    """


    Config = AnalyticPriorConfig

    @classmethod
    def from_config(cls, cfg, text_encoder=None, device: str | torch.device = "cpu") -> "AnalyticPrior":
        """From the experiment config: its prior section's AnalyticPriorConfig, prior.kind (analytic or
        analytic_multiview), and the renderer's scene radius and inv_std (render.*); ``text_encoder`` and ``device``
        are unused (it reads prompts as text, on the CPU)."""
        return cls(cfg.prior.part(AnalyticPriorConfig), scene_radius=cfg.render.scene_radius, inv_std=cfg.render.inv_std,
                   multiview=cfg.prior.kind == "analytic_multiview")

    def __init__(self, config: AnalyticPriorConfig, *, scene_radius: float, inv_std: float, multiview: bool = False):
        self.config, self.multiview = config, multiview
        self.std, self.uncond_mean, self.uncond_std = config.std, config.uncond_mean, config.uncond_std
        self.render_kwargs = dict(scene_radius=scene_radius, n_proposal=config.n_proposal, n_importance=config.n_importance, inv_std=inv_std)
        self.alphas_cumprod = stable_diffusion_alphas_cumprod()
        self._render_cache: dict[tuple, tuple[torch.Tensor, int]] = {}  # _scene_renders

    def space_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of what encode gives for images of height x width: (3, H, W), or with prior.latent (4, H/2, W/2)."""
        return (4, height // 2, width // 2) if self.config.latent else (3, height, width)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> the prior's space: the images themselves, or with prior.latent the linear
        latents E(x) [B, 4, H/2, W/2] (``generator`` is unused: the encoder is deterministic)."""
        if not self.config.latent:
            return images
        if images.shape[-2] % 2 or images.shape[-1] % 2:
            raise ValueError(f"the latent analytic prior encodes 2 x 2 pixel blocks; the images are {tuple(images.shape[-2:])}: "
                             "render an even height and width (render.height, render.width, eval.resolution)")
        return torch.nn.functional.conv2d(images, latent_encoder_weight().to(images), stride=2)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The prior's space -> images: the identity, or with prior.latent the pseudo-inverse D = E^T,
        latents [B, 4, h, w] -> images [B, 3, 2h, 2w] (not clamped: D(z) of a noisy z may leave [0, 1])."""
        if not self.config.latent:
            return latents
        return torch.nn.functional.conv_transpose2d(latents, latent_encoder_weight().to(latents), stride=2)

    perp_neg = False  # its conditionals are exact per camera; Perp-Neg changes the text of text-to-image priors
    text_encoder = None  # it reads the prompts as text

    def perp_neg_weights(self, cameras: Cameras) -> torch.Tensor:
        raise ValueError("the analytic prior has no Perp-Neg negatives (prior.perp_neg needs a text-to-image prior)")

    RENDER_CACHE = 64  # renders of (prompt, camera, size) kept for the next calls (fixed cameras: e(t), the 2D toy)

    def _scene_renders(self, keys: list[tuple], prompts: list[str], cameras: Cameras, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The scene renders of each (prompt, camera): -> (rgb [U, K, 3, H, W], valid [U, K]), K the largest count of
        scenes among them. Renders of the last RENDER_CACHE keys are reused; the others are rendered in one batch."""
        cache, fresh = self._render_cache, None
        missing = [u for u, key in enumerate(keys) if key not in cache]
        if missing:
            idx = torch.tensor(missing, device=cameras.c2w.device)
            rgb, valid = render_prompt_scenes([prompts[u] for u in missing], cameras[idx].reshape(len(missing), 1), H, W,
                                              **self.render_kwargs)
            for j, u in enumerate(missing):
                cache[keys[u]] = (rgb[j, valid[j], 0], int(valid[j].sum()))
            while len(cache) > self.RENDER_CACHE:
                cache.pop(next(iter(cache)))  # the oldest
            if len(missing) == len(keys):
                fresh = rgb[:, :, 0], valid  # nothing reused: as rendered (training, whose cameras are random)
        if fresh is not None:
            return fresh
        K = max(cache[key][1] for key in keys)
        rgb = torch.zeros(len(keys), K, 3, H, W, device=cameras.c2w.device)
        valid = torch.zeros(len(keys), K, dtype=torch.bool, device=cameras.c2w.device)
        for u, key in enumerate(keys):
            scenes, k = cache[key]
            rgb[u, :k], valid[u, :k] = scenes, True
        return rgb, valid

    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, branch: torch.Tensor) -> torch.Tensor:
        """eps*(x_t, t, condition) for a batch mixing conditional and unconditional rows.

        noisy [N, C, h, w] (C = 3 and the render size, or with prior.latent C = 4 and half of it), timesteps long [N],
        cond of N rows (its prompts and cameras), branch [N] (COND or UNCOND, amortized3d.priors.branches) -> eps [N, C, h, w]. Rows sharing a prompt and camera share
        one ground-truth render. Multi-view: each group of cond.views_per_object rows is one object (module docstring).
        """
        prompts, cameras = cond.prompts, cond.cameras
        if ((branch != COND) & (branch != UNCOND)).any():
            raise ValueError("the analytic prior answers COND and UNCOND rows only (Perp-Neg negatives need prior.kind=stable_diffusion)")
        V = cond.object_groups(timesteps, branch) if self.multiview else 1
        N, _, h, w = noisy.shape
        H, W = (2 * h, 2 * w) if self.config.latent else (h, w)  # the renders the (latent) images come from
        alphabar = self.alphas_cumprod.to(noisy.device)[timesteps]
        uncond_mean = self.uncond_mean
        if self.config.latent:  # E(m 1): the block means of a gray image, no edge
            uncond_mean = self.encode(torch.full((1, 3, 2, 2), float(self.uncond_mean), device=noisy.device))[0]
        eps = gaussian_noise_prediction(noisy, alphabar, uncond_mean, self.uncond_std)
        cond_rows = [i for i in range(N) if int(branch[i]) == COND]
        if not cond_rows:
            return eps
        keys: dict[tuple, int] = {}
        unique_rows, row_to_unique = [], []
        for i in cond_rows:
            key = (prompts[i], cameras.c2w[i].detach().cpu().numpy().tobytes(), float(cameras.fovy[i]), H, W)
            if key not in keys:
                keys[key] = len(unique_rows)
                unique_rows.append(i)
            row_to_unique.append(keys[key])
        means, valid = self._scene_renders(list(keys), [prompts[i] for i in unique_rows], cameras[torch.tensor(unique_rows, device=noisy.device)], H, W)
        means = means.to(noisy.dtype)  # [U, K, 3, H, W]
        if self.config.latent:
            means = self.encode(means.flatten(0, 1)).unflatten(0, means.shape[:2])  # [U, K, 4, h, w]
        gather = torch.tensor(row_to_unique, device=noisy.device)
        rows = torch.tensor(cond_rows, device=noisy.device)
        eps = eps.clone()
        eps[rows] = mixture_noise_prediction(noisy[rows], alphabar[rows], means[gather], valid[gather], self.std, V)
        return eps
