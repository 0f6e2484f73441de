"""The machinery MARS-M and Moonlight share: two parameter sides in one optimizer.

Matrices take a momentum direction chosen by the subclass, orthogonalized by Newton-Schulz
and scaled by 0.2 * sqrt(max(A, B)) so the update's RMS matches AdamW's (Moonlight,
arXiv:2502.16982). Everything else takes AdamW. Both sides use the param group's `lr` and
`wd`, read at every step so a schedule can change them.

No step reads a tensor's value on the host, with `.item()` or a Python `if` on a tensor.
Every branch depends on hyperparameters, shapes and state keys only, so `torch.compile` can
trace a step without graph breaks and a CUDA graph can capture it. NOTE: lr, wd and AdamW's
step count are Python numbers, so a captured CUDA graph keeps their values at capture time,
and a compiled step recompiles when they change.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Union

import torch
import torch.distributed as dist

from .newton_schulz import compile_enabled_by_env, group_by_shape, run_newton_schulz, stack_matrices
from .param_split import check_matrix_params, matrix_view_shape
from .sharding import all_gather_updates, assign_to_ranks

# Parameters may be passed as tensors or as (name, tensor) pairs, as `named_parameters()`
# yields them. The names appear in error messages.
ParamsArg = Union[Iterable[torch.Tensor], Iterable[tuple[str, torch.Tensor]], None]


def muon_update_scale(shape: Iterable[int]) -> float:
    """Return 0.2 * sqrt(max(A, B)) for a parameter viewed as an A x B matrix."""
    rows, cols = matrix_view_shape(shape)
    return 0.2 * math.sqrt(max(rows, cols))


def _named_params(params: ParamsArg, side: str) -> list[tuple[str, torch.Tensor]]:
    """Return (name, tensor) pairs, naming a bare tensor by its position, like `muon_params[3]`."""
    named = []
    for index, item in enumerate(params if params is not None else []):
        if isinstance(item, tuple):
            name, tensor = item
        else:
            name, tensor = f"{side}[{index}]", item
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{side} entry {name} is a {type(tensor).__name__}, expected a tensor or a (name, tensor) pair")
        named.append((name, tensor))
    return named


def _check_param_dtypes(named: list[tuple[str, torch.Tensor]]) -> None:
    for name, param in named:
        if param.is_complex() or not param.is_floating_point():
            raise ValueError(
                f"parameter {name} of shape {tuple(param.shape)} has dtype {param.dtype}; "
                "this optimizer updates real floating-point tensors only"
            )


def _check_no_duplicates(muon_named: list[tuple[str, torch.Tensor]], adamw_named: list[tuple[str, torch.Tensor]]) -> None:
    muon_ids = {id(p) for _, p in muon_named}
    for name, param in adamw_named:
        if id(param) in muon_ids:
            raise ValueError(f"parameter {name} is in both muon_params and adamw_params; pass each parameter once")
    for side, named in (("muon_params", muon_named), ("adamw_params", adamw_named)):
        seen: set[int] = set()
        for name, param in named:
            if id(param) in seen:
                raise ValueError(f"parameter {name} appears twice in {side}; pass each parameter once")
            seen.add(id(param))


class OrthogonalizedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses implement `_matrix_directions`, the matrices to orthogonalize.

    `ns_dtype` is the Newton-Schulz dtype. None means bfloat16 on cuda, as in the reference
    code, and float32 elsewhere, because CPUs without native bfloat16 matrix units run it
    much slower. On the 2-core AMD EPYC machine of benchmarks/README.md (torch 2.13), a
    Moonlight step on one GPT-2 small block took 24 times longer in bfloat16.

    `shard_orthogonalization`, when a torch.distributed process group of more than one rank
    exists, splits the Newton-Schulz work across ranks (see `sharding.py`); every rank must
    then call `step` with the same gradients, as under DDP.

    `compile_ns` runs Newton-Schulz through `torch.compile`. None defers to the
    `MARS_M_EXP_COMPILE_NS` environment variable ("0" or "1"). When that is unset too, it
    compiles on cuda only, because on a CPU each new matrix shape costs a C++ build (about
    40 s for the first one on that machine).
    """

    def __init__(
        self,
        muon_params: ParamsArg,
        adamw_params: ParamsArg,
        defaults: dict[str, Any],
        ns_dtype: torch.dtype | None = None,
        compile_ns: bool | None = None,
        shard_orthogonalization: bool = True,
    ) -> None:
        muon_named = _named_params(muon_params, "muon_params")
        adamw_named = _named_params(adamw_params, "adamw_params")
        check_matrix_params([p for _, p in muon_named], [name for name, _ in muon_named])
        _check_param_dtypes(muon_named + adamw_named)
        if ns_dtype is not None and not ns_dtype.is_floating_point:
            raise ValueError(f"ns_dtype must be a floating-point dtype, got {ns_dtype}")

        _check_no_duplicates(muon_named, adamw_named)
        if not muon_named and not adamw_named:
            raise ValueError("the optimizer got no parameters: pass muon_params and/or adamw_params")

        groups = []
        if muon_named:
            groups.append({"params": [p for _, p in muon_named], "use_muon": True})
        if adamw_named:
            groups.append({"params": [p for _, p in adamw_named], "use_muon": False})
        super().__init__(groups, defaults)
        # Instance attributes, not group entries: a torch.dtype in a param group would make
        # the state_dict unloadable with torch.load(weights_only=True).
        self.ns_dtype = ns_dtype
        self.compile_ns = compile_ns
        self.shard_orthogonalization = shard_orthogonalization
        self.param_names = {id(p): name for name, p in muon_named + adamw_named}

    def _matrix_directions(
        self, params: list[torch.Tensor], grads: list[torch.Tensor], group: dict[str, Any]
    ) -> list[torch.Tensor]:
        """Update the state of `params` and return the matrices to orthogonalize, one per param.

        All params of one call share a matrix shape, dtype and device.
        """
        raise NotImplementedError

    def _state_tensors(self, params: list[torch.Tensor], key: str) -> list[torch.Tensor]:
        """Return state[key] of each param, created as zeros at the param's first step."""
        tensors = []
        for p in params:
            state = self.state[p]
            if key not in state:
                state[key] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            tensors.append(state[key])
        return tensors

    def _param_name(self, param: torch.Tensor) -> str:
        # A param added later with add_param_group has no name.
        return self.param_names.get(id(param), "<unnamed>")

    def _params_with_grads(self, group: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Return the group's params that have a gradient, and those gradients."""
        params, grads = [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"parameter {self._param_name(p)} of shape {tuple(p.shape)} has a sparse gradient, "
                    "which this optimizer does not support; use dense gradients (e.g. nn.Embedding(sparse=False))"
                )
            params.append(p)
            grads.append(p.grad)
        return params, grads

    def _newton_schulz_settings(self, device: torch.device) -> tuple[torch.dtype, bool]:
        ns_dtype = self.ns_dtype
        if ns_dtype is None:
            ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        compile_ns = self.compile_ns
        if compile_ns is None:
            compile_ns = compile_enabled_by_env()
        if compile_ns is None:
            compile_ns = device.type == "cuda"
        return ns_dtype, compile_ns

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
        params, grads = self._params_with_grads(group)
        if not params:
            return
        lr, wd = group["lr"], group["wd"]
        ns_dtype, compile_ns = self._newton_schulz_settings(params[0].device)

        # Decoupled weight decay uses the unscaled lr, the orthogonal update the scaled one.
        # The directions depend on gradients and state only, so decaying first is safe.
        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)

        shapes = [matrix_view_shape(p.shape) for p in params]
        if self._sharded():
            self._sharded_matrix_update(group, params, grads, shapes, lr, ns_dtype, compile_ns)
            return

        # One bucket per matrix shape: its directions are computed with foreach ops and
        # orthogonalized in one batched Newton-Schulz call, then freed before the next bucket.
        for indices in group_by_shape(params, shapes):
            bucket_params = [params[i] for i in indices]
            bucket_grads = [grads[i] for i in indices]
            shape = shapes[indices[0]]

            directions = self._matrix_directions(bucket_params, bucket_grads, group)
            stacked = stack_matrices(directions, shape, ns_dtype)
            orthogonal = run_newton_schulz(stacked, group["ns_steps"], ns_dtype, compile_ns)
            # One copy for the whole bucket, to the params' dtype and row-major layout (a tall
            # matrix comes back transposed), keeps the foreach add below on its fused path.
            orthogonal = orthogonal.to(dtype=bucket_params[0].dtype, memory_format=torch.contiguous_format)
            updates = [u.reshape(p.shape) for p, u in zip(bucket_params, orthogonal.unbind(0))]
            torch._foreach_add_(bucket_params, updates, alpha=-lr * muon_update_scale(shape))

    def _sharded(self) -> bool:
        return self.shard_orthogonalization and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _sharded_matrix_update(self, group, params, grads, shapes, lr, ns_dtype, compile_ns) -> None:
        """Update every matrix's state, orthogonalize this rank's share, exchange, apply all."""
        rank, world_size = dist.get_rank(), dist.get_world_size()
        owner = assign_to_ranks(shapes, world_size, group["ns_steps"])

        local_updates: dict[int, torch.Tensor] = {}
        for indices in group_by_shape(params, shapes):
            bucket_params = [params[i] for i in indices]
            directions = self._matrix_directions(bucket_params, [grads[i] for i in indices], group)
            mine = [k for k, i in enumerate(indices) if owner[i] == rank]
            if not mine:
                continue
            stacked = stack_matrices([directions[k] for k in mine], shapes[indices[0]], ns_dtype)
            orthogonal = run_newton_schulz(stacked, group["ns_steps"], ns_dtype, compile_ns)
            orthogonal = orthogonal.to(dtype=params[0].dtype, memory_format=torch.contiguous_format)
            for k, update in zip(mine, orthogonal.unbind(0)):
                local_updates[indices[k]] = update.reshape(-1)

        updates = all_gather_updates(
            local_updates, owner, [p.numel() for p in params], rank, world_size, params[0].device, params[0].dtype
        )
        for p, update, shape in zip(params, updates, shapes):
            p.add_(update.view_as(p), alpha=-lr * muon_update_scale(shape))

    def _adamw_step(self, group: dict[str, Any]) -> None:
        """AdamW with bias correction, eps added to sqrt(v) as in the MARS-M reference code."""
        params, grads = self._params_with_grads(group)
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

        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)

        if wd != 0:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, eps)
        # All params of the group advance together, except one whose grad was None at some
        # earlier step, so the step count (and bias correction) is per parameter. The step
        # is a Python int, so the step sizes are host values and need no sync.
        step_sizes = []
        for p in params:
            step = self.state[p]["step"]
            bias_correction1 = 1.0 - beta1**step
            bias_correction2 = 1.0 - beta2**step
            step_sizes.append(-lr * math.sqrt(bias_correction2) / bias_correction1)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
