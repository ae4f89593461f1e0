"""`amortized3d bench MATRIX.yaml`: train and evaluate every method x generator x corpus cell, then tabulate.

A matrix file (see benchmarks/matrices/):

    corpora: [shapeworld-16]              # corpus names or files
    prompts: null                         # optional: a fixed prompt set (a list or a corpus file): see below
    methods: [asd, sds, csd]              # distill.method values
    generators:                           # generator kind -> config file applied on top of the recipe (or null);
      hyper_ingp: null                    # leave the key out for each recipe's own generator
      conv3d: configs/shapeworld-conv3d.yaml
    config: null                          # a config file for corpora without a recipe
    overrides: [train.steps=1000]         # section.key=value for every cell
    variants:                             # optional: named override lists, each a row of its own (default: one row)
      eta0.1: [distill.eta=0.1]
    seeds: [0, 1]                         # optional: train.seed of each repeat (default: the recipe's seed, once);
                                          # seed 0's cells keep the plain name, so adding seeds reuses them
    eval_prompts: null                    # N: the oracle scores N test prompts, half seen and half held out, with
                                          # only them as candidates (evaluate --balanced N); null: every test prompt
    clip: null                            # a CLIP model (amortized3d evaluate --clip) for CLIP R@1 and Sim
    clip_views: 120
    oracle: auto                          # ShapeWorld oracle R@1 and IoU: auto (ShapeWorld corpora), true, false
    gallery: 0                            # N > 0: a gallery of each cell's first N test prompts, and OUT/index.html

Each cell trains into OUT/runs/<corpus>-<method>-<generator>[-<variant>][-seed<seed>]/ (no suffix for seed 0) and
is evaluated there; a cell with
a results.json is skipped, so an interrupted bench resumes (a cell stopped mid-training continues from its
latest checkpoint). Single-process benches can share one matrix and OUT, e.g. one per GPU or per CPU core: each
claims a cell with a lock (OUT/runs/<cell>.lock) and skips the cells another holds; each writes the table of the
cells it ran or found finished, so a rerun once all have ended writes the complete one. Wall-clock time is measured per
cell; device hours are wall-clock x the number of processes (GPU hours on GPUs, CPU-process
hours otherwise). OUT/results.json holds every cell; OUT/results.md a table per corpus: one row per
method x generator x variant with its metrics (with several seeds: their mean, then each seed's value),
the steps the non-finite guard skipped, the training time per seed and the device hours. With gallery: N, every cell gets a
gallery (amortized3d.evaluation.gallery) and OUT/index.html shows the table with links to them.

A fixed prompt set (``prompts``) makes a prompt-specific bench (ScaleDreamer's Table 2): every method x generator x
variant x seed also runs once per prompt as a per-prompt run (corpus ``prompt:TEXT``, its recipe
configs/prompt-shapeworld.yaml unless ``config`` says otherwise), and every cell, per-prompt or amortized, is evaluated
on exactly these prompts with exactly them as the retrieval candidates. OUT/results.md is then one table: a row per
setting (per prompt, or amortized on a corpus) x method x generator x variant, metrics averaged over the prompts, with
the device hours per prompt (a per-prompt run's own; an amortized run's divided by its number of training prompts).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from amortized3d.data.corpora import PROMPT_PREFIX
from amortized3d.evaluation.clip_eval import DEFAULT_VIEWS

DEFAULTS = {"corpora": [], "prompts": None, "methods": None, "generators": None, "config": None, "overrides": [],
            "variants": None, "seeds": None, "eval_prompts": None, "clip": None, "clip_views": DEFAULT_VIEWS, "oracle": "auto",
            "gallery": 0}


def load_matrix(path: str | Path) -> dict:
    """The matrix file with defaults filled in; unknown keys and missing lists are errors naming the key."""
    from amortized3d.config import ConfigError, load_yaml

    data = load_yaml(path)
    unknown = sorted(set(data) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(DEFAULTS)}")
    matrix = {**DEFAULTS, **data}
    if not isinstance(matrix["methods"], list) or not matrix["methods"]:
        raise ConfigError(f"{path}: methods must be a non-empty list, e.g. methods: [asd]")
    if not isinstance(matrix["corpora"], list) or not (matrix["corpora"] or matrix["prompts"]):
        raise ConfigError(f"{path}: corpora must be a list, e.g. corpora: [shapeworld-16], and not empty unless prompts is given")
    prompts = matrix["prompts"]
    if isinstance(prompts, str):
        from amortized3d.data.corpora import load_file

        corpus = load_file(str(Path(path).parent / prompts) if not Path(prompts).is_absolute() and not Path(prompts).exists() else prompts)
        prompts = matrix["prompts"] = corpus.all_prompts()
    if prompts is not None:
        from amortized3d.data.corpora import check_prompts

        if not isinstance(prompts, list) or len(set(prompts)) < 2 or len(set(prompts)) != len(prompts):
            raise ConfigError(f"{path}: prompts must be a corpus file or a list of 2 or more distinct prompts, e.g. "
                              "prompts: [a large red cube, a large blue cone]")
        matrix["prompts"] = check_prompts(prompts, example="prompts: [a large red cube, a large blue cone]")
    if matrix["eval_prompts"] is not None and prompts is not None:
        raise ConfigError(f"{path}: eval_prompts and prompts both choose the evaluated prompts; keep one")
    if isinstance(matrix["generators"], list):
        matrix["generators"] = {g: None for g in matrix["generators"]}
    if matrix["oracle"] not in ("auto", True, False):
        raise ConfigError(f"{path}: oracle={matrix['oracle']!r}; use auto, true or false")
    variants = matrix["variants"]
    if variants is not None and not (isinstance(variants, dict) and variants
                                     and all(isinstance(v, list) and all(isinstance(o, str) for o in v) for v in variants.values())):
        raise ConfigError(f"{path}: variants must map names to lists of overrides, e.g. variants: {{eta0.2: [distill.eta=0.2]}}")
    seeds = matrix["seeds"]
    if seeds is not None and not (isinstance(seeds, list) and seeds and all(type(x) is int and x >= 0 for x in seeds)
                                  and len(set(seeds)) == len(seeds)):
        raise ConfigError(f"{path}: seeds={seeds!r}; use a list of distinct non-negative integers, e.g. seeds: [0, 1]")
    n = matrix["eval_prompts"]
    if n is not None and not (type(n) is int and n >= 2):
        raise ConfigError(f"{path}: eval_prompts={n!r}; use an integer of 2 or more (or null for every test prompt)")
    return matrix


def cell_name(corpus: str, method: str, generator: str, variant: str | None = None, seed: int | None = None) -> str:
    """The cell's folder name: corpus (a file's stem; a per-prompt corpus prompt:TEXT as prompt-<slug of TEXT>), method,
    generator, then the variant and the seed (none for seed 0)."""
    from amortized3d.data.corpora import single_prompt
    from amortized3d.inference.export import safe_output_names

    prompt = single_prompt(corpus)
    if prompt is not None:
        corpus = "prompt-" + safe_output_names([prompt], 48)[0]
    name = f"{Path(corpus).stem if Path(corpus).suffix else corpus}-{method}-{generator}"
    return name + (f"-{variant}" if variant else "") + (f"-seed{seed}" if seed else "")  # seed 0: the plain name


def cell_config(matrix: dict, corpus: str, method: str, generator: str | None, generator_config: str | None,
                variant: str | None = None, seed: int | None = None):
    """The cell's config: the corpus recipe (or the matrix's config file) <- the generator's config file <- the method,
    the generator kind (none given: the recipe's), the matrix's overrides, the variant's and the seed."""
    from amortized3d.config import load_config

    overrides = [f"distill.method={method}", *([f"generator.kind={generator}"] if generator else []), *matrix["overrides"],
                 *(matrix["variants"][variant] if variant else []), *([f"train.seed={seed}"] if seed is not None else [])]
    return load_config(corpus, generator_config or matrix["config"], overrides)


def run_cell(matrix: dict, corpus: str, method: str, generator: str | None, generator_config: str | None, out: Path, run: Path,
             variant: str | None = None, seed: int | None = None) -> dict:
    """Train (or continue) and evaluate one cell in its folder ``run`` (every rank calls it); -> its results (rank 0
    writes them to RUN/results.json)."""
    from accelerate import Accelerator

    from amortized3d.config import config_to_dict
    from amortized3d.data.corpora import load_corpus, single_prompt
    from amortized3d.evaluation.clip_eval import evaluate_clip
    from amortized3d.evaluation.oracle import eval_every_hook, evaluate_run
    from amortized3d.evaluation.plots import read_metrics
    from amortized3d.run_dir import RunDir
    from amortized3d.training.checkpoint import latest_checkpoint
    from amortized3d.training.train import train

    cfg = cell_config(matrix, corpus, method, generator, generator_config, variant, seed)
    start = time.perf_counter()
    train(cfg, run, resume=latest_checkpoint(run) is not None, hooks=eval_every_hook(cfg))
    train_s = time.perf_counter() - start
    accelerator = Accelerator()  # after train's, which set up the process group and precision
    world = accelerator.num_processes
    last = read_metrics(RunDir(run).metrics)[-1:] if accelerator.is_main_process else []
    result = {"corpus": corpus, "method": method, "generator": cfg.generator.kind, "variant": variant, "seed": cfg.train.seed,
              "steps": cfg.train.steps, "train_s": round(train_s, 1), "device": accelerator.device.type, "processes": world,
              "device_hours": round(train_s * world / 3600, 4), "skipped_steps": last[0].get("skipped_steps") if last else None,
              "config": config_to_dict(cfg)}
    per_prompt = single_prompt(corpus) is not None
    # the prompt-specific bench: a per-prompt run scores its own prompt among the fixed set, an amortized one the whole set
    chosen = {} if matrix["prompts"] is None else {"candidates" if per_prompt else "prompts": matrix["prompts"]}
    if accelerator.is_main_process:
        result["train_prompts"] = len(load_corpus(cfg.corpus.name, cfg.corpus.dir).train)
    oracle = matrix["oracle"] is True or (matrix["oracle"] == "auto" and (str(cfg.corpus.name).startswith("shapeworld") or per_prompt))
    if oracle and accelerator.is_main_process:
        summary = evaluate_run(run, balanced=matrix["eval_prompts"], **chosen)["summary"]
        result.update({"oracle_r_at_1": summary["r_at_1"], "oracle_similarity": summary["similarity"], "iou": summary["iou"],
                       "eval_prompts": summary["n_prompts"]})
        if not per_prompt:  # a per-prompt run has seen its one prompt
            result.update({"oracle_r_at_1_seen": summary["r_at_1_seen"], "oracle_r_at_1_unseen": summary["r_at_1_unseen"]})
    if matrix["clip"]:
        summary = evaluate_clip(run, matrix["clip"], n_views=matrix["clip_views"], progress=False, **chosen)
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


METRICS = (("clip_r_at_1", "R@1"), ("clip_similarity", "Sim"), ("oracle_r_at_1", "oracle R@1"), ("oracle_r_at_1_seen", "seen"),
           ("oracle_r_at_1_unseen", "unseen"), ("oracle_similarity", "oracle Sim"), ("iou", "IoU"))


def _values(cells: list[dict], key: str) -> str:
    """The metric over the seeds of a row: one value, or their mean followed by each seed's value."""
    values = [r[key] for r in cells if r.get(key) is not None]
    if not values:
        return ""
    mean = f"{sum(values) / len(values):.3f}"
    return mean if len(values) == 1 else f"{mean} ({', '.join(f'{v:.3f}' for v in values)})"


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s"


def table(results: list[dict]) -> str:
    """Markdown, a table per corpus: a row per method x generator (x variant) with its metrics over the seeds, the
    steps the guard skipped, the training time per seed and the device hours of all seeds."""
    sections = []
    for corpus in dict.fromkeys(r["corpus"] for r in results):
        rows = [r for r in results if r["corpus"] == corpus]
        present = [(k, label) for k, label in METRICS if any(r.get(k) is not None for r in rows)]
        variants = any(r.get("variant") for r in rows)
        header = ["method", "generator", *(["variant"] if variants else []), *[label for _, label in present],
                  "skipped", "time", f"{rows[0]['device'].upper()} h"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key in dict.fromkeys((r["method"], r["generator"], r.get("variant")) for r in rows):
            cells = [r for r in rows if (r["method"], r["generator"], r.get("variant")) == key]
            method, generator, variant = key
            skipped = [r["skipped_steps"] for r in cells if r.get("skipped_steps") is not None]
            row = [method.upper() if len(method) <= 4 else method, generator, *([variant or ""] if variants else []),
                   *[_values(cells, k) for k, _ in present], ", ".join(str(x) for x in skipped),
                   _duration(sum(r["train_s"] for r in cells) / len(cells)), f"{sum(r['device_hours'] for r in cells):.3f}"]
            lines.append("| " + " | ".join(row) + " |")
        n_eval = {r.get("eval_prompts") for r in rows} - {None}
        seeds = sorted({r["seed"] for r in rows if r.get("seed") is not None})
        steps = {r.get("steps") for r in rows} - {None}
        about = "; ".join(a for a in [f"{steps.pop():,} steps" if len(steps) == 1 else "",
                                      f"{n_eval.pop()} test prompts evaluated" if len(n_eval) == 1 else "",
                                      f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}" if seeds else ""] if a)
        sections.append(f"**{corpus}**{f' ({about})' if about else ''}\n\n" + "\n".join(lines) + "\n")
    return "\n".join(sections)


def prompt_table(results: list[dict], prompts: list[str]) -> str:
    """Markdown for a prompt-specific bench: one table, a row per setting (per prompt, or amortized on a corpus) x method
    x generator (x variant); each metric averaged over the fixed prompts (and the seeds), the training time of one
    run, and the device hours per prompt (a per-prompt run's own; an amortized run's over its training prompts)."""
    from amortized3d.data.corpora import single_prompt

    def setting(r: dict) -> str:
        return "per prompt" if single_prompt(r["corpus"]) is not None else f"amortized ({r['corpus']})"

    present = [(k, label) for k, label in METRICS if any(r.get(k) is not None for r in results)]
    variants = any(r.get("variant") for r in results)
    unit = f"{results[0]['device'].upper()} h" if results else "h"
    header = ["setting", "method", "generator", *(["variant"] if variants else []), *[label for _, label in present],
              "prompts", "training time (one run)", f"{unit} per prompt"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = dict.fromkeys((setting(r), r["method"], r["generator"], r.get("variant")) for r in results)
    for key in sorted(keys, key=lambda k: k[0] != "per prompt"):  # per-prompt rows first, then the amortized ones
        cells = [r for r in results if (setting(r), r["method"], r["generator"], r.get("variant")) == key]
        where, method, generator, variant = key
        values = {}
        for k, _ in present:  # mean over the prompts: a per-prompt cell holds one prompt, an amortized one the mean of all
            xs = [(r[k], r.get("eval_prompts") or 1) for r in cells if r.get(k) is not None]
            values[k] = f"{sum(x * n for x, n in xs) / sum(n for _, n in xs):.3f}" if xs else ""
        if where == "per prompt":
            n_prompts = f"{len({r['corpus'] for r in cells})}/{len(prompts)}"
            per_prompt_h = sum(r["device_hours"] for r in cells) / len(cells)
        else:
            n_prompts = f"{cells[0].get('eval_prompts', '')}/{len(prompts)}"
            per_prompt_h = sum(r["device_hours"] / (r.get("train_prompts") or 1) for r in cells) / len(cells)
        row = [where, method.upper() if len(method) <= 4 else method, generator, *([variant or ""] if variants else []),
               *[values[k] for k, _ in present], n_prompts, _duration(sum(r["train_s"] for r in cells) / len(cells)),
               f"{per_prompt_h:.4f}"]
        lines.append("| " + " | ".join(row) + " |")
    steps = sorted({r.get("steps") for r in results} - {None})
    about = (f"{len(prompts)} fixed prompts, each retrieved among all {len(prompts)}"
             + (f"; {', '.join(f'{s:,}' for s in steps)} steps" if steps else ""))
    return f"**Prompt-specific bench** ({about})\n\n" + "\n".join(lines) + "\n"


def claim_cell(out: Path, name: str):
    """An exclusive lock on OUT/runs/<name>.lock (fcntl), held until the returned file is closed, or False when another
    process holds it. The operating system releases it when its process ends, so a killed bench leaves no stale lock."""
    import fcntl

    folder = out / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / f"{name}.lock", "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return False
    return handle


def run_bench(matrix_file: str | Path, out: str | Path) -> list[dict]:
    """Every cell of the matrix in order (corpus, generator, variant, method, seed), skipping finished cells and cells
    another bench process holds; writes OUT/results.json and OUT/results.md from every finished cell (read back from
    their RUN/results.json at the end, so cells that other processes finished meanwhile are in the table)."""
    from accelerate import Accelerator

    matrix = load_matrix(matrix_file)
    out = Path(out)
    alone = Accelerator().num_processes == 1
    runs, elsewhere = [], []
    corpora = [*matrix["corpora"], *(f"{PROMPT_PREFIX}{p}" for p in matrix["prompts"] or [])]
    for corpus in corpora:
        for generator, generator_config in (matrix["generators"] or {None: None}).items():
            for variant in matrix["variants"] or [None]:
                for method in matrix["methods"]:
                    for seed in matrix["seeds"] or [None]:
                        kind = generator or cell_config(matrix, corpus, method, None, None, variant, seed).generator.kind
                        name = cell_name(corpus, method, kind, variant, seed)
                        run = out / "runs" / name
                        runs.append(run)
                        if (run / "results.json").is_file():  # finished
                            continue
                        claim = claim_cell(out, name) if alone else None
                        if claim is False:
                            print(f"{name}: another bench process is running this cell; skipped here", flush=True)
                            elsewhere.append(run)
                            continue
                        try:
                            run_cell(matrix, corpus, method, generator, generator_config, out, run, variant, seed)
                        finally:
                            if claim:
                                claim.close()
    Accelerator().wait_for_everyone()  # the main process has written the last cell's results.json
    # every finished cell, in the matrix's order, read back at the end: cells other bench processes finished meanwhile too
    results = [json.loads((run / "results.json").read_text()) for run in runs if (run / "results.json").is_file()]
    unfinished = [run.name for run in elsewhere if not (run / "results.json").is_file()]
    if unfinished:
        print(f"{len(unfinished)} cell(s) still running in other bench processes ({', '.join(unfinished)}): the table leaves them "
              "out; run the same command again once they finish to write the whole table", flush=True)
    if Accelerator().is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"matrix": matrix, "cells": [{k: v for k, v in r.items() if k != "config"} for r in results]}, indent=1))
        (out / "results.md").write_text(table(results) if matrix["prompts"] is None else prompt_table(results, matrix["prompts"]))
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
        method = r["method"] + (f" ({r['variant']})" if r.get("variant") else "") + (f", seed {r['seed']}" if r.get("seed") is not None else "")
        rows.append(f"<tr><td>{html.escape(r['corpus'])}</td><td>{html.escape(method)}</td><td>{html.escape(r['generator'])}</td>"
                    f"<td>{metrics}</td><td>{r['train_s']:.0f} s</td><td>{link}</td></tr>")
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>amortized3d bench</title>"
            "<style>body{font-family:system-ui,sans-serif;margin:24px}td,th{padding:4px 12px;border-bottom:1px solid #ddd}</style></head>"
            "<body><h1>amortized3d bench</h1><table><tr><th>corpus</th><th>method</th><th>generator</th><th>metrics</th>"
            f"<th>training</th><th></th></tr>{''.join(rows)}</table></body></html>\n")
