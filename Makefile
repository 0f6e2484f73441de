# Targets for setting up, testing and running mars-m-exp. `make help` lists them.
PYTHON ?= .venv/bin/python
PIP ?= .venv/bin/pip
# Torch's CPU wheel is pinned so a plain install does not pull a multi-GB CUDA build; on a
# GPU machine install the CUDA build of your choice first and run `make setup TORCH=`.
TORCH ?= torch==2.13.0

.DEFAULT_GOAL := help
.PHONY: help setup test test-fast quickstart reproduce-table clean-runs

help: ## List the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  %-22s %s\n", $$1, $$2}'

setup: ## Create .venv and install the project with its test tools
	python3 -m venv .venv
	$(PIP) install --upgrade pip
	$(if $(TORCH),$(PIP) install "$(TORCH)")
	$(PIP) install -e ".[dev]"

test: ## Run the whole test suite (about 9 minutes on 2 CPU cores)
	$(PYTHON) -m pytest

test-fast: ## Run the tests without the slow end-to-end ones
	$(PYTHON) -m pytest -m "not slow"

quickstart: ## Train the tiny model with MARS-M on the embedded corpus (CPU, a few minutes)
	$(PYTHON) -m mars_m_exp +model=tiny +optim=mars_m +experiment=quickstart

# The comparison of MARS-M, Muon (Moonlight) and AdamW as one sweep, then its table and plots
# in results/<preset>/. PRESET: cpu_tiny (the default, about 8 minutes on 2 CPU cores) or a
# paper run such as owt_gpt2_small (`python -m mars_m_exp.reproduce --help`); LAUNCHER: local,
# slurm (one 8-GPU node per run) or slurm_cpu; SWEEP=DIR only rebuilds the outputs from the
# runs in DIR; ARGS: Hydra overrides for every run.
PRESET ?=
LAUNCHER ?= local
SWEEP ?=
ARGS ?=
reproduce-table: ## Compare the optimizers (PRESET=, LAUNCHER=, SWEEP=) and write results/<preset>/
	$(PYTHON) -m mars_m_exp.reproduce $(if $(PRESET),--preset $(PRESET)) --launcher $(LAUNCHER) $(if $(SWEEP),--sweep $(SWEEP)) $(ARGS)

clean-runs: ## Delete the runs/, sweeps/ and results/ output folders
	rm -rf runs sweeps results

# A one-node SLURM cluster on 127.0.0.1 for trying the SLURM launcher and for
# tests/test_slurm.py; needs root and Debian's slurmctld, slurmd, slurm-client and munge.
.PHONY: slurm-up slurm-down
slurm-up: ## Start munged, slurmctld and slurmd on this machine (root; idempotent)
	launchers/slurm_cluster.sh up

slurm-down: ## Stop the SLURM daemons that slurm-up started
	launchers/slurm_cluster.sh down

# Extra options go in DATA_ARGS, for example DATA_ARGS="--sample sample-10BT --num-proc 32";
# `python -m data_prep.prepare --help` lists them. Rerunning a target resumes it.
.PHONY: data-openwebtext data-fineweb-edu
data-openwebtext: ## Tokenize OpenWebText into data/openwebtext (about 18 GB of shards; see README)
	$(PYTHON) -m data_prep.prepare openwebtext --out data/openwebtext $(DATA_ARGS)

data-fineweb-edu: ## Tokenize FineWeb-Edu sample-100BT into data/fineweb_edu (about 200 GB of shards; see README)
	$(PYTHON) -m data_prep.prepare fineweb_edu --out data/fineweb_edu $(DATA_ARGS)
