"""`python -m mars_m_exp +model=<name> +optim=<name> [overrides]`: train one run (or a sweep with -m)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from .checkpoint import CheckpointError
from .config import ConfigError, register_configs, resolve_config
from .data.embedded import CorpusError
from .data.shards import ShardError
from .data.tokenizer import TokenizerUnavailableError

log = logging.getLogger("mars_m_exp")

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Groups with no default: the user picks one with `+group=option`.
REQUIRED_GROUPS = ("model", "optim")


def available_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def check_required_groups(choices: dict) -> None:
    for group in REQUIRED_GROUPS:
        if choices.get(group) is None:
            options = ", ".join(available_options(group))
            raise ConfigError(f"no {group} chosen: add +{group}=<name> to the command, one of: {options}")


register_configs()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from .trainer import run_training

    hydra_cfg = HydraConfig.get()
    try:
        check_required_groups(dict(hydra_cfg.runtime.choices))
        resolved = resolve_config(cfg)
    except ConfigError as exc:
        log.error("invalid configuration: %s", exc)
        sys.exit(2)

    run_dir = Path(hydra_cfg.runtime.output_dir)
    launch_dir = Path(hydra_cfg.runtime.cwd)
    try:
        state = run_training(resolved, run_dir, launch_dir)
    except (ConfigError, ShardError, CorpusError, CheckpointError, TokenizerUnavailableError) as exc:
        log.error("%s", exc)
        sys.exit(2)
    return state.best_val_loss


if __name__ == "__main__":
    # Hydra's own logging is configured before main runs; keep tokenizer threads quiet.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
