"""Faults: kills at any moment, corrupted or unsafe checkpoints, non-finite values, a full disk."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_RUN, compose_config
from mars_m_exp import checkpoint as checkpoint_module
from mars_m_exp.checkpoint import CheckpointError, load_checkpoint, load_newest_valid, save_checkpoint
from mars_m_exp.config import resolve_config
from mars_m_exp.metrics import read_metrics
from mars_m_exp.trainer import NonFiniteError, Trainer, run_training
from mars_m_exp.distributed import DistEnv

HERE = Path(__file__).resolve().parent
# Constant lr and frequent checkpoints, so an interrupted run has something to resume from.
FAULT_RUN = [*TINY_RUN, "+optim=mars_m", "schedule=constant", "schedule.warmup_steps=1", "trainer.eval_interval=100", "trainer.checkpoint_interval=2"]


def cli_command(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "mars_m_exp", *FAULT_RUN, *overrides, f"hydra.run.dir={run_dir}"]


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoints" / "latest.pt")["model"]


def assert_bitwise_equal(actual: dict, expected: dict) -> None:
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus_cache) -> dict[str, torch.Tensor]:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    subprocess.run(cli_command(run_dir, "trainer.max_steps=8"), cwd=run_dir.parent, check=True, capture_output=True, timeout=300)
    return final_model(run_dir)


def test_kill9_at_random_step_resumes_bit_exact(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    kill_after = random.Random(os.getpid()).randint(3, 6)
    process = subprocess.Popen(cli_command(run_dir, "trainer.max_steps=8"), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and sum(r["event"] == "train" for r in read_metrics(metrics)) >= kill_after:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, f"the run ended before the kill after step {kill_after}"

    subprocess.run(cli_command(run_dir, "trainer.max_steps=8"), cwd=tmp_path, check=True, capture_output=True, timeout=300)

    assert_bitwise_equal(final_model(run_dir), uninterrupted)


def test_kill9_during_checkpoint_write_keeps_previous(tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, str(HERE / "kill_during_checkpoint.py"), "4", *FAULT_RUN, "trainer.max_steps=8", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL
    assert load_checkpoint(run_dir / "checkpoints" / "latest.pt")["step"] == 2
    assert list((run_dir / "checkpoints").glob(".ckpt_00000004.pt.*.tmp"))

    rerun = subprocess.run(cli_command(run_dir, "trainer.max_steps=8"), cwd=tmp_path, capture_output=True, text=True, timeout=300)

    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "at step 2" in rerun.stdout + rerun.stderr
    assert_bitwise_equal(final_model(run_dir), uninterrupted)


def train_in_process(run_dir: Path, *overrides: str):
    cfg = resolve_config(compose_config(FAULT_RUN + list(overrides)))
    return run_training(cfg, run_dir, launch_dir=run_dir.parent)


def test_corrupted_latest_falls_back_to_previous(tmp_path, corpus_cache, caplog):
    run_dir = tmp_path / "run"
    train_in_process(run_dir, "trainer.max_steps=4")
    latest = run_dir / "checkpoints" / "latest.pt"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    # Break the link to ckpt_00000004.pt first, so only latest.pt is damaged.
    latest.unlink()
    latest.write_bytes(bytes(data))

    path, state = load_newest_valid(run_dir / "checkpoints")

    assert path.name == "ckpt_00000004.pt"
    assert state["step"] == 4
    assert f"checkpoint {latest} does not match its checksum" in caplog.text


def test_truncated_latest_and_step_file_fall_back_further(tmp_path, corpus_cache, caplog):
    run_dir = tmp_path / "run"
    train_in_process(run_dir, "trainer.max_steps=4")
    folder = run_dir / "checkpoints"
    # latest.pt and ckpt_00000004.pt are one file: truncating it damages both names.
    with open(folder / "latest.pt", "r+b") as f:
        f.truncate(1000)

    path, state = load_newest_valid(folder)

    assert path.name == "ckpt_00000002.pt"
    assert state["step"] == 2
    assert str(folder / "latest.pt") in caplog.text
    assert str(folder / "ckpt_00000004.pt") in caplog.text


def test_old_step_checkpoints_pruned(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    train_in_process(run_dir, "trainer.max_steps=8", "trainer.keep_checkpoints=2")
    names = sorted(p.name for p in (run_dir / "checkpoints").glob("ckpt_*.pt"))
    assert names == ["ckpt_00000006.pt", "ckpt_00000008.pt"]


class Payload:
    """An object whose unpickling would create a file: the code a safe loader must not run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_code_is_rejected_unrun(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": Payload(marker)}, path)

    with pytest.raises(CheckpointError, match="could not be read"):
        load_checkpoint(path)
    assert not marker.exists()


def poisoned_trainer(run_dir: Path, poison_at_step: int, *overrides: str) -> Trainer:
    """A trainer whose gradients are NaN at one step (0-based), from a hook on the final gain."""
    cfg = resolve_config(compose_config(FAULT_RUN + ["trainer.checkpoint_interval=1", *overrides]))
    run_dir.mkdir(parents=True)
    trainer = Trainer(cfg, run_dir, run_dir.parent, DistEnv())
    original_step = trainer.train_step

    def train_step(step):
        handle = None
        if step == poison_at_step:
            handle = trainer.raw_model.transformer.ln_f.weight.register_hook(lambda g: torch.full_like(g, float("nan")))
        try:
            return original_step(step)
        finally:
            if handle is not None:
                handle.remove()

    trainer.train_step = train_step
    return trainer


def test_nan_gradient_stops_with_step_and_last_loss(tmp_path, corpus_cache):
    trainer = poisoned_trainer(tmp_path / "run", 2, "trainer.max_steps=5")

    with pytest.raises(NonFiniteError, match=r"step 3: loss [0-9.]+, gradient norm nan \(last finite loss [0-9.]+\)"):
        trainer.fit()

    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    # The metrics record the stop, so a results table can mark the run as diverged.
    events = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["event"] == "nonfinite"]
    assert [(r["step"], r["action"], r["grad_norm"]) for r in events] == [(3, "stop", "nan")]


def test_nan_gradient_skipped_and_counted(tmp_path, corpus_cache):
    trainer = poisoned_trainer(tmp_path / "run", 2, "trainer.max_steps=4", "trainer.nonfinite=skip")

    state = trainer.fit()

    assert state.step == 4
    assert state.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in trainer.raw_model.parameters())


def test_full_disk_keeps_previous_checkpoint(tmp_path, corpus_cache, monkeypatch):
    real_save = torch.save
    calls = {"count": 0}

    def save_until_disk_full(obj, f):
        calls["count"] += 1
        if calls["count"] >= 3:
            f.write(b"partial bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_save(obj, f)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_until_disk_full)
    run_dir = tmp_path / "run"

    with pytest.raises(CheckpointError, match=r"No space left on device.*previous checkpoint is intact"):
        train_in_process(run_dir, "trainer.max_steps=8")

    monkeypatch.setattr(checkpoint_module.torch, "save", real_save)
    folder = run_dir / "checkpoints"
    assert load_checkpoint(folder / "latest.pt")["step"] == 4
    assert not list(folder.glob(".*.tmp"))


def test_save_checkpoint_failure_leaves_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    save_checkpoint({"value": torch.ones(2)}, path)

    def failing_save(obj, f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint_module.torch, "save", failing_save)
    with pytest.raises(OSError):
        save_checkpoint({"value": torch.zeros(2)}, path)

    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["value"], torch.ones(2))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+optim=sgd"], "Could not find 'optim/sgd'"),
        (["+optim=mars_m", "+model=gpt5"], "Could not find 'model/gpt5'"),
        (["+optim=mars_m", "data=fineweb_edu", "data.path=/nonexistent/shards"], "/nonexistent/shards"),
        (["+optim=mars_m", "trainer.micro_batch_size=3"], "is not a multiple of trainer.micro_batch_size=3"),
        (["+optim=mars_m", "model.block_size=100000"], "fewer than model.block_size + 1 = 100001"),
    ],
)
def test_invalid_input_fails_before_training(tmp_path, corpus_cache, overrides, message):
    args = [a for a in TINY_RUN if not a.startswith("+model") or not any(o.startswith("+model") for o in overrides)]
    result = subprocess.run(
        [sys.executable, "-m", "mars_m_exp", *args, *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
