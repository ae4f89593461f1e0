"""Checkpoints: model and optimizer tensors as safetensors, everything else as JSON.

Layout of RUN_DIR/checkpoints/step_00001000/:
    model.safetensors      generator state_dict
    optimizer.safetensors  optimizer tensors, keyed "state.<param index>.<name>"
    adapter.safetensors, adapter_optimizer.safetensors
                           the learned guidance branch of VSD / LODS and its optimizer, when there is one
    deepspeed/zero/        instead of optimizer.safetensors in a DeepSpeed run: each process's ZeRO shard of the
                           optimizer state, written and read by DeepSpeed itself (save_deepspeed_shards)
    state.json             step, optimizer param groups, counters, and "files": the sha256 of each file above

A checkpoint is written into a temporary folder and renamed into place, then the
``latest`` pointer file is replaced atomically, so an interrupted write never
leaves a half checkpoint that ``--resume`` would pick up. Step folders are ordered by their
step number (not by name), and ``latest`` may only name a step folder inside checkpoints/.

Loading checks every file against its sha256 in state.json, and turns any unreadable,
damaged or mismatching checkpoint into a ``CheckpointError`` that names the folder, what is wrong,
and the intact checkpoints to fall back to. Checkpoints written before the digests existed load
without the digest check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from amortized3d.files import sha256_file, write_text_atomic
from amortized3d.run_dir import RunDir

STEP_FOLDER = re.compile(r"^step_(\d+)$")
DEEPSPEED_FOLDER, DEEPSPEED_TAG = "deepspeed", "zero"  # a DeepSpeed run's optimizer shards: step_N/deepspeed/zero/


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged or does not fit the model; the message says how to recover."""


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


def step_of(folder: Path) -> int:
    """The step of a checkpoint folder step_N: N."""
    return int(STEP_FOLDER.match(folder.name).group(1))


def step_folders(run_dir: Path) -> list[Path]:
    """RUN_DIR/checkpoints/step_N folders, oldest first by N."""
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and STEP_FOLDER.match(p.name)), key=step_of)


def save_checkpoint(
    run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, extra: dict, keep: int = 2,
    adapter: torch.nn.Module | None = None, adapter_optimizer: torch.optim.Optimizer | None = None,
    optimizer_shards: Path | None = None,
) -> Path:
    """Write RUN_DIR/checkpoints/step_XXXXXXXX atomically and point ``latest`` at it; keep the newest ``keep``.
    -> its folder.

    Under DeepSpeed the generator's optimizer state is sharded across the processes: pass the folder every process
    wrote its shard into (save_deepspeed_shards); it moves into the checkpoint as deepspeed/, in place of the
    optimizer's own state.
    """
    final = RunDir(run_dir).checkpoint(step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp_{final.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(model_state, str(tmp / "model.safetensors"))
    if optimizer_shards is not None:
        os.replace(optimizer_shards, tmp / DEEPSPEED_FOLDER)
        opt_meta = {"deepspeed_shards": DEEPSPEED_FOLDER}
    else:
        opt_tensors, opt_meta = _optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    meta = {"step": step, "optimizer": opt_meta, **extra}
    if adapter is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}, str(tmp / "adapter.safetensors"))
        adapter_tensors, meta["adapter_optimizer"] = _optimizer_tensors(adapter_optimizer)
        save_file(adapter_tensors, str(tmp / "adapter_optimizer.safetensors"))
    meta["files"] = {p.name: sha256_file(p)[0] for p in sorted(tmp.glob("*.safetensors"))}
    with open(tmp / "state.json", "w") as f:
        json.dump(meta, f, indent=1)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / "latest", final.name)
    for old in step_folders(run_dir)[:-keep]:
        if old != final:
            shutil.rmtree(old)
    return final


def save_deepspeed_shards(engine, run_dir: Path, step: int, barrier: Callable[[], None], is_main: bool) -> Path:
    """Every process writes its ZeRO shard of the optimizer state (and DeepSpeed's copy of the weights) into a staging
    folder next to the checkpoints, with DeepSpeed's own save_checkpoint; call on all processes. -> the folder, for
    save_checkpoint(optimizer_shards=...) on the main process."""
    staging = RunDir(run_dir).checkpoints / f".deepspeed_step_{step:08d}"
    if is_main:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    barrier()
    engine.save_checkpoint(str(staging), tag=DEEPSPEED_TAG, save_latest=False)
    barrier()
    return staging


def load_deepspeed_shards(engine, folder: Path, world: int) -> None:
    """Load the ZeRO optimizer shards (and weights) a DeepSpeed run saved in checkpoint ``folder``; all processes.

    ZeRO shards fit only the number of processes that wrote them: another count is an error that says how to resume.
    """
    state = _read_state(folder)
    if "deepspeed_shards" not in state.get("optimizer", {}):
        raise CheckpointError(f"checkpoint {folder} was written without DeepSpeed (its optimizer state is optimizer.safetensors): "
                              "resume it with the launch that wrote it, or start the DeepSpeed run anew in a new --output folder")
    saved_world = state.get("world_size")
    if saved_world != world:
        raise CheckpointError(f"checkpoint {folder} holds DeepSpeed ZeRO optimizer shards of {saved_world} processes, and this run "
                              f"has {world}: resume with --num_processes {saved_world} under the same DeepSpeed config")
    loaded, _ = engine.load_checkpoint(str(folder / DEEPSPEED_FOLDER), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                       load_lr_scheduler_states=False, load_module_strict=True)
    if loaded is None:
        raise CheckpointError(f"checkpoint {folder}: DeepSpeed could not load {folder / DEEPSPEED_FOLDER} (incomplete or damaged). "
                              f"{_recovery(folder)}")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The step folder named by RUN_DIR/checkpoints/latest, else the newest step folder, else None.

    The pointer must name a step_N folder directly inside checkpoints/ (a path such as ../../other_run is ignored).
    """
    root = RunDir(run_dir).checkpoints
    pointer = root / "latest"
    try:
        name = pointer.read_text(encoding="utf-8").strip() if pointer.is_file() else ""
    except (OSError, UnicodeDecodeError):
        name = ""
    if STEP_FOLDER.match(name) and (root / name).is_dir():
        return root / name
    folders = step_folders(run_dir)
    return folders[-1] if folders else None


def _recovery(folder: Path) -> str:
    others = [p.name for p in step_folders(folder.parent.parent) if p != folder]
    if not others:
        return "No other checkpoint of this run is left: train it again (without --resume), into a new --output folder."
    return (f"Other checkpoints of this run: {', '.join(others)}. To fall back to {others[-1]}, move the damaged folder out of "
            f"checkpoints/ (e.g. mv {folder} {folder.parent.parent / ('damaged_' + folder.name)}); --resume, generate and evaluate "
            "then use the newest remaining checkpoint.")


def _read_state(folder: Path) -> dict:
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("it has no integer 'step'")
        if not isinstance(state.get("files", {}), dict):
            raise ValueError("its 'files' is not a mapping of file names to sha256 digests")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {folder} has no state.json: it is incomplete. {_recovery(folder)}") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise CheckpointError(f"checkpoint {folder}: state.json is damaged ({type(err).__name__}: {err}). {_recovery(folder)}") from None
    return state


def _load_tensors(folder: Path, name: str, state: dict) -> dict[str, torch.Tensor]:
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder} has no {name}: it is incomplete. {_recovery(folder)}")
    expected = state.get("files", {}).get(name)
    if expected is not None and sha256_file(path)[0] != expected:
        raise CheckpointError(f"checkpoint {folder}: {name} does not match its sha256 in state.json (the file was damaged or "
                              f"replaced after it was written). {_recovery(folder)}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError and OSError for damaged files
        raise CheckpointError(f"checkpoint {folder}: {name} cannot be read ({type(err).__name__}: {err}). {_recovery(folder)}") from None


def _load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], folder: Path, what: str) -> None:
    try:
        module.load_state_dict(tensors)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = "; ".join(line.strip() for line in first[1:4]) or first[0]
        if "parametrizations" in str(err):  # spectral norm's parametrized weights on one side only
            detail += (". The checkpoint and this config differ in generator.spectral_norm (its default is on for SDS with "
                       "Hyper-iNGP since spectral norm became automatic): set generator.spectral_norm to the run's value")
        raise CheckpointError(
            f"checkpoint {folder} does not fit this {what}: {detail}. The run's config (architecture sizes, generator.kind, "
            "text encoder width) changed since the checkpoint was written. Resume with the run's own config.yaml "
            "(drop the overrides that change the architecture), or train the new architecture into a new --output folder."
        ) from None


def load_checkpoint(
    folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
    adapter: torch.nn.Module | None = None, adapter_optimizer: torch.optim.Optimizer | None = None,
) -> dict:
    """Load model (and optimizer, adapter) state from a checkpoint folder, checking every file. -> the JSON state."""
    folder = Path(folder)
    state = _read_state(folder)
    _load_into(model, _load_tensors(folder, "model.safetensors", state), folder, "generator")
    try:
        if optimizer is not None:
            if "deepspeed_shards" in state["optimizer"]:
                raise CheckpointError(f"checkpoint {folder} was written under DeepSpeed ({state.get('world_size')} processes): its "
                                      "optimizer state is ZeRO shards. Resume it under DeepSpeed with as many processes (e.g. "
                                      "accelerate launch --config_file launch/deepspeed_zero2.yaml --num_processes "
                                      f"{state.get('world_size')} train.py ... --resume); generate and evaluate read it as any checkpoint")
            _restore_optimizer(optimizer, _load_tensors(folder, "optimizer.safetensors", state), state["optimizer"])
        if adapter is not None:
            if not (folder / "adapter.safetensors").is_file():
                raise CheckpointError(f"{str(folder)!r} has no adapter.safetensors: it was not written by a VSD or LODS run; "
                                      "resume with the run's own distill.method")
            _load_into(adapter, _load_tensors(folder, "adapter.safetensors", state), folder, "learned branch")
            if adapter_optimizer is not None:
                _restore_optimizer(adapter_optimizer, _load_tensors(folder, "adapter_optimizer.safetensors", state), state["adapter_optimizer"])
    except (KeyError, ValueError, TypeError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {folder}: the optimizer state does not fit this run ({type(err).__name__}: {err}); "
                              "optim.name or the parameter groups changed. Resume with the run's own config.yaml.") from None
    return state
