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

import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedType, InitProcessGroupKwargs
from accelerate.utils import broadcast
from tqdm import tqdm

from amortized3d.builders import (adapter_lr, build_adapter, build_generator, build_optimizer, build_prior, build_second_prior,
                                  build_text_encoder, init_from_run, optimizer_learning_rates, prepare_store, prior_store_suffixes)
from amortized3d.config import ExperimentConfig, save_config
from amortized3d.data.corpora import load_corpus, single_prompt
from amortized3d.data.loader import batch_loader, check_corpus_fits_a_step
from amortized3d.run_dir import RunDir
from amortized3d.shapeworld import PromptError, parse_prompt
from amortized3d.seeding import derived_seed
from amortized3d.training.checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, load_deepspeed_shards, save_checkpoint,
                                             save_deepspeed_shards)
from amortized3d.training.densify import DensityControl, accumulate
from amortized3d.training.guard import TrainingDiverged, all_finite, all_ranks_agree, diverged, guarded_optimizer_step
from amortized3d.training.monitor import MetricsLog, PromptLog, keep_log_rows, peak_memory_mb, reset_peak_memory
from amortized3d.training.previews import has_validation, write_validation
from amortized3d.training.step import distillation_step

__all__ = ["train", "TrainingDiverged", "CheckpointHook"]

# Called on the main process after each checkpoint is written: hook(run_dir, step). In-loop evaluation
# (train.eval_every) is one: amortized3d.evaluation.oracle.eval_every_hook.
CheckpointHook = Callable[[Path, int], None]


def check_shapeworld_prompts(prompts: list[str], corpus_name: str) -> None:
    """The analytic prior knows ShapeWorld scenes only; fail early, naming the first prompt it cannot parse."""
    for i, prompt in enumerate(prompts):
        try:
            parse_prompt(prompt)
        except PromptError as err:
            raise PromptError(
                f"corpus {corpus_name!r}, train prompt {i}: the analytic prior understands ShapeWorld prompts only. {err}"
            ) from None


def check_run_folder(run_dir: Path, resume: bool) -> None:
    """A new run goes into a folder without checkpoints; --resume needs one with a checkpoint."""
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"the run folder {str(run_dir)!r} is a file; pass a folder with --output (it is created if missing)")
    if resume and latest_checkpoint(run_dir) is None:
        raise CheckpointError(f"--resume: {str(run_dir)!r} has no checkpoint to continue from (no checkpoints/step_* folder); "
                              "train it without --resume, or pass the run folder that holds the checkpoints")
    if not resume and latest_checkpoint(run_dir) is not None:
        raise CheckpointError(f"{str(run_dir)!r} already holds a run with checkpoints; continue it with --resume, or train into a new "
                              "--output folder (nothing was changed)")


def say(accelerator, message: str) -> None:
    """A warning or note on stderr, once (main process)."""
    if accelerator.is_main_process:
        print(message, file=sys.stderr, flush=True)


def resume_from_checkpoint(cfg: ExperimentConfig, run_dir: Path, accelerator, generator, optimizer, adapter, adapter_optimizer) -> dict:
    """Load the latest checkpoint into the models and optimizers; -> its state (step, skipped_steps, ...).

    The learning rates are the config's, not the checkpoint's: lowering optim.lr_* is how a diverged run is continued.
    """
    state = load_checkpoint(latest_checkpoint(run_dir), generator, optimizer, adapter, adapter_optimizer)
    world = accelerator.num_processes
    before = (state.get("world_size", world), state.get("prompts_per_step", cfg.train.prompts_per_step))
    if before != (world, cfg.train.prompts_per_step):
        say(accelerator, f"warning: the run was checkpointed with {before[0]} processes x train.prompts_per_step={before[1]}, and resumes "
                         f"with {world} x {cfg.train.prompts_per_step}: from here the prompt order differs from the original run's "
                         "(within the current epoch some prompts may repeat or be left out)")
    if optimizer is not None:  # under DeepSpeed: after its shards are loaded (train())
        apply_config_learning_rates(cfg, accelerator, optimizer, adapter_optimizer)
    return state


def apply_config_learning_rates(cfg: ExperimentConfig, accelerator, optimizer, adapter_optimizer) -> None:
    """Set the optimizers' learning rates to the config's (a resumed run takes the config's), saying which changed."""
    groups = list(zip(optimizer.param_groups, optimizer_learning_rates(cfg)))
    if adapter_optimizer is not None:
        groups += [(group, adapter_lr(cfg)) for group in adapter_optimizer.param_groups]
    changed = [(group["lr"], lr) for group, lr in groups if group["lr"] != lr]
    if changed:
        say(accelerator, "note: resuming with the config's learning rates "
                         + ", ".join(f"{new:g} (checkpoint: {old:g})" for old, new in changed))
    for group, lr in groups:
        group["lr"] = lr


def configure_deepspeed(accelerator: Accelerator, cfg: ExperimentConfig) -> None:
    """Make a DeepSpeed run train as the same run without it. DeepSpeed reads the micro-batch, the accumulation and
    gradient clipping from its own config, where Accelerate fills what is unset from a DataLoader (this trainer has
    none) or its defaults (clipping at norm 1.0): set them to the run's, train.prompts_per_step, train.grad_accum
    and no clipping (this trainer clips nowhere else)."""
    plugin = accelerator.state.deepspeed_plugin
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.prompts_per_step
    plugin.deepspeed_config["gradient_accumulation_steps"] = cfg.train.grad_accum
    plugin.deepspeed_config["gradient_clipping"] = 0.0
    accelerator.gradient_accumulation_steps = cfg.train.grad_accum


def train(cfg: ExperimentConfig, run_dir: str | Path, resume: bool = False, max_steps: int | None = None,
          hooks: Sequence[CheckpointHook] = ()) -> Path:
    """Train a generator on cfg.corpus; writes config, metrics, checkpoints and validation renders to run_dir
    (layout: amortized3d.run_dir). -> run_dir.

    ``max_steps`` stops early after that many optimizer steps (the schedule still spans cfg.train.steps), which is
    how an interrupted run is simulated in tests. ``hooks`` run after each checkpoint (CheckpointHook); with
    train.eval_every, pass amortized3d.evaluation.oracle.eval_every_hook(cfg) (the CLI and the bench do).
    """
    # --- set-up: the run folder, the processes, the corpus, the models ---
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    check_run_folder(run_dir, resume)
    if cfg.train.eval_every and not hooks:
        raise ValueError("train.eval_every is set but no evaluation hook was passed: train(..., hooks=[eval_every_hook(cfg)]) "
                         "with amortized3d.evaluation.oracle.eval_every_hook, or set train.eval_every=0")
    # several processes without CUDA talk over gloo (DeepSpeed would otherwise ask for its own CPU backend)
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    process_group = [InitProcessGroupKwargs(backend="gloo")] if several and not torch.cuda.is_available() else []
    accelerator = Accelerator(gradient_accumulation_steps=cfg.train.grad_accum, mixed_precision=cfg.train.mixed_precision,
                              kwargs_handlers=process_group)
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        configure_deepspeed(accelerator, cfg)
    device = accelerator.device
    if cfg.train.mixed_precision == "fp16" and device.type == "cpu":
        say(accelerator, f"warning: train.mixed_precision=fp16 has no effect on {device.type} (Accelerate runs fp16 autocast with its "
                         "gradient scaler on GPUs only); this run trains in float32. Use bf16 for mixed precision here.")
    reset_peak_memory(device)
    rank, world = accelerator.process_index, accelerator.num_processes
    if device.type == "cpu" and world == 1:
        # `accelerate launch` without a config sets OMP_NUM_THREADS=1; a lone CPU process should use every core.
        torch.set_num_threads(max(torch.get_num_threads(), len(os.sched_getaffinity(0))))
    corpus = load_corpus(cfg.corpus.name, cfg.corpus.dir)
    train_prompts = corpus.train
    if cfg.prior.analytic or (cfg.phase2.start > 0 and cfg.phase2_prior().analytic):
        check_shapeworld_prompts(train_prompts, cfg.corpus.name)
    check_corpus_fits_a_step(len(train_prompts), cfg.train.prompts_per_step, world)
    val_prompts = (corpus.val or corpus.train)[:4]
    torch.manual_seed(derived_seed(cfg.train.seed, rank, -1))

    text_encoder = build_text_encoder(cfg, device)
    cfg.text.dim = text_encoder.dim  # the prior's CLIP width when text.encoder=prior; recorded in config.yaml
    generator = build_generator(cfg)
    if cfg.generator.kind == "gaussians" and cfg.generator.init_from and not resume:  # refine an existing asset
        init_from_run(generator, cfg.generator.init_from, cfg.generator.init_prompt or single_prompt(cfg.corpus.name), cfg.train.seed)
    generator = generator.to(device)
    prior = build_prior(cfg, text_encoder, device)
    second_prior = build_second_prior(cfg, device)  # StableDreamer's second phase (phase2), or None
    store = prepare_store(cfg, train_prompts, text_encoder, prior.text_encoder, rank=rank, world=world,
                          barrier=accelerator.wait_for_everyone, progress=accelerator.is_local_main_process)
    del corpus, train_prompts  # from here on, prompts come from the store's shards
    adapter, adapter_optimizer = build_adapter(cfg, prior)
    if adapter is not None and world > 1:  # one learned branch for all ranks: rank 0's initial weights (the generator's
        for p in adapter.parameters():     # come from accelerator.prepare); its averaged gradients keep them equal
            p.data.copy_(broadcast(p.data, from_process=0))
    optimizer = build_optimizer(cfg, generator)
    resume_optimizer = None if deepspeed else optimizer  # DeepSpeed's optimizer state loads after prepare, below
    state = resume_from_checkpoint(cfg, run_dir, accelerator, generator, resume_optimizer, adapter, adapter_optimizer) if resume else {}
    start_step, bad_total = state.get("step", 0), state.get("skipped_steps", 0)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.config)
        # rows past the checkpoint were logged by the interrupted run, which this one repeats
        keep_log_rows(run.metrics, lambda row: row.get("step", 0) <= start_step)
    density = None
    if cfg.generator.kind == "gaussians":  # 3D Gaussians: clone, split, prune and reset on the schedule of cfg.splats
        if world > 1 or deepspeed:
            raise ValueError(f"generator.kind=gaussians trains one prompt's Gaussians in one process (density control changes "
                             f"their number), but this launch has {world} processes{' under DeepSpeed' if deepspeed else ''}; "
                             "run `amortized3d train --prompt ...` without accelerate launch")
        density = DensityControl(cfg.splats, cfg.train.seed)
    generator, optimizer = accelerator.prepare(generator, optimizer)
    if resume and deepspeed:  # generator is DeepSpeed's engine here
        load_deepspeed_shards(generator, latest_checkpoint(run_dir), world)
        apply_config_learning_rates(cfg, accelerator, optimizer, adapter_optimizer)
    model = accelerator.unwrap_model(generator)
    if accelerator.scaler is not None and "grad_scaler" in state:  # a resumed fp16 run continues with the scale it had
        accelerator.scaler.load_state_dict(state["grad_scaler"])

    log = MetricsLog(cfg, run, accelerator.is_main_process)
    prompt_log = PromptLog(run.prompt_log(rank), start_step) if cfg.train.record_prompts else None
    total_steps = cfg.train.steps
    end_step = total_steps if max_steps is None else min(total_steps, start_step + max_steps)
    loader = batch_loader(store, cfg.train.prompts_per_step, rank=rank, world=world, seed=cfg.train.seed,
                          start=start_step * cfg.train.grad_accum, stop=end_step * cfg.train.grad_accum,
                          num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    batches_per_epoch = loader.dataset.plan.batches_per_epoch
    batches = iter(loader)
    suffixes = prior_store_suffixes(cfg)
    samples_per_step = cfg.train.prompts_per_step * cfg.train.views_per_prompt * cfg.train.grad_accum * world
    bar = tqdm(range(start_step, end_step), initial=start_step, total=total_steps, disable=not accelerator.is_local_main_process,
               dynamic_ncols=True)
    consecutive_bad, last_time, step = 0, time.perf_counter(), start_step

    # --- the loop: forward and backward per micro-batch, one guarded step, log, checkpoint, hooks, views ---
    try:
        for step in bar:
            progress = step / max(total_steps - 1, 1)
            metrics: dict[str, float] = {"epoch": step * cfg.train.grad_accum / batches_per_epoch}
            second = second_prior is not None and progress >= cfg.phase2.start
            active, active_suffixes = (second_prior, []) if second else (prior, suffixes)  # the second prior reads the prompts itself
            if cfg.generator.kind == "gaussians" and cfg.splats.lr_means_final is not None:  # 3DGS's position decay
                optimizer.param_groups[0]["lr"] = cfg.splats.lr_means * (cfg.splats.lr_means_final / cfg.splats.lr_means) ** progress
            if second and cfg.phase2.lr_geometry is not None:
                optimizer.param_groups[0]["lr"] = cfg.phase2.lr_geometry
            if second_prior is not None:
                metrics["phase"] = 2 if second else 1
            losses_finite = True
            for micro in range(cfg.train.grad_accum):
                rng = torch.Generator().manual_seed(derived_seed(cfg.train.seed, rank, step, micro))
                batch = next(batches)
                if prompt_log is not None:
                    prompt_log.batch(step, micro, batch.prompts)
                with accelerator.accumulate(generator):
                    with accelerator.autocast():
                        result = distillation_step(cfg, generator, active, batch, progress, rng, device, adapter, z_dim=model.z_dim,
                                                   prior_suffixes=active_suffixes)
                    # all ranks back-propagate, or none (their gradient all-reduce must not wait for a rank that skipped)
                    finite = all_ranks_agree(accelerator, bool(torch.isfinite(result.loss)))
                    losses_finite = losses_finite and finite
                    if finite:
                        accelerator.backward(result.loss)
                        if density is not None and density.active(step + 1):
                            accumulate(model, result.render.splats)  # this pass's screen-space gradients
                    for k, v in result.metrics.items():
                        metrics[k] = metrics.get(k, 0.0) + v / cfg.train.grad_accum
                    metrics["loss"] = metrics.get("loss", 0.0) + result.loss.item() / cfg.train.grad_accum

            outcome = guarded_optimizer_step(accelerator, generator, optimizer, adapter, adapter_optimizer, losses_finite)
            if accelerator.scaler is not None:
                metrics["grad_scale"] = accelerator.scaler.get_scale()
            if density is not None:
                metrics.update(density.step(step + 1, model, optimizer))
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
                dt, last_time = (now - last_time) / n, now
                metrics.update(step=done, steps_per_s=1.0 / dt, samples_per_s=samples_per_step / dt,
                               peak_memory_mb=peak_memory_mb(device), skipped_steps=bad_total)
                log.write(metrics)
                splats = {} if density is None else {"gaussians": int(metrics["n_gaussians"]), "raster_ms": f"{metrics['raster_ms']:.0f}"}
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", it_s=f"{metrics['steps_per_s']:.2f}",
                                mem=f"{metrics['peak_memory_mb']:.0f}MB", skipped=bad_total, **splats)

            if consecutive_bad == 0 and (done % cfg.train.ckpt_every == 0 or done == end_step):
                if not all_finite(list(model.parameters()) + ([] if adapter is None else list(adapter.parameters()))):
                    raise diverged(run_dir, f"the parameters are not finite after step {done} (its loss and gradients were), so no "
                                   "checkpoint was written", "Lower optim.lr_geometry (or optim.lr_background, distill.adapter_lr)")
                shards = save_deepspeed_shards(generator, run_dir, done, accelerator.wait_for_everyone,
                                               accelerator.is_main_process) if deepspeed else None
                if accelerator.is_main_process:
                    extra = {"skipped_steps": bad_total, "generator_config": model.config.model_dump(), "world_size": world,
                             "prompts_per_step": cfg.train.prompts_per_step}
                    if accelerator.scaler is not None:  # so that a resumed fp16 run continues with the scale it had
                        extra["grad_scaler"] = accelerator.scaler.state_dict()
                    save_checkpoint(run_dir, done, model, optimizer, extra, keep=cfg.train.keep_checkpoints, adapter=adapter,
                                    adapter_optimizer=adapter_optimizer, optimizer_shards=shards)
                    for hook in hooks:
                        hook(run_dir, done)
            if accelerator.is_main_process and (done % cfg.train.val_every == 0 or done == total_steps):
                model.eval()
                write_validation(cfg, model, text_encoder, val_prompts, run, done, device, active, adapter)
                model.train()
            accelerator.wait_for_everyone()
    except Exception as err:  # one line naming the rank and step, above the traceback (several ranks' output interleaves)
        print(f"[rank {rank} of {world}] training stopped at step {step}: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise

    # --- the end: views a killed resumed run did not finish, the audit digest, closing the logs ---
    bar.close()
    if accelerator.is_main_process and end_step == total_steps and not has_validation(run, total_steps):
        write_validation(cfg, model.eval(), text_encoder, val_prompts, run, total_steps, device, second_prior or prior, adapter)
    if prompt_log is not None:
        prompt_log.finish(end_step, model)
    log.close()
    accelerator.end_training()
    return run_dir
