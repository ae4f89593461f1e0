"""Experiment configuration: YAML recipes in configs/ plus command-line overrides.

A config is a tree of dataclasses. ``load_config`` starts from the dataclass
defaults, applies the recipe that the corpus selects (corpora/catalog.yaml), then
an optional user YAML file, then ``section.key=value`` overrides, and validates
everything up front: unknown sections or keys, wrong types and out-of-range values
raise ``ConfigError`` naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


PLANNED_PRIORS = {"mvdream": "the multi-view MVDream prior (needed by the DL17k recipe)"}
DEFAULT_PRIOR_MODELS = {"stable_diffusion": "stabilityai/stable-diffusion-2-1-base", "deepfloyd_if": "DeepFloyd/IF-I-XL-v1.0"}


class ConfigError(ValueError):
    """A bad configuration key or value."""


@dataclass
class CorpusConfig:
    name: str = "shapeworld-16"
    dir: str | None = None  # folder with reference corpus JSON files; see corpora/README.md


@dataclass
class DataConfig:
    # The text-embedding store training streams (amortized3d/data/embedding_store.py, data/loader.py).
    # store: its folder; null: CACHE/stores/<corpus>-train-<content key>, CACHE = $AMORTIZED3D_CACHE or
    # ~/.cache/amortized3d. A missing store is built by all ranks before the first step.
    store: str | None = None
    shard_size: int | None = None  # prompts per shard; null: about 64 MB of arrays per shard
    encode_batch: int = 256  # prompts per text-encoder call while building
    num_workers: int = 2  # data-loader worker processes per rank (0: load in the training process)


@dataclass
class TextConfig:
    # "hashed": offline deterministic encoder (amortized3d/text/hashed_encoder.py), width text.dim;
    # "prior": the CLIP text encoder in prior.model's folder (amortized3d/text/pretrained_encoder.py), width from the model
    encoder: str = "hashed"
    dim: int = 1024


@dataclass
class GeneratorConfig:
    kind: str = "hyper_ingp"  # hyper_ingp, conv3d (StyleGAN2-like) or triplane (transformer)
    # conv3d / triplane: architecture sizes from the preset (paper or tiny); conv3d channel multiplier m;
    # activation checkpointing of the synthesis blocks / transformer blocks (less memory, same results)
    preset: str = "paper"
    channel_multiplier: int = 1
    activation_checkpointing: bool = False
    # hyper_ingp sizes
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.4473
    hyper_hidden: int = 64
    mlp_hidden: int = 64
    spectral_norm: bool = False
    sphere_radius: float = 0.5
    bound: float = 2.0


@dataclass
class RenderConfig:
    height: int = 64
    width: int = 64
    n_proposal: int = 128
    n_importance: int = 64
    inv_std: float = 30.0
    scene_radius: float = 2.0  # near/far come from this bounding sphere
    random_background_prob: float = 0.2
    eikonal_points: int = 4096  # ray samples per step used for the eikonal term


@dataclass
class CameraConfig:
    elevation_range: list[float] = field(default_factory=lambda: [-10.0, 45.0])
    distance_range: list[float] = field(default_factory=lambda: [1.0, 1.5])
    fovy_range: list[float] = field(default_factory=lambda: [40.0, 70.0])
    eval_elevation: float = 15.0
    eval_distance: float = 1.5
    eval_fovy: float = 70.0


@dataclass
class PriorConfig:
    kind: str = "analytic"  # "analytic" (ShapeWorld, closed form), "stable_diffusion" or "deepfloyd_if" (diffusers)
    model: str | None = None  # hub id or local diffusers folder; None: the kind's default (DEFAULT_PRIOR_MODELS)
    resolution: int = 512  # renders are resized to this before the VAE (stable_diffusion)
    dtype: str = "auto"  # weights: auto = fp16 on CUDA, fp32 on CPU; or fp16, bf16, fp32
    view_dependent: bool = False  # append ", front view" / ", side view" / ... to prompts by camera (stable_diffusion)
    perp_neg: bool = False  # Perp-Neg negative view prompts in the guidance (stable_diffusion)
    perp_neg_scale: float = -0.5  # factor on the Perp-Neg weights -(a exp(-b r) + c), as in the reference recipe
    std: float = 0.05
    uncond_mean: float = 0.5
    uncond_std: float = 0.5
    n_proposal: int = 64  # samples for the ground-truth renders of the analytic prior
    n_importance: int = 32


@dataclass
class DistillConfig:
    method: str = "asd"
    guidance_scale: float | None = None  # None: the method's default (SDS 100, CSD 1, ASD 7.5, VSD 7.5, LODS 1000)
    eta: float = 0.1
    # VSD / LODS learned branch (amortized3d/distillation/adapters.py): AdamW learning rate
    # (None: VSD 1e-4, lods-embedding 1e-5, lods-lora 5e-7) and LoRA rank
    adapter_lr: float | None = None
    lora_rank: int = 4
    t_min: list[float] = field(default_factory=lambda: [0.5, 0.02])  # [start, end], fractions of 1000
    t_max: list[float] = field(default_factory=lambda: [0.98, 0.5])


@dataclass
class RegularizerConfig:
    # (progress, weight) knots, see amortized3d/distillation/regularizers.py
    sparsity: list[list[float]] = field(default_factory=lambda: [[0.0, 20.0]])
    opacity_entropy: list[list[float]] = field(default_factory=lambda: [[0.8, 0.0], [1.0, 10.0]])
    eikonal: list[list[float]] = field(default_factory=lambda: [[0.0, 100.0], [0.1, 1.0]])


@dataclass
class OptimConfig:
    name: str = "adam"  # adam (torch) or adan (pytorch-optimizer's Adan; betas then have three entries)
    lr_geometry: float = 4e-3
    lr_background: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    eps: float = 1e-15


@dataclass
class TrainConfig:
    steps: int = 50000
    prompts_per_step: int = 1
    views_per_prompt: int = 1
    grad_accum: int = 1
    mixed_precision: str = "no"
    seed: int = 0
    log_every: int = 10
    val_every: int = 1000
    ckpt_every: int = 1000
    # ShapeWorld runs (analytic prior): the oracle evaluation of the test split every eval_every steps, right
    # after that step's checkpoint, into RUN_DIR/evals/step_<step>.json (0: off); a multiple of ckpt_every
    eval_every: int = 0
    keep_checkpoints: int = 2
    max_bad_steps: int = 20
    output_dir: str | None = None
    wandb: str = "auto"
    # audit trail: every rank appends the prompts of each micro-batch, and at the end a digest
    # of its parameters, to RUN_DIR/prompts/rank<r>.jsonl
    record_prompts: bool = False


@dataclass
class EvalConfig:
    n_views: int = 8
    resolution: int = 64
    iou_resolution: int = 48


@dataclass
class ExperimentConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    camera: CameraConfig = field(default_factory=CameraConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    regularizers: RegularizerConfig = field(default_factory=RegularizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    ("text", "encoder"): ("hashed", "prior"),
    ("generator", "kind"): ("hyper_ingp", "conv3d", "triplane"),
    ("generator", "preset"): ("paper", "tiny"),
    ("prior", "kind"): ("analytic", "stable_diffusion", "deepfloyd_if"),
    ("prior", "dtype"): ("auto", "fp16", "bf16", "fp32"),
    ("distill", "method"): ("asd", "sds", "csd", "vsd", "lods-embedding", "lods-lora"),
    ("train", "mixed_precision"): ("no", "fp16", "bf16"),
    ("optim", "name"): ("adam", "adan"),
    ("train", "wandb"): ("auto", "offline", "online", "disabled"),
}
POSITIVE = {
    ("text", "dim"), ("data", "encode_batch"), ("render", "height"), ("render", "width"), ("render", "n_proposal"), ("render", "inv_std"),
    ("render", "scene_radius"), ("generator", "bound"), ("generator", "n_levels"), ("prior", "std"), ("prior", "uncond_std"),
    ("train", "steps"), ("train", "prompts_per_step"), ("train", "views_per_prompt"), ("train", "grad_accum"),
    ("train", "log_every"), ("train", "val_every"), ("train", "ckpt_every"), ("train", "keep_checkpoints"),
    ("train", "max_bad_steps"), ("optim", "lr_geometry"), ("optim", "lr_background"), ("eval", "n_views"),
    ("eval", "resolution"), ("eval", "iou_resolution"), ("prior", "n_proposal"), ("prior", "resolution"), ("distill", "lora_rank"), ("generator", "channel_multiplier"),
}
RANGES = {
    ("render", "random_background_prob"): (0.0, 1.0),
    ("distill", "eta"): (0.0, 1.0),
}


def _suggest(name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_type(path: str, value, annotation):
    """Coerce ``value`` to ``annotation`` (int -> float allowed) or raise ConfigError."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _check_type(path, value, inner)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}={value!r} must be a list, e.g. {path}=[1.0,2.0]")
        return [_check_type(f"{path}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} must be an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} must be a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string")
        return value
    return value


def apply_mapping(cfg: ExperimentConfig, mapping: dict, source: str) -> None:
    """Set the values of a nested {section: {key: value}} mapping on ``cfg``, validating names and types."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(mapping).__name__}")
    sections = [f.name for f in dataclasses.fields(cfg)]
    for section, values in mapping.items():
        if section not in sections:
            raise ConfigError(
                f"{source}: unknown config section {section!r}; allowed sections: {', '.join(sections)}.{_suggest(str(section), sections)}"
            )
        sub = getattr(cfg, section)
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys to values")
        hints = typing.get_type_hints(type(sub))
        keys = [f.name for f in dataclasses.fields(sub)]
        for key, value in values.items():
            if key not in keys:
                raise ConfigError(
                    f"{source}: unknown key {section}.{key}; allowed keys in {section}: {', '.join(keys)}.{_suggest(str(key), keys)}"
                )
            setattr(sub, key, _check_type(f"{section}.{key}", value, hints[key]))


def parse_override(text: str) -> dict:
    """'train.steps=200' -> {'train': {'steps': 200}} (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.steps=200")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {text!r}: the key must be section.key, e.g. distill.method=sds")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: cannot parse value {raw!r} ({err})") from err
    return {parts[0]: {parts[1]: value}}


def validate(cfg: ExperimentConfig) -> None:
    """Range and choice checks that types alone cannot express."""
    if cfg.prior.kind in PLANNED_PRIORS:
        raise ConfigError(
            f"prior.kind={cfg.prior.kind!r}: {PLANNED_PRIORS[cfg.prior.kind]} is not implemented yet, so this recipe cannot run. "
            "Pick another prior, e.g. prior.kind=stable_diffusion (4 views per prompt work with it too)."
        )
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    for section, key in POSITIVE:
        value = getattr(getattr(cfg, section), key)
        if value is None or value <= 0:
            raise ConfigError(f"{section}.{key}={value!r} must be positive")
    for (section, key), (lo, hi) in RANGES.items():
        value = getattr(getattr(cfg, section), key)
        if not lo <= value <= hi:
            raise ConfigError(f"{section}.{key}={value!r} must lie in [{lo}, {hi}]")
    for name in ("elevation_range", "distance_range", "fovy_range"):
        lo_hi = getattr(cfg.camera, name)
        if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
            raise ConfigError(f"camera.{name}={lo_hi!r} must be [low, high] with low <= high")
    for name in ("t_min", "t_max"):
        pair = getattr(cfg.distill, name)
        if len(pair) != 2 or not all(0.0 < v < 1.0 for v in pair):
            raise ConfigError(f"distill.{name}={pair!r} must be [start, end], fractions of 1000 steps in (0, 1)")
    for name in ("sparsity", "opacity_entropy", "eikonal"):
        knots = getattr(cfg.regularizers, name)
        if any(len(k) != 2 for k in knots) or [k[0] for k in knots] != sorted(k[0] for k in knots):
            raise ConfigError(f"regularizers.{name}={knots!r} must be [[progress, weight], ...] with increasing progress")
    if cfg.render.scene_radius > cfg.generator.bound * 3**0.5:
        raise ConfigError(
            f"render.scene_radius={cfg.render.scene_radius} exceeds the generator's box (generator.bound={cfg.generator.bound}); "
            "lower render.scene_radius or raise generator.bound"
        )
    if cfg.distill.method in ("vsd", "lods-embedding", "lods-lora") and cfg.prior.kind == "analytic":
        raise ConfigError(
            f"distill.method={cfg.distill.method} trains a branch of a neural prior, but prior.kind={cfg.prior.kind!r}; "
            "use prior.kind=stable_diffusion or deepfloyd_if (e.g. --prior MODEL) or one of asd, sds, csd"
        )
    if (cfg.prior.view_dependent or cfg.prior.perp_neg) and cfg.prior.kind == "analytic":
        raise ConfigError(
            "prior.view_dependent and prior.perp_neg change the text of a text-to-image prior; the analytic prior's "
            "conditionals are exact per camera already. Set them to false, or use prior.kind=stable_diffusion or deepfloyd_if"
        )
    if cfg.train.eval_every < 0 or (cfg.train.eval_every and cfg.train.eval_every % cfg.train.ckpt_every):
        raise ConfigError(f"train.eval_every={cfg.train.eval_every} must be 0 (off) or a multiple of train.ckpt_every={cfg.train.ckpt_every}: "
                          "it evaluates the checkpoint written at that step")
    if cfg.train.eval_every and cfg.prior.kind != "analytic":
        raise ConfigError("train.eval_every runs the ShapeWorld oracle, which needs the analytic prior's ShapeWorld corpora; "
                          "evaluate other runs' checkpoints with `amortized3d evaluate --checkpoint RUN_DIR --clip MODEL`")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be >= 0 (0 loads batches in the training process)")
    if cfg.data.shard_size is not None and cfg.data.shard_size < 1:
        raise ConfigError(f"data.shard_size={cfg.data.shard_size} must be positive (or null for about 64 MB per shard)")
    if cfg.distill.adapter_lr is not None and cfg.distill.adapter_lr <= 0:
        raise ConfigError(f"distill.adapter_lr={cfg.distill.adapter_lr} must be positive (or null for the method's default)")
    n_betas = 3 if cfg.optim.name == "adan" else 2
    if len(cfg.optim.betas) != n_betas or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={cfg.optim.betas!r}: {cfg.optim.name} takes {n_betas} betas in [0, 1), e.g. "
                          + ("[0.98, 0.92, 0.99]" if n_betas == 3 else "[0.9, 0.99]"))
    if cfg.distill.guidance_scale is not None and cfg.distill.guidance_scale < 0:
        raise ConfigError(f"distill.guidance_scale={cfg.distill.guidance_scale} must be >= 0 (or null for the method's default)")


def recipe_path(recipe: str) -> Path:
    path = CONFIG_DIR / f"{recipe}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"recipe {recipe!r} not found in {CONFIG_DIR}; available: {', '.join(available)}")
    return path


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return data


def load_config(corpus: str | None = None, config_file: str | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Defaults <- corpus recipe <- config file <- overrides, then validate.

    A corpus without a recipe of its own can be trained with an explicit config file
    (e.g. --corpus df415 --config configs/mg15.yaml), which then replaces the recipe.
    """
    from amortized3d.data.corpora import CorpusError, recipe_for_corpus

    cfg = ExperimentConfig()
    user = load_yaml(config_file) if config_file else {}
    override_maps = [parse_override(o) for o in overrides]
    name = corpus
    if name is None:
        for m in [user, *override_maps]:
            name = m.get("corpus", {}).get("name", name)
    name = name or cfg.corpus.name
    try:
        apply_mapping(cfg, load_yaml(recipe_path(recipe_for_corpus(name))), f"recipe for {name}")
    except CorpusError as err:
        if not (config_file and "has no training recipe" in str(err)):
            raise
    if config_file:
        apply_mapping(cfg, user, str(config_file))
    for text, m in zip(overrides, override_maps):
        apply_mapping(cfg, m, f"override {text!r}")
    cfg.corpus.name = name
    if cfg.prior.model is None:
        cfg.prior.model = DEFAULT_PRIOR_MODELS.get(cfg.prior.kind, DEFAULT_PRIOR_MODELS["stable_diffusion"])
    validate(cfg)
    return cfg


def config_to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> ExperimentConfig:
    cfg = ExperimentConfig()
    apply_mapping(cfg, data, "saved config")
    validate(cfg)
    return cfg


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
