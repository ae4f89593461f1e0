"""The launch files parse with Accelerate's own config loader and say what the README says they do."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


@pytest.mark.parametrize("name, kind, processes, machines", [
    ("accelerate_1gpu.yaml", "NO", 1, 1),
    ("accelerate_8gpu.yaml", "MULTI_GPU", 8, 1),
    ("accelerate_2nodes_8gpu.yaml", "MULTI_GPU", 16, 2),
    ("deepspeed_zero2.yaml", "DEEPSPEED", 8, 1),
])
def test_accelerate_configs(name, kind, processes, machines):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(LAUNCH / name))
    assert (config.distributed_type.value, config.num_processes, config.num_machines) == (kind, processes, machines)
    assert config.mixed_precision == "no"  # precision is the run's train.mixed_precision
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2


@pytest.mark.parametrize("script", ["slurm_8gpu.sh", "slurm_2nodes.sh", "cpu_two_processes.sh"])
def test_shell_scripts_parse(script):
    subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
