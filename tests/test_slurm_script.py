"""scripts/slurm.sh without a cluster: what it launches, with stand-ins for SLURM's commands (the
job itself under a real SLURM: tests/test_slurm.py)."""

from __future__ import annotations

import os
import subprocess

import pytest

from trainer_utils import REPO


@pytest.mark.parametrize("gpus_on_node, processes", [(None, 1), ("4", 4)])
def test_processes_per_node_default_to_the_nodes_gpus_else_one(tmp_path, gpus_on_node, processes):
    """scripts/slurm.sh with stand-ins for srun and scontrol (they print what they are asked): a job
    without GPUs (--gpus-per-node=0: SLURM sets no SLURM_GPUS_ON_NODE) launches one process per node."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text('#!/bin/sh\necho "srun $*"\n')
    (stubs / "scontrol").write_text('#!/bin/sh\necho node1\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("SLURM_", "PROCESSES_PER_NODE"))}
    env.update(PATH=f"{stubs}{os.pathsep}{env['PATH']}", SLURM_SUBMIT_DIR=str(tmp_path), SLURM_JOB_ID="7",
               SLURM_NNODES="1", SLURM_JOB_NODELIST="node1", CLSVIT_REPO=str(REPO))
    if gpus_on_node is not None:
        env["SLURM_GPUS_ON_NODE"] = gpus_on_node
    result = subprocess.run(["bash", str(REPO / "scripts" / "slurm.sh"), "recipes/shapes/baseline.yaml"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"--num_machines 1 --num_processes {processes} " in result.stdout, result.stdout
