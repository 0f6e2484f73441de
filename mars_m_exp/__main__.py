"""`python -m mars_m_exp +model=<name> +optim=<name> [overrides]`: train one run (or a sweep with -m)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from .checkpoint import CheckpointError
from .config import CONF_DIR, ConfigError, available_options, register_configs, resolve_config
from .distributed import process_rank
from .data.embedded import CorpusError
from .data.shards import ShardError
from .data.tokenizer import TokenizerUnavailableError

log = logging.getLogger("mars_m_exp")

# Groups with no default: the user picks one with `+group=option`.
REQUIRED_GROUPS = ("model", "optim")


def check_required_groups(choices: dict) -> None:
    for group in REQUIRED_GROUPS:
        if choices.get(group) is None:
            options = ", ".join(available_options(group))
            raise ConfigError(f"no {group} chosen: add +{group}=<name> to the command, one of: {options}")


def quiet_nonzero_rank(rank: int) -> None:
    """Keep ranks other than 0 from writing the run's log file; they print warnings only."""
    if rank == 0:
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
        else:
            handler.setLevel(logging.WARNING)


register_configs()


class RunFailedError(RuntimeError):
    """A run of a sweep that stopped on an error the log already explains."""


def fail(message: str, *args) -> None:
    """Log the error and end the run with status 2, or, inside a sweep, only this run.

    Hydra catches an exception from one run of a sweep, runs the others and reports the
    failure at the end. A SystemExit would stop the whole sweep at this run.
    """
    log.error(message, *args)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise RunFailedError(message % args)
    sys.exit(2)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from .trainer import NonFiniteError, run_training

    hydra_cfg = HydraConfig.get()
    quiet_nonzero_rank(process_rank())
    try:
        check_required_groups(dict(hydra_cfg.runtime.choices))
        resolved = resolve_config(cfg)
    except ConfigError as exc:
        fail("invalid configuration: %s", exc)

    run_dir = Path(hydra_cfg.runtime.output_dir)
    launch_dir = Path(hydra_cfg.runtime.cwd)
    try:
        state = run_training(resolved, run_dir, launch_dir)
    except (ConfigError, ShardError, CorpusError, CheckpointError, TokenizerUnavailableError, NonFiniteError) as exc:
        fail("%s", exc)
    return state.best_val_loss


if __name__ == "__main__":
    if process_rank() != 0:
        # Under torchrun every rank composes the config; only rank 0 writes .hydra/.
        sys.argv.append("hydra.output_subdir=null")
    main()
