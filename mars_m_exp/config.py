"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Hydra merges the YAML files under `conf/` into these dataclasses, so a misspelled key or
a value of the wrong type fails while the config is composed. Range checks run in each
dataclass's `__post_init__` when `resolve_config` turns the composed config into
objects, and the checks that span several groups live in `validate_config`. Every check
raises `ConfigError` with one line that names the key, the value and the fix.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """An impossible configuration value, reported before any work starts."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# --------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """GPT-2 architecture (pre-LayerNorm, no biases, tied embedding and head)."""

    name: str = MISSING
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # Context length in tokens; also the length of every training window.
    block_size: int = 1024
    # GPT-2's 50,257 tokens rounded up to a multiple of 64 for faster matmuls.
    vocab_size: int = 50304
    # Divide attention logits by (layer index + 1), as the MARS-M reference configs do.
    scale_attn_by_inverse_layer_idx: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, key)
            _require(value > 0, f"model.{key} must be positive, got {value}")
        _require(
            self.n_embd % self.n_head == 0,
            f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
            "choose n_embd as a multiple of n_head",
        )
        _require(0.0 <= self.dropout < 1.0, f"model.dropout must be in [0, 1), got {self.dropout}")


# --------------------------------------------------------------------------- optimizers


@dataclass
class OptimConfig:
    """Fields every optimizer shares. `lr` and `weight_decay` apply to both parameter sides."""

    name: str = MISSING
    lr: float = MISSING
    weight_decay: float = 0.1

    def __post_init__(self) -> None:
        _require(self.lr > 0, f"optim.lr must be positive, got {self.lr}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")


@dataclass
class MatrixOptimConfig(OptimConfig):
    """Orthogonalized-momentum optimizers: matrices take Newton-Schulz, the rest AdamW."""

    momentum: float = 0.95
    ns_steps: int = 5
    adamw_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    adamw_eps: float = 1e-8
    # Under DDP, split Newton-Schulz across ranks and all-gather the results.
    shard_orthogonalization: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0.0 <= self.momentum < 1.0, f"optim.momentum must be in [0, 1), got {self.momentum}")
        _require(self.ns_steps >= 1, f"optim.ns_steps must be >= 1, got {self.ns_steps}")
        _check_betas("optim.adamw_betas", self.adamw_betas)
        _require(self.adamw_eps > 0, f"optim.adamw_eps must be positive, got {self.adamw_eps}")


@dataclass
class MarsMConfig(MatrixOptimConfig):
    """MARS-M (Liu, Yuan, Gu, arXiv:2510.21800)."""

    gamma: float = 0.025
    clip_c: bool = True
    # True: g_prev is the previous step's gradient. False: g_prev is this step's batch at
    # the previous weights, which costs a second forward/backward pass per step.
    is_approx: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.gamma >= 0, f"optim.gamma must be >= 0, got {self.gamma}")


@dataclass
class MoonlightConfig(MatrixOptimConfig):
    """Muon as Moonlight uses it (arXiv:2502.16982): update RMS matched to AdamW."""

    nesterov: bool = True


@dataclass
class AdamWConfig(OptimConfig):
    """AdamW on every parameter (torch.optim.AdamW)."""

    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_betas("optim.betas", self.betas)
        _require(self.eps > 0, f"optim.eps must be positive, got {self.eps}")


def _check_betas(key: str, betas: List[float]) -> None:
    _require(len(betas) == 2, f"{key} must have two values, got {list(betas)}")
    for beta in betas:
        _require(0.0 <= beta < 1.0, f"{key} values must be in [0, 1), got {list(betas)}")


# --------------------------------------------------------------------------- schedules


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup from 0, then the named decay to `min_lr`."""

    name: str = MISSING
    warmup_steps: int = 2000
    # Absolute learning rate at the end of the decay (not a fraction of optim.lr).
    min_lr: float = 3e-5

    def __post_init__(self) -> None:
        _require(self.warmup_steps >= 0, f"schedule.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(self.min_lr >= 0, f"schedule.min_lr must be >= 0, got {self.min_lr}")


@dataclass
class CosineScheduleConfig(ScheduleConfig):
    # Steps over which the cosine falls to min_lr; null means trainer.max_steps.
    decay_steps: Optional[int] = None


@dataclass
class WSDScheduleConfig(ScheduleConfig):
    """Warmup-stable-decay: constant lr, then a linear decay over the last fraction of steps."""

    decay_fraction: float = 0.2

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(
            0.0 < self.decay_fraction <= 1.0,
            f"schedule.decay_fraction must be in (0, 1], got {self.decay_fraction}",
        )


@dataclass
class ExpScheduleConfig(ScheduleConfig):
    """Exponential decay: lr multiplied by `decay_rate` every `decay_every` steps, floored at min_lr."""

    decay_rate: float = 0.9
    # Null means max_steps / 100, the spacing of the MARS reference schedule.
    decay_every: Optional[int] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(0.0 < self.decay_rate <= 1.0, f"schedule.decay_rate must be in (0, 1], got {self.decay_rate}")
        if self.decay_every is not None:
            _require(self.decay_every > 0, f"schedule.decay_every must be positive, got {self.decay_every}")


@dataclass
class ConstantScheduleConfig(ScheduleConfig):
    pass


# --------------------------------------------------------------------------- data


@dataclass
class DataConfig:
    """Source and location of the token shards.

    `path` is the folder of token shards the loader reads. For the embedded corpus it is
    where the prepared files are written on first use; null means a folder under
    `cache_dir`.
    """

    name: str = MISSING
    path: Optional[str] = None
    # Embedded corpus only: a folder of .txt/.jsonl files to use instead of the Python
    # documentation; null means `pydoc_data.topics`.
    text_path: Optional[str] = None
    # Embedded corpus only: fraction of documents held out for validation.
    val_fraction: float = 0.1
    cache_dir: str = "~/.cache/mars_m_exp"

    def __post_init__(self) -> None:
        _require(
            0.0 < self.val_fraction < 1.0,
            f"data.val_fraction must be in (0, 1), got {self.val_fraction}",
        )


# --------------------------------------------------------------------------- hardware


@dataclass
class HardwareConfig:
    """Device, precision and the shape of a job on a cluster."""

    name: str = MISSING
    # auto: cuda when a GPU is visible, else cpu.
    device: str = "auto"
    # Autocast dtype of the forward pass; auto: bfloat16 on cuda, float32 on cpu.
    dtype: str = "auto"
    # Default for trainer.compile when that is null; auto: on for cuda, off for cpu.
    compile: str = "auto"
    gpus_per_node: int = 1
    nodes: int = 1
    # Peak dense bf16 FLOP/s of one device for MFU; null looks the device name up.
    peak_flops: Optional[float] = None
    # Intra-op CPU threads; null leaves torch's default.
    cpu_threads: Optional[int] = None

    def __post_init__(self) -> None:
        _require(self.device in ("auto", "cpu", "cuda"), f"hardware.device must be auto, cpu or cuda, got {self.device!r}")
        _require(
            self.dtype in ("auto", "float32", "bfloat16"),
            f"hardware.dtype must be auto, float32 or bfloat16, got {self.dtype!r}",
        )
        _require(self.compile in ("auto", "on", "off"), f"hardware.compile must be auto, on or off, got {self.compile!r}")
        _require(self.gpus_per_node >= 1, f"hardware.gpus_per_node must be >= 1, got {self.gpus_per_node}")
        _require(self.nodes >= 1, f"hardware.nodes must be >= 1, got {self.nodes}")


# --------------------------------------------------------------------------- trainer and logger


@dataclass
class TrainerConfig:
    """The training loop. Batch sizes are in sequences of model.block_size tokens."""

    max_steps: int = 100_000
    # Sequences per optimizer step across all devices (480 in the MARS-M runs).
    global_batch_size: int = 480
    # Sequences per device per forward pass.
    micro_batch_size: int = 15
    eval_interval: int = 1000
    # Validation batches of micro_batch_size sequences, the same ones at every evaluation.
    eval_iters: int = 200
    log_interval: int = 10
    checkpoint_interval: int = 1000
    # Step checkpoints kept besides latest.pt; older ones are deleted.
    keep_checkpoints: int = 3
    # On a non-finite loss or gradient norm: "stop" the run, or "skip" the step and count it.
    nonfinite: str = "stop"
    # Max global gradient norm; 0 turns clipping off.
    grad_clip: float = 1.0
    # null: decided by hardware.compile.
    compile: Optional[bool] = None

    def __post_init__(self) -> None:
        for key in (
            "max_steps",
            "global_batch_size",
            "micro_batch_size",
            "eval_interval",
            "eval_iters",
            "log_interval",
            "checkpoint_interval",
            "keep_checkpoints",
        ):
            value = getattr(self, key)
            _require(value > 0, f"trainer.{key} must be positive, got {value}")
        _require(self.grad_clip >= 0, f"trainer.grad_clip must be >= 0 (0 turns clipping off), got {self.grad_clip}")
        _require(self.nonfinite in ("stop", "skip"), f"trainer.nonfinite must be stop or skip, got {self.nonfinite!r}")


@dataclass
class WandbConfig:
    # online, offline or disabled; null: online when an API key is configured, else disabled.
    mode: Optional[str] = None
    project: str = "mars-m-exp"
    entity: Optional[str] = None
    group: Optional[str] = None

    def __post_init__(self) -> None:
        if self.mode is not None:
            _require(
                self.mode in ("online", "offline", "disabled"),
                f"logger.wandb.mode must be online, offline or disabled, got {self.mode!r}",
            )


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    """The whole run. `model` and `optim` have no default: the user chooses them."""

    model: Any = MISSING
    optim: Any = MISSING
    data: DataConfig = MISSING
    schedule: Any = MISSING
    hardware: HardwareConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    # false: ignore checkpoints in the run directory and start from step 0.
    resume: bool = True


OPTIM_SCHEMAS = {
    "mars_m": MarsMConfig,
    "moonlight": MoonlightConfig,
    "adamw": AdamWConfig,
}

SCHEDULE_SCHEMAS = {
    "cosine": CosineScheduleConfig,
    "wsd": WSDScheduleConfig,
    "exp": ExpScheduleConfig,
    "constant": ConstantScheduleConfig,
}


# The repository's conf/ folder, which every entry point composes from.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def available_options(group: str) -> list[str]:
    """Return the option names of config group `group`, from its YAML files."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _lookup(key: str, table: DictConfig) -> Any:
    """Resolver `${lookup:KEY,{a: 1, b: 2}}`: the table's value for KEY, for per-option presets."""
    if key not in table:
        raise ConfigError(f"no entry for {key!r} in the preset table {dict(table)}; add one or override the value")
    return table[key]


def register_configs() -> None:
    """Store the schemas where the YAML files' defaults lists refer to them, and the resolvers."""
    if not OmegaConf.has_resolver("lookup"):
        OmegaConf.register_new_resolver("lookup", _lookup)
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(group="schema/model", name="gpt", node=ModelConfig)
    cs.store(group="schema/data", name="data", node=DataConfig)
    cs.store(group="schema/hardware", name="hardware", node=HardwareConfig)
    for name, schema in OPTIM_SCHEMAS.items():
        cs.store(group="schema/optim", name=name, node=schema)
    for name, schema in SCHEDULE_SCHEMAS.items():
        cs.store(group="schema/schedule", name=name, node=schema)


# --------------------------------------------------------------------------- resolution


def resolve_config(cfg: DictConfig) -> Config:
    """Turn the composed config into dataclasses, running every field check."""
    try:
        resolved = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as exc:  # omegaconf wraps errors raised in __post_init__
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise ConfigError(str(exc).splitlines()[0]) from exc
    assert isinstance(resolved, Config)
    validate_config(resolved)
    return resolved


def validate_config(cfg: Config) -> None:
    """Check the values that depend on more than one group; warn about odd ones."""
    trainer = cfg.trainer
    if trainer.global_batch_size % trainer.micro_batch_size:
        raise ConfigError(
            f"trainer.global_batch_size={trainer.global_batch_size} is not a multiple of "
            f"trainer.micro_batch_size={trainer.micro_batch_size}; choose sizes whose quotient "
            "is a whole number of accumulation steps"
        )

    if cfg.schedule.warmup_steps > trainer.max_steps:
        log.warning(
            "schedule.warmup_steps=%d is longer than trainer.max_steps=%d, so the learning rate "
            "never reaches optim.lr=%g",
            cfg.schedule.warmup_steps,
            trainer.max_steps,
            cfg.optim.lr,
        )
    if cfg.schedule.min_lr > cfg.optim.lr:
        log.warning("schedule.min_lr=%g is above optim.lr=%g, so the schedule rises instead of decaying", cfg.schedule.min_lr, cfg.optim.lr)
    if trainer.eval_interval > trainer.max_steps:
        log.warning(
            "trainer.eval_interval=%d exceeds trainer.max_steps=%d; validation runs only at the end",
            trainer.eval_interval,
            trainer.max_steps,
        )
    if not math.isfinite(cfg.optim.lr):
        raise ConfigError(f"optim.lr must be finite, got {cfg.optim.lr}")


def grad_accum_steps(global_batch_size: int, micro_batch_size: int, world_size: int) -> int:
    """Derive the accumulation steps: global batch = micro-batch x accumulation x world size."""
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={global_batch_size} is not divisible by "
            f"trainer.micro_batch_size={micro_batch_size} x world_size={world_size} = {per_step}; "
            "change the micro-batch or the number of processes"
        )
    return global_batch_size // per_step
