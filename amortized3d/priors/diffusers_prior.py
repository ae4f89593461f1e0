"""Diffusers text-to-image models as frozen score-distillation priors.

Three kinds, from any diffusers-format folder or hub id:
    stable_diffusion  Stable Diffusion 1.x / 2.x, latent space through its VAE
                      (default stabilityai/stable-diffusion-2-1-base)
    deepfloyd_if      DeepFloyd IF stage I, pixel space at the UNet's 64 x 64, T5 text encoder
                      (default DeepFloyd/IF-I-XL-v1.0); its UNet also predicts a variance
                      (6 output channels), of which only the noise half is used
    mvdream           MVDream's 4-view model (amortized3d.priors.mvdream): SD 2.1-base with a camera embedding and
                      self-attention across the views of each object; from its original checkpoint (default
                      MVDream/MVDream's sd-v2.1-base-4view.pt, converted once), at 256 x 256

The prior implements the same interface as the analytic prior:

    encode(images [B, 3, H, W] in [0, 1]) -> latents [B, 4, r/f, r/f], differentiable
        resize to r x r (prior.resolution, bilinear), map to [-1, 1], VAE-encode, take a posterior
        sample and multiply by the VAE's scaling factor (0.18215 for SD); f is the VAE's
        downsampling factor (8 for SD), so r = 512 gives 64 x 64 latents. With prior.tiny_encoder
        (TAESD) its encoder gives the scaled latents directly, about a tenth of the VAE encoder's FLOPs.
    decode(latents) -> images [B, 3, r, r] in [0, 1]
        (deepfloyd_if: encode resizes to the UNet's sample size and maps to [-1, 1]; decode maps back)
    predict_noise(x_t, t, cond, branch) -> eps [N, 4, h, w]
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

prior.model=random:stable-diffusion-2-1-base builds the real architecture with random weights and no download
(amortized3d.priors.pretrained): for measuring FLOPs, time and memory (benchmarks/recipe_step.py) only.

Cost of prior.resolution: the VAE encoder runs at r x r with gradient, and its activations
dominate memory (they scale with r^2); the UNet runs on (r / 8)^2 latents, so r = 256 makes
both about 4x cheaper than the reference 512 at the price of a prior that was trained at 512.
The weights are frozen (requires_grad False), in fp16 or bf16 on a GPU (prior.dtype), and the
UNet uses channels_last memory format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from amortized3d.interfaces import Conditioning
from amortized3d.priors.branches import COND, NEGATIVE_1, UNCOND
from amortized3d.rendering.cameras import Cameras
from amortized3d.schema import ConfigModel, Int
from amortized3d.text.pretrained_encoder import TEXT_SUBFOLDERS, PretrainedTextEncoder

DEFAULT_MODELS = {"stable_diffusion": "stabilityai/stable-diffusion-2-1-base", "deepfloyd_if": "DeepFloyd/IF-I-XL-v1.0",
                  "mvdream": "MVDream/MVDream"}
SUBFOLDERS = {
    "stable_diffusion": ["unet", "vae", "text_encoder", "tokenizer", "scheduler"],
    "deepfloyd_if": ["unet", "text_encoder", "tokenizer", "scheduler"],
    "mvdream": ["unet", "vae", "text_encoder", "tokenizer", "scheduler"],
}
DEFAULT_RESOLUTION = {"stable_diffusion": 512, "mvdream": 256}  # the image size each latent model was trained at
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# View-dependent prompting: suffix per view, in the order of view_index's codes.
VIEW_SUFFIXES = (", side view", ", front view", ", back view", ", overhead view")
SIDE, FRONT, BACK, OVERHEAD = 0, 1, 2, 3
FRONT_DEGREES, BACK_DEGREES, OVERHEAD_DEGREES = 30.0, 150.0, 60.0
# Perp-Neg decays f(r) = a exp(-b r) + c per pair of views (Perp-Neg paper; threestudio's defaults).
PERP_NEG_FRONT_SIDE = (4.0, 0.5, -2.426)
PERP_NEG_SIDE_BACK = (1.0, 0.5, -0.606)
PERP_NEG_FRONT_SIDE_BACK = (1.0, 0.5, 0.967)


class DiffusionPriorConfig(ConfigModel):
    """A diffusers prior's config.

    model: hub id or local diffusers folder (mvdream: also its checkpoint file); null: the kind's default (DEFAULT_MODELS).
    resolution: renders are resized to this before the VAE; null: the model's own (512 Stable Diffusion, 256 MVDream;
    IF always uses its UNet's size).
    tiny_encoder: null, or a tiny autoencoder (diffusers AutoencoderTiny: the hub id madebyollin/taesd, a folder, or
    random:taesd) whose encoder replaces the VAE's on the gradient path (stable_diffusion only). TAESD is distilled
    to give SD's latents (already scaled) for 1.2 M parameters instead of the VAE encoder's 34 M; decoding (the
    one-step previews) stays the VAE's.
    dtype: of the weights: auto = fp16 on CUDA, fp32 on CPU; or fp16, bf16, fp32.
    view_dependent: append ", front view" / ", side view" / ... to prompts by camera.
    perp_neg: Perp-Neg negative view prompts in the guidance; the final weight of each negative is
    perp_neg_scale * f(r). ScaleDreamer's recipes set guidance_perp_neg: -0.5; its prompt processor returns
    -f(r), which the guidance multiplies by -1 * guidance_perp_neg: (-f)(-1)(-0.5) = -0.5 f.
    """

    model: str | None = None
    resolution: Int | None = Field(None, ge=8, le=4096)
    tiny_encoder: str | None = None
    dtype: Literal[("auto", *DTYPES)] = "auto"
    view_dependent: bool = False
    perp_neg: bool = False
    perp_neg_scale: float = Field(-0.5, ge=-10, le=0, json_schema_extra={"hint": (
        "negative values push away from the other views' prompts (the reference recipes use -0.5); "
        "0 turns the negatives off, and a positive value would pull toward them")})


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


    Config = DiffusionPriorConfig

    @classmethod
    def from_config(cls, cfg, text_encoder=None, device: str | torch.device = "cpu") -> "DiffusionPrior":
        """From the experiment config: prior.kind and its prior section's DiffusionPriorConfig, sharing
        ``text_encoder`` when it is the model's own (text.encoder=prior)."""
        shared = text_encoder if isinstance(text_encoder, PretrainedTextEncoder) and cfg.text.encoder == "prior" else None
        return cls(cfg.prior.part(DiffusionPriorConfig), kind=cfg.prior.kind, text_encoder=shared, device=device)

    def __init__(
        self,
        config: DiffusionPriorConfig,
        *,
        kind: str = "stable_diffusion",
        text_encoder: PretrainedTextEncoder | None = None,
        device: str | torch.device = "cpu",
    ):
        from amortized3d._compat import import_torchvision_safely

        import_torchvision_safely()
        from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel

        from amortized3d.priors.pretrained import load_component, model_source, resolve_model_dir

        if kind not in SUBFOLDERS:
            raise ValueError(f"prior kind {kind!r} is not a diffusers prior; choose one of {', '.join(SUBFOLDERS)}")
        device = torch.device(device)
        model = config.model if config.model is not None else DEFAULT_MODELS[kind]
        self.config, self.model_name, self.kind = config, model, kind
        self.dtype = resolve_dtype(config.dtype, device)
        folder = resolve_model_dir(model, SUBFOLDERS[kind])
        self.text_encoder = text_encoder if text_encoder is not None else PretrainedTextEncoder(folder, model, device, self.dtype)
        self.unet = load_component(UNet2DConditionModel, folder, "unet", model, torch_dtype=self.dtype)
        self.vae = load_component(AutoencoderKL, folder, "vae", model, torch_dtype=self.dtype) if "vae" in SUBFOLDERS[kind] else None
        scheduler = load_component(DDPMScheduler, folder, "scheduler", model)
        self.tiny_encoder = None
        if config.tiny_encoder is not None:
            if self.vae is None:
                raise ValueError(f"prior.tiny_encoder={config.tiny_encoder!r}: a {kind} prior works in pixel space and encodes "
                                 "nothing; set prior.tiny_encoder=null")
            tiny = config.tiny_encoder
            self.tiny_encoder = load_component(AutoencoderTiny, model_source(tiny), None, tiny, torch_dtype=self.dtype)
        for module in (self.unet, self.vae, self.tiny_encoder):
            if module is not None:
                module.requires_grad_(False).eval().to(device)
        self.unet.to(memory_format=torch.channels_last)
        self.multiview = kind == "mvdream"
        if self.multiview:
            from amortized3d.priors.mvdream import set_multiview_attention

            if self.unet.config.class_embed_type != "projection" or self.unet.config.projection_class_embeddings_input_dim != 16:
                raise ValueError(f"{model!r} is not an MVDream model: its UNet has no 16-d camera embedding (class_embed_type "
                                 f"{self.unet.config.class_embed_type!r}); pass MVDream's checkpoint, or prior.kind=stable_diffusion")
            set_multiview_attention(self.unet)
        text_width = self.unet.config.encoder_hid_dim or self.unet.config.cross_attention_dim
        if text_width != self.text_encoder.dim:
            raise ValueError(
                f"the UNet of {model!r} expects {text_width}-d text tokens but its text encoder "
                f"gives {self.text_encoder.dim}-d ones; the folder mixes components of different models"
            )
        self.device = device
        self.view_dependent, self.perp_neg, self.perp_neg_scale = config.view_dependent, config.perp_neg, config.perp_neg_scale
        self.channels = int(self.unet.config.in_channels)
        if self.vae is None:  # pixel space: the UNet's own resolution, no latent scaling
            self.resolution, self.latent_scale, self.vae_factor = int(self.unet.config.sample_size), 1.0, 1
        else:
            self.resolution = config.resolution if config.resolution is not None else DEFAULT_RESOLUTION[kind]
            self.latent_scale = float(self.vae.config.scaling_factor)
            self.vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if self.tiny_encoder is not None:
            tiny_factor = 2 ** (len(self.tiny_encoder.config.encoder_block_out_channels) - 1)
            if (tiny_factor, self.tiny_encoder.config.latent_channels) != (self.vae_factor, self.vae.config.latent_channels):
                raise ValueError(f"prior.tiny_encoder={config.tiny_encoder!r} gives {self.tiny_encoder.config.latent_channels} channels "
                                 f"at 1/{tiny_factor} of the image size, but {model!r}'s latents are "
                                 f"{self.vae.config.latent_channels} channels at 1/{self.vae_factor}: use a tiny autoencoder "
                                 "distilled for this model's VAE (madebyollin/taesd for Stable Diffusion 1.x and 2.x)")
        if self.resolution % self.vae_factor:
            raise ValueError(f"prior.resolution={self.resolution} must be a multiple of the VAE's downsampling factor {self.vae_factor}")
        self.prediction_type = scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"{model!r} predicts {self.prediction_type!r}; supported: epsilon, v_prediction")
        self.alphas_cumprod = scheduler.alphas_cumprod.float().to(device)  # [T]
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def space_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, h, w) of what encode gives for images of height x width: (4, r/f, r/f) latents (SD, MVDream), or
        (3, r, r) pixels (DeepFloyd IF); r = prior.resolution whatever the images' size."""
        if self.vae is None:
            return 3, self.resolution, self.resolution
        side = self.resolution // self.vae_factor
        return int(self.vae.config.latent_channels), side, side

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> latents [B, 4, r/f, r/f] (float32), with gradient to the images."""
        x = images
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        if self.vae is None:
            return 2.0 * x.float() - 1.0
        if self.tiny_encoder is not None:  # its latents are the VAE's already multiplied by latent_scale (deterministic)
            return self.tiny_encoder.encode((2.0 * x - 1.0).to(self.dtype)).latents.float()
        posterior = self.vae.encode((2.0 * x - 1.0).to(self.dtype)).latent_dist
        return posterior.sample(generator=generator).float() * self.latent_scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B, 4, h, w] -> images [B, 3, h f, w f] in [0, 1]."""
        images = latents.float() if self.vae is None else self.vae.decode((latents / self.latent_scale).to(self.dtype)).sample.float()
        return ((images + 1.0) / 2.0).clamp(0.0, 1.0)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        return self.text_encoder.encode(texts).tokens  # [N, 77, C]

    def text_condition(self, cond: Conditioning, branch: torch.Tensor, views: bool = True) -> torch.Tensor:
        """Token embeddings [N, 77, C] for each row's branch (amortized3d.priors.branches), from the condition's
        stored tokens where it carries them, else from the prior's text encoder on its prompts:

        COND: the prompt; with view_dependent (and ``views``), the prompt plus its view suffix; with perp_neg, the
        interpolation between view prompts (see perp_neg_terms). UNCOND: the empty prompt.
        NEGATIVE_1 / NEGATIVE_2: Perp-Neg's two negative view prompts.
        """
        branch = torch.as_tensor(branch).long().cpu()
        uncond = (branch == UNCOND).tolist()
        null = self._embed([""])[0]
        if not (views and (self.view_dependent or self.perp_neg)):
            if (branch > UNCOND).any():
                raise ValueError("Perp-Neg rows need prior.perp_neg")
            if cond.tokens is None:
                return self._embed(["" if u else p for p, u in zip(cond.prompts, uncond)])
            tokens = cond.tokens.to(null.device)
            return torch.stack([null if u else tokens[i] for i, u in enumerate(uncond)])
        out = null.expand(len(cond), *null.shape).clone()
        rows = (branch != UNCOND).nonzero()[:, 0]
        if rows.numel() == 0:
            return out
        if cond.view_tokens is not None:
            table = cond.view_tokens[rows.to(cond.view_tokens.device)].to(out.device)
        else:
            views_text = [f"{cond.prompts[i]}{suffix}" for i in rows.tolist() for suffix in VIEW_SUFFIXES]
            table = self._embed(views_text).view(len(rows), len(VIEW_SUFFIXES), *out.shape[1:])
        sub = cond.cameras[rows.to(cond.cameras.c2w.device)]
        if self.perp_neg:
            positive, negatives = perp_neg_terms(table, sub.elevation.cpu(), sub.azimuth.cpu(), out[0])
            for j, i in enumerate(rows.tolist()):
                b = int(branch[i])
                out[i] = positive[j] if b == COND else negatives[j, b - NEGATIVE_1]
        else:
            index = view_index(sub.elevation.cpu(), sub.azimuth.cpu())
            out[rows] = table[torch.arange(len(rows)), index]
        return out

    def perp_neg_weights(self, cameras: Cameras) -> torch.Tensor:
        """The final Perp-Neg weights [N, 2] of the two negatives: perp_neg_scale * perp_neg_decays (0 for overhead views)."""
        return self.perp_neg_scale * perp_neg_decays(cameras.elevation.cpu(), cameras.azimuth.cpu())

    def unet_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor, tokens: torch.Tensor,
                   class_labels: torch.Tensor | None = None, num_frames: int = 1) -> torch.Tensor:
        """The UNet's noise prediction eps(x_t, t, tokens): the one path every branch takes (the pretrained
        branches through predict_noise, and the learned branches of VSD and LODS with their adapters active).

        noisy [N, C, h, w], timesteps long [N], tokens [N, 77, D] text condition, class_labels [N, K] or None (MVDream:
        the cameras), num_frames: MVDream's views per object (consecutive rows) -> eps float32 [N, C, h, w]. Keeps the first C output channels (DeepFloyd IF's UNet also predicts a
        variance: 2C channels) and converts a v-prediction to eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t.
        Differentiable with respect to trainable parameters inside the UNet (adapters); the frozen weights get none.
        """
        x = noisy.to(self.device, self.dtype).contiguous(memory_format=torch.channels_last)
        steps = timesteps.to(self.device)
        if class_labels is not None:  # in the class embedding's dtype (MVDream's frozen one, or VSD's trainable fp32 one)
            if self.unet.class_embedding is None:
                raise ValueError(f"class labels (cameras) were given, but the UNet of {self.model_name!r} has no class embedding to "
                                 "take them (MVDream's camera embedding, or VSD's camera adapter)")
            class_labels = class_labels.to(self.device, next(self.unet.class_embedding.parameters()).dtype)
        kwargs = {"cross_attention_kwargs": {"num_frames": num_frames}} if self.multiview else {}
        out = self.unet(x, steps, encoder_hidden_states=tokens.to(self.device, self.dtype), class_labels=class_labels, **kwargs).sample
        out = out.float()[:, : self.channels]
        if self.prediction_type == "v_prediction":
            abar = self.alphas_cumprod[steps].view(-1, 1, 1, 1)
            out = abar.sqrt() * out + (1.0 - abar).sqrt() * noisy.to(self.device).float()
        return out

    @torch.no_grad()
    def predict_noise(self, noisy: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning, branch: torch.Tensor) -> torch.Tensor:
        """eps(x_t, t, condition) in one UNet call; noisy [N, 4, h, w], timesteps long [N], cond of N rows,
        branch [N] (amortized3d.priors.branches) -> eps float32 [N, 4, h, w]. MVDream: every group of
        cond.views_per_object rows is one object, conditioned on its cameras (mvdream_cameras)."""
        if self.multiview:
            from amortized3d.priors.mvdream import mvdream_cameras

            V = cond.object_groups(timesteps, branch)
            return self.unet_noise(noisy, timesteps, self.text_condition(cond, branch), mvdream_cameras(cond.cameras), num_frames=V)
        return self.unet_noise(noisy, timesteps, self.text_condition(cond, branch))


def load_prior_text_encoder(model: str, device="cpu", dtype: str = "auto") -> PretrainedTextEncoder:
    """Only the tokenizer and text encoder of ``model`` (what generate needs to condition a trained generator)."""
    from amortized3d.priors.pretrained import resolve_model_dir

    device = torch.device(device)
    folder: Path = resolve_model_dir(model, TEXT_SUBFOLDERS)
    return PretrainedTextEncoder(folder, model, device, resolve_dtype(dtype, device))
