"""Experiment configuration: YAML recipes in configs/ plus command-line overrides.

A config is a tree of pydantic models (amortized3d/schema.py): ExperimentConfig has one section per YAML
section (``train:``, ``render:``, ...), and every field carries its type, its choices and its range. The
generator and prior sections are flat in YAML (``generator.kind`` beside every kind's keys) and made of the
configs that each generator and prior owns: GeneratorConfig holds the fields of every generator's ``Config`` in
amortized3d.generators.GENERATORS (HyperINGPConfig, Conv3DConfig, TriplaneConfig), and its ``kind`` choices are
that mapping's names; PriorConfig likewise from amortized3d.priors.PRIORS (AnalyticPriorConfig,
DiffusionPriorConfig).

``load_config`` merges, as nested {section: {key: value}} dicts, the recipe that the corpus selects
(corpora/catalog.yaml), an optional user YAML file and ``section.key=value`` overrides, over the fields' defaults,
and validates the result once: unknown sections or keys, wrong types, values outside their choices or range and
conflicting keys raise ``ConfigError``, one line naming where the value came from, the key, the bad value, what is
allowed and how to fix it. The rules between keys are ExperimentConfig._resolve_and_check, the only hand-written ones.
"""

from __future__ import annotations

import difflib
import re
import typing
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from amortized3d.distillation.methods import METHODS
from amortized3d.distillation.methods.asd import ASD_SHIFTS
from amortized3d.distillation.score_distillation import T_SCHEDULES, check_denoise_steps
from amortized3d.generators import GENERATORS, PER_PROMPT
from amortized3d.priors import PRIORS
from amortized3d.priors.diffusers_prior import DEFAULT_MODELS
from amortized3d.schema import ConfigModel, Int

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"


ANALYTIC_PRIORS = ("analytic", "analytic_multiview")
MULTIVIEW_PRIORS = ("analytic_multiview", "mvdream")  # they see each prompt's views as one object (Prior.multiview)
LATENT_CHANNELS = 4  # the latents of the priors that have them: SD's and MVDream's VAE, the latent analytic prior (render.latents)


class ConfigError(ValueError):
    """A bad configuration key or value."""


def hint(text: str) -> dict:
    """A field's json_schema_extra: ``text`` is added to its range errors."""
    return {"hint": text}


class CorpusConfig(ConfigModel):
    name: str = "shapeworld-16"
    dir: str | None = None  # folder with reference corpus JSON files; see corpora/README.md


class DataConfig(ConfigModel):
    # The text-embedding store training streams (amortized3d/data/embedding_store.py, data/loader.py).
    # store: its folder; null: CACHE/stores/<corpus>-train-<content key>, CACHE = $AMORTIZED3D_CACHE or
    # ~/.cache/amortized3d. A missing store is built by all ranks before the first step.
    store: str | None = None
    shard_size: Int | None = Field(None, ge=1, le=1_000_000)  # prompts per shard; null: about 64 MB of arrays per shard
    encode_batch: Int = Field(256, ge=1, le=65536)  # prompts per text-encoder call while building
    num_workers: Int = Field(2, ge=0, le=64)  # data-loader worker processes per rank (0: load in the training process)


class TextConfig(ConfigModel):
    # "hashed": offline deterministic encoder (amortized3d/text/hashed_encoder.py), width text.dim;
    # "prior": the CLIP text encoder in prior.model's folder (amortized3d/text/pretrained_encoder.py), width from the model
    encoder: Literal["hashed", "prior"] = "hashed"
    dim: Int = Field(1024, ge=1, le=16384)


class GeneratorConfig(*dict.fromkeys(g.Config for g in GENERATORS.values())):
    """The ``generator:`` section: ``kind`` (hyper_ingp, conv3d (StyleGAN2-like) or triplane (transformer)) and the
    fields of every kind's own config; ``part(HyperINGPConfig)`` (...) gives the config of the generator it builds."""

    kind: Literal[tuple(GENERATORS)] = "hyper_ingp"


class RenderConfig(ConfigModel):
    height: Int = Field(64, ge=1, le=4096)
    width: Int = Field(64, ge=1, le=4096)
    n_proposal: Int = Field(128, ge=1, le=4096)
    n_importance: Int = Field(64, ge=0, le=4096)
    inv_std: float = Field(30.0, gt=0, le=100000)
    scene_radius: float = Field(2.0, gt=0, le=100)  # near/far come from this bounding sphere
    random_background_prob: float = Field(0.2, ge=0, le=1)
    # direct latent rendering (the reference's rgb_as_latents): the field's colors and background are the prior's
    # LATENT_CHANNELS latents, rendered at the prior's latent size (SD at 512: 64 x 64; the latent analytic prior: half
    # the render size), with no VAE encoder on the gradient path; evaluation decodes them with the prior's decoder
    # (training/step.py prior_space, training/previews.py render_validation)
    latents: bool = False
    eikonal_points: Int = Field(4096, ge=0, le=10_000_000)  # ray samples per step used for the eikonal term
    # HiFA's kernel smoothing of the proposal weights before importance sampling (rendering/volume.py smooth_weights):
    # an odd-length kernel, e.g. [1, 1, 1] (HiFA); [] : off
    importance_kernel: list[Annotated[float, Field(ge=0, le=1e6)]] = Field(
        [], json_schema_extra=hint("an odd number of weights >= 0, e.g. [1, 1, 1]"))
    # training render size by progress: [[progress, size], ...], from each knot's progress on the renders are size x size
    # (the reference per-prompt recipe: 64^2, then 256^2 from step 10k of 25k: [[0.4, 256]]); [] : height x width throughout
    size_schedule: list[list[Annotated[float, Field(ge=0, le=4096)]]] = Field(
        [], json_schema_extra=hint("each knot is [progress in [0, 1], size in pixels], e.g. [[0.4, 256]]"))

    def size_at(self, progress: float) -> tuple[int, int]:
        """(height, width) of the training renders at training progress in [0, 1] (size_schedule)."""
        size = (self.height, self.width)
        for at, side in self.size_schedule:
            if progress >= at:
                size = (int(side), int(side))
        return size

    def volume_kwargs(self) -> dict:
        """The volume renderer's settings, as keyword arguments of render_images, render_baked and render_prompt_scenes."""
        return dict(scene_radius=self.scene_radius, n_proposal=self.n_proposal, n_importance=self.n_importance, inv_std=self.inv_std,
                    importance_kernel=tuple(self.importance_kernel))


Elevation = Annotated[float, Field(ge=-90, le=90)]
Distance = Annotated[float, Field(gt=0, le=100)]
Fovy = Annotated[float, Field(gt=0, lt=180)]


class CameraConfig(ConfigModel):
    elevation_range: list[Elevation] = [-10.0, 45.0]
    # world units, or with relative_distance multiples of 1 / tan(fovy / 2) (MVDream's sampler: [0.8, 1.0])
    distance_range: list[Distance] = [1.0, 1.5]
    fovy_range: list[Fovy] = [40.0, 70.0]
    eval_elevation: Elevation = 15.0
    eval_distance: Distance = 1.5
    eval_fovy: Fovy = 70.0
    # the views of each prompt as one object's orbit (azimuths 360 / V apart, one elevation, distance and fovy per
    # prompt), as multi-view priors are trained (rendering/cameras.py, sample_training_cameras)
    group_views: bool = False
    relative_distance: bool = False


class PriorConfig(*dict.fromkeys(p.Config for p in PRIORS.values())):
    """The ``prior:`` section: ``kind`` ("analytic" (ShapeWorld, closed form), "analytic_multiview" (its joint prior
    over the views of one object), "stable_diffusion", "deepfloyd_if" or "mvdream" (diffusers)) and the fields of both
    priors' configs; ``part(AnalyticPriorConfig)`` (...) gives a prior's own."""

    kind: Literal[tuple(PRIORS)] = "analytic"

    @property
    def analytic(self) -> bool:
        """The closed-form ShapeWorld prior, per view or multi-view (it reads prompts as text, needs no weights)."""
        return self.kind in ANALYTIC_PRIORS


class Phase2Config(ConfigModel):
    """StableDreamer's dual-phase training: from training progress ``start`` on, the run distills from a second prior,
    the prior section with the keys of ``prior`` replaced (e.g. {kind: stable_diffusion} after DeepFloyd IF, or
    {latent: true} after the pixel-space analytic prior), on the same representation; ``lr_geometry`` (null: unchanged)
    is the geometry group's learning rate from then on (StableDreamer lowers it as the geometry converges).
    start 0: one phase."""

    start: float = Field(0.0, ge=0, lt=1)
    prior: dict[str, str | bool | int | float | None] = {}
    lr_geometry: float | None = Field(None, gt=0, le=1)


StepFraction = Annotated[float, Field(gt=0, lt=1)]


class DistillConfig(ConfigModel):
    method: Literal[tuple(METHODS)] = "asd"
    # null: the method's default (SDS 100, SDS* 50, CSD 1, ASD 7.5, VSD 7.5, LODS 1000)
    guidance_scale: float | None = Field(None, ge=0, le=100000)
    eta: float = Field(0.1, ge=0, le=1)
    # ASD's timestep shift dt (amortized3d/distillation/score_distillation.py, asd_shifted_timesteps): "paper"
    # U[0, eta (t - T_min)] (Alg. 1); "reference" eta u (T_max - t) (the first published code); "deterministic"
    # eta (t - T_min) (Tables 4-5); "fixed" eta T_max (Fig. 13); always t + dt <= T_max
    asd_shift: Literal[ASD_SHIFTS] = "paper"
    # VSD / LODS learned branch (amortized3d/distillation/adapters.py): AdamW learning rate
    # (null: VSD 1e-4, lods-embedding 1e-5, lods-lora 5e-7) and LoRA rank
    adapter_lr: float | None = Field(None, gt=0, le=1)
    lora_rank: Int = Field(4, ge=1, le=1024)
    # HiFA's SDS+ (Eq. 4): the image-space term lambda_rgb beta(t)/2 ||x - D(z_hat)||^2 on top of the method's loss (whose
    # latent part, for SDS, is HiFA's latent residual); HiFA: 0.1 with distill.method=sds; 0: off
    rgb_weight: float = Field(0.0, ge=0, le=1e6)
    # HiFA's z_hat (Alg. 1 step 5): 1 the one-step estimate; n > 1 guided DDIM from t past 0 in strides of 1000 // n
    # (floor(t / stride) + 1 prior calls per image) with eta denoise_eta, and the latent term beta(t) ||z - z_hat||^2;
    # HiFA A.1: r = 0.25, i.e. denoise_steps 4, eta 1 (its code's --denoising_steps 4 --eta 1); distill.method=sds only
    denoise_steps: Int = Field(1, ge=1, le=1000)
    denoise_eta: float = Field(1.0, ge=0, le=1)
    # SDS* (distill.method=sds-star, MVDream's x0 reconstruction): the guidance rescale phi of its target,
    # phi (std(x0_c) / std(x0_cfg)) x0_cfg + (1 - phi) x0_cfg per object; MVDream's recon_std_rescale 0.5
    recon_rescale: float = Field(0.5, ge=0, le=1)
    # how t is chosen in [T_min, T_max]: "random" U{T_min..T_max} per image; or HiFA's annealing, one deterministic t
    # per step, t = T_max - (T_max - T_min) f(progress), f = sqrt (HiFA Eq. 5), linear or cosine (its ablation);
    # HiFA keeps the bounds fixed: distill.t_min=[0.02,0.02] distill.t_max=[0.98,0.98]
    t_schedule: Literal[T_SCHEDULES] = "random"
    # the bounds of t as fractions of 1000: [start, end] (linear over the run), or StableDreamer's piecewise-linear
    # annealing as [[progress, fraction], ...] knots (constant before the first and after the last), e.g.
    # t_max=[[0, 0.98], [0.5, 0.6], [1, 0.3]] t_min=[[0, 0.4], [0.5, 0.25], [1, 0.2]]
    t_min: list[StepFraction] | list[list[float]] = Field(
        [0.5, 0.02], json_schema_extra=hint("fractions of the 1000 diffusion steps, e.g. [0.5, 0.02]"))
    t_max: list[StepFraction] | list[list[float]] = Field(
        [0.98, 0.5], json_schema_extra=hint("fractions of the 1000 diffusion steps, e.g. [0.98, 0.5]"))


Knot = list[Annotated[float, Field(ge=0, le=1_000_000)]]  # [progress, weight]
KNOT_HINT = hint("each knot is [progress in [0, 1], weight >= 0]")


class RegularizerConfig(ConfigModel):
    # (progress, weight) knots, see amortized3d/distillation/regularizers.py
    sparsity: list[Knot] = Field([[0.0, 20.0]], json_schema_extra=KNOT_HINT)
    opacity_entropy: list[Knot] = Field([[0.8, 0.0], [1.0, 10.0]], json_schema_extra=KNOT_HINT)
    eikonal: list[Knot] = Field([[0.0, 100.0], [0.1, 1.0]], json_schema_extra=KNOT_HINT)
    # HiFA's z-variance loss (Eq. 8: the depth variance of the rays with opacity > 0.5, averaged over all rays); HiFA's
    # lambda_zvar 3 with its code's ramp min(1, 2 progress): [[0.0, 0.0], [0.5, 3.0]]
    z_variance: list[Knot] = Field([], json_schema_extra=KNOT_HINT)


class OptimConfig(ConfigModel):
    # adam (torch), adamw (torch, its default weight decay 0.01, as threestudio's per-prompt recipes) or adan
    # (pytorch-optimizer's Adan; betas then have three entries)
    name: Literal["adam", "adamw", "adan"] = "adam"
    lr_geometry: float = Field(4e-3, gt=0, le=1)
    lr_background: float = Field(1e-3, gt=0, le=1)
    # the decoding MLPs' own rate (the generator's decoder_parameters; the reference per-prompt recipe: grid 1e-2,
    # MLPs 1e-3); null: they train at lr_geometry
    lr_decoder: float | None = Field(None, gt=0, le=1)
    betas: list[Annotated[float, Field(ge=0, lt=1)]] = [0.0, 0.99]
    eps: float = Field(1e-15, gt=0, lt=1, json_schema_extra=hint("e.g. 1e-15 (Adam's term added to the denominator)"))


Steps = Annotated[Int, Field(ge=1, le=1_000_000_000)]


class SplatsConfig(ConfigModel):
    """3D Gaussians (generator.kind=gaussians): the learning rate of each attribute (3DGS's; the position rate
    StableDreamer's 6.4e-4) and adaptive density control (amortized3d/training/densify.py) on StableDreamer's schedule,
    in optimizer steps."""

    lr_means: float = Field(6.4e-4, gt=0, le=1)
    # the position rate's exponential decay over the run, lr_means (lr_means_final / lr_means)^progress (3DGS: to
    # 0.01 x its start); null: constant
    lr_means_final: float | None = Field(None, gt=0, le=1)
    lr_scales: float = Field(5e-3, gt=0, le=1)
    lr_quats: float = Field(1e-3, gt=0, le=1)
    lr_opacities: float = Field(5e-2, gt=0, le=1)
    lr_sh0: float = Field(2.5e-3, gt=0, le=1)
    lr_shN: float = Field(1.25e-4, gt=0, le=1)  # 3DGS: the color rate / 20
    # generator.color_field: its hash grid's and MLP's rates (the per-prompt Instant-NGP recipe's grid and MLP rates)
    lr_color_grid: float = Field(1e-2, gt=0, le=1)
    lr_color_mlp: float = Field(1e-3, gt=0, le=1)
    densify_from: Int = Field(100, ge=0, le=1_000_000_000)  # densify at steps after this one ...
    densify_every: Steps = 500  # ... that are multiples of this ...
    densify_until: Int = Field(12000, ge=0, le=1_000_000_000)  # ... and before this one (0: never)
    grad_threshold: float = Field(2e-4, gt=0, le=1e6)  # mean screen-space gradient norm (NDC) above which a Gaussian grows
    percent_dense: float = Field(0.01, gt=0, le=1)  # growing Gaussians up to this x scene_extent are cloned, larger ones split
    scene_extent: float = Field(1.0, gt=0, le=1000)
    prune_opacity: float = Field(0.005, ge=0, lt=1)
    prune_scale: float = Field(0.1, gt=0, le=1000)  # after the first opacity reset, Gaussians larger than this x scene_extent go
    reset_opacity_at: list[Annotated[Int, Field(ge=1, le=1_000_000_000)]] = [1000]
    reset_opacity: float = Field(0.005, gt=0, lt=1)
    max_gaussians: Int = Field(1_000_000, ge=1, le=100_000_000)  # densification stops growing the set beyond this


class TrainConfig(ConfigModel):
    steps: Steps = 50000
    prompts_per_step: Int = Field(1, ge=1, le=100000)
    views_per_prompt: Int = Field(1, ge=1, le=64)
    grad_accum: Int = Field(1, ge=1, le=1024)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: Int = Field(0, ge=0, le=2**63 - 1)
    log_every: Steps = 10
    val_every: Steps = 1000
    ckpt_every: Steps = 1000
    # ShapeWorld runs (analytic prior): the oracle evaluation of the test split every eval_every steps, right
    # after that step's checkpoint, into RUN_DIR/evals/step_<step>.json (0: off); a multiple of ckpt_every
    eval_every: Int = Field(0, ge=0, le=1_000_000_000)
    keep_checkpoints: Int = Field(2, ge=1, le=1_000_000)
    max_bad_steps: Steps = 20
    output_dir: str | None = None
    wandb: Literal["auto", "offline", "online", "disabled"] = "auto"
    # audit trail: every rank appends the prompts of each micro-batch, and at the end a digest
    # of its parameters, to RUN_DIR/prompts/rank<r>.jsonl
    record_prompts: bool = False


class EvalConfig(ConfigModel):
    n_views: Int = Field(8, ge=1, le=4096)
    resolution: Int = Field(64, ge=1, le=4096)
    iou_resolution: Int = Field(48, ge=2, le=1024)


class ExperimentConfig(ConfigModel):
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    camera: CameraConfig = Field(default_factory=CameraConfig)
    prior: PriorConfig = Field(default_factory=PriorConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    phase2: Phase2Config = Field(default_factory=Phase2Config)
    regularizers: RegularizerConfig = Field(default_factory=RegularizerConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    splats: SplatsConfig = Field(default_factory=SplatsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def phase2_prior(self) -> PriorConfig:
        """The second phase's prior section: this config's prior with the keys of phase2.prior replaced (validated)."""
        merged = {**self.prior.model_dump(), **self.phase2.prior}
        if "kind" in self.phase2.prior and "model" not in self.phase2.prior:
            merged["model"] = DEFAULT_MODELS.get(merged["kind"], DEFAULT_MODELS["stable_diffusion"])
        return PriorConfig.model_validate(merged)

    def sampling_radius(self) -> float:
        """The radius of the content both the renderer and the generator reach: min(render.scene_radius, generator.bound)
        (the box of baked grids, of eikonal samples and of the IoU grid)."""
        return min(self.render.scene_radius, self.generator.bound)

    @model_validator(mode="after")
    def _resolve_and_check(self) -> ExperimentConfig:
        """Fill the keys whose default depends on others (null: prior.model, generator.spectral_norm), then the rules
        between keys (the fields check their own types, choices and ranges)."""
        if self.prior.model is None:
            self.prior.model = DEFAULT_MODELS.get(self.prior.kind, DEFAULT_MODELS["stable_diffusion"])
        if self.generator.spectral_norm is None:
            self.generator.spectral_norm = self.generator.kind == "hyper_ingp" and self.distill.method == "sds"
        for name in ("elevation_range", "distance_range", "fovy_range"):
            lo_hi = getattr(self.camera, name)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise ConfigError(f"camera.{name}={lo_hi!r} must be [low, high] with low <= high")
        for name in ("t_min", "t_max"):
            bound = getattr(self.distill, name)
            flat = all(isinstance(v, (int, float)) for v in bound)
            knots = [] if flat else bound
            if (flat and len(bound) != 2) or not bound or any(len(k) != 2 or not 0 <= k[0] <= 1 or not 0 < k[1] < 1 for k in knots) or \
                    [k[0] for k in knots] != sorted(k[0] for k in knots):
                raise ConfigError(f"distill.{name}={bound!r} must be [start, end], fractions of 1000 steps in (0, 1), e.g. [0.5, 0.02], "
                                  "or [[progress, fraction], ...] knots with progress in [0, 1] increasing, e.g. [[0, 0.98], [0.5, 0.6], [1, 0.3]]")
        for name in ("sparsity", "opacity_entropy", "eikonal", "z_variance"):
            knots = getattr(self.regularizers, name)
            if any(len(k) == 2 and k[0] > 1 for k in knots):
                raise ConfigError(f"regularizers.{name}={knots!r}: each knot's progress must lie in [0, 1] (the fraction of train.steps)")
            if any(len(k) != 2 for k in knots) or [k[0] for k in knots] != sorted(k[0] for k in knots):
                raise ConfigError(f"regularizers.{name}={knots!r} must be [[progress, weight], ...] with increasing progress")
        if self.render.scene_radius > self.generator.bound * 3**0.5:
            raise ConfigError(
                f"render.scene_radius={self.render.scene_radius} exceeds the generator's box (generator.bound={self.generator.bound}); "
                "lower render.scene_radius or raise generator.bound"
            )
        if (self.prior.view_dependent or self.prior.perp_neg) and self.prior.analytic:
            raise ConfigError(
                "prior.view_dependent and prior.perp_neg change the text of a text-to-image prior; the analytic prior's "
                "conditionals are exact per camera already. Set them to false, or use prior.kind=stable_diffusion or deepfloyd_if"
            )
        if self.prior.kind in MULTIVIEW_PRIORS:
            if METHODS[self.distill.method].learned_branch:
                raise ConfigError(f"distill.method={self.distill.method} trains a learned branch of a single-view prior; the multi-view "
                                  f"prior.kind={self.prior.kind} takes asd, sds, sds-star or csd")
            if self.train.views_per_prompt < 2 or not self.camera.group_views:
                raise ConfigError(f"prior.kind={self.prior.kind} denoises each prompt's views as one object: set train.views_per_prompt "
                                  f"to the views per object (it is {self.train.views_per_prompt}; MVDream: 4) and camera.group_views=true "
                                  "(one orbit per prompt), as configs/dl17k.yaml and configs/shapeworld-multiview.yaml do")
            if self.prior.kind == "mvdream" and self.train.views_per_prompt != 4:
                raise ConfigError(f"train.views_per_prompt={self.train.views_per_prompt}: MVDream was trained on 4 views of an object "
                                  "(90 degrees apart); set train.views_per_prompt=4")
            if self.prior.view_dependent or self.prior.perp_neg:
                raise ConfigError(f"prior.view_dependent and prior.perp_neg add view words to the text; prior.kind={self.prior.kind} "
                                  "takes each view's camera instead. Set them to false")
        if self.train.eval_every % self.train.ckpt_every:
            raise ConfigError(f"train.eval_every={self.train.eval_every} must be 0 (off) or a multiple of "
                              f"train.ckpt_every={self.train.ckpt_every}: it evaluates the checkpoint written at that step")
        try:
            check_denoise_steps(self.distill.method, self.distill.denoise_steps)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if self.train.eval_every and not self.prior.analytic:
            raise ConfigError("train.eval_every runs the ShapeWorld oracle, which needs the analytic prior's ShapeWorld corpora; "
                              "evaluate other runs' checkpoints with `amortized3d evaluate --checkpoint RUN_DIR --clip MODEL`")
        from amortized3d.distillation.regularizers import scheduled_weight
        from amortized3d.distillation.score_distillation import bound_knots

        lows, highs = bound_knots(self.distill.t_min), bound_knots(self.distill.t_max)
        if any(scheduled_weight(lows, at) > scheduled_weight(highs, at) for at, _ in lows + highs):  # both piecewise linear
            raise ConfigError(f"distill.t_min={self.distill.t_min!r} and distill.t_max={self.distill.t_max!r}: at the start and at the end "
                              "of training (and at every knot) T_min must not exceed T_max; e.g. distill.t_min=[0.5,0.02] distill.t_max=[0.98,0.5]")
        if self.generator.spectral_norm and self.generator.kind != "hyper_ingp":
            raise ConfigError(f"generator.spectral_norm=true applies to the Hyper-iNGP hypernetwork, not "
                              f"generator.kind={self.generator.kind!r}; set generator.spectral_norm=false (or null)")
        if self.generator.sphere_radius >= self.generator.bound:
            raise ConfigError(f"generator.sphere_radius={self.generator.sphere_radius} must be smaller than "
                              f"generator.bound={self.generator.bound}: the initial sphere must fit in the generator's box")
        if self.phase2.start > 0:
            if not self.phase2.prior:
                raise ConfigError(f"phase2.start={self.phase2.start} switches to a second prior, but phase2.prior names none; give the "
                                  "prior keys that change, e.g. phase2.prior={kind: stable_diffusion} (or phase2.start=0 for one phase)")
            try:
                second = self.phase2_prior()
            except ValidationError as err:
                error = err.errors()[0]
                where = ".".join(str(part) for part in error["loc"])
                raise ConfigError(f"phase2.prior={self.phase2.prior!r}: {where}: {error['msg']}; give keys and values of the prior "
                                  "section, e.g. {kind: stable_diffusion, model: stabilityai/stable-diffusion-2-1-base}") from None
            if METHODS[self.distill.method].learned_branch:
                raise ConfigError(f"distill.method={self.distill.method} trains a learned branch of one prior; two-phase training "
                                  "(phase2.start > 0) takes asd, sds or csd")
            if self.text.encoder == "prior":
                raise ConfigError("two-phase training switches priors, so the text embedding cannot be the first prior's own "
                                  "(text.encoder=prior); set text.encoder=hashed (a per-prompt field does not read it)")
            if second.analytic and second.latent and any(
                    size % 2 for size in (self.render.height, self.render.width, *(int(k[1]) for k in self.render.size_schedule))):
                raise ConfigError("phase2.prior's latent analytic prior encodes 2 x 2 pixel blocks: render sizes must be even")
        if self.prior.analytic and self.prior.latent:
            if METHODS[self.distill.method].learned_branch:
                raise ConfigError(f"distill.method={self.distill.method} trains a learned branch of the pixel-space analytic prior; "
                                  "with prior.latent=true use asd, sds or csd (or set prior.latent=false)")
            sizes = [self.render.height, self.render.width, self.eval.resolution, *(int(k[1]) for k in self.render.size_schedule)]
            if any(size % 2 for size in sizes):
                raise ConfigError(f"prior.latent=true encodes 2 x 2 pixel blocks, so render.height, render.width, eval.resolution and "
                                  f"render.size_schedule's sizes must be even (they are {sizes})")
        if self.render.latents:
            self._check_latent_rendering()
        kernel = self.render.importance_kernel
        if kernel and (len(kernel) % 2 == 0 or sum(kernel) <= 0):
            raise ConfigError(f"render.importance_kernel={kernel!r} must hold an odd number of weights >= 0, not all 0 (centered on the "
                              "bin), e.g. [1, 1, 1] (HiFA); or [] for no smoothing")
        schedule = self.render.size_schedule
        if any(len(k) != 2 or not 0 <= k[0] <= 1 or k[1] < 1 or k[1] != int(k[1]) for k in schedule) or \
                [k[0] for k in schedule] != sorted(k[0] for k in schedule):
            raise ConfigError(f"render.size_schedule={schedule!r} must be [[progress, size], ...] with progress in [0, 1] increasing "
                              "and sizes whole pixels >= 1, e.g. [[0.4, 256]]; or [] for render.height x render.width throughout")
        from amortized3d.data.corpora import single_prompt

        if self.generator.kind == "ngp" and self.generator.geometry == "density" and any(w > 0 for _, w in self.regularizers.eikonal):
            raise ConfigError(f"generator.geometry=density: a density field has no distance for the eikonal term, but "
                              f"regularizers.eikonal={self.regularizers.eikonal!r}; set regularizers.eikonal=[]")
        if self.generator.geometry != "sdf" and self.generator.kind != "ngp":
            raise ConfigError(f"generator.geometry={self.generator.geometry} is an option of the per-prompt field (generator.kind=ngp); "
                              f"generator.kind={self.generator.kind} makes signed-distance fields: set generator.geometry=sdf")
        if self.generator.kind in PER_PROMPT and single_prompt(self.corpus.name) is None:
            raise ConfigError(f"generator.kind={self.generator.kind} is the asset of one prompt, but corpus {self.corpus.name!r} is not one "
                              "prompt; train it with `amortized3d train --prompt TEXT` (corpus prompt:TEXT), or pick a generator of many "
                              "prompts (generator.kind=hyper_ingp, conv3d or triplane)")
        if self.generator.kind == "gaussians" and any(w > 0 for _, w in self.regularizers.eikonal):
            raise ConfigError(f"generator.kind=gaussians: 3D Gaussians have no distance for the eikonal term, but "
                              f"regularizers.eikonal={self.regularizers.eikonal!r}; set regularizers.eikonal=[]")
        n_betas = 3 if self.optim.name == "adan" else 2
        if len(self.optim.betas) != n_betas:
            raise ConfigError(f"optim.betas={self.optim.betas!r}: {self.optim.name} takes {n_betas} betas in [0, 1), e.g. "
                              + ("[0.98, 0.92, 0.99]" if n_betas == 3 else "[0.9, 0.99]"))
        return self

    def _check_latent_rendering(self) -> None:
        """The rules of render.latents=true (RenderConfig): a prior with latents, a field generator, no RGB-only options."""
        latent_prior = self.prior.kind in ("stable_diffusion", "mvdream") or (self.prior.analytic and self.prior.latent)
        if not latent_prior:
            raise ConfigError(f"render.latents=true renders the prior's latents, but prior.kind={self.prior.kind}"
                              f"{' (prior.latent=false)' if self.prior.analytic else ''} denoises pixels: use prior.kind=stable_diffusion "
                              "or mvdream, or the analytic prior with prior.latent=true (or set render.latents=false)")
        if self.generator.kind == "gaussians":
            raise ConfigError("render.latents=true needs a field generator (generator.kind=hyper_ingp, conv3d, triplane or ngp): "
                              "3D Gaussians render RGB colors; set render.latents=false")
        if self.render.random_background_prob > 0:
            raise ConfigError(f"render.random_background_prob={self.render.random_background_prob} draws random RGB background colors, "
                              "but with render.latents=true the renders are latents (the learned background is one too): set "
                              "render.random_background_prob=0")
        if self.distill.rgb_weight > 0:
            raise ConfigError(f"distill.rgb_weight={self.distill.rgb_weight} (HiFA's image term) compares RGB renders with the decoded "
                              "estimate, but with render.latents=true the renders are latents: set distill.rgb_weight=0")
        if self.phase2.start > 0:
            raise ConfigError(f"phase2.start={self.phase2.start} switches priors mid-run, but a render.latents=true field renders the "
                              "first prior's latents: set phase2.start=0 (or render.latents=false)")
        if self.render.size_schedule and not self.prior.analytic:
            raise ConfigError(f"render.size_schedule={self.render.size_schedule!r} changes the render size, but with render.latents=true "
                              f"and prior.kind={self.prior.kind} the field renders the prior's latents at their one size "
                              "(prior.resolution / 8): set render.size_schedule=[]")


SECTIONS: dict[str, type[ConfigModel]] = {name: field.annotation for name, field in ExperimentConfig.model_fields.items()}


def _constraints(annotation) -> list:
    """The annotated_types constraints (Ge, Gt, Le, Lt, ...) inside a type: on its elements for lists, on the value for
    optionals."""
    found = []
    if typing.get_origin(annotation) is Annotated:
        annotation, *metadata = typing.get_args(annotation)
        for item in metadata:
            found += item.metadata if isinstance(item, FieldInfo) else [item]
    for arg in typing.get_args(annotation):
        found += _constraints(arg)
    return found


def _number(value) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def field_interval(field: FieldInfo) -> str | None:
    """The range of a number field (of each number, for lists) in interval notation: "[a, b]" closed, "(a, b)" open;
    None for a field without bounds."""
    bounds = {}
    for constraint in [*field.metadata, *_constraints(field.annotation)]:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(constraint, name, None) is not None:
                bounds[name] = getattr(constraint, name)
    if not bounds:
        return None
    low = f"[{_number(bounds['ge'])}" if "ge" in bounds else f"({_number(bounds['gt'])}"
    high = f"{_number(bounds['le'])}]" if "le" in bounds else f"{_number(bounds['lt'])})"
    return f"{low}, {high}"


# The range of every number in the config, read from the fields: {(section, key): "[a, b]"}.
RANGES = {(section, key): interval for section, model in SECTIONS.items() for key, field in model.model_fields.items()
          if (interval := field_interval(field)) is not None}


def _suggest(name: str, allowed: list[str]) -> str:
    close = difflib.get_close_matches(name, allowed, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _value(value) -> str:
    """A value as a message shows it: its repr, cut like ``shown``."""
    return shown(value) if isinstance(value, str) else (text if len(text := repr(value)) <= 200 else text[:200] + "...")


RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}
TYPE_NAMES = {  # pydantic error type -> what the value must be, and an example value
    "int_type": ("an integer", "1000"), "int_from_float": ("an integer", "1000"), "float_type": ("a number", "1e-3"),
    "bool_type": ("true or false", "true"), "string_type": ("a string", '"text"'), "list_type": ("a list", "[1.0,2.0]"),
}


def _explain(error: dict, merged: dict, sources: dict) -> str:
    """One pydantic error of validating ``merged`` -> one line naming the source, the key, the value, what is allowed
    and the fix. ``sources``: the layer that set each (section,) and (section, key)."""
    loc, kind = error["loc"], error["type"]
    if not loc:  # a rule between keys (ExperimentConfig._resolve_and_check): its own message
        return str(error["ctx"]["error"])
    section = loc[0]
    where = f"{sources[(section,)]}: " if (section,) in sources else ""
    if len(loc) == 1:
        if kind == "extra_forbidden":
            return (f"{where}unknown config section {section!r}; allowed sections: {', '.join(SECTIONS)}."
                    + _suggest(str(section), list(SECTIONS)))
        return f"{where}section {section!r} must be a mapping of keys to values"
    key, model = loc[1], SECTIONS[section]
    where = f"{sources[(section, key)]}: " if (section, key) in sources else where
    name = f"{section}.{key}"
    if kind == "extra_forbidden":
        keys = list(model.model_fields)
        return f"{where}unknown key {name}; allowed keys in {section}: {', '.join(keys)}.{_suggest(str(key), keys)}"
    field = model.model_fields[key]
    value = merged[section][key]
    if kind == "value_error":  # a field's own validator (e.g. a planned prior kind)
        return where + str(error["ctx"]["error"])
    if kind == "literal_error":
        return f"{where}{name}={_value(value)} is not allowed; choose one of: {', '.join(typing.get_args(field.annotation))}"
    if kind in RANGE_ERRORS:
        what = "each value" if isinstance(value, list) else "the value"
        extra = (field.json_schema_extra or {}).get("hint")
        return (f"{where}{name}={_value(value)}: {what} must be a finite number in {field_interval(field)}"
                f"{f' ({extra})' if extra else ''}; set {name} to such a value")
    path = name + "".join(f"[{i}]" for i in loc[2:] if isinstance(i, int))  # (a union's branch names are left out)
    if kind in TYPE_NAMES:
        must, example = TYPE_NAMES[kind]
        return f"{where}{path}={_value(error['input'])} must be {must}, e.g. {path}={example}"
    return f"{where}{path}={_value(error['input'])}: {error['msg']}; set {name} to an allowed value"


def merge_layers(layers: list[tuple[str, object]]) -> tuple[dict, dict]:
    """[(source, {section: {key: value}}), ...] -> (merged, sources): the layers merged key by key, later ones winning,
    and the source that set each (section, key) (and that first named each (section,)). Values are not merged
    further: a list or mapping given for a key replaces the one before."""
    merged: dict = {}
    sources: dict = {}
    for source, mapping in layers:
        if not isinstance(mapping, dict):
            raise ConfigError(f"{source}: expected a mapping of sections, got {type(mapping).__name__}")
        for section, values in mapping.items():
            sources.setdefault((section,), source)
            if section not in SECTIONS:  # left for validation, which names the allowed sections
                merged[section] = values
                continue
            if values is None:  # an empty section
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section {section!r} must be a mapping of keys to values")
            for key, value in values.items():
                merged.setdefault(section, {})[key] = value
                sources[(section, key)] = source
    return merged, sources


def validated(merged: dict, sources: dict, rules_source: str | None = None) -> ExperimentConfig:
    """The ExperimentConfig of merge_layers' result; ConfigError with _explain's line for the first error, the broken
    rules between keys prefixed with ``rules_source`` when given."""
    try:
        return ExperimentConfig.model_validate(merged)
    except ValidationError as err:
        error = err.errors()[0]
        prefix = f"{rules_source}: " if rules_source and not error["loc"] else ""
        raise ConfigError(prefix + _explain(error, merged, sources)) from None


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


def load_config(corpus: str | None = None, config_file: str | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Defaults <- corpus recipe <- config file <- overrides, merged, then validated.

    A corpus without a recipe of its own can be trained with an explicit config file
    (e.g. --corpus df415 --config configs/mg15.yaml), which then replaces the recipe; so does a config file given for
    a per-prompt corpus ("prompt:TEXT", whose own recipe is the CPU one, configs/prompt-shapeworld.yaml).
    """
    merged, sources = merged_layers(corpus, config_file, overrides)
    return validated(merged, sources)


def merged_layers(corpus: str | None, config_file: str | None, overrides: list[str] = ()) -> tuple[dict, dict]:
    """load_config's layers merged, before validation: (merged dict, the source of every key)."""
    from amortized3d.data.corpora import CorpusError, recipe_for_corpus, single_prompt

    user = load_yaml(config_file) if config_file else {}
    override_maps = [parse_override(o) for o in overrides]
    name = corpus
    if name is None:
        for m in [user, *override_maps]:
            section = m.get("corpus")
            name = section.get("name", name) if isinstance(section, dict) else name
    name = name or CorpusConfig().name
    layers = []
    try:
        if not (config_file and single_prompt(name) is not None):
            layers.append((f"recipe for {name}", load_yaml(recipe_path(recipe_for_corpus(name)))))
    except CorpusError as err:
        if not (config_file and "has no training recipe" in str(err)):
            raise
    if config_file:
        layers.append((str(config_file), user))
    layers += [(f"override {shown(text)}", m) for text, m in zip(overrides, override_maps)]
    merged, sources = merge_layers(layers)
    merged.setdefault("corpus", {})["name"] = name
    return merged, sources


def config_to_dict(cfg: ExperimentConfig) -> dict:
    return cfg.model_dump()


def config_from_dict(data: dict, source: str = "saved config") -> ExperimentConfig:
    """A config from its saved form (config_to_dict, a run's config.yaml), validated; errors name ``source``."""
    merged, sources = merge_layers([(source, data)])
    return validated(merged, sources, rules_source=source)


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
