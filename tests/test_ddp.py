"""DDP on the CPU: torchrun with 2 gloo processes against a single process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, TINY_RUN
from mars_m_exp.checkpoint import load_checkpoint
from mars_m_exp.metrics import read_metrics

pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None and not (Path(sys.executable).parent / "torchrun").exists(), reason="torchrun not installed")

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
# One sequence per micro-batch: 1 process accumulates 4, 2 processes accumulate 2 each.
DDP_RUN = [*TINY_RUN, "trainer.micro_batch_size=1", "schedule=constant", "schedule.warmup_steps=1", "trainer.eval_interval=100"]


def launch(run_dir: Path, nproc: int, *overrides: str) -> subprocess.CompletedProcess:
    args = [*DDP_RUN, *overrides, f"hydra.run.dir={run_dir}"]
    if nproc == 1:
        command = [sys.executable, "-m", "mars_m_exp", *args]
    else:
        command = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "mars_m_exp", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=run_dir.parent, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "latest.pt")["model"]


def assert_weights_close(actual: dict, expected: dict) -> None:
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("optim", ["mars_m", "moonlight", "adamw"])
def test_two_ranks_match_single_process(tmp_path, corpus_cache, optim):
    single = tmp_path / "single"
    launch(single, 1, f"+optim={optim}", "trainer.max_steps=3")
    ddp = tmp_path / "ddp"
    result = launch(ddp, 2, f"+optim={optim}", "trainer.max_steps=3")

    assert "4 sequences/step = 1 micro x 2 accumulation x 2 processes" in result.stdout + result.stderr
    assert_weights_close(final_weights(ddp), final_weights(single))


def test_only_rank_zero_writes_and_resume_continues(tmp_path, corpus_cache):
    straight = tmp_path / "straight"
    launch(straight, 1, "+optim=mars_m", "trainer.max_steps=4")
    ddp = tmp_path / "ddp"
    launch(ddp, 2, "+optim=mars_m", "trainer.max_steps=2")
    launch(ddp, 2, "+optim=mars_m", "trainer.max_steps=4")

    log = (ddp / "train.log").read_text()
    assert log.count("batch: 4 sequences/step") == 2
    assert "resumed from" in log
    assert "at step 2" in log
    steps = [r["step"] for r in read_metrics(ddp / "metrics.jsonl") if r["event"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert sorted(p.name for p in (ddp / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert_weights_close(final_weights(ddp), final_weights(straight))


def test_gradients_all_reduced_to_rank_mean(tmp_path, corpus_cache):
    out = tmp_path / "grads.json"
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", str(REPO_ROOT / "tests" / "ddp_gradient_check.py"), str(out), *DDP_RUN, "+optim=mars_m"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    report = json.loads(out.read_text())
    assert report["max_difference_between_ranks"] == 0.0
    assert report["max_difference_from_mean_of_local"] < 1e-6
    assert report["gradient_norm"] > 0.0


@pytest.mark.parametrize("optim", ["moonlight"])
def test_sharded_orthogonalization_matches_replicated(tmp_path, corpus_cache, optim):
    sharded = tmp_path / "sharded"
    result = launch(sharded, 2, f"+optim={optim}", "trainer.max_steps=3")
    replicated = tmp_path / "replicated"
    launch(replicated, 2, f"+optim={optim}", "trainer.max_steps=3", "optim.shard_orthogonalization=false")

    assert "Newton-Schulz sharded across 2 ranks" in result.stdout + result.stderr
    assert_weights_close(final_weights(sharded), final_weights(replicated))
