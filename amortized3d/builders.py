"""The one place where config names become objects: text encoder, generator, prior."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from amortized3d.config import ExperimentConfig, config_from_dict, load_yaml
from amortized3d.generators.hyper_ingp import HyperINGP
from amortized3d.priors.analytic import AnalyticPrior
from amortized3d.priors.diffusers_prior import DiffusionPrior, load_prior_text_encoder
from amortized3d.text.pretrained_encoder import PretrainedTextEncoder
from amortized3d.text.hashed_encoder import HashedTextEncoder
from amortized3d.training.checkpoint import latest_checkpoint, load_checkpoint


def build_text_encoder(cfg: ExperimentConfig, device: str | torch.device = "cpu") -> HashedTextEncoder | PretrainedTextEncoder:
    """text.encoder=hashed: the offline encoder of width text.dim; text.encoder=prior: the CLIP text
    encoder in prior.model's folder (its width is the model's; train() records it as text.dim)."""
    if cfg.text.encoder == "prior":
        return load_prior_text_encoder(cfg.prior.model, device, cfg.prior.dtype)
    return HashedTextEncoder(dim=cfg.text.dim)


def build_generator(cfg: ExperimentConfig) -> HyperINGP:
    g = cfg.generator
    return HyperINGP(
        text_dim=cfg.text.dim,
        n_levels=g.n_levels,
        n_features_per_level=g.n_features_per_level,
        log2_hashmap_size=g.log2_hashmap_size,
        base_resolution=g.base_resolution,
        per_level_scale=g.per_level_scale,
        hyper_hidden=g.hyper_hidden,
        mlp_hidden=g.mlp_hidden,
        spectral_norm=g.spectral_norm,
        sphere_radius=g.sphere_radius,
        bound=g.bound,
    )


def build_prior(cfg: ExperimentConfig, text_encoder=None, device: str | torch.device = "cpu") -> AnalyticPrior | DiffusionPrior:
    """prior.kind=stable_diffusion / deepfloyd_if loads prior.model (sharing ``text_encoder`` when it is
    that model's own); prior.kind=analytic builds the closed-form ShapeWorld prior."""
    if cfg.prior.kind in ("stable_diffusion", "deepfloyd_if"):
        shared = text_encoder if isinstance(text_encoder, PretrainedTextEncoder) and cfg.text.encoder == "prior" else None
        return DiffusionPrior(
            cfg.prior.model, kind=cfg.prior.kind, text_encoder=shared, resolution=cfg.prior.resolution, dtype=cfg.prior.dtype, device=device,
            view_dependent=cfg.prior.view_dependent, perp_neg=cfg.prior.perp_neg, perp_neg_scale=cfg.prior.perp_neg_scale,
        )
    return AnalyticPrior(
        std=cfg.prior.std,
        uncond_mean=cfg.prior.uncond_mean,
        uncond_std=cfg.prior.uncond_std,
        scene_radius=cfg.render.scene_radius,
        n_proposal=cfg.prior.n_proposal,
        n_importance=cfg.prior.n_importance,
        inv_std=cfg.render.inv_std,
    )


ADAPTER_LR = {"vsd": 1e-4, "lods-embedding": 1e-5, "lods-lora": 5e-7}


def build_adapter(cfg: ExperimentConfig, prior) -> tuple[torch.nn.Module, torch.optim.Optimizer] | tuple[None, None]:
    """The learned branch of VSD / LODS and its AdamW optimizer (betas 0.9, 0.99), or (None, None)."""
    from amortized3d.distillation.adapters import LODSEmbedding, LODSLoRA, VSDLoRA

    method = cfg.distill.method
    if method == "vsd":
        adapter = VSDLoRA(prior, rank=cfg.distill.lora_rank)
    elif method == "lods-embedding":
        adapter = LODSEmbedding(prior)
    elif method == "lods-lora":
        adapter = LODSLoRA(prior, rank=cfg.distill.lora_rank)
    else:
        return None, None
    lr = cfg.distill.adapter_lr if cfg.distill.adapter_lr is not None else ADAPTER_LR[method]
    return adapter, torch.optim.AdamW(adapter.parameters(), lr=lr, betas=(0.9, 0.99), eps=1e-15)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[ExperimentConfig, HyperINGP, dict]:
    """Rebuild a trained generator from RUN_DIR (its config.yaml and latest checkpoint).

    -> (config, generator in eval mode on ``device``, checkpoint state).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a training run folder: it has no config.yaml (pass the folder that train wrote)")
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise FileNotFoundError(f"{str(run_dir)!r} has no checkpoint yet (checkpoints/latest is missing); train longer or pass another run")
    cfg = config_from_dict(load_yaml(run_dir / "config.yaml"))
    generator = build_generator(cfg)
    state = load_checkpoint(folder, generator)
    return cfg, generator.to(device).eval(), state


def describe_generator(generator: torch.nn.Module) -> str:
    total = sum(p.numel() for p in generator.parameters())
    rows = {name: sum(p.numel() for p in child.parameters()) for name, child in generator.named_children()}
    return json.dumps({"parameters": total, "by_module": rows}, indent=1)
