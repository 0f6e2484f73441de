"""Muon as used by Moonlight (Liu et al., "Muon is Scalable for LLM Training", arXiv:2502.16982)."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .orthogonalized import OrthogonalizedOptimizer


class Moonlight(OrthogonalizedOptimizer):
    """Muon with Moonlight's update scaling, and AdamW for everything else.

    For each matrix X (A x B) with gradient g, momentum mu and buffer b:

        b = mu * b + g
        d = g + mu * b      (Nesterov; d = b without it)
        X = X - lr * (0.2 * sqrt(max(A, B)) * NewtonSchulz5(d) + wd * X)

    Parameters of `adamw_params` take AdamW with betas `adamw_betas`, eps `adamw_eps` and
    the same `lr` and `wd`. The keyword names match the reference implementations so scripts
    written for them port unchanged; `ns_dtype` is an addition:
    the Newton-Schulz dtype, by default bfloat16 on cuda and float32 elsewhere.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        wd: float = 0.1,
        muon_params: Iterable[torch.Tensor] | None = None,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adamw_params: Iterable[torch.Tensor] | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        ns_dtype: torch.dtype | None = None,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        defaults = dict(
            lr=lr,
            wd=wd,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
        )
        super().__init__(muon_params, adamw_params, defaults, ns_dtype)

    def _matrix_direction(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        momentum = group["momentum"]

        buf.mul_(momentum).add_(grad)
        if group["nesterov"]:
            return grad.add(buf, alpha=momentum)
        return buf
