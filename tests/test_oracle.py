"""Oracle retrieval metrics against a brute-force loop and hand-made cases (ties included)."""

from __future__ import annotations

import math

import torch

from amortized3d.evaluation.oracle import retrieval_metrics


def brute_force_r_at_1(renders, references, valid, own):
    """For every prompt and view: is no candidate strictly nearer (by more than rounding) than the prompt's own?"""
    P, V = renders.shape[:2]
    out = []
    for p in range(P):
        hits = 0
        for v in range(V):
            d = []
            for c in range(references.shape[0]):
                scenes = [((renders[p, v] - references[c, k, v]) ** 2).mean().item() for k in range(references.shape[1]) if valid[c, k]]
                d.append(min(scenes))
            hits += d[own[p]] <= min(d) * (1 + 1e-5) + 1e-12
        out.append(hits / V)
    return torch.tensor(out)


def test_r_at_1_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    C, K, V = 5, 3, 4
    references = torch.rand(C, K, V, 3, 6, 6, generator=gen)
    valid = torch.rand(C, K, generator=gen) < 0.7
    valid[:, 0] = True
    own = torch.tensor([0, 2, 4, 1])
    # Renders: noisy copies of their own first scene, some replaced by another candidate's scene.
    renders = references[own, 0] + 0.05 * torch.randn(4, V, 3, 6, 6, generator=gen)
    renders[1, 2] = references[3, 0, 2]
    renders[3, 0] = references[0, 1, 0] + 0.01
    got = retrieval_metrics(renders, references, valid, own)
    torch.testing.assert_close(got["r_at_1"], brute_force_r_at_1(renders, references, valid, own))
    assert got["r_at_1"][1] == 0.75 and got["r_at_1"][3] == 0.75


def test_a_shared_exact_render_counts_as_a_hit_and_similarity_is_one():
    # Candidate 0 is under-specified with two scenes; its second scene is candidate 1's only scene.
    scene_a, scene_b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    references = torch.stack([torch.stack([scene_a, scene_b]), torch.stack([scene_b, scene_b])])  # [C=2, K=2, V=2, ...]
    valid = torch.tensor([[True, True], [True, False]])
    renders = scene_b.unsqueeze(0)  # the query is candidate 1 and the render is exactly its scene
    got = retrieval_metrics(renders, references, valid, torch.tensor([1]))
    assert got["r_at_1"].item() == 1.0 and math.isclose(got["similarity"].item(), 1.0, abs_tol=1e-4)
    # A render of scene_a is not candidate 1 (which only holds scene_b).
    miss = retrieval_metrics(scene_a.unsqueeze(0), references, valid, torch.tensor([1]))
    assert miss["r_at_1"].item() == 0.0 and math.isclose(miss["similarity"].item(), 0.0, abs_tol=1e-6)
