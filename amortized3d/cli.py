"""Command line: amortized3d train | generate | evaluate | corpus | describe, and a standalone `generate`.

    amortized3d train --corpus shapeworld-16 [section.key=value ...]
    amortized3d generate "a red cube" --checkpoint RUN_DIR
    amortized3d evaluate --checkpoint RUN_DIR [--clip MODEL]
    amortized3d corpus list | show NAME | info NAME | export NAME OUT.json | build cp100k --captions CSV
    amortized3d store build | info --corpus NAME [--config FILE] [section.key=value ...]
    amortized3d plot RUN_DIR | RUN_A RUN_B ... --out DIR
    amortized3d noise-error RUN_DIR
    amortized3d toy2d --method asd | all
    amortized3d gallery RUN_DIR
    amortized3d bench MATRIX.yaml --out DIR
    amortized3d describe CONFIG.yaml | --corpus NAME [section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from datetime import datetime
from pathlib import Path


DEBUG_ENV = "AMORTIZED3D_DEBUG"


class Parser(argparse.ArgumentParser):
    """argparse with a short usage error: one line naming the argument and the problem, and where the usage is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def int_in(lo: int, hi: int | None = None):
    """An argparse type: an integer in [lo, hi] (hi None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            allowed = f"from {lo} to {hi}" if hi is not None else f"{lo} or more"
            raise argparse.ArgumentTypeError(f"{value} is out of range: use an integer {allowed}")
        return value
    return parse


def float_in(lo: float, hi: float):
    """An argparse type: a finite number in [lo, hi]."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and lo <= value <= hi):
            raise argparse.ArgumentTypeError(f"{text} is out of range: use a number from {lo:g} to {hi:g}")
        return value
    return parse


def _add_debug_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=f"on an error, print Python's traceback too (for developers; or set {DEBUG_ENV}=1)")


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default=None, help="named corpus (see `amortized3d corpus list`); selects the recipe")
    parser.add_argument("--prompt", default=None, metavar="TEXT",
                        help="a per-prompt run: optimize one asset for TEXT (corpus prompt:TEXT; recipe configs/prompt-shapeworld.yaml, "
                             "or configs/prompt-nerf.yaml with --prior, or the --config file alone)")
    parser.add_argument("--prompts", default=None, metavar="FILE",
                        help="independent per-prompt runs, one for each distinct prompt of FILE (.txt, .json (all its splits) or "
                             ".csv), each in its own folder under --output")
    parser.add_argument("--representation", default="field", choices=("field", "gaussians"),
                        help="what a per-prompt run optimizes: an Instant-NGP field (default) or 3D Gaussians (recipe "
                             "configs/prompt-gaussians.yaml, or configs/gaussians-sd.yaml with --prior)")
    parser.add_argument("--init-from", default=None, metavar="RUN_DIR",
                        help="--representation gaussians: start from the asset another run makes for the prompt (its mesh's "
                             "surface and colors), to refine a generated asset")
    parser.add_argument("--init-prompt", default=None, metavar="TEXT",
                        help="with --init-from: the prompt whose asset starts the Gaussians (default: --prompt)")
    parser.add_argument("--config", default=None, help="YAML file applied on top of the corpus recipe")
    parser.add_argument("--corpus-dir", default=None, help="folder with reference corpus JSON files")
    parser.add_argument("--prior", default=None, metavar="MODEL",
                        help="diffusers hub id or local folder (MVDream: also its checkpoint file); sets prior.model=MODEL, "
                             "text.encoder=prior and, unless the recipe's prior is already a pretrained one (deepfloyd_if, "
                             "mvdream), prior.kind=stable_diffusion (add prior.kind=deepfloyd_if for DeepFloyd IF)")
    parser.add_argument("--output", default=None, help="run folder (default: runs/<corpus>-<method>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=200 distill.method=sds")


def _resolve_config(args, prompt: str | None = None):
    """The experiment config of the train arguments; ``prompt``: the one prompt of a per-prompt run (default --prompt)."""
    from amortized3d.config import CONFIG_DIR, load_config
    from amortized3d.data.corpora import PROMPT_PREFIX

    _check_train_sources(args)
    if prompt is None:
        _one_prompt_only(args)
    prompt = prompt or args.prompt
    overrides = list(args.overrides)
    if args.corpus_dir:
        overrides.append(f"corpus.dir={args.corpus_dir}")
    gaussians = args.representation == "gaussians"
    if prompt is None:
        if gaussians:
            raise UsageError("--representation gaussians optimizes the Gaussians of one prompt; pass --prompt TEXT or --prompts FILE "
                             "instead of --corpus")
        return load_config(args.corpus, args.config, _prior_overrides(args, args.corpus, args.config, overrides))
    recipes = {(False, False): None, (False, True): "prompt-nerf.yaml", (True, False): "prompt-gaussians.yaml",
               (True, True): "gaussians-sd.yaml"}  # (gaussians, a pretrained prior)
    recipe = recipes[gaussians, bool(args.prior)]
    config = args.config or (str(CONFIG_DIR / recipe) if recipe else None)
    overrides = _prior_overrides(args, PROMPT_PREFIX + prompt, config, overrides)
    if gaussians and args.config:
        overrides = ["generator.kind=gaussians", *overrides]
    if args.init_from or args.init_prompt:
        if not gaussians or not args.init_from:
            raise UsageError("--init-from RUN_DIR (with --init-prompt TEXT) starts 3D Gaussians from another run's asset: "
                             "add --representation gaussians" + ("" if args.init_from else " and --init-from RUN_DIR"))
        overrides = [*overrides, f"generator.init_from={json.dumps(args.init_from)}",  # quoted: read as a YAML string
                     *([f"generator.init_prompt={json.dumps(args.init_prompt)}"] if args.init_prompt else [])]
    return load_config(PROMPT_PREFIX + prompt, config, overrides)


def _prior_overrides(args, corpus: str, config: str | None, overrides: list[str]) -> list[str]:
    """--prior MODEL: prior.model=MODEL and text.encoder=prior before the other overrides, and prior.kind=stable_diffusion
    unless the recipe, config file or overrides already name a pretrained prior's kind (deepfloyd_if, mvdream)."""
    if not args.prior:
        return overrides
    from amortized3d.config import merged_layers
    from amortized3d.priors.diffusers_prior import SUBFOLDERS

    keep = merged_layers(corpus, config, overrides)[0].get("prior", {}).get("kind", "analytic") in SUBFOLDERS  # a pretrained kind
    return [*([] if keep else ["prior.kind=stable_diffusion"]), f"prior.model={args.prior}", "text.encoder=prior", *overrides]


def _check_train_sources(args) -> None:
    given = [flag for flag, value in (("--corpus", args.corpus), ("--prompt", args.prompt), ("--prompts", args.prompts)) if value]
    if len(given) > 1:
        raise UsageError(f"{' and '.join(given)} both say what to train on; give one: --corpus NAME (a generator of many prompts), "
                         "--prompt TEXT (one asset) or --prompts FILE (one asset per prompt)")


def _one_prompt_only(args) -> None:
    if args.prompts:
        raise UsageError("--prompts FILE starts one training run per prompt (`amortized3d train --prompts FILE`); here, name one "
                         "prompt with --prompt TEXT")


def run_prompt_batch(args) -> int:
    """`train --prompts FILE`: one per-prompt run per prompt, in OUTPUT/<name of the prompt>; with --resume, finished runs
    are kept and unfinished ones continue."""
    from amortized3d.data.corpora import load_file
    from amortized3d.evaluation.oracle import eval_every_hook
    from amortized3d.inference.export import safe_output_names
    from amortized3d.training.checkpoint import latest_checkpoint, step_of
    from amortized3d.training.train import train

    corpus = load_file(args.prompts)
    prompts = corpus.all_prompts()
    root = Path(args.output or f"runs/prompts-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    _folder_argument(str(root), "--output")
    configs = [_resolve_config(args, prompt) for prompt in prompts]  # every prompt's config is checked before the first run
    for i, (prompt, name, cfg) in enumerate(zip(prompts, safe_output_names(prompts), configs)):
        run_dir = root / name
        last = latest_checkpoint(run_dir)
        if args.resume and last is not None and step_of(last) >= cfg.train.steps:
            print(f"[{i + 1}/{len(prompts)}] {prompt!r}: finished in {run_dir}")
            continue
        print(f"[{i + 1}/{len(prompts)}] {prompt!r} -> {run_dir}", flush=True)
        train(cfg, run_dir, resume=args.resume and last is not None, hooks=eval_every_hook(cfg))
    print(f"runs folder: {root}")
    return 0


def check_pretrained_weights(cfg) -> None:
    """Fail in seconds, before the trainer starts, when the weights of a prior (either phase's) are not available."""
    from amortized3d.priors.diffusers_prior import SUBFOLDERS, TEXT_SUBFOLDERS
    from amortized3d.priors.pretrained import resolve_model_dir

    if not cfg.prior.analytic or cfg.text.encoder == "prior":
        resolve_model_dir(cfg.prior.model, SUBFOLDERS.get(cfg.prior.kind, TEXT_SUBFOLDERS))
    second = cfg.phase2_prior() if cfg.phase2.start > 0 else None
    if second is not None and not second.analytic:
        resolve_model_dir(second.model, SUBFOLDERS[second.kind])


def run_train(args) -> int:
    if args.prompts:
        return run_prompt_batch(args)
    cfg = _resolve_config(args)
    check_pretrained_weights(cfg)
    from amortized3d.evaluation.oracle import eval_every_hook
    from amortized3d.inference.export import safe_output_names
    from amortized3d.training.train import train

    output = args.output or cfg.train.output_dir
    if output is None:
        if args.resume:
            raise UsageError("--resume needs --output RUN_DIR naming the run to continue")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"prompt-{safe_output_names([args.prompt], 48)[0]}" if args.prompt else cfg.corpus.name
        output = f"runs/{name}-{cfg.distill.method}-{stamp}"
    run_dir = train(cfg, output, resume=args.resume, hooks=eval_every_hook(cfg))
    print(f"run folder: {run_dir}")
    return 0


def _folder_argument(path: str | None, flag: str) -> None:
    """A folder argument may name a missing folder (it is created) but not a file."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{flag} {path!r} is a file; pass a folder (it is created if missing)")


def run_generate(args) -> int:
    from amortized3d.inference.generate import generate

    _folder_argument(args.out, "--out")
    results = generate(args.prompts, args.checkpoint, args.out, resolution=args.mesh_resolution,
                       video_format=args.video_format, frames=args.frames, image_size=args.image_size, seed=args.seed)
    for r in results:
        print(json.dumps(r))
    return 0


def _prompt_file(path: str | None) -> list[str] | None:
    """Every prompt of a corpus file (JSON, .txt or .csv; all splits, each once, in order), or None without a file."""
    if path is None:
        return None
    from amortized3d.data.corpora import load_file

    return load_file(path).all_prompts()


def run_evaluate(args) -> int:
    if args.balanced and (args.clip or args.limit):
        raise UsageError(f"--balanced {args.balanced} is an oracle option and replaces --limit; drop "
                         f"{'--clip' if args.clip else '--limit'} or --balanced")
    if args.prompts and (args.limit or args.balanced):
        raise UsageError(f"--prompts {args.prompts} chooses the evaluated prompts; drop {'--limit' if args.limit else '--balanced'}")
    prompts, candidates = _prompt_file(args.prompts), _prompt_file(args.candidates)
    if args.clip:
        _folder_argument(args.out, "--out")
        from amortized3d.evaluation.clip_eval import evaluate_clip

        summary = evaluate_clip(args.checkpoint, args.clip, split=args.split, prompts=prompts, candidates=candidates,
                                n_views=args.views, elevation=args.elevation, resolution=args.resolution, out=args.out,
                                limit=args.limit, save_views=args.save_views)
        if summary is None:  # not the main process
            return 0
        if args.gallery:
            from amortized3d.evaluation.gallery import build_gallery, clip_scores

            out = Path(summary["output"])
            prompts = list(clip_scores(out / "scores.csv"))[: args.gallery]  # in evaluation order
            # lenient: without the 3D viewer (or with a bad AMORTIZED3D_MODEL_VIEWER) the page shows turntables, with a note
            summary["gallery"] = str(build_gallery(args.checkpoint, prompts, out=out / "gallery", score_files=[out / "scores.csv"],
                                                   lenient=True))
        print(json.dumps(summary, indent=1))
        return 0
    from amortized3d.evaluation.oracle import evaluate_run

    if args.out is not None and (Path(args.out).is_dir() or args.out.endswith(("/", os.sep))):
        raise UsageError(f"--out {args.out!r} is a folder; the oracle writes one JSON report: pass a file path such as "
                         f"{str(Path(args.out) / 'eval_test.json')!r}")
    report = evaluate_run(args.checkpoint, split=args.split, out=args.out, limit=args.limit, balanced=args.balanced,
                          prompts=prompts, candidates=candidates)
    print(json.dumps(report["summary"], indent=1))
    return 0


def run_corpus(args) -> int:
    from amortized3d.data.corpora import catalog, load_corpus

    if args.action == "list":
        for name, entry in catalog().items():
            print(f"{name:18s} {entry['source']:10s} {entry.get('about', '')}")
        return 0
    if not args.name:
        raise UsageError(f"`amortized3d corpus {args.action}` needs a corpus NAME; pass one, e.g. `amortized3d corpus {args.action} shapeworld-16`")
    if args.action == "build":
        if args.name != "cp100k" or not args.captions:
            raise UsageError("only cp100k is built from a file; use: amortized3d corpus build cp100k --captions CAP3D_CAPTIONS.csv [--corpus-dir DIR]")
        from amortized3d.data.cp100k import build_cp100k

        kwargs = {k: v for k, v in (("train_size", args.train_size), ("test_size", args.test_size)) if v is not None}
        print(json.dumps(build_cp100k(args.captions, args.corpus_dir, **kwargs), indent=1))
        return 0
    corpus = load_corpus(args.name, args.corpus_dir)
    if args.action == "info":
        from amortized3d.data.corpora import corpus_info

        from amortized3d.text.clip_vocabulary import clip_token_counter

        count = None
        try:
            count = clip_token_counter()
        except FileNotFoundError as err:
            print(f"(no CLIP token counts: {err})", file=sys.stderr)
        print(json.dumps(corpus_info(corpus, count), indent=1, ensure_ascii=False))
        return 0
    if args.action == "show":
        for split in ("train", "val", "test"):
            prompts = corpus.split(split)
            print(f"{split}: {len(prompts)} prompts")
            for p in prompts[: args.n]:
                print(f"  {p}")
        return 0
    if not args.out:
        raise UsageError("`amortized3d corpus export NAME OUT.json` needs an output path; pass one, e.g. prompts.json")
    from amortized3d.data.corpora import export_corpus

    print(f"wrote {export_corpus(corpus, args.out)}")
    return 0


def run_store(args) -> int:
    """Build (or check) the embedding store a training run with these arguments reads; under `accelerate launch`
    the ranks split the build. build checks the sha256 of every finished shard (each rank its own) and rebuilds the
    damaged ones; --rebuild deletes the store first (rank 0, then a barrier) and builds it anew. info checks every
    shard's size and sha256 against the manifest."""
    from accelerate import Accelerator

    from amortized3d.builders import store_report

    cfg = _resolve_config(args)
    state = Accelerator()  # as in training: the process group from `accelerate launch` (CPU processes included)
    report = store_report(cfg, args.action, rebuild=args.action == "build" and args.rebuild, rank=state.process_index, world=state.num_processes,
                          barrier=state.wait_for_everyone, progress=state.is_local_main_process, device=state.device)
    if state.is_main_process:
        print(json.dumps(report, indent=1))
    return 0


def run_bench(args) -> int:
    from amortized3d.evaluation.bench import run_bench as bench

    bench(args.matrix, args.out)
    results = Path(args.out) / "results.md"
    if results.is_file():
        print(results.read_text())
    return 0


def run_gallery(args) -> int:
    from amortized3d.evaluation.gallery import build_gallery

    page = build_gallery(args.run_dir, args.prompts or None, out=args.out, limit=args.limit, split=args.split)
    print(f"{page}\nview it with: python -m http.server --directory {page.parent} 8000   (then open http://localhost:8000)")
    return 0


def run_plot(args) -> int:
    from amortized3d.evaluation.plots import plot_compare, plot_run

    if len(args.run_dir) > 1 and args.out is None:
        raise UsageError(f"comparing {len(args.run_dir)} runs needs --out DIR, the folder for the comparison panels")
    paths = plot_run(args.run_dir[0], args.out) if len(args.run_dir) == 1 else plot_compare(args.run_dir, args.out)
    for path in paths:
        print(path)
    return 0


def run_noise_error(args) -> int:
    from amortized3d.evaluation.noise_error import noise_error

    report = noise_error(args.run_dir, n_prompts=args.prompts, n_views=args.views, n_timesteps=args.timesteps, eta=args.eta,
                         seed=args.seed, out=args.out)
    from amortized3d.run_dir import RunDir

    folder = Path(args.out) if args.out else RunDir(args.run_dir).plots
    print(json.dumps({k: report[k] for k in ("run", "method", "prior", "step", "eta", "t_min") if k in report}
                     | ({"finetuned_below_pretrained": report["finetuned_below_pretrained"]} if "e_finetuned" in report else {})
                     | {"json": str(folder / "noise_error.json"), "png": str(folder / "noise_error.png")}, indent=1))
    return 0


def run_toy2d(args) -> int:
    from amortized3d.evaluation.toy2d import toy2d

    for s in toy2d(args.method, asd_shift=args.asd_shift, eta=args.eta, prompt=args.prompt, particles=args.particles,
                   steps=args.steps, lr=args.lr, seed=args.seed, out=args.out):
        print(f"{s['name']:<26} PSNR to the nearest mode {s['mean_psnr']:.2f} dB, {s['distinct_modes']} mode(s), "
              f"final mean ||grad|| {sum(s['grad_norm'][-50:]) / len(s['grad_norm'][-50:]):.1f}, {s['seconds']} s")
    print(f"written to {args.out}")
    return 0


def run_describe(args) -> int:
    from amortized3d.builders import build_generator, describe_generator
    from amortized3d.config import config_to_dict

    # `describe CONFIG`: a bare YAML path or corpus name among the arguments selects it.
    for item in [o for o in args.overrides if "=" not in o]:
        args.overrides.remove(item)
        if item.endswith((".yaml", ".yml")):
            args.config = item
        else:
            args.corpus = item
    cfg = _resolve_config(args)
    import yaml

    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    print(describe_generator(build_generator(cfg), cfg))
    return 0


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompts", nargs="+", help="one or more text prompts")
    parser.add_argument("--checkpoint", required=True, help="run folder written by train")
    parser.add_argument("--out", default="outputs", help="output folder")
    parser.add_argument("--mesh-resolution", type=int_in(8, 1024), default=128, help="marching-cubes grid size (8 to 1024)")
    parser.add_argument("--video-format", choices=("mp4", "gif"), default="mp4")
    parser.add_argument("--frames", type=int_in(1, 3600), default=36, help="turntable frames (1 to 3600)")
    parser.add_argument("--image-size", type=int_in(8, 4096), default=128, help="turntable and contact-sheet image size (8 to 4096)")
    parser.add_argument("--seed", type=int_in(0, 2**63 - 1), default=None,
                        help="latent z for generators that take one (conv3d); default: its fixed latent")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="amortized3d", description="Prompt-amortized text-to-3D by score distillation")
    _add_debug_argument(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a generator on a corpus")
    _add_train_arguments(p)
    p.set_defaults(func=run_train)
    p = sub.add_parser("generate", help="prompts -> meshes, turntables and contact sheets")
    _add_generate_arguments(p)
    p.set_defaults(func=run_generate)
    p = sub.add_parser("evaluate", help="CLIP R@1 and similarity (--clip MODEL), or the oracle's R@1, similarity and 3D IoU on ShapeWorld")
    p.add_argument("--checkpoint", required=True, help="run folder written by train")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--clip", default=None, metavar="MODEL",
                   help="CLIP protocol with this model: a transformers hub id or folder (the reference: openai/clip-vit-large-patch14) "
                        "or open_clip:ARCH@TAG (e.g. open_clip:ViT-L-14@openai); without it, the ShapeWorld oracle")
    p.add_argument("--views", type=int_in(1, 3600), default=120, help="CLIP: orbit views per prompt")
    p.add_argument("--elevation", type=float_in(-90, 90), default=15.0, help="CLIP: orbit elevation in degrees")
    p.add_argument("--resolution", type=int_in(8, 4096), default=None, help="CLIP: render size (default: the CLIP input size, e.g. 224)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="evaluate these prompts (a corpus file: JSON, .txt or .csv) instead of --split; they are the candidates "
                        "unless --candidates is given")
    p.add_argument("--candidates", default=None, metavar="FILE",
                   help="candidate prompts to retrieve among (a corpus file), e.g. a fixed prompt set for a per-prompt run; "
                        "default: the evaluated split")
    p.add_argument("--save-views", action="store_true", help="CLIP: also write each prompt's views as a PNG sheet")
    p.add_argument("--gallery", type=int_in(0), default=12, metavar="N",
                   help="CLIP: an HTML gallery of the first N evaluated prompts in OUT/gallery (0: none); its interactive "
                        "3D view needs `npm ci` (Node.js 18+), without it the page shows the turntables")
    p.add_argument("--out", default=None, help="report path (oracle: RUN_DIR/eval_<split>.json; CLIP: folder RUN_DIR/eval_clip_<split>)")
    p.add_argument("--limit", type=int_in(1), default=None, help="evaluate only the first N prompts (1 or more)")
    p.add_argument("--balanced", type=int_in(2), default=None, metavar="N",
                   help="oracle: evaluate N prompts, half seen in training and half held out, with only them as candidates")
    p.set_defaults(func=run_evaluate)
    p = sub.add_parser("corpus", help="list, show or export prompt corpora")
    p.add_argument("action", choices=("list", "show", "info", "export", "build"))
    p.add_argument("name", nargs="?")
    p.add_argument("out", nargs="?")
    p.add_argument("--corpus-dir", default=None)
    p.add_argument("-n", type=int_in(0), default=10, help="prompts to show per split")
    p.add_argument("--captions", default=None, help="build cp100k: Cap3D's caption CSV (uid, caption)")
    p.add_argument("--train-size", type=int_in(1), default=None, help="build cp100k: train prompts (default 100000)")
    p.add_argument("--test-size", type=int_in(1), default=None, help="build cp100k: test prompts (default 1000)")
    p.set_defaults(func=run_corpus)
    p = sub.add_parser("store", help="build or inspect the text-embedding store that training reads")
    store_sub = p.add_subparsers(dest="action", required=True)
    for action, about in (("build", "encode the train split into the store training with these arguments reads"),
                          ("info", "check that store and print its manifest")):
        q = store_sub.add_parser(action, help=about)
        _add_train_arguments(q)
        if action == "build":
            q.add_argument("--rebuild", action="store_true",
                           help="delete the store's manifest and shards first and build it anew (for a damaged store)")
        q.set_defaults(func=run_store)
    p = sub.add_parser("bench", help="train and evaluate a method x generator x corpus matrix; Markdown and JSON table")
    p.add_argument("matrix", help="matrix YAML file (see benchmarks/matrices/)")
    p.add_argument("--out", required=True, help="folder for the runs and results.md / results.json")
    p.set_defaults(func=run_bench)
    p = sub.add_parser("gallery", help="static HTML page of a run: turntables, interactive 3D meshes and per-prompt scores")
    p.add_argument("run_dir", help="run folder written by train")
    p.add_argument("--prompts", nargs="+", default=None, help="prompts to show (default: the first --limit of --split)")
    p.add_argument("--limit", type=int_in(1), default=12)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", default=None, help="gallery folder (default RUN_DIR/gallery)")
    p.set_defaults(func=run_gallery)
    p = sub.add_parser("plot", help="training curves (losses, gradient norm, schedule, throughput, evaluations) as PNG files; "
                                    "with several runs, their gradient norms and losses side by side")
    p.add_argument("run_dir", nargs="+", help="run folder(s) written by train")
    p.add_argument("--out", default=None, help="folder for the PNG files (default RUN_DIR/plots; needed with several runs)")
    p.set_defaults(func=run_plot)
    p = sub.add_parser("noise-error", help="the noise-prediction error e(t) of the run's prior on its renders (ScaleDreamer Fig. 2)")
    p.add_argument("run_dir", help="run folder written by train (a VSD run adds its fine-tuned branch's curve)")
    p.add_argument("--prompts", type=int_in(1), default=4, help="the first N test prompts")
    p.add_argument("--views", type=int_in(1, 360), default=4, help="orbit views per prompt at the evaluation camera")
    p.add_argument("--timesteps", type=int_in(2, 1000), default=100, help="timesteps over the run's range")
    p.add_argument("--eta", type=float_in(0, 1), default=None, help="the shifted curve's eta (default: the run's distill.eta)")
    p.add_argument("--seed", type=int_in(0), default=0)
    p.add_argument("--out", default=None, help="folder for noise_error.json and .png (default RUN_DIR/plots)")
    p.set_defaults(func=run_noise_error)
    p = sub.add_parser("toy2d", help="score distillation on images directly with the analytic prior (ScaleDreamer Fig. 3)")
    p.add_argument("--method", required=True, help="a distill.method (asd, sds, csd, vsd, lods-embedding, lods-lora) or all")
    p.add_argument("--asd-shift", default="paper", help="ASD's shift rule: paper, reference, deterministic or fixed")
    p.add_argument("--eta", type=float_in(0, 1), default=0.1, help="ASD's eta")
    p.add_argument("--prompt", default="a cube", help="a ShapeWorld prompt (\"a cube\": 16 modes, any color and size)")
    p.add_argument("--particles", type=int_in(1, 64), default=4)
    p.add_argument("--steps", type=int_in(1, 100000), default=500)
    p.add_argument("--lr", type=float_in(1e-6, 10), default=0.01, help="Adam's learning rate on the pixels")
    p.add_argument("--seed", type=int_in(0), default=0)
    p.add_argument("--out", default="runs/toy2d", help="output folder")
    p.set_defaults(func=run_toy2d)
    p = sub.add_parser("describe", help="print the resolved config and the generator's size")
    _add_train_arguments(p)
    p.set_defaults(func=run_describe)
    for command in sub.choices.values():  # --debug after the command works too
        _add_debug_argument(command)
    for command in store_sub.choices.values():
        _add_debug_argument(command)
    return parser


def _run(func, args) -> int:
    """The one place where errors become messages: a user's mistake (a bad value, file or run folder) prints
    `error: ...` and returns 2; anything else is a bug, reported as one in a line and returns 1. The traceback is
    printed only with --debug or AMORTIZED3D_DEBUG=1."""
    from amortized3d.config import ConfigError
    from amortized3d.data.corpora import CorpusError
    from amortized3d.data.embedding_store import StoreError
    from amortized3d.shapeworld import PromptError
    from amortized3d.evaluation.clip_models import ClipLoadError
    from amortized3d.evaluation.gallery import GalleryError
    from amortized3d.priors.pretrained import PretrainedLoadError
    from amortized3d.training.checkpoint import CheckpointError
    from amortized3d.training.train import TrainingDiverged

    debug = getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        return func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except (ConfigError, CorpusError, PromptError, PretrainedLoadError, StoreError, ClipLoadError, GalleryError, CheckpointError,
            TrainingDiverged, UsageError) as err:
        if debug:
            raise
        print(f"error: {bounded(str(err))}", file=sys.stderr)
        return 2
    except (MemoryError, torch_out_of_memory()) as err:
        if debug:
            raise
        print(f"error: out of memory ({type(err).__name__}). Lower train.prompts_per_step, render.height/width, render.n_proposal/"
              "n_importance or prior.resolution (or the command's sizes, e.g. --mesh-resolution), or use a device with more memory; "
              "`amortized3d describe` estimates a training step's tensors", file=sys.stderr)
        return 2
    except OSError as err:  # a path that is missing, not a folder, not writable; a full disk
        if debug:
            raise
        what = str(err) if err.filename is None else f"{err.strerror}: {err.filename!r}"
        print(f"error: {what}; check the path, its permissions and the free space, then run the command again", file=sys.stderr)
        return 2
    except Exception as err:
        if debug:
            raise
        print(f"error: internal error ({type(err).__name__}: {err}). This is a bug in amortized3d: run the command again with "
              f"--debug (or {DEBUG_ENV}=1) for the traceback, and report it", file=sys.stderr)
        return 1


def bounded(message: str, limit: int = 1200) -> str:
    """A message cut in the middle when a value in it is huge (a prompt or override thousands of characters long);
    its start names the problem and its end says the fix."""
    return message if len(message) <= limit else f"{message[: limit - 400]} [... {len(message) - limit:,} characters ...] {message[-400:]}"


def torch_out_of_memory() -> type:
    """torch's out-of-memory error (CUDA and other accelerators), for except clauses."""
    import torch

    return getattr(torch, "OutOfMemoryError", MemoryError)


class UsageError(ValueError):
    """A command-line value that the parser's types cannot check alone (e.g. a path that must not be a file)."""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _run(args.func, args)


def generate_main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="generate", description="prompts -> meshes (GLB, PLY), turntables and contact sheets")
    _add_generate_arguments(parser)
    _add_debug_argument(parser)
    return _run(run_generate, parser.parse_args(argv))


def train_main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="train.py", description="train a prompt-amortized text-to-3D generator")
    _add_train_arguments(parser)
    _add_debug_argument(parser)
    return _run(run_train, parser.parse_intermixed_args(argv))  # overrides may come before and after options
