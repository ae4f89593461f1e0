"""`amortized3d bench MATRIX.yaml`: train and evaluate every method x generator x corpus cell, then tabulate.

A matrix file (see benchmarks/matrices/):

    corpora: [shapeworld-16]              # corpus names or files
    methods: [asd, sds, csd]              # distill.method values
    generators:                           # generator kind -> config file applied on top of the recipe (or null)
      hyper_ingp: null
      conv3d: configs/shapeworld-conv3d.yaml
    config: null                          # a config file for corpora without a recipe
    overrides: [train.steps=1000]         # section.key=value for every cell
    clip: null                            # a CLIP model (amortized3d evaluate --clip) for CLIP R@1 and Sim
    clip_views: 120
    oracle: auto                          # ShapeWorld oracle R@1 and IoU: auto (ShapeWorld corpora), true, false
    gallery: 0                            # N > 0: a gallery of each cell's first N test prompts, and OUT/index.html

Each cell trains into OUT/runs/<corpus>-<method>-<generator>/ and is evaluated there; a cell with
a results.json is skipped, so an interrupted bench resumes. Wall-clock time is measured per
cell; device hours are wall-clock x the number of processes (GPU hours on GPUs, CPU-process
hours otherwise). OUT/results.json holds every cell; OUT/results.md the table: one row per
method x generator, and per corpus the metrics and the hours. With gallery: N, every cell gets a
gallery (amortized3d.evaluation.gallery) and OUT/index.html shows the table with links to them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from amortized3d.evaluation.clip_eval import DEFAULT_VIEWS

DEFAULTS = {"corpora": None, "methods": None, "generators": {"hyper_ingp": None}, "config": None, "overrides": [],
            "clip": None, "clip_views": DEFAULT_VIEWS, "oracle": "auto", "gallery": 0}


def load_matrix(path: str | Path) -> dict:
    """The matrix file with defaults filled in; unknown keys and missing lists are errors naming the key."""
    from amortized3d.config import ConfigError, load_yaml

    data = load_yaml(path)
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(DEFAULTS)}")
    matrix = {**DEFAULTS, **data}
    for key in ("corpora", "methods"):
        if not isinstance(matrix[key], list) or not matrix[key]:
            raise ConfigError(f"{path}: {key} must be a non-empty list, e.g. {key}: [{'shapeworld-16' if key == 'corpora' else 'asd'}]")
    if isinstance(matrix["generators"], list):
        matrix["generators"] = {g: None for g in matrix["generators"]}
    if matrix["oracle"] not in ("auto", True, False):
        raise ConfigError(f"{path}: oracle={matrix['oracle']!r}; use auto, true or false")
    return matrix


def cell_name(corpus: str, method: str, generator: str) -> str:
    return f"{Path(corpus).stem if Path(corpus).suffix else corpus}-{method}-{generator}"


def run_cell(matrix: dict, corpus: str, method: str, generator: str, generator_config: str | None, out: Path) -> dict:
    """Train and evaluate one cell (every rank calls it); -> its results (rank 0 writes them)."""
    from accelerate import Accelerator

    from amortized3d.config import config_to_dict, load_config
    from amortized3d.evaluation.clip_eval import evaluate_clip
    from amortized3d.evaluation.oracle import eval_every_hook, evaluate_run
    from amortized3d.training.checkpoint import latest_checkpoint
    from amortized3d.training.train import train

    run = out / "runs" / cell_name(corpus, method, generator)
    if (run / "results.json").is_file():
        return json.loads((run / "results.json").read_text())
    overrides = [f"distill.method={method}", f"generator.kind={generator}", *matrix["overrides"]]
    cfg = load_config(corpus, generator_config or matrix["config"], overrides)
    start = time.perf_counter()
    train(cfg, run, resume=latest_checkpoint(run) is not None, hooks=eval_every_hook(cfg))
    train_s = time.perf_counter() - start
    accelerator = Accelerator()  # after train's, which set up the process group and precision
    world = accelerator.num_processes
    result = {"corpus": corpus, "method": method, "generator": generator, "steps": cfg.train.steps,
              "train_s": round(train_s, 1), "device": accelerator.device.type, "processes": world,
              "device_hours": round(train_s * world / 3600, 4), "config": config_to_dict(cfg)}
    oracle = matrix["oracle"] is True or (matrix["oracle"] == "auto" and str(cfg.corpus.name).startswith("shapeworld"))
    if oracle and accelerator.is_main_process:
        summary = evaluate_run(run)["summary"]
        result.update({"oracle_r_at_1": summary["r_at_1"], "oracle_similarity": summary["similarity"], "iou": summary["iou"],
                       "oracle_r_at_1_unseen": summary["r_at_1_unseen"]})
    if matrix["clip"]:
        summary = evaluate_clip(run, matrix["clip"], n_views=matrix["clip_views"], progress=False)
        if summary is not None:
            result.update({"clip_r_at_1": summary["r_at_1"], "clip_similarity": summary["similarity"]})
    if matrix["gallery"] and accelerator.is_main_process:
        from amortized3d.evaluation.gallery import build_gallery

        # lenient: a missing or misconfigured 3D viewer gives a page without it (and a note), never a failed cell
        result["gallery"] = str(build_gallery(run, limit=int(matrix["gallery"]), lenient=True).relative_to(out))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (run / "results.json").write_text(json.dumps(result, indent=1))
    return result


METRICS = (("clip_r_at_1", "R@1"), ("clip_similarity", "Sim"), ("oracle_r_at_1", "oracle R@1"), ("iou", "IoU"))


def table(results: list[dict]) -> str:
    """Markdown: a row per method x generator; per corpus its metrics and the training time and device hours."""
    corpora = list(dict.fromkeys(r["corpus"] for r in results))
    present = [(k, label) for k, label in METRICS if any(k in r for r in results)]
    header = ["method", "generator"]
    for c in corpora:
        header += [f"{c} {label}" for _, label in present] + [f"{c} time", f"{c} {results[0]['device'].upper()} h"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cells = {(r["corpus"], r["method"], r["generator"]): r for r in results}
    for method, generator in dict.fromkeys((r["method"], r["generator"]) for r in results):
        row = [method.upper() if len(method) <= 4 else method, generator]
        for c in corpora:
            r = cells.get((c, method, generator))
            if r is None:
                row += [""] * (len(present) + 2)
                continue
            row += [f"{r[k]:.3f}" if k in r else "" for k, _ in present]
            minutes, seconds = divmod(round(r["train_s"]), 60)
            row += [f"{minutes} min {seconds} s", f"{r['device_hours']:.3f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def run_bench(matrix_file: str | Path, out: str | Path) -> list[dict]:
    """Every cell of the matrix in order (corpus, generator, method); writes OUT/results.json and OUT/results.md."""
    from accelerate import Accelerator

    matrix = load_matrix(matrix_file)
    out = Path(out)
    results = []
    for corpus in matrix["corpora"]:
        for generator, generator_config in matrix["generators"].items():
            for method in matrix["methods"]:
                results.append(run_cell(matrix, corpus, method, generator, generator_config, out))
    if Accelerator().is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"matrix": matrix, "cells": [{k: v for k, v in r.items() if k != "config"} for r in results]}, indent=1))
        (out / "results.md").write_text(table(results))
        if matrix["gallery"]:
            (out / "index.html").write_text(index_page(results), encoding="utf-8")
    return results


def index_page(results: list[dict]) -> str:
    """The results table as HTML, each cell linking to its gallery."""
    import html

    rows = []
    for r in results:
        metrics = " ".join(f"{label} {r[k]:.3f}" for k, label in METRICS if k in r)
        link = f'<a href="{html.escape(r["gallery"])}">gallery</a>' if "gallery" in r else ""
        rows.append(f"<tr><td>{html.escape(r['corpus'])}</td><td>{html.escape(r['method'])}</td><td>{html.escape(r['generator'])}</td>"
                    f"<td>{metrics}</td><td>{r['train_s']:.0f} s</td><td>{link}</td></tr>")
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>amortized3d bench</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:24px}td,th{padding:4px 12px;border-bottom:1px solid #ddd}</style></head>"
            "<body><h1>amortized3d bench</h1><table><tr><th>corpus</th><th>method</th><th>generator</th><th>metrics</th>"
            f"<th>training</th><th></th></tr>{''.join(rows)}</table></body></html>\n")
