"""Tiny random-weight Stable Diffusion, DeepFloyd IF and CLIP folders, for smoke tests without downloads.

    python -m amortized3d.priors.tiny PATH [--kind stable_diffusion|deepfloyd_if|clip] [--seed 0]

writes a diffusers-format folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/) with ``StableDiffusionPipeline.save_pretrained``, so that loading it goes through
exactly the ``from_pretrained`` calls a real checkpoint takes. The sizes are tiny (a UNet of
well under a million parameters, 32-d text tokens, a VAE with downsampling factor 2); the
tokenizer is CLIP's real BPE vocabulary (49,408 tokens), built from the copy that the
open-clip-torch package ships, so token ids match the real SD tokenizers. The scheduler is Stable Diffusion's
(scaled-linear betas 0.00085 to 0.012 over 1000 steps).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from amortized3d.text.clip_vocabulary import clip_tokenizer, t5_style_tokenizer

TEXT_DIM = 32
VAE_FACTOR = 2
IF_TEXT_DIM = 48


def make_tiny_stable_diffusion(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Stable Diffusion folder at ``path`` and return it."""
    from amortized3d._compat import import_torchvision_safely

    import_torchvision_safely()
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * VAE_FACTOR,
        up_block_types=("UpDecoderBlock2D",) * VAE_FACTOR,
        block_out_channels=(32, 32),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=TEXT_DIM, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
            max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=0, projection_dim=TEXT_DIM,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", clip_sample=False, steps_offset=1,
    )
    with tempfile.TemporaryDirectory() as workdir:
        tokenizer = clip_tokenizer(Path(workdir))
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(path))
    return path


def make_tiny_deepfloyd_if(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random DeepFloyd IF stage-I folder at ``path`` (IFPipeline.save_pretrained) and return it:
    a pixel-space UNet at 16 x 16 with 6 output channels (noise and learned variance), T5-style text
    conditioning projected from 48-d tokens, IF's cosine schedule."""
    from amortized3d._compat import import_torchvision_safely

    import_torchvision_safely()
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D"),
        up_block_types=("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=32, encoder_hid_dim=IF_TEXT_DIM,
        encoder_hid_dim_type="text_proj", addition_embed_type="text", addition_embed_type_num_heads=4,
        attention_head_dim=8, norm_num_groups=32, resnet_time_scale_shift="scale_shift", act_fn="gelu",
    )
    text = T5EncoderModel(T5Config(vocab_size=32768, d_model=IF_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range",
                              prediction_type="epsilon", clip_sample=True, thresholding=True)
    pipeline = IFPipeline(tokenizer=t5_style_tokenizer(), text_encoder=text, unet=unet, scheduler=scheduler,
                          safety_checker=None, feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipeline.save_pretrained(str(path))
    return path


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def make_tiny_clip(path: str | Path, seed: int = 0, image_size: int = 32, projection_dim: int = 16) -> Path:
    """Write a tiny random transformers CLIP folder (CLIPModel, CLIP's real tokenizer, an image processor with
    OpenAI's normalization at ``image_size``) at ``path``, loadable like openai/clip-vit-large-patch14."""
    from amortized3d._compat import import_torchvision_safely

    import_torchvision_safely()
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, vocab_size=49408,
                         max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                           image_size=image_size, patch_size=8),
        projection_dim=projection_dim,
    )
    CLIPModel(config).save_pretrained(str(path))
    with tempfile.TemporaryDirectory() as workdir:
        clip_tokenizer(Path(workdir), pad_token="<|endoftext|>").save_pretrained(str(path))
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD)).save_pretrained(str(path))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write a tiny random Stable Diffusion, DeepFloyd IF or CLIP folder for smoke tests")
    parser.add_argument("path")
    parser.add_argument("--kind", choices=("stable_diffusion", "deepfloyd_if", "clip"), default="stable_diffusion")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    make = {"stable_diffusion": make_tiny_stable_diffusion, "deepfloyd_if": make_tiny_deepfloyd_if, "clip": make_tiny_clip}[args.kind]
    print(make(args.path, args.seed))


if __name__ == "__main__":
    main()
