"""The cases of the refactor regression check (tests/test_regression.py) and the recorder of their expected values.

Each case trains 20 steps on tiny settings and keeps every step's logged numbers (losses, gradient norms, t range,
regularizers); the oracle case also evaluates its run. The expected values in expected.json were recorded by
running this file at the commit named there, before the refactor it guards: they are the earlier code's output,
not this code's. Re-record only for an intended change of behaviour, and say so in the commit:

    AMORTIZED3D_CORPORA=../shared/corpora python -m tests.regression.record [CASE ...]

(with case names, only those are re-recorded; the others are kept)"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
EXPECTED = HERE / "expected.json"
STEPS = 20
THREADS = 2  # float sums split over threads: the thread count is part of what makes a run bit-identical
VOLATILE = {"steps_per_s", "samples_per_s", "peak_memory_mb"}  # measurements of the machine, not of the math

ANALYTIC = [(kind, method) for kind in ("hyper_ingp", "conv3d", "triplane") for method in ("asd", "sds", "csd")]
DIFFUSERS = [("stable_diffusion", m) for m in ("asd", "sds", "csd", "vsd", "lods-embedding", "lods-lora")] + [
    ("deepfloyd_if", m) for m in ("asd", "lods-lora")]


def analytic_overrides(kind: str, method: str) -> list[str]:
    from tests.fixtures import TINY

    extra = [] if kind == "hyper_ingp" else [f"generator.kind={kind}", "generator.preset=tiny"]
    return [*TINY, *extra, f"distill.method={method}", f"train.steps={STEPS}", f"train.ckpt_every={STEPS}"]


def diffusers_overrides(kind: str, method: str, folder: Path) -> list[str]:
    from tests.fixtures import SD_TINY

    return [*SD_TINY, f"prior.kind={kind}", f"prior.model={folder}", f"distill.method={method}",
            "distill.guidance_scale=null", f"train.steps={STEPS}", "train.ckpt_every=1000", "train.prompts_per_step=2"]


def step_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in rows]


def run_case(name: str, workdir: Path) -> dict:
    """One case by name ('analytic/KIND/METHOD', 'KIND/METHOD' for a diffusers prior, 'oracle') -> its numbers."""
    from amortized3d.config import load_config
    from amortized3d.training.train import train

    torch.set_num_threads(THREADS)
    parts = name.split("/")
    if parts[0] == "analytic":
        cfg = load_config("shapeworld-16", overrides=analytic_overrides(parts[1], parts[2]))
        return {"steps": step_rows(train(cfg, workdir / "run"))}
    if parts[0] == "old_run":  # a run folder written by the earlier code (the commit in old_run/README.md)
        import shutil

        from amortized3d.evaluation.oracle import evaluate_run
        from amortized3d.inference.generate import generate

        run = shutil.copytree(HERE / "old_run", workdir / "old_run")
        report = evaluate_run(run, split="test", limit=3)
        report["summary"].pop("seconds")
        mesh = generate(["a large red cube"], run, workdir / "out", resolution=24, frames=2, image_size=16, seed=5)[0]
        return {"steps": [], "report": report, "mesh": [mesh["vertices"], mesh["faces"]]}
    if parts[0] == "oracle":
        from amortized3d.evaluation.oracle import evaluate_run

        cfg = load_config("shapeworld-16", overrides=analytic_overrides("hyper_ingp", "asd"))
        run = train(cfg, workdir / "run")
        report = evaluate_run(run, split="test")
        report["summary"].pop("seconds")  # a measurement of the machine
        return {"steps": step_rows(run), "report": report}
    from amortized3d.priors.tiny import make_tiny_deepfloyd_if, make_tiny_stable_diffusion

    kind, method = parts
    make = make_tiny_stable_diffusion if kind == "stable_diffusion" else make_tiny_deepfloyd_if
    folder = make(workdir / "prior")
    corpus = workdir / "prompts.json"
    corpus.write_text('{"train": ["a frog", "a chair", "a red cube", "a tall tree"]}')
    cfg = load_config(str(corpus), str(Path(__file__).resolve().parents[2] / "configs" / "mg15.yaml"),
                      diffusers_overrides(kind, method, folder))
    return {"steps": step_rows(train(cfg, workdir / "run"))}


CASES = [f"analytic/{k}/{m}" for k, m in ANALYTIC] + [f"{k}/{m}" for k, m in DIFFUSERS] + ["oracle", "old_run"]


def main() -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "amortized3d"], capture_output=True, text=True, cwd=HERE).stdout
    if dirty:
        sys.exit(f"amortized3d/ has uncommitted changes; record at a commit:\n{dirty}")
    results = json.loads(EXPECTED.read_text())["cases"] if EXPECTED.exists() and len(sys.argv) > 1 else {}
    for name in sys.argv[1:] or CASES:
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = run_case(name, Path(tmp))
        print(name, "recorded", flush=True)
    EXPECTED.write_text(json.dumps({"recorded_at_commit": commit, "threads": THREADS, "cases": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
