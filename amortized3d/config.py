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
import math
import re
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
    # spectral norm on the hypernetwork's linear layers; null: on for SDS (ScaleDreamer Sec. 4.2 and ATT3D: training the
    # hypernetwork with SDS fails without it, its gradients being about 10x ASD's), off otherwise
    spectral_norm: bool | None = None
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
    # ASD's timestep shift dt (amortized3d/distillation/score_distillation.py, asd_shifted_timesteps): "paper"
    # U[0, eta (t - T_min)] (Alg. 1); "reference" eta u (T_max - t) (the first published code); "deterministic"
    # eta (t - T_min) (Tables 4-5); "fixed" eta T_max (Fig. 13); always t + dt <= T_max
    asd_shift: str = "paper"
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
    ("distill", "asd_shift"): ("paper", "reference", "deterministic", "fixed"),
    ("train", "mixed_precision"): ("no", "fp16", "bf16"),
    ("optim", "name"): ("adam", "adan"),
    ("train", "wandb"): ("auto", "offline", "online", "disabled"),
}
# The allowed interval of every number in the config (of each element, for lists), in interval notation:
# "[a, b]" closed, "(a, b)" open. Every float must also be finite. A test checks that no numeric key is missing.
RANGES = {
    ("data", "shard_size"): "[1, 1000000]", ("data", "encode_batch"): "[1, 65536]", ("data", "num_workers"): "[0, 64]",
    ("text", "dim"): "[1, 16384]",
    ("generator", "channel_multiplier"): "[1, 8]", ("generator", "n_levels"): "[1, 32]", ("generator", "n_features_per_level"): "[1, 8]",
    ("generator", "log2_hashmap_size"): "[4, 26]", ("generator", "base_resolution"): "[1, 4096]", ("generator", "per_level_scale"): "[1, 8]",
    ("generator", "hyper_hidden"): "[1, 4096]", ("generator", "mlp_hidden"): "[1, 4096]", ("generator", "sphere_radius"): "(0, 100]",
    ("generator", "bound"): "(0, 100]",
    ("render", "height"): "[1, 4096]", ("render", "width"): "[1, 4096]", ("render", "n_proposal"): "[1, 4096]",
    ("render", "n_importance"): "[0, 4096]", ("render", "inv_std"): "(0, 100000]", ("render", "scene_radius"): "(0, 100]",
    ("render", "random_background_prob"): "[0, 1]", ("render", "eikonal_points"): "[0, 10000000]",
    ("camera", "elevation_range"): "[-90, 90]", ("camera", "distance_range"): "(0, 100]", ("camera", "fovy_range"): "(0, 180)",
    ("camera", "eval_elevation"): "[-90, 90]", ("camera", "eval_distance"): "(0, 100]", ("camera", "eval_fovy"): "(0, 180)",
    ("prior", "resolution"): "[8, 4096]", ("prior", "perp_neg_scale"): "[-10, 0]", ("prior", "std"): "(0, 10]",
    ("prior", "uncond_mean"): "[0, 1]", ("prior", "uncond_std"): "(0, 100]", ("prior", "n_proposal"): "[1, 4096]",
    ("prior", "n_importance"): "[0, 4096]",
    ("distill", "guidance_scale"): "[0, 100000]", ("distill", "eta"): "[0, 1]", ("distill", "adapter_lr"): "(0, 1]",
    ("distill", "lora_rank"): "[1, 1024]", ("distill", "t_min"): "(0, 1)", ("distill", "t_max"): "(0, 1)",
    ("regularizers", "sparsity"): "[0, 1000000]", ("regularizers", "opacity_entropy"): "[0, 1000000]",
    ("regularizers", "eikonal"): "[0, 1000000]",
    ("optim", "lr_geometry"): "(0, 1]", ("optim", "lr_background"): "(0, 1]", ("optim", "betas"): "[0, 1)", ("optim", "eps"): "(0, 1)",
    ("train", "steps"): "[1, 1000000000]", ("train", "prompts_per_step"): "[1, 100000]", ("train", "views_per_prompt"): "[1, 64]",
    ("train", "grad_accum"): "[1, 1024]", ("train", "seed"): "[0, 9223372036854775807]", ("train", "log_every"): "[1, 1000000000]",
    ("train", "val_every"): "[1, 1000000000]", ("train", "ckpt_every"): "[1, 1000000000]", ("train", "eval_every"): "[0, 1000000000]",
    ("train", "keep_checkpoints"): "[1, 1000000]", ("train", "max_bad_steps"): "[1, 1000000000]",
    ("eval", "n_views"): "[1, 4096]", ("eval", "resolution"): "[1, 4096]", ("eval", "iou_resolution"): "[2, 1024]",
}
RANGE_HINTS = {
    ("prior", "perp_neg_scale"): "negative values push away from the other views' prompts (the reference recipes use -0.5); "
                                 "0 turns the negatives off, and a positive value would pull toward them",
    ("regularizers", "sparsity"): "each knot is [progress in [0, 1], weight >= 0]",
    ("distill", "t_min"): "fractions of the 1000 diffusion steps, e.g. [0.5, 0.02]",
    ("distill", "t_max"): "fractions of the 1000 diffusion steps, e.g. [0.98, 0.5]",
    ("optim", "eps"): "e.g. 1e-15 (Adam's term added to the denominator)",
}


def _in_interval(value: float, interval: str) -> bool:
    lo, hi = (float(v) for v in interval[1:-1].split(","))
    above = value >= lo if interval[0] == "[" else value > lo
    below = value <= hi if interval[-1] == "]" else value < hi
    return above and below


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
            raise ConfigError(f"{path}={value!r} must be true or false, e.g. {path}=true")
        return value
    if annotation is int:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)  # 1e3 and 1000.0 are 1000
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} must be an integer, e.g. {path}=1000")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} must be a number, e.g. {path}=1e-3")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{path}={value!r} must be a finite number")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} must be a string, e.g. {path}=\"text\"")
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
        if values is None:  # an empty section
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys to values")
        hints = typing.get_type_hints(type(sub))
        keys = [f.name for f in dataclasses.fields(sub)]
        for key, value in values.items():
            if key not in keys:
                raise ConfigError(
                    f"{source}: unknown key {section}.{key}; allowed keys in {section}: {', '.join(keys)}.{_suggest(str(key), keys)}"
                )
            try:
                setattr(sub, key, _check_type(f"{section}.{key}", value, hints[key]))
            except ConfigError as err:
                raise ConfigError(f"{source}: {err}") from None


class _YamlLoader(yaml.SafeLoader):
    """YAML as PyYAML reads it, plus exponent floats without a dot (1e-3, 5E4), which YAML 1.1 reads as strings."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def parse_yaml(text: str, source: str):
    """YAML text -> Python value (see _YamlLoader); ConfigError naming ``source`` for anything that is not YAML."""
    try:
        return yaml.load(text, Loader=_YamlLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{source}:{where} not valid YAML ({problem}); fix the syntax, e.g. `key: value` under `section:`") from None
    except (ValueError, OverflowError) as err:  # e.g. an integer of thousands of digits (Python's conversion limit)
        raise ConfigError(f"{source}: a value cannot be read ({err}); write numbers with at most a few dozen digits") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a config; write it as sections of `key: value` lines, "
                          "e.g. `train:` then `  steps: 100`") from None


def shown(text: str, limit: int = 80) -> str:
    """repr of ``text`` for a message, cut to ``limit`` characters (a value can be a whole file's worth)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text):,} characters)"


def parse_override(text: str) -> dict:
    """'train.steps=200' -> {'train': {'steps': 200}} (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {shown(text)} must look like section.key=value, e.g. train.steps=200")
    path, raw = text.split("=", 1)
    parts = path.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"override {shown(text)}: the key must be section.key, e.g. distill.method=sds")
    value = parse_yaml(raw, f"override {shown(text)}") if raw.strip() else None
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
    for (section, key), interval in RANGES.items():
        value = getattr(getattr(cfg, section), key)
        numbers = [] if value is None else [value] if not isinstance(value, list) else value
        if section == "regularizers":  # [[progress, weight], ...]
            numbers = [k[1] for k in value if isinstance(k, list) and len(k) == 2]
            if any(not _in_interval(k[0], "[0, 1]") for k in value if isinstance(k, list) and len(k) == 2):
                raise ConfigError(f"{section}.{key}={value!r}: each knot's progress must lie in [0, 1] (the fraction of train.steps)")
        for number in numbers:
            if not (math.isfinite(number) and _in_interval(number, interval)):
                what = "each value" if isinstance(value, list) else "the value"
                hint = f" ({RANGE_HINTS[section, key]})" if (section, key) in RANGE_HINTS else ""
                raise ConfigError(f"{section}.{key}={value!r}: {what} must be a finite number in {interval}{hint}; "
                                  f"set {section}.{key} to such a value")
    for name in ("elevation_range", "distance_range", "fovy_range"):
        lo_hi = getattr(cfg.camera, name)
        if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
            raise ConfigError(f"camera.{name}={lo_hi!r} must be [low, high] with low <= high")
    for name in ("t_min", "t_max"):
        pair = getattr(cfg.distill, name)
        if len(pair) != 2:
            raise ConfigError(f"distill.{name}={pair!r} must be [start, end], fractions of 1000 steps in (0, 1), e.g. [0.5, 0.02]")
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
    if cfg.train.eval_every % cfg.train.ckpt_every:
        raise ConfigError(f"train.eval_every={cfg.train.eval_every} must be 0 (off) or a multiple of train.ckpt_every={cfg.train.ckpt_every}: "
                          "it evaluates the checkpoint written at that step")
    if cfg.train.eval_every and cfg.prior.kind != "analytic":
        raise ConfigError("train.eval_every runs the ShapeWorld oracle, which needs the analytic prior's ShapeWorld corpora; "
                          "evaluate other runs' checkpoints with `amortized3d evaluate --checkpoint RUN_DIR --clip MODEL`")
    if any(lo > hi for lo, hi in zip(cfg.distill.t_min, cfg.distill.t_max)):
        raise ConfigError(f"distill.t_min={cfg.distill.t_min!r} and distill.t_max={cfg.distill.t_max!r}: at the start and at the end of "
                          "training T_min must not exceed T_max; e.g. distill.t_min=[0.5,0.02] distill.t_max=[0.98,0.5]")
    if cfg.generator.spectral_norm and cfg.generator.kind != "hyper_ingp":
        raise ConfigError(f"generator.spectral_norm=true applies to the Hyper-iNGP hypernetwork, not generator.kind={cfg.generator.kind!r}; "
                          "set generator.spectral_norm=false (or null)")
    if cfg.generator.sphere_radius >= cfg.generator.bound:
        raise ConfigError(f"generator.sphere_radius={cfg.generator.sphere_radius} must be smaller than generator.bound={cfg.generator.bound}: "
                          "the initial sphere must fit in the generator's box")
    n_betas = 3 if cfg.optim.name == "adan" else 2
    if len(cfg.optim.betas) != n_betas:
        raise ConfigError(f"optim.betas={cfg.optim.betas!r}: {cfg.optim.name} takes {n_betas} betas in [0, 1), e.g. "
                          + ("[0.98, 0.92, 0.99]" if n_betas == 3 else "[0.9, 0.99]"))


def recipe_path(recipe: str) -> Path:
    path = CONFIG_DIR / f"{recipe}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"recipe {recipe!r} not found in {CONFIG_DIR}; available: {', '.join(available)}")
    return path


def load_yaml(path: str | Path) -> dict:
    """A config file's mapping of sections; ConfigError naming the file when it is missing, unreadable or not YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (or is not a file); pass the path of a YAML file, e.g. configs/mg15.yaml")
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"config file {str(path)!r} cannot be read ({err.strerror or err}); check its permissions") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start}); save it as UTF-8 YAML") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} holds a {type(data).__name__}, not a mapping of sections (e.g. `train:` then `  steps: 100`)")
    return data


def resolve_defaults(cfg: ExperimentConfig) -> None:
    """Fill the keys whose default depends on others (null in a recipe): prior.model, generator.spectral_norm."""
    if cfg.prior.model is None:
        cfg.prior.model = DEFAULT_PRIOR_MODELS.get(cfg.prior.kind, DEFAULT_PRIOR_MODELS["stable_diffusion"])
    if cfg.generator.spectral_norm is None:
        cfg.generator.spectral_norm = cfg.generator.kind == "hyper_ingp" and cfg.distill.method == "sds"


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
        apply_mapping(cfg, m, f"override {shown(text)}")
    cfg.corpus.name = name
    resolve_defaults(cfg)
    validate(cfg)
    return cfg


def config_to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict, source: str = "saved config") -> ExperimentConfig:
    """A config from its saved form (config_to_dict, a run's config.yaml), validated; errors name ``source``."""
    cfg = ExperimentConfig()
    apply_mapping(cfg, data, source)
    resolve_defaults(cfg)
    try:
        validate(cfg)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    return cfg


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
