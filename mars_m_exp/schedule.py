"""Learning-rate schedules: linear warmup from 0, then cosine, WSD, exponential or constant.

`lr_at(step)` gives the learning rate of optimizer step `step` (0-based), so step 0 of a
warmup runs at 0, as in the MARS-M reference trainer.
"""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, schedule_cfg, max_steps: int) -> float:
    """Return the learning rate of `step` under `schedule_cfg`, whose `name` picks the decay."""
    warmup = schedule_cfg.warmup_steps
    min_lr = schedule_cfg.min_lr
    if step < warmup:
        return base_lr * step / warmup

    name = schedule_cfg.name
    if name == "constant":
        return base_lr

    if name == "cosine":
        decay_steps = schedule_cfg.decay_steps or max_steps
        if step >= decay_steps:
            return min_lr
        progress = (step - warmup) / max(1, decay_steps - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (base_lr - min_lr)

    if name == "wsd":
        decay_start = max(warmup, int(max_steps * (1.0 - schedule_cfg.decay_fraction)))
        if step < decay_start:
            return base_lr
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return base_lr + progress * (min_lr - base_lr)

    if name == "exp":
        decay_every = schedule_cfg.decay_every or max(1, max_steps // 100)
        return max(min_lr, base_lr * schedule_cfg.decay_rate ** ((step - warmup) / decay_every))

    raise ValueError(f"unknown schedule {name!r}; choose one of cosine, wsd, exp, constant")
