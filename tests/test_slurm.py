"""SLURM through submitit: the launcher presets, and jobs on a real scheduler.

The scheduler tests submit jobs to the cluster that `sinfo` reaches: a 2-point sweep as a
job array, a job of 2 DDP tasks, and a job that is sent SLURM's preemption warning. CI
starts a one-node cluster on 127.0.0.1 with `launchers/slurm_cluster.sh up` and sets
MARS_M_EXP_REQUIRE_SLURM=1, which turns a missing scheduler into a failure. Elsewhere they
skip when no scheduler responds, and also on any cluster other than that development one
unless MARS_M_EXP_SLURM_TESTS=1, because the jobs read files under this machine's /tmp.

Without slurmdbd there is no sacct, so submitit cannot see a job die and would wait for its
result file forever: every submission runs under a timeout and its jobs are cancelled by
name afterwards.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import CONF_DIR, REPO_ROOT, TINY_RUN
import mars_m_exp.report  # noqa: F401  (registers the resolver that names hydra.sweep.dir)
from mars_m_exp.config import register_configs
from mars_m_exp.metrics import read_metrics

CLUSTER_SCRIPT = REPO_ROOT / "launchers" / "slurm_cluster.sh"
DEV_CLUSTER_NAME = "mars-m-exp-dev"
SUBMIT_TIMEOUT_S = 300


# --------------------------------------------------------------------------- presets (no scheduler)


def launcher_config(*overrides: str, conf_dir: Path = CONF_DIR) -> dict:
    """Compose the config with `overrides` and return the resolved hydra.launcher node."""
    register_configs()
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        cfg = compose("config", overrides=["+model=tiny", "+optim=mars_m", *overrides], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


def test_slurm_preset_one_task_per_gpu():
    launcher = launcher_config("hydra/launcher=slurm", "hardware=gpu_node8")

    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["tasks_per_node"] == 8
    assert launcher["gpus_per_node"] == 8
    assert launcher["nodes"] == 1
    assert launcher["max_num_timeout"] == 5
    assert launcher["signal_delay_s"] == 300


def test_slurm_preset_nodes_from_hardware():
    launcher = launcher_config("hydra/launcher=slurm", "hardware=gpu_node8", "hardware.nodes=2")

    assert launcher["nodes"] == 2
    assert launcher["tasks_per_node"] == 8


def test_slurm_cpu_preset_requests_no_gpus():
    launcher = launcher_config("hydra/launcher=slurm_cpu", "hardware=cpu_2tasks")

    assert launcher["gpus_per_node"] is None
    assert launcher["tasks_per_node"] == 2
    assert launcher["cpus_per_task"] == 1


def test_submitit_folder_inside_sweep_dir():
    launcher = launcher_config("hydra/launcher=slurm", "hydra.sweep.dir=/scratch/sweeps/lr_grid")

    assert re.fullmatch(r"/scratch/sweeps/lr_grid/\.submitit/\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d/%j", launcher["submitit_folder"])


def test_local_override_file_merged_last(tmp_path):
    conf_dir = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf_dir, ignore=shutil.ignore_patterns("local"))
    (conf_dir / "local").mkdir()
    (conf_dir / "local" / "slurm.yaml").write_text("partition: gpu\naccount: proj42\ncpus_per_task: 12\ntimeout_min: 2880\n")

    gpu = launcher_config("hydra/launcher=slurm", "hardware=gpu_node8", conf_dir=conf_dir)
    cpu = launcher_config("hydra/launcher=slurm_cpu", conf_dir=conf_dir)

    assert (gpu["partition"], gpu["account"], gpu["cpus_per_task"], gpu["timeout_min"]) == ("gpu", "proj42", 12, 2880)
    assert gpu["tasks_per_node"] == 8
    # slurm_cpu sets its own CPUs per task after the local file; the rest carries over.
    assert (cpu["partition"], cpu["account"], cpu["cpus_per_task"]) == ("gpu", "proj42", 1)


@pytest.mark.parametrize("restart_count, expected_rc", [(None, 0), ("2", 0), ("3", 1)])
def test_setup_line_bounds_requeues(restart_count, expected_rc):
    launcher = launcher_config("hydra/launcher=slurm", "hydra.launcher.max_num_timeout=2")
    env = {k: v for k, v in os.environ.items() if k != "SLURM_RESTART_COUNT"}
    if restart_count is not None:
        env["SLURM_RESTART_COUNT"] = restart_count
    env["SLURM_JOB_ID"] = "77"

    result = subprocess.run(["bash", "-c", "\n".join(launcher["setup"])], env=env, capture_output=True, text=True, timeout=30)

    assert result.returncode == expected_rc
    if expected_rc:
        assert "job 77 was requeued 3 times, more than hydra.launcher.max_num_timeout=2" in result.stderr


def test_cluster_script_names_missing_commands():
    # Debian installs the daemons in /usr/sbin, so without it on PATH they are missing, and
    # the script stops before it changes anything.
    env = {**os.environ, "PATH": "/usr/bin:/bin"}

    result = subprocess.run([str(CLUSTER_SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=30)

    assert result.returncode == 1
    if os.geteuid() == 0:
        missing = re.search(r"not found on PATH: (.*);", result.stderr)
        assert missing, result.stderr
        assert {"munged", "slurmctld", "slurmd"} <= set(missing.group(1).split())
        assert "apt-get install -y slurmctld slurmd slurm-client munge" in result.stderr
    else:
        assert "must run as root" in result.stderr


# --------------------------------------------------------------------------- scheduler


def scheduler_unavailable_reason() -> str | None:
    """Return why the scheduler tests cannot run here, or None when they can."""
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return "SLURM client commands not installed (apt-get install slurm-client), so no scheduler to test against"
    nodes = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True, timeout=30)
    if nodes.returncode != 0:
        first_line = (nodes.stderr.strip().splitlines() or ["no output"])[0]
        return f"no SLURM scheduler responds (sinfo: {first_line}); start one with `make slurm-up`"
    states = nodes.stdout.split()
    if not any(state.rstrip("*~#") in ("idle", "mix", "alloc") for state in states):
        return f"SLURM responds but no node is up (node states: {states}); see `launchers/slurm_cluster.sh status`"
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30).stdout
    match = re.search(r"^ClusterName\s*=\s*(\S+)", config, re.MULTILINE)
    cluster = match.group(1) if match else "unknown"
    if cluster != DEV_CLUSTER_NAME and not os.environ.get("MARS_M_EXP_SLURM_TESTS"):
        return (
            f"cluster {cluster!r} is not the development cluster of launchers/slurm_cluster.sh; "
            "set MARS_M_EXP_SLURM_TESTS=1 to submit the test jobs to it"
        )
    return None


@pytest.fixture(scope="session")
def slurm_scheduler() -> None:
    reason = scheduler_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("MARS_M_EXP_REQUIRE_SLURM"):
        pytest.fail(f"MARS_M_EXP_REQUIRE_SLURM is set but {reason}")
    pytest.skip(reason)


@pytest.fixture
def job_name(slurm_scheduler):
    """A job name of this test alone; its jobs are cancelled when the test ends."""
    name = f"mars-m-exp-test-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=30)


def submit_command(job_name: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mars_m_exp",
        "-m",
        "hydra/launcher=slurm_cpu",
        f"hydra.launcher.name={job_name}",
        "hydra.launcher.timeout_min=30",
        *TINY_RUN,
        "+optim=mars_m",
        "trainer.eval_interval=100",
        *overrides,
    ]


def run_submission(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S, env={**os.environ, "OMP_NUM_THREADS": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def only_sweep_dir(cwd: Path) -> Path:
    (sweep_dir,) = (cwd / "sweeps").iterdir()
    return sweep_dir


def run_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.glob("*/metrics.jsonl"))


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["event"] == "train"]


def submitit_job_dirs(sweep_dir: Path) -> list[Path]:
    # <sweep>/.submitit/<launch time>/<job id>: one folder per job or per array task (named
    # <array id>_<index>), each with the pickled call; an array's own folder holds only its
    # sbatch script.
    return sorted(p.parent for p in sweep_dir.glob(".submitit/*/*/*_submitted.pkl"))


def task_result(job_dir: Path, task: int) -> str:
    (result_file,) = job_dir.glob(f"*_{task}_result.pkl")
    with result_file.open("rb") as f:
        return pickle.load(f)[0]


@pytest.mark.slow
def test_lr_sweep_runs_as_slurm_job_array(tmp_path, corpus_cache, job_name):
    run_submission(submit_command(job_name, "optim.lr=0.01,0.02", "trainer.max_steps=2"), tmp_path)

    sweep_dir = only_sweep_dir(tmp_path)
    # The fixed overrides name the sweep: lr, the swept key, is not in the name.
    assert "+optim=mars_m" in sweep_dir.name
    assert "optim.lr" not in sweep_dir.name
    runs = run_dirs(sweep_dir)
    assert [OmegaConf.load(run / "config.yaml").optim.lr for run in runs] == [0.01, 0.02]
    for run in runs:
        assert train_steps(run) == [1, 2]

    job_dirs = submitit_job_dirs(sweep_dir)
    array_ids = {d.name.split("_")[0] for d in job_dirs}
    assert len(array_ids) == 1
    assert sorted(d.name.split("_")[1] for d in job_dirs) == ["0", "1"]
    for job_dir in job_dirs:
        assert task_result(job_dir, 0) == "success"
    # Each run directory records the SLURM job that ran it.
    run_job_ids = sorted(str(OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.job.id) for run in runs)
    assert run_job_ids == sorted(d.name for d in job_dirs)


@pytest.mark.slow
def test_two_task_job_trains_as_two_ranks(tmp_path, corpus_cache, job_name):
    run_submission(submit_command(job_name, "hardware=cpu_2tasks", "trainer.max_steps=2"), tmp_path)

    (run,) = run_dirs(only_sweep_dir(tmp_path))
    log = (run / "train.log").read_text()
    assert "rank 0/2 joined the gloo process group on cpu" in log
    assert "2 process(es)" in log
    assert "batch: 4 sequences/step = 2 micro x 1 accumulation x 2 processes" in log
    assert train_steps(run) == [1, 2]
    (job_dir,) = submitit_job_dirs(only_sweep_dir(tmp_path))
    assert task_result(job_dir, 0) == "success"
    assert task_result(job_dir, 1) == "success"


@pytest.mark.slow
def test_reproduce_submits_the_comparison_as_one_job_array(tmp_path, corpus_cache, job_name):
    """`make reproduce-table LAUNCHER=slurm_cpu`: the three optimizers as one array, then the table."""
    overrides = ["trainer.max_steps=2", "trainer.eval_interval=2", "trainer.eval_iters=1", "model.block_size=32"]
    command = [
        sys.executable, "-m", "mars_m_exp.reproduce", "--launcher", "slurm_cpu", *overrides,
        f"hydra.launcher.name={job_name}", "hydra.launcher.timeout_min=30",
    ]
    run_submission(command, tmp_path)

    # Settings of the launcher do not enter the names of the sweep and results directories.
    name = ",".join(["cpu_tiny", *overrides])
    sweep_dir = tmp_path / "sweeps" / "reproduce" / name
    job_dirs = submitit_job_dirs(sweep_dir)
    assert len({d.name.split("_")[0] for d in job_dirs}) == 1
    assert sorted(d.name.split("_")[1] for d in job_dirs) == ["0", "1", "2"]
    table = (tmp_path / "results" / name / "table.csv").read_text().splitlines()
    statuses = {line.split(",")[1]: line.split(",")[3] for line in table[1:]}
    assert statuses == {"mars_m": "finished", "moonlight": "finished", "adamw": "finished"}


def wait_for(condition, timeout_s: float, description: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {description}")
        time.sleep(0.2)


@pytest.mark.slow
def test_preempted_job_requeues_and_resumes(tmp_path, corpus_cache, job_name):
    max_steps = 12
    command = submit_command(job_name, f"trainer.max_steps={max_steps}", "trainer.checkpoint_interval=1000")
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        sweep_root = tmp_path / "sweeps"
        wait_for(lambda: any(len(train_steps(run)) >= 2 for run in sweep_root.glob("*/*") if (run / "metrics.jsonl").is_file()), 180, "2 training steps")
        job_id = subprocess.run(["squeue", "--noheader", f"--name={job_name}", "--format=%A"], capture_output=True, text=True, timeout=30).stdout.strip()
        assert job_id.isdigit(), f"squeue found no single job named {job_name}: {job_id!r}"
        # SLURM sends this signal before a preemption or the time limit (sbatch --signal).
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        output, _ = process.communicate(timeout=SUBMIT_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, output[-4000:]

    (run,) = run_dirs(only_sweep_dir(tmp_path))
    log = (run / "train.log").read_text()
    stopped = re.search(r"SIGUSR2 received: stopped at step (\d+) after saving a checkpoint", log)
    assert stopped, log[-3000:]
    stopped_at = int(stopped.group(1))
    assert stopped_at < max_steps
    assert f"resumed from {run / 'checkpoints' / 'latest.pt'} at step {stopped_at}" in log
    assert "Requeued job" in log
    # The requeued job continues after the checkpoint, so no step is trained twice.
    assert train_steps(run) == list(range(1, max_steps + 1))
    job = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    assert "Restarts=1" in job


def daemon_status() -> list[str]:
    """Return the daemon lines of `slurm_cluster.sh status`, without the node's changing state."""
    status = subprocess.run([str(CLUSTER_SCRIPT), "status"], capture_output=True, text=True, timeout=30).stdout
    return [line for line in status.splitlines() if not line.startswith("node ")]


@pytest.mark.slow
def test_cluster_script_up_is_idempotent(slurm_scheduler):
    if os.geteuid() != 0:
        pytest.skip("launchers/slurm_cluster.sh needs root")
    daemons_before = daemon_status()
    if not any(line.startswith("slurmctld: running") for line in daemons_before):
        pytest.skip("the running cluster was not started by launchers/slurm_cluster.sh")

    result = subprocess.run([str(CLUSTER_SCRIPT), "up"], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert "already running with the same config" in result.stdout
    # The same PIDs: nothing was restarted.
    assert daemon_status() == daemons_before


def test_paper_preset_on_slurm_takes_one_gpu_node():
    # What `make reproduce-table PRESET=owt_gpt2_small LAUNCHER=slurm` submits for each run.
    from mars_m_exp.config import grad_accum_steps
    from mars_m_exp.reproduce import LAUNCHERS

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=owt_gpt2_small_mars_m", *LAUNCHERS["slurm"]], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)

    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (1, 8, 8)
    assert cfg.hardware.device == "cuda"
    assert grad_accum_steps(cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size, 8) == 4
