"""The cases of the refactor regression check (tests/test_regression.py) and the recorder of their expected values.

Each case trains 20 steps on tiny settings and keeps every step's logged numbers (losses, gradient norms, t range,
regularizers); the oracle case also evaluates its run. The first recording in expected.json was made by running this
file at the commit named there, before the refactor it guards: the earlier code's output, not this code's.

Bit-identical numbers need the same float arithmetic, and CPUs differ in it (vector width of the math library's and
PyTorch's kernels: the same code gives other last bits with AVX-512 than with AVX2). So each recording carries the
fingerprint of its machine's arithmetic (arithmetic_fingerprint: the bits of a few fixed computations), and the test
compares a run bit for bit with the recording of its own arithmetic. The first recording's machine was not
fingerprinted; a machine whose run equals it bit for bit is taken to be that one.

    AMORTIZED3D_CORPORA=../shared/corpora python -m tests.regression.record CASE ...     # an intended change
    AMORTIZED3D_CORPORA=../shared/corpora python -m tests.regression.record --add-machine

With case names (an intended change of behaviour; say so in the commit): those cases are re-recorded on this machine
and dropped from the other machines' recordings, which no longer hold. --add-machine: every case recorded on this
machine as one more recording; only at a commit whose behaviour is unchanged (its test passes on a recorded
machine), so that the new recording is the same behaviour in this machine's arithmetic."""

from __future__ import annotations

import hashlib
import json
import platform
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


@torch.no_grad()
def arithmetic_fingerprint() -> str:
    """A hash of the bits of fixed float32 computations of the kinds a training step uses (matrix products of odd
    shapes, 2D and 3D convolutions, transcendental functions, reductions, softmax, grid sampling), at THREADS threads:
    two machines with the same fingerprint are taken to compute a run's numbers with the same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4099, generator=g)
        a, b = torch.randn(37, 131, generator=g), torch.randn(131, 67, generator=g)
        image, volume = torch.randn(2, 3, 17, 17, generator=g), torch.randn(1, 4, 9, 9, 9, generator=g)
        grid = torch.rand(2, 5, 7, 2, generator=g) * 2 - 1
        outputs = [a @ b, torch.randn(512, 512, generator=g) @ torch.randn(512, 64, generator=g),
                   torch.nn.functional.conv2d(image, torch.randn(8, 3, 3, 3, generator=g), padding=1),
                   torch.nn.functional.conv3d(volume, torch.randn(4, 4, 3, 3, 3, generator=g), padding=1),
                   x.exp(), x.sigmoid(), x.tanh(), torch.nn.functional.softplus(x), x.abs().log(), x.abs().sqrt(),
                   x.sum(), x.cumsum(0), x.norm(), torch.softmax(a, -1), torch.nn.functional.layer_norm(a, (131,)),
                   torch.nn.functional.grid_sample(image, grid, align_corners=False)]
        digest = hashlib.sha256()
        for out in outputs:
            digest.update(out.contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]
    finally:
        torch.set_num_threads(threads)


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


def load_recordings() -> list[dict]:
    """expected.json's recordings, each {"fingerprint" (None: the first, unfingerprinted machine), "cpu",
    "recorded_at_commit", "cases": {name: numbers}}."""
    return json.loads(EXPECTED.read_text())["recordings"] if EXPECTED.exists() else []


def main() -> None:
    args = sys.argv[1:]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "amortized3d"], capture_output=True, text=True, cwd=HERE).stdout
    if dirty:
        sys.exit(f"amortized3d/ has uncommitted changes; record at a commit:\n{dirty}")
    add_machine = args == ["--add-machine"]
    if not args or (not add_machine and any(a.startswith("-") for a in args)):
        sys.exit("usage: python -m tests.regression.record CASE ... | --add-machine")
    names = CASES if add_machine else args
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        sys.exit(f"no such case: {', '.join(unknown)}; the cases are {', '.join(CASES)}")
    fingerprint, recordings = arithmetic_fingerprint(), load_recordings()
    if add_machine and any(r["fingerprint"] == fingerprint for r in recordings):
        sys.exit(f"this machine's arithmetic ({fingerprint}) is recorded already")
    mine = next((r for r in recordings if r["fingerprint"] == fingerprint), None)
    if mine is None:
        mine = {"fingerprint": fingerprint, "cpu": f"{platform.processor() or platform.machine()}, "
                f"{torch.backends.cpu.get_cpu_capability()}", "recorded_at_commit": commit, "cases": {}}
        recordings.append(mine)
    for name in names:
        with tempfile.TemporaryDirectory() as tmp:
            mine["cases"][name] = run_case(name, Path(tmp))
        if not add_machine:
            for other in recordings:
                if other is not mine:
                    other["cases"].pop(name, None)
        print(name, "recorded", flush=True)
    mine["recorded_at_commit"] = commit
    EXPECTED.write_text(json.dumps({"threads": THREADS, "recordings": recordings}, indent=1) + "\n")


if __name__ == "__main__":
    main()
