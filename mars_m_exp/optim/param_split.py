"""Split a model's parameters between the matrix (Newton-Schulz) side and the AdamW side."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.nn as nn

# Substrings of parameter names that mark embeddings and output heads: these are matrices,
# but Muon-style optimizers leave them to AdamW (Moonlight, MARS-M reference code).
EMBEDDING_NAME_PATTERNS = ("wte", "wpe", "lm_head", "embed")


def is_matrix_shape(shape: Iterable[int]) -> bool:
    """Tell whether a parameter of this shape takes the orthogonalized matrix path.

    A tensor with 2 or more dimensions qualifies when, viewed as (first dimension x the
    rest), both sides exceed 1. A (C, 1, 1) gain or a (1, N) row is a vector in disguise and
    goes to AdamW, as do all 0-D and 1-D tensors.
    """
    shape = tuple(shape)
    if len(shape) < 2:
        return False
    return shape[0] > 1 and math.prod(shape[1:]) > 1


def matrix_view_shape(shape: Iterable[int]) -> tuple[int, int]:
    """Return the 2-D shape (first dimension x the rest) a parameter is orthogonalized as."""
    shape = tuple(shape)
    return shape[0], math.prod(shape[1:])


@dataclass
class ParamSplit:
    matrix_params: list[nn.Parameter] = field(default_factory=list)
    adamw_params: list[nn.Parameter] = field(default_factory=list)
    matrix_names: list[str] = field(default_factory=list)
    adamw_names: list[str] = field(default_factory=list)


def split_params(
    model: nn.Module,
    embedding_patterns: Iterable[str] = EMBEDDING_NAME_PATTERNS,
) -> ParamSplit:
    """Sort `model`'s trainable parameters into the two optimizer sides.

    Matrices (see `is_matrix_shape`) that are neither an `nn.Embedding` weight nor named like
    an embedding or head go to the matrix side; everything else goes to AdamW. A parameter
    shared by several modules, such as a token embedding tied to the head, appears once.
    """
    patterns = tuple(embedding_patterns)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    split = ParamSplit()
    # named_parameters() yields a shared Parameter only under its first name.
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_embedding = id(param) in embedding_weights or any(p in name for p in patterns)
        if is_matrix_shape(param.shape) and not is_embedding:
            split.matrix_params.append(param)
            split.matrix_names.append(name)
        else:
            split.adamw_params.append(param)
            split.adamw_names.append(name)
    return split


def check_matrix_params(params: Iterable[torch.Tensor], names: Iterable[str] | None = None) -> None:
    """Raise ValueError naming any parameter that cannot take the matrix path."""
    params = list(params)
    names = list(names) if names is not None else [f"muon_params[{i}]" for i in range(len(params))]
    for name, param in zip(names, params):
        if not is_matrix_shape(param.shape):
            raise ValueError(
                f"parameter {name} of shape {tuple(param.shape)} cannot be orthogonalized: the matrix "
                "side takes tensors with 2+ dimensions whose first and remaining dimensions both exceed 1; "
                "pass it in adamw_params instead (split_params does this)"
            )
