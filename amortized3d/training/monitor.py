"""What a run reports about itself: metrics rows (metrics.jsonl, Weights & Biases), peak memory, and the
rewriting of log files when a resumed run repeats steps."""

from __future__ import annotations

import hashlib
import json
import os
import resource
from pathlib import Path

import torch

from amortized3d.config import ExperimentConfig, config_to_dict
from amortized3d.files import write_text_atomic
from amortized3d.run_dir import RunDir


def open_wandb(cfg: ExperimentConfig, run_dir: Path):
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


class MetricsLog:
    """metrics.jsonl (and Weights & Biases) of the main process; other ranks hold an inactive log."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir, active: bool):
        self.file = open(run.metrics, "a") if active else None
        self.wandb = open_wandb(cfg, run.path) if active else None

    def write(self, row: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


class PromptLog:
    """The audit trail of train.record_prompts: this rank's prompts per micro-batch, then a digest of its parameters.
    A resumed run first drops the rows of the steps it repeats."""

    def __init__(self, path: Path, start_step: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        keep_log_rows(path, lambda row: row.get("step", start_step) < start_step)
        self.file = open(path, "a")

    def batch(self, step: int, micro: int, prompts: list[str]) -> None:
        self.file.write(json.dumps({"step": step, "micro": micro, "prompts": prompts}) + "\n")

    def finish(self, final_step: int, model: torch.nn.Module) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        self.file.write(json.dumps({"final_step": final_step, "parameters_sha256": digest.hexdigest()}) + "\n")
        self.file.close()
