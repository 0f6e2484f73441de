"""Process-group start-up: the one place where ranks enter a run.

The launch is detected in this order: torchrun's environment (RANK, LOCAL_RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT); a SLURM task started by submitit with more than one
task in the job, whose rank and rendezvous `submitit.helpers.TorchDistributedEnvironment`
derives from SLURM's variables; otherwise a single process. NCCL is the backend on GPUs
and gloo on the CPU.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Collective calls fail with an error after this long when a rank stops responding.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """Map `hardware.device` (auto, cpu, cuda) to this process's device."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("hardware.device=cuda but no CUDA device is visible; use hardware=cpu or hardware=auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def launched_by_submitit() -> bool:
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def process_rank() -> int:
    """Return this process's global rank before any process group exists (0 when alone)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if launched_by_submitit():
        return int(os.environ.get("SLURM_PROCID", 0))
    return 0


def init_distributed(device_preference: str) -> DistEnv:
    """Start the process group when launched by torchrun or submitit; otherwise describe a single process."""
    if "RANK" not in os.environ and launched_by_submitit():
        import submitit

        # CUDA_VISIBLE_DEVICES is left alone: resolve_device maps LOCAL_RANK onto the
        # devices this task can see, whether SLURM gave it one GPU or the whole node.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistEnv(device=resolve_device(device_preference))

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ["WORLD_SIZE"])
    device = resolve_device(device_preference, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
        log.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, device)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Average `value` over ranks in place (gloo has no AVG, so sum and divide)."""
    if env.is_distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= env.world_size
    return value


def any_rank(flag: bool, env: DistEnv) -> bool:
    """Return True on every rank when `flag` is True on at least one."""
    if not env.is_distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=env.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(env: DistEnv) -> None:
    if env.is_distributed:
        dist.barrier()
