"""DeepSpeed ZeRO-2 through Accelerate, on two CPU processes (gloo), with the trainer as users launch it.

ZeRO stage 2 shards the optimizer state and the gradients across processes but computes the same update as plain
data parallelism (Rajbhandari et al., ZeRO, Sec. 5): so a ZeRO-2 run must equal the DDP run of the same config, and a
ZeRO-2 run resumed from its sharded checkpoint must equal the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from amortized3d.training.checkpoint import CheckpointError, load_checkpoint, load_deepspeed_shards
from tests.fixtures import REPO, TINY, free_port

pytest.importorskip("deepspeed", reason="DeepSpeed is installed by the README's set-up command (the dev extra)")

# VSD: the generator under ZeRO-2 and a learned branch (its LoRA-like adapter and optimizer) beside it
SETTINGS = [*TINY, "train.steps=4", "train.ckpt_every=2", "train.keep_checkpoints=2", "data.num_workers=0", "distill.method=vsd"]


def launch(*args: str, deepspeed: bool) -> list[str]:
    mode = ["--use_deepspeed", "--zero_stage", "2"] if deepspeed else ["--multi_gpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *args]


def train(run, extensions, *extra: str, deepspeed: bool, script=REPO / "train.py") -> subprocess.CompletedProcess:
    # DeepSpeed on the CPU is the run's DeepSpeed plugin (ACCELERATE_USE_CPU would silently drop it); DDP on the CPU
    # needs ACCELERATE_USE_CPU. DeepSpeed builds a small C++ op on first use, into TORCH_EXTENSIONS_DIR.
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(extensions))
    if not deepspeed:
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = launch(str(script), "--corpus", "shapeworld-16", "--output", str(run), *SETTINGS, *extra, deepspeed=deepspeed)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def weights(run, step: int, file: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / file))


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("deepspeed")
    train(root / "zero2", root / "extensions", deepspeed=True)
    train(root / "ddp", root / "extensions", deepspeed=False)
    return root


def test_zero2_trains_exactly_as_data_parallel(runs):
    # Before the trainer set DeepSpeed's clipping to the run's (none), Accelerate's default clipped at norm 1.0 and the
    # weights differed by 0.03 after 4 steps; micro-batch and accumulation come from the run, not from DeepSpeed's config.
    for file in ("model.safetensors", "adapter.safetensors"):
        zero2, ddp = weights(runs / "zero2", 4, file), weights(runs / "ddp", 4, file)
        assert zero2.keys() == ddp.keys()
        for name in ddp:
            torch.testing.assert_close(zero2[name], ddp[name], rtol=1e-5, atol=1e-6, msg=f"{file}: {name}")
    assert losses(runs / "zero2") == pytest.approx(losses(runs / "ddp"), rel=1e-5)


def test_zero2_checkpoint_holds_each_rank_shard_and_resumes_exactly(runs, tmp_path):
    step2 = runs / "zero2" / "checkpoints" / "step_00000002"
    shards = sorted(p.name for p in (step2 / "deepspeed" / "zero").glob("zero_pp_rank_*_optim_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert not (step2 / "optimizer.safetensors").exists()
    # The interrupted run: the same folder as it was after step 2. Resumed to step 4, it must equal the run that
    # was never interrupted, which it can only do with the Adam moments of both shards restored.
    resumed = tmp_path / "resumed"
    shutil.copytree(runs / "zero2", resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002")
    train(resumed, runs / "extensions", "--resume", deepspeed=True)
    # Exact only if every rank restarts with the learned branch it had: the branch is not DeepSpeed's, so the ranks
    # must hold the same one all along (before the trainer broadcast rank 0's initial weights, each rank trained its
    # own, and the resumed weights differed by 0.003 after 2 steps, under ZeRO-2 and DDP alike).
    for file in ("model.safetensors", "adapter.safetensors"):
        uninterrupted, again = weights(runs / "zero2", 4, file), weights(resumed, 4, file)
        assert all(torch.equal(uninterrupted[name], again[name]) for name in uninterrupted), file


def test_zero2_checkpoint_loads_for_inference_and_refuses_a_resume_without_deepspeed(runs):
    from amortized3d.builders import load_run

    _, model, state = load_run(runs / "zero2")  # as generate and evaluate read a run: only the weights
    assert state["step"] == 4
    final = weights(runs / "zero2", 4)
    assert all(torch.equal(p, final[name]) for name, p in model.state_dict().items())
    optimizer = torch.optim.Adam(model.parameters())
    folder = runs / "zero2" / "checkpoints" / "step_00000004"
    with pytest.raises(CheckpointError, match=r"written under DeepSpeed \(2 processes\).*--num_processes 2"):
        load_checkpoint(folder, model, optimizer)
    with pytest.raises(CheckpointError, match=r"shards of 2 processes, and this run has 1: resume with --num_processes 2"):
        load_deepspeed_shards(None, folder, world=1)  # refused before DeepSpeed is asked
    plain = runs / "ddp" / "checkpoints" / "step_00000004"
    with pytest.raises(CheckpointError, match="written without DeepSpeed"):
        load_deepspeed_shards(None, plain, world=2)


def test_zero2_skips_a_non_finite_step_on_every_rank(runs, tmp_path):
    """The non-finite guard under ZeRO-2: rank 1's second step has a NaN loss (tests/test_distributed.py's script);
    every rank skips that step's backward (DeepSpeed steps inside it), counts it, and the ranks stay identical."""
    from tests.test_distributed import NAN_ON_RANK_1

    script = tmp_path / "nan_on_rank_1.py"
    script.write_text(NAN_ON_RANK_1)
    run = tmp_path / "run"
    train(run, runs / "extensions", "distill.method=asd", "train.record_prompts=true", deepspeed=True, script=script)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 1]
    digests = [json.loads((run / "prompts" / f"rank{rank}.jsonl").read_text().splitlines()[-1])["parameters_sha256"] for rank in (0, 1)]
    assert digests[0] == digests[1]
