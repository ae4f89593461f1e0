"""The commands a user types: train.py, generate, evaluate, corpus, describe, and their errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest
import trimesh

from amortized3d.cli import main
from tests.fixtures import REPO, TINY


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--corpus", "shapeworld-16", "--output", str(run), "train.steps=3", *TINY],
        capture_output=True, text=True, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return run


def test_generate_writes_mesh_video_and_sheet(tiny_run, tmp_path, capsys):
    out = tmp_path / "out"
    prompts = ["a large red cube", "../../etc/passwd", "a large red cube"]
    assert main(["generate", *prompts, "--checkpoint", str(tiny_run), "--out", str(out), "--mesh-resolution", "32",
                 "--frames", "6", "--image-size", "24"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(results) == 3
    names = {Path(r["mesh_glb"]).name for r in results}
    assert len(names) == 3  # unique even for a repeated prompt
    for r in results:
        for key in ("mesh_glb", "mesh_ply", "video", "contact_sheet"):
            path = Path(r[key])
            assert path.is_file() and path.parent == out  # nothing escapes the output folder
        mesh = trimesh.load(r["mesh_glb"], force="mesh")
        assert len(mesh.faces) > 0 and mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
        frames = iio.imread(r["video"])
        assert frames.shape[0] == 6 and frames.shape[1:3] == (24, 24)


def test_evaluate_writes_a_report(tiny_run):
    assert main(["evaluate", "--checkpoint", str(tiny_run), "--limit", "3"]) == 0
    report = json.loads((tiny_run / "eval_test.json").read_text())
    s = report["summary"]
    assert s["n_prompts"] == 3 and s["n_candidates"] == 20
    assert 0.0 <= s["r_at_1"] <= 1.0 and 0.0 <= s["iou"] <= 1.0
    assert (tiny_run / "validation").is_dir() and any((tiny_run / "validation").glob("*.png"))
    assert (tiny_run / "config.yaml").is_file()


def test_user_errors_are_clear(tmp_path, capsys):
    assert main(["train", "--corpus", "no-such-corpus"]) == 2
    assert "known corpora" in capsys.readouterr().err
    assert main(["describe", "--corpus", "shapeworld-16", "render.hieght=3"]) == 2
    err = capsys.readouterr().err
    assert "render.hieght" in err and "'height'" in err
    assert main(["generate", "a cube", "--checkpoint", str(tmp_path)]) == 2
    assert "config.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train": ["a plaid cube"]}))
    assert main(["train", "--corpus", str(bad), "train.wandb=disabled", "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "plaid" in err and "ShapeWorld" in err


def test_corpus_commands(tmp_path, capsys):
    assert main(["corpus", "list"]) == 0
    assert "shapeworld-120k" in capsys.readouterr().out
    assert main(["corpus", "show", "shapeworld-16", "-n", "2"]) == 0
    assert "train: 16 prompts" in capsys.readouterr().out
    assert main(["corpus", "export", "shapeworld-16", str(tmp_path / "sw.json")]) == 0
    data = json.loads((tmp_path / "sw.json").read_text())
    assert len(data["train"]) == 16 and len(data["test"]) == 20
