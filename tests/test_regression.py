"""Refactor regression check: 20 training steps of every generator kind and distillation method with the analytic
prior, the Stable Diffusion and DeepFloyd IF priors on tiny random models, and the oracle report of a short run,
must give bit-identical numbers to the ones recorded before the refactor (tests/regression/expected.json, written
by tests/regression/record.py at the commit it names). A difference means behaviour changed: find why, or, for an
intended change, re-record and say so in the commit.

Bit-identical holds within one machine's float arithmetic (record.py: arithmetic_fingerprint): a run is compared
with the recording of its machine's arithmetic, or with the first, unfingerprinted recording. On a CPU whose
arithmetic matches no recording, only the first step is compared, within float32 rounding (later steps amplify
last-bit differences: 20 steps of VSD turn them into different runs), and the test skips, saying so; record that
machine with `python -m tests.regression.record --add-machine` at a commit whose test passes on a recorded one."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.regression.record import CASES, EXPECTED, THREADS, arithmetic_fingerprint, run_case

RECORDED = json.loads(EXPECTED.read_text())  # {"threads", "recordings": [{"fingerprint", "cpu", ..., "cases"}]}
FINGERPRINT = arithmetic_fingerprint()
FIRST_STEP_RTOL = 1e-4  # float32 results of other kernels differ by ~1e-5 relative at most in the first step


def difference(got: dict, want: dict) -> str | None:
    """Where a run's numbers differ from a recording's (None: bit for bit the same)."""
    if len(got["steps"]) != len(want["steps"]):
        return f"{len(got['steps'])} steps logged, {len(want['steps'])} recorded"
    for step, (g, w) in enumerate(zip(got["steps"], want["steps"]), start=1):
        if g != w:
            return f"step {step}: " + ", ".join(f"{k} {w.get(k)} -> {g.get(k)}" for k in sorted(set(g) | set(w)) if g.get(k) != w.get(k))
    if recorded_keys(got.get("report"), want.get("report")) != want.get("report"):
        return f"oracle report: recorded {want.get('report')}, now {got.get('report')}"
    if got.get("mesh") != want.get("mesh"):
        return "the mesh differs"
    return None


def first_step_far(got: dict, want: dict) -> dict:
    """The first step's numbers that differ from the recording's by more than float32 rounding of other kernels."""
    if not want["steps"]:
        return {}
    g, w = got["steps"][0], want["steps"][0]
    def close(a, b) -> bool:
        if isinstance(a, float) and isinstance(b, float):
            return math.isclose(a, b, rel_tol=FIRST_STEP_RTOL, abs_tol=1e-9)
        return a == b

    return {k: (w.get(k), g.get(k)) for k in set(w) | set(g) if not close(g.get(k), w.get(k))}


@pytest.mark.parametrize("name", CASES)
def test_numbers_equal_the_recorded_ones(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert RECORDED["threads"] == THREADS
    threads = torch.get_num_threads()
    try:
        got = run_case(name, tmp_path)
    finally:
        torch.set_num_threads(threads)
    holding = [r for r in RECORDED["recordings"] if name in r["cases"]]
    assert holding, f"{name}: recorded on no machine; python -m tests.regression.record {name}"
    mine = next((r for r in holding if r["fingerprint"] == FINGERPRINT), None)
    if mine is not None:
        why = difference(got, mine["cases"][name])
        assert why is None, why
        return
    if any(r["fingerprint"] is None and difference(got, r["cases"][name]) is None for r in holding):
        return  # the first recording's machine
    far = first_step_far(got, holding[0]["cases"][name])
    assert not far, f"step 1 (recorded, now): {far}"
    compared = f"step 1 agrees within {FIRST_STEP_RTOL:g}" if got["steps"] else "nothing compared"
    pytest.skip(f"this CPU's float arithmetic (fingerprint {FINGERPRINT}) matches no recording of {name}: {compared}; "
                "for the bit-for-bit check, python -m tests.regression.record --add-machine at a commit whose test "
                "passes on a recorded machine")


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
