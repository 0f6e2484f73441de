#!/usr/bin/env bash
# Train on one machine with one DDP process per GPU, started by torchrun.
#
#   launchers/torchrun.sh +model=gpt2_small +optim=mars_m [overrides...]
#   NPROC_PER_NODE=4 launchers/torchrun.sh +model=gpt2_small +optim=mars_m
#
# Every argument goes to `python -m mars_m_exp`, so the run lands where a plain run would,
# in runs/<overrides>/, and rerunning the same command resumes it. One run per call: a
# sweep (-m) would start the process group again in the same processes for each point, which
# hung in a test with torch 2.13 on gloo, so it is rejected. Loop over the points in the
# shell, or submit the sweep with hydra/launcher=slurm.
#
# NPROC_PER_NODE  processes to start (default: the number of visible GPUs, or 1 without any)
# PYTHON          the interpreter (default: the repository's .venv/bin/python if present,
#                 else python3 on PATH)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$repo_root/.venv/bin/python" ]; then
        PYTHON="$repo_root/.venv/bin/python"
    else
        PYTHON=python3
    fi
fi

for arg in "$@"; do
    if [ "$arg" = "-m" ] || [ "$arg" = "--multirun" ]; then
        echo "torchrun.sh: error: $arg is not supported under torchrun; call this script once per sweep point, or submit the sweep with hydra/launcher=slurm" >&2
        exit 2
    fi
done

if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
case "$NPROC_PER_NODE" in
    '' | *[!0-9]* | 0)
        echo "torchrun.sh: error: NPROC_PER_NODE must be a positive integer, got '$NPROC_PER_NODE'" >&2
        exit 2
        ;;
esac

# --standalone runs the rendezvous on this machine, on a free port, so several jobs can
# share a node. torchrun sets OMP_NUM_THREADS=1 for more than one process unless it is set.
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC_PER_NODE" -m mars_m_exp "$@"
