"""The prior's own text encoder, loaded with transformers from a diffusers folder.

CLIP (Stable Diffusion 1.x / 2.x) or T5 (DeepFloyd IF), chosen by text_encoder/config.json:

    tokens [P, 77, C]  last hidden state, the UNet's cross-attention condition
    pooled [P, C]      CLIP: the final-layer-normed hidden state at the end token (C = 1024 for
                       SD 2.x); T5 (which has no pooled output): the mean of the token states
                       over the prompt's tokens (C = 4096 for IF's T5-XXL)

Prompts longer than 77 tokens are truncated with the end token kept (the tokenizer truncates
the words, then adds the special tokens), and a warning names the prompt. A tokenizer whose
vocabulary is implausibly small is refused: offline, transformers can return a 2-token
tokenizer that maps every word to the unknown token. Encodings are cached per prompt string (up to CACHE_SIZE); in
training, the prompts' encodings come from the embedding store with the batch (amortized3d.interfaces.Conditioning)
and only the empty prompt is encoded here.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from amortized3d.text.hashed_encoder import MAX_LENGTH, TextEmbedding

MIN_VOCABULARY = 1000
CACHE_SIZE = 256  # prompts (77 x 1024 fp32 CLIP tokens: 80 MB; T5-XXL: 320 MB)
TEXT_SUBFOLDERS = ["text_encoder", "tokenizer"]


def folder_fingerprint(folder: Path, subfolders: tuple[str, ...] = ("",)) -> str:
    """12 hex digits of sha256 over the names and sizes of the files under ``folder``'s ``subfolders`` ('' is the
    folder itself) and the contents of their config.json files: what stores and feature caches are bound to."""
    digest = hashlib.sha256()
    for sub in subfolders:
        for path in sorted((folder / sub).rglob("*")) if (folder / sub).is_dir() else []:
            if path.is_file():
                digest.update(f"{path.relative_to(folder)}:{path.stat().st_size}".encode())
                if path.name == "config.json":
                    digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


class PretrainedTextEncoder:
    """Frozen CLIP or T5 text encoder from a diffusers folder's tokenizer/ and text_encoder/ subfolders."""

    def __init__(self, folder: str | Path, model: str | None = None, device="cpu", dtype=torch.float32):
        from amortized3d._compat import import_torchvision_safely

        import_torchvision_safely()
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModel, T5EncoderModel

        from amortized3d.priors.pretrained import PretrainedLoadError, load_component

        model = model or str(folder)
        config = load_component(AutoConfig, Path(folder), "text_encoder", model)
        if config.model_type not in ("clip_text_model", "t5"):
            raise PretrainedLoadError(f"the text encoder of {model!r} is a {config.model_type!r}; supported: CLIP (SD 1.x/2.x), T5 (DeepFloyd IF)")
        self.kind = "clip" if config.model_type == "clip_text_model" else "t5"
        self.tokenizer = load_component(AutoTokenizer, Path(folder), "tokenizer", model)
        if len(self.tokenizer) < MIN_VOCABULARY:
            raise PretrainedLoadError(
                f"the tokenizer of {model!r} has a vocabulary of {len(self.tokenizer)} tokens (CLIP's has 49,408, T5's 32,100): "
                "its files are missing or broken, and every word would map to the unknown token. Re-download the "
                "tokenizer/ folder or pass a complete local folder with --prior PATH."
            )
        model_class = CLIPTextModel if self.kind == "clip" else T5EncoderModel
        self.model = load_component(model_class, Path(folder), "text_encoder", model, torch_dtype=dtype)
        self.model.requires_grad_(False).eval().to(device)
        self.max_length = MAX_LENGTH  # SD's CLIP reads 77 tokens; IF's pipeline cuts T5 prompts at 77 too
        self.dim = self.model.config.hidden_size if self.kind == "clip" else self.model.config.d_model
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # what an embedding store built with it is bound to: the model, its files, the precision it runs in
        self.identity = f"{model}@{folder_fingerprint(Path(folder), tuple(TEXT_SUBFOLDERS))}:{str(dtype).removeprefix('torch.')}"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """prompts (P) -> input ids long [P, 77] (begin, words, end, padding); warns about truncated prompts."""
        full = self.tokenizer(prompts, truncation=False, verbose=False).input_ids
        for prompt, ids in zip(prompts, full):
            if len(ids) > self.max_length:
                warnings.warn(
                    f"prompt {prompt[:60]!r}... has {len(ids)} tokens with the special ones; the text encoder reads {self.max_length}, "
                    "so it is truncated (the end token is kept).",
                    stacklevel=3,
                )
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = self.token_ids(prompts).to(self.device)
        eos = self.tokenizer.eos_token_id
        lengths = (ids == eos).int().argmax(-1) + 1  # tokens up to and including the first end token
        mask = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
        if self.kind == "clip":
            out = self.model(input_ids=ids)
            return out.last_hidden_state.float().cpu(), out.pooler_output.float().cpu(), mask.cpu()
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()
        pooled = (tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return tokens.cpu(), pooled.cpu(), mask.cpu()

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """prompts (length P) -> TextEmbedding with tokens [P, 77, C], pooled [P, C], mask [P, 77] (on CPU)."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts; wrap a single prompt as [prompt]")
        found = {p: self._cache.get(p) for p in dict.fromkeys(prompts)}
        missing = [p for p, row in found.items() if row is None]
        if missing:
            tokens, pooled, mask = self._encode_uncached(missing)
            if len(self._cache) + len(missing) > CACHE_SIZE:
                self._cache.clear()
            for i, prompt in enumerate(missing):
                found[prompt] = self._cache[prompt] = (tokens[i], pooled[i], mask[i])
        rows = [found[p] for p in prompts]
        return TextEmbedding(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows]))
