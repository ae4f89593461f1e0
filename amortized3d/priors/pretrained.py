"""Finding pretrained diffusers folders: a local folder, or a Hugging Face hub id resolved to local files.

Every component (UNet, VAE, text encoder, tokenizer, scheduler) is then loaded with its own
``from_pretrained(folder, subfolder=...)`` from that local folder, so loading itself never
touches the network. A hub id is looked up in the local cache first; only when it is missing
there, and downloads are allowed (HF_HUB_OFFLINE is not set), are the needed files fetched.
Missing weights give one ``PretrainedLoadError`` that names the model, how to obtain the
weights and how to point at a local folder.
"""

from __future__ import annotations

import re
from pathlib import Path

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


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(model: str) -> bool:
    """Anything that is not 'name' or 'owner/name' (hub id syntax) is taken as a folder path."""
    return not HUB_ID.match(model) or model.startswith(".")


def resolve_model_dir(model: str, subfolders: list[str]) -> Path:
    """Local folder holding ``subfolders`` of ``model`` (a folder path or a hub id such as
    'stabilityai/stable-diffusion-2-1-base'). Raises PretrainedLoadError when it is not available."""
    path = Path(model).expanduser()
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
    """``cls.from_pretrained(folder, subfolder=subfolder, **kwargs)`` with a clear error naming ``model``."""
    try:
        return cls.from_pretrained(str(folder), subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        raise PretrainedLoadError(
            f"could not load {subfolder}/ of {model!r} from {str(folder)!r}: {type(err).__name__}: {err}. " + how_to_get(model)
        ) from err
