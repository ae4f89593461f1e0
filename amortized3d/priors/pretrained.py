"""Finding pretrained diffusers folders: a local folder, or a Hugging Face hub id resolved to local files.

Every component (UNet, VAE, text encoder, tokenizer, scheduler) is then loaded with its own
``from_pretrained(folder, subfolder=...)`` from that local folder, so loading itself never
touches the network. A hub id is looked up in the local cache first; only when it is missing
there, and downloads are allowed (HF_HUB_OFFLINE is not set), are the needed files fetched.
Missing weights give one ``PretrainedLoadError`` that names the model, how to obtain the
weights and how to point at a local folder.

``random:NAME`` (``prior.model=random:stable-diffusion-2-1-base``, ``--clip random:clip-vit-large-patch14``) is a benchmarking mode: the real
architecture, from the configs shipped in amortized3d/priors/architectures/NAME (the checkpoint's own config.json
files, architecture facts only), with random weights (seeded, so the same every time) and CLIP's real tokenizer.
It needs no download and has the exact sizes, FLOPs and memory of the real model; its outputs are meaningless.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

# Weight files in formats other than safetensors, never fetched (the components load from safetensors).
DOWNLOAD_IGNORE = ["*.bin", "*.ckpt", "*.msgpack", "*.onnx", "*.h5"]


class PretrainedLoadError(RuntimeError):
    """Pretrained weights that cannot be found or loaded; the message says how to fix it."""


def hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def how_to_get(model: str) -> str:
    return (
        f"Download it on a machine with internet access (`hf download {model}`; accept the model's "
        "license on huggingface.co first if it asks), or copy a diffusers-format folder (model_index.json, unet/, vae/, "
        "text_encoder/, tokenizer/, scheduler/) to this machine and pass that folder with --prior PATH "
        "(or prior.model=PATH)."
    )


RANDOM_PREFIX = "random:"
# each diffusers prior kind's shipped architecture (benchmarks build the recipes' priors from these)
RANDOM_MODELS = {"stable_diffusion": "random:stable-diffusion-2-1-base", "deepfloyd_if": "random:deepfloyd-if-I-XL-v1.0",
                 "mvdream": "random:mvdream-sd21-base-4view"}
ARCHITECTURES = Path(__file__).with_name("architectures")
RANDOM_SEED = 0


class RandomWeightsWarning(UserWarning):
    """A prior or text encoder built with random weights (``random:NAME``): for measuring speed, FLOPs and memory."""


def is_random(model: str | None) -> bool:
    return bool(model) and model.startswith(RANDOM_PREFIX)


def random_architectures() -> list[str]:
    return sorted(p.name for p in ARCHITECTURES.iterdir() if p.is_dir())


def random_model_dir(model: str) -> Path:
    """The local folder of ``random:NAME`` (the layout of the real checkpoint: diffusers' component subfolders, or
    transformers' flat folder): the shipped configs of NAME, and beside each shipped tokenizer_config.json CLIP's
    tokenizer (BPE vocabulary from open-clip-torch) with its padding token, or for a T5 tokenizer (DeepFloyd IF) a
    word-level tokenizer in T5's layout over CLIP's words; written once to CACHE/random/NAME-<digest>.
    Warns (RandomWeightsWarning) that what is built from it is meaningless."""
    from amortized3d.data.embedding_store import cache_root

    name = model[len(RANDOM_PREFIX):]
    source = ARCHITECTURES / name
    if not name or not source.is_dir():
        raise PretrainedLoadError(f"{model!r} names no shipped architecture; choose one of "
                                  f"{', '.join(RANDOM_PREFIX + a for a in random_architectures())}")
    import warnings

    warnings.warn(f"{model!r} is the real architecture with random weights: a benchmarking mode for speed, FLOPs and memory; "
                  "its outputs, and anything trained against them, are meaningless", RandomWeightsWarning, stacklevel=3)
    files = sorted(p for p in source.rglob("*.json"))
    digest = hashlib.sha256(b"".join(str(p.relative_to(source)).encode() + p.read_bytes() for p in files)).hexdigest()[:12]
    folder = cache_root() / "random" / f"{name}-{digest}"
    if (folder / "model_index.json").is_file():
        return folder
    import tempfile

    from amortized3d.text.clip_vocabulary import clip_tokenizer, t5_style_tokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as work:
        staging = Path(work) / "folder"
        for path in files:
            target = staging / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
        for settings in source.rglob("tokenizer_config.json"):  # a vocabulary beside it, with the model's padding token
            declared = json.loads(settings.read_text())
            where = staging / settings.parent.relative_to(source)
            if declared.get("tokenizer_class") == "T5Tokenizer":  # no sentencepiece model without a download: T5's layout
                t5_style_tokenizer().save_pretrained(str(where))
            else:
                clip_tokenizer(Path(work) / "bpe", pad_token=declared["pad_token"]).save_pretrained(str(where))
        components = sorted({str(p.parent.relative_to(source)) for p in files} - {"."})
        (staging / "model_index.json").write_text(json.dumps({"_random_architecture": name, "components": components}))
        try:
            staging.rename(folder)
        except OSError:  # another process wrote it first
            if not (folder / "model_index.json").is_file():
                raise
    return folder


def _random_weights(cls, folder: Path, subfolder: str, torch_dtype=None):
    """``cls`` (a diffusers or transformers model class) built from folder/subfolder's config with seeded random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        if hasattr(cls, "load_config"):  # diffusers ModelMixin
            module = cls.from_config(cls.load_config(str(folder), subfolder=subfolder))
        else:  # transformers PreTrainedModel
            from transformers import AutoConfig

            module = cls._from_config(AutoConfig.from_pretrained(str(folder), subfolder=subfolder))
    # nn.Module.to: diffusers' own .to warns about casting after loading, which does not apply to fresh weights
    return torch.nn.Module.to(module, torch_dtype) if torch_dtype is not None else module


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(model: str) -> bool:
    """Anything that is not 'name' or 'owner/name' (hub id syntax) is taken as a folder path."""
    return not HUB_ID.match(model) or model.startswith(".")


def model_source(model: str) -> str | Path:
    """What ``from_pretrained`` reads for ``model``: the written folder of a ``random:`` model, else the hub id or path."""
    return random_model_dir(model) if is_random(model) else model


def resolve_model_dir(model: str, subfolders: list[str]) -> Path:
    """Local folder holding ``subfolders`` of ``model`` (a folder path or a hub id such as
    'stabilityai/stable-diffusion-2-1-base'; MVDream's checkpoint file or hub id MVDream/MVDream: its converted folder,
    amortized3d.priors.mvdream.converted_folder). Raises PretrainedLoadError when it is not available."""
    path = Path(model_source(model)).expanduser()
    from amortized3d.priors.mvdream import HUB_MODEL, converted_folder

    if path.is_file() or model == HUB_MODEL:  # MVDream's original checkpoint, converted once into a diffusers folder
        path = converted_folder(model)
    if path.is_dir():
        missing = [s for s in subfolders if not (path / s).is_dir()]
        if missing:
            raise PretrainedLoadError(
                f"{str(path)!r} is not a complete diffusers folder: it lacks {', '.join(s + '/' for s in missing)}. "
                "Pass the folder that holds model_index.json and the component subfolders."
            )
        return path
    if _looks_like_path(model):
        raise PretrainedLoadError(f"prior folder {model!r} does not exist. Pass an existing diffusers folder or a hub id. " + how_to_get(model))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["model_index.json"] + [f"{s}/*" for s in subfolders]
    try:
        folder = Path(snapshot_download(model, allow_patterns=patterns, ignore_patterns=DOWNLOAD_IGNORE, local_files_only=True))
        if all((folder / s).is_dir() for s in subfolders):
            return folder
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass
    if hub_offline():
        raise PretrainedLoadError(
            f"the weights of {model!r} ({', '.join(subfolders)}) are not in the local Hugging Face cache and downloads "
            "are turned off (HF_HUB_OFFLINE=1). " + how_to_get(model)
        )
    try:
        return Path(snapshot_download(model, allow_patterns=patterns, ignore_patterns=DOWNLOAD_IGNORE))
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise PretrainedLoadError(f"could not download {model!r}: {type(err).__name__}: {err}. " + how_to_get(model)) from err


def load_component(cls, folder: Path, subfolder: str, model: str, **kwargs):
    """``cls.from_pretrained(folder, subfolder=subfolder, **kwargs)`` with a clear error naming ``model``; for a
    ``random:`` model, models (classes with weights) are built from the config with random weights instead."""
    if is_random(model) and hasattr(cls, "parameters"):
        return _random_weights(cls, folder, subfolder, kwargs.get("torch_dtype"))
    try:
        return cls.from_pretrained(str(folder), subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        raise PretrainedLoadError(
            f"could not load {subfolder}/ of {model!r} from {str(folder)!r}: {type(err).__name__}: {err}. " + how_to_get(model)
        ) from err
