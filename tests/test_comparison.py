"""The comparison table and plots (`make reproduce-table`), built from fixture run directories."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, compose_config
from mars_m_exp import reproduce
from mars_m_exp.comparison import PlannedRun, collect_comparison, default_budgets, loss_at_tokens, write_outputs
from mars_m_exp.config import grad_accum_steps, resolve_config
from mars_m_exp.metrics import read_metrics

# 8 tokens a step: global batch 2 x block 4.
TOKENS_PER_STEP = 8
PLANNED = [
    PlannedRun("cpu_tiny_mars_m", "tiny", "mars_m", 4 * TOKENS_PER_STEP),
    PlannedRun("cpu_tiny_moonlight", "tiny", "moonlight", 4 * TOKENS_PER_STEP),
    PlannedRun("cpu_tiny_adamw", "tiny", "adamw", 4 * TOKENS_PER_STEP),
]


def write_run(sweep_dir: Path, preset: str, optimizer: str, records: list[dict], log_lines: list[str], max_steps: int = 4) -> Path:
    """A run directory with the files the trainer and Hydra write."""
    run_dir = sweep_dir / f"+experiment={preset}"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"+experiment={preset}"]))
    config = {
        "seed": 0,
        "model": {"name": "tiny", "block_size": 4},
        "optim": {"name": optimizer, "lr": 3e-3},
        "trainer": {"max_steps": max_steps, "global_batch_size": 2},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "train.log").write_text("".join(line + "\n" for line in log_lines))
    return run_dir


def evals(losses: dict[int, float], seconds_per_step: float = 0.5) -> list[dict]:
    return [
        {"event": "eval", "step": s, "tokens": s * TOKENS_PER_STEP, "val_loss": loss, "elapsed_s": s * seconds_per_step}
        for s, loss in losses.items()
    ]


def trains(losses: dict[int, float], seconds_per_step: float = 0.5) -> list[dict]:
    return [
        {"event": "train", "step": s, "tokens": s * TOKENS_PER_STEP, "train_loss": loss, "tokens_per_s": 16.0, "elapsed_s": s * seconds_per_step}
        for s, loss in losses.items()
    ]


@pytest.fixture
def sweep(tmp_path) -> Path:
    """MARS-M finished, AdamW diverged at step 3, Moonlight never started."""
    sweep_dir = tmp_path / "sweep"
    mars_m = sorted(evals({0: 10.8, 2: 6.0, 4: 5.0}) + trains({1: 9.0, 2: 7.0, 3: 6.0, 4: 5.5}), key=lambda r: (r["step"], r["event"] == "eval"))
    write_run(sweep_dir, "cpu_tiny_mars_m", "mars_m", mars_m, ["[INFO] - step 4/4 done"])
    adamw = evals({0: 10.8, 2: 7.0}) + trains({1: 9.5, 2: 8.0})
    adamw.append({"event": "nonfinite", "step": 3, "tokens": 16, "train_loss": "nan", "grad_norm": "nan", "action": "stop", "elapsed_s": 1.5})
    write_run(sweep_dir, "cpu_tiny_adamw", "adamw", adamw, ["[ERROR] - step 3: loss nan, gradient norm nan"])
    return sweep_dir


def test_interpolates_the_loss_at_a_token_budget():
    val = [(0, 10.0, 0.0), (100, 6.0, 1.0), (200, 5.0, 2.0)]
    assert loss_at_tokens(val, 150) == pytest.approx(5.5)
    assert loss_at_tokens(val, 100) == 6.0
    assert loss_at_tokens(val, 200) == 5.0
    assert loss_at_tokens(val, 201) is None


def test_default_budgets_are_shares_of_the_longest_run():
    # conf/paper/common.yaml: 100,000 steps of 480 x 1024 tokens.
    assert default_budgets([100_000 * 491_520, None]) == [4_915_200_000, 19_660_800_000, 49_152_000_000]
    assert default_budgets([None]) == []


def test_rows_follow_metrics_and_mark_missing_and_diverged(sweep):
    rows, budgets = collect_comparison(sweep, PLANNED)
    by_optimizer = {row.optimizer: row for row in rows}

    assert [row.optimizer for row in rows] == ["mars_m", "moonlight", "adamw"]
    assert budgets == [3, 12, 32]

    mars_m = by_optimizer["mars_m"]
    records = read_metrics(sweep / "+experiment=cpu_tiny_mars_m" / "metrics.jsonl")
    assert mars_m.status == "finished"
    assert mars_m.best_val_loss == min(r["val_loss"] for r in records if r["event"] == "eval")
    assert mars_m.tokens_done == records[-1]["tokens"] == 32
    assert mars_m.wall_time_s == records[-1]["elapsed_s"] == 2.0
    assert mars_m.tokens_per_s == pytest.approx(16.0)
    # 12 tokens lies between the evals at 0 (10.8) and 16 tokens (6.0).
    assert mars_m.val_at_budget[12] == pytest.approx(10.8 + (6.0 - 10.8) * 12 / 16)
    assert mars_m.val_at_budget[32] == 5.0

    adamw = by_optimizer["adamw"]
    assert adamw.status == "diverged"
    assert adamw.status_text == "diverged at step 3"
    assert adamw.best_val_loss == 7.0
    assert adamw.val_at_budget[32] is None  # not reached
    assert adamw.wall_time_s == 1.5  # from the nonfinite record, the run's last

    moonlight = by_optimizer["moonlight"]
    assert moonlight.status == "missing"
    assert moonlight.run_dir is None


def test_table_and_plots_written(sweep, tmp_path):
    rows, budgets = collect_comparison(sweep, PLANNED)
    out_dir = tmp_path / "results"

    paths = write_outputs(rows, budgets, out_dir, "cpu_tiny")

    names = sorted(p.name for p in paths)
    assert names == sorted(
        ["table.md", "table.csv", "val_loss_tiny.png", "val_loss_tiny_zoom.png", "train_loss_tiny.png", "val_loss_time_tiny.png"]
    )
    for path in paths:
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    table = (out_dir / "table.md").read_text()
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "| finished | 5.0000 |" in lines["MARS-M"]
    assert "| missing |" in lines["Muon (Moonlight)"]
    assert "| diverged at step 3 | 7.0000 |" in lines["AdamW"]
    assert "tiny: val @ 32" in table

    with (out_dir / "table.csv").open() as f:
        csv_rows = {row["optimizer"]: row for row in csv.DictReader(f)}
    assert csv_rows["mars_m"]["best_val_loss"] == "5.0"
    assert csv_rows["mars_m"]["val_loss_at_32_tokens"] == "5.0"
    assert csv_rows["adamw"]["status"] == "diverged"
    assert csv_rows["adamw"]["diverged_at_step"] == "3"
    assert csv_rows["moonlight"]["status"] == "missing"


def test_every_optimizer_with_metrics_is_drawn(sweep):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mars_m_exp.comparison import _draw

    rows, _ = collect_comparison(sweep, PLANNED)
    drawn = [row for row in rows if row.curves.val]
    for kind in ("val", "zoom", "train", "time"):
        fig, ax = plt.subplots()
        assert _draw(ax, drawn, kind) == 2
        labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert sorted(labels) == ["AdamW (diverged at step 3)", "MARS-M"]
        plt.close(fig)


def test_running_run_shows_its_progress(tmp_path):
    sweep_dir = tmp_path / "sweep"
    write_run(sweep_dir, "cpu_tiny_mars_m", "mars_m", evals({0: 10.8, 2: 6.0}) + trains({2: 7.0}), ["[INFO] - step 2/4"])

    rows, _ = collect_comparison(sweep_dir, PLANNED[:1])

    assert rows[0].status == "running"
    assert rows[0].status_text == "running (2/4 steps)"


def test_rebuild_of_two_runs_per_optimizer_fails_clearly(sweep, tmp_path, capsys):
    other = sweep / "+experiment=cpu_tiny_mars_m,seed=1"
    (sweep / "+experiment=cpu_tiny_mars_m").rename(other)
    write_run(sweep, "cpu_tiny_mars_m", "mars_m", evals({0: 10.8}), [])

    assert reproduce.main(["--sweep", str(sweep), "--out", str(tmp_path / "out")]) == 2
    assert "two runs of tiny with mars_m" in capsys.readouterr().err


def test_rows_ordered_by_model_size():
    planned = [PlannedRun(f"owt_{m}_adamw", m, "adamw") for m in ("gpt2_large", "gpt2_medium", "gpt2_small")]
    rows, _ = collect_comparison(None, planned)
    assert [row.model for row in rows] == ["gpt2_small", "gpt2_medium", "gpt2_large"]


def test_two_runs_of_one_optimizer_are_refused(sweep):
    other = sweep / "+experiment=cpu_tiny_mars_m,seed=1"
    (sweep / "+experiment=cpu_tiny_mars_m").rename(other)
    write_run(sweep, "cpu_tiny_mars_m", "mars_m", evals({0: 10.8}), [])

    with pytest.raises(ValueError, match="two runs of tiny with mars_m"):
        collect_comparison(sweep, PLANNED)


# --------------------------------------------------------------------------- presets


PAPER_LR = {
    "owt_gpt2_small": ("gpt2_small", "openwebtext", 6e-3, 6e-4, 4),
    "owt_gpt2_medium": ("gpt2_medium", "openwebtext", 5e-3, 3e-4, 4),
    "owt_gpt2_large": ("gpt2_large", "openwebtext", 5e-3, 2e-4, 12),
    "fwe_gpt2_small": ("gpt2_small", "fineweb_edu", 1e-2, 6e-4, 4),
    "fwe_gpt2_xl": ("gpt2_xl", "fineweb_edu", 3e-3, 2e-4, 12),
}


def test_families_cover_the_paper_grid():
    families = reproduce.families()
    assert set(PAPER_LR) | {"cpu_tiny"} == set(families)
    for members in families.values():
        assert sorted(reproduce.split_preset(m)[1] for m in members) == ["adamw", "mars_m", "moonlight"]
    assert len(reproduce.family_members("owt")) == 9


@pytest.mark.parametrize("family", sorted(PAPER_LR))
def test_paper_presets_have_the_paper_setup(family):
    model, data, matrix_lr, adamw_lr, accum_on_8 = PAPER_LR[family]
    for optimizer in ("mars_m", "moonlight", "adamw"):
        cfg = resolve_config(compose_config([f"+experiment={family}_{optimizer}"]))
        assert (cfg.model.name, cfg.data.name, cfg.optim.name) == (model, data, optimizer)
        assert cfg.optim.lr == (adamw_lr if optimizer == "adamw" else matrix_lr)
        assert cfg.optim.weight_decay == 0.1
        assert (cfg.trainer.global_batch_size, cfg.model.block_size) == (480, 1024)
        assert (cfg.trainer.max_steps, cfg.trainer.eval_interval, cfg.schedule.warmup_steps) == (100_000, 1000, 2000)
        assert cfg.schedule.name == "cosine"
        assert grad_accum_steps(480, cfg.trainer.micro_batch_size, 8) == accum_on_8


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_steps=-1", "invalid configuration of preset cpu_tiny_adamw: trainer.max_steps"),
        ("trainer.max_step=6", "does not compose with the overrides trainer.max_step=6"),
        ("seed=0,1", "Give each key one value"),
    ],
)
def test_invalid_override_named_in_one_line(override, message, capsys):
    assert reproduce.main([override]) == 2
    error = capsys.readouterr().err
    assert message in error
    assert "Traceback" not in error


def test_unknown_preset_names_the_choices(capsys):
    assert reproduce.main(["--preset", "owt_gpt2_huge"]) == 2
    error = capsys.readouterr().err
    assert "PRESET='owt_gpt2_huge'" in error
    assert "owt_gpt2_small" in error
    assert "cpu_tiny" in error


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budgets", "0"], "invalid token budgets '0'"),
        (["--budgets", "abc"], "invalid token budgets 'abc'"),
        (["--estimate", "--mfu", "-1"], "invalid --mfu -1.0"),
        (["--estimate", "--peak-tflops", "0"], "invalid --peak-tflops 0.0"),
    ],
)
def test_invalid_option_rejected_before_running(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        reproduce.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_sweep_directory_fails_clearly(tmp_path, capsys):
    assert reproduce.main(["--sweep", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_rebuild_from_an_existing_sweep(sweep, tmp_path):
    out_dir = tmp_path / "out"
    assert reproduce.main(["--sweep", str(sweep), "--preset", "cpu_tiny", "--out", str(out_dir), "--budgets", "16,32"]) == 0
    table = (out_dir / "table.md").read_text()
    assert "tiny: val @ 16" in table
    assert "tiny: val @ 32" in table
    assert "missing" in table
    assert "diverged at step 3" in table


def test_estimate_prints_gpu_hours():
    text = reproduce.estimate(peak_tflops=989.0, mfu=0.4)
    line = next(line for line in text.splitlines() if line.startswith("| owt_gpt2_small "))
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    # 6N + attention for GPT-2 small, 49.2B tokens, 40% of 989 TFLOP/s.
    assert cells[3] == "0.85"
    assert 25 <= float(cells[4]) <= 35


@pytest.mark.slow
def test_reproduce_runs_the_cpu_family_end_to_end(tmp_path, corpus_cache):
    """The real command: three short runs as one Hydra sweep, then a table that matches their metrics."""
    env = {**os.environ, "MARS_M_EXP_CACHE": str(corpus_cache)}
    overrides = ["trainer.max_steps=4", "trainer.eval_interval=2", "trainer.eval_iters=1", "trainer.log_interval=1", "model.block_size=32"]
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "mars_m_exp.reproduce", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]

    name = ",".join(["cpu_tiny", *overrides])
    sweep_dir = tmp_path / "sweeps" / "reproduce" / name
    out_dir = tmp_path / "results" / name
    with (out_dir / "table.csv").open() as f:
        rows = {row["optimizer"]: row for row in csv.DictReader(f)}
    assert sorted(rows) == ["adamw", "mars_m", "moonlight"]
    for optimizer, row in rows.items():
        assert row["status"] == "finished"
        run_dir = tmp_path / row["run_dir"]
        assert run_dir.parent == sweep_dir
        assert f"+experiment=cpu_tiny_{optimizer}" in run_dir.name
        metrics = read_metrics(run_dir / "metrics.jsonl")
        val = [r["val_loss"] for r in metrics if r["event"] == "eval"]
        assert float(row["best_val_loss"]) == min(val)
        assert float(row["wall_time_s"]) == metrics[-1]["elapsed_s"]
        assert min(val) < val[0]
    assert (out_dir / "val_loss_tiny.png").is_file()
    assert time.monotonic() - start < 600

    # Rerunning resumes the finished runs instead of training them again.
    again = subprocess.run(
        [sys.executable, "-m", "mars_m_exp.reproduce", *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr[-4000:]
    for row in rows.values():
        metrics = read_metrics(tmp_path / row["run_dir"] / "metrics.jsonl")
        assert [r["step"] for r in metrics if r["event"] == "eval"] == [0, 2, 4]


def test_closed_output_pipe_ends_without_traceback():
    # As in `python -m mars_m_exp.reproduce --estimate | head -n 1`, with the reader gone at once.
    process = subprocess.Popen(
        [sys.executable, "-m", "mars_m_exp.reproduce", "--estimate"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT
    )
    process.stdout.close()
    _, stderr = process.communicate(timeout=120)
    assert b"Traceback" not in stderr
    assert b"BrokenPipeError" not in stderr
