"""The training loop: micro-batches with accumulation, clipping, the optimizer step, evaluation,
metrics and checkpoints, resumed automatically from the run directory."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from .checkpoint import BEST_NAME, LATEST_NAME, CheckpointError, copy_checkpoint, load_newest_valid, save_step_checkpoint, unwrap_state_dict
from .config import Config, ConfigError, grad_accum_steps
from .data import build_data, prepare_data
from .distributed import DistEnv, all_reduce_mean, any_rank, barrier, init_distributed, shutdown_distributed
from .metrics import MetricsWriter, peak_flops, start_wandb
from .model import GPT, gpt_config
from .optim import build_optimizer
from .plots import plot_losses
from .schedule import lr_at

log = logging.getLogger(__name__)

# Keys whose change makes a checkpoint unusable for the run (its tensors or its meaning).
RESUME_KEYS = ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.vocab_size", "optim.name")


class StopRequest:
    """Record a stop signal so the loop saves a checkpoint at the next step boundary.

    SIGTERM and SIGINT stop the run. SIGUSR2 is SLURM's warning before preemption or the
    time limit, sent through submitit's `--signal`. After the checkpoint, submitit's own
    SIGUSR2 handler runs if it was installed, and it requeues the job.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def install(self) -> None:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum
        if signum == signal.SIGINT:
            # A second Ctrl-C interrupts at once.
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def finish(self) -> None:
        """Hand a SLURM warning to submitit's handler (which requeues), then exit."""
        signum = self.signum if self.signum is not None else signal.SIGTERM
        previous = self._previous.get(signum)
        if signum == signal.SIGUSR2 and callable(previous):
            previous(signum, None)
        raise SystemExit(128 + signum)


class NonFiniteError(RuntimeError):
    """A NaN or Inf loss or gradient norm with trainer.nonfinite=stop."""


@dataclasses.dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    tokens: int = 0
    best_val_loss: float = math.inf
    elapsed_s: float = 0.0  # training time, evaluation excluded
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite value


def _autocast(device: torch.device, dtype_name: str):
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    if dtype == torch.float32:
        return contextlib.nullcontext, dtype
    return (lambda: torch.autocast(device_type=device.type, dtype=dtype)), dtype


def _checkpoint_matches(saved_cfg: dict, cfg_dict: dict) -> list[str]:
    mismatches = []
    for key in RESUME_KEYS:
        group, name = key.split(".")
        saved = saved_cfg.get(group, {}).get(name)
        current = cfg_dict.get(group, {}).get(name)
        if saved != current:
            mismatches.append(f"{key}: checkpoint {saved!r}, config {current!r}")
    return mismatches


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, launch_dir: Path, env: DistEnv) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.env = env
        self.device = env.device
        self.cfg_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
        trainer_cfg = cfg.trainer

        self.accum_steps = grad_accum_steps(trainer_cfg.global_batch_size, trainer_cfg.micro_batch_size, env.world_size)
        self.tokens_per_step = trainer_cfg.global_batch_size * cfg.model.block_size
        self.exact_mars_m = cfg.optim.name == "mars_m" and not cfg.optim.is_approx

        if cfg.hardware.cpu_threads:
            torch.set_num_threads(cfg.hardware.cpu_threads)
        torch.manual_seed(cfg.seed)

        # Rank 0 prepares the embedded corpus on first use while the others wait for it.
        if env.is_main:
            prepare_data(cfg.data, launch_dir)
        barrier(env)
        self.data = build_data(
            cfg.data,
            block_size=cfg.model.block_size,
            global_batch_size=trainer_cfg.global_batch_size,
            eval_iters=trainer_cfg.eval_iters,
            micro_batch_size=trainer_cfg.micro_batch_size,
            seed=cfg.seed,
            launch_dir=launch_dir,
        )

        self.raw_model = GPT(gpt_config(cfg.model)).to(self.device)
        self.optimizer = build_optimizer(cfg.optim, self.raw_model, self.device.type)

        compile_model = trainer_cfg.compile
        if compile_model is None:
            compile_model = {"on": True, "off": False, "auto": self.device.type == "cuda"}[cfg.hardware.compile]
        self.model: torch.nn.Module = torch.compile(self.raw_model) if compile_model else self.raw_model
        if env.is_distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.autocast, self.autocast_dtype = _autocast(self.device, cfg.hardware.dtype)
        self.peak_flops = peak_flops(self.device, cfg.hardware.peak_flops)
        self.flops_per_token = self.raw_model.flops_per_token()
        self.compiled = compile_model
        self.state = TrainState()
        self.metrics: MetricsWriter | None = None  # set by fit() on rank 0
        self.last_finite_loss: torch.Tensor | None = None

    # ------------------------------------------------------------------ checkpoints

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def checkpoint_state(self) -> dict[str, Any]:
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {
            "model": unwrap_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "step": self.state.step,
            "tokens": self.state.tokens,
            "best_val_loss": self.state.best_val_loss,
            "elapsed_s": self.state.elapsed_s,
            "skipped_steps": self.state.skipped_steps,
            "sampler": self.data.train.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "cuda": cuda_rng},
            "config": self.cfg_dict,
        }

    def save(self) -> None:
        if not self.env.is_main:
            return
        try:
            path = save_step_checkpoint(self.checkpoint_state(), self.checkpoint_dir, self.state.step, self.cfg.trainer.keep_checkpoints)
        except OSError as exc:
            raise CheckpointError(
                f"writing the step {self.state.step} checkpoint to {self.checkpoint_dir} failed ({exc}); "
                f"the previous checkpoint is intact, so free space and rerun the same command to resume"
            ) from exc
        log.info("saved checkpoint at step %d to %s", self.state.step, path)

    def maybe_resume(self) -> None:
        if not self.cfg.resume:
            if (self.checkpoint_dir / LATEST_NAME).exists():
                log.info("resume=false: starting from step 0; the checkpoints in %s will be replaced", self.checkpoint_dir)
            return
        found = load_newest_valid(self.checkpoint_dir, map_location=self.device)
        if found is None:
            return

        latest, checkpoint = found
        mismatches = _checkpoint_matches(checkpoint["config"], self.cfg_dict)
        if mismatches:
            raise ConfigError(
                f"{latest} was written by a different config ({'; '.join(mismatches)}); "
                "pass resume=false to start over in this directory, or choose another run directory"
            )

        self.raw_model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.data.train.load_state_dict(checkpoint["sampler"])
        torch.set_rng_state(checkpoint["rng"]["torch"].cpu())
        if checkpoint["rng"]["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(checkpoint["rng"]["cuda"].cpu(), self.device)
        self.state = TrainState(
            step=checkpoint["step"],
            tokens=checkpoint["tokens"],
            best_val_loss=checkpoint["best_val_loss"],
            elapsed_s=checkpoint["elapsed_s"],
            skipped_steps=checkpoint.get("skipped_steps", 0),
        )
        log.info("resumed from %s at step %d (%d tokens seen)", latest, self.state.step, self.state.tokens)

    # ------------------------------------------------------------------ steps

    def _micro_steps(self, step: int):
        """Yield (inputs, targets, sync) for each micro-batch of `step` on this rank."""
        for micro_step in range(self.accum_steps):
            x, y = self.data.train.micro_batch(
                step, micro_step, self.cfg.trainer.micro_batch_size, self.env.rank, self.env.world_size
            )
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), micro_step == self.accum_steps - 1

    def _accumulate_gradients(self, step: int) -> torch.Tensor:
        """Run forward/backward over the micro-batches of `step`; return the mean loss (on device)."""
        loss_sum = torch.zeros((), device=self.device)
        for x, y, sync in self._micro_steps(step):
            # DDP all-reduces only on the last micro-batch; no_sync must wrap the forward too.
            no_sync = self.model.no_sync() if self.env.is_distributed and not sync else contextlib.nullcontext()
            with no_sync:
                with self.autocast():
                    _, loss = self.model(x, y)
                (loss / self.accum_steps).backward()
            loss_sum += loss.detach()
        return loss_sum / self.accum_steps

    def _clip_gradients(self) -> torch.Tensor:
        max_norm = self.cfg.trainer.grad_clip if self.cfg.trainer.grad_clip > 0 else math.inf
        return torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm)

    def train_step(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        lr = lr_at(step, self.cfg.optim.lr, self.cfg.schedule, self.cfg.trainer.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        if self.exact_mars_m:
            # Exact MARS-M needs g_prev = the next step's batch at these weights, computed
            # before they change; the reference trainer clips it like the main gradient.
            self._accumulate_gradients(step + 1)
            self._clip_gradients()
            self.optimizer.update_previous_grad()
            self.optimizer.zero_grad(set_to_none=True)

        loss = self._accumulate_gradients(step)
        grad_norm = self._clip_gradients()

        # Checked before the update, so a NaN never reaches the weights or a checkpoint.
        # The gradient norm is the same on every rank after DDP's all-reduce; the loss is not.
        nonfinite_loss = any_rank(not bool(torch.isfinite(loss)), self.env)
        if nonfinite_loss or not bool(torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            self._handle_nonfinite(step, loss, grad_norm)
            return loss, grad_norm

        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.exact_mars_m:
            self.optimizer.update_last_grad()
        self.last_finite_loss = loss.detach()
        return loss, grad_norm

    def _handle_nonfinite(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        last = self.last_finite_loss.item() if self.last_finite_loss is not None else float("nan")
        action = self.cfg.trainer.nonfinite
        if self.metrics is not None:
            # Recorded before stopping, so a results table can show the run as diverged.
            self.metrics.write(
                "nonfinite",
                step=step + 1,
                tokens=self.state.tokens,
                train_loss=loss.item(),
                grad_norm=grad_norm.item(),
                action=action,
                elapsed_s=self.state.elapsed_s,
            )
        if action == "skip":
            self.state.skipped_steps += 1
            log.warning(
                "step %d: loss %s, gradient norm %s; skipped the update (%d skipped so far)",
                step + 1, loss.item(), grad_norm.item(), self.state.skipped_steps,
            )
            return
        latest = self.checkpoint_dir / LATEST_NAME
        if latest.exists():
            saved = f"stopped without saving, so {latest} still contains the last good state"
        else:
            saved = "stopped before the first checkpoint, so nothing was saved"
        raise NonFiniteError(
            f"step {step + 1}: loss {loss.item()}, gradient norm {grad_norm.item()} (last finite loss {last:.4f}); "
            f"{saved}. Lower optim.lr or set trainer.nonfinite=skip, then rerun"
        )

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total = torch.zeros((), device=self.device)
        count = 0
        for x, y in self.data.val.batches(self.env.rank, self.env.world_size):
            with self.autocast():
                _, loss = self.model(x.to(self.device), y.to(self.device))
            total += loss
            count += 1
        self.model.train()
        stats = torch.stack([total, torch.tensor(float(count), device=self.device)])
        all_reduce_mean(stats, self.env)
        return (stats[0] / stats[1]).item()

    # ------------------------------------------------------------------ loop

    def _log_start(self) -> None:
        cfg = self.cfg
        log.info(
            "torch %s on %s (%s autocast, compile %s), %d process(es)",
            torch.__version__,
            self.device,
            str(self.autocast_dtype).replace("torch.", ""),
            "on" if self.compiled else "off",
            self.env.world_size,
        )
        optimizer = cfg.optim.name
        if hasattr(cfg.optim, "is_approx"):
            optimizer += " (approximate)" if cfg.optim.is_approx else " (exact)"
        log.info("model %s: %.2fM parameters; optimizer %s, lr %g", cfg.model.name, self.raw_model.num_params() / 1e6, optimizer, cfg.optim.lr)
        # Batch arithmetic: global batch = micro-batch x accumulation steps x world size.
        log.info(
            "batch: %d sequences/step = %d micro x %d accumulation x %d processes; %d tokens/step",
            cfg.trainer.global_batch_size,
            cfg.trainer.micro_batch_size,
            self.accum_steps,
            self.env.world_size,
            self.tokens_per_step,
        )
        if getattr(self.optimizer, "shard_orthogonalization", False) and self.env.is_distributed:
            log.info("Newton-Schulz sharded across %d ranks, balanced by FLOPs", self.env.world_size)
        if self.exact_mars_m:
            log.info("exact MARS-M: 2 gradient evaluations per step (%d forward/backward passes per rank)", 2 * self.accum_steps)

    def _eval_and_record(self, metrics: MetricsWriter | None) -> float:
        val_loss = self.evaluate()
        improved = val_loss < self.state.best_val_loss
        if improved:
            self.state.best_val_loss = val_loss
        if self.env.is_main:
            log.info("step %d | val loss %.4f%s", self.state.step, val_loss, " (best)" if improved else "")
            metrics.write("eval", step=self.state.step, tokens=self.state.tokens, val_loss=val_loss, elapsed_s=self.state.elapsed_s)
        return val_loss

    def fit(self) -> TrainState:
        cfg = self.cfg.trainer
        self.maybe_resume()
        self._log_start()

        metrics = None
        if self.env.is_main:
            wandb_run = start_wandb(self.cfg_dict, self.cfg.logger.wandb, self.run_dir, self.run_dir.name)
            metrics = MetricsWriter(self.run_dir, wandb_run)
        self.metrics = metrics

        stop = StopRequest()
        stop.install()
        try:
            if self.state.step == 0:
                self._eval_and_record(metrics)
            self._loop(metrics, stop)
        finally:
            stop.restore()
            if metrics is not None:
                metrics.close()
                plot_losses(metrics.path, self.run_dir / "loss.png", title=f"{self.cfg.model.name} / {self.cfg.optim.name}")
        return self.state

    def _loop(self, metrics: MetricsWriter | None, stop: StopRequest) -> None:
        cfg = self.cfg.trainer
        interval_start = time.perf_counter()
        interval_steps = 0

        while self.state.step < cfg.max_steps:
            step_start = time.perf_counter()
            loss, grad_norm = self.train_step(self.state.step)
            self.state.step += 1
            self.state.tokens += self.tokens_per_step
            self.state.elapsed_s += time.perf_counter() - step_start
            interval_steps += 1
            step = self.state.step

            if step % cfg.log_interval == 0 or step == cfg.max_steps:
                loss_value = all_reduce_mean(loss, self.env).item()
                interval_s = time.perf_counter() - interval_start
                self._log_train(metrics, loss_value, grad_norm.item(), interval_steps, interval_s)
                interval_start = time.perf_counter()
                interval_steps = 0

            evaluated = step % cfg.eval_interval == 0 or step == cfg.max_steps
            if evaluated:
                eval_start = time.perf_counter()
                val_loss = self._eval_and_record(metrics)
                interval_start += time.perf_counter() - eval_start  # keep evaluation out of tokens/s

            # Every rank stops at the same step, even if the signal reached only some of them.
            stopping = any_rank(stop.requested, self.env)
            if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps or stopping or evaluated:
                self.save()
                if evaluated and self.env.is_main and val_loss <= self.state.best_val_loss:
                    copy_checkpoint(self.checkpoint_dir / LATEST_NAME, self.checkpoint_dir / BEST_NAME)

            if stopping:
                barrier(self.env)
                log.warning(
                    "%s received: stopped at step %d after saving a checkpoint; rerun the same command to resume",
                    stop.signal_name or "stop signal on another rank",
                    step,
                )
                stop.finish()

    def _log_train(self, metrics: MetricsWriter | None, loss: float, grad_norm: float, steps: int, seconds: float) -> None:
        if not self.env.is_main:
            return
        lr = self.optimizer.param_groups[0]["lr"]
        tokens_per_s = steps * self.tokens_per_step / seconds
        ms_per_step = 1000 * seconds / steps
        mfu = None
        if self.peak_flops:
            passes = 2 if self.exact_mars_m else 1
            mfu = tokens_per_s * passes * self.flops_per_token / (self.peak_flops * self.env.world_size)
        elapsed = time.strftime("%H:%M:%S", time.gmtime(self.state.elapsed_s))
        log.info(
            "step %d/%d | loss %.4f | lr %.3e | grad norm %.3f | %s tok/s | %.1f ms/step%s | elapsed %s",
            self.state.step,
            self.cfg.trainer.max_steps,
            loss,
            lr,
            grad_norm,
            f"{tokens_per_s:,.0f}",
            ms_per_step,
            f" | MFU {100 * mfu:.1f}%" if mfu is not None else "",
            elapsed,
        )
        metrics.write(
            "train",
            step=self.state.step,
            tokens=self.state.tokens,
            train_loss=loss,
            lr=lr,
            grad_norm=grad_norm,
            tokens_per_s=tokens_per_s,
            ms_per_step=ms_per_step,
            mfu=mfu,
            elapsed_s=self.state.elapsed_s,
        )


def run_training(cfg: Config, run_dir: Path, launch_dir: Path) -> TrainState:
    """Train the configured model in `run_dir`; the entry point that every launcher calls."""
    env = init_distributed(cfg.hardware.device)
    try:
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg), resolve=True))
        trainer = Trainer(cfg, run_dir, launch_dir, env)
        state = trainer.fit()
        # Rank 0 still closes metrics and draws the plot; tearing gloo down under it can
        # abort the process, so the ranks leave together.
        barrier(env)
        return state
    finally:
        shutdown_distributed()
