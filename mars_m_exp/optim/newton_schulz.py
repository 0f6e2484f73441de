"""Newton-Schulz orthogonalization, the core of Muon, Moonlight and MARS-M.

The quintic iteration X <- a*X + (b*A + c*A@A) @ X with A = X @ X^T and
(a, b, c) = (3.4445, -4.7750, 2.0315) (Keller Jordan's Muon) drives every singular value
of X towards an interval around 1 in five steps, approximating U @ V^T of the SVD
G = U S V^T. It runs on the shorter side of the matrix, so a tall matrix (A > B) is
transposed first.

`run_newton_schulz` can use a `torch.compile`d copy of the iteration. It compiles on the
first call for each input shape and dtype, and it falls back to eager mode for the rest of
the process if compilation fails.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Callable, Sequence

import torch

log = logging.getLogger(__name__)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)

# "0" turns compilation of Newton-Schulz off and "1" turns it on. When it is unset, the
# optimizer's `compile_ns` argument decides, and its default is on for cuda only.
COMPILE_ENV_VAR = "MARS_M_EXP_COMPILE_NS"


def newton_schulz5(
    G: torch.Tensor,
    steps: int = 5,
    dtype: torch.dtype = torch.bfloat16,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Orthogonalize the matrices in the last two dimensions of `G`.

    A batch of matrices of one shape, `(..., A, B)`, is processed in one call, and each
    matrix is normalized by its own Frobenius norm so its spectral norm starts at most 1.
    The iteration runs in `dtype` (bfloat16 by default, as in the reference code) and the
    result is returned in G's dtype. An all-zero matrix stays zero.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS

    # baddbmm needs exactly one batch dimension.
    X = G.reshape(-1, G.size(-2), G.size(-1)).to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT

    # Out of place: when `dtype` is G's dtype, X may still be G's storage.
    X = X / (torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = torch.bmm(X, X.mT)
        # baddbmm folds the scalar terms into the matmul: B = b*A + c*(A @ A), X = a*X + B @ X.
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)

    if transposed:
        X = X.mT
    return X.reshape(G.shape).to(G.dtype)


_compiled_newton_schulz: Callable[..., torch.Tensor] | None = None
_compile_failed = False


def compile_enabled_by_env() -> bool | None:
    """Read `MARS_M_EXP_COMPILE_NS`: True for "1", False for "0", None when unset or empty."""
    value = os.environ.get(COMPILE_ENV_VAR, "").strip()
    if value == "":
        return None
    if value in ("0", "1"):
        return value == "1"
    raise ValueError(f"{COMPILE_ENV_VAR} must be 0 or 1, got {value!r}")


def compile_available() -> bool:
    """Tell whether `torch.compile` can run here (dynamo does not support every Python)."""
    return hasattr(torch, "compile") and torch._dynamo.is_dynamo_supported()


def run_newton_schulz(
    G: torch.Tensor,
    steps: int,
    dtype: torch.dtype,
    compile: bool = False,
) -> torch.Tensor:
    """Run `newton_schulz5`, compiled when `compile` is true and compilation works here.

    A failed compilation is logged once and every later call runs eagerly.
    """
    global _compiled_newton_schulz, _compile_failed
    if not compile or _compile_failed or not compile_available():
        return newton_schulz5(G, steps, dtype)

    if _compiled_newton_schulz is None:
        # Static shapes: each (batch, A, B, dtype) compiles once, as GPT-2's four matrix
        # shapes do, rather than one slower kernel for all shapes. NOTE: past dynamo's
        # recompile_limit (8 variants by default), further shapes run uncompiled.
        _compiled_newton_schulz = torch.compile(newton_schulz5, dynamic=False, fullgraph=True)
    try:
        return _compiled_newton_schulz(G, steps, dtype)
    # Compilation fails in many ways: no C++ compiler, a Triton or inductor error, an
    # unsupported Python. Each is a reason to run eagerly, not to stop training.
    except Exception as error:  # noqa: BLE001
        _compile_failed = True
        log.warning("torch.compile of Newton-Schulz failed, running it eagerly from now on: %r", error)
        return newton_schulz5(G, steps, dtype)


def group_by_shape(tensors: Sequence[torch.Tensor], shapes: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Group the indices of `tensors` by (matrix shape, dtype, device), keeping first-seen order.

    `shapes` gives each tensor's 2-D matrix shape, which may differ from its own shape.
    """
    by_key: dict[tuple, list[int]] = defaultdict(list)
    for index, (tensor, shape) in enumerate(zip(tensors, shapes)):
        by_key[(tuple(shape), tensor.dtype, tensor.device)].append(index)
    return list(by_key.values())


def stack_matrices(matrices: Sequence[torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Stack tensors viewed as `shape` matrices into one (n, A, B) tensor of `dtype`.

    The copy converts the dtype on the way, so no stacked copy in the source dtype is made.
    A single matrix is returned as a (1, A, B) view when no copy is needed.
    """
    if len(matrices) == 1:
        return matrices[0].reshape(1, *shape)
    stacked = torch.empty((len(matrices), *shape), dtype=dtype, device=matrices[0].device)
    torch._foreach_copy_(list(stacked.unbind(0)), [m.reshape(shape) for m in matrices])
    return stacked


def orthogonalize_many(
    matrices: Sequence[torch.Tensor],
    steps: int = 5,
    dtype: torch.dtype = torch.bfloat16,
    compile: bool = False,
) -> list[torch.Tensor]:
    """Orthogonalize 2-D matrices, stacking those of one shape into a single batched call.

    Returns the results in the order of `matrices`, each in its input's dtype.
    """
    results: list[torch.Tensor | None] = [None] * len(matrices)
    shapes = [tuple(m.shape) for m in matrices]
    for indices in group_by_shape(matrices, shapes):
        stacked = stack_matrices([matrices[i] for i in indices], shapes[indices[0]], dtype)
        orthogonal = run_newton_schulz(stacked, steps, dtype, compile).to(matrices[indices[0]].dtype)
        for i, result in zip(indices, orthogonal.unbind(0)):
            results[i] = result
    return results  # type: ignore[return-value]
