"""The non-finite guard: every rank agrees whether a step's losses and gradients are finite, and all of them step
or all of them skip; too many bad steps in a row stop the run with the way back."""

from __future__ import annotations

from pathlib import Path

import torch

from amortized3d.training.checkpoint import latest_checkpoint


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with non-finite loss or gradients."""


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
