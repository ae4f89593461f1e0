"""CLIP models for evaluation, through transformers or open_clip, behind one small interface:

    image_size                       the vision tower's input size (224 for ViT-L/14 and ViT-B/32)
    encode_text(prompts)    -> [N, E] unit-norm projected text features (77 tokens, end token kept)
    encode_images(images)   -> [B, E] unit-norm projected image features; images [B, 3, H, W] in [0, 1]
    identity                         model name and a fingerprint of its files (keys the text-feature cache)

Images are preprocessed as each library's own preprocessing does for a square image: a bicubic
resize to image_size when H, W differ from it (renders made at image_size need none), then the
per-channel normalization from the model's preprocessing config.

    load_clip("openai/clip-vit-large-patch14")       transformers: a hub id or a folder with
                                                     config.json, weights, tokenizer and
                                                     preprocessor_config.json (the reference protocol's model)
    load_clip("random:clip-vit-large-patch14")     ViT-L/14's architecture with random weights: for measuring
                                                     cost only (amortized3d.priors.pretrained)
    load_clip("open_clip:ViT-L-14@openai")           open_clip: architecture @ pretrained tag or weights file
                                                     (no tag: openai)
    load_clip("open_clip:ViT-B-32@laion2b_s34b_b79k")
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from amortized3d.text.pretrained_encoder import folder_fingerprint

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
OPEN_CLIP_PREFIX = "open_clip:"
CONTEXT_LENGTH = 77
MIN_VOCABULARY = 1000


class ClipLoadError(RuntimeError):
    """A CLIP model that cannot be found or loaded, with what to do about it."""


def resize_to_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """images [B, 3, H, W] in [0, 1] -> [B, 3, size, size] float: a bicubic resize with antialiasing, as CLIP's
    preprocessing does (unchanged when already at size)."""
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return x


def _normalize(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = resize_to_input(images, size)
    return (x - mean.view(1, 3, 1, 1).to(x.device)) / std.view(1, 3, 1, 1).to(x.device)


class TransformersClip:
    """transformers' CLIPModel with its tokenizer and image-processor settings."""

    def __init__(self, model: str, device="cpu", dtype: torch.dtype = torch.float32):
        from amortized3d._compat import import_torchvision_safely

        import_torchvision_safely()
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        from amortized3d.priors.pretrained import is_random, load_component, model_source

        random = is_random(model)
        source = model_source(model)  # random:NAME: a benchmarking mode (priors.pretrained)
        try:
            if random:
                self.model = load_component(CLIPModel, source, "", model, torch_dtype=dtype).eval().requires_grad_(False).to(device)
            else:
                self.model = CLIPModel.from_pretrained(model, torch_dtype=dtype).eval().requires_grad_(False).to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(source)
            processor = CLIPImageProcessor.from_pretrained(source)
        except OSError as err:
            raise ClipLoadError(
                f"cannot load the CLIP model {model!r} ({err}). Download it on a machine with internet access "
                f"(`hf download {model}`), or pass a local folder with --clip PATH"
            ) from None
        if len(self.tokenizer) < MIN_VOCABULARY:
            raise ClipLoadError(f"the tokenizer of {model!r} has only {len(self.tokenizer)} tokens: its files are missing or broken")
        self.image_size = int(self.model.config.vision_config.image_size)
        self.mean, self.std = torch.tensor(processor.image_mean), torch.tensor(processor.image_std)
        self.device = torch.device(device)
        local = Path(source)
        self.identity = f"transformers:{model}@{folder_fingerprint(local) if local.is_dir() else 'hub'}"

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=CONTEXT_LENGTH, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(input_ids=ids.input_ids.to(self.device), attention_mask=ids.attention_mask.to(self.device))
        out = getattr(out, "pooler_output", out)
        return F.normalize(out.float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = _normalize(images, self.image_size, self.mean, self.std).to(self.device, self.model.dtype)
        out = self.model.get_image_features(pixel_values=x)
        out = getattr(out, "pooler_output", out)
        return F.normalize(out.float(), dim=-1)


class OpenClip:
    """open_clip's model (any architecture and pretrained tag or weights file) with its tokenizer."""

    def __init__(self, arch: str, pretrained: str | None, device="cpu"):
        from amortized3d._compat import import_torchvision_safely

        import_torchvision_safely()
        try:
            import open_clip
        except ImportError as err:
            raise ClipLoadError(f"the open_clip backend needs open-clip-torch with torchvision ({err}); "
                                "use a transformers model (--clip openai/clip-vit-large-patch14) or install them") from None
        if arch not in open_clip.list_models():
            raise ClipLoadError(f"open_clip has no architecture {arch!r}; see open_clip.list_models(), e.g. ViT-L-14 or ViT-B-32")
        try:
            self.model = open_clip.create_model(arch, pretrained=pretrained or None, device=device).eval().requires_grad_(False)
        except (RuntimeError, OSError) as err:
            raise ClipLoadError(f"cannot load open_clip {arch!r} with pretrained={pretrained!r} ({err}); "
                                "pass a pretrained tag from open_clip.list_pretrained() or a local weights file") from None
        self.tokenizer = open_clip.get_tokenizer(arch)
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = torch.tensor(getattr(self.model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        self.std = torch.tensor(getattr(self.model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        self.device = torch.device(device)
        weights = Path(pretrained) if pretrained else None
        tag = f"{weights.name}:{weights.stat().st_size}" if weights is not None and weights.is_file() else pretrained
        self.identity = f"open_clip:{arch}@{tag}"

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(list(prompts)).to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        x = _normalize(images, self.image_size, self.mean, self.std).to(self.device)
        return F.normalize(self.model.encode_image(x).float(), dim=-1)


def load_clip(spec: str = DEFAULT_CLIP, device="cpu") -> TransformersClip | OpenClip:
    """'open_clip:ARCH@TAG_OR_FILE' -> open_clip; anything else is a transformers hub id or folder (module docstring)."""
    if spec.startswith(OPEN_CLIP_PREFIX):
        arch, _, pretrained = spec[len(OPEN_CLIP_PREFIX):].partition("@")
        return OpenClip(arch, pretrained or "openai", device)  # no tag: OpenAI's weights (ViT-L-14, ViT-B-32, ...), never random ones
    return TransformersClip(spec, device)
