"""Two CPU processes that really all-reduce (gloo): disjoint prompts per rank, full coverage per epoch,
identical parameters on both ranks; a crash of one rank ends the run with a message naming it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from amortized3d.data.corpora import load_corpus
from amortized3d.data.embedding_store import load_manifest, shard_sizes
from amortized3d.data.loader import EpochPlan
from tests.fixtures import REPO, TINY, free_port


def launch(*args: str) -> list[str]:
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args,
    ]


ENV = dict(os.environ, ACCELERATE_USE_CPU="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def test_two_processes_split_the_corpus_and_stay_in_sync(tmp_path):
    run = tmp_path / "run"
    cmd = launch(str(REPO / "train.py"), "--corpus", "shapeworld-16", "--output", str(run),
                 *TINY, "train.steps=8", "train.prompts_per_step=2", "train.record_prompts=true", "data.num_workers=1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {}
    for rank in (0, 1):
        lines = [json.loads(line) for line in (run / "prompts" / f"rank{rank}.jsonl").read_text().splitlines()]
        records[rank] = ([r for r in lines if "prompts" in r], lines[-1])
    train_prompts = load_corpus("shapeworld-16").train
    # 16 prompts, 2 ranks x 2 prompts per step: an epoch is 4 steps; 8 steps are 2 epochs.
    for epoch in (0, 1):
        seen = {rank: [p for r in records[rank][0] if epoch * 4 <= r["step"] < (epoch + 1) * 4 for p in r["prompts"]] for rank in (0, 1)}
        assert len(seen[0]) == len(seen[1]) == 8
        assert not set(seen[0]) & set(seen[1])  # disjoint across ranks
        assert sorted(seen[0] + seen[1]) == sorted(train_prompts)  # together: the train split once
    digests = {rank: records[rank][1]["parameters_sha256"] for rank in (0, 1)}
    assert digests[0] == digests[1]


def test_a_crashed_rank_ends_the_run_with_a_message(tmp_path):
    # The store is built by two processes with `amortized3d store build`; then a shard only rank 1 reads at
    # step 2 is damaged. Rank 1 fails there, while rank 0 waits in an all-reduce: the run must end, not hang.
    store = tmp_path / "store"
    settings = [*TINY, "train.steps=50", "train.prompts_per_step=2", f"data.store={store}", "data.shard_size=4", "data.num_workers=0"]
    build = subprocess.run(launch("-m", "amortized3d", "store", "build", "--corpus", "shapeworld-16", *settings),
                           capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert json.loads(build.stdout)["n_prompts"] == 16
    manifest = load_manifest(store)
    plan = EpochPlan(shard_sizes(manifest), 2, 2, seed=0)
    damaged = plan.batch(1, 2)[0][0]
    assert all(shard != damaged for m in range(4) for shard, _ in plan.batch(0, m))
    assert all(shard != damaged for m in range(2) for shard, _ in plan.batch(1, m))
    path = store / manifest["shards"][damaged]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, so training starts; the rank that reads the shard finds it by its sha256
    path.write_bytes(bytes(data))
    start = time.monotonic()
    proc = subprocess.run(launch(str(REPO / "train.py"), "--corpus", "shapeworld-16", "--output", str(tmp_path / "run"), *settings),
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode != 0 and time.monotonic() - start < 240
    assert "[rank 1 of 2] training stopped at step 2: StoreError" in proc.stderr, proc.stderr[-3000:]
    assert manifest["shards"][damaged] in proc.stderr


NAN_ON_RANK_1 = """
import sys
import torch
from amortized3d.cli import train_main
from amortized3d.training import train as train_module
from tests.fixtures import NaNAfter

original = train_module.build_prior


class NaNOnRank1AtSecondStep(NaNAfter):
    # The analytic prior, except that rank 1's second step predicts NaN noise (its loss is NaN; rank 0's is not).
    def predict_noise(self, *args):
        self.calls += 1
        eps = self.prior.predict_noise(*args)
        return eps * float("nan") if torch.distributed.get_rank() == 1 and self.calls == 2 else eps


train_module.build_prior = lambda cfg, *args, **kwargs: NaNOnRank1AtSecondStep(original(cfg), good_calls=0)
sys.exit(train_main(sys.argv[1:]))
"""


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path):
    # A rank with a NaN loss must not skip its backward alone (the other rank's gradient all-reduce would wait for it
    # forever): every rank skips that step, counts it, and the ranks end with identical parameters.
    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    run = tmp_path / "run"
    proc = subprocess.run(launch(str(script), "--corpus", "shapeworld-16", "--output", str(run), *TINY, "train.steps=4",
                                 "train.prompts_per_step=2", "train.record_prompts=true", "data.num_workers=0"),
                          capture_output=True, text=True, env=ENV, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    digests = {rank: json.loads((run / "prompts" / f"rank{rank}.jsonl").read_text().splitlines()[-1])["parameters_sha256"]
               for rank in (0, 1)}
    assert digests[0] == digests[1]
