"""Sweeps: the stable name of a sweep directory, and a summary of the runs inside one.

`python -m mars_m_exp.report SWEEP_DIR` lists every run of a sweep with its overrides,
status, steps done, best and last validation loss and tokens/s, and marks the learning rate
with the lowest mean best validation loss per model and optimizer. It reads only the files
that runs write as they go (`config.yaml`, `metrics.jsonl`, `train.log`, `.hydra/`), so it
works while runs are still going, and it lists runs that have not started yet from the
sweep's `multirun.yaml`.

Importing this module registers the `mars_m_exp.sweep_name` resolver that `conf/config.yaml`
uses in `hydra.sweep.dir`. Hydra imports it before it resolves that path, because
`SweepCallback` is listed in `hydra.callbacks`; a submitit job imports it when it unpickles
the callbacks.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .distributed import process_rank
from .metrics import read_metrics

log = logging.getLogger(__name__)

SWEEP_NAME_RESOLVER = "mars_m_exp.sweep_name"
# The sweep name when no fixed override is left to name it: every override is swept or excluded.
ALL_SWEPT_NAME = "sweep"
# A run that is neither finished nor stopped is `running` while its metrics or log changed
# within this many minutes, and `stalled` after that (crashed, killed or waiting in a queue).
DEFAULT_STALE_MINUTES = 30.0


# --------------------------------------------------------------------------- sweep name


def _parse_overrides(lines: Iterable[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if OmegaConf.is_config(lines):
        # Unresolved, so an override whose value contains "${...}" stays as it was typed.
        lines = OmegaConf.to_container(lines, resolve=False)
    return OverridesParser.create().parse_overrides([str(line) for line in lines])


def _overrides_dirname(overrides: Sequence, naming: Any) -> str:
    # Hydra's own function, so names match `hydra.job.override_dirname` exactly.
    # NOTE: a private Hydra module, like BasicSweeper below; checked with hydra-core 1.3.8,
    # and pyproject pins hydra-core below 1.4.
    from hydra._internal.config_loader_impl import get_overrides_dirname

    return get_overrides_dirname(
        overrides=list(overrides),
        exclude_keys=list(naming.exclude_keys),
        item_sep=naming.item_sep,
        kv_sep=naming.kv_sep,
    )


def sweep_name(task_overrides: Sequence[str], naming: Any) -> str:
    """Name a sweep from its fixed overrides: the sweep's `override_dirname` without the swept keys.

    `task_overrides` are the command-line overrides of the multirun, sweep syntax included
    (`optim.lr=3e-3,6e-3`); `naming` is `hydra.job.config.override_dirname`. Rerunning the
    same sweep, or the same sweep with more values, gives the same name.
    """
    fixed = [override for override in _parse_overrides(task_overrides) if not override.is_sweep_override()]
    # A "/" in a value (data.path=/data/owt) would nest the sweep directory, and the wandb
    # group, the directory's last component, would then be only part of the name.
    return _overrides_dirname(fixed, naming).replace("/", "_") or ALL_SWEPT_NAME


# use_cache: each job of a sweep recomposes its config with only its own values, so it
# could not tell the swept keys apart. Hydra copies the resolver cache of the sweep's
# config into every job's config, so jobs reuse the name computed once from the sweep.
OmegaConf.register_new_resolver(SWEEP_NAME_RESOLVER, sweep_name, use_cache=True, replace=True)


class SweepCallback(Callback):
    """Log where a sweep writes, and log its summary when every run has returned (rank 0 only)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if process_rank() == 0:
            sweep_dir = config.hydra.sweep.dir
            log.info("sweep directory: %s (summary: python -m mars_m_exp.report '%s')", sweep_dir, sweep_dir)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if process_rank() == 0:
            runs = collect_runs(Path(config.hydra.sweep.dir))
            log.info("sweep summary:\n%s", format_report(runs))


# --------------------------------------------------------------------------- runs


@dataclass
class RunSummary:
    """One run of a sweep as its files show it now."""

    name: str  # the run directory relative to the sweep directory
    overrides: list[str]
    status: str  # pending, running, stopped, failed, stalled or finished
    model: str | None = None
    optimizer: str | None = None
    lr: float | None = None
    seed: int | None = None
    steps_done: int = 0
    max_steps: int | None = None
    best_val_loss: float | None = None
    last_val_loss: float | None = None
    # Of the last logged interval, so it reflects the current speed after warm-up.
    tokens_per_s: float | None = None
    best_lr: bool = False


def _load_run_config(run_dir: Path) -> DictConfig | None:
    # config.yaml is the resolved config the trainer writes; .hydra/config.yaml exists from
    # the moment Hydra creates the directory, before the trainer starts.
    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            return OmegaConf.load(path)
    return None


def _select(cfg: DictConfig | None, key: str) -> Any:
    if cfg is None:
        return None
    try:
        return OmegaConf.select(cfg, key, default=None)
    except OmegaConfBaseException:  # an interpolation that only resolves inside Hydra
        return None


def _number(value: Any) -> float | None:
    # metrics.jsonl stores a non-finite loss as the string "nan" or "inf".
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _log_status(run_dir: Path) -> str | None:
    """Return `stopped` or `failed` when that is the last thing the run's log reports."""
    log_files = sorted(run_dir.glob("*.log"))
    if not log_files:
        return None
    status = None
    for line in log_files[0].read_text(errors="replace").splitlines():
        if "stopped at step" in line:
            status = "stopped"
        elif "[ERROR]" in line:
            status = "failed"
        elif "resumed from" in line or "process(es)" in line:
            # A new start of the run: an earlier stop or error no longer applies.
            status = None
    return status


def _newest_change(run_dir: Path) -> float:
    paths = [run_dir / "metrics.jsonl", *run_dir.glob("*.log"), run_dir]
    return max(path.stat().st_mtime for path in paths if path.exists())


def summarize_run(run_dir: Path, sweep_dir: Path, stale_minutes: float = DEFAULT_STALE_MINUTES) -> RunSummary:
    """Summarize one run directory from the files it contains now."""
    cfg = _load_run_config(run_dir)
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    name = str(run_dir.relative_to(sweep_dir))
    overrides = [str(line) for line in OmegaConf.load(overrides_file)] if overrides_file.is_file() else [name]

    records = read_metrics(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    train = [r for r in records if r.get("event") == "train"]
    evals = [r for r in records if r.get("event") == "eval"]
    val_losses = [loss for loss in (_number(r.get("val_loss")) for r in evals) if loss is not None]

    lr = _select(cfg, "optim.lr")
    seed = _select(cfg, "seed")
    max_steps = _select(cfg, "trainer.max_steps")
    summary = RunSummary(
        name=name,
        overrides=overrides,
        status="running",
        model=_select(cfg, "model.name"),
        optimizer=_select(cfg, "optim.name"),
        lr=float(lr) if isinstance(lr, (int, float)) else None,
        seed=int(seed) if isinstance(seed, int) else None,
        steps_done=max((int(r.get("step", 0)) for r in records), default=0),
        max_steps=int(max_steps) if isinstance(max_steps, int) else None,
        best_val_loss=min(val_losses) if val_losses else None,
        last_val_loss=_number(evals[-1].get("val_loss")) if evals else None,
        tokens_per_s=_number(train[-1].get("tokens_per_s")) if train else None,
    )

    if summary.max_steps is not None and summary.steps_done >= summary.max_steps:
        summary.status = "finished"
    else:
        summary.status = _log_status(run_dir) or "running"
        if summary.status == "running" and time.time() - _newest_change(run_dir) > 60 * stale_minutes:
            summary.status = "stalled"
    return summary


def _run_dirs(sweep_dir: Path) -> list[Path]:
    # Every run directory contains .hydra/overrides.yaml from its start. A value with a "/"
    # in it nests the directory deeper, so the search is recursive.
    found = []
    for overrides_file in sweep_dir.rglob(".hydra/overrides.yaml"):
        run_dir = overrides_file.parent.parent
        if ".submitit" not in run_dir.relative_to(sweep_dir).parts:
            found.append(run_dir)
    return sorted(found)


def planned_runs(sweep_dir: Path) -> list[tuple[str, list[str]]]:
    """Return (run directory name, overrides) of every run that the sweep's `multirun.yaml` plans.

    Returns an empty list when the file is missing or the sweep used a sweeper other than
    Hydra's basic one or a run directory name other than `hydra.job.override_dirname`,
    because the names cannot be derived then.
    """
    multirun_file = sweep_dir / "multirun.yaml"
    if not multirun_file.is_file():
        return []
    hydra_cfg = OmegaConf.load(multirun_file).hydra
    if "BasicSweeper" not in str(hydra_cfg.sweeper.get("_target_", "")):
        return []
    if OmegaConf.to_container(hydra_cfg.sweep)["subdir"] != "${hydra.job.override_dirname}":
        return []

    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{key}={value}" for key, value in (hydra_cfg.sweeper.get("params") or {}).items()]
    task_overrides = OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)
    sweep_overrides = _parse_overrides([*params, *task_overrides])
    jobs = BasicSweeper.split_arguments(sweep_overrides, max_batch_size=None)[0]
    naming = hydra_cfg.job.config.override_dirname
    return [(_overrides_dirname(_parse_overrides(job), naming), list(job)) for job in jobs]


def collect_runs(sweep_dir: Path, stale_minutes: float = DEFAULT_STALE_MINUTES) -> list[RunSummary]:
    """Summarize every run of the sweep, planned runs without a directory as `pending`."""
    runs = [summarize_run(run_dir, sweep_dir, stale_minutes) for run_dir in _run_dirs(sweep_dir)]
    started = {run.name for run in runs}
    for name, overrides in planned_runs(sweep_dir):
        if name not in started:
            runs.append(RunSummary(name=name, overrides=overrides, status="pending"))
            started.add(name)
    runs.sort(key=lambda run: (run.model or "", run.optimizer or "", run.lr or 0.0, run.seed or 0, run.name))
    mark_best_lr(runs)
    return runs


@dataclass
class BestLR:
    """The learning rate with the lowest mean best validation loss for one model and optimizer."""

    model: str
    optimizer: str
    lr: float
    mean_best_val_loss: float
    runs: int  # runs at this lr with a validation loss (one per seed)
    finished: int  # runs of this model and optimizer that finished, over all lrs
    started: int  # runs of this model and optimizer with a run directory (pending ones have none)


def mark_best_lr(runs: list[RunSummary]) -> list[BestLR]:
    """Set `best_lr` on the runs at the lr with the lowest mean best validation loss.

    The choice is made per model and optimizer, averaging over the runs that share an lr
    (usually one per seed) and have a validation loss so far.
    """
    groups: dict[tuple[str, str], list[RunSummary]] = {}
    for run in runs:
        if run.model is not None and run.optimizer is not None:
            groups.setdefault((run.model, run.optimizer), []).append(run)

    best = []
    for (model, optimizer), group in sorted(groups.items()):
        losses_by_lr: dict[float, list[float]] = {}
        for run in group:
            if run.lr is not None and run.best_val_loss is not None:
                losses_by_lr.setdefault(run.lr, []).append(run.best_val_loss)
        if not losses_by_lr:
            continue
        lr, losses = min(losses_by_lr.items(), key=lambda item: statistics.fmean(item[1]))
        for run in group:
            run.best_lr = run.lr == lr
        finished = sum(run.status == "finished" for run in group)
        best.append(BestLR(model, optimizer, lr, statistics.fmean(losses), len(losses), finished, len(group)))
    return best


# --------------------------------------------------------------------------- output


def _cell(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def format_report(runs: list[RunSummary]) -> str:
    """Render the runs as an aligned table followed by the best lr per model and optimizer.

    Overrides that every run shares are printed once above the table, so each row shows
    only what sets that run apart.
    """
    if not runs:
        return "no runs found"
    shared = set(runs[0].overrides).intersection(*(run.overrides for run in runs[1:])) if len(runs) > 1 else set()
    header = ["", "overrides", "status", "steps", "best val", "last val", "tokens/s"]
    rows = []
    for run in runs:
        steps = f"{run.steps_done}/{run.max_steps}" if run.max_steps is not None else str(run.steps_done)
        rows.append(
            [
                "*" if run.best_lr else "",
                " ".join(o for o in run.overrides if o not in shared) or "(none)",
                run.status,
                steps,
                _cell(run.best_val_loss, ".4f"),
                _cell(run.last_val_loss, ".4f"),
                _cell(run.tokens_per_s, ",.0f"),
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    lines = []
    if shared:
        lines.append("shared overrides: " + " ".join(o for o in runs[0].overrides if o in shared))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]

    best = mark_best_lr(runs)
    if best:
        lines.append("")
        lines.append("* best lr per model and optimizer (lowest mean best val loss over the runs at that lr):")
        for entry in best:
            lines.append(
                f"  {entry.model} {entry.optimizer}: lr {entry.lr:g}, mean best val {entry.mean_best_val_loss:.4f} "
                f"over {entry.runs} run(s); {entry.finished} of {entry.started} started run(s) finished"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mars_m_exp.report",
        description="Summarize the runs of a sweep directory: status, steps, validation loss, tokens/s and the best lr.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the sweep directory, e.g. sweeps/+model=gpt2_small")
    parser.add_argument("--json", action="store_true", help="print one JSON object per run instead of the table")
    parser.add_argument(
        "--stale-minutes",
        type=float,
        default=DEFAULT_STALE_MINUTES,
        help="minutes without new metrics after which an unfinished run is reported as stalled (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    if not args.sweep_dir.is_dir():
        print(f"error: sweep directory {args.sweep_dir} not found; pass the directory that contains multirun.yaml and the run directories", file=sys.stderr)
        return 2
    runs = collect_runs(args.sweep_dir, args.stale_minutes)
    if args.json:
        for run in runs:
            print(json.dumps(asdict(run)))
    else:
        print(format_report(runs))
    return 0


def run_command_line(main_function) -> None:
    """Exit with the status of `main_function()`, quietly when the reader of stdout is gone.

    Output piped into `head` would otherwise end in a BrokenPipeError traceback.
    """
    try:
        status = main_function()
        sys.stdout.flush()  # inside the try, so a closed pipe is handled here
    except BrokenPipeError:
        # Python flushes stdout again at exit; pointing it at /dev/null keeps that flush quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    sys.exit(status)


if __name__ == "__main__":
    run_command_line(main)
