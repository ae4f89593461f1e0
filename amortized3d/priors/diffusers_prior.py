"""Diffusers text-to-image models as frozen score-distillation priors.

Two kinds, from any diffusers-format folder or hub id:
    stable_diffusion  Stable Diffusion 1.x / 2.x, latent space through its VAE
                      (default stabilityai/stable-diffusion-2-1-base)
    deepfloyd_if      DeepFloyd IF stage I, pixel space at the UNet's 64 x 64, T5 text encoder
                      (default DeepFloyd/IF-I-XL-v1.0); its UNet also predicts a variance
                      (6 output channels), of which only the noise half is used

The prior implements the same interface as the analytic prior:

    encode(images [B, 3, H, W] in [0, 1]) -> latents [B, 4, r/f, r/f], differentiable
        resize to r x r (prior.resolution, bilinear), map to [-1, 1], VAE-encode, take a posterior
        sample and multiply by the VAE's scaling factor (0.18215 for SD); f is the VAE's
        downsampling factor (8 for SD), so r = 512 gives 64 x 64 latents.
    decode(latents) -> images [B, 3, r, r] in [0, 1]
        (deepfloyd_if: encode resizes to the UNet's sample size and maps to [-1, 1]; decode maps back)
    predict_noise(x_t, t, prompts, cameras, branch) -> eps [N, 4, h, w]
        one UNet call for the whole batch: conditional rows see their prompt's token
        embeddings, unconditional rows the empty prompt's, Perp-Neg rows their negative view
        prompt's (amortized3d.priors.branches). A v-prediction checkpoint's output is converted
        to eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t.

View-dependent prompting (view_dependent) appends ", front view" (|azimuth| < 30 degrees),
", back view" (|azimuth| > 150), ", overhead view" (elevation > 60) or ", side view" to the
conditional prompt. Perp-Neg (perp_neg) instead interpolates the conditional embedding between
the view prompts and adds two negative view prompts per image, whose noise predictions enter
the guidance through their components perpendicular to eps_c - eps_u, with weights
perp_neg_weights(cameras) (score_distillation combines them).
    alphas_cumprod [1000] from the checkpoint's own scheduler config.

Cost of prior.resolution: the VAE encoder runs at r x r with gradient, and its activations
dominate memory (they scale with r^2); the UNet runs on (r / 8)^2 latents, so r = 256 makes
both about 4x cheaper than the reference 512 at the price of a prior that was trained at 512.
The weights are frozen (requires_grad False), in fp16 or bf16 on a GPU (prior.dtype), and the
UNet uses channels_last memory format.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from amortized3d.priors.branches import COND, NEGATIVE_1, UNCOND
from amortized3d.rendering.cameras import Cameras
from amortized3d.text.pretrained_encoder import TEXT_SUBFOLDERS, PretrainedTextEncoder

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
SUBFOLDERS = {
    "stable_diffusion": ["unet", "vae", "text_encoder", "tokenizer", "scheduler"],
    "deepfloyd_if": ["unet", "text_encoder", "tokenizer", "scheduler"],
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# View-dependent prompting: suffix per view, in the order of view_index's codes.
VIEW_SUFFIXES = (", side view", ", front view", ", back view", ", overhead view")
SIDE, FRONT, BACK, OVERHEAD = 0, 1, 2, 3
FRONT_DEGREES, BACK_DEGREES, OVERHEAD_DEGREES = 30.0, 150.0, 60.0
# Perp-Neg decays f(r) = a exp(-b r) + c per pair of views (Perp-Neg paper; threestudio's defaults).
PERP_NEG_FRONT_SIDE = (4.0, 0.5, -2.426)
PERP_NEG_SIDE_BACK = (1.0, 0.5, -0.606)
PERP_NEG_FRONT_SIDE_BACK = (1.0, 0.5, 0.967)
# The final weight of each negative is PERP_NEG_SCALE * f(r). ScaleDreamer's recipes set guidance_perp_neg: -0.5; its
# prompt processor returns -f(r), which the guidance multiplies by -1 * guidance_perp_neg: (-f)(-1)(-0.5) = -0.5 f.
PERP_NEG_SCALE = -0.5


def view_index(elevation: torch.Tensor, azimuth: torch.Tensor) -> torch.Tensor:
    """Per camera (degrees, azimuth in [-180, 180)): OVERHEAD if elevation > 60, else FRONT if
    |azimuth| < 30, BACK if |azimuth| > 150, else SIDE. -> long [N]."""
    index = torch.full(azimuth.shape, SIDE, dtype=torch.long)
    index[azimuth.abs() < FRONT_DEGREES] = FRONT
    index[azimuth.abs() > BACK_DEGREES] = BACK
    index[elevation > OVERHEAD_DEGREES] = OVERHEAD
    return index


def _decay(abc: tuple[float, float, float], r: torch.Tensor) -> torch.Tensor:
    a, b, c = abc
    return a * torch.exp(-b * r) + c


def perp_neg_decays(elevation: torch.Tensor, azimuth: torch.Tensor) -> torch.Tensor:
    """The decays f [N, 2] of the two negatives, before perp_neg_scale (final weight w_i = scale * f_i):

        |azimuth| < 90:  r = 1 - |az| / 90, negatives (front, side):  f = (f_fs(r), f_fs(1 - r))
        otherwise:       r = 2 - |az| / 90, negatives (side, front):  f = (f_sb(r), f_fsb(r))
        overhead (elevation > 60): 0 (its negatives are the empty prompt)

    with f_fs = 4 exp(-r / 2) - 2.426, f_sb = exp(-r / 2) - 0.606, f_fsb = exp(-r / 2) + 0.967. At azimuth 0
    the side negative has f = 1.574, so with the recipes' scale -0.5 its weight is -0.787: Perp-Neg subtracts
    the component of (eps_side - eps_u) perpendicular to eps_c - eps_u.
    """
    r_front = 1.0 - azimuth.abs() / 90.0
    r_back = 2.0 - azimuth.abs() / 90.0
    front_half = azimuth.abs() < 90.0
    first = torch.where(front_half, _decay(PERP_NEG_FRONT_SIDE, r_front), _decay(PERP_NEG_SIDE_BACK, r_back))
    second = torch.where(front_half, _decay(PERP_NEG_FRONT_SIDE, 1.0 - r_front), _decay(PERP_NEG_FRONT_SIDE_BACK, r_back))
    decays = torch.stack([first, second], -1)
    decays[elevation > OVERHEAD_DEGREES] = 0.0
    return decays


def perp_neg_terms(table: torch.Tensor, elevation: torch.Tensor, azimuth: torch.Tensor, null: torch.Tensor):
    """table [N, 4, 77, C] view-prompt embeddings (VIEW_SUFFIXES order), null [77, C] ->
    (positive [N, 77, C], negatives [N, 2, 77, C]); their weights are perp_neg_scale * perp_neg_decays.

    positive: overhead -> the overhead prompt; |az| < 90 -> r front + (1 - r) side, r = 1 - |az| / 90;
    else r side + (1 - r) back, r = 2 - |az| / 90. Negatives: (front, side) in the front half,
    (side, front) in the back half, the null embedding for overhead views (weight 0).
    """
    n = torch.arange(table.shape[0])
    r_front = (1.0 - azimuth.abs() / 90.0).view(-1, 1, 1)
    r_back = (2.0 - azimuth.abs() / 90.0).view(-1, 1, 1)
    front_half = (azimuth.abs() < 90.0).view(-1, 1, 1)
    side, front, back, overhead = (table[n, k] for k in (SIDE, FRONT, BACK, OVERHEAD))
    positive = torch.where(front_half, r_front * front + (1 - r_front) * side, r_back * side + (1 - r_back) * back)
    negatives = torch.where(front_half.unsqueeze(1), torch.stack([front, side], 1), torch.stack([side, front], 1))
    is_overhead = elevation > OVERHEAD_DEGREES
    positive[is_overhead] = overhead[is_overhead]
    negatives[is_overhead] = null.to(negatives.dtype)
    return positive, negatives


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is fp16 on CUDA and fp32 elsewhere (half-precision convolutions are slow or missing on CPU)."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


class DiffusionPrior:
    """Frozen UNet + VAE + scheduler constants of a Stable Diffusion checkpoint; text from ``text_encoder``."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        *,
        kind: str = "stable_diffusion",
        text_encoder: PretrainedTextEncoder | None = None,
        resolution: int = 512,
        dtype: str = "auto",
        device: str | torch.device = "cpu",
        view_dependent: bool = False,
        perp_neg: bool = False,
        perp_neg_scale: float = PERP_NEG_SCALE,
    ):
        from amortized3d._compat import import_torchvision_safely

        import_torchvision_safely()
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        from amortized3d.priors.pretrained import load_component, resolve_model_dir

        if kind not in SUBFOLDERS:
            raise ValueError(f"prior kind {kind!r} is not a diffusers prior; choose one of {', '.join(SUBFOLDERS)}")
        device = torch.device(device)
        self.model_name, self.kind = model, kind
        self.dtype = resolve_dtype(dtype, device)
        folder = resolve_model_dir(model, SUBFOLDERS[kind])
        self.text_encoder = text_encoder if text_encoder is not None else PretrainedTextEncoder(folder, model, device, self.dtype)
        self.unet = load_component(UNet2DConditionModel, folder, "unet", model, torch_dtype=self.dtype)
        self.vae = load_component(AutoencoderKL, folder, "vae", model, torch_dtype=self.dtype) if kind == "stable_diffusion" else None
        scheduler = load_component(DDPMScheduler, folder, "scheduler", model)
        for module in (self.unet, self.vae):
            if module is not None:
                module.requires_grad_(False).eval().to(device)
        self.unet.to(memory_format=torch.channels_last)
        text_width = self.unet.config.encoder_hid_dim or self.unet.config.cross_attention_dim
        if text_width != self.text_encoder.dim:
            raise ValueError(
                f"the UNet of {model!r} expects {text_width}-d text tokens but its text encoder "
                f"gives {self.text_encoder.dim}-d ones; the folder mixes components of different models"
            )
        self.device = device
        self.view_dependent, self.perp_neg, self.perp_neg_scale = bool(view_dependent), bool(perp_neg), float(perp_neg_scale)
        self.channels = int(self.unet.config.in_channels)
        if self.vae is None:  # pixel space: the UNet's own resolution, no latent scaling
            self.resolution, self.latent_scale, self.vae_factor = int(self.unet.config.sample_size), 1.0, 1
        else:
            self.resolution = int(resolution)
            self.latent_scale = float(self.vae.config.scaling_factor)
            self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.resolution % self.vae_factor:
            raise ValueError(f"prior.resolution={resolution} must be a multiple of the VAE's downsampling factor {self.vae_factor}")
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{model!r} predicts {self.prediction_type!r}; supported: epsilon, v_prediction")
        self.alphas_cumprod = scheduler.alphas_cumprod.float().to(device)  # [T]
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> latents [B, 4, r/f, r/f] (float32), with gradient to the images."""
        x = images
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        if self.vae is None:
            return 2.0 * x.float() - 1.0
        posterior = self.vae.encode((2.0 * x - 1.0).to(self.dtype)).latent_dist
        return posterior.sample(generator=generator).float() * self.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 4, h, w] -> images [B, 3, h f, w f] in [0, 1]."""
        images = latents.float() if self.vae is None else self.vae.decode((latents / self.latent_scale).to(self.dtype)).sample.float()
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(texts).tokens  # [N, 77, C]

    def text_condition(self, prompts: list[str], branch: torch.Tensor, cameras: Cameras | None = None) -> torch.Tensor:
        """Token embeddings [N, 77, C] for each row's branch (amortized3d.priors.branches):

        COND: the prompt; with view_dependent, the prompt plus its view suffix; with perp_neg, the
        interpolation between view prompts (see perp_neg_terms). UNCOND: the empty prompt.
        NEGATIVE_1 / NEGATIVE_2: Perp-Neg's two negative view prompts.
        """
        branch = torch.as_tensor(branch).long().cpu()
        if not (self.view_dependent or self.perp_neg) or cameras is None:
            if (branch > UNCOND).any():
                raise ValueError("Perp-Neg rows need prior.perp_neg and cameras")
            return self._embed(["" if int(b) == UNCOND else p for p, b in zip(prompts, branch)])
        out = self._embed([""] * len(prompts)).clone()
        rows = (branch != UNCOND).nonzero()[:, 0]
        if rows.numel() == 0:
            return out
        views = [[f"{prompts[i]}{suffix}" for suffix in VIEW_SUFFIXES] for i in rows.tolist()]
        table = self._embed([v for row in views for v in row]).view(len(views), len(VIEW_SUFFIXES), *out.shape[1:])
        sub = cameras[rows.to(cameras.c2w.device)]
        if self.perp_neg:
            positive, negatives = perp_neg_terms(table, sub.elevation.cpu(), sub.azimuth.cpu(), out[0])
            for j, i in enumerate(rows.tolist()):
                b = int(branch[i])
                out[i] = positive[j] if b == COND else negatives[j, b - NEGATIVE_1]
        else:
            index = view_index(sub.elevation.cpu(), sub.azimuth.cpu())
            out[rows] = table[torch.arange(len(views)), index]
        return out

    def perp_neg_weights(self, cameras: Cameras) -> torch.Tensor:
        """The final Perp-Neg weights [N, 2] of the two negatives: perp_neg_scale * perp_neg_decays (0 for overhead views)."""
        return self.perp_neg_scale * perp_neg_decays(cameras.elevation.cpu(), cameras.azimuth.cpu())

    def unet_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor, tokens: torch.Tensor,
                   class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The UNet's noise prediction eps(x_t, t, tokens): the one path every branch takes (the pretrained
        branches through predict_noise, and the learned branches of VSD and LODS with their adapters active).

        noisy [N, C, h, w], timesteps long [N], tokens [N, 77, D] text condition, class_labels [N, K] or None
        -> eps float32 [N, C, h, w]. Keeps the first C output channels (DeepFloyd IF's UNet also predicts a
        variance: 2C channels) and converts a v-prediction to eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t.
        Differentiable with respect to trainable parameters inside the UNet (adapters); the frozen weights get none.
        """
        x = noisy.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        steps = timesteps.to(self.device)
        out = self.unet(x, steps, encoder_hidden_states=tokens.to(self.device, self.dtype), class_labels=class_labels).sample
        out = out.float()[:, : self.channels]
        if self.prediction_type == "v_prediction":
            abar = self.alphas_cumprod[steps].view(-1, 1, 1, 1)
            out = abar.sqrt() * out + (1.0 - abar).sqrt() * noisy.to(self.device).float()
        return out

    @torch.no_grad()
    def predict_noise(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompts: list[str],
        cameras: Cameras,
        branch: torch.Tensor,
    ) -> torch.Tensor:
        """eps(x_t, t, condition) in one UNet call; noisy [N, 4, h, w], timesteps long [N], prompts (N),
        cameras [N], branch [N] (amortized3d.priors.branches) -> eps float32 [N, 4, h, w]."""
        return self.unet_noise(noisy, timesteps, self.text_condition(prompts, branch, cameras))


def load_prior_text_encoder(model: str, device="cpu", dtype: str = "auto") -> PretrainedTextEncoder:
    """Only the tokenizer and text encoder of ``model`` (what generate needs to condition a trained generator)."""
    from amortized3d.priors.pretrained import resolve_model_dir

    device = torch.device(device)
    folder: Path = resolve_model_dir(model, TEXT_SUBFOLDERS)
    return PretrainedTextEncoder(folder, model, device, resolve_dtype(dtype, device))
