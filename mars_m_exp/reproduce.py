"""`make reproduce-table`: run a family of comparison presets as one sweep, then tabulate and plot it.

A family is every preset in `conf/experiment/` named `<family>_<optimizer>`: `owt_gpt2_small`
is the MARS-M paper's GPT-2 small run on OpenWebText with MARS-M, Muon (Moonlight) and AdamW,
and `cpu_tiny` is the same comparison scaled down to a CPU. A prefix selects several families
(`owt` is small, medium and large on OpenWebText).

    python -m mars_m_exp.reproduce                                  # cpu_tiny, here
    python -m mars_m_exp.reproduce --preset owt_gpt2_small --launcher slurm
    python -m mars_m_exp.reproduce --sweep sweeps/reproduce/owt_gpt2_small   # outputs only
    python -m mars_m_exp.reproduce --estimate                       # GPU-hours per paper preset

Extra arguments are Hydra overrides for every run (`trainer.max_steps=20`). The sweep goes to
`sweeps/reproduce/<name>` and the table and plots to `results/<name>`, where the name is the
preset followed by the extra overrides, so rerunning the same command resumes the same runs.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from omegaconf import OmegaConf

from .comparison import PlannedRun, collect_comparison, format_tokens, run_tokens, write_outputs
from .config import CONF_DIR, available_options
from .report import run_command_line

log = logging.getLogger(__name__)

DEFAULT_PRESET = "cpu_tiny"
# Hydra overrides per launcher. `slurm` runs each preset on one 8-GPU node, as the released
# MARS-M launch scripts do (torchrun --nproc_per_node=8).
LAUNCHERS = {
    "local": [],
    "slurm": ["hydra/launcher=slurm", "hardware=gpu_node8"],
    "slurm_cpu": ["hydra/launcher=slurm_cpu"],
}
# Assumptions of --estimate: dense bf16 peak of an H100 SXM, and a model FLOPs utilization
# typical of a well-tuned GPT-2 run with torch.compile.
DEFAULT_PEAK_TFLOPS = 989.0
DEFAULT_MFU = 0.4


class PresetError(ValueError):
    pass


def split_preset(name: str) -> tuple[str, str] | None:
    """Split `owt_gpt2_small_mars_m` into its family and optimizer; None when it is no comparison preset."""
    for optimizer in sorted(available_options("optim"), key=len, reverse=True):
        if name.endswith("_" + optimizer) and len(name) > len(optimizer) + 1:
            return name[: -len(optimizer) - 1], optimizer
    return None


def families() -> dict[str, list[str]]:
    """Return every comparison family in conf/experiment with its presets."""
    found: dict[str, list[str]] = {}
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        parts = split_preset(path.stem)
        if parts is not None:
            found.setdefault(parts[0], []).append(path.stem)
    return found


def family_members(preset: str) -> list[str]:
    """Return the presets of family `preset`, or of every family whose name starts with `preset_`."""
    known = families()
    members = [name for family, names in known.items() if family == preset or family.startswith(preset + "_") for name in names]
    if not members:
        raise PresetError(f"no comparison preset matches PRESET={preset!r}; choose one of: {', '.join(sorted(known))}")
    return members


def _user_overrides(overrides: Sequence[str]) -> list[str]:
    # Settings of Hydra itself (launcher, sweep directory) do not change what a run computes.
    return [o for o in overrides if not o.lstrip("+~").startswith("hydra")]


def compose_preset(name: str, overrides: Sequence[str] = ()):
    """Compose and validate the config of preset `name` with the overrides, as one run of it would.

    Raises PresetError with one line for an invalid override or value. Warnings about odd
    values are left to the runs, which log them again.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from .config import ConfigError, register_configs, resolve_config

    register_configs()
    config_log = logging.getLogger("mars_m_exp.config")
    level = config_log.level
    config_log.setLevel(logging.ERROR)
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            return resolve_config(compose("config", overrides=[f"+experiment={name}", *_user_overrides(overrides)]))
    except ConfigError as exc:
        raise PresetError(f"invalid configuration of preset {name}: {exc}") from None
    except (HydraException, OmegaConfBaseException) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PresetError(
            f"preset {name} does not compose with the overrides {' '.join(overrides) or '(none)'}: {first_line}. "
            "Give each key one value (reproduce runs one run per preset, not a sweep) and check its spelling"
        ) from None
    finally:
        config_log.setLevel(level)


def plan_runs(members: Sequence[str], overrides: Sequence[str] = ()) -> list[PlannedRun]:
    """Compose each preset with the overrides to learn its model, optimizer and token count."""
    planned = []
    for name in members:
        cfg = compose_preset(name, overrides)
        planned.append(PlannedRun(preset=name, model=cfg.model.name, optimizer=cfg.optim.name, planned_tokens=run_tokens(cfg)))
    return planned


def output_name(preset: str, overrides: Sequence[str]) -> str:
    """Name the output directories after the preset and the overrides that change what the runs compute."""
    return ",".join([preset, *_user_overrides(overrides)]).replace("/", "_")


def quote_override_value(value: str) -> str:
    """Quote a value for Hydra's override grammar, which reads `,` and `=` unquoted as syntax."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sweep_override(override: str) -> str:
    """Write `model.X=V` and `optim.X=V` as `++model.X=V` for the sweep's command line.

    Hydra applies the command line once to the primary config before the sweep starts. The
    model and optimizer come from each preset, so at that point `model.block_size` does not
    exist yet and a plain override fails. `++` adds the key there and overrides it in every run.
    """
    if override.split(".", 1)[0] in ("model", "optim") and "=" in override:
        return "++" + override
    return override


def sweep_command(members: Sequence[str], sweep_dir: Path, launcher: str, overrides: Sequence[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mars_m_exp",
        "-m",
        "+experiment=" + ",".join(members),
        f"hydra.sweep.dir={quote_override_value(str(sweep_dir))}",
        *LAUNCHERS[launcher],
        *[sweep_override(o) for o in overrides],
    ]


def planned_from_sweep(sweep_dir: Path) -> list[PlannedRun]:
    """Plan the runs of a sweep that reproduce launched, from the presets and overrides in its multirun.yaml."""
    multirun = sweep_dir / "multirun.yaml"
    if not multirun.is_file():
        return []
    task = [str(o) for o in OmegaConf.to_container(OmegaConf.load(multirun).hydra.overrides.task, resolve=False)]
    members = next((o.split("=", 1)[1].split(",") for o in task if o.startswith("+experiment=")), [])
    extra = [o for o in task if not o.startswith("+experiment=")]
    if not members or any(split_preset(m) is None for m in members):
        # Not a sweep of comparison presets: the table shows the runs found, without a plan.
        return []
    return plan_runs(members, extra)


def build_outputs(sweep_dir: Path, out_dir: Path, planned: Sequence[PlannedRun], title: str, budgets: Sequence[int] | None) -> int:
    try:
        rows, used_budgets = collect_comparison(sweep_dir, planned, budgets)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    paths = write_outputs(rows, used_budgets, out_dir, title)
    print((out_dir / "table.md").read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def estimate(peak_tflops: float, mfu: float) -> str:
    """GPU-hours of every paper preset from its token count, FLOPs per token and an assumed MFU."""
    import torch

    from .model import GPT, gpt_config

    lines = [
        f"GPU-hours per run at {mfu:.0%} MFU of {peak_tflops:g} TFLOP/s per GPU (bf16 dense):",
        "",
        "| preset | model | tokens per run | GFLOP/token | GPU-hours per run | runs | GPU-hours |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for family, members in sorted(families().items()):
        if family == DEFAULT_PRESET:
            continue
        cfg = compose_preset(members[0])
        with torch.device("meta"):
            model = GPT(gpt_config(cfg.model))
        tokens = run_tokens(cfg)
        hours = model.flops_per_token() * tokens / (mfu * peak_tflops * 1e12) / 3600
        lines.append(
            f"| {family} | {cfg.model.name} | {format_tokens(tokens)} | {model.flops_per_token() / 1e9:.2f} "
            f"| {hours:,.0f} | {len(members)} | {hours * len(members):,.0f} |"
        )
    lines += ["", "Exact MARS-M (optim=mars_m_exact) evaluates two gradients a step, so its run takes twice the hours."]
    return "\n".join(lines)


def parse_budgets(text: str) -> list[int]:
    try:
        budgets = sorted(int(float(value)) for value in text.split(",") if value.strip())
    except ValueError:
        budgets = []
    if not budgets or budgets[0] <= 0:
        raise argparse.ArgumentTypeError(f"invalid token budgets {text!r}: give positive token counts separated by commas, e.g. 5e9,20e9")
    return budgets


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mars_m_exp.reproduce",
        description="Run a family of comparison presets as one sweep, then write its table and plots to results/.",
    )
    parser.add_argument("--preset", help=f"family of presets to run (default: {DEFAULT_PRESET}); a prefix such as owt selects several")
    parser.add_argument("--launcher", choices=sorted(LAUNCHERS), default="local", help="where the runs go (default: %(default)s)")
    parser.add_argument("--sweep", type=Path, help="only rebuild the outputs from the runs in this sweep directory")
    parser.add_argument("--out", type=Path, help="output directory (default: results/<name>)")
    parser.add_argument("--budgets", type=parse_budgets, help="token counts for the val @ N columns (default: 10%%, 40%% and 100%% of the longest run)")
    parser.add_argument("--estimate", action="store_true", help="print the GPU-hours of every paper preset and exit")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="MFU assumed by --estimate (default: %(default)s)")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS, help="peak TFLOP/s per GPU for --estimate (default: %(default)s, H100 SXM)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run, e.g. trainer.max_steps=20")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.estimate:
        if not 0 < args.mfu <= 1:
            parser.error(f"invalid --mfu {args.mfu}: give a fraction in (0, 1], e.g. 0.4")
        if args.peak_tflops <= 0:
            parser.error(f"invalid --peak-tflops {args.peak_tflops}: give the GPU's peak in TFLOP/s, e.g. 989 for an H100 SXM")
        print(estimate(args.peak_tflops, args.mfu))
        return 0

    try:
        if args.sweep is not None:
            if not args.sweep.is_dir():
                print(f"error: SWEEP={args.sweep} is not a directory; pass a sweep directory such as sweeps/reproduce/{DEFAULT_PRESET}", file=sys.stderr)
                return 2
            # The outputs are named after the sweep, so they never replace those of another sweep.
            name = args.sweep.resolve().name
            if args.preset:
                planned = plan_runs(family_members(args.preset), args.overrides)
            else:
                planned = planned_from_sweep(args.sweep)
            out_dir = args.out or Path("results") / name
            return build_outputs(args.sweep, out_dir, planned, f"{name}: validation loss by optimizer", args.budgets)

        preset = args.preset or DEFAULT_PRESET
        members = family_members(preset)
        planned = plan_runs(members, args.overrides)
    except PresetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    name = output_name(preset, args.overrides)
    sweep_dir = Path("sweeps") / "reproduce" / name
    out_dir = args.out or Path("results") / name
    command = sweep_command(members, sweep_dir, args.launcher, args.overrides)
    log.info("running %d presets (%s) in %s:\n  %s", len(members), ", ".join(members), sweep_dir, " ".join(command))
    returncode = subprocess.call(command)
    built = build_outputs(sweep_dir, out_dir, planned, f"{name}: validation loss by optimizer", args.budgets)
    if returncode != 0:
        print(f"error: the sweep exited with status {returncode}; the table marks the runs that did not finish", file=sys.stderr)
    return returncode or built


if __name__ == "__main__":
    run_command_line(main)
