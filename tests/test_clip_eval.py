"""CLIP R@1 and similarity: the chunked scorer against a dense brute force, perfect and random scorers,
the text-feature cache, and `amortized3d evaluate --clip` end to end on a tiny CLIP (resumed, and split
over two processes with the same numbers)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from amortized3d.evaluation import clip_eval
from amortized3d.evaluation.clip_eval import score_views, text_feature_blocks

REPO = Path(__file__).resolve().parents[1]


def dense_reference(image: torch.Tensor, text: torch.Tensor, own: int):
    """Every score at once: hit when no other candidate scores higher than the own prompt."""
    scores = image @ text.T  # [V, N]
    own_score = scores[:, own]
    others = torch.cat([scores[:, :own], scores[:, own + 1 :]], 1)
    return own_score >= others.max(1).values, own_score


def blocks_of(text: torch.Tensor, size: int) -> list[np.ndarray]:
    return [text[i : i + size].half().numpy() for i in range(0, len(text), size)]


def test_chunked_scores_equal_the_dense_ones():
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(103, 16, generator=g), dim=-1).half().float()  # as stored (fp16)
    image = F.normalize(torch.randn(12, 16, generator=g), dim=-1)
    image[:4] = text[57] + 0.01 * image[:4]  # some views close to their own prompt: hits
    for own in (0, 57, 102):
        expected_hit, expected_sim = dense_reference(image, text, own)
        for size in (7, 50, 103, 500):
            hit, sim = score_views(image, blocks_of(text, size), own)
            assert torch.equal(hit, expected_hit)
            torch.testing.assert_close(sim, expected_sim)
    assert score_views(image, blocks_of(text, 7), 57)[0][:4].all()


def test_perfect_scorer_gives_one_and_random_scorer_gives_chance():
    g = torch.Generator().manual_seed(1)
    n = 40
    text = F.normalize(torch.randn(n, 32, generator=g), dim=-1)
    blocks = blocks_of(text, 16)
    perfect = [score_views(text[p].expand(5, -1) + 0.001 * torch.randn(5, 32, generator=g), blocks, p)[0].float().mean() for p in range(n)]
    assert float(torch.stack(perfect).mean()) == 1.0
    random_hits = [score_views(F.normalize(torch.randn(50, 32, generator=g), dim=-1), blocks, p)[0].float().mean() for p in range(n)]
    rate = float(torch.stack(random_hits).mean())
    assert abs(rate - 1 / n) < 0.015, rate  # chance is 1/40 = 0.025; 2,000 views give a standard error of 0.0035


class CountingClip:
    identity = "counting"

    def __init__(self):
        self.calls = 0

    def encode_text(self, prompts):
        self.calls += 1
        return F.normalize(torch.stack([torch.randn(8, generator=torch.Generator().manual_seed(len(p) * 7 + ord(p[-1]))) for p in prompts]), dim=-1)


def test_text_features_are_cached_and_split_over_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(clip_eval, "TEXT_BLOCK", 4)
    prompts = [f"prompt number {i}" for i in range(10)]
    clip = CountingClip()
    expected = clip.encode_text(prompts).half().float()
    two_ranks = tmp_path / "two"
    done_by = {}

    def rank0_reaches_the_barrier():  # rank 1 has computed block 1; now rank 0 computes blocks 0 and 2
        done_by[0] = text_feature_blocks(clip, prompts, two_ranks, rank=0, world=2, batch_size=3, progress=False)

    blocks = text_feature_blocks(clip, prompts, two_ranks, rank=1, world=2, batch_size=3, progress=False, barrier=rank0_reaches_the_barrier)
    assert all(np.array_equal(a, b) for a, b in zip(done_by[0], blocks))
    assert [len(b) for b in blocks] == [4, 4, 2]
    torch.testing.assert_close(torch.from_numpy(np.concatenate(blocks)).float(), expected)
    calls = clip.calls
    again = text_feature_blocks(clip, prompts, two_ranks, progress=False)
    assert clip.calls == calls and all(np.array_equal(a, b) for a, b in zip(again, blocks))  # from the cache
    one_rank = text_feature_blocks(clip, prompts, tmp_path / "one", progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(one_rank, blocks))


@pytest.fixture(scope="module")
def tiny_run_and_clip(tmp_path_factory):
    from amortized3d.priors.tiny import make_tiny_clip
    from amortized3d.training.train import train
    from tests.test_training import tiny_config

    root = tmp_path_factory.mktemp("clip_eval")
    run = train(tiny_config("train.steps=2", "train.ckpt_every=2"), root / "run")
    return run, make_tiny_clip(root / "clip", image_size=16)


def evaluate_cli(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    if processes == 1:
        cmd = [sys.executable, "-m", "amortized3d", "evaluate", *args]
    else:
        from tests.test_distributed import free_port

        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "amortized3d", "evaluate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def read_scores(folder: Path) -> list[dict]:
    with open(folder / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_with_a_tiny_clip_resumes_and_merges_ranks_exactly(tiny_run_and_clip, tmp_path):
    run, clip = tiny_run_and_clip
    args = ["--checkpoint", str(run), "--clip", str(clip), "--views", "3", "--limit", "6"]
    one = tmp_path / "one"
    proc = evaluate_cli(*args, "--out", str(one), "--save-views")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((one / "summary.json").read_text())
    rows = read_scores(one)
    assert [int(r["index"]) for r in rows] == list(range(6)) and summary["n_prompts"] == 6 and summary["n_candidates"] == 20
    assert summary["render_resolution"] == summary["clip_input_size"] == 16 and summary["n_views"] == 3
    assert summary["r_at_1"] == pytest.approx(np.mean([float(r["r_at_1"]) for r in rows]))
    assert all(float(r["r_at_1"]) in (0.0, 1 / 3, 2 / 3, 1.0) or abs(float(r["r_at_1"]) * 3 - round(float(r["r_at_1"]) * 3)) < 1e-6 for r in rows)
    assert len(list((one / "views").glob("*.png"))) == 6

    # Interrupted: the part file lost its last three rows (and a line cut short); the rerun computes only those.
    part = one / "parts" / "rank0.jsonl"
    lines = part.read_text().splitlines()
    part.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])
    (one / "summary.json").unlink()
    proc = evaluate_cli(*args, "--out", str(one))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3/3" in proc.stderr  # three prompts left to do
    assert read_scores(one) == rows

    two = tmp_path / "two"
    proc = evaluate_cli(*args, "--out", str(two), processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_scores(two) == rows  # prompts split over two ranks, merged: the same numbers
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
