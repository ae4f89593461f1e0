"""Refactor regression check: 20 training steps of every generator kind and distillation method with the analytic
prior, the Stable Diffusion and DeepFloyd IF priors on tiny random models, and the oracle report of a short run,
must give bit-identical numbers to the ones recorded before the refactor (tests/regression/expected.json, written
by tests/regression/record.py at the commit it names). A difference means behaviour changed: find why, or, for an
intended change, re-record and say so in the commit."""

from __future__ import annotations

import json

import pytest
import torch

from tests.regression.record import CASES, EXPECTED, THREADS, run_case

RECORDED = json.loads(EXPECTED.read_text())


@pytest.mark.parametrize("name", CASES)
def test_numbers_equal_the_recorded_ones(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    try:
        got = run_case(name, tmp_path)
    finally:
        torch.set_num_threads(threads)
    want = RECORDED["cases"][name]
    assert RECORDED["threads"] == THREADS
    assert len(got["steps"]) == len(want["steps"])
    for step, (g, w) in enumerate(zip(got["steps"], want["steps"]), start=1):
        assert g == w, f"step {step}: " + ", ".join(f"{k} {w.get(k)} -> {g.get(k)}" for k in sorted(set(g) | set(w)) if g.get(k) != w.get(k))
    assert recorded_keys(got.get("report"), want.get("report")) == want.get("report")
    assert got.get("mesh") == want.get("mesh")


# metrics the oracle report gained after the recording (an addition: every recorded value must stay the same)
ADDED_METRICS = {"view_consistency", "view_consistency_seen", "view_consistency_unseen", "view_consistency_open"}


def recorded_keys(report: dict | None, recorded: dict | None) -> dict | None:
    """The report without the ADDED_METRICS that the recorded one lacks."""
    if report is None or recorded is None:
        return report
    drop = lambda row, have: {k: v for k, v in row.items() if k in have or k not in ADDED_METRICS}  # noqa: E731
    return {**report, "summary": drop(report["summary"], recorded["summary"]),
            "per_prompt": [drop(row, old) for row, old in zip(report["per_prompt"], recorded["per_prompt"])]
            + report["per_prompt"][len(recorded["per_prompt"]):]}
