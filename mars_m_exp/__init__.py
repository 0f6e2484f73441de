"""mars-m-exp: train GPT-2 with MARS-M and compare it with Moonlight's Muon and AdamW."""

from .model import GPT, GPTConfig
from .optim import MARS_M, Moonlight, newton_schulz5, split_params

__all__ = ["GPT", "GPTConfig", "MARS_M", "Moonlight", "newton_schulz5", "split_params"]
__version__ = "0.1.0"
