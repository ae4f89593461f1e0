"""MVDream's original network, written here from its definitions (bytedance/MVDream: openaimodel.py's
MultiViewUNetModel, attention.py's SpatialTransformer3D / BasicTransformerBlock3D; the ldm ResBlock, Downsample and
Upsample) and independent of amortized3d and of diffusers, and a tiny random MVDream checkpoint in the original's
ldm key layout, which the tests write themselves:

    python -m tests.mvdream_reference PATH.pt

writes PATH.pt (model.diffusion_model.* with camera_embed.*, first_stage_model.*, cond_stage_model.model.*) and
PATH.yaml (its ldm config), for `--prior PATH.pt prior.kind=mvdream`.

The VAE is diffusers' AutoencoderKL at a tiny size, renamed to ldm's keys by the mapping below (the inverse of what
the conversion must do); the text tower is open_clip's TextTransformer (the OpenCLIP model MVDream conditions on).
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

TEXT_WIDTH = 128  # the text tower's width = the UNet's context_dim (two heads of 64, OpenCLIP's width / 64)
UNET = dict(in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1], num_res_blocks=1, channel_mult=[1, 2],
            num_head_channels=16, context_dim=TEXT_WIDTH, camera_dim=16)
VAE_CHANNELS = [32, 32, 64, 64]  # 4 levels: latents at 1/8 of the image, 32^2 at MVDream's 256^2, as the real VAE


def ldm_config() -> dict:
    """The tiny checkpoint's ldm config, in the layout of MVDream's configs/sd-v2-base.yaml."""
    return {"model": {"params": {
        "linear_start": 0.00085, "linear_end": 0.0120, "timesteps": 1000, "scale_factor": 0.18215, "parameterization": "eps",
        "unet_config": {"params": {**UNET, "use_spatial_transformer": True, "use_linear_in_transformer": True,
                                   "transformer_depth": 1, "legacy": False, "image_size": 32}},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": {
            "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": VAE_CHANNELS[0],
            "ch_mult": [c // VAE_CHANNELS[0] for c in VAE_CHANNELS], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}}},
        "cond_stage_config": {"params": {"layer": "penultimate"}},
    }}}


# ----------------------------------------------------------------------------- the original network


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """ldm's sinusoidal embedding: [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int | None = None):
        super().__init__()
        out = out_channels or channels
        self.in_layers = nn.Sequential(norm(channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out))
        self.out_layers = nn.Sequential(norm(out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out, out, 3, padding=1))
        self.skip_connection = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)

    def forward(self, x, emb, context, num_frames):
        h = self.in_layers(x) + self.emb_layers(emb)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb, context, num_frames):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb, context, num_frames):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.scale = heads, dim_head**-0.5
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731  [b, h, n, d]
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        attention = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        return self.to_out((attention @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class BasicTransformerBlock3D(nn.Module):
    """attn1 over all views of an object ((b f) l c -> b (f l) c), attn2 to the text and the feed-forward per view."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, dim_head)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))
        self.attn2 = CrossAttention(dim, heads, dim_head, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context, num_frames):
        bf, length, c = x.shape
        x = x.reshape(bf // num_frames, num_frames * length, c)
        x = self.attn1(self.norm1(x)) + x
        x = x.reshape(bf, length, c)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff.net(self.norm3(x)) + x


class SpatialTransformer3D(nn.Module):
    def __init__(self, channels: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        inner = heads * dim_head
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock3D(inner, heads, dim_head, context_dim)])
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x, emb, context, num_frames):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(b, h * w, c))
        for block in self.transformer_blocks:
            y = block(y, context, num_frames)
        return self.proj_out(y).reshape(b, h, w, c).permute(0, 3, 1, 2) + x


class Sequential(nn.ModuleList):
    """ldm's TimestepEmbedSequential: each layer takes what it needs of (x, emb, context, num_frames)."""

    def forward(self, x, emb, context, num_frames):
        for layer in self:
            x = layer(x, emb, context, num_frames)
        return x


class Conv(nn.Conv2d):
    def forward(self, x, emb, context, num_frames):
        return super().forward(x)


class MultiViewUNet(nn.Module):
    """MVDream's MultiViewUNetModel: the SD UNet with the camera MLP added to the time embedding and 3D self-attention."""

    def __init__(self, in_channels, out_channels, model_channels, attention_resolutions, num_res_blocks, channel_mult,
                 num_head_channels, context_dim, camera_dim):
        super().__init__()
        emb = 4 * model_channels
        self.model_channels = model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.camera_embed = nn.Sequential(nn.Linear(camera_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        attention = lambda ch: SpatialTransformer3D(ch, ch // num_head_channels, num_head_channels, context_dim)  # noqa: E731
        self.input_blocks = nn.ModuleList([Sequential([Conv(in_channels, model_channels, 3, padding=1)])])
        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(Sequential(layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Sequential([Downsample(ch)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = Sequential([ResBlock(ch, emb), attention(ch), ResBlock(ch, emb)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(Sequential(layers))
        self.out = nn.Sequential(norm(ch), nn.SiLU(), nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps, context, camera, num_frames):
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels)) + self.camera_embed(camera)
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context, num_frames)
            skips.append(h)
        h = self.middle_block(h, emb, context, num_frames)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], 1), emb, context, num_frames)
        return self.out(h)


def text_reference(tower, tokens: torch.Tensor) -> torch.Tensor:
    """MVDream's FrozenOpenCLIPEmbedder at layer "penultimate": every residual block but the last, then ln_final.
    tower: open_clip's TextTransformer, tokens long [B, 77] -> [B, 77, width]."""
    x = tower.token_embedding(tokens) + tower.positional_embedding
    for block in tower.transformer.resblocks[:-1]:
        x = block(x, attn_mask=tower.attn_mask)
    return tower.ln_final(x)


# ----------------------------------------------------------------------------- the tiny checkpoint

VAE_TO_LDM = [  # diffusers AutoencoderKL key -> ldm key (regular expressions, first match)
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.conv_shortcut\.", r"encoder.down.\1.block.\2.nin_shortcut."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.", r"encoder.down.\1.downsample.conv."),
]


def vae_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in ldm's key layout (its decoder's up blocks numbered from the bottom,
    its mid-block attention as 1 x 1 convolutions)."""
    out = {}
    for key, value in state.items():
        new = key
        up = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$", key)
        if up:
            level = levels - 1 - int(up.group(1))
            part = f"block.{up.group(3)}" if up.group(3) is not None else "upsample"
            rest = up.group(4).replace("conv_shortcut", "nin_shortcut")
            new = f"decoder.up.{level}.{part}.{rest}"
        else:
            for pattern, replacement in VAE_TO_LDM:
                if re.match(pattern, key):
                    new = re.sub(pattern, replacement, key)
                    break
        if ".mid.attn_1." in new and new.endswith("weight") and value.dim() == 2:
            value = value[:, :, None, None]
        out[new] = value
    return out


def randomize(module: nn.Module, generator: torch.Generator) -> None:
    """Every parameter drawn anew (no zero-initialized output layers, so every path shows in the outputs): norm scales
    1 + 0.1 z, norm shifts 0.1 z, the rest z / sqrt(fan-in)."""
    norm_weight = re.compile(r"(norm\w*|ln_\w+|(^|\.)(in_layers|out_layers|out)\.0)\.weight$")
    norm_bias = re.compile(r"(norm\w*|ln_\w+|(^|\.)(in_layers|out_layers|out)\.0)\.bias$")
    with torch.no_grad():
        for name, p in module.named_parameters():
            z = torch.randn(p.shape, generator=generator)
            if norm_weight.search(name):
                p.copy_(1.0 + 0.1 * z)
            elif norm_bias.search(name):
                p.copy_(0.1 * z)
            else:
                p.copy_(z / math.sqrt(max(p[0].numel() if p.dim() > 1 else p.numel(), 1)))


def build_tiny(seed: int = 0):
    """(reference UNet, diffusers VAE, open_clip text tower, the ldm state dict of all three)."""
    from amortized3d._compat import import_torchvision_safely

    import_torchvision_safely()
    from diffusers import AutoencoderKL
    from open_clip.transformer import TextTransformer

    g = torch.Generator().manual_seed(seed)
    unet = MultiViewUNet(**UNET).eval()
    randomize(unet, g)
    vae = AutoencoderKL(block_out_channels=VAE_CHANNELS, down_block_types=["DownEncoderBlock2D"] * len(VAE_CHANNELS),
                        up_block_types=["UpDecoderBlock2D"] * len(VAE_CHANNELS), layers_per_block=1, latent_channels=4, norm_num_groups=32).eval()
    randomize(vae, g)
    tower = TextTransformer(context_length=77, vocab_size=49408, width=TEXT_WIDTH, heads=TEXT_WIDTH // 64, layers=3,
                            output_dim=TEXT_WIDTH).eval()
    randomize(tower, g)
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae_to_ldm(vae.state_dict(), len(VAE_CHANNELS)).items()})
    state.update({f"cond_stage_model.model.{k}": v for k, v in tower.state_dict().items()})
    state["cond_stage_model.model.logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return unet, vae, tower, {k: v.clone().contiguous() for k, v in state.items()}


def write_tiny_mvdream(path: str | Path, seed: int = 0):
    """Write the tiny checkpoint PATH.pt and its ldm config PATH.yaml; -> (path, reference UNet, VAE, text tower)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unet, vae, tower, state = build_tiny(seed)
    torch.save(state, path)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(ldm_config()))
    return path, unet, vae, tower


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].endswith(".pt"):
        sys.exit("usage: python -m tests.mvdream_reference PATH.pt")
    print(write_tiny_mvdream(sys.argv[1])[0])
