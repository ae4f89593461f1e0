"""Two CPU processes that really all-reduce (gloo): disjoint prompts per rank, full coverage per epoch,
identical parameters on both ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.test_training import TINY

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_split_the_corpus_and_stay_in_sync(tmp_path):
    run = tmp_path / "run"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        str(REPO / "train.py"), "--corpus", "shapeworld-16", "--output", str(run),
        *TINY, "train.steps=8", "train.prompts_per_step=2", "train.record_prompts=true",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {}
    for rank in (0, 1):
        lines = [json.loads(line) for line in (run / "prompts" / f"rank{rank}.jsonl").read_text().splitlines()]
        records[rank] = ([r for r in lines if "indices" in r], lines[-1])
    # 16 prompts, 2 ranks x 2 prompts per step: an epoch is 4 steps; 8 steps are 2 epochs.
    for epoch in (0, 1):
        seen = {rank: [i for r in records[rank][0] if epoch * 4 <= r["step"] < (epoch + 1) * 4 for i in r["indices"]] for rank in (0, 1)}
        assert len(seen[0]) == len(seen[1]) == 8
        assert not set(seen[0]) & set(seen[1])  # disjoint across ranks
        assert sorted(seen[0] + seen[1]) == list(range(16))  # together: the train split once
    digests = {rank: records[rank][1]["parameters_sha256"] for rank in (0, 1)}
    assert digests[0] == digests[1]
