"""The machinery MARS-M and Moonlight share: two parameter sides in one optimizer.

Matrices take a momentum direction chosen by the subclass, orthogonalized by Newton-Schulz
and scaled by 0.2 * sqrt(max(A, B)) so the update's RMS matches AdamW's (Moonlight,
arXiv:2502.16982). Everything else takes AdamW. Both sides use the param group's `lr` and
`wd`, read at every step so a schedule can change them.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from .newton_schulz import orthogonalize_many
from .param_split import check_matrix_params, matrix_view_shape


def muon_update_scale(shape: Iterable[int]) -> float:
    """Return 0.2 * sqrt(max(A, B)) for a parameter viewed as an A x B matrix."""
    rows, cols = matrix_view_shape(shape)
    return 0.2 * math.sqrt(max(rows, cols))


class OrthogonalizedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses implement `_matrix_direction`, the matrix to orthogonalize."""

    def __init__(
        self,
        muon_params: Iterable[torch.Tensor] | None,
        adamw_params: Iterable[torch.Tensor] | None,
        defaults: dict[str, Any],
        ns_dtype: torch.dtype | None = None,
    ) -> None:
        muon_params = list(muon_params) if muon_params is not None else []
        adamw_params = list(adamw_params) if adamw_params is not None else []
        check_matrix_params(muon_params)
        if {id(p) for p in muon_params} & {id(p) for p in adamw_params}:
            raise ValueError("a parameter is in both muon_params and adamw_params; pass each parameter once")
        if not muon_params and not adamw_params:
            raise ValueError("the optimizer got no parameters: pass muon_params and/or adamw_params")

        groups = []
        if muon_params:
            groups.append({"params": muon_params, "use_muon": True})
        if adamw_params:
            groups.append({"params": adamw_params, "use_muon": False})
        super().__init__(groups, defaults)
        self.ns_dtype = ns_dtype

    def _matrix_direction(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            if group["use_muon"]:
                self._matrix_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _matrix_step(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        lr, wd = group["lr"], group["wd"]

        directions = []
        for p in params:
            direction = self._matrix_direction(p, p.grad, group)
            directions.append(direction.reshape(matrix_view_shape(p.shape)))
        # bfloat16 on GPUs, as in the reference code; CPUs without native bfloat16 matmuls
        # run it many times slower than float32, so they keep float32.
        ns_dtype = self.ns_dtype
        if ns_dtype is None:
            ns_dtype = torch.bfloat16 if params[0].device.type == "cuda" else torch.float32
        updates = orthogonalize_many(directions, steps=group["ns_steps"], dtype=ns_dtype)

        # Decoupled weight decay uses the unscaled lr; the orthogonal update the scaled one.
        torch._foreach_mul_(params, 1.0 - lr * wd)
        for p, update in zip(params, updates):
            p.add_(update.view_as(p), alpha=-lr * muon_update_scale(p.shape))

    def _adamw_step(self, group: dict[str, Any]) -> None:
        """AdamW with bias correction, eps added to sqrt(v) as in the MARS-M reference code."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        lr, wd = group["lr"], group["wd"]
        beta1, beta2 = group["adamw_betas"]
        eps = group["adamw_eps"]

        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1

        # All params of the group advance together, except one whose grad was None at some
        # earlier step, so the step count (and bias correction) is per parameter.
        grads = [p.grad for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

        torch._foreach_mul_(params, 1.0 - lr * wd)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, eps)
        for p, exp_avg, denom in zip(params, exp_avgs, denoms):
            step = self.state[p]["step"]
            bias_correction1 = 1.0 - beta1**step
            bias_correction2 = 1.0 - beta2**step
            p.addcdiv_(exp_avg, denom, value=-lr * math.sqrt(bias_correction2) / bias_correction1)
