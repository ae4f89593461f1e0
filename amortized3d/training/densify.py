"""Adaptive density control of 3D Gaussians (3DGS, Kerbl et al. 2023, Sec. 5.2), on StableDreamer's schedule.

After each backward pass, every Gaussian drawn in a camera adds the norm of its screen-space position gradient,
measured in normalized device coordinates as 3DGS and gsplat do (pixel gradient x (W / 2, H / 2) x the number of
cameras), to ``grad2d``, and 1 to ``count``. At each densification step (splats.densify_every, after
splats.densify_from and before splats.densify_until), with g = grad2d / count:

    clone   g > grad_threshold and max scale <= percent_dense x scene_extent   (a copy at the same place)
    split   g > grad_threshold and max scale >  percent_dense x scene_extent   (two Gaussians drawn from it,
                                                                                 scales / 1.6, the original removed)
    prune   opacity < prune_opacity, and after the first opacity reset also max scale > prune_scale x scene_extent

then the sums restart. At the steps of splats.reset_opacity_at, every opacity above splats.reset_opacity is set to
it. The parameter and optimizer surgery is gsplat's (gsplat.strategy.ops: duplicate, split, remove, reset_opa,
plain PyTorch, so it runs on CPUs too): optimizer moments follow the surviving Gaussians, new ones start at zero.
Split draws its samples from torch's global generator; here it is seeded by (train.seed, step) inside a forked RNG
state, so a resumed run densifies exactly as the uninterrupted one.

StableDreamer (Appendix B): 1,000 initial Gaussians, densify every 500 steps from step 100, opacities reset to 0.005
at step 1,000, density control until step 12,000, then 3,000 steps with a fixed set. The learning rates are 3DGS's,
the position one StableDreamer's 6.4e-4 (config: splats).
"""

from __future__ import annotations

import torch

from amortized3d.generators.gaussians import PromptGaussians
from amortized3d.rendering.gaussians import SplatRender
from amortized3d.seeding import derived_seed


class _OneGroup:
    """One parameter group of an optimizer seen as the optimizer of its one parameter, which is what gsplat's
    surgery expects (an optimizer per parameter); it edits the group and the optimizer's state in place."""

    def __init__(self, optimizer, group: dict):
        self.param_groups = [group]
        self.state = optimizer.state


def splat_optimizers(model: PromptGaussians, optimizer) -> dict[str, _OneGroup]:
    """The optimizer's group of each splat attribute (build_optimizer names them), keyed like model.splats."""
    groups = {group.get("name"): group for group in optimizer.param_groups}
    missing = [name for name in model.splats if name not in groups]
    if missing:
        raise ValueError(f"the optimizer has no parameter group named {missing[0]!r}; build it with "
                         "amortized3d.builders.build_optimizer, which gives each splat attribute its own group")
    return {name: _OneGroup(optimizer, groups[name]) for name in model.splats}


@torch.no_grad()
def accumulate(model: PromptGaussians, render: SplatRender) -> None:
    """Add one backward pass's screen-space gradients to model.grad2d and model.count (call after backward).
    render: the SplatRender of the step (ImageRender.splats) whose means2d now holds its gradient."""
    grad = render.means2d.grad
    if grad is None:
        return
    C, _, H, W = render.rgb.shape
    scaled = grad * torch.tensor([W / 2.0 * C, H / 2.0 * C], dtype=grad.dtype, device=grad.device)  # C: the cameras
    drawn = render.radii > 0  # [C, N]
    ids = torch.nonzero(drawn)[:, 1]
    model.grad2d.index_add_(0, ids, scaled[drawn].norm(dim=-1).to(model.grad2d.dtype))
    model.count.index_add_(0, ids, torch.ones_like(ids, dtype=model.count.dtype))


class DensityControl:
    """The schedule and the rules of the module docstring, for one PromptGaussians and its optimizer.

    settings: the config's splats section; seed: train.seed (split's samples)."""

    def __init__(self, settings, seed: int):
        self.settings, self.seed = settings, seed

    def active(self, step: int) -> bool:
        """Whether gradients are accumulated at 1-based step ``step`` (before densify_until)."""
        return step < self.settings.densify_until

    @torch.no_grad()
    def step(self, step: int, model: PromptGaussians, optimizer) -> dict[str, float]:
        """After optimizer step ``step`` (1-based): densify and prune, or reset the opacities, when the schedule says
        so. -> metrics: n_gaussians, and at a densification the numbers cloned, split and pruned."""
        s = self.settings
        metrics: dict[str, float] = {}
        if s.densify_from < step < s.densify_until and step % s.densify_every == 0:
            metrics.update(self.densify(step, model, optimizer))
        if step in s.reset_opacity_at:
            from gsplat.strategy.ops import reset_opa

            reset_opa(model.splats, splat_optimizers(model, optimizer), {}, value=s.reset_opacity)
            metrics["opacity_reset"] = 1.0
        metrics["n_gaussians"] = float(model.n_gaussians)
        return metrics

    def densify(self, step: int, model: PromptGaussians, optimizer) -> dict[str, float]:
        """Clone, split and prune once (module docstring); the running sums restart."""
        from gsplat.strategy.ops import duplicate, remove, split

        s = self.settings
        optimizers = splat_optimizers(model, optimizer)
        state = {"grad2d": model.grad2d, "count": model.count}  # gsplat's ops carry these along with the Gaussians
        grads = model.grad2d / model.count.clamp_min(1)
        high = grads > s.grad_threshold
        small = model.splats["scales"].exp().max(-1).values <= s.percent_dense * s.scene_extent
        clone, to_split = high & small, high & ~small
        budget = s.max_gaussians - model.n_gaussians
        if int(clone.sum()) + int(to_split.sum()) > budget:  # keep the highest gradients within max_gaussians
            keep = torch.zeros_like(high)
            keep[torch.topk(torch.where(high, grads, torch.full_like(grads, -1.0)), max(budget, 0)).indices] = True
            clone, to_split = clone & keep, to_split & keep
        n_clone, n_split = int(clone.sum()), int(to_split.sum())
        if n_clone:
            duplicate(model.splats, optimizers, state, clone)
            to_split = torch.cat([to_split, torch.zeros(n_clone, dtype=torch.bool, device=to_split.device)])
        if n_split:
            devices = [model.splats["means"].device] if model.splats["means"].is_cuda else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(derived_seed(self.seed, 0, step, -2))
                split(model.splats, optimizers, state, to_split)
        opacity = torch.sigmoid(model.splats["opacities"])
        prune = opacity < s.prune_opacity
        if s.reset_opacity_at and step > min(s.reset_opacity_at):
            prune |= model.splats["scales"].exp().max(-1).values > s.prune_scale * s.scene_extent
        n_prune = int(prune.sum())
        if n_prune and n_prune < model.n_gaussians:  # never the last one
            remove(model.splats, optimizers, state, prune)
        else:
            n_prune = 0
        model.grad2d = torch.zeros_like(state["grad2d"])
        model.count = torch.zeros_like(state["count"])
        return {"cloned": float(n_clone), "split": float(n_split), "pruned": float(n_prune)}

