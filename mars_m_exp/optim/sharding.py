"""Newton-Schulz split across data-parallel ranks.

Under DDP every rank holds the same gradients and optimizer state, so orthogonalizing every
matrix on every rank (as the MARS-M reference code does) repeats the same work world_size
times. Instead each rank orthogonalizes its share of the matrices and the results are
exchanged with one all-gather, after which every rank applies the same update. The
momentum state is still updated on every rank, so checkpoints stay rank-independent.
"""

from __future__ import annotations

import heapq
from typing import Sequence

import torch
import torch.distributed as dist


def newton_schulz_flops(shape: tuple[int, int], steps: int) -> int:
    """Estimate the FLOPs of quintic Newton-Schulz on an A x B matrix (n = min, m = max side).

    Each step computes X @ X^T (2n^2 m), A @ A (2n^3) and B @ X (2n^2 m).
    """
    n, m = min(shape), max(shape)
    return steps * (4 * n * n * m + 2 * n**3)


def assign_to_ranks(shapes: Sequence[tuple[int, int]], world_size: int, steps: int = 5) -> list[int]:
    """Assign each matrix to a rank so the ranks' Newton-Schulz FLOPs are balanced.

    Largest first onto the least-loaded rank (the LPT rule, within 4/3 of the best
    balance). Ties break on the matrix index and the rank, so every rank computes the same
    plan from the same shapes.
    """
    order = sorted(range(len(shapes)), key=lambda i: (-newton_schulz_flops(shapes[i], steps), i))
    loads = [(0, rank) for rank in range(world_size)]
    heapq.heapify(loads)
    owner = [0] * len(shapes)
    for index in order:
        load, rank = heapq.heappop(loads)
        owner[index] = rank
        heapq.heappush(loads, (load + newton_schulz_flops(shapes[index], steps), rank))
    return owner


def all_gather_updates(
    local_updates: dict[int, torch.Tensor],
    owner: Sequence[int],
    numels: Sequence[int],
    rank: int,
    world_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Exchange the flat updates each rank computed; return every matrix's update in index order.

    `local_updates` maps matrix index to this rank's flattened update. Every rank sends one
    buffer padded to the largest share, so the collective has equal sizes on all ranks even
    when a rank owns nothing.
    """
    share_sizes = [0] * world_size
    for index, rank_of in enumerate(owner):
        share_sizes[rank_of] += numels[index]
    padded = max(share_sizes)

    send = torch.zeros(padded, device=device, dtype=dtype)
    offset = 0
    for index in sorted(local_updates):
        send[offset : offset + numels[index]] = local_updates[index]
        offset += numels[index]

    received = [torch.empty(padded, device=device, dtype=dtype) for _ in range(world_size)]
    dist.all_gather(received, send)

    updates: list[torch.Tensor | None] = [None] * len(owner)
    offsets = [0] * world_size
    for index, rank_of in enumerate(owner):
        start = offsets[rank_of]
        updates[index] = received[rank_of][start : start + numels[index]]
        offsets[rank_of] += numels[index]
    return updates  # type: ignore[return-value]
