"""Random training windows and fixed validation windows over memory-mapped token shards.

Windows of block_size + 1 tokens are drawn uniformly over every start position of every
shard, so a shard is drawn in proportion to its size. The windows of training step s are
a pure function of (seed, s): the global batch of step s is the same whatever the number
of processes or the accumulation steps, each rank takes its own slice of it, and a resumed
run draws exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .shards import MANIFEST_NAME, ShardError, open_shard

log = logging.getLogger(__name__)

# Validation windows use their own seed so runs with different `seed` values are evaluated
# on the same tokens.
VALIDATION_SEED = 0x5EED


def find_shards(folder: str | os.PathLike, split: str) -> list[Path]:
    """Return the sorted `.bin` files of a split ("train" or "val") in `folder`.

    A folder whose manifest.json records an unfinished preparation is rejected, so a run
    never trains on the shards written before a preparation was interrupted.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ShardError(f"data.path {folder} is not a folder; prepare the data or point data.path at the shard folder")
    _check_preparation_finished(folder)
    shards = sorted(p for p in folder.iterdir() if p.suffix == ".bin" and split in p.name and p.is_file())
    if not shards:
        raise ShardError(f"no {split} shards (*{split}*.bin) in {folder}; prepare the data first")
    return shards


def _check_preparation_finished(folder: Path) -> None:
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return  # shards made by llm.c, modded-nanogpt or nanoGPT come without a manifest
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{manifest_path} is not valid JSON ({exc.msg}); prepare the data again") from None
    # Only the data_prep manifests carry "complete"; the embedded corpus writes its manifest last.
    if manifest.get("complete") is False:
        raise ShardError(
            f"the preparation of {folder} has not finished ({len(manifest.get('shards', []))} shards so far); "
            "rerun the same data_prep command to complete it"
        )


class TokenWindows:
    """All windows of `block_size + 1` tokens across a list of shards, addressed by one index.

    A shard shorter than a window (such as the last, partial shard of a preparation)
    contributes no windows. At least one shard must hold a whole window.
    """

    def __init__(self, paths: Sequence[Path], block_size: int) -> None:
        self.paths = list(paths)
        self.block_size = block_size
        self.shards = [open_shard(p) for p in self.paths]

        starts_per_shard = [max(0, len(tokens) - block_size) for tokens in self.shards]
        if not any(starts_per_shard):
            sizes = ", ".join(f"{path} has {len(tokens)} tokens" for path, tokens in zip(self.paths[:3], self.shards))
            more = f" and {len(self.paths) - 3} more files" if len(self.paths) > 3 else ""
            raise ShardError(
                f"{sizes}{more}, fewer than model.block_size + 1 = {block_size + 1}; "
                "lower model.block_size or use more text"
            )
        short = [path.name for path, starts in zip(self.paths, starts_per_shard) if not starts]
        if short:
            log.warning("%d shard(s) shorter than %d tokens are not sampled: %s", len(short), block_size + 1, ", ".join(short))
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
        """Return what a checkpoint needs to continue the same batch sequence.

        The batches of step s are drawn from a generator seeded with (seed, s), so the
        seed and the next step are the whole random state. The window count identifies
        the training data, so a resume on other data is detected.
        """
        return {
            "seed": self.seed,
            "position": self.position,
            "global_batch_size": self.global_batch_size,
            "num_windows": self.windows.num_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the seed and position; warn when the batch size or the data changed.

        Either change makes the resumed batches differ from those of an uninterrupted run.
        """
        if int(state["global_batch_size"]) != self.global_batch_size:
            log.warning(
                "the checkpoint drew %s sequences per step and this run draws %d, so the resumed batches "
                "differ from an uninterrupted run's",
                state["global_batch_size"],
                self.global_batch_size,
            )
        # Checkpoints written before the window count was saved lack the key.
        if "num_windows" in state and int(state["num_windows"]) != self.windows.num_windows:
            log.warning(
                "the training shards in %s changed since the checkpoint was written (%s windows then, %d now), "
                "so the resumed batches differ from an uninterrupted run's",
                self.windows.paths[0].parent,
                state["num_windows"],
                self.windows.num_windows,
            )
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
