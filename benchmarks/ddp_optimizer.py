"""Time one MARS-M optimizer step per rank: Newton-Schulz sharded across ranks vs replicated.

Runs 1 process, then 2 gloo processes with replicated and with sharded orthogonalization,
on the matrix shapes of GPT-2 small (per layer 2304x768, 768x768, 3072x768, 768x3072).
Each process uses one CPU thread, so 2 processes on 2 cores do not compete for threads.
Prints a table of the median step time per rank and writes JSON.

    python benchmarks/ddp_optimizer.py --layers 2 --rounds 5 --out benchmarks/ddp_optimizer.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mars_m_exp.optim import MARS_M

LAYER_SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]


def worker(rank: int, world_size: int, init_file: str, args: argparse.Namespace, sharded: bool, results) -> None:
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)

    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=generator) * 0.02) for _ in range(args.layers) for shape in LAYER_SHAPES]
    optimizer = MARS_M(lr=1e-3, muon_params=params, shard_orthogonalization=sharded, compile_ns=False)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator) * 0.01

    times = []
    for round_index in range(args.warmup + args.rounds):
        if world_size > 1:
            dist.barrier()
        start = time.perf_counter()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if round_index >= args.warmup:
            times.append(elapsed)

    results[rank] = statistics.median(times)
    if world_size > 1:
        dist.destroy_process_group()


def measure(world_size: int, sharded: bool, args: argparse.Namespace) -> float:
    manager = mp.Manager()
    results = manager.dict()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        mp.spawn(worker, args=(world_size, init_file, args, sharded, results), nprocs=world_size, join=True)
    return max(results.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2, help="GPT-2 small layers of matrices (12 for the full model)")
    parser.add_argument("--rounds", type=int, default=5, help="timed optimizer steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--out", default="benchmarks/ddp_optimizer.json", help="JSON output path")
    args = parser.parse_args()

    rows = [
        ("1 process", 1, False),
        ("2 ranks, replicated", 2, False),
        ("2 ranks, sharded", 2, True),
    ]
    timings = {name: measure(world, sharded, args) for name, world, sharded in rows}
    replicated = timings["2 ranks, replicated"]

    print(f"MARS-M step, {args.layers} GPT-2 small layers, median of {args.rounds} steps, slowest rank")
    print(f"{'configuration':<22} {'ms/step per rank':>17} {'vs replicated':>14}")
    for name, seconds in timings.items():
        print(f"{name:<22} {1000 * seconds:>17.1f} {seconds / replicated:>13.2f}x")

    report = {
        "layers": args.layers,
        "rounds": args.rounds,
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "seconds_per_step": timings,
        "sharded_over_replicated": timings["2 ranks, sharded"] / replicated,
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
