"""The trainer under torchrun (2 gloo processes on the CPU): data parallel (DDP) and context
parallel (each sequence split across ranks, ring attention) follow the same loss trajectory
as one process with the same global batch; rank 0 alone writes the log and checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import requires_cpu_ext

ARGS = ["--task", "text", "--steps", "4", "--seq-len", "64", "--batch-size", "4",
        "--n-layer", "2", "--n-embd", "64", "--n-head", "4", "--n-kv-head", "2",
        "--eval-every", "100", "--eval-batches", "1", "--log-every", "1", "--warmup", "2",
        "--no-progress", "--no-plot", "--threads", "1"]


def _run(out, nproc, *extra):
    if nproc == 1:
        cmd = [sys.executable, "-m", "fastattn", "train"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "fastattn", "train"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd + ARGS + ["--out", str(out), *extra], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    return [h["loss"] for h in recs if "loss" in h], r.stdout


@requires_cpu_ext
@pytest.mark.parametrize("mode", ["ddp", "context-parallel"])
def test_torchrun_matches_single_process(mode, tmp_path):
    single, _ = _run(tmp_path / "single", 1)
    extra = ["--context-parallel"] if mode == "context-parallel" else []
    multi, stdout = _run(tmp_path / mode, 2, *extra)
    assert len(multi) == len(single) == 4
    for s, m in zip(single, multi, strict=True):
        assert abs(s - m) <= 1e-4 * abs(s), f"{mode}: losses {multi} vs single process {single}"
    assert stdout.count("[train] final") == 1, "only rank 0 should print"
    assert (tmp_path / mode / "ckpt.pt").exists()
    assert not [p for p in os.listdir(tmp_path / mode) if ".tmp" in p]


@requires_cpu_ext
@pytest.mark.slow
def test_torchrun_resume_continues_the_same_trajectory(tmp_path):
    full, _ = _run(tmp_path / "full", 2)
    _run(tmp_path / "part", 2, "--stop-after", "2")
    resumed, _ = _run(tmp_path / "part", 2, "--resume")
    assert len(resumed) == 4
    for a, b in zip(full, resumed, strict=True):
        assert abs(a - b) <= 1e-6 * abs(a), f"resumed {resumed} vs uninterrupted {full}"
