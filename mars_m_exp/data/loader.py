"""Random training windows and fixed validation windows over memory-mapped token shards.

Windows of block_size + 1 tokens are drawn uniformly over every start position of every
shard, so a shard is drawn in proportion to its size. The windows of training step s are
a pure function of (seed, s): the global batch of step s is the same whatever the number
of processes or the accumulation steps, each rank takes its own slice of it, and a resumed
run draws exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .shards import ShardError, open_shard

# Validation windows use their own seed so runs with different `seed` values are evaluated
# on the same tokens.
VALIDATION_SEED = 0x5EED


def find_shards(folder: str | os.PathLike, split: str) -> list[Path]:
    """Return the sorted `.bin` files of a split ("train" or "val") in `folder`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"data.path {folder} is not a folder; prepare the data or point data.path at the shard folder")
    shards = sorted(p for p in folder.iterdir() if p.suffix == ".bin" and split in p.name and p.is_file())
    if not shards:
        raise ShardError(f"no {split} shards (*{split}*.bin) in {folder}; prepare the data first")
    return shards


class TokenWindows:
    """All windows of `block_size + 1` tokens across a list of shards, addressed by one index."""

    def __init__(self, paths: Sequence[Path], block_size: int) -> None:
        self.paths = list(paths)
        self.block_size = block_size
        self.shards = [open_shard(p) for p in self.paths]

        starts_per_shard = []
        for path, tokens in zip(self.paths, self.shards):
            if len(tokens) < block_size + 1:
                raise ShardError(
                    f"token file {path} has {len(tokens)} tokens, fewer than model.block_size + 1 = {block_size + 1}; "
                    "lower model.block_size or use more text"
                )
            starts_per_shard.append(len(tokens) - block_size)
        self.cumulative_starts = np.cumsum(starts_per_shard)

    @property
    def num_windows(self) -> int:
        return int(self.cumulative_starts[-1])

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    def gather(self, indices: np.ndarray) -> torch.Tensor:
        """Return the windows at global start indices as an int64 tensor (len(indices), block_size + 1)."""
        shard_ids = np.searchsorted(self.cumulative_starts, indices, side="right")
        rows = []
        for index, shard_id in zip(indices, shard_ids):
            local = int(index) - (int(self.cumulative_starts[shard_id - 1]) if shard_id else 0)
            rows.append(np.asarray(self.shards[shard_id][local : local + self.block_size + 1], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))


class RandomWindowSampler:
    """Draw the global batch of each training step from a generator keyed by (seed, step)."""

    def __init__(self, windows: TokenWindows, global_batch_size: int, seed: int) -> None:
        self.windows = windows
        self.global_batch_size = global_batch_size
        self.seed = seed
        # The next step whose batch the trainer will ask for; saved in checkpoints.
        self.position = 0

    def step_indices(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.windows.num_windows, size=self.global_batch_size)

    def micro_batch(
        self, step: int, micro_step: int, micro_batch_size: int, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (inputs, targets) of one micro-batch of `step` for `rank`.

        Rank r's share of the global batch is the r-th contiguous block of
        global_batch_size / world_size sequences, consumed micro-batch by micro-batch.
        """
        per_rank = self.global_batch_size // world_size
        start = rank * per_rank + micro_step * micro_batch_size
        indices = self.step_indices(step)[start : start + micro_batch_size]
        batch = self.windows.gather(indices)
        self.position = max(self.position, step + 1)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "position": self.position, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.seed = int(state["seed"])
        self.position = int(state["position"])


class ValidationWindows:
    """A fixed list of validation windows, split across ranks, identical at every evaluation."""

    def __init__(self, windows: TokenWindows, num_batches: int, micro_batch_size: int) -> None:
        self.windows = windows
        self.num_batches = num_batches
        self.micro_batch_size = micro_batch_size
        rng = np.random.default_rng(VALIDATION_SEED)
        self.indices = rng.integers(0, windows.num_windows, size=num_batches * micro_batch_size)

    def batches(self, rank: int = 0, world_size: int = 1):
        """Yield (inputs, targets) micro-batches of this rank's share (batches rank, rank + world, ...)."""
        for batch_index in range(rank, self.num_batches, world_size):
            start = batch_index * self.micro_batch_size
            batch = self.windows.gather(self.indices[start : start + self.micro_batch_size])
            yield batch[:, :-1], batch[:, 1:]
