"""MARS-M: MARS variance reduction applied to Muon.

Sources: Liu, Yuan, Gu, "MARS-M: When Variance Reduction Meets Matrices" (arXiv:2510.21800);
MARS (arXiv:2411.10438); the reference code in AGI-Arena/MARS (MARS_M/optimizers/mars_m.py).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .orthogonalized import OrthogonalizedOptimizer


class MARS_M(OrthogonalizedOptimizer):
    """MARS-M for matrices, AdamW for everything else.

    For each matrix X (A x B) with gradient g, momentum beta and correction strength gamma:

        c = g + gamma * beta / (1 - beta) * (g - g_prev)
        c = c / max(1, ||c||)                  (when clip_c)
        m = beta * m + (1 - beta) * c
        X = X - lr * (0.2 * sqrt(max(A, B)) * NewtonSchulz5(m) + wd * X)

    g_prev is, in the approximate form (`is_approx=True`), the gradient of the previous
    step. In the exact form it is the gradient of this step's batch at the previous
    weights, which the caller computes one step ahead, the way the reference trainer does:

        loss(next_batch).backward()   # at the current weights
        opt.update_previous_grad()    # keep it as the next step's g_prev
        opt.zero_grad()
        loss(batch).backward()
        opt.step()
        opt.zero_grad()
        opt.update_last_grad()        # make the kept gradient g_prev

    At the first step g_prev is zero, as in the reference code. `clip_c` defaults to True
    because the paper's algorithm clips and the released optimizer clips whatever its flag
    says. The norm of c is clamped on the device, so the step never waits on the host.

    Parameters of `adamw_params` take AdamW with betas `adamw_betas`, eps `adamw_eps` and the
    same `lr` and `wd`. The keyword names match the reference code; `ns_dtype` is an addition:
    the Newton-Schulz dtype, by default bfloat16 on cuda and float32 elsewhere.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        wd: float = 0.1,
        muon_params: Iterable[torch.Tensor] | None = None,
        momentum: float = 0.95,
        ns_steps: int = 5,
        adamw_params: Iterable[torch.Tensor] | None = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        gamma: float = 0.025,
        clip_c: bool = True,
        is_approx: bool = True,
        ns_dtype: torch.dtype | None = None,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        defaults = dict(
            lr=lr,
            wd=wd,
            momentum=momentum,
            ns_steps=ns_steps,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
            gamma=gamma,
            clip_c=clip_c,
            is_approx=is_approx,
        )
        super().__init__(muon_params, adamw_params, defaults, ns_dtype)
        self.is_approx = is_approx

    def _matrix_direction(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        if "last_grad" not in state:
            state["last_grad"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        last_grad = state["last_grad"]
        beta = group["momentum"]
        correction = group["gamma"] * beta / (1.0 - beta)

        c = grad + correction * (grad - last_grad)
        if group["clip_c"]:
            c.div_(c.norm().clamp_min(1.0))
        buf.mul_(beta).add_(c, alpha=1.0 - beta)

        if group["is_approx"]:
            # A copy the optimizer owns: the caller may reuse or zero the grad in place.
            last_grad.copy_(grad)
        return buf

    @torch.no_grad()
    def update_previous_grad(self) -> None:
        """Exact form: keep each matrix's current `.grad` as the next step's g_prev."""
        for group in self.param_groups:
            if not group["use_muon"] or group["is_approx"]:
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "previous_grad" not in state:
                    state["previous_grad"] = torch.zeros_like(p.grad)
                state["previous_grad"].copy_(p.grad)

    @torch.no_grad()
    def update_last_grad(self) -> None:
        """Exact form: after `step`, make the kept gradient the g_prev of the next step."""
        for group in self.param_groups:
            if not group["use_muon"] or group["is_approx"]:
                continue
            for p in group["params"]:
                state = self.state[p]
                if "previous_grad" not in state:
                    continue
                if "last_grad" not in state:
                    state["last_grad"] = torch.zeros_like(state["previous_grad"])
                state["last_grad"].copy_(state["previous_grad"])
