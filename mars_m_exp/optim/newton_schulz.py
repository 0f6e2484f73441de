"""Newton-Schulz orthogonalization, the core of Muon, Moonlight and MARS-M.

The quintic iteration X <- a*X + (b*A + c*A@A) @ X with A = X @ X^T and
(a, b, c) = (3.4445, -4.7750, 2.0315) (Keller Jordan's Muon) drives every singular value
of X towards an interval around 1 in five steps, approximating U @ V^T of the SVD
G = U S V^T. It runs on the shorter side of the matrix, so a tall matrix (A > B) is
transposed first.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(
    G: torch.Tensor,
    steps: int = 5,
    dtype: torch.dtype = torch.bfloat16,
    eps: float = 1e-7,
) -> torch.Tensor:
    """Orthogonalize the matrices in the last two dimensions of `G`.

    A batch of matrices of one shape, `(..., A, B)`, is processed in one call; each matrix is
    normalized by its own Frobenius norm so its spectral norm starts at most 1. The
    iteration runs in `dtype` (bfloat16 by default, as in the reference code) and the result
    is returned in G's dtype. An all-zero matrix stays zero.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS

    X = G.to(dtype)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT

    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X

    if transposed:
        X = X.mT
    return X.to(G.dtype)


def orthogonalize_many(
    matrices: Sequence[torch.Tensor],
    steps: int = 5,
    dtype: torch.dtype = torch.bfloat16,
) -> list[torch.Tensor]:
    """Orthogonalize 2-D matrices, stacking those of one shape into a single batched call.

    Returns the results in the order of `matrices`.
    """
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for index, matrix in enumerate(matrices):
        by_shape[(tuple(matrix.shape), matrix.dtype, matrix.device)].append(index)

    results: list[torch.Tensor | None] = [None] * len(matrices)
    for indices in by_shape.values():
        if len(indices) == 1:
            results[indices[0]] = newton_schulz5(matrices[indices[0]], steps, dtype)
            continue
        stacked = torch.stack([matrices[i] for i in indices])
        for i, result in zip(indices, newton_schulz5(stacked, steps, dtype).unbind(0)):
            results[i] = result
    return results  # type: ignore[return-value]
