"""Sweeps with -m: the stable sweep directory name, one run directory per point, resume on rerun, wandb group."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from conftest import CONF_DIR, TINY_RUN
from mars_m_exp import report
from mars_m_exp.config import WandbConfig, register_configs
from mars_m_exp.metrics import read_metrics, start_wandb

NAMING = OmegaConf.create({"kv_sep": "=", "item_sep": ",", "exclude_keys": ["resume", "trainer.log_interval"]})


@pytest.mark.parametrize(
    "task_overrides, expected",
    [
        (["+model=gpt2_small", "+optim=mars_m,moonlight", "optim.lr=3e-3,6e-3,1e-2", "seed=0,1"], "+model=gpt2_small"),
        (["seed=0,1", "optim.lr=3e-3,6e-3", "+model=gpt2_small", "+optim=mars_m"], "+model=gpt2_small,+optim=mars_m"),
        (["+model=tiny", "optim.lr=range(1,3)", "trainer.log_interval=5", "resume=false"], "+model=tiny"),
        (["+model=tiny", "optim.lr=choice(0.01,0.02)", "data=openwebtext"], "+model=tiny,data=openwebtext"),
        (["+model=tiny,gpt2_small", "+optim=mars_m,adamw"], "sweep"),
        (["+model=tiny", "data.path=/data/owt", "optim.lr=0.01,0.02"], "+model=tiny,data.path=_data_owt"),
    ],
)
def test_sweep_name_from_fixed_overrides(task_overrides, expected):
    assert report.sweep_name(task_overrides, NAMING) == expected


def sweep_command(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "mars_m_exp", "-m", *TINY_RUN, *overrides]


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "train"]


@pytest.mark.slow
def test_local_sweep_runs_each_point_and_rerun_resumes(tmp_path, corpus_cache):
    command = sweep_command("+optim=mars_m", "optim.lr=0.01,0.02", "trainer.max_steps=2", "trainer.eval_interval=100")
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    # trainer.log_interval is left out of every name, because it does not change what a run computes.
    fixed = [o for o in [*TINY_RUN, "+optim=mars_m", "trainer.max_steps=2", "trainer.eval_interval=100"] if not o.startswith("trainer.log_interval=")]
    sweep_dir = tmp_path / "sweeps" / ",".join(sorted(fixed))
    assert [p.name for p in (tmp_path / "sweeps").iterdir()] == [sweep_dir.name]
    run_dirs = {lr: sweep_dir / ",".join(sorted([*fixed, f"optim.lr={lr}"])) for lr in ("0.01", "0.02")}
    for run_dir in run_dirs.values():
        assert train_steps(run_dir) == [1, 2]
    assert OmegaConf.load(run_dirs["0.02"] / "config.yaml").optim.lr == 0.02
    assert "sweep summary:" in first.stdout + first.stderr

    rerun = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]

    for run_dir in run_dirs.values():
        assert f"resumed from {run_dir / 'checkpoints' / 'latest.pt'} at step 2" in (run_dir / "train.log").read_text()
        assert train_steps(run_dir) == [1, 2]
    statuses = [run.status for run in report.collect_runs(sweep_dir)]
    assert statuses == ["finished", "finished"]


@pytest.mark.slow
def test_failed_point_leaves_the_others_running(tmp_path, corpus_cache):
    # The first point is invalid; Hydra still runs the second and reports the failure at the end.
    command = sweep_command("+optim=mars_m", "optim.lr=-1,0.01", "trainer.max_steps=2", "trainer.eval_interval=100")
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)

    assert result.returncode != 0
    assert "optim.lr" in result.stderr
    (good,) = [p.parent for p in (tmp_path / "sweeps").glob("*/*/metrics.jsonl")]
    assert "optim.lr=0.01" in good.name
    assert train_steps(good) == [1, 2]


@pytest.fixture
def fake_wandb(monkeypatch):
    """Replace the wandb module with one that records the arguments of wandb.init."""
    calls: list[dict] = []
    module = types.ModuleType("wandb")
    module.init = lambda **kwargs: calls.append(kwargs) or types.SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


@pytest.fixture
def hydra_job_config():
    """Set Hydra's job config as a launcher does for one job, and clear it afterwards."""
    from hydra import compose, initialize_config_dir

    def set_config(*hydra_overrides: str) -> None:
        register_configs()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=["+model=tiny", "+optim=mars_m", *hydra_overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)

    yield set_config
    HydraConfig.instance().cfg = None


@pytest.mark.parametrize(
    "hydra_overrides, configured_group, expected_group",
    [
        (["hydra.mode=MULTIRUN", "hydra.sweep.dir=/scratch/sweeps/lr_grid"], None, "lr_grid"),
        (["hydra.mode=MULTIRUN", "hydra.sweep.dir=/scratch/sweeps/lr_grid"], "ablations", "ablations"),
        (["hydra.mode=RUN"], None, None),
    ],
)
def test_wandb_group_is_sweep_directory_name(tmp_path, fake_wandb, hydra_job_config, hydra_overrides, configured_group, expected_group):
    hydra_job_config(*hydra_overrides)
    wandb_cfg = WandbConfig(mode="offline", group=configured_group)

    start_wandb({"optim": {"name": "moonlight"}}, wandb_cfg, tmp_path, "run")
    start_wandb({"optim": {"name": "moonlight"}}, wandb_cfg, tmp_path, "run")

    first, second = fake_wandb
    assert first["group"] == expected_group
    assert first["job_type"] == "moonlight"
    # A restarted or requeued run reuses the id kept in its run directory.
    assert second["id"] == first["id"] == (tmp_path / "wandb_id.txt").read_text().strip()
