"""An offline, deterministic text encoder for the embedded ShapeWorld.

Real priors come with their own CLIP text encoders; this one needs no weights and
gives the same two outputs the generators consume:

    tokens [P, 77, D]  per-token embeddings (padding rows are zero)
    pooled [P, D]      one vector per prompt

Each word w gets a fixed random vector u(w) ~ N(0, I / D) seeded by a hash of the
word, and each adjacent word pair (a, b) a vector u(a|b). The pair vectors bind a
color to its shape ("red cube" vs "blue cube") and keep word order, which a bag of
words loses ("a cube on top of a sphere" vs "a sphere on top of a cube").

    token_i = u(w_i) + u(w_{i-1} | w_i) + u(#position_i)
    pooled  = (sum_i u(w_i) + 0.5 sum_i u(w_{i-1} | w_i)) / sqrt(1.25 n)   over the n words

The pair vectors weigh less in the pooled vector so that a prompt recombining
seen words ("a green sphere" after "a green cube" and "a red sphere") lands near
the prompts it recombines.

Tokenization lowercases and splits on anything that is not a letter or digit.
Sequences longer than 75 words are truncated before adding the begin/end tokens,
so the end token is never dropped.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import torch

MAX_LENGTH = 77
PAIR_WEIGHT = 0.5
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


@dataclass
class TextEmbedding:
    """tokens [P, T, D], pooled [P, D], mask [P, T] (True on real tokens)."""

    tokens: torch.Tensor
    pooled: torch.Tensor
    mask: torch.Tensor

    def to(self, device) -> "TextEmbedding":
        return TextEmbedding(self.tokens.to(device), self.pooled.to(device), self.mask.to(device))

    def __getitem__(self, index) -> "TextEmbedding":
        return TextEmbedding(self.tokens[index], self.pooled[index], self.mask[index])


def tokenize_words(prompt: str) -> list[str]:
    """'A red cube, on top!' -> ['a', 'red', 'cube', 'on', 'top']"""
    return _WORD.findall(prompt.lower())


class HashedTextEncoder:
    """Deterministic hashed word and word-pair embeddings; no weights, no downloads."""

    def __init__(self, dim: int = 1024, max_length: int = MAX_LENGTH):
        if dim < 8:
            raise ValueError(f"text.dim={dim} is too small; use at least 8 (1024 matches Stable Diffusion 2.1's pooled size)")
        self.dim = dim
        self.max_length = max_length
        self.identity = f"hashed-v1-d{dim}-t{max_length}"  # what an embedding store built with it is bound to
        self._cache: dict[str, torch.Tensor] = {}

    def _vector(self, key: str) -> torch.Tensor:
        vec = self._cache.get(key)
        if vec is None:
            seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little") & ((1 << 63) - 1)
            gen = torch.Generator().manual_seed(seed)
            vec = torch.randn(self.dim, generator=gen) / self.dim**0.5
            self._cache[key] = vec
        return vec

    def encode(self, prompts: list[str]) -> TextEmbedding:
        """prompts (length P) -> TextEmbedding with tokens [P, 77, D], pooled [P, D]."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts; wrap a single prompt as [prompt]")
        P, T = len(prompts), self.max_length
        tokens = torch.zeros(P, T, self.dim)
        pooled = torch.zeros(P, self.dim)
        mask = torch.zeros(P, T, dtype=torch.bool)
        for p, prompt in enumerate(prompts):
            words = ["<bos>"] + tokenize_words(prompt)[: T - 2] + ["<eos>"]
            content = []
            for i, word in enumerate(words):
                pair = self._vector(f"{words[i - 1]}|{word}") if i > 0 else torch.zeros(self.dim)
                unigram = self._vector(word)
                tokens[p, i] = unigram + pair + self._vector(f"#position{i}")
                if 0 < i < len(words) - 1:
                    content.append(unigram + PAIR_WEIGHT * pair)
            mask[p, : len(words)] = True
            if content:
                pooled[p] = torch.stack(content).sum(0) / ((1 + PAIR_WEIGHT**2) * len(content)) ** 0.5
        return TextEmbedding(tokens, pooled, mask)
