"""The sweep summary on run directories written as the trainer and Hydra write them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from mars_m_exp import report

NAMING = {"kv_sep": "=", "item_sep": ",", "exclude_keys": ["resume", "trainer.log_interval"]}


def write_run(
    sweep_dir: Path,
    overrides: list[str],
    *,
    optim: str = "mars_m",
    lr: float = 0.01,
    seed: int = 0,
    max_steps: int = 10,
    val_losses: tuple[float, ...] = (),
    last_step: int = 0,
    log_lines: tuple[str, ...] = (),
) -> Path:
    """Create a run directory with the files a run of the sweep would have written by now."""
    run_dir = sweep_dir / ",".join(sorted(overrides))
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = {"model": {"name": "tiny"}, "optim": {"name": optim, "lr": lr}, "seed": seed, "trainer": {"max_steps": max_steps}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))

    records = [{"event": "train", "step": step, "tokens_per_s": 1000.0 + step} for step in range(1, last_step + 1)]
    eval_steps = [round(i * last_step / max(len(val_losses) - 1, 1)) for i in range(len(val_losses))]
    records += [{"event": "eval", "step": step, "val_loss": loss} for step, loss in zip(eval_steps, val_losses)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "train.log").write_text("".join(line + "\n" for line in log_lines))
    return run_dir


def write_multirun(sweep_dir: Path, task_overrides: list[str]) -> None:
    """Write the parts of multirun.yaml that Hydra's basic sweeper saves and the report reads."""
    hydra = {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
        "sweep": {"dir": str(sweep_dir), "subdir": "${hydra.job.override_dirname}"},
        "overrides": {"task": task_overrides, "hydra": ["hydra.mode=MULTIRUN"]},
        "job": {"config": {"override_dirname": NAMING}},
    }
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))


def by_lr_and_seed(runs: list[report.RunSummary]) -> dict[tuple[float, int], report.RunSummary]:
    return {(run.lr, run.seed): run for run in runs}


def test_summary_reads_steps_losses_and_speed(tmp_path):
    write_run(tmp_path, ["+optim=mars_m", "optim.lr=0.01"], val_losses=(10.8, 6.5, 7.0), last_step=4)

    (run,) = report.collect_runs(tmp_path)

    assert run.overrides == ["+optim=mars_m", "optim.lr=0.01"]
    assert run.status == "running"
    assert run.steps_done == 4
    assert run.max_steps == 10
    assert run.best_val_loss == 6.5
    assert run.last_val_loss == 7.0
    assert run.tokens_per_s == 1004.0


@pytest.mark.parametrize(
    "log_lines, expected",
    [
        ((), "running"),
        (("[t][mars_m_exp.trainer][WARNING] - SIGUSR2 received: stopped at step 4 after saving a checkpoint",), "stopped"),
        (("[t][mars_m_exp][ERROR] - shard not found",), "failed"),
        (
            (
                "[t][mars_m_exp.trainer][WARNING] - SIGUSR2 received: stopped at step 4 after saving a checkpoint",
                "[t][mars_m_exp.trainer][INFO] - resumed from latest.pt at step 4 (1024 tokens seen)",
            ),
            "running",
        ),
    ],
)
def test_status_follows_last_log_event(tmp_path, log_lines, expected):
    write_run(tmp_path, ["optim.lr=0.01"], val_losses=(10.8,), last_step=4, log_lines=log_lines)

    (run,) = report.collect_runs(tmp_path)

    assert run.status == expected


def test_status_finished_at_max_steps(tmp_path):
    write_run(tmp_path, ["optim.lr=0.01"], max_steps=4, val_losses=(10.8, 6.0), last_step=4)

    (run,) = report.collect_runs(tmp_path)

    assert run.status == "finished"


def test_status_stalled_without_recent_change(tmp_path):
    run_dir = write_run(tmp_path, ["optim.lr=0.01"], val_losses=(10.8,), last_step=2)
    an_hour_ago = time.time() - 3600
    for path in [run_dir / "metrics.jsonl", run_dir / "train.log", run_dir]:
        os.utime(path, (an_hour_ago, an_hour_ago))

    assert report.collect_runs(tmp_path, stale_minutes=30)[0].status == "stalled"
    assert report.collect_runs(tmp_path, stale_minutes=120)[0].status == "running"


def test_nonfinite_loss_ignored_for_best(tmp_path):
    write_run(tmp_path, ["optim.lr=0.01"], val_losses=(10.8, 5.0, "nan"), last_step=4)

    (run,) = report.collect_runs(tmp_path)

    assert run.best_val_loss == 5.0
    assert run.last_val_loss is None


def test_best_lr_uses_mean_over_seeds(tmp_path):
    # lr 0.02 has the single lowest loss (4.0) but the higher mean over its two seeds (6.0
    # against 5.0), so 0.01 is the best lr.
    write_run(tmp_path, ["optim.lr=0.01", "seed=0"], lr=0.01, seed=0, val_losses=(10.8, 5.0), last_step=2)
    write_run(tmp_path, ["optim.lr=0.01", "seed=1"], lr=0.01, seed=1, val_losses=(10.8, 5.0), last_step=2)
    write_run(tmp_path, ["optim.lr=0.02", "seed=0"], lr=0.02, seed=0, val_losses=(10.8, 4.0), last_step=2)
    write_run(tmp_path, ["optim.lr=0.02", "seed=1"], lr=0.02, seed=1, val_losses=(10.8, 8.0), last_step=2)

    runs = by_lr_and_seed(report.collect_runs(tmp_path))

    assert runs[(0.01, 0)].best_lr
    assert runs[(0.01, 1)].best_lr
    assert not runs[(0.02, 0)].best_lr
    assert not runs[(0.02, 1)].best_lr


def test_best_lr_chosen_per_optimizer(tmp_path):
    write_run(tmp_path, ["+optim=mars_m", "optim.lr=0.01"], optim="mars_m", lr=0.01, val_losses=(10.8, 5.0), last_step=2)
    write_run(tmp_path, ["+optim=mars_m", "optim.lr=0.02"], optim="mars_m", lr=0.02, val_losses=(10.8, 6.0), last_step=2)
    write_run(tmp_path, ["+optim=adamw", "optim.lr=0.01"], optim="adamw", lr=0.01, val_losses=(10.8, 7.0), last_step=2)
    write_run(tmp_path, ["+optim=adamw", "optim.lr=0.02"], optim="adamw", lr=0.02, val_losses=(10.8, 6.5), last_step=2)

    best = {(run.optimizer, run.lr) for run in report.collect_runs(tmp_path) if run.best_lr}

    assert best == {("mars_m", 0.01), ("adamw", 0.02)}


def test_planned_runs_listed_as_pending(tmp_path):
    task = ["+model=gpt2_small", "+optim=mars_m,moonlight", "optim.lr=3e-3,6e-3,1e-2", "seed=0,1", "trainer.log_interval=5"]
    write_multirun(tmp_path, task)
    # Hydra's sweeper writes each swept value as Python prints it: 3e-3 becomes 0.003.
    write_run(tmp_path, ["+model=gpt2_small", "+optim=mars_m", "optim.lr=0.003", "seed=0"], lr=3e-3, val_losses=(10.8,), last_step=1)

    runs = report.collect_runs(tmp_path)

    assert len(runs) == 12
    assert sum(run.status == "pending" for run in runs) == 11
    pending_names = {run.name for run in runs if run.status == "pending"}
    assert "+model=gpt2_small,+optim=moonlight,optim.lr=0.01,seed=1" in pending_names
    # The started run is matched to its planned name, not listed twice.
    assert "+model=gpt2_small,+optim=mars_m,optim.lr=0.003,seed=0" not in pending_names


def test_planned_runs_need_override_dirname_subdir(tmp_path):
    write_multirun(tmp_path, ["optim.lr=0.01,0.02"])
    multirun = yaml.safe_load((tmp_path / "multirun.yaml").read_text())
    multirun["hydra"]["sweep"]["subdir"] = "${hydra.job.num}"
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump(multirun))

    assert report.planned_runs(tmp_path) == []


def test_submitit_folder_not_a_run(tmp_path):
    write_run(tmp_path, ["optim.lr=0.01"], val_losses=(10.8,), last_step=1)
    (tmp_path / ".submitit" / "2026-01-01_00-00-00" / "5_0" / ".hydra").mkdir(parents=True)
    (tmp_path / ".submitit" / "2026-01-01_00-00-00" / "5_0" / ".hydra" / "overrides.yaml").write_text("[]\n")

    assert [run.name for run in report.collect_runs(tmp_path)] == ["optim.lr=0.01"]


def test_table_shows_shared_overrides_once(tmp_path):
    write_run(tmp_path, ["+model=tiny", "optim.lr=0.01"], lr=0.01, val_losses=(10.8, 5.0), last_step=2)
    write_run(tmp_path, ["+model=tiny", "optim.lr=0.02"], lr=0.02, val_losses=(10.8, 6.0), last_step=2)

    lines = report.format_report(report.collect_runs(tmp_path)).splitlines()

    assert lines[0] == "shared overrides: +model=tiny"
    assert lines[1].split() == ["overrides", "status", "steps", "best", "val", "last", "val", "tokens/s"]
    assert lines[2].split() == ["*", "optim.lr=0.01", "running", "2/10", "5.0000", "5.0000", "1,002"]
    assert lines[3].split() == ["optim.lr=0.02", "running", "2/10", "6.0000", "6.0000", "1,002"]
    assert "  tiny mars_m: lr 0.01, mean best val 5.0000 over 1 run(s); 0 of 2 started run(s) finished" in lines


def test_cli_json_lists_runs(tmp_path, capsys):
    write_run(tmp_path, ["optim.lr=0.01"], val_losses=(10.8, 5.0), last_step=2)

    assert report.main([str(tmp_path), "--json"]) == 0

    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["overrides"] == ["optim.lr=0.01"]
    assert record["best_val_loss"] == 5.0
    assert record["best_lr"] is True


def test_cli_missing_sweep_dir(tmp_path, capsys):
    assert report.main([str(tmp_path / "absent")]) == 2
    assert f"sweep directory {tmp_path / 'absent'} not found" in capsys.readouterr().err
