"""The optimizer comparison of a preset family as the MARS-M paper shows it: a table and plots.

The runs are read from a sweep directory (one run directory per preset, as
`python -m mars_m_exp.reproduce` launches them) using only the files a run writes as it goes:
`config.yaml`, `metrics.jsonl`, the log and `.hydra/`. So the outputs can be rebuilt while
runs are still training, and every number in them can be traced to a run's `metrics.jsonl`:

- best validation loss: the lowest `val_loss` of the run's eval events;
- validation loss at a token budget: linear interpolation between the two evals around the
  budget, left empty when the run has not reached it;
- tokens/s: tokens of the last record over its `elapsed_s` (training time, evaluation excluded);
- wall time: that `elapsed_s`.

A run that was planned but has no directory is `missing` (or `pending` when the sweep's
`multirun.yaml` lists it), one that stopped on a NaN or Inf is `diverged`, and both stay in the
table.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from omegaconf import OmegaConf

from .metrics import read_metrics
from .report import collect_runs

# Shares of the longest planned run at which the table reports the validation loss.
DEFAULT_BUDGET_FRACTIONS = (0.1, 0.4, 1.0)
# Table and legend order: MARS-M first, then its baselines. Other optimizers follow alphabetically.
OPTIMIZER_ORDER = ("mars_m", "mars_m_exact", "moonlight", "adamw")
OPTIMIZER_LABELS = {"mars_m": "MARS-M", "mars_m_exact": "MARS-M (exact)", "moonlight": "Muon (Moonlight)", "adamw": "AdamW"}
# The zoomed plot shows the last part of the longest run's tokens.
ZOOM_FRACTION = 0.5
# Models in order of size; the table's column groups and the plots follow it.
MODEL_ORDER = ("tiny", "gpt2_small", "gpt2_medium", "gpt2_large", "gpt2_xl")
# Curves with fewer points than this get a marker on each point, so a single point shows.
MARKER_MAX_POINTS = 50


@dataclass
class PlannedRun:
    """One run that a preset family plans."""

    preset: str  # the experiment preset, e.g. owt_gpt2_small_mars_m
    model: str
    optimizer: str
    planned_tokens: int | None = None  # max_steps x tokens per step


@dataclass
class Curves:
    val: list[tuple[int, float, float]] = field(default_factory=list)  # (tokens, loss, elapsed_s)
    train: list[tuple[int, float]] = field(default_factory=list)  # (tokens, loss)


@dataclass
class ComparisonRow:
    """The table's values for one optimizer on one model."""

    model: str
    optimizer: str
    preset: str | None
    status: str  # finished, running, stalled, stopped, failed, diverged, pending or missing
    run_dir: Path | None = None
    steps_done: int = 0
    max_steps: int | None = None
    tokens_done: int = 0
    planned_tokens: int | None = None
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    val_at_budget: dict[int, float | None] = field(default_factory=dict)
    tokens_per_s: float | None = None
    wall_time_s: float | None = None
    diverged_at_step: int | None = None
    curves: Curves = field(default_factory=Curves)

    @property
    def status_text(self) -> str:
        if self.status == "diverged":
            return f"diverged at step {self.diverged_at_step:,}" if self.diverged_at_step else "diverged"
        if self.status in ("running", "stalled", "stopped", "failed") and self.max_steps:
            return f"{self.status} ({self.steps_done:,}/{self.max_steps:,} steps)"
        return self.status


def _finite(value) -> float | None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def read_curves(metrics_path: Path) -> tuple[Curves, int | None, dict | None]:
    """Return the run's curves, the step of a non-finite stop (if any) and its last record."""
    curves = Curves()
    diverged_at = None
    last = None
    if not metrics_path.is_file():
        return curves, None, None
    for record in read_metrics(metrics_path):
        event = record.get("event")
        if event == "eval" and _finite(record.get("val_loss")) is not None:
            curves.val.append((int(record["tokens"]), float(record["val_loss"]), float(record.get("elapsed_s") or 0.0)))
        elif event == "train" and _finite(record.get("train_loss")) is not None:
            curves.train.append((int(record["tokens"]), float(record["train_loss"])))
        elif event == "nonfinite" and record.get("action") == "stop":
            diverged_at = int(record["step"])
        elif event == "eval" or event == "train":
            # A non-finite loss that was logged: the run diverged there.
            diverged_at = diverged_at or int(record.get("step", 0))
        if event in ("eval", "train", "nonfinite"):
            last = record
    if diverged_at is not None and last is not None and int(last.get("step", 0)) > diverged_at:
        # Resumed past the bad step (for example with trainer.nonfinite=skip): no longer diverged.
        diverged_at = None
    return curves, diverged_at, last


def loss_at_tokens(val: Sequence[tuple[int, float, float]], budget: int) -> float | None:
    """Validation loss at `budget` tokens, interpolated linearly between the evals around it."""
    for (t0, l0, _), (t1, l1, _) in zip(val, val[1:]):
        if t0 <= budget <= t1:
            if t1 == t0:
                return l1
            return l0 + (l1 - l0) * (budget - t0) / (t1 - t0)
    if val and val[-1][0] == budget:
        return val[-1][1]
    return None


def run_tokens(cfg) -> int:
    """Return the tokens a run trains on when it finishes: max_steps x global batch x block size."""
    return int(cfg.trainer.max_steps * cfg.trainer.global_batch_size * cfg.model.block_size)


def default_budgets(planned_tokens: Iterable[int | None]) -> list[int]:
    """Return the budgets at DEFAULT_BUDGET_FRACTIONS of the longest planned run, in whole tokens."""
    planned = [t for t in planned_tokens if t]
    if not planned:
        return []
    longest = max(planned)
    return sorted({int(longest * fraction) for fraction in DEFAULT_BUDGET_FRACTIONS})


def format_tokens(tokens: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if tokens >= scale:
            return f"{tokens / scale:.3g}{suffix}"
    return f"{tokens:.0f}"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def _optimizer_key(name: str) -> tuple[int, str]:
    return (OPTIMIZER_ORDER.index(name) if name in OPTIMIZER_ORDER else len(OPTIMIZER_ORDER), name)


def collect_comparison(sweep_dir: Path | None, planned: Sequence[PlannedRun] = (), budgets: Sequence[int] | None = None) -> tuple[list[ComparisonRow], list[int]]:
    """Match the runs of `sweep_dir` to the planned ones; return the rows and the budgets used.

    A planned run is matched by its model and optimizer. A run directory that no plan names
    (a sweep rebuilt with SWEEP=DIR) gets a row of its own.
    """
    found = collect_runs(sweep_dir) if sweep_dir is not None and sweep_dir.is_dir() else []
    rows: dict[tuple[str, str], ComparisonRow] = {}
    for plan in planned:
        rows[(plan.model, plan.optimizer)] = ComparisonRow(
            model=plan.model, optimizer=plan.optimizer, preset=plan.preset, status="missing", planned_tokens=plan.planned_tokens
        )

    for run in found:
        preset = next((o.split("=", 1)[1] for o in run.overrides if o.startswith("+experiment=")), None)
        model, optimizer = run.model, run.optimizer
        if model is None or optimizer is None:
            plan = next((p for p in planned if p.preset == preset), None)
            if plan is None:
                continue  # a pending run of an unknown sweep: nothing to show yet
            model, optimizer = plan.model, plan.optimizer
        key = (model, optimizer)
        row = rows.get(key)
        if row is not None and row.run_dir is not None:
            raise ValueError(
                f"two runs of {model} with {optimizer} in {sweep_dir}: {row.run_dir.name} and {run.name}; "
                "build the table from a sweep with one run per optimizer and model"
            )
        if row is None:
            row = rows[key] = ComparisonRow(model=model, optimizer=optimizer, preset=preset, status="missing")
        _fill_row(row, run, sweep_dir / run.name if run.status != "pending" else None)

    ordered = sorted(rows.values(), key=lambda r: (_model_index(r.model), _optimizer_key(r.optimizer)))
    if budgets is None:
        budgets = default_budgets(r.planned_tokens for r in ordered)
    for row in ordered:
        row.val_at_budget = {b: loss_at_tokens(row.curves.val, b) for b in budgets}
    return ordered, list(budgets)


def _model_index(model: str) -> tuple[int, str]:
    return (MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER), model)


def _fill_row(row: ComparisonRow, run, run_dir: Path | None) -> None:
    row.status = run.status
    row.steps_done = run.steps_done
    row.max_steps = run.max_steps
    if run_dir is None:
        return
    row.run_dir = run_dir
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        row.planned_tokens = run_tokens(OmegaConf.load(config_path))
    curves, diverged_at, last = read_curves(run_dir / "metrics.jsonl")
    row.curves = curves
    if curves.val:
        losses = [loss for _, loss, _ in curves.val]
        row.best_val_loss = min(losses)
        row.last_val_loss = losses[-1]
    if last is not None:
        row.tokens_done = int(last.get("tokens", 0))
        elapsed = _finite(last.get("elapsed_s"))
        row.wall_time_s = elapsed
        if elapsed:
            row.tokens_per_s = row.tokens_done / elapsed
    if diverged_at is not None:
        row.status = "diverged"
        row.diverged_at_step = diverged_at


# --------------------------------------------------------------------------- table


def _loss(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _columns(budgets: Sequence[int]) -> list[str]:
    return ["status", "best val", *[f"val @ {format_tokens(b)}" for b in budgets], "tokens/s", "wall time"]


def _cells(row: ComparisonRow, budgets: Sequence[int]) -> list[str]:
    if row.status in ("missing", "pending"):
        return [row.status] + [""] * (len(budgets) + 3)
    return [
        row.status_text,
        _loss(row.best_val_loss),
        *[_loss(row.val_at_budget.get(b)) for b in budgets],
        f"{row.tokens_per_s:,.0f}" if row.tokens_per_s else "",
        format_duration(row.wall_time_s),
    ]


def format_markdown(rows: Sequence[ComparisonRow], budgets: Sequence[int], title: str) -> str:
    """Render the Markdown table: a row per optimizer, and a group of columns per model."""
    models = list(dict.fromkeys(r.model for r in rows))
    optimizers = sorted({r.optimizer for r in rows}, key=_optimizer_key)
    by_key = {(r.model, r.optimizer): r for r in rows}
    columns = _columns(budgets)

    header = ["optimizer"] + [f"{model}: {column}" for model in models for column in columns]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for optimizer in optimizers:
        cells = [OPTIMIZER_LABELS.get(optimizer, optimizer)]
        for model in models:
            row = by_key.get((model, optimizer))
            cells += _cells(row, budgets) if row is not None else ["not planned"] + [""] * (len(columns) - 1)
        lines.append("| " + " | ".join(cells) + " |")

    lines += [
        "",
        "- best val: the lowest validation loss so far. val @ N: the validation loss after N tokens, "
        "interpolated between the two evaluations around N; empty until the run gets there.",
        "- tokens/s and wall time: training time only (evaluation excluded), from the last record of the run's metrics.jsonl.",
        "- status: finished; running, stalled, stopped or failed with the steps done; diverged (a NaN or Inf stopped it); "
        "pending (submitted, not started); missing (no run directory).",
    ]
    run_dirs = [(r, r.run_dir) for r in rows if r.run_dir is not None]
    if run_dirs:
        lines += ["", "Runs:", ""]
        lines += [f"- {r.model} / {OPTIMIZER_LABELS.get(r.optimizer, r.optimizer)}: `{path}`" for r, path in run_dirs]
    return "\n".join(lines) + "\n"


def format_csv(rows: Sequence[ComparisonRow], budgets: Sequence[int]) -> str:
    """Render the CSV table: a line per model and optimizer, with unformatted numbers."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["model", "optimizer", "preset", "status", "steps_done", "max_steps", "tokens", "best_val_loss", "last_val_loss"]
        + [f"val_loss_at_{b}_tokens" for b in budgets]
        + ["tokens_per_s", "wall_time_s", "diverged_at_step", "run_dir"]
    )
    for r in rows:
        writer.writerow(
            [r.model, r.optimizer, r.preset or "", r.status, r.steps_done, r.max_steps or "", r.tokens_done, _blank(r.best_val_loss), _blank(r.last_val_loss)]
            + [_blank(r.val_at_budget.get(b)) for b in budgets]
            + [_blank(r.tokens_per_s), _blank(r.wall_time_s), r.diverged_at_step or "", str(r.run_dir or "")]
        )
    return out.getvalue()


def _blank(value: float | None) -> str | float:
    return "" if value is None else value


# --------------------------------------------------------------------------- plots


def _smooth(values: Sequence[float], weight: float) -> list[float]:
    out, average = [], None
    for value in values:
        average = value if average is None else weight * average + (1 - weight) * value
        out.append(average)
    return out


def plot_comparison(rows: Sequence[ComparisonRow], out_dir: Path) -> list[Path]:
    """Write four PNG figures per model; return their paths.

    `val_loss_<model>.png` (validation loss against tokens), `val_loss_<model>_zoom.png` (its
    last part), `train_loss_<model>.png` (smoothed training loss) and
    `val_loss_time_<model>.png` (validation loss against training time).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for model in dict.fromkeys(r.model for r in rows):
        group = [r for r in rows if r.model == model and r.curves.val]
        for kind in ("val", "zoom", "train", "time"):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            plotted = _draw(ax, group, kind)
            ax.set_title(f"{model}: {_TITLES[kind]}")
            ax.grid(True, alpha=0.3)
            if plotted:
                ax.legend()
            else:
                ax.text(0.5, 0.5, "no runs with metrics yet", ha="center", va="center", transform=ax.transAxes)
            fig.tight_layout()
            name = {"val": f"val_loss_{model}", "zoom": f"val_loss_{model}_zoom", "train": f"train_loss_{model}", "time": f"val_loss_time_{model}"}[kind]
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=120)
            plt.close(fig)
            written.append(path)
    return written


_TITLES = {
    "val": "validation loss",
    "zoom": "validation loss, last part",
    "train": "training loss (smoothed)",
    "time": "validation loss against training time",
}


def _label(row: ComparisonRow) -> str:
    label = OPTIMIZER_LABELS.get(row.optimizer, row.optimizer)
    return label if row.status == "finished" else f"{label} ({row.status_text})"


def _draw(ax, group: Sequence[ComparisonRow], kind: str) -> int:
    plotted = 0
    if kind == "time":
        longest = max((r.curves.val[-1][2] for r in group), default=0.0)
        unit, scale = ("hours", 3600.0) if longest > 2 * 3600 else ("minutes", 60.0)
        for row in group:
            xs = [elapsed / scale for _, _, elapsed in row.curves.val]
            ax.plot(xs, [loss for _, loss, _ in row.curves.val], marker=".", label=_label(row))
            plotted += 1
        ax.set_xlabel(f"training time ({unit})")
        ax.set_ylabel("validation loss")
        return plotted

    if kind == "train":
        for row in sorted(group, key=lambda r: _optimizer_key(r.optimizer)):
            if row.curves.train:
                xs = [t for t, _ in row.curves.train]
                marker = "." if len(xs) < MARKER_MAX_POINTS else None
                ax.plot(xs, _smooth([loss for _, loss in row.curves.train], 0.8), marker=marker, label=_label(row))
                plotted += 1
        ax.set_xlabel("tokens")
        ax.set_ylabel("training loss")
        return plotted

    start = 0
    if kind == "zoom":
        longest = max((r.curves.val[-1][0] for r in group), default=0)
        start = longest * (1 - ZOOM_FRACTION)
    visible_losses: list[float] = []
    for row in sorted(group, key=lambda r: _optimizer_key(r.optimizer)):
        points = [(t, loss) for t, loss, _ in row.curves.val if t >= start]
        if not points:
            continue
        line = ax.plot(*zip(*points), marker=".", label=_label(row))[0]
        if row.status == "diverged":
            ax.plot(*points[-1], marker="x", markersize=10, color=line.get_color())
        visible_losses += [loss for _, loss in points]
        plotted += 1
    if kind == "zoom" and visible_losses:
        low, high = min(visible_losses), max(visible_losses)
        margin = 0.05 * (high - low) or 0.01
        ax.set_ylim(low - margin, high + margin)
    ax.set_xlabel("tokens")
    ax.set_ylabel("validation loss")
    return plotted


def write_outputs(rows: Sequence[ComparisonRow], budgets: Sequence[int], out_dir: Path, title: str) -> list[Path]:
    """Write table.md, table.csv and the plots to `out_dir`; return the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table_md = out_dir / "table.md"
    table_csv = out_dir / "table.csv"
    table_md.write_text(format_markdown(rows, budgets, title), encoding="utf-8")
    table_csv.write_text(format_csv(rows, budgets), encoding="utf-8")
    return [table_md, table_csv, *plot_comparison(rows, out_dir)]
