"""Build the optimizer a run's `optim` config names."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from .mars_m import MARS_M
from .moonlight import Moonlight
from .param_split import split_params

log = logging.getLogger(__name__)


def build_optimizer(optim_cfg, model: nn.Module, device_type: str = "cpu") -> torch.optim.Optimizer:
    """Create MARS-M, Moonlight or AdamW for `model` from a `MarsMConfig`-like object."""
    name = optim_cfg.name

    if name == "adamw":
        # nanoGPT's grouping: weight decay on matrices, none on gains and biases.
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": optim_cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(
            groups,
            lr=optim_cfg.lr,
            betas=tuple(optim_cfg.betas),
            eps=optim_cfg.eps,
            fused=device_type == "cuda",
        )

    split = split_params(model)
    log.info(
        "%s: %d matrices (%d parameters) on the Newton-Schulz side, %d tensors (%d parameters) on AdamW",
        name,
        len(split.matrix_params),
        sum(p.numel() for p in split.matrix_params),
        len(split.adamw_params),
        sum(p.numel() for p in split.adamw_params),
    )
    common = dict(
        lr=optim_cfg.lr,
        wd=optim_cfg.weight_decay,
        # Named pairs, so an error about a parameter names it.
        muon_params=list(zip(split.matrix_names, split.matrix_params)),
        adamw_params=list(zip(split.adamw_names, split.adamw_params)),
        momentum=optim_cfg.momentum,
        ns_steps=optim_cfg.ns_steps,
        adamw_betas=tuple(optim_cfg.adamw_betas),
        adamw_eps=optim_cfg.adamw_eps,
        shard_orthogonalization=optim_cfg.shard_orthogonalization,
    )
    if name == "mars_m":
        return MARS_M(**common, gamma=optim_cfg.gamma, clip_c=optim_cfg.clip_c, is_approx=optim_cfg.is_approx)
    if name == "moonlight":
        return Moonlight(**common, nesterov=optim_cfg.nesterov)
    raise ValueError(f"unknown optimizer {name!r}; choose one of mars_m, moonlight, adamw")
