"""Config composition and validation: every option composes, bad values fail with one clear line."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from conftest import CONF_DIR, REPO_ROOT, compose_config
from mars_m_exp.config import (
    AdamWConfig,
    ConfigError,
    MarsMConfig,
    MoonlightConfig,
    grad_accum_steps,
    resolve_config,
)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("model", options("model"))
@pytest.mark.parametrize("optim", options("optim"))
def test_model_and_optim_options_compose(model, optim):
    cfg = resolve_config(compose_config([f"+model={model}", f"+optim={optim}"]))
    assert cfg.model.name == model
    assert cfg.optim.name == {"mars_m_exact": "mars_m"}.get(optim, optim)


@pytest.mark.parametrize("group", ["data", "schedule", "hardware"])
def test_defaulted_group_options_compose(group):
    for option in options(group):
        cfg = resolve_config(compose_config(["+model=tiny", "+optim=mars_m", f"{group}={option}"]))
        assert getattr(cfg, group).name == option


@pytest.mark.parametrize("experiment", options("experiment"))
def test_experiment_presets_compose(experiment):
    # A comparison preset (<family>_<optimizer>) chooses its model and optimizer itself.
    text = (CONF_DIR / "experiment" / f"{experiment}.yaml").read_text()
    chosen = "/optim:" in text
    overrides = [] if chosen else ["+model=tiny", "+optim=mars_m"]
    cfg = resolve_config(compose_config([*overrides, f"+experiment={experiment}"]))
    assert cfg.trainer.max_steps > 0
    assert cfg.model.name and cfg.optim.name


def test_optim_schemas_are_typed_per_optimizer():
    mars_m = resolve_config(compose_config(["+model=tiny", "+optim=mars_m"])).optim
    exact = resolve_config(compose_config(["+model=tiny", "+optim=mars_m_exact"])).optim
    moonlight = resolve_config(compose_config(["+model=tiny", "+optim=moonlight"])).optim
    adamw = resolve_config(compose_config(["+model=tiny", "+optim=adamw"])).optim

    assert isinstance(mars_m, MarsMConfig)
    assert mars_m.is_approx is True
    assert mars_m.clip_c is True
    assert mars_m.momentum == 0.95
    assert mars_m.gamma == 0.025
    assert exact.is_approx is False
    assert isinstance(moonlight, MoonlightConfig)
    assert moonlight.nesterov is True
    assert isinstance(adamw, AdamWConfig)
    assert list(adamw.betas) == [0.9, 0.95]


def test_weight_decay_overrides_to_released_value():
    cfg = resolve_config(compose_config(["+model=tiny", "+optim=mars_m", "optim.weight_decay=0.01"]))
    assert cfg.optim.weight_decay == 0.01


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_stesp=10", "max_stesp"),
        ("optim.gamma=0.1", "gamma"),
        ("trainer.max_steps=ten", "max_steps"),
    ],
)
def test_unknown_key_or_wrong_type_fails_composition(override, message):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config(["+model=tiny", "+optim=adamw", override])
    assert message in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=-0.001", "optim.lr must be positive, got -0.001"),
        ("model.n_head=5", "model.n_embd=128 is not divisible by model.n_head=5"),
        ("optim.momentum=1.0", "optim.momentum must be in [0, 1), got 1.0"),
        ("optim.gamma=-1", "optim.gamma must be >= 0, got -1.0"),
        ("trainer.micro_batch_size=7", "trainer.global_batch_size=480 is not a multiple of trainer.micro_batch_size=7"),
        ("hardware.device=tpu", "hardware.device must be auto, cpu or cuda, got 'tpu'"),
        ("trainer.eval_iters=0", "trainer.eval_iters must be positive, got 0"),
    ],
)
def test_impossible_value_raises_config_error(override, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(compose_config(["+model=tiny", "+optim=mars_m", override]))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_long_warmup_only_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="mars_m_exp.config"):
        cfg = resolve_config(compose_config(["+model=tiny", "+optim=mars_m", "trainer.max_steps=100"]))
    assert cfg.schedule.warmup_steps == 2000
    assert "schedule.warmup_steps=2000 is longer than trainer.max_steps=100" in caplog.text


def test_grad_accum_steps_derived_from_world_size():
    assert grad_accum_steps(480, 15, 8) == 4
    assert grad_accum_steps(480, 5, 8) == 12
    assert grad_accum_steps(16, 2, 1) == 8


def test_grad_accum_steps_rejects_indivisible_product():
    with pytest.raises(ConfigError, match=r"480 is not divisible by trainer.micro_batch_size=15 x world_size=6 = 90"):
        grad_accum_steps(480, 15, 6)


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mars_m_exp", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("given, missing", [("+optim=mars_m", "model"), ("+model=tiny", "optim")])
def test_cli_missing_group_lists_choices(tmp_path, given, missing):
    result = run_cli(given, cwd=tmp_path)
    assert result.returncode == 2
    expected = ", ".join(options(missing))
    assert f"no {missing} chosen: add +{missing}=<name> to the command, one of: {expected}" in result.stdout + result.stderr


def test_cli_invalid_value_exits_before_training(tmp_path):
    result = run_cli("+model=tiny", "+optim=mars_m", "optim.lr=-1", cwd=tmp_path)
    assert result.returncode == 2
    assert "optim.lr must be positive, got -1.0" in result.stdout + result.stderr
    assert not list(tmp_path.rglob("metrics.jsonl"))


def test_conf_dir_is_repository_conf():
    from mars_m_exp.__main__ import CONF_DIR as cli_conf_dir

    assert cli_conf_dir == REPO_ROOT / "conf"
