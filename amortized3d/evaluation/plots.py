"""Training curves as PNG files, from a run's metrics.jsonl (and its evaluation reports).

    amortized3d plot RUN_DIR [--out DIR]                 -> RUN_DIR/plots/<panel>.png
    amortized3d plot RUN_A RUN_B ... --out DIR           -> DIR/compare_<key>.png and DIR/compare.json

Panels (a panel is written when the run logged any of its keys):
    losses          loss (total), loss_sd (score distillation), adapter_loss (VSD / LODS branch)
    regularizers    sparsity, opacity_entropy, eikonal, and the mean rendered opacity
    gradient        grad_sd_norm: mean norm of the distillation gradient per image
    schedule        t_min, t_max: the annealed timestep range
    throughput      steps_per_s, peak_memory_mb
    evaluation      R@1 and similarity of every evaluation report in the run folder
                    (eval_<split>.json from the oracle, evals/step_*.json from train.eval_every,
                    eval_clip_<split>/summary.json from CLIP) at the checkpoint step it evaluated

Lines are drawn over the steps; a loss spanning more than two decades is drawn on a log axis.
Non-finite values (skipped steps) are left out of the lines.

With several runs (e.g. the cells of a bench), each key of COMPARED that any run logged gets one panel with a line
per run, labelled by its method (and the run folder's name when methods repeat): the gradient norm of each method
over training is ScaleDreamer's Fig. 3 (right) on 3D runs. compare.json holds the plotted series.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from amortized3d.run_dir import RunDir

PANELS = {
    "losses": ("loss", "loss_sd", "adapter_loss"),
    "regularizers": ("sparsity", "opacity_entropy", "eikonal", "opacity"),
    "gradient": ("grad_sd_norm",),
    "schedule": ("t_min", "t_max"),
    "throughput": ("steps_per_s", "peak_memory_mb"),
}
COMPARED = ("grad_sd_norm", "loss_sd", "adapter_loss")


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run
    return rows


def evaluation_points(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{'oracle r_at_1': [(step, value)], 'clip similarity': [...], ...} from the run's evaluation reports."""
    points: dict[str, list[tuple[int, float]]] = {}
    run = RunDir(run_dir)
    reports = [(f"oracle {split}", json.loads(p.read_text()).get("summary", {})) for split, p in run.oracle_reports()]
    reports += [("oracle test", json.loads(p.read_text()).get("summary", {})) for p in run.step_evals()]
    reports += [(f"clip {split}", json.loads((folder / "summary.json").read_text())) for split, folder in run.clip_evals()
                if (folder / "summary.json").is_file()]
    for name, summary in reports:
        step = summary.get("step", summary.get("checkpoint_step"))
        for key in ("r_at_1", "similarity"):
            if step is not None and isinstance(summary.get(key), (int, float)):
                points.setdefault(f"{name} {key}", []).append((int(step), float(summary[key])))
    return points


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Write the panels of RUN_DIR as PNG files; -> their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = RunDir(run_dir).metrics
    if not metrics.is_file():
        raise FileNotFoundError(f"{str(run_dir)!r} has no metrics.jsonl; pass a run folder written by train")
    rows = read_metrics(metrics)
    out = Path(out) if out else RunDir(run_dir).plots
    out.mkdir(parents=True, exist_ok=True)
    written = []
    panels = {name: {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])] for k in keys}
              for name, keys in PANELS.items()}
    panels["evaluation"] = evaluation_points(run_dir)
    for name, series in panels.items():
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
        for ax, (key, points) in zip(axes[0], series.items()):
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, linewidth=1.2)
            if min(values) > 0 and max(values) / min(values) > 100 and name == "losses":
                ax.set_yscale("log")
            ax.set_title(key, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{run_dir.name}: {name}", fontsize=11)
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def plot_compare(run_dirs: list[str | Path], out: str | Path) -> list[Path]:
    """One panel per COMPARED key with a line per run; writes OUT/compare_<key>.png and OUT/compare.json -> the PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from amortized3d.builders import run_config

    runs = []
    for run_dir in map(Path, run_dirs):
        cfg = run_config(run_dir)
        metrics = RunDir(run_dir).metrics
        if not metrics.is_file():
            raise FileNotFoundError(f"{str(run_dir)!r} has no metrics.jsonl; pass run folders written by train")
        runs.append((run_dir, cfg.distill.method, read_metrics(metrics)))
    methods = [m for _, m, _ in runs]
    labels = [m if methods.count(m) == 1 else f"{m} ({d.name})" for d, m, _ in runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data, written = {}, []
    for key in COMPARED:
        series = {label: [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
                  for label, (_, _, rows) in zip(labels, runs)}
        series = {label: points for label, points in series.items() if points}
        if not series:
            continue
        data[key] = {label: {"step": [p[0] for p in points], "value": [p[1] for p in points]} for label, points in series.items()}
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, points in series.items():
            ax.plot(*zip(*points), label=label, linewidth=1.2)
        values = [v for points in series.values() for _, v in points]
        if min(values) > 0 and max(values) / min(values) > 30:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(key, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"compare_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    (out / "compare.json").write_text(json.dumps({"runs": [str(d) for d, _, _ in runs], "labels": labels, "series": data}))
    return written
