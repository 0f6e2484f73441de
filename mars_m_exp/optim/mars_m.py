"""MARS-M: MARS variance reduction applied to Muon.

Sources: Liu, Yuan, Gu, "MARS-M: When Variance Reduction Meets Matrices" (arXiv:2510.21800);
MARS (arXiv:2411.10438); the reference code in AGI-Arena/MARS (MARS_M/optimizers/mars_m.py
and, for the one-buffer form, MARS_M/optimizers/mars_m_efficient.py).
"""

from __future__ import annotations

from typing import Any

import torch

from .orthogonalized import OrthogonalizedOptimizer, ParamsArg

# State keys. The two-buffer form keeps the reference code's names.
MOMENTUM_KEY = "momentum_buffer"  # m, the EMA of c (two-buffer form)
LAST_GRAD_KEY = "last_grad"  # g_prev of the coming step (two-buffer form)
NEXT_LAST_GRAD_KEY = "previous_grad"  # exact form: the next step's g_prev, kept until update_last_grad
GRAD_EMA_KEY = "exp_avg"  # e, the EMA of g (one-buffer form)


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
        opt.update_previous_grad()    # keep a copy as the next step's g_prev
        opt.zero_grad()
        loss(batch).backward()
        opt.step()
        opt.zero_grad()
        opt.update_last_grad()        # make the kept copy g_prev

    At the first step g_prev is zero, as in the reference code. `clip_c` defaults to True
    because the paper's algorithm clips and the released optimizer clips regardless of its
    flag. The norm of c is clamped on the device, so the step never waits on the host.

    Memory. The approximate form without the clip keeps one buffer per matrix, as Muon does.
    Because c is linear in g and g_prev there, m equals

        e = beta * e + (1 - beta) * g          (the buffer: an EMA of the gradient)
        m = gamma * g + (1 - gamma) * e

    This is the reference's one-buffer form (mars_m_efficient.py: m = gamma * g + beta * b,
    b = beta * b + (1 - gamma)(1 - beta) / beta * g) with beta * b = (1 - gamma) * e. It is
    equal to the two-buffer form at every step, the first included: with m = e = g_prev = 0
    before it, both give m = (1 - beta + gamma * beta) * g. Keeping e instead of b avoids the
    division by beta, so momentum 0 works and a momentum schedule stays exact.
    NOTE: for a gamma that changes mid-run the two forms differ. At the change from gamma0
    to gamma1 they differ by beta * (gamma0 - gamma1) * (g_prev - e_prev), and the
    difference then shrinks by a factor beta per step.

    With the clip on, c is not linear in g_prev, so the two-buffer form keeps m and a copy
    of g_prev. The exact form keeps m and g_prev between steps as well, plus the next
    step's g_prev from `update_previous_grad` until `update_last_grad` moves it into place.
    A change of `clip_c` or `is_approx` after a matrix's first step that moves it between
    the one-buffer form and a two-buffer form raises a ValueError, because the state of one
    cannot be converted to the other.

    `gamma`, `momentum`, `lr` and `wd` are read from the param group at every step.

    Parameters of `adamw_params` take AdamW with betas `adamw_betas`, eps `adamw_eps` and
    the same `lr` and `wd`. The keyword names match the reference code. `ns_dtype` and
    `compile_ns` are additions, described in `OrthogonalizedOptimizer`.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        wd: float = 0.1,
        muon_params: ParamsArg = None,
        momentum: float = 0.95,
        ns_steps: int = 5,
        adamw_params: ParamsArg = None,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
        gamma: float = 0.025,
        clip_c: bool = True,
        is_approx: bool = True,
        ns_dtype: torch.dtype | None = None,
        compile_ns: bool | None = None,
        shard_orthogonalization: bool = True,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be >= 1, got {ns_steps}")
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
        super().__init__(muon_params, adamw_params, defaults, ns_dtype, compile_ns, shard_orthogonalization)
        self.is_approx = is_approx

    def _check_form(self, params: list[torch.Tensor], one_buffer: bool, group: dict[str, Any]) -> None:
        """Raise if a param's state was built by the other form (a flag changed mid-run)."""
        stale_key = MOMENTUM_KEY if one_buffer else GRAD_EMA_KEY
        for p in params:
            if stale_key in self.state[p]:
                raise ValueError(
                    f"MARS-M state of parameter {self._param_name(p)} contains {stale_key!r}, written with "
                    f"different clip_c / is_approx flags than the current clip_c={group['clip_c']}, "
                    f"is_approx={group['is_approx']}; these flags cannot change after the first step, "
                    "so restore them or start from a fresh optimizer"
                )

    def _matrix_directions(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict[str, Any]
    ) -> list[torch.Tensor]:
        one_buffer = group["is_approx"] and not group["clip_c"]
        self._check_form(params, one_buffer, group)
        if one_buffer:
            return self._one_buffer_directions(params, grads, group)
        return self._two_buffer_directions(params, grads, group)

    def _one_buffer_directions(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict[str, Any]
    ) -> list[torch.Tensor]:
        grad_emas = self._state_tensors(params, GRAD_EMA_KEY)
        torch._foreach_lerp_(grad_emas, grads, 1.0 - group["momentum"])
        # lerp(g, e, 1 - gamma) = gamma * g + (1 - gamma) * e, in new tensors.
        return torch._foreach_lerp(grads, grad_emas, 1.0 - group["gamma"])

    def _two_buffer_directions(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict[str, Any]
    ) -> list[torch.Tensor]:
        beta = group["momentum"]
        correction = group["gamma"] * beta / (1.0 - beta)
        momentum_buffers = self._state_tensors(params, MOMENTUM_KEY)
        if group["is_approx"]:
            last_grads = self._state_tensors(params, LAST_GRAD_KEY)
        else:
            # Exact form: update_last_grad installs g_prev; before the first one it is zero.
            last_grads = []
            for p, g in zip(params, grads):
                last_grad = self.state[p].get(LAST_GRAD_KEY)
                last_grads.append(last_grad if last_grad is not None else torch.zeros_like(g))

        # c = g + correction * (g - g_prev), in the reference code's order of operations.
        corrected = torch._foreach_sub(grads, last_grads)
        torch._foreach_mul_(corrected, correction)
        torch._foreach_add_(corrected, grads)
        if group["clip_c"]:
            norms = torch._foreach_norm(corrected)
            torch._foreach_clamp_min_(norms, 1.0)
            torch._foreach_div_(corrected, norms)

        torch._foreach_mul_(momentum_buffers, beta)
        torch._foreach_add_(momentum_buffers, corrected, alpha=1.0 - beta)
        if group["is_approx"]:
            # A copy the optimizer owns: the caller may zero or reuse the grad in place.
            torch._foreach_copy_(last_grads, grads)
        return momentum_buffers

    def _exact_form_groups(self):
        return [g for g in self.param_groups if g["use_muon"] and not g["is_approx"]]

    @torch.no_grad()
    def update_previous_grad(self) -> None:
        """Exact form: keep a copy of each matrix's current `.grad` as the next step's g_prev."""
        for group in self._exact_form_groups():
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if NEXT_LAST_GRAD_KEY in state:
                    state[NEXT_LAST_GRAD_KEY].copy_(p.grad)
                else:
                    state[NEXT_LAST_GRAD_KEY] = p.grad.clone(memory_format=torch.preserve_format)

    @torch.no_grad()
    def update_last_grad(self) -> None:
        """Exact form: after `step`, make the kept gradient the g_prev of the next step.

        The kept tensor moves into place without a copy and the old g_prev is freed, so
        between steps each matrix keeps two buffers.
        """
        for group in self._exact_form_groups():
            for p in group["params"]:
                # .get: self.state is a defaultdict, and indexing would add an empty entry.
                state = self.state.get(p)
                if state is not None and NEXT_LAST_GRAD_KEY in state:
                    state[LAST_GRAD_KEY] = state.pop(NEXT_LAST_GRAD_KEY)
