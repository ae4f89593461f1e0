"""The prior's own CLIP text encoder (Stable Diffusion 1.x / 2.x), loaded with transformers.

    tokens [P, 77, C]  last hidden state, the UNet's cross-attention condition
    pooled [P, C]      the final-layer-normed hidden state at the end token (C = 1024 for SD 2.x)

Prompts longer than 77 tokens are truncated with the end token kept (the tokenizer truncates
the words, then adds begin and end tokens), and a warning names the prompt. A tokenizer whose
vocabulary is implausibly small is refused: offline, transformers can return a 2-token
tokenizer that maps every word to the unknown token. Encodings are cached per prompt string.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from amortized3d.text.hashed_encoder import TextEmbedding

MIN_VOCABULARY = 1000
CACHE_SIZE = 4096


class CLIPTextEncoder:
    """Frozen CLIP text tower from a diffusers folder's tokenizer/ and text_encoder/ subfolders."""

    def __init__(self, folder: str | Path, model: str | None = None, device="cpu", dtype=torch.float32):
        from amortized3d._compat import import_torchvision_safely

        import_torchvision_safely()
        from transformers import CLIPTextModel, CLIPTokenizer

        from amortized3d.priors.pretrained import PretrainedLoadError, load_component

        model = model or str(folder)
        self.tokenizer = load_component(CLIPTokenizer, Path(folder), "tokenizer", model)
        if len(self.tokenizer) < MIN_VOCABULARY:
            raise PretrainedLoadError(
                f"the tokenizer of {model!r} has a vocabulary of {len(self.tokenizer)} tokens (CLIP's has 49,408): its files "
                "are missing or broken, and every word would map to the unknown token. Re-download the tokenizer/ folder "
                "or pass a complete local folder with --prior PATH."
            )
        self.model = load_component(CLIPTextModel, Path(folder), "text_encoder", model, torch_dtype=dtype)
        self.model.requires_grad_(False).eval().to(device)
        self.max_length = self.tokenizer.model_max_length if self.tokenizer.model_max_length < 10_000 else 77
        self.dim = self.model.config.hidden_size
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """prompts (P) -> input ids long [P, 77] (begin, words, end, padding); warns about truncated prompts."""
        full = self.tokenizer(prompts, truncation=False).input_ids
        for prompt, ids in zip(prompts, full):
            if len(ids) > self.max_length:
                warnings.warn(
                    f"prompt {prompt[:60]!r}... has {len(ids) - 2} tokens; the text encoder reads {self.max_length - 2}, so it is "
                    "truncated (the end token is kept).",
                    stacklevel=3,
                )
        return self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = self.token_ids(prompts).to(self.device)
        out = self.model(input_ids=ids)
        eos = self.tokenizer.eos_token_id
        lengths = (ids == eos).int().argmax(-1) + 1  # tokens up to and including the first end token
        mask = torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]
        return out.last_hidden_state.float().cpu(), out.pooler_output.float().cpu(), mask.cpu()

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """prompts (length P) -> TextEmbedding with tokens [P, 77, C], pooled [P, C], mask [P, 77] (on CPU)."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts; wrap a single prompt as [prompt]")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            tokens, pooled, mask = self._encode_uncached(missing)
            if len(self._cache) + len(missing) > CACHE_SIZE:
                self._cache.clear()
            for i, prompt in enumerate(missing):
                self._cache[prompt] = (tokens[i], pooled[i], mask[i])
        rows = [self._cache[p] for p in prompts]
        return TextEmbedding(torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), torch.stack([r[2] for r in rows]))
