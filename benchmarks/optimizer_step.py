"""Time one optimizer step on GPT-2 small's block matrices.

Compares MARS-M (clip on and off), Moonlight, torch.optim.Muon (adjust_lr_fn="match_rms_adamw")
and torch.optim.AdamW on the same parameters and gradients. The optimizers take turns
within each round, in a rotating order, so a slow phase of a shared machine hits all of
them alike. Prints a Markdown table of the median step time, its ratio to
torch.optim.Muon's, and the optimizer state size per parameter byte, and writes the same
numbers as JSON.

    python benchmarks/optimizer_step.py --layers 1 --rounds 3     # CPU
    python benchmarks/optimizer_step.py                             # GPU: all 12 layers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from mars_m_exp.optim import MARS_M, Moonlight, state_bytes_per_param_byte  # noqa: E402

# (rows, cols) of nn.Linear weights in one GPT-2 small block (n_embd = 768): attention
# c_attn and c_proj, MLP c_fc and c_proj.
GPT2_SMALL_BLOCK_SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)]
REFERENCE = "torch.optim.Muon"
REFERENCE_KEY = "muon"
# Command-line key and table label of each optimizer.
OPTIMIZER_KEYS = {
    "mars-m-clip": "MARS-M, clip on",
    "mars-m-no-clip": "MARS-M, clip off",
    "moonlight": "Moonlight",
    REFERENCE_KEY: REFERENCE,
    "adamw": "torch.optim.AdamW",
}
LR, WEIGHT_DECAY = 1e-3, 0.1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12, help="number of GPT-2 small blocks (default 12, the full model)")
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per optimizer (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per optimizer first, for state and compilation (default 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: cuda if available)")
    parser.add_argument(
        "--ns-dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="Newton-Schulz dtype of MARS-M and Moonlight; auto is bfloat16 on cuda, float32 elsewhere. "
        "torch.optim.Muon always uses bfloat16",
    )
    parser.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile Newton-Schulz in MARS-M and Moonlight; auto is on for cuda, off elsewhere",
    )
    parser.add_argument(
        "--optimizers",
        default=None,
        help=f"comma-separated subset of: {', '.join(OPTIMIZER_KEYS)} (default: all; {REFERENCE_KEY} is always run, as the ratios' base)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--json", type=Path, default=Path("results/optimizer_step.json"), help="where to write the JSON results")
    return parser.parse_args()


def optimizer_factories(ns_dtype: torch.dtype | None, compile_ns: bool | None) -> dict[str, Callable]:
    ours = dict(lr=LR, wd=WEIGHT_DECAY, ns_dtype=ns_dtype, compile_ns=compile_ns)
    return {
        "MARS-M, clip on": lambda params: MARS_M(muon_params=params, clip_c=True, **ours),
        "MARS-M, clip off": lambda params: MARS_M(muon_params=params, clip_c=False, **ours),
        "Moonlight": lambda params: Moonlight(muon_params=params, **ours),
        REFERENCE: lambda params: torch.optim.Muon(params, lr=LR, weight_decay=WEIGHT_DECAY, adjust_lr_fn="match_rms_adamw"),
        "torch.optim.AdamW": lambda params: torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY),
    }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(optimizer: torch.optim.Optimizer, device: torch.device) -> float:
    """Run one step and return its wall time in milliseconds, device work included."""
    synchronize(device)
    start = time.perf_counter()
    optimizer.step()
    synchronize(device)
    return 1000 * (time.perf_counter() - start)


def machine_description(device: torch.device) -> dict[str, object]:
    description: dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if models:
            description["cpu"] = models[0]
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    ns_dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[args.ns_dtype]
    compile_ns = {"auto": None, "on": True, "off": False}[args.compile]

    factories = optimizer_factories(ns_dtype, compile_ns)
    if args.optimizers:
        keys = {key.strip() for key in args.optimizers.split(",")} | {REFERENCE_KEY}
        unknown = sorted(keys - set(OPTIMIZER_KEYS))
        if unknown:
            raise SystemExit(f"unknown optimizer(s) {', '.join(unknown)} in --optimizers; choose from {', '.join(OPTIMIZER_KEYS)}")
        factories = {OPTIMIZER_KEYS[key]: factories[OPTIMIZER_KEYS[key]] for key in OPTIMIZER_KEYS if key in keys}

    generator = torch.Generator().manual_seed(0)
    shapes = GPT2_SMALL_BLOCK_SHAPES * args.layers
    initial = [torch.randn(shape, generator=generator) * 0.02 for shape in shapes]
    grads = [(torch.randn(shape, generator=generator) * 0.01).to(device) for shape in shapes]

    optimizers: dict[str, tuple[torch.optim.Optimizer, list[torch.Tensor]]] = {}
    for name, make in factories.items():
        params = [torch.nn.Parameter(w.to(device)) for w in initial]
        # Every optimizer reads the same gradients; none of them writes to a gradient.
        for p, g in zip(params, grads):
            p.grad = g
        optimizers[name] = (make(params), params)

    names = list(optimizers)
    for _ in range(args.warmup):
        for name in names:
            timed_step(optimizers[name][0], device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed_step(optimizers[name][0], device))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    reference_median = statistics.median(times[REFERENCE])
    results = []
    for name in names:
        optimizer, params = optimizers[name]
        median = statistics.median(times[name])
        results.append(
            {
                "optimizer": name,
                "median_ms": median,
                "min_ms": min(times[name]),
                "times_ms": times[name],
                "ratio_to_torch_muon": median / reference_median,
                "state_bytes_per_param_byte": state_bytes_per_param_byte(optimizer, params),
            }
        )

    matrix_params = sum(w.numel() for w in initial)
    settings = {
        "layers": args.layers,
        "matrix_parameters": matrix_params,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "device": str(device),
        "ns_dtype": args.ns_dtype,
        "compile": args.compile,
        "command": " ".join(sys.argv),
    }
    report = {"machine": machine_description(device), "settings": settings, "results": results}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2))

    print(f"{args.layers} layer(s), {matrix_params / 1e6:.1f}M matrix parameters on {device}; {args.rounds} timed rounds")
    print()
    print("| optimizer | median step (ms) | vs torch.optim.Muon | state bytes / param byte |")
    print("| --- | ---: | ---: | ---: |")
    for row in results:
        print(
            f"| {row['optimizer']} | {row['median_ms']:.1f} | {row['ratio_to_torch_muon']:.3g}x | {row['state_bytes_per_param_byte']:.1f} |"
        )
    print()
    print(f"JSON written to {args.json}")


if __name__ == "__main__":
    main()
