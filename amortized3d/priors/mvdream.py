"""MVDream (Shi et al. 2023): Stable Diffusion 2.1-base fine-tuned to denoise the 4 views of one object together,
built on diffusers' UNet2DConditionModel. It differs from SD 2.1's UNet in two places:

    camera     the camera-to-world matrix (4 x 4, its translation scaled to unit length, flattened row by row to 16
               numbers) -> Linear(16, 1280) -> SiLU -> Linear(1280, 1280), added to the timestep embedding after its
               MLP. In diffusers: class_embed_type "projection" (a TimestepEmbedding, linear_1 / SiLU / linear_2,
               added to the time embedding after time_embedding) with the camera as class label.
    attention  the self-attention (attn1) of every transformer block runs over all views of an object at once,
               [(B F), L, C] -> [B, F L, C], F = num_frames views; cross-attention to the text (attn2) and the
               feed-forward stay per view. In diffusers: MultiViewAttnProcessor on every attention module.

Everything else is SD 2.1-base: epsilon prediction, the scaled-linear schedule (0.00085 -> 0.012 over 1000
steps), the VAE with latent scale 0.18215, OpenCLIP ViT-H's text tower at its penultimate layer (with the final
layer norm), which is SD 2.1's text encoder. MVDream works at 256^2 images (32^2 latents).

Cameras. amortized3d's cameras are OpenGL camera-to-world matrices in a z-up world (x right, y up, z backward in the
camera), the convention threestudio passes MVDream as it is (MVDream's threestudio guidance and ScaleDreamer's
leave its opengl-to-blender conversion out for that reason); azimuth a of ours is azimuth a + 90 degrees of MVDream's
own get_camera.

Loading. Users have MVDream's original checkpoint (sd-v2.1-base-4view.pt: an ldm state dict with
model.diffusion_model.*, camera_embed.* among them, first_stage_model.* and cond_stage_model.model.*).
``converted_folder`` converts it once into a diffusers folder of safetensors next to it (<stem>-diffusers/), with
diffusers' ldm conversion functions for the UNet and the VAE and the OpenCLIP one for the text tower; the camera MLP
is the UNet's class embedding. The model's hyperparameters come from its ldm config: <stem>.yaml beside the
checkpoint when there is one, else MVDream's sd-v2-base config (architectures/mvdream-sd21-base-4view/ldm_config.yaml). Keys the
conversion does not consume, and missing or mis-shaped ones, are errors that list them.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import torch

from amortized3d.rendering.cameras import Cameras

LDM_CONFIG = Path(__file__).with_name("architectures") / "mvdream-sd21-base-4view" / "ldm_config.yaml"
HUB_MODEL, HUB_FILE = "MVDream/MVDream", "sd-v2.1-base-4view.pt"
UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.model."
CAMERA_KEYS = {"camera_embed.0": "label_emb.0.0", "camera_embed.2": "label_emb.0.2"}  # diffusers' projection class embedding
# the ldm diffusion wrapper's schedule buffers (recomputed by diffusers' scheduler from the config)
SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
                    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
                    "logvar"}
OPEN_CLIP_TEXT_KEY = re.compile(r"^(token_embedding\.weight|positional_embedding|ln_final\.(weight|bias)|text_projection|logit_scale|"
                                r"attn_mask|transformer\.resblocks\.\d+\.(ln_1|ln_2|attn\.out_proj|mlp\.c_fc|mlp\.c_proj)\.(weight|bias)|"
                                r"transformer\.resblocks\.\d+\.attn\.in_proj_(weight|bias))$")
CONVERSION_VERSION = 1


def mvdream_cameras(cameras: Cameras) -> torch.Tensor:
    """MVDream's camera condition: cameras [N] -> [N, 16], each camera-to-world matrix with its translation divided by
    its length (+ 1e-8), flattened row by row."""
    c2w = cameras.c2w.reshape(-1, 4, 4).clone()
    c2w[:, :3, 3] = c2w[:, :3, 3] / (c2w[:, :3, 3].norm(dim=-1, keepdim=True) + 1e-8)
    return c2w.reshape(-1, 16)


class MultiViewAttnProcessor:
    """diffusers attention processor: self-attention (``joint``) over the views of each object, [(B F), L, C] ->
    [B, F L, C] -> attention -> back; cross-attention as it is. ``num_frames`` F comes with each UNet call
    (cross_attention_kwargs)."""

    def __init__(self, joint: bool):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.joint, self.inner = joint, AttnProcessor2_0()

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, num_frames: int = 1) -> torch.Tensor:
        if not self.joint or num_frames == 1:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        BF, L, C = hidden_states.shape
        if BF % num_frames:
            raise ValueError(f"{BF} images do not form objects of num_frames={num_frames} views")
        joint = hidden_states.reshape(BF // num_frames, num_frames * L, C)
        return self.inner(attn, joint, None, attention_mask, temb).reshape(BF, L, C)


def set_multiview_attention(unet) -> None:
    """Every self-attention (attn1) of ``unet`` joint over the views, every cross-attention (attn2) per view."""
    unet.set_attn_processor({name: MultiViewAttnProcessor(joint=name.endswith("attn1.processor"))
                             for name in unet.attn_processors})


# ----------------------------------------------------------------------------- conversion


def load_ldm_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The flat state dict of an ldm checkpoint (.pt / .ckpt, tensors only; a {'state_dict': ...} wrapper is unwrapped)
    or of a .safetensors file."""
    from amortized3d.priors.pretrained import PretrainedLoadError

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (a corrupt or foreign file: say which)
        raise PretrainedLoadError(f"could not read the MVDream checkpoint {str(path)!r}: {type(err).__name__}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PretrainedLoadError(f"{str(path)!r} is not a state dict of tensors (an ldm checkpoint such as {HUB_FILE})")
    return state


def _check_keys(what: str, path: Path, missing: list[str], unexpected: list[str]) -> None:
    from amortized3d.priors.pretrained import PretrainedLoadError

    if missing or unexpected:
        lines = [f"{len(missing)} missing: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}"] if missing else []
        lines += [f"{len(unexpected)} unexpected: {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}"] if unexpected else []
        raise PretrainedLoadError(f"the {what} of {str(path)!r} does not match its config ({'; '.join(lines)}); pass MVDream's "
                                  f"{HUB_FILE}, or put the ldm config of this checkpoint beside it as <stem>.yaml")


def _load_into(module, state: dict[str, torch.Tensor], what: str, path: Path, allowed_missing: tuple[str, ...] = ()) -> None:
    from amortized3d.priors.pretrained import PretrainedLoadError

    own = module.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in state.items() if k in own and own[k].shape != v.shape]
    if wrong:
        raise PretrainedLoadError(f"the {what} of {str(path)!r} has mis-shaped weights: {', '.join(wrong[:20])}")
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith(allowed_missing)]
    _check_keys(what, path, missing, list(result.unexpected_keys))


def _unconsumed(source: dict[str, torch.Tensor], converted: dict[str, torch.Tensor]) -> list[str]:
    """Keys of ``source`` whose tensors the conversion did not carry over (it maps tensors, or views of them that
    start where they do)."""
    used = {t.data_ptr() for t in converted.values()}
    return sorted(k for k, t in source.items() if t.data_ptr() not in used)


def text_config_from_weights(text: dict[str, torch.Tensor]):
    """The transformers CLIPTextConfig of an OpenCLIP text tower's weights (prefix removed), at its penultimate layer
    as MVDream (and SD 2.x) read it: one block fewer than the tower has. Heads: width / 64 (OpenCLIP's rule)."""
    from transformers import CLIPTextConfig

    vocab, width = text["token_embedding.weight"].shape
    blocks = 1 + max(int(k.split(".")[2]) for k in text if k.startswith("transformer.resblocks."))
    return CLIPTextConfig(vocab_size=int(vocab), hidden_size=int(width), intermediate_size=int(text["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
                          num_hidden_layers=blocks - 1, num_attention_heads=max(1, int(width) // 64),
                          max_position_embeddings=int(text["positional_embedding"].shape[0]), hidden_act="gelu",
                          layer_norm_eps=1e-5, projection_dim=int(text["text_projection"].shape[1]) if "text_projection" in text else int(width))


def unet_config_from_ldm(original: dict) -> dict:
    """The diffusers UNet2DConditionModel config of an MVDream ldm config: diffusers' SD conversion of it, with the camera
    MLP as a projection class embedding (camera_dim inputs) and the latent size of 256^2 images."""
    import warnings

    from amortized3d._compat import import_torchvision_safely

    import_torchvision_safely()
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    params = original["model"]["params"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # diffusers deprecates image_size, which sets the latent size here
        config = create_unet_diffusers_config_from_ldm(original, {}, image_size=256)
    config.update(class_embed_type="projection", projection_class_embeddings_input_dim=int(params["unet_config"]["params"]["camera_dim"]),
                  sample_size=256 // 2 ** (len(params["first_stage_config"]["params"]["ddconfig"]["ch_mult"]) - 1))
    return config


def ldm_config_of(path: Path) -> Path:
    """The ldm config of checkpoint ``path``: <stem>.yaml beside it, else MVDream's sd-v2-base (LDM_CONFIG)."""
    beside = path.with_suffix(".yaml")
    return beside if beside.is_file() else LDM_CONFIG


def convert_checkpoint(path: Path, out: Path, ldm_config: Path | None = None) -> Path:
    """Convert MVDream's ldm checkpoint ``path`` into a diffusers folder ``out`` (unet/ vae/ text_encoder/ tokenizer/
    scheduler/, safetensors). ldm_config: its ldm YAML (default: <stem>.yaml beside it, else MVDream's sd-v2-base)."""
    import tempfile
    import warnings

    import yaml

    from amortized3d._compat import import_torchvision_safely

    import_torchvision_safely()
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
                                                     create_vae_diffusers_config_from_ldm)
    from transformers import CLIPTextModel

    from amortized3d.priors.pretrained import PretrainedLoadError
    from amortized3d.text.clip_vocabulary import clip_tokenizer

    ldm_config = ldm_config or ldm_config_of(path)
    original = yaml.safe_load(ldm_config.read_text())
    params = original["model"]["params"]
    layer = params.get("cond_stage_config", {}).get("params", {}).get("layer", "penultimate")
    if layer != "penultimate":
        raise PretrainedLoadError(f"{str(ldm_config)!r} reads the text tower at layer {layer!r}; MVDream (and this conversion) "
                                  "read it at its penultimate layer")
    state = load_ldm_checkpoint(path)
    other = sorted(k for k in state if not k.startswith((UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX)) and k not in SCHEDULE_BUFFERS)
    if other:
        raise PretrainedLoadError(f"{str(path)!r} holds keys outside MVDream's UNet, VAE and text tower: {', '.join(other[:20])}")
    for prefix, what in ((UNET_PREFIX, "UNet"), (VAE_PREFIX, "VAE"), (TEXT_PREFIX, "text tower")):
        if not any(k.startswith(prefix) for k in state):
            raise PretrainedLoadError(f"{str(path)!r} has no {what} ({prefix}* keys); it is not an MVDream checkpoint such as {HUB_FILE}")

    # UNet: the camera MLP under the name of ldm's projection class embedding, then diffusers' converter
    unet_state = {k: v for k, v in state.items() if k.startswith(UNET_PREFIX)}
    for ours, ldm in CAMERA_KEYS.items():
        for part in ("weight", "bias"):
            key = f"{UNET_PREFIX}{ours}.{part}"
            if key not in unet_state:
                raise PretrainedLoadError(f"{str(path)!r} has no {key}: not a multi-view (camera-conditioned) MVDream UNet")
            unet_state[f"{UNET_PREFIX}{ldm}.{part}"] = unet_state.pop(key)
    unet_config = unet_config_from_ldm(original)
    unet = UNet2DConditionModel(**unet_config)
    unet_converted = convert_ldm_unet_checkpoint(unet_state, unet_config)
    _check_keys("UNet", path, [], [k[len(UNET_PREFIX):] for k in _unconsumed(unet_state, unet_converted)])
    _load_into(unet, unet_converted, "UNet", path)

    vae_state = {k: v for k, v in state.items() if k.startswith(VAE_PREFIX)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        vae_config = create_vae_diffusers_config_from_ldm(original, vae_state, image_size=256)
    vae = AutoencoderKL(**vae_config)
    vae_converted = convert_ldm_vae_checkpoint(vae_state, vae_config)
    _check_keys("VAE", path, [], [k[len(VAE_PREFIX):] for k in _unconsumed(vae_state, vae_converted)])
    _load_into(vae, vae_converted, "VAE", path)

    text_state = {k[len(TEXT_PREFIX):]: v for k, v in state.items() if k.startswith(TEXT_PREFIX)}
    foreign = sorted(k for k in text_state if not OPEN_CLIP_TEXT_KEY.match(k))
    _check_keys("text tower", path, [], foreign)
    text_config = text_config_from_weights(text_state)
    last = f"transformer.resblocks.{text_config.num_hidden_layers}."  # the last block: unused at the penultimate layer
    used = {TEXT_PREFIX + k: v for k, v in text_state.items() if not k.startswith(last)}
    text_model = CLIPTextModel(text_config)
    text_converted = convert_open_clip_checkpoint(text_model, used, prefix=TEXT_PREFIX)  # transformers 4's names, text_model.*
    if not any(k.startswith("text_model.") for k in text_model.state_dict()):  # transformers 5 names them without it
        text_converted = {k.removeprefix("text_model."): v for k, v in text_converted.items()}
    _load_into(text_model, text_converted, "text tower", path, allowed_missing=("position_ids",))

    scheduler = DDPMScheduler(num_train_timesteps=int(params.get("timesteps", 1000)), beta_start=float(params["linear_start"]),
                              beta_end=float(params["linear_end"]), beta_schedule="scaled_linear", clip_sample=False,
                              steps_offset=1,
                              prediction_type={"eps": "epsilon", "v": "v_prediction"}[params.get("parameterization", "eps")])
    if "alphas_cumprod" in state:  # the checkpoint's own schedule buffer must be the one its config describes
        mismatch = (state["alphas_cumprod"].double() - scheduler.alphas_cumprod.double()).abs().max().item()
        if state["alphas_cumprod"].shape != scheduler.alphas_cumprod.shape or mismatch > 1e-5:
            raise PretrainedLoadError(f"the noise schedule stored in {str(path)!r} differs from its config's (linear_start, linear_end, "
                                      f"timesteps) by {mismatch:.3g}; put the checkpoint's own ldm config beside it as <stem>.yaml")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        staging = Path(work) / "folder"
        unet.save_pretrained(staging / "unet")
        vae.save_pretrained(staging / "vae")
        text_model.save_pretrained(staging / "text_encoder")
        clip_tokenizer(Path(work) / "bpe", pad_token="!").save_pretrained(str(staging / "tokenizer"))
        scheduler.save_pretrained(staging / "scheduler")
        (staging / "model_index.json").write_text(json.dumps({"_converted_from": str(path), "ldm_config": str(ldm_config),
                                                              "components": ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]}))
        (staging / "conversion.json").write_text(json.dumps(source_signature(path, ldm_config)))
        if out.exists():
            import shutil

            shutil.rmtree(out)
        staging.rename(out)
    return out


def source_signature(path: Path, ldm_config: Path) -> dict:
    """What a converted folder was made from (a changed checkpoint or config is converted again)."""
    stat = path.stat()
    return {"version": CONVERSION_VERSION, "checkpoint": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "ldm_config": ldm_config.read_text()}


def converted_folder(model: str) -> Path:
    """The diffusers folder of MVDream ``model``: a converted or diffusers folder as it is; a checkpoint file (.pt,
    .ckpt, .safetensors) converted once into <stem>-diffusers/ beside it (or under the cache when that folder cannot
    be written); the hub id MVDream/MVDream resolved to its sd-v2.1-base-4view.pt in the Hugging Face cache first."""
    from amortized3d.priors.pretrained import PretrainedLoadError, hub_offline

    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if not path.is_file():
        if model != HUB_MODEL:
            raise PretrainedLoadError(f"MVDream checkpoint {model!r} does not exist; pass the path of {HUB_FILE} (from the hub repository "
                                      f"{HUB_MODEL}), or a folder it was converted into")
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            path = Path(hf_hub_download(HUB_MODEL, HUB_FILE, local_files_only=hub_offline()))
        except (LocalEntryNotFoundError, OSError) as err:
            raise PretrainedLoadError(f"{HUB_FILE} of {HUB_MODEL} is not in the local Hugging Face cache and cannot be downloaded "
                                      f"({type(err).__name__}); download it on a machine with internet access (`hf download {HUB_MODEL} "
                                      f"{HUB_FILE}`) and pass it with --prior PATH.pt prior.kind=mvdream") from err
    config = ldm_config_of(path)
    signature = source_signature(path, config)
    from amortized3d.data.embedding_store import cache_root

    where = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    candidates = [path.parent / f"{path.stem}-diffusers", cache_root() / "mvdream" / f"{path.stem}-{where}"]
    done = lambda folder: (folder / "conversion.json").is_file() and json.loads((folder / "conversion.json").read_text()) == signature  # noqa: E731
    for folder in candidates:
        if done(folder):
            return folder
    from filelock import FileLock

    for folder in candidates:
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(folder) + ".lock"):  # the processes of a distributed launch convert once, one after the other
                return folder if done(folder) else convert_checkpoint(path, folder, config)
        except PermissionError:
            continue
    raise PretrainedLoadError(f"could not write the converted MVDream folder beside {str(path)!r} or under {str(candidates[-1].parent)!r}")
