"""Run metrics: a local `metrics.jsonl` that never depends on wandb, plus wandb when enabled."""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# Peak dense bf16 tensor-core FLOP/s per device, from the vendors' data sheets (SXM parts).
PEAK_FLOPS_BY_DEVICE_NAME = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
    "V100": 125e12,
}


def peak_flops(device: torch.device, configured: float | None) -> float | None:
    """Return the device's peak FLOP/s for MFU: the configured value, else a lookup; None on CPU."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_FLOPS_BY_DEVICE_NAME.items():
        if key in name:
            return value
    log.warning("peak FLOP/s of %r unknown, so MFU is not logged; set hardware.peak_flops", name)
    return None


class MetricsWriter:
    """Append one JSON object per event to `metrics.jsonl`, and mirror it to wandb."""

    def __init__(self, run_dir: Path, wandb_run: Any | None = None) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.wandb_run = wandb_run
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, event: str, **values: Any) -> None:
        record = {"event": event, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            step = record.get("step")
            prefix = "val" if event == "eval" else event
            self.wandb_run.log({f"{prefix}/{k}": v for k, v in record.items() if k not in ("event", "step")}, step=step)

    def close(self) -> None:
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read `metrics.jsonl`, skipping a last line cut off by a crash."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def wandb_mode(configured: str | None) -> str:
    """Resolve `logger.wandb.mode`: null means online when an API key is configured, else disabled."""
    if configured is not None:
        return configured
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "disabled"


def sweep_group() -> str | None:
    """Return the name of the sweep directory when this process runs a job of a Hydra sweep, else None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return Path(hydra_cfg.sweep.dir).name


def start_wandb(cfg_dict: dict, wandb_cfg, run_dir: Path, run_name: str):
    """Start (or resume) the wandb run of `run_dir`; return None when wandb is disabled.

    The run id is kept in `run_dir/wandb_id.txt`, so a restarted or requeued run continues
    the same wandb run. Runs of one sweep share a group, the sweep directory's name, unless
    `logger.wandb.group` sets one; the job type is the optimizer's name.
    """
    mode = wandb_mode(wandb_cfg.mode)
    if mode == "disabled":
        return None
    import wandb

    id_file = run_dir / "wandb_id.txt"
    if id_file.exists():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
    return wandb.init(
        project=wandb_cfg.project,
        entity=wandb_cfg.entity,
        group=wandb_cfg.group if wandb_cfg.group is not None else sweep_group(),
        job_type=cfg_dict.get("optim", {}).get("name"),
        name=run_name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        config=cfg_dict,
        mode=mode,
    )
