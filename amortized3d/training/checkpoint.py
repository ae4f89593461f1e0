"""Checkpoints: model and optimizer tensors as safetensors, everything else as JSON.

Layout of RUN_DIR/checkpoints/step_00001000/:
    model.safetensors      generator state_dict
    optimizer.safetensors  optimizer tensors, keyed "state.<param index>.<name>"
    adapter.safetensors, adapter_optimizer.safetensors
                           the learned guidance branch of VSD / LODS and its optimizer, when there is one
    state.json             step, optimizer param groups, generator config, counters

A checkpoint is written into a temporary folder and renamed into place, then the
``latest`` pointer file is replaced atomically, so an interrupted write never
leaves a half checkpoint that ``--resume`` would pick up.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"state.{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict, keep: int = 2,
    adapter: torch.nn.Module | None = None, adapter_optimizer: torch.optim.Optimizer | None = None,
) -> Path:
    """Write RUN_DIR/checkpoints/step_XXXXXXXX atomically and point ``latest`` at it. -> its folder."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(model_state, str(tmp / "model.safetensors"))
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    meta = {"step": step, "optimizer": opt_meta, **extra}
    if adapter is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}, str(tmp / "adapter.safetensors"))
        adapter_tensors, meta["adapter_optimizer"] = _optimizer_tensors(adapter_optimizer)
        save_file(adapter_tensors, str(tmp / "adapter_optimizer.safetensors"))
    with open(tmp / "state.json", "w") as f:
        json.dump(meta, f, indent=1)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer_tmp = root / ".latest.tmp"
    pointer_tmp.write_text(final.name)
    os.replace(pointer_tmp, root / "latest")
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder named by RUN_DIR/checkpoints/latest, or None if there is none."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    return folder if folder.is_dir() else None


def load_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
    adapter: torch.nn.Module | None = None, adapter_optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Load model (and optimizer, adapter) state from a checkpoint folder. -> the JSON state."""
    folder = Path(folder)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    with open(folder / "state.json") as f:
        state = json.load(f)
    if optimizer is not None:
        _restore_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), state["optimizer"])
    if adapter is not None:
        if not (folder / "adapter.safetensors").is_file():
            raise FileNotFoundError(f"{str(folder)!r} has no adapter.safetensors: it was not written by a VSD or LODS run")
        adapter.load_state_dict(load_file(str(folder / "adapter.safetensors")))
        if adapter_optimizer is not None:
            _restore_optimizer(adapter_optimizer, load_file(str(folder / "adapter_optimizer.safetensors")), state["adapter_optimizer"])
    return state
