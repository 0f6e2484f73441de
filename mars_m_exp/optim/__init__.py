"""Optimizers: MARS-M, Moonlight's Muon, and AdamW, plus the helpers that build them."""

from .mars_m import MARS_M
from .moonlight import Moonlight
from .newton_schulz import newton_schulz5, orthogonalize_many
from .param_split import ParamSplit, is_matrix_shape, split_params
from .state_size import state_bytes_per_param_byte
from .build import build_optimizer

__all__ = [
    "MARS_M",
    "Moonlight",
    "ParamSplit",
    "build_optimizer",
    "is_matrix_shape",
    "newton_schulz5",
    "orthogonalize_many",
    "split_params",
    "state_bytes_per_param_byte",
]
