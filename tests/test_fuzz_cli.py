"""Bad input through the command line, seeded: malformed corpus files, config overrides and files, command-line values
and damaged run folders. Every case must end with a non-zero exit code and a short message (no blank line, a few
lines at most, no Python traceback) that names the offending file, key or value and says what to do; nothing may be
written outside the case's output folder, and nothing half-written inside it.

The expectations are the acceptance rules of the command line (README, "Errors and recovery"), not the code's own
messages: each case lists the tokens its message must contain (the file, the key or the flag it is about).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from amortized3d.cli import generate_main, main, train_main
from amortized3d.config import RANGES
from tests.fuzz_inputs import malformed_corpus_files
from tests.fixtures import REPO, TINY

SEED = 20261130
FIX_WORDS = ("use ", "pass ", "set ", "choose", "e.g.", "remove", "rebuild", "run ", "save ", "fix", "give", "lower", "raise",
             "check", "train ", "write", "delete", "move", "must", "should", "allowed", "expected", "replace", "point ", "quote",
             "name ", "shorten", "drop", "add ", "try", "did you mean", "one of", "an integer", "a number", "a folder", "a file",
             "build ", "--help")


@dataclass
class Case:
    entry: str  # "amortized3d", "generate" or "train"
    argv: list[str]
    names: list[str]  # what the message must name (any one of them)
    out: Path | None = None  # the only place the command may write
    may_succeed: bool = False  # a fuzzed file that happens to stay valid
    clear_out: bool = True  # start from an empty output folder (not for a run folder the case resumes)
    tags: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """A trained tiny run and the folders the cases write into; the working directory is sandbox/work."""
    root = tmp_path_factory.mktemp("fuzz")
    run = root / "runs" / "tiny"
    code = train_main(["--corpus", "shapeworld-16", "--output", str(run), *TINY, "train.steps=2", "train.ckpt_every=2"])
    assert code == 0
    (root / "work").mkdir()
    (root / "a_file").write_text("not a folder")
    return root


def damaged_runs(root: Path, run: Path) -> dict[str, tuple[Path, str]]:
    """Copies of the trained run, each damaged one way -> (run folder, the damaged file's name to expect)."""
    def copy(name):
        target = root / "damaged" / name
        if not target.exists():
            shutil.copytree(run, target)
        return target

    ckpt = "checkpoints/step_00000002"
    cases = {}
    for name, relative, data in [
        ("config_not_yaml", "config.yaml", b"train: [steps: 3\n"),
        ("config_nan_lr", "config.yaml", None),
        ("config_not_mapping", "config.yaml", b"- 1\n- 2\n"),
        ("state_not_json", f"{ckpt}/state.json", b"{step: 2"),
        ("weights_truncated", f"{ckpt}/model.safetensors", "truncate"),
        ("weights_flipped", f"{ckpt}/model.safetensors", "flip"),
        ("weights_missing", f"{ckpt}/model.safetensors", "delete"),
    ]:
        target = copy(name)
        path = target / relative
        if data is None:
            path.write_text(path.read_text().replace("lr_geometry: 0.01", "lr_geometry: .nan"))
        elif data == "truncate":
            path.write_bytes(path.read_bytes()[:64])
        elif data == "flip":
            raw = bytearray(path.read_bytes())
            raw[-10] ^= 0x55
            path.write_bytes(bytes(raw))
        elif data == "delete":
            path.unlink()
        else:
            path.write_bytes(data)
        cases[name] = (target, "config.yaml" if "config" in name else ckpt.split("/")[1])
    return cases


# Mutations of tests/fuzz_inputs.py that make a corpus invalid by the README's corpus rules whatever else the file
# holds, when applied alone: numbers, constants, surrogates, duplicate or unknown keys, wrong types, no train list,
# over-long prompts, nesting, CSV rows that do not fit the header, broken quotes, blank lines inside, UTF-16, empty files.
ALWAYS_INVALID = {"deep", "deep_open", "huge_int", "constant", "float", "surrogate", "duplicate_key", "misspelt_key", "split_type",
                  "item_type", "top_list", "no_train", "long", "nested_item", "short_row", "long_row", "no_header",
                  "unclosed_quote", "after_quote", "unquoted_comma", "blank_line", "utf16", "empty"}


def must_fail(file_name: str) -> bool:
    """A fuzzed file whose only mutation is one of ALWAYS_INVALID (its name lists the mutations applied)."""
    mutations = file_name.split("-", 1)[1].rsplit(".", 1)[0].split("-")
    return len(mutations) == 1 and mutations[0] in ALWAYS_INVALID


def damaged_store(root: Path) -> Path:
    """The embedding store of the tiny config with one byte of its only shard flipped (same size: found when read)."""
    store = root / "store"
    if not store.exists():
        assert main(["store", "build", "--corpus", "shapeworld-16", *TINY, f"data.store={store}", "data.shard_size=16"]) == 0
        shard = store / "shard-000000.tar"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
    return store


def bad_override_values(rng: random.Random) -> list[tuple[str, str]]:
    """(override, what the message must name) for keys of every section."""
    cases = []
    for (section, key), interval in sorted(RANGES.items()):
        lo, hi = (float(v) for v in interval[1:-1].split(","))
        choices = [f"{lo - 1:g}", f"{hi * 2 + 1:g}", ".nan", ".inf", "-.inf", "abc", "{a: 1}", "true"]
        if section in ("camera", "distill") and key.endswith(("_range", "t_min", "t_max")):
            choices += [f"[{lo - 1:g},{hi:g}]", "[.nan,1]", "[1]"]
        if section == "regularizers":
            choices = ["[[0.0,.nan]]", "[[2.0,1.0]]", "[[0.0,-1.0]]", "[0.5]", "x"]
        value = rng.choice(choices)
        cases.append((f"{section}.{key}={value}", f"{section}.{key}"))
    for text, name in [("train.stepz=3", "train.stepz"), ("trian.steps=3", "trian"), ("trainsteps", "trainsteps"),
                       ("train.=3", "train.="), ("a.b.c=1", "a.b.c"), ("train.steps=[1,", "train.steps"),
                       ("distill.method=sdss", "sdss"), ("prior.kind=mvdreams", "mvdreams"), ("train.wandb=yes", "train.wandb"),
                       ("optim.name=sgd", "sgd"), ("generator.kind=nerf", "nerf"), ("distill.asd_shift=random", "asd_shift"),
                       ("train.mixed_precision=fp8", "fp8"), ("generator.spectral_norm=maybe", "spectral_norm"),
                       ("train.steps=" + "9" * 5000, "train.steps"), ("render.inv_std=1" + "0" * 400 + ".5", "render.inv_std"),
                       ("train.wandb=" + "x" * 20000, "train.wandb")]:
        cases.append((text, name))
    return cases


def cases_for(sandbox: Path, rng: random.Random) -> list[Case]:
    run = sandbox / "runs" / "tiny"
    out = sandbox / "work" / "out"
    cases: list[Case] = []
    # 1. Corpus files, read by `corpus show` (and a few by training).
    corpus_dir = sandbox / "corpora"
    corpus_dir.mkdir(exist_ok=True)
    for i, (name, data) in enumerate(malformed_corpus_files(SEED, 400)):
        path = corpus_dir / f"{i:03d}_{name}"
        path.write_bytes(data)
        valid_maybe = not must_fail(name)
        cases.append(Case("amortized3d", ["corpus", "show", str(path), "-n", "100000"], [str(path)], may_succeed=valid_maybe, tags=["corpus"]))
        if i % 40 == 0:
            cases.append(Case("train", ["--corpus", str(path), "--output", str(out), *TINY, "train.steps=1"], [str(path)], out=out,
                              may_succeed=valid_maybe, tags=["corpus-train"]))
    # 2. Config overrides and config files.
    for override, name in bad_override_values(rng):
        entry = rng.choice(["train", "describe"])
        if entry == "train":
            cases.append(Case("train", ["--corpus", "shapeworld-16", "--output", str(out), override], [name], out=out, tags=["override"]))
        else:
            cases.append(Case("amortized3d", ["describe", "--corpus", "shapeworld-16", override], [name], tags=["override"]))
    config_dir = sandbox / "configs"
    config_dir.mkdir(exist_ok=True)
    for i, data in enumerate([b"train: [steps: 3\n", b"\tx: 1\n", b"- a\n- b\n", b"render:\n  heigth: 3\n", b"\xff\xfe\x00",
                              b"[" * 5000 + b"]" * 5000, b"optim:\n  lr_geometry: .nan\n", b"train: 3\n", b"render:\n  height: 1e9\n"]):
        path = config_dir / f"bad_{i}.yaml"
        path.write_bytes(data)
        cases.append(Case("train", ["--corpus", "shapeworld-16", "--config", str(path), "--output", str(out)],
                          [str(path), "render.heigth", "optim.lr_geometry", "render.height", "train"], out=out, tags=["config-file"]))
    cases.append(Case("train", ["--corpus", "shapeworld-16", "--config", str(config_dir), "--output", str(out)], [str(config_dir)], out=out))
    cases.append(Case("train", ["--corpus", "no-such-corpus", "--output", str(out)], ["no-such-corpus"], out=out))
    cases.append(Case("train", ["--corpus", "shapeworld-16", "--output", str(sandbox / "a_file"), *TINY, "train.steps=1"],
                      [str(sandbox / "a_file")]))
    cases.append(Case("train", ["--corpus", "shapeworld-16", "--output", str(out), "--resume", *TINY], [str(out)], out=out))
    # 3. Command-line values.
    base = ["a large red cube", "--checkpoint", str(run), "--out", str(out)]
    for flag, values in [("--frames", ["0", "-1", "100000", "abc", "1.5"]), ("--mesh-resolution", ["1", "0", "100000", "x"]),
                         ("--image-size", ["-1", "0", "100000", ""]), ("--seed", ["-1", "x"]), ("--video-format", ["avi"])]:
        for value in values:
            cases.append(Case("generate", [*base, flag, value], [flag], out=out, tags=["generate-arg"]))
    for prompt in ["", "   ", "a\x00cube", "a\u2028cube", "a\x1bcube", "x" * 20000]:
        cases.append(Case("generate", [prompt, "--checkpoint", str(run), "--out", str(out)], ["prompt 1"], out=out, tags=["prompt"]))
    cases.append(Case("generate", ["a cube", "--checkpoint", str(run), "--out", str(sandbox / "a_file")], [str(sandbox / "a_file")]))
    for bad_run in [sandbox / "missing_run", sandbox / "a_file", sandbox / "work"]:
        cases.append(Case("generate", ["a cube", "--checkpoint", str(bad_run), "--out", str(out)], [str(bad_run)], out=out))
        cases.append(Case("amortized3d", ["evaluate", "--checkpoint", str(bad_run)], [str(bad_run)]))
    damaged = damaged_runs(sandbox, run)
    for folder, expected in damaged.values():
        cases.append(Case("generate", ["a cube", "--checkpoint", str(folder), "--out", str(out)], [expected], out=out, tags=["damaged"]))
        cases.append(Case("amortized3d", ["evaluate", "--checkpoint", str(folder), "--out", str(out / "report.json")], [expected],
                          out=out, tags=["damaged"]))
    for name in ("state_not_json", "weights_truncated", "weights_flipped", "weights_missing"):
        folder, expected = damaged[name]
        cases.append(Case("train", ["--corpus", "shapeworld-16", "--output", str(folder), "--resume", *TINY, "train.steps=4"],
                          [expected], out=folder, clear_out=False, tags=["resume-damaged"]))
    store = damaged_store(sandbox)
    cases.append(Case("train", ["--corpus", "shapeworld-16", "--output", str(out), *TINY, "train.steps=40", f"data.store={store}",
                                "data.shard_size=16", "data.num_workers=2"], ["shard-000000.tar"], out=out, tags=["store"]))
    evaluate = ["evaluate", "--checkpoint", str(run)]
    for args, name in [(["--limit", "0"], "--limit"), (["--limit", "-1"], "--limit"), (["--views", "0"], "--views"),
                       (["--elevation", "nan"], "--elevation"), (["--elevation", "100"], "--elevation"), (["--split", "dev"], "--split"),
                       (["--resolution", "0"], "--resolution"), (["--gallery", "-2"], "--gallery"), (["--out", "/tmp"], "/tmp"),
                       (["--out", str(sandbox / "work")], str(sandbox / "work")),
                       (["--clip", str(sandbox / "missing_clip"), "--out", str(out)], "missing_clip")]:
        cases.append(Case("amortized3d", [*evaluate, *args], [name], out=out, tags=["evaluate-arg"]))
    for args, name in [(["plot", str(sandbox / "missing_run")], "missing_run"), (["gallery", str(sandbox / "missing_run")], "missing_run"),
                       (["gallery", str(run), "--limit", "0"], "--limit"), (["corpus", "show", "no-such"], "no-such"),
                       (["corpus", "show", "shapeworld-16", "-n", "-3"], "-n"), (["corpus", "bogus"], "bogus"),
                       (["corpus", "export", "shapeworld-16", str(sandbox / "work")], str(sandbox / "work")),
                       (["bench", str(config_dir / "bad_0.yaml"), "--out", str(out)], "bad_0.yaml"),
                       (["bench", str(sandbox / "missing.yaml"), "--out", str(out)], "missing.yaml"),
                       (["store", "info", "--corpus", "shapeworld-16", f"data.store={sandbox / 'no_store'}"], "no_store"),
                       (["train", "--corpus", "shapeworld-16", "train.steps=0"], "train.steps"), (["nonsense"], "nonsense")]:
        cases.append(Case("amortized3d", args, [name], out=out, tags=["command"]))
    return cases


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


def run_case(case: Case) -> tuple[int, str]:
    entry = {"amortized3d": main, "generate": generate_main, "train": train_main}[case.entry]
    stderr, stdout = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            code = entry(case.argv)
        except SystemExit as exit:  # argparse's usage errors
            code = exit.code if isinstance(exit.code, int) else 1
    return code, stderr.getvalue() + stdout.getvalue()


def message_lines(output: str) -> list[str]:
    """The error message: the lines from the first one starting with 'error:' or argparse's 'usage:'."""
    lines = [line for line in output.splitlines() if "\r" not in line]  # progress bars redraw with \r
    start = next((i for i, line in enumerate(lines) if line.startswith(("error:", "usage:")) or ": error:" in line), None)
    return [] if start is None else lines[start:]


def test_malformed_input_ends_in_a_clear_message(sandbox, monkeypatch):
    monkeypatch.chdir(sandbox / "work")
    monkeypatch.delenv("AMORTIZED3D_DEBUG", raising=False)
    rng = random.Random(SEED)
    cases = cases_for(sandbox, rng)
    assert len(cases) > 300 and sum(not c.may_succeed for c in cases if c.tags == ["corpus"]) >= 50
    failures = []
    for case in cases:
        if case.out is not None and case.out.exists() and case.clear_out:
            shutil.rmtree(case.out)
        before = snapshot(sandbox)
        try:
            code, output = run_case(case)
        except BaseException as err:  # noqa: BLE001 - the point of the test
            failures.append(f"{case.entry} {case.argv[:6]}: raised {type(err).__name__}: {err}")
            continue
        after = snapshot(sandbox)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        outside = [k for k in changed if case.out is None or not case.clear_out or not (sandbox / k).is_relative_to(case.out)]
        if outside:
            failures.append(f"{case.entry} {case.argv[:6]}: wrote outside its output folder: {outside[:3]}")
        if case.out is not None and case.out.exists():
            partial = [p.name for p in case.out.rglob("*") if p.name.startswith(".") or ".tmp" in p.name]
            if partial:
                failures.append(f"{case.entry} {case.argv[:6]}: left half-written files {partial[:3]}")
        if "Traceback (most recent call last)" in output:
            failures.append(f"{case.entry} {case.argv[:6]}: printed a traceback")
            continue
        if code == 0:
            if not case.may_succeed:
                failures.append(f"{case.entry} {case.argv[:6]}: exit code 0 for bad input")
            continue
        lines = message_lines(output)
        text = " ".join(lines)
        if not lines or len(lines) > 6 or any(not line.strip() for line in lines):
            failures.append(f"{case.entry} {case.argv[:6]}: not a one-paragraph message: {output[-500:]!r}")
        elif not any(name in text for name in case.names):
            failures.append(f"{case.entry} {case.argv[:6]}: the message does not name {case.names}: {text[:300]!r}")
        elif not any(word in text.lower() for word in FIX_WORDS):
            failures.append(f"{case.entry} {case.argv[:6]}: the message says no fix: {text[:300]!r}")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures[:40])


@pytest.mark.parametrize("command", [
    [sys.executable, "-m", "amortized3d", "evaluate", "--checkpoint", "MISSING", "--limit", "0"],
    [sys.executable, "-m", "amortized3d", "describe", "--corpus", "shapeworld-16", "optim.lr_geometry=.nan"],
    [sys.executable, "train.py", "--corpus", "shapeworld-16", "optim.eps=-1"],
])
def test_entry_points_exit_non_zero_without_a_traceback(command):
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.strip()


def test_debug_prints_the_traceback_for_developers(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), AMORTIZED3D_DEBUG="1")
    proc = subprocess.run([sys.executable, "-m", "amortized3d", "plot", str(tmp_path / "missing")], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
    assert json.dumps  # the module's json import is used by the damaged-run fixture's callers
