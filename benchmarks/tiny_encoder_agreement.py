"""How closely a tiny autoencoder's encoder (TAESD, prior.tiny_encoder) stands in for Stable Diffusion's VAE encoder.

    python benchmarks/tiny_encoder_agreement.py [--model stabilityai/stable-diffusion-2-1-base]
        [--tiny-encoder madebyollin/taesd] [--images 16] [--resolution 512] [--out benchmarks/results/tiny_encoder_agreement.json]

Score distillation back-propagates a latent-space gradient g through the encoder: what reaches the render is
J(x)^T g. So the encoder matters twice, and both are measured on the same images:
  latents    relative L2 error of the tiny encoder's latents against the VAE's (posterior mean x scaling factor)
  gradients  for a random direction g per image, the cosine similarity and the norm ratio of J_tiny^T g and J_vae^T g
The images stand for the recipes' renders: smooth random 64 x 64 images (8 x 8 noise, bicubic), resized to the prior's
resolution by the prior's own bilinear resize. With random: models (no download) the numbers are meaningless and only
test the mechanics; with the real weights they say whether prior.tiny_encoder is a faithful stand-in.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from amortized3d.files import write_text_atomic


def agreement(encode_a: Callable, encode_b: Callable, images: torch.Tensor, directions: torch.Tensor) -> dict:
    """Encoder b against encoder a (the reference) on images [N, 3, H, W] in [-1, 1] with latent directions [N, C, h, w].

    -> per-image lists: latent_relative_error ||b(x) - a(x)|| / ||a(x)||, gradient_cosine cos(J_b^T g, J_a^T g) and
    gradient_norm_ratio ||J_b^T g|| / ||J_a^T g||, and their means.
    """
    latents, grads = [], []
    for encode in (encode_a, encode_b):
        x = images.clone().requires_grad_(True)
        z = encode(x).float()
        (z * directions).sum().backward()
        latents.append(z.detach().flatten(1))
        grads.append(x.grad.flatten(1))
    error = (latents[1] - latents[0]).norm(dim=1) / latents[0].norm(dim=1).clamp_min(1e-12)
    cosine = F.cosine_similarity(grads[1], grads[0], dim=1)
    ratio = grads[1].norm(dim=1) / grads[0].norm(dim=1).clamp_min(1e-12)
    rows = {"latent_relative_error": error, "gradient_cosine": cosine, "gradient_norm_ratio": ratio}
    return {**{k: v.tolist() for k, v in rows.items()}, **{f"mean_{k}": float(v.mean()) for k, v in rows.items()}}


def render_like_images(n: int, size: int, resolution: int, seed: int = 0) -> torch.Tensor:
    """n smooth random images [n, 3, resolution, resolution] in [-1, 1]: 8 x 8 noise, bicubic to size, bilinear to resolution."""
    g = torch.Generator().manual_seed(seed)
    small = F.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
    return 2 * F.interpolate(small, size=(resolution, resolution), mode="bilinear", align_corners=False) - 1


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="stabilityai/stable-diffusion-2-1-base", help="SD checkpoint (hub id, folder, or random:...)")
    parser.add_argument("--tiny-encoder", default="madebyollin/taesd", help="AutoencoderTiny (hub id, folder, or random:taesd)")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=512, help="the prior's encoding resolution (prior.resolution)")
    parser.add_argument("--render-size", type=int, default=64, help="the renders' size before the resize")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--out", default="benchmarks/results/tiny_encoder_agreement.json")
    args = parser.parse_args(argv)

    from amortized3d.priors.diffusers_prior import DiffusionPrior, DiffusionPriorConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    prior = DiffusionPrior(DiffusionPriorConfig(model=args.model, resolution=args.resolution, tiny_encoder=args.tiny_encoder,
                                                dtype=args.dtype), device=device)
    images = render_like_images(args.images, args.render_size, args.resolution).to(device)
    side = args.resolution // prior.vae_factor
    directions = torch.randn(args.images, prior.channels, side, side, generator=torch.Generator().manual_seed(1)).to(device)
    vae = lambda x: prior.vae.encode(x.to(prior.dtype)).latent_dist.mean * prior.latent_scale  # noqa: E731
    tiny = lambda x: prior.tiny_encoder.encode(x.to(prior.dtype)).latents  # noqa: E731
    result = {"model": args.model, "tiny_encoder": args.tiny_encoder, "resolution": args.resolution, "images": args.images,
              "dtype": args.dtype, "device": str(device), **agreement(vae, tiny, images, directions)}
    print(f"{args.tiny_encoder} against the VAE encoder of {args.model} at {args.resolution} x {args.resolution}, {args.images} images: "
          f"latent relative error {result['mean_latent_relative_error']:.4f}, gradient cosine {result['mean_gradient_cosine']:.4f}, "
          f"gradient norm ratio {result['mean_gradient_norm_ratio']:.4f}")
    write_text_atomic(args.out, json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
