"""Token data: shard files, the embedded corpus and the samplers the trainer draws from."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .embedded import default_embedded_path, prepare_embedded
from .loader import RandomWindowSampler, TokenWindows, ValidationWindows, find_shards
from .shards import ShardError

log = logging.getLogger(__name__)


@dataclass
class DataSplits:
    train: RandomWindowSampler
    val: ValidationWindows
    path: Path


def resolve_data_path(data_cfg, launch_dir: Path) -> Path | None:
    """Return `data.path` as an absolute path, relative ones taken from the launch directory."""
    if data_cfg.path is None:
        return None
    path = Path(data_cfg.path).expanduser()
    return path if path.is_absolute() else launch_dir / path


def prepare_data(data_cfg, launch_dir: Path) -> Path:
    """Make sure the shards of `data_cfg` exist, preparing the embedded corpus if needed."""
    path = resolve_data_path(data_cfg, launch_dir)
    if data_cfg.name == "embedded":
        text_path = data_cfg.text_path
        if text_path is not None and not Path(text_path).expanduser().is_absolute():
            text_path = str(launch_dir / text_path)
        if path is None:
            path = default_embedded_path(data_cfg.cache_dir, text_path, data_cfg.val_fraction)
        return prepare_embedded(path, text_path, data_cfg.val_fraction)
    if path is None:
        raise ValueError(f"data.path is not set for data={data_cfg.name}; point it at the folder of token shards")
    if not path.is_dir():
        raise ShardError(
            f"data.path {path} for data={data_cfg.name} is not a folder; prepare the shards with "
            f"`python -m data_prep.prepare {data_cfg.name} --out {path}` (openwebtext, fineweb_edu), or point "
            "data.path at a folder of llm.c / modded-nanogpt shards or nanoGPT's train.bin and val.bin"
        )
    return path


def build_data(data_cfg, block_size: int, global_batch_size: int, eval_iters: int, micro_batch_size: int, seed: int, launch_dir: Path) -> DataSplits:
    path = prepare_data(data_cfg, launch_dir)
    train = TokenWindows(find_shards(path, "train"), block_size)
    val = TokenWindows(find_shards(path, "val"), block_size)
    log.info(
        "data %s: %d train tokens in %d shard(s), %d validation tokens, from %s",
        data_cfg.name,
        train.num_tokens,
        len(train.paths),
        val.num_tokens,
        path,
    )
    return DataSplits(
        train=RandomWindowSampler(train, global_batch_size, seed),
        val=ValidationWindows(val, eval_iters, micro_batch_size),
        path=path,
    )
