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
from tests.fixtures import REPO, free_port, hide_viewer, tiny_config


def dense_reference(image: torch.Tensor, text: torch.Tensor, own: int):
    """Every score at once: hit when no other candidate scores higher than the own prompt."""
    scores = image @ text.T  # [V, N]
    own_score = scores[:, own]
    others = torch.cat([scores[:, :own], scores[:, own + 1 :]], 1)
    return own_score >= others.max(1).values, own_score


def blocks_of(text: torch.Tensor, size: int) -> list[np.ndarray]:
    return [text[i : i + size].half().numpy() for i in range(0, len(text), size)]


def test_chunked_scores_equal_the_dense_ones(tmp_path):
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
        paths = []
        for j, block in enumerate(blocks_of(text, 50)):
            paths.append(tmp_path / f"{own}-{j}.npy")
            np.save(paths[-1], block)
        hit, sim = score_views(image, paths, own)  # read from .npy files, as evaluate_clip does
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
    assert done_by[0] == blocks
    blocks = [np.load(b) for b in blocks]
    assert [len(b) for b in blocks] == [4, 4, 2]
    torch.testing.assert_close(torch.from_numpy(np.concatenate(blocks)).float(), expected)
    calls = clip.calls
    again = text_feature_blocks(clip, prompts, two_ranks, progress=False)
    assert clip.calls == calls and all(np.array_equal(np.load(a), b) for a, b in zip(again, blocks))  # from the cache
    one_rank = text_feature_blocks(clip, prompts, tmp_path / "one", progress=False)
    assert all(np.array_equal(np.load(a), b) for a, b in zip(one_rank, blocks))


@pytest.fixture(scope="module")
def tiny_run_and_clip(tmp_path_factory):
    from amortized3d.priors.tiny import make_tiny_clip
    from amortized3d.training.train import train

    root = tmp_path_factory.mktemp("clip_eval")
    run = train(tiny_config("train.steps=2", "train.ckpt_every=2"), root / "run")
    return run, make_tiny_clip(root / "clip", image_size=16)


def evaluate_cli(*args: str, processes: int = 1) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    if processes == 1:
        cmd = [sys.executable, "-m", "amortized3d", "evaluate", *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "amortized3d", "evaluate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def read_scores(folder: Path) -> list[dict]:
    with open(folder / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_with_a_tiny_clip_resumes_and_merges_ranks_exactly(tiny_run_and_clip, tmp_path):
    run, clip = tiny_run_and_clip
    args = ["--checkpoint", str(run), "--clip", str(clip), "--views", "3", "--limit", "6", "--gallery", "0"]
    one = tmp_path / "one"
    proc = evaluate_cli(*args, "--out", str(one), "--save-views", "--gallery", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((one / "summary.json").read_text())
    rows = read_scores(one)
    assert [int(r["index"]) for r in rows] == list(range(6)) and summary["n_prompts"] == 6 and summary["n_candidates"] == 20
    assert summary["render_resolution"] == summary["clip_input_size"] == 16 and summary["n_views"] == 3
    assert summary["r_at_1"] == pytest.approx(np.mean([float(r["r_at_1"]) for r in rows]))
    assert all(float(r["r_at_1"]) in (0.0, 1 / 3, 2 / 3, 1.0) or abs(float(r["r_at_1"]) * 3 - round(float(r["r_at_1"]) * 3)) < 1e-6 for r in rows)
    assert len(list((one / "views").glob("*.png"))) == 6
    page = (one / "gallery" / "index.html").read_text()  # the first two prompts, with their CLIP scores
    assert page.count('<div class="card">') == 2 and rows[0]["prompt"] in page and "CLIP R@1" in page
    assert json.loads(proc.stdout)["gallery"] == str(one / "gallery" / "index.html")

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


def test_evaluate_without_the_3d_viewer_still_writes_its_summary_and_gallery(tiny_run_and_clip, tmp_path, monkeypatch, capsys):
    """`npm ci` not run: the default --gallery must not fail the evaluation after scoring; its page shows turntables."""
    from amortized3d.cli import main

    hide_viewer(monkeypatch, tmp_path / "empty")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    run, clip = tiny_run_and_clip
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run), "--clip", str(clip), "--views", "2", "--limit", "2", "--gallery", "1",
                 "--out", str(out)]) == 0  # in-process: the search for the viewer is hidden above
    captured = capsys.readouterr()
    assert json.loads((out / "summary.json").read_text())["n_prompts"] == 2
    assert json.loads(captured.out)["gallery"] == str(out / "gallery" / "index.html")
    page = (out / "gallery" / "index.html").read_text()
    assert page.count('<div class="card">') == 1 and "CLIP R@1" in page and "<model-viewer" not in page and "npm ci" in page
    assert 'download>mesh (GLB)</a>' in page or "no mesh:" in page
    assert "has no interactive 3D view" in captured.err


# --- the two backends agree on the same weights -------------------------------------------------------------

TINY_OPEN_CLIP = {
    "embed_dim": 16, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def open_clip_to_transformers(state: dict, layers: int) -> dict:
    """An OpenAI-layout open_clip state dict in transformers' CLIPModel names (q, k, v split from in_proj)."""
    out = {"logit_scale": state["logit_scale"], "text_projection.weight": state["text_projection"].T.contiguous(),
           "visual_projection.weight": state["visual.proj"].T.contiguous(),
           "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
           "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
           "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
           "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"]}
    for name, hf in (("ln_final", "text_model.final_layer_norm"), ("visual.ln_pre", "vision_model.pre_layrnorm"),
                     ("visual.ln_post", "vision_model.post_layernorm")):
        out[f"{hf}.weight"], out[f"{hf}.bias"] = state[f"{name}.weight"], state[f"{name}.bias"]
    for tower, hf_tower in (("transformer", "text_model"), ("visual.transformer", "vision_model")):
        for i in range(layers):
            src, dst = f"{tower}.resblocks.{i}", f"{hf_tower}.encoder.layers.{i}"
            for kind in ("weight", "bias"):
                q, k, v = state[f"{src}.attn.in_proj_{kind}"].chunk(3)
                out[f"{dst}.self_attn.q_proj.{kind}"], out[f"{dst}.self_attn.k_proj.{kind}"], out[f"{dst}.self_attn.v_proj.{kind}"] = q, k, v
                for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[f"{dst}.{b}.{kind}"] = state[f"{src}.{a}.{kind}"]
    return {k: v.contiguous() for k, v in out.items()}


def test_open_clip_and_transformers_backends_give_the_same_numbers(tmp_path):
    from amortized3d._compat import import_torchvision_safely

    import_torchvision_safely()
    open_clip = pytest.importorskip("open_clip", reason="the open_clip backend needs open-clip-torch and torchvision")
    from transformers import CLIPConfig, CLIPModel

    from amortized3d.evaluation.clip_models import load_clip
    from amortized3d.priors.tiny import make_tiny_clip

    (tmp_path / "tiny-clip-test.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(tmp_path / "tiny-clip-test.json")  # a tiny architecture in OpenAI's layout (QuickGELU)
    torch.manual_seed(3)
    model = open_clip.create_model("tiny-clip-test", pretrained=None)
    weights = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), weights)
    hf_folder = make_tiny_clip(tmp_path / "hf", image_size=32, projection_dim=16)  # tokenizer, processor, config layout
    config = CLIPConfig.from_pretrained(hf_folder)
    config.text_config.intermediate_size = config.vision_config.intermediate_size = 128  # open_clip's mlp_ratio 4
    config.text_config.hidden_act = config.vision_config.hidden_act = "quick_gelu"
    hf = CLIPModel(config)
    missing, unexpected = hf.load_state_dict(open_clip_to_transformers(model.state_dict(), 2), strict=False)
    assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
    hf.save_pretrained(hf_folder)

    a, b = load_clip(str(hf_folder)), load_clip(f"open_clip:tiny-clip-test@{weights}")
    prompts = ["a large red cube", "a small blue sphere to the left of a cone", "a frog " * 90]  # the last is truncated
    torch.testing.assert_close(a.encode_text(prompts), b.encode_text(prompts), atol=2e-5, rtol=1e-4)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.encode_images(images), b.encode_images(images), atol=2e-5, rtol=1e-4)
    text = a.encode_text(prompts)
    for own in range(3):
        assert torch.equal(score_views(a.encode_images(images), [text.numpy()], own)[0], score_views(b.encode_images(images), [text.numpy()], own)[0])


def test_open_clip_without_a_tag_means_openai_weights_and_missing_ones_fail_clearly(tiny_run_and_clip, tmp_path):
    from amortized3d._compat import import_torchvision_safely

    import_torchvision_safely()
    pytest.importorskip("open_clip", reason="the open_clip backend needs open-clip-torch and torchvision")
    run, _ = tiny_run_and_clip
    proc = evaluate_cli("--checkpoint", str(run), "--clip", "open_clip:ViT-B-32", "--out", str(tmp_path / "e"))  # offline: no weights
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: cannot load open_clip 'ViT-B-32' with pretrained='openai'" in proc.stderr
