"""Run under torchrun: compare DDP's reduced gradients across ranks and with the mean of local ones.

Usage: torchrun --nproc_per_node=2 ddp_gradient_check.py OUT.json OVERRIDE...
Writes a JSON report from rank 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import compose_config  # noqa: E402
from mars_m_exp.config import resolve_config  # noqa: E402
from mars_m_exp.distributed import init_distributed  # noqa: E402
from mars_m_exp.trainer import Trainer  # noqa: E402


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main() -> None:
    out = Path(sys.argv[1])
    cfg = resolve_config(compose_config(sys.argv[2:]))
    env = init_distributed("cpu")
    trainer = Trainer(cfg, out.parent / "run", out.parent, env)

    trainer._accumulate_gradients(step=0)
    reduced = flat_grad(trainer.raw_model).clone()
    trainer.optimizer.zero_grad(set_to_none=True)

    # The same micro-batches without DDP: this rank's own gradient.
    for x, y, _ in trainer._micro_steps(0):
        _, loss = trainer.raw_model(x, y)
        (loss / trainer.accum_steps).backward()
    local = flat_grad(trainer.raw_model).clone()

    gathered_reduced = [torch.empty_like(reduced) for _ in range(env.world_size)]
    gathered_local = [torch.empty_like(local) for _ in range(env.world_size)]
    dist.all_gather(gathered_reduced, reduced)
    dist.all_gather(gathered_local, local)

    if env.is_main:
        mean_local = torch.stack(gathered_local).mean(0)
        report = {
            "max_difference_between_ranks": max((g - gathered_reduced[0]).abs().max().item() for g in gathered_reduced),
            "max_difference_from_mean_of_local": (reduced - mean_local).abs().max().item(),
            "gradient_norm": reduced.norm().item(),
        }
        out.write_text(json.dumps(report))
    # Tearing gloo down while the other rank still works can abort the process.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
