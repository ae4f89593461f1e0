"""CLIP's tokenizer built from the BPE vocabulary that the open-clip-torch package ships (no download): for the
tiny test models (amortized3d.priors.tiny), the random: architectures (amortized3d.priors.pretrained) and for
counting prompt tokens (`amortized3d corpus info`); and a word-level tokenizer in T5's layout over the same words,
for the T5 text encoders of DeepFloyd IF."""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from pathlib import Path


def clip_bpe_file() -> Path:
    """open_clip's bundled copy of CLIP's BPE merges (found without importing open_clip, which needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    path = Path(spec.origin).with_name("bpe_simple_vocab_16e6.txt.gz") if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "CLIP's BPE vocabulary comes from the open-clip-torch package, which is not installed; "
            "install it with `pip install --no-deps open-clip-torch` (its own dependencies are not needed for this)"
        )
    return path


def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merges) of CLIP's tokenizer, from open_clip's BPE file (49,408 tokens).

    The first 512 tokens are the 256 byte characters of byte-level BPE (bytes_to_unicode: CLIP's reversible
    map from byte values to printable unicode characters, in its order), then the same with "</w>" appended.
    """
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.open(clip_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    units = list(bytes_to_unicode().values())
    tokens = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def clip_tokenizer(workdir: Path, pad_token: str = "!"):
    """A transformers CLIPTokenizer with CLIP's vocabulary (SD 2.x pads with '!'); its source files go in workdir."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocabulary()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "vocab.json").write_text(json.dumps(vocab))
    (workdir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(workdir / "vocab.json"), str(workdir / "merges.txt"), pad_token=pad_token, model_max_length=77)


def t5_style_tokenizer():
    """A word-level tokenizer in T5's layout (<pad> 0, </s> 1, <unk> 2, end token appended, no begin token),
    whose words are CLIP's vocabulary (about 32,000 distinct words): a real T5 sentencepiece model
    cannot be made without downloads, and the tests need a realistic vocabulary size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab, _ = clip_vocabulary()
    words = sorted({t[: -len("</w>")] for t in vocab if t.endswith("</w>") and t[:-4].isalnum()})
    table = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(table, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=77)


def clip_token_counter():
    """count(prompts) -> the CLIP token count of each prompt (begin and end tokens included, untruncated);
    FileNotFoundError (saying how to install it) when open-clip-torch's vocabulary is not installed."""
    with tempfile.TemporaryDirectory() as work:
        tokenizer = clip_tokenizer(Path(work))

    def count(prompts: list[str]) -> list[int]:
        return [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False).input_ids]

    return count
