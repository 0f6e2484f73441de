"""Muon as used by Moonlight (Liu et al., "Muon is Scalable for LLM Training", arXiv:2502.16982)."""

from __future__ import annotations

from typing import Any

import torch

from .orthogonalized import OrthogonalizedOptimizer, ParamsArg


class Moonlight(OrthogonalizedOptimizer):
    """Muon with Moonlight's update scaling, and AdamW for everything else.

    For each matrix X (A x B) with gradient g, momentum mu and buffer b:

        b = mu * b + g
        d = g + mu * b      (Nesterov; d = b without it)
        X = X - lr * (0.2 * sqrt(max(A, B)) * NewtonSchulz5(d) + wd * X)

    `torch.optim.Muon` keeps b' = (1 - mu) * b instead, and its d is (1 - mu) times this
    one. Newton-Schulz normalizes its input, so the two give the same update up to the
    1e-7 eps in that normalization.

    Parameters of `adamw_params` take AdamW with betas `adamw_betas`, eps `adamw_eps` and
    the same `lr` and `wd`. The keyword names match the reference implementations so scripts
    written for them port unchanged. `ns_dtype` and `compile_ns` are additions, described
    in `OrthogonalizedOptimizer`.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        wd: float = 0.1,
        muon_params: ParamsArg = None,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adamw_params: ParamsArg = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        ns_dtype: torch.dtype | None = None,
        compile_ns: bool | None = None,
        shard_orthogonalization: bool = True,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
        defaults = dict(
            lr=lr,
            wd=wd,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
        )
        super().__init__(muon_params, adamw_params, defaults, ns_dtype, compile_ns, shard_orthogonalization)

    def _matrix_directions(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict[str, Any]
    ) -> list[torch.Tensor]:
        momentum = group["momentum"]
        buffers = self._state_tensors(params, "momentum_buffer")

        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, grads)
        if group["nesterov"]:
            return torch._foreach_add(grads, buffers, alpha=momentum)
        return buffers
