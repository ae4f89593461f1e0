"""Checkpoints: model and optimizer tensors as safetensors, everything else as JSON.

Layout of RUN_DIR/checkpoints/step_00001000/:
    model.safetensors      generator state_dict
    optimizer.safetensors  optimizer tensors, keyed "state.<param index>.<name>"
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


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict, keep: int = 2) -> Path:
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
    with open(tmp / "state.json", "w") as f:
        json.dump({"step": step, "optimizer": opt_meta, **extra}, f, indent=1)
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


def load_checkpoint(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load model (and optimizer) state from a checkpoint folder. -> the JSON state."""
    folder = Path(folder)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    with open(folder / "state.json") as f:
        state = json.load(f)
    if optimizer is not None:
        _restore_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), state["optimizer"])
    return state
