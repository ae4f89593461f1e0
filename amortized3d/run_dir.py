"""The layout of a run folder, in one place (everything that reads or writes a run goes through RunDir):

    RUN/config.yaml                         the experiment config the run trains with
    RUN/metrics.jsonl                       one JSON row per logged step
    RUN/checkpoints/step_<8 digits>/        model, optimizer and state.json (amortized3d.training.checkpoint)
    RUN/checkpoints/latest                  the newest complete checkpoint's folder name
    RUN/validation/step_<8 digits>.png|mp4  validation contact sheet and turntable (amortized3d.training.previews)
    RUN/evals/step_<8 digits>.json          the oracle's report at a checkpoint (train.eval_every)
    RUN/eval_<split>.json                   the oracle's report (amortized3d evaluate)
    RUN/eval_clip_<split>/                  the CLIP evaluation: summary.json, scores.csv, renders
    RUN/prompts/rank<r>.jsonl               with train.record_prompts, each rank's prompts per micro-batch
    RUN/plots/                              `amortized3d plot`'s panels (its default output)
    RUN/gallery/                            `amortized3d gallery`'s page (its default output)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def step_name(step: int) -> str:
    """The name stem of everything written at a step: step_00001000."""
    return f"step_{step:08d}"


@dataclass(frozen=True)
class RunDir:
    path: Path

    def __init__(self, path: str | Path):
        object.__setattr__(self, "path", Path(path))

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / step_name(step)

    def validation(self, step: int, suffix: str) -> Path:
        """The validation view written at ``step``: suffix ".png" (contact sheet), ".mp4" or ".gif" (turntable)."""
        return self.path / "validation" / f"{step_name(step)}{suffix}"

    def step_eval(self, step: int) -> Path:
        return self.path / "evals" / f"{step_name(step)}.json"

    def step_evals(self) -> list[Path]:
        return sorted((self.path / "evals").glob("step_*.json"))

    def oracle_report(self, split: str) -> Path:
        return self.path / f"eval_{split}.json"

    def oracle_reports(self) -> list[tuple[str, Path]]:
        """(split, report) of every oracle report the run holds."""
        return [(p.stem.removeprefix("eval_"), p) for p in sorted(self.path.glob("eval_*.json"))]

    def clip_eval(self, split: str) -> Path:
        return self.path / f"eval_clip_{split}"

    def clip_evals(self) -> list[tuple[str, Path]]:
        """(split, folder) of every CLIP evaluation the run holds."""
        return [(p.name.removeprefix("eval_clip_"), p) for p in sorted(self.path.glob("eval_clip_*")) if p.is_dir()]

    def prompt_log(self, rank: int) -> Path:
        return self.path / "prompts" / f"rank{rank}.jsonl"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def gallery(self) -> Path:
        return self.path / "gallery"
