"""End-to-end training on the embedded corpus: loss, outputs, checkpoints, resume, CLI."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN, compose_config
from mars_m_exp.checkpoint import load_checkpoint
from mars_m_exp.config import resolve_config
from mars_m_exp.metrics import read_metrics
from mars_m_exp.trainer import run_training


def train(run_dir: Path, *overrides: str):
    cfg = resolve_config(compose_config(TINY_RUN + list(overrides)))
    return run_training(cfg, run_dir, launch_dir=run_dir.parent)


def eval_losses(run_dir: Path) -> list[float]:
    return [r["val_loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "eval"]


@pytest.mark.parametrize("optim, lr", [("mars_m", 0.02), ("moonlight", 0.02), ("adamw", 0.003), ("mars_m_exact", 0.02)])
def test_short_run_loss_falls(tmp_path, corpus_cache, optim, lr):
    run_dir = tmp_path / "run"
    train(run_dir, f"+optim={optim}", f"optim.lr={lr}", "trainer.max_steps=30", "trainer.eval_interval=30")

    losses = eval_losses(run_dir)
    assert len(losses) == 2
    assert losses[0] > 10.0
    assert losses[-1] < losses[0] - 2.0


def test_run_directory_outputs(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    train(run_dir, "+optim=mars_m", "trainer.max_steps=4", "trainer.eval_interval=2")

    records = read_metrics(run_dir / "metrics.jsonl")
    train_records = [r for r in records if r["event"] == "train"]
    eval_records = [r for r in records if r["event"] == "eval"]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert [r["step"] for r in eval_records] == [0, 2, 4]
    assert train_records[-1]["tokens"] == 4 * 4 * 64
    for key in ("train_loss", "lr", "elapsed_s", "tokens_per_s", "ms_per_step"):
        assert isinstance(train_records[-1][key], float)
    assert (run_dir / "loss.png").stat().st_size > 10_000
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "checkpoints" / "latest.pt").exists()
    assert (run_dir / "checkpoints" / "best.pt").exists()


def test_checkpoint_contents(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    train(run_dir, "+optim=mars_m", "trainer.max_steps=2", "trainer.eval_interval=2")

    checkpoint = load_checkpoint(run_dir / "checkpoints" / "latest.pt")
    assert checkpoint["step"] == 2
    assert checkpoint["tokens"] == 2 * 4 * 64
    assert "transformer.wte.weight" in checkpoint["model"]
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in checkpoint["model"])
    assert checkpoint["sampler"]["position"] == 2
    assert checkpoint["config"]["optim"]["name"] == "mars_m"
    assert isinstance(checkpoint["rng"]["torch"], torch.Tensor)
    assert checkpoint["optimizer"]["state"]


@pytest.mark.parametrize("optim", ["mars_m", "mars_m_exact", "moonlight", "adamw"])
def test_resume_matches_uninterrupted_run(tmp_path, corpus_cache, optim):
    # A constant schedule, so the first half's lr does not depend on max_steps.
    common = [f"+optim={optim}", "schedule=constant", "schedule.warmup_steps=2", "trainer.eval_interval=100"]
    straight = tmp_path / "straight"
    train(straight, *common, "trainer.max_steps=6")
    resumed = tmp_path / "resumed"
    train(resumed, *common, "trainer.max_steps=3")
    train(resumed, *common, "trainer.max_steps=6")

    expected = load_checkpoint(straight / "checkpoints" / "latest.pt")["model"]
    actual = load_checkpoint(resumed / "checkpoints" / "latest.pt")["model"]
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def test_resume_false_starts_over(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    train(run_dir, "+optim=mars_m", "trainer.max_steps=2", "trainer.eval_interval=100")
    state = train(run_dir, "+optim=mars_m", "trainer.max_steps=2", "trainer.eval_interval=100", "resume=false")
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "train"]
    assert state.step == 2
    assert steps == [1, 2, 1, 2]


def test_resume_with_other_model_rejected(tmp_path, corpus_cache):
    from mars_m_exp.config import ConfigError

    run_dir = tmp_path / "run"
    train(run_dir, "+optim=mars_m", "trainer.max_steps=1", "trainer.eval_interval=100")
    with pytest.raises(ConfigError, match=r"model.n_layer: checkpoint 4, config 2.*resume=false"):
        train(run_dir, "+optim=mars_m", "model.n_layer=2", "trainer.max_steps=2")


def test_exact_form_logs_two_gradient_evaluations(tmp_path, corpus_cache, caplog):
    with caplog.at_level(logging.INFO, logger="mars_m_exp.trainer"):
        train(tmp_path / "run", "+optim=mars_m_exact", "trainer.max_steps=1", "trainer.eval_interval=100")
    assert "exact MARS-M: 2 gradient evaluations per step (4 forward/backward passes per rank)" in caplog.text


def cli(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mars_m_exp", *TINY_RUN, *overrides, f"hydra.run.dir={run_dir}"]


def test_cli_sigterm_then_rerun_resumes(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    command = cli(run_dir, "+optim=mars_m", "trainer.max_steps=400", "trainer.eval_interval=1000", "trainer.checkpoint_interval=1000")
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if metrics.exists() and sum(r["event"] == "train" for r in read_metrics(metrics)) >= 3:
            break
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)

    assert process.returncode == 128 + signal.SIGTERM, output
    stopped_at = load_checkpoint(run_dir / "checkpoints" / "latest.pt")["step"]
    assert stopped_at >= 3

    rerun = subprocess.run(
        cli(run_dir, "+optim=mars_m", "trainer.max_steps=400", "trainer.eval_interval=1000", "trainer.checkpoint_interval=1000", f"trainer.max_steps={stopped_at + 2}"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"resumed from {run_dir / 'checkpoints' / 'latest.pt'} at step {stopped_at}" in rerun.stdout + rerun.stderr
    steps = [r["step"] for r in read_metrics(metrics) if r["event"] == "train"]
    assert steps[-2:] == [stopped_at + 1, stopped_at + 2]


def test_cli_wandb_offline_writes_local_run(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    env = {**os.environ, "WANDB_DIR": str(tmp_path), "WANDB_MODE": "offline"}
    result = subprocess.run(
        cli(run_dir, "+optim=adamw", "trainer.max_steps=2", "trainer.eval_interval=2", "logger.wandb.mode=offline"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    assert offline_runs[0].name.endswith(run_id)
    assert list(offline_runs[0].glob("*.wandb"))
