"""Optimizer state size, for comparing the memory of optimizers."""

from __future__ import annotations

from typing import Iterable

import torch


def state_bytes_per_param_byte(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> float:
    """Return the bytes of `optimizer`'s state tensors for `params`, per byte of those params.

    Python numbers in the state, such as AdamW's step count, are not counted.
    """
    params = list(params)
    state_bytes = sum(
        value.numel() * value.element_size()
        for p in params
        for value in optimizer.state.get(p, {}).values()
        if isinstance(value, torch.Tensor)
    )
    return state_bytes / sum(p.numel() * p.element_size() for p in params)
