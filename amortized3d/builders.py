"""The one place where config names become objects: text encoder, embedding store, generator, prior."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from amortized3d.config import LATENT_CHANNELS, ExperimentConfig, config_from_dict, load_yaml
from amortized3d.data.corpora import CorpusError, load_corpus, single_prompt
from amortized3d.data.embedding_store import build_store, default_store_dir, load_manifest, prompts_digest
from amortized3d.generators import GENERATORS, PER_PROMPT
from amortized3d.generators.gaussians import POLAR_RING, parameter_group_names
from amortized3d.interfaces import Generator, Prior
from amortized3d.priors import PRIORS
from amortized3d.priors.diffusers_prior import VIEW_SUFFIXES, load_prior_text_encoder
from amortized3d.run_dir import RunDir
from amortized3d.text.hashed_encoder import HashedTextEncoder
from amortized3d.text.pretrained_encoder import PretrainedTextEncoder
from amortized3d.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint


def build_text_encoder(cfg: ExperimentConfig, device: str | torch.device = "cpu") -> HashedTextEncoder | PretrainedTextEncoder:
    """text.encoder=hashed: the offline encoder of width text.dim; text.encoder=prior: the CLIP text
    encoder in prior.model's folder (its width is the model's; train() records it as text.dim)."""
    if cfg.text.encoder == "prior":
        return load_prior_text_encoder(cfg.prior.model, device, cfg.prior.dtype)
    return HashedTextEncoder(dim=cfg.text.dim)


def prior_store_suffixes(cfg: ExperimentConfig) -> list[str]:
    """What the embedding store holds for the prior beyond the generator's encoding, as suffixes of each prompt:
    '' (the plain prompt) when the generator's text encoder is not the prior's, and the four view suffixes
    with prior.view_dependent or prior.perp_neg. None for the analytic prior, which reads the prompt text."""
    if cfg.prior.analytic:
        return []
    plain = [] if cfg.text.encoder == "prior" else [""]
    return plain + (list(VIEW_SUFFIXES) if cfg.prior.view_dependent or cfg.prior.perp_neg else [])


def store_location(cfg: ExperimentConfig, prompts: list[str], text_encoder, prior_encoder=None) -> tuple[Path, dict]:
    """(folder, expected): the embedding store of the train split ``prompts`` for this config (data.store, else a
    cache folder named by its content) and the load_manifest arguments it must match."""
    suffixes = prior_store_suffixes(cfg)
    expected = {"prompts": prompts, "encoder_id": text_encoder.identity,
                "prior_encoder_id": prior_encoder.identity if suffixes else None, "prior_suffixes": suffixes}
    folder = Path(cfg.data.store).expanduser() if cfg.data.store else default_store_dir(
        cfg.corpus.name, "train", prompts_digest(prompts), expected["encoder_id"], expected["prior_encoder_id"], suffixes, cfg.data.shard_size)
    return folder, expected


def prepare_store(cfg: ExperimentConfig, prompts: list[str], text_encoder, prior_encoder=None, *, rank: int = 0, world: int = 1,
                  barrier=None, progress: bool = True, rebuild: bool = False, verify: str = "size") -> Path:
    """The store of store_location, built (split over the ranks) or finished if it is missing or incomplete; every
    rank calls it, and all of them pass the same barriers whatever the store's state (no rank returns early).
    prior_encoder: the diffusers prior's text encoder (None for the analytic prior).
    rebuild: delete the store's files first (rank 0, before a barrier) and build it anew. verify: how each rank checks
    its finished shards before keeping them: "size" (training start) or "sha256" (`amortized3d store build`); a shard
    that fails, or a shard file not recorded for this store that does not check out, is rebuilt."""
    folder, expected = store_location(cfg, prompts, text_encoder, prior_encoder)
    build_store(prompts, text_encoder, folder, prior_encoder=prior_encoder, prior_suffixes=expected["prior_suffixes"], corpus=cfg.corpus.name,
                shard_size=cfg.data.shard_size, batch_size=cfg.data.encode_batch, rank=rank, world=world, barrier=barrier, progress=progress,
                rebuild=rebuild, verify=verify)
    load_manifest(folder, **expected)
    return folder


def build_prior_text_encoder(cfg: ExperimentConfig, text_encoder, device: str | torch.device = "cpu"):
    """The text encoder the embedding store encodes for the prior (its own, loaded without the UNet): None for the
    analytic prior; the generator's ``text_encoder`` when it is the prior's (text.encoder=prior)."""
    if not prior_store_suffixes(cfg):
        return None
    return text_encoder if cfg.text.encoder == "prior" else load_prior_text_encoder(cfg.prior.model, device, cfg.prior.dtype)


def store_report(cfg: ExperimentConfig, action: str, *, rebuild: bool = False, rank: int = 0, world: int = 1, barrier=None,
                 progress: bool = True, device: str | torch.device = "cpu") -> dict:
    """`amortized3d store build|info`: the embedding store a training run with ``cfg`` reads.

    build: prepare_store with verify="sha256" (every finished shard hashed, each rank its own; damaged ones rebuilt;
    ``rebuild`` deletes the store first); info: load_manifest with verify="sha256" (every shard's size and sha256).
    Every rank calls it. -> {"store": folder, corpus, split, n_prompts, shard_size, encoder ids, prior_suffixes,
    "shards": count, "bytes": total size}."""
    prompts = load_corpus(cfg.corpus.name, cfg.corpus.dir).train
    text_encoder = build_text_encoder(cfg, device)
    prior_encoder = build_prior_text_encoder(cfg, text_encoder, device)
    if action == "info":
        folder, expected = store_location(cfg, prompts, text_encoder, prior_encoder)
        manifest = load_manifest(folder, **expected, verify="sha256")
    else:
        folder = prepare_store(cfg, prompts, text_encoder, prior_encoder, rank=rank, world=world, barrier=barrier, progress=progress,
                               rebuild=rebuild, verify="sha256")
        manifest = load_manifest(folder)
    size = sum((folder / name).stat().st_size for name in [*manifest["shards"], "manifest.json"])
    summary = {key: manifest[key] for key in ("corpus", "split", "n_prompts", "shard_size", "encoder_id", "prior_encoder_id", "prior_suffixes")}
    return {"store": str(folder), **summary, "shards": len(manifest["shards"]), "bytes": size}


def build_generator(cfg: ExperimentConfig) -> Generator:
    """The generator of generator.kind (amortized3d.generators.GENERATORS), from its own config (the fields of the
    generator section it has) and text.dim; with render.latents its colors are LATENT_CHANNELS latents."""
    generator_class = GENERATORS[cfg.generator.kind]
    config = cfg.generator.part(generator_class.Config)
    if cfg.generator.kind == "gaussians":  # unset carve views: training span + near-polar rings, last render size
        (lo, hi), camera = cfg.camera.elevation_range, cfg.camera
        distance = sum(camera.distance_range) / 2
        if camera.relative_distance:  # in units of 1 / tan(fovy / 2), at the carve views' fovy
            distance /= math.tan(math.radians(max(camera.fovy_range)) / 2)
        elevations = sorted({-POLAR_RING, lo, (lo + hi) / 2, hi, POLAR_RING})
        defaults = {"carve_elevations": elevations, "carve_distance": distance,
                    "carve_fovy": max(camera.fovy_range), "carve_resolution": cfg.render.size_at(1.0)[0]}
        config = config.model_copy(update={k: v for k, v in defaults.items() if getattr(config, k) is None})
    if cfg.render.latents:
        return generator_class(cfg.text.dim, config, latent_channels=LATENT_CHANNELS)
    return generator_class(cfg.text.dim, config)


def build_prior(cfg: ExperimentConfig, text_encoder=None, device: str | torch.device = "cpu") -> Prior:
    """The prior of prior.kind (amortized3d.priors.PRIORS): stable_diffusion / deepfloyd_if load prior.model (sharing
    ``text_encoder`` when it is that model's own); analytic builds the closed-form ShapeWorld prior."""
    return PRIORS[cfg.prior.kind].from_config(cfg, text_encoder, device)


def build_decoding_prior(cfg: ExperimentConfig, text_encoder=None, device: str | torch.device = "cpu") -> Prior | None:
    """The prior whose decoder turns the renders of a render.latents run into images (its evaluations need it), or
    None for a run that renders RGB. text_encoder: the run's, shared when it is the prior's own."""
    if not cfg.render.latents:
        return None
    return build_prior(cfg, text_encoder if cfg.text.encoder == "prior" else None, device)


def build_second_prior(cfg: ExperimentConfig, device: str | torch.device = "cpu") -> Prior | None:
    """The prior of the second training phase (phase2, StableDreamer's dual-phase training), or None with one phase;
    it encodes its prompts with its own text encoder."""
    if cfg.phase2.start <= 0:
        return None
    return build_prior(cfg.model_copy(update={"prior": cfg.phase2_prior()}), None, device)


def optimizer_learning_rates(cfg: ExperimentConfig) -> tuple[float, ...]:
    """The learning rates of build_optimizer's parameter groups, in their order: geometry, background, and the decoders
    when optim.lr_decoder is set; for 3D Gaussians each splat attribute's (splats.lr_*), then the background."""
    if cfg.generator.kind == "gaussians":
        names = parameter_group_names(cfg.generator.sh_degree, cfg.generator.color_field)
        return *(getattr(cfg.splats, f"lr_{name}") for name in names), cfg.optim.lr_background
    decoder = () if cfg.optim.lr_decoder is None else (cfg.optim.lr_decoder,)
    return cfg.optim.lr_geometry, cfg.optim.lr_background, *decoder


def build_optimizer(cfg: ExperimentConfig, generator) -> torch.optim.Optimizer:
    """Adam, AdamW or Adan over the groups of optimizer_learning_rates: geometry (optim.lr_geometry), background
    (optim.lr_background), and with optim.lr_decoder the decoding MLPs (taken out of the geometry group); for 3D
    Gaussians one group per splat attribute and for the color field's grid and MLP (splats.lr_*), named after it, then
    the background."""
    rates = optimizer_learning_rates(cfg)
    geometry = list(generator.geometry_parameters())
    groups = [{"params": geometry, "lr": rates[0]}, {"params": list(generator.background_parameters()), "lr": rates[1]}]
    if cfg.generator.kind == "gaussians":  # a group per attribute, named: density control edits them (training/densify.py)
        params = generator.parameter_groups()
        names = parameter_group_names(cfg.generator.sh_degree, cfg.generator.color_field)
        groups = [{"params": params[name], "lr": lr, "name": name} for name, lr in zip(names, rates)]
        groups.append({"params": list(generator.background_parameters()), "lr": rates[-1], "name": "background"})
    elif cfg.optim.lr_decoder is not None:
        decoders = {id(p) for p in generator.decoder_parameters()}
        groups[0]["params"] = [p for p in geometry if id(p) not in decoders]
        groups.append({"params": list(generator.decoder_parameters()), "lr": rates[2]})
    if cfg.optim.name == "adan":
        from pytorch_optimizer import Adan

        return Adan(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    optimizer = torch.optim.AdamW if cfg.optim.name == "adamw" else torch.optim.Adam
    return optimizer(groups, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)


ADAPTER_LR = {"vsd": 1e-4, "lods-embedding": 1e-5, "lods-lora": 5e-7}


def build_adapter(cfg: ExperimentConfig, prior) -> tuple[torch.nn.Module, torch.optim.Optimizer] | tuple[None, None]:
    """The learned branch of VSD / LODS and its AdamW optimizer (betas 0.9, 0.99), or (None, None): the LoRA or
    embedding of a diffusers prior (distillation/adapters.py), or the analytic prior's additive branch
    (distillation/analytic_adapters.py)."""
    from amortized3d.distillation.adapters import LODSEmbedding, LODSLoRA, VSDLoRA
    from amortized3d.distillation.analytic_adapters import AnalyticLODSEmbedding, AnalyticLODSLoRA, AnalyticVSD

    method, analytic = cfg.distill.method, cfg.prior.analytic
    if method == "vsd":
        adapter = AnalyticVSD(prior) if analytic else VSDLoRA(prior, rank=cfg.distill.lora_rank)
    elif method == "lods-embedding":
        adapter = AnalyticLODSEmbedding(prior, cfg.render.height, cfg.render.width) if analytic else LODSEmbedding(prior)
    elif method == "lods-lora":
        adapter = AnalyticLODSLoRA(prior) if analytic else LODSLoRA(prior, rank=cfg.distill.lora_rank)
    else:
        return None, None
    return adapter, torch.optim.AdamW(adapter.parameters(), lr=adapter_lr(cfg), betas=(0.9, 0.99), eps=1e-15)


def adapter_lr(cfg: ExperimentConfig) -> float:
    """distill.adapter_lr, or the method's default learning rate for its learned branch (ADAPTER_LR)."""
    return cfg.distill.adapter_lr if cfg.distill.adapter_lr is not None else ADAPTER_LR[cfg.distill.method]


def run_config(run_dir: str | Path) -> ExperimentConfig:
    """The resolved config a training run wrote (RUN_DIR/config.yaml); a clear error for a folder that is not a run."""
    run_dir = Path(run_dir)
    config = RunDir(run_dir).config
    if not config.is_file():
        what = "does not exist" if not run_dir.exists() else "is not a folder" if not run_dir.is_dir() else "has no config.yaml"
        raise CheckpointError(f"{str(run_dir)!r} is not a training run folder: it {what}. Pass the folder that train wrote "
                              "(its --output), which holds config.yaml and checkpoints/")
    return config_from_dict(load_yaml(config), source=str(config))


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[ExperimentConfig, Generator, dict]:
    """Rebuild a trained generator from RUN_DIR (its config.yaml and latest checkpoint).

    -> (config, generator in eval mode on ``device``, checkpoint state).
    """
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    folder = latest_checkpoint(run_dir)
    if folder is None:
        raise CheckpointError(f"{str(run_dir)!r} has no checkpoint yet (no checkpoints/step_* folder); train longer or pass another run")
    generator = build_generator(cfg)
    state = load_checkpoint(folder, generator)
    return cfg, generator.to(device).eval(), state


def init_from_run(model, run_dir: str | Path, prompt: str, seed: int = 0) -> None:
    """Start 3D Gaussians (a PromptGaussians) from another run's asset for ``prompt``: its mesh (the generate path:
    a 64^3 baked grid, marching cubes) sampled at model.config.n_gaussians points, area-uniform (trimesh), each with
    the color of its face."""
    import trimesh

    from amortized3d.inference.baked import bake_representation
    from amortized3d.inference.export import extract_mesh

    source_cfg, source, _ = load_run(run_dir)
    if source_cfg.render.latents:
        raise CheckpointError(f"{str(run_dir)!r} was trained with render.latents=true: its field's colors are the prior's latents, so "
                              "its mesh has no colors to start 3D Gaussians from; start from a run with render.latents=false "
                              "(or from the mesh that `generate` writes, whose colors are decoded)")
    check_trained_prompts(source_cfg, [prompt], run_dir)
    text = build_text_encoder(source_cfg).encode([prompt])
    with torch.no_grad():
        mesh = extract_mesh(bake_representation(source(text.pooled, text.tokens), 64, source_cfg.sampling_radius()))
    points, faces = trimesh.sample.sample_surface(mesh, model.config.n_gaussians, seed=seed)
    colors = mesh.visual.vertex_colors[mesh.faces[faces], :3].mean(1) / 255.0
    model.start_from_points(torch.as_tensor(points, dtype=torch.float32), torch.as_tensor(colors, dtype=torch.float32))


def check_trained_prompts(cfg: ExperimentConfig, prompts: list[str], run_dir: str | Path = "the run") -> None:
    """CorpusError unless a per-prompt run (generator.kind ngp or gaussians: one asset, trained for corpus prompt:TEXT) is
    asked only for its own prompt; an amortized generator takes any prompt."""
    trained = single_prompt(cfg.corpus.name)
    other = next((p for p in prompts if p != trained), None)
    if cfg.generator.kind in PER_PROMPT and other is not None:
        raise CorpusError(f"{str(run_dir)!r} is a per-prompt run: it optimized one asset, for {trained!r}, and cannot make one for "
                          f"{other!r}. Pass {trained!r}, or train that prompt: amortized3d train --prompt {other!r}")


def describe_generator(generator: torch.nn.Module, cfg: ExperimentConfig | None = None) -> str:
    """Parameter counts per module and, given the config, the memory of one training step's main tensors (JSON).

    Memory figures are estimates from tensor shapes (float32, 4 bytes a value): parameters with
    their gradients and two Adam moments; the generator's largest activations for the step's
    prompts; and the renderer's per-sample tensors kept for the backward pass (positions,
    features, hidden activations, outputs), for prompts_per_step x views_per_prompt renders of
    H x W rays (the largest of render.size_schedule) with n_proposal + n_importance samples. The prior's weights and activations are
    not included: they depend on the checkpoint (Stable Diffusion 2.1-base: about 1.3 B parameters).
    """
    total = sum(p.numel() for p in generator.parameters())
    rows = {name: sum(p.numel() for p in child.parameters()) for name, child in generator.named_children()}
    rows = {name: n for name, n in rows.items() if n}
    loose = total - sum(rows.values())
    if loose:
        rows["(own parameters)"] = loose
    report: dict = {"parameters": total, "by_module": rows}
    if cfg is not None:
        mb = 4 / 2**20
        P = cfg.train.prompts_per_step
        height, width = max(cfg.render.size_at(progress) for progress in [0.0, *(k[0] for k in cfg.render.size_schedule)])
        rays = P * cfg.train.views_per_prompt * height * width  # at the largest render size
        samples = rays * (cfg.render.n_proposal + cfg.render.n_importance)  # samples rendered with gradient
        sizes = generator.describe()
        activations = P * sizes["activations_per_prompt"]
        per_sample = sizes["values_per_sample"]
        report["training_step_memory_mb (estimate)"] = {
            "parameters + gradients + Adam moments": round(4 * total * mb, 1),
            "generator activations": round(activations * mb, 1),
            "render samples (with gradient)": round(samples * per_sample * mb, 1),
            "samples with gradient per step": samples,
        }
    return json.dumps(report, indent=1)
