"""The training loop, top to bottom: data, forward, loss, backward, step, log, checkpoint.

    prompts -> text embedding -> generator -> field -> render -> prior -> distillation loss -> optimizer step

Prompts and their text embeddings stream from the corpus's embedding store (built by all
ranks on first use; amortized3d/data/embedding_store.py), in batches whose order is a pure
function of (seed, epoch, world size, micro-batch) (amortized3d/data/loader.py): within an
epoch the ranks see disjoint prompts and every rank runs the same number of steps.
Randomness is stateless too: every micro-batch draws from a generator seeded by
(seed, rank, step, micro-batch). So a run resumed from a checkpoint (model + optimizer +
step) continues exactly as the uninterrupted run would, mid-epoch included.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm import tqdm

from amortized3d.builders import adapter_lr, build_adapter, optimizer_learning_rates, build_generator, build_optimizer, build_prior, build_text_encoder, prepare_store
from amortized3d.config import ExperimentConfig, config_to_dict, save_config
from amortized3d.data.corpora import load_corpus
from amortized3d.data.loader import PromptBatch, batch_loader, check_corpus_fits_a_step
from amortized3d.shapeworld import PromptError, parse_prompt
from amortized3d.distillation.regularizers import eikonal_loss, opacity_entropy_loss, scheduled_weight, sparsity_loss
from amortized3d.distillation.score_distillation import DEFAULT_GUIDANCE, score_distillation, timestep_range
from amortized3d.fields import Field, finite_difference_gradient
from amortized3d.rendering.cameras import orbit_cameras, sample_training_cameras
from amortized3d.rendering.volume import rays_per_chunk, render_images
from amortized3d.seeding import derived_seed
from amortized3d.text.hashed_encoder import TextEmbedding
from amortized3d.files import write_text_atomic
from amortized3d.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with non-finite loss or gradients."""


def check_shapeworld_prompts(prompts: list[str], corpus_name: str) -> None:
    """The analytic prior knows ShapeWorld scenes only; fail early, naming the first prompt it cannot parse."""
    for i, prompt in enumerate(prompts):
        try:
            parse_prompt(prompt)
        except PromptError as err:
            raise PromptError(
                f"corpus {corpus_name!r}, train prompt {i}: the analytic prior understands ShapeWorld prompts only. {err}"
            ) from None


class SolidBackground:
    """A field whose background is a solid color for the prompts in ``mask``.

    field: Field for P prompts; colors [P, 3]; mask bool [P].
    """

    def __init__(self, field: Field, colors: torch.Tensor, mask: torch.Tensor):
        self.field, self.colors, self.mask = field, colors, mask

    def sdf(self, points):
        return self.field.sdf(points)

    def sdf_and_color(self, points):
        return self.field.sdf_and_color(points)

    def background(self, directions):
        learned = self.field.background(directions)
        solid = self.colors.unsqueeze(1).expand_as(learned).to(learned.dtype)
        return torch.where(self.mask.reshape(-1, 1, 1), solid, learned)


@dataclass
class StepResult:
    loss: torch.Tensor
    metrics: dict[str, float]


def use_stored_text(cfg: ExperimentConfig, prior, batch: PromptBatch) -> None:
    """Hand the batch's stored encodings to a diffusers prior's text encoder, so that it does not encode them again."""
    encoder = getattr(prior, "text_encoder", None)
    if encoder is None:  # the analytic prior reads the prompt text
        return
    texts, parts = [], []
    if batch.prior_text is not None:
        texts, parts = texts + batch.prior_texts, parts + [batch.prior_text]
    if cfg.text.encoder == "prior":  # the generator's embedding is the prior's own encoding of the plain prompt
        texts, parts = texts + batch.prompts, parts + [batch.text]
    encoder.use_stored(texts, TextEmbedding(*(torch.cat([getattr(p, k) for p in parts]) for k in ("tokens", "pooled", "mask"))) if parts else None)


def distillation_step(cfg: ExperimentConfig, generator, prior, batch: PromptBatch, progress: float, rng: torch.Generator, device, adapter=None) -> StepResult:
    """Forward pass and total loss for one micro-batch of P prompts x V views.

    With a learned branch (VSD, LODS) the total also holds its alignment loss on the detached
    renders; it reaches only the adapter's parameters, the distillation loss only the generator's.
    """
    prompts = batch.prompts
    P, V = len(prompts), cfg.train.views_per_prompt
    H, W = cfg.render.height, cfg.render.width
    use_stored_text(cfg, prior, batch)
    text = batch.text.to(device)
    cameras = sample_training_cameras(
        P, V, cfg.camera.elevation_range, cfg.camera.distance_range, cfg.camera.fovy_range, rng, device
    )
    z_dim = getattr(generator, "z_dim", None) or getattr(getattr(generator, "module", None), "z_dim", None)
    z = torch.randn(P, z_dim, generator=rng).to(device) if z_dim else None  # conv3d: a fresh latent per prompt and step
    field = generator(text.pooled, text.tokens, z=z)
    if cfg.render.random_background_prob > 0:
        mask = torch.rand(P, generator=rng) < cfg.render.random_background_prob
        field = SolidBackground(field, torch.rand(P, 3, generator=rng).to(device), mask.to(device))
    render = render_images(
        field, cameras, H, W,
        scene_radius=cfg.render.scene_radius,
        n_proposal=cfg.render.n_proposal,
        n_importance=cfg.render.n_importance,
        inv_std=cfg.render.inv_std,
        generator=rng,
    )
    images = prior.encode(render.rgb.reshape(P * V, 3, H, W), generator=rng)
    flat_prompts = [p for p in prompts for _ in range(V)]
    guidance = cfg.distill.guidance_scale if cfg.distill.guidance_scale is not None else DEFAULT_GUIDANCE[cfg.distill.method]
    t_range = timestep_range(progress, tuple(cfg.distill.t_min), tuple(cfg.distill.t_max))
    flat_cameras = cameras.reshape(P * V)
    out = score_distillation(
        prior, images, flat_prompts, flat_cameras,
        method=cfg.distill.method, guidance_scale=guidance, t_range=t_range, eta=cfg.distill.eta, generator=rng, adapter=adapter,
        asd_shift=cfg.distill.asd_shift,
    )
    loss_sd = out.loss.mean()
    total = loss_sd
    metrics = {"loss_sd": loss_sd.item(), "t_min": t_range[0], "t_max": t_range[1], "grad_sd_norm": out.grad.flatten(1).norm(dim=1).mean().item()}
    if adapter is not None:
        alignment = adapter.alignment_loss(images, flat_prompts, flat_cameras, rng)
        total = total + alignment
        metrics["adapter_loss"] = alignment.item()
    opacity = render.opacity
    w = scheduled_weight(cfg.regularizers.sparsity, progress)
    if w > 0:
        reg = sparsity_loss(opacity)
        total = total + w * reg
        metrics["sparsity"] = reg.item()
    w = scheduled_weight(cfg.regularizers.opacity_entropy, progress)
    if w > 0:
        reg = opacity_entropy_loss(opacity)
        total = total + w * reg
        metrics["opacity_entropy"] = reg.item()
    w = scheduled_weight(cfg.regularizers.eikonal, progress)
    if w > 0 and cfg.render.eikonal_points > 0:
        n = max(1, cfg.render.eikonal_points // P)
        r = min(cfg.render.scene_radius, cfg.generator.bound)
        points = (torch.rand(P, n, 3, generator=rng) * 2 - 1).to(device) * r
        sdf = field.sdf(points)
        reg = eikonal_loss(finite_difference_gradient(field, points, sdf))
        total = total + w * reg
        metrics["eikonal"] = reg.item()
    metrics["opacity"] = opacity.mean().item()
    return StepResult(total, metrics)


def _wandb_run(cfg: ExperimentConfig, run_dir: Path):
    mode = cfg.train.wandb
    if mode == "disabled":
        return None
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    if mode == "disabled":
        return None
    import wandb

    return wandb.init(project="amortized3d", dir=str(run_dir), mode=mode, config=config_to_dict(cfg), name=run_dir.name)


def reset_peak_memory(device: torch.device) -> None:
    """Start peak_memory_mb's count afresh, so that a process that trains more than once (`amortized3d bench`)
    reports each run's own peak."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the resident high-water mark, VmHWM
    except OSError:
        pass  # elsewhere the count runs from the process start


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory on CUDA, else the process's peak resident memory, in MiB, since reset_peak_memory.

    On Linux this is VmHWM: ru_maxrss never drops below the memory of the process that started this one.
    """
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def render_validation(cfg: ExperimentConfig, generator, text_encoder, prompts: list[str], device, n_views: int = 4,
                      resolution: int | None = None, elevation: float | None = None):
    """Orbit renders of ``prompts`` at the evaluation camera (elevation: cfg.camera.eval_elevation unless given).
    -> rgb [P, n_views, 3, R, R] in [0, 1]."""
    R = resolution or cfg.eval.resolution
    elevation = cfg.camera.eval_elevation if elevation is None else elevation
    text = text_encoder.encode(prompts).to(device)
    field = generator(text.pooled, text.tokens)
    cams = orbit_cameras(n_views, elevation, cfg.camera.eval_distance, cfg.camera.eval_fovy, device)
    cams = cams.reshape(1, n_views)[[0] * len(prompts)]
    out = render_images(
        field, cams, R, R, scene_radius=cfg.render.scene_radius, n_proposal=cfg.render.n_proposal,
        n_importance=cfg.render.n_importance, inv_std=cfg.render.inv_std,
        chunk_rays=rays_per_chunk(cfg.render.n_proposal, cfg.render.n_importance),
    )
    return out.rgb.clamp(0, 1)


def write_validation(cfg, generator, text_encoder, prompts, run_dir: Path, step: int, device) -> None:
    from amortized3d.inference.export import contact_sheet, to_uint8, write_video

    folder = run_dir / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    grid = render_validation(cfg, generator, text_encoder, prompts, device, n_views=4)
    contact_sheet(to_uint8(grid.reshape(-1, *grid.shape[2:])), folder / f"step_{step:08d}.png", ncols=4)
    turn = render_validation(cfg, generator, text_encoder, prompts[:1], device, n_views=24)
    write_video(to_uint8(turn[0]), folder / f"step_{step:08d}.mp4", fps=12)


def keep_log_rows(path: Path, keep) -> None:
    """Rewrite the JSON-lines file ``path`` (atomically) with only the rows for which ``keep(row)`` holds; lines that are
    not JSON objects (a line cut short when a run was killed) go too. A missing file stays missing."""
    if not path.is_file():
        return
    kept, changed = [], False
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            ok = isinstance(row, dict) and keep(row)
        except (ValueError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        changed = changed or not ok
    if changed:
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def all_finite(tensors) -> bool:
    """Whether every value of every tensor in the list is finite (one norm per tensor, one check)."""
    tensors = [t.detach() for t in tensors]
    return not tensors or bool(torch.isfinite(torch.stack(torch._foreach_norm(tensors))).all())


def all_ranks_agree(accelerator, ok: bool) -> bool:
    """True when ``ok`` holds on every rank (one all-reduce); every rank must call it at the same point."""
    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() == 0


def guarded_optimizer_step(accelerator, generator, optimizer, adapter, adapter_optimizer, losses_finite: bool) -> str:
    """One optimizer step of the generator (and of the learned branch of VSD / LODS), unless something is not finite.

    losses_finite: whether every rank's losses of this step were finite (agreed before the backward pass, which
    the trainer skips on all ranks when they were not). -> "stepped"; "bad" (skipped: a non-finite loss or, without a
    gradient scaler, gradient); or "overflow" (skipped by fp16's gradient scaler, accelerator.scaler, at a scale
    above 1). Both optimizers step or neither does.
    Without a scaler every rank checks its gradients (under DeepSpeed, which keeps them itself, only the losses are
    checked here) and all skip together. With the scaler, optimizer.step() runs once the losses are finite: the scaler
    skips a step whose gradients overflowed and halves its scale, which is how it finds its range; an overflow at a
    scale <= 1 means the gradients are not finite even unscaled ("bad"). The learned branch is not wrapped for data
    parallelism: its gradients are averaged over ranks here, and unscaled through the same scaler, whose scale an
    overflow there lowers too.
    """
    adapter_params = [] if adapter is None else [p for p in adapter.parameters() if p.grad is not None]
    if adapter_params and accelerator.num_processes > 1:
        for p in adapter_params:
            p.grad = accelerator.reduce(p.grad, reduction="mean")

    def skip(outcome: str) -> str:
        optimizer.zero_grad(set_to_none=True)
        if adapter_optimizer is not None:
            adapter_optimizer.zero_grad(set_to_none=True)
        return outcome

    if not losses_finite:
        return skip("bad")
    scaler = accelerator.scaler
    if scaler is None:
        grads = [p.grad for p in generator.parameters() if p.grad is not None] + [p.grad for p in adapter_params]
        if not all_ranks_agree(accelerator, all_finite(grads)):
            return skip("bad")
        optimizer.step()
        if adapter_optimizer is not None:
            adapter_optimizer.step()
        return skip("stepped")
    scale = scaler.get_scale()
    if adapter_params:
        scaler.unscale_(adapter_optimizer)  # the same on every rank (averaged above)
        if not all_finite([p.grad for p in adapter_params]):
            scaler.update(scale * scaler.get_backoff_factor())  # what the scaler does for an overflow
            return skip("overflow" if scale > 1.0 else "bad")
    optimizer.step()  # scaler.step + scaler.update: skipped, and the scale halved, when the gradients overflowed
    if accelerator.optimizer_step_was_skipped:
        return skip("overflow" if scale > 1.0 else "bad")
    if adapter_optimizer is not None:
        adapter_optimizer.step()  # its gradients were unscaled above
    return skip("stepped")


def diverged(run_dir: Path, what: str, fix: str) -> TrainingDiverged:
    """The error that stops a diverging run: what happened, the last good checkpoint, and how to continue."""
    last = latest_checkpoint(run_dir)
    return TrainingDiverged(f"{what}; training stopped. The last good checkpoint is "
                            f"{str(last) if last else 'none (no checkpoint was written yet)'}. {fix}, and continue from it with --resume "
                            "(a resumed run takes the config's learning rates).")


def train(cfg: ExperimentConfig, run_dir: str | Path, resume: bool = False, max_steps: int | None = None) -> Path:
    """Train a generator on cfg.corpus; writes config, metrics, checkpoints and validation renders to run_dir.

    ``max_steps`` stops early after that many optimizer steps (the schedule still
    spans cfg.train.steps), which is how an interrupted run is simulated in tests.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"the run folder {str(run_dir)!r} is a file; pass a folder with --output (it is created if missing)")
    if resume and latest_checkpoint(run_dir) is None:
        raise CheckpointError(f"--resume: {str(run_dir)!r} has no checkpoint to continue from (no checkpoints/step_* folder); "
                              "train it without --resume, or pass the run folder that holds the checkpoints")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise CheckpointError(f"{str(run_dir)!r} already holds a run with checkpoints; continue it with --resume, or train into a new "
                              "--output folder (nothing was changed)")
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum, mixed_precision=cfg.train.mixed_precision)
    device = accelerator.device
    if cfg.train.mixed_precision == "fp16" and device.type == "cpu" and accelerator.is_main_process:
        print(f"warning: train.mixed_precision=fp16 has no effect on {device.type} (Accelerate runs fp16 autocast with its gradient "
              "scaler on GPUs only); this run trains in float32. Use bf16 for mixed precision here.", file=sys.stderr, flush=True)
    reset_peak_memory(device)
    rank, world = accelerator.process_index, accelerator.num_processes
    if device.type == "cpu" and world == 1:
        # `accelerate launch` without a config sets OMP_NUM_THREADS=1; a lone CPU process should use every core.
        torch.set_num_threads(max(torch.get_num_threads(), len(os.sched_getaffinity(0))))
    corpus = load_corpus(cfg.corpus.name, cfg.corpus.dir)
    train_prompts = corpus.train
    if cfg.prior.kind == "analytic":
        check_shapeworld_prompts(train_prompts, cfg.corpus.name)
    check_corpus_fits_a_step(len(train_prompts), cfg.train.prompts_per_step, world)
    val_prompts = (corpus.val or corpus.train)[:4]
    torch.manual_seed(derived_seed(cfg.train.seed, rank, -1))

    text_encoder = build_text_encoder(cfg, device)
    cfg.text.dim = text_encoder.dim  # the prior's CLIP width when text.encoder=prior; recorded in config.yaml
    generator = build_generator(cfg).to(device)
    prior = build_prior(cfg, text_encoder, device)
    store = prepare_store(cfg, train_prompts, text_encoder, getattr(prior, "text_encoder", None), rank=rank, world=world,
                          barrier=accelerator.wait_for_everyone, progress=accelerator.is_local_main_process)
    del corpus, train_prompts  # from here on, prompts come from the store's shards
    adapter, adapter_optimizer = build_adapter(cfg, prior)
    optimizer = build_optimizer(cfg, generator)
    start_step, bad_total = 0, 0
    if resume:
        folder = latest_checkpoint(run_dir)
        state = load_checkpoint(folder, generator, optimizer, adapter, adapter_optimizer)
        before = (state.get("world_size", world), state.get("prompts_per_step", cfg.train.prompts_per_step))
        if before != (world, cfg.train.prompts_per_step) and accelerator.is_main_process:
            print(f"warning: the run was checkpointed with {before[0]} processes x train.prompts_per_step={before[1]}, and resumes with "
                  f"{world} x {cfg.train.prompts_per_step}: from here the prompt order differs from the original run's "
                  "(within the current epoch some prompts may repeat or be left out)", file=sys.stderr, flush=True)
        start_step, bad_total = state["step"], state.get("skipped_steps", 0)
        # The config's learning rates, not the checkpoint's: lowering optim.lr_* is how a diverged run is continued.
        groups = list(zip(optimizer.param_groups, optimizer_learning_rates(cfg)))
        if adapter_optimizer is not None:
            groups += [(group, adapter_lr(cfg)) for group in adapter_optimizer.param_groups]
        changed = [(group["lr"], lr) for group, lr in groups if group["lr"] != lr]
        if changed and accelerator.is_main_process:
            print("note: resuming with the config's learning rates " + ", ".join(f"{new:g} (checkpoint: {old:g})" for old, new in changed),
                  file=sys.stderr, flush=True)
        for group, lr in groups:
            group["lr"] = lr
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        # rows past the checkpoint were logged by the interrupted run, which this one repeats
        keep_log_rows(run_dir / "metrics.jsonl", lambda row: row.get("step", 0) <= start_step)
    generator, optimizer = accelerator.prepare(generator, optimizer)
    model = accelerator.unwrap_model(generator)
    if resume and accelerator.scaler is not None and "grad_scaler" in state:
        accelerator.scaler.load_state_dict(state["grad_scaler"])

    wandb_run = _wandb_run(cfg, run_dir) if accelerator.is_main_process else None
    metrics_file = open(run_dir / "metrics.jsonl", "a") if accelerator.is_main_process else None
    total_steps = cfg.train.steps
    end_step = total_steps if max_steps is None else min(total_steps, start_step + max_steps)
    bar = tqdm(range(start_step, end_step), initial=start_step, total=total_steps, disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    consecutive_bad, last_time = 0, time.perf_counter()
    prompt_record = None
    if cfg.train.record_prompts:
        (run_dir / "prompts").mkdir(parents=True, exist_ok=True)
        keep_log_rows(run_dir / "prompts" / f"rank{rank}.jsonl", lambda row: row.get("step", start_step) < start_step)
        prompt_record = open(run_dir / "prompts" / f"rank{rank}.jsonl", "a")
    samples_per_step = cfg.train.prompts_per_step * cfg.train.views_per_prompt * cfg.train.grad_accum * world
    loader = batch_loader(store, cfg.train.prompts_per_step, rank=rank, world=world, seed=cfg.train.seed,
                          start=start_step * cfg.train.grad_accum, stop=end_step * cfg.train.grad_accum,
                          num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    batches_per_epoch = loader.dataset.plan.batches_per_epoch
    batches = iter(loader)
    step = start_step
    try:
        for step in bar:
            progress = step / max(total_steps - 1, 1)
            step_metrics: dict[str, float] = {"epoch": step * cfg.train.grad_accum / batches_per_epoch}
            losses_finite = True
            for micro in range(cfg.train.grad_accum):
                rng = torch.Generator().manual_seed(derived_seed(cfg.train.seed, rank, step, micro))
                batch = next(batches)
                if prompt_record is not None:
                    prompt_record.write(json.dumps({"step": step, "micro": micro, "prompts": batch.prompts}) + "\n")
                with accelerator.accumulate(generator):
                    with accelerator.autocast():
                        result = distillation_step(cfg, generator, prior, batch, progress, rng, device, adapter)
                    # all ranks back-propagate, or none (their gradient all-reduce must not wait for a rank that skipped)
                    finite = all_ranks_agree(accelerator, bool(torch.isfinite(result.loss)))
                    losses_finite = losses_finite and finite
                    if finite:
                        accelerator.backward(result.loss)
                    for k, v in result.metrics.items():
                        step_metrics[k] = step_metrics.get(k, 0.0) + v / cfg.train.grad_accum
                    step_metrics["loss"] = step_metrics.get("loss", 0.0) + result.loss.item() / cfg.train.grad_accum
            outcome = guarded_optimizer_step(accelerator, generator, optimizer, adapter, adapter_optimizer, losses_finite)
            if accelerator.scaler is not None:
                step_metrics["grad_scale"] = accelerator.scaler.get_scale()
            if outcome == "stepped":
                consecutive_bad = 0
            else:
                bad_total += 1
                consecutive_bad += outcome == "bad"
                if consecutive_bad >= cfg.train.max_bad_steps:
                    raise diverged(run_dir, f"{consecutive_bad} consecutive steps had non-finite loss or gradients (step {step})",
                                   "Lower optim.lr_geometry or distill.guidance_scale, or raise train.max_bad_steps")
            done = step + 1
            if done % cfg.train.log_every == 0 or done == end_step:
                now = time.perf_counter()
                n = cfg.train.log_every if done % cfg.train.log_every == 0 else (done - start_step) % cfg.train.log_every or cfg.train.log_every
                dt = (now - last_time) / n
                last_time = now
                step_metrics.update(step=done, steps_per_s=1.0 / dt, samples_per_s=samples_per_step / dt,
                                    peak_memory_mb=peak_memory_mb(device), skipped_steps=bad_total)
                if accelerator.is_main_process:
                    metrics_file.write(json.dumps(step_metrics) + "\n")
                    metrics_file.flush()
                    if wandb_run is not None:
                        wandb_run.log(step_metrics, step=done)
                    bar.set_postfix(loss=f"{step_metrics['loss']:.4g}", it_s=f"{step_metrics['steps_per_s']:.2f}",
                                    mem=f"{step_metrics['peak_memory_mb']:.0f}MB", skipped=bad_total)
            checkpoint_now = consecutive_bad == 0 and (done % cfg.train.ckpt_every == 0 or done == end_step)
            parameters = list(model.parameters()) + ([] if adapter is None else list(adapter.parameters()))
            if checkpoint_now and not all_finite(parameters):
                raise diverged(run_dir, f"the parameters are not finite after step {done} (its loss and gradients were), so no "
                               "checkpoint was written", "Lower optim.lr_geometry (or optim.lr_background, distill.adapter_lr)")
            if accelerator.is_main_process and checkpoint_now:
                extra = {"skipped_steps": bad_total, "generator_config": model.config, "world_size": world,
                         "prompts_per_step": cfg.train.prompts_per_step}
                if accelerator.scaler is not None:  # so that a resumed fp16 run continues with the scale it had
                    extra["grad_scaler"] = accelerator.scaler.state_dict()
                save_checkpoint(run_dir, done, model, optimizer, extra, keep=cfg.train.keep_checkpoints, adapter=adapter,
                                adapter_optimizer=adapter_optimizer)
                if cfg.train.eval_every and done % cfg.train.eval_every == 0:
                    from amortized3d.evaluation.oracle import evaluate_run

                    evaluate_run(run_dir, out=run_dir / "evals" / f"step_{done:08d}.json")
            if accelerator.is_main_process and (done % cfg.train.val_every == 0 or done == total_steps):
                model.eval()
                write_validation(cfg, model, text_encoder, val_prompts, run_dir, done, device)
                model.train()
            accelerator.wait_for_everyone()
    except Exception as err:  # one line naming the rank and step, above the traceback (several ranks' output interleaves)
        print(f"[rank {rank} of {world}] training stopped at step {step}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise
    bar.close()
    final_views = run_dir / "validation" / f"step_{total_steps:08d}"
    if accelerator.is_main_process and end_step == total_steps and not (
            final_views.with_suffix(".png").is_file() and (final_views.with_suffix(".mp4").is_file() or final_views.with_suffix(".gif").is_file())):
        write_validation(cfg, model.eval(), text_encoder, val_prompts, run_dir, total_steps, device)  # a resumed run killed while writing them
    if prompt_record is not None:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        prompt_record.write(json.dumps({"final_step": end_step, "parameters_sha256": digest.hexdigest()}) + "\n")
        prompt_record.close()
    if metrics_file is not None:
        metrics_file.close()
    if wandb_run is not None:
        wandb_run.finish()
    accelerator.end_training()
    return run_dir
