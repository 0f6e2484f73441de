"""Shared test set-up: offline tokenizer files, an isolated cache, and config composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"
SHARED_TIKTOKEN_CACHE = REPO_ROOT.parent / "shared" / "tiktoken_cache"

# tiktoken reads its BPE files from this folder instead of downloading them.
if SHARED_TIKTOKEN_CACHE.is_dir() and "TIKTOKEN_CACHE_DIR" not in os.environ:
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED_TIKTOKEN_CACHE)
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> Path:
    """One embedded-corpus cache for the whole session, so the corpus is tokenized once."""
    path = tmp_path_factory.mktemp("corpus_cache")
    os.environ["MARS_M_EXP_CACHE"] = str(path)
    return path


def compose_config(overrides: list[str]):
    """Compose the primary config with `overrides`, as the command line would."""
    from mars_m_exp.config import register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


# Overrides that shrink a run to seconds on a CPU: the tiny model with 64-token windows.
TINY_RUN = [
    "+model=tiny",
    "hardware=cpu",
    "model.block_size=64",
    "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2",
    "trainer.eval_iters=2",
    "trainer.log_interval=1",
    "schedule.warmup_steps=2",
]
