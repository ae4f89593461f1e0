"""Command line: amortized3d train | generate | evaluate | corpus | describe, and a standalone `generate`.

    amortized3d train --corpus shapeworld-16 [section.key=value ...]
    amortized3d generate "a red cube" --checkpoint RUN_DIR
    amortized3d evaluate --checkpoint RUN_DIR [--clip MODEL]
    amortized3d corpus list | show NAME | info NAME | export NAME OUT.json | build cp100k --captions CSV
    amortized3d store build | info --corpus NAME [--config FILE] [section.key=value ...]
    amortized3d plot RUN_DIR
    amortized3d gallery RUN_DIR
    amortized3d bench MATRIX.yaml --out DIR
    amortized3d describe CONFIG.yaml | --corpus NAME [section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", default=None, help="named corpus (see `amortized3d corpus list`); selects the recipe")
    parser.add_argument("--config", default=None, help="YAML file applied on top of the corpus recipe")
    parser.add_argument("--corpus-dir", default=None, help="folder with reference corpus JSON files")
    parser.add_argument("--prior", default=None, metavar="MODEL",
                        help="diffusers hub id or local folder; sets prior.kind=stable_diffusion, prior.model=MODEL and "
                             "text.encoder=prior (add prior.kind=deepfloyd_if for DeepFloyd IF)")
    parser.add_argument("--output", default=None, help="run folder (default: runs/<corpus>-<method>-<time>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --output from its latest checkpoint")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=200 distill.method=sds")


def _resolve_config(args):
    from amortized3d.config import load_config

    overrides = list(args.overrides)
    if args.prior:
        overrides = ["prior.kind=stable_diffusion", f"prior.model={args.prior}", "text.encoder=prior", *overrides]
    if args.corpus_dir:
        overrides.append(f"corpus.dir={args.corpus_dir}")
    return load_config(args.corpus, args.config, overrides)


def check_pretrained_weights(cfg) -> None:
    """Fail in seconds, before the trainer starts, when the prior's weights are not available."""
    if cfg.prior.kind != "analytic" or cfg.text.encoder == "prior":
        from amortized3d.priors.diffusers_prior import SUBFOLDERS, TEXT_SUBFOLDERS
        from amortized3d.priors.pretrained import resolve_model_dir

        resolve_model_dir(cfg.prior.model, SUBFOLDERS.get(cfg.prior.kind, TEXT_SUBFOLDERS))


def run_train(args) -> int:
    cfg = _resolve_config(args)
    check_pretrained_weights(cfg)
    from amortized3d.training.train import train

    output = args.output or cfg.train.output_dir
    if output is None:
        if args.resume:
            raise SystemExit("--resume needs --output RUN_DIR naming the run to continue")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        output = f"runs/{cfg.corpus.name}-{cfg.distill.method}-{stamp}"
    run_dir = train(cfg, output, resume=args.resume)
    print(f"run folder: {run_dir}")
    return 0


def run_generate(args) -> int:
    from amortized3d.inference.generate import generate

    results = generate(args.prompts, args.checkpoint, args.out, resolution=args.mesh_resolution,
                       video_format=args.video_format, frames=args.frames, image_size=args.image_size, seed=args.seed)
    for r in results:
        print(json.dumps(r))
    return 0


def run_evaluate(args) -> int:
    if args.clip:
        from amortized3d.evaluation.clip_eval import evaluate_clip

        candidates = None
        if args.candidates:
            from amortized3d.data.corpora import load_file

            corpus = load_file(args.candidates)
            candidates = list(dict.fromkeys(corpus.train + corpus.val + corpus.test))  # every split, each prompt once
        summary = evaluate_clip(args.checkpoint, args.clip, split=args.split, candidates=candidates, n_views=args.views,
                                elevation=args.elevation, resolution=args.resolution, out=args.out, limit=args.limit,
                                save_views=args.save_views)
        if summary is None:  # not the main process
            return 0
        if args.gallery:
            from amortized3d.evaluation.gallery import build_gallery, clip_scores

            out = Path(summary["output"])
            prompts = list(clip_scores(out / "scores.csv"))[: args.gallery]  # in evaluation order
            summary["gallery"] = str(build_gallery(args.checkpoint, prompts, out=out / "gallery", score_files=[out / "scores.csv"]))
        print(json.dumps(summary, indent=1))
        return 0
    from amortized3d.evaluation.oracle import evaluate_run

    report = evaluate_run(args.checkpoint, split=args.split, out=args.out, limit=args.limit)
    print(json.dumps(report["summary"], indent=1))
    return 0


def run_corpus(args) -> int:
    from amortized3d.data.corpora import catalog, load_corpus

    if args.action == "list":
        for name, entry in catalog().items():
            print(f"{name:18s} {entry['source']:10s} {entry.get('about', '')}")
        return 0
    if not args.name:
        raise SystemExit(f"`amortized3d corpus {args.action}` needs a corpus NAME")
    if args.action == "build":
        if args.name != "cp100k" or not args.captions:
            raise SystemExit("usage: amortized3d corpus build cp100k --captions CAP3D_CAPTIONS.csv [--corpus-dir DIR]")
        from amortized3d.data.cp100k import build_cp100k

        kwargs = {k: v for k, v in (("train_size", args.train_size), ("test_size", args.test_size)) if v is not None}
        print(json.dumps(build_cp100k(args.captions, args.corpus_dir, **kwargs), indent=1))
        return 0
    corpus = load_corpus(args.name, args.corpus_dir)
    if args.action == "info":
        from amortized3d.data.corpora import corpus_info

        count = None
        try:
            import tempfile

            from amortized3d.priors.tiny import clip_tokenizer

            with tempfile.TemporaryDirectory() as work:
                tokenizer = clip_tokenizer(Path(work))

            def count(prompts):
                return [len(ids) for ids in tokenizer(prompts, truncation=False, verbose=False).input_ids]
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
        raise SystemExit("`amortized3d corpus export NAME OUT.json` needs an output path")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump({"train": corpus.train, "val": corpus.val, "test": corpus.test}, f, ensure_ascii=False, indent=0)
    print(f"wrote {args.out}")
    return 0


def run_store(args) -> int:
    """Build (or check) the embedding store a training run with these arguments reads; under `accelerate launch`
    the ranks split the build."""
    from accelerate import Accelerator

    from amortized3d.builders import build_text_encoder, prepare_store, prior_store_suffixes, store_location
    from amortized3d.data.corpora import load_corpus
    from amortized3d.data.embedding_store import load_manifest

    cfg = _resolve_config(args)
    state = Accelerator()  # as in training: the process group from `accelerate launch` (CPU processes included)
    prompts = load_corpus(cfg.corpus.name, cfg.corpus.dir).train
    text_encoder = build_text_encoder(cfg, state.device)
    prior_encoder = None
    if prior_store_suffixes(cfg):
        from amortized3d.priors.diffusers_prior import load_prior_text_encoder

        prior_encoder = text_encoder if cfg.text.encoder == "prior" else load_prior_text_encoder(cfg.prior.model, state.device, cfg.prior.dtype)
    if args.action == "info":
        folder, expected = store_location(cfg, prompts, text_encoder, prior_encoder)
        manifest = load_manifest(folder, **expected)
    else:
        folder = prepare_store(cfg, prompts, text_encoder, prior_encoder, rank=state.process_index, world=state.num_processes,
                               barrier=state.wait_for_everyone, progress=state.is_local_main_process)
        manifest = load_manifest(folder)
    if state.is_main_process:
        size = sum((folder / name).stat().st_size for name in [*manifest["shards"], "manifest.json"])
        summary = {key: manifest[key] for key in ("corpus", "split", "n_prompts", "shard_size", "encoder_id", "prior_encoder_id", "prior_suffixes")}
        print(json.dumps({"store": str(folder), **summary, "shards": len(manifest["shards"]), "bytes": size}, indent=1))
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
    from amortized3d.evaluation.plots import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
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
    parser.add_argument("--mesh-resolution", type=int, default=128, help="marching-cubes grid size")
    parser.add_argument("--video-format", choices=("mp4", "gif"), default="mp4")
    parser.add_argument("--frames", type=int, default=36, help="turntable frames")
    parser.add_argument("--image-size", type=int, default=128, help="turntable and contact-sheet image size")
    parser.add_argument("--seed", type=int, default=None, help="latent z for generators that take one (conv3d); default: its fixed latent")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amortized3d", description="Prompt-amortized text-to-3D by score distillation")
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
    p.add_argument("--views", type=int, default=120, help="CLIP: orbit views per prompt")
    p.add_argument("--elevation", type=float, default=15.0, help="CLIP: orbit elevation in degrees")
    p.add_argument("--resolution", type=int, default=None, help="CLIP: render size (default: the CLIP input size, e.g. 224)")
    p.add_argument("--candidates", default=None, metavar="FILE",
                   help="CLIP: candidate prompts (a corpus file: JSON, .txt or .csv); default: the evaluated split")
    p.add_argument("--save-views", action="store_true", help="CLIP: also write each prompt's views as a PNG sheet")
    p.add_argument("--gallery", type=int, default=12, metavar="N",
                   help="CLIP: an HTML gallery of the first N evaluated prompts in OUT/gallery (0: none; needs `npm ci`)")
    p.add_argument("--out", default=None, help="report path (oracle: RUN_DIR/eval_<split>.json; CLIP: folder RUN_DIR/eval_clip_<split>)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N prompts")
    p.set_defaults(func=run_evaluate)
    p = sub.add_parser("corpus", help="list, show or export prompt corpora")
    p.add_argument("action", choices=("list", "show", "info", "export", "build"))
    p.add_argument("name", nargs="?")
    p.add_argument("out", nargs="?")
    p.add_argument("--corpus-dir", default=None)
    p.add_argument("-n", type=int, default=10, help="prompts to show per split")
    p.add_argument("--captions", default=None, help="build cp100k: Cap3D's caption CSV (uid, caption)")
    p.add_argument("--train-size", type=int, default=None, help="build cp100k: train prompts (default 100000)")
    p.add_argument("--test-size", type=int, default=None, help="build cp100k: test prompts (default 1000)")
    p.set_defaults(func=run_corpus)
    p = sub.add_parser("store", help="build or inspect the text-embedding store that training reads")
    store_sub = p.add_subparsers(dest="action", required=True)
    for action, about in (("build", "encode the train split into the store training with these arguments reads"),
                          ("info", "check that store and print its manifest")):
        q = store_sub.add_parser(action, help=about)
        _add_train_arguments(q)
        q.set_defaults(func=run_store)
    p = sub.add_parser("bench", help="train and evaluate a method x generator x corpus matrix; Markdown and JSON table")
    p.add_argument("matrix", help="matrix YAML file (see benchmarks/matrices/)")
    p.add_argument("--out", required=True, help="folder for the runs and results.md / results.json")
    p.set_defaults(func=run_bench)
    p = sub.add_parser("gallery", help="static HTML page of a run: turntables, interactive 3D meshes and per-prompt scores")
    p.add_argument("run_dir", help="run folder written by train")
    p.add_argument("--prompts", nargs="+", default=None, help="prompts to show (default: the first --limit of --split)")
    p.add_argument("--limit", type=int, default=12)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", default=None, help="gallery folder (default RUN_DIR/gallery)")
    p.set_defaults(func=run_gallery)
    p = sub.add_parser("plot", help="training curves (losses, gradient norm, schedule, throughput, evaluations) as PNG files")
    p.add_argument("run_dir", help="run folder written by train")
    p.add_argument("--out", default=None, help="folder for the PNG files (default RUN_DIR/plots)")
    p.set_defaults(func=run_plot)
    p = sub.add_parser("describe", help="print the resolved config and the generator's size")
    _add_train_arguments(p)
    p.set_defaults(func=run_describe)
    return parser


def _run(func, args) -> int:
    from amortized3d.config import ConfigError
    from amortized3d.data.corpora import CorpusError
    from amortized3d.data.embedding_store import StoreError
    from amortized3d.data.shapeworld import PromptError
    from amortized3d.evaluation.clip_models import ClipLoadError
    from amortized3d.evaluation.gallery import GalleryError
    from amortized3d.priors.pretrained import PretrainedLoadError

    try:
        return func(args)
    except (ConfigError, CorpusError, PromptError, PretrainedLoadError, StoreError, ClipLoadError, GalleryError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _run(args.func, args)


def generate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="generate", description="prompts -> meshes (GLB, PLY), turntables and contact sheets")
    _add_generate_arguments(parser)
    return _run(run_generate, parser.parse_args(argv))


def train_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description="train a prompt-amortized text-to-3D generator")
    _add_train_arguments(parser)
    return _run(run_train, parser.parse_intermixed_args(argv))  # overrides may come before and after options
