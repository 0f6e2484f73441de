"""Learning-rate schedules."""

from __future__ import annotations

import pytest

from mars_m_exp.config import ConstantScheduleConfig, CosineScheduleConfig, ExpScheduleConfig, WSDScheduleConfig
from mars_m_exp.schedule import lr_at

LR = 1e-2


def test_warmup_is_linear_from_zero():
    cfg = CosineScheduleConfig(name="cosine", warmup_steps=10, min_lr=1e-4)
    assert lr_at(0, LR, cfg, 100) == 0.0
    assert lr_at(5, LR, cfg, 100) == pytest.approx(LR / 2)
    assert lr_at(10, LR, cfg, 100) == pytest.approx(LR)


def test_cosine_reaches_min_lr_at_end():
    cfg = CosineScheduleConfig(name="cosine", warmup_steps=10, min_lr=1e-4)
    assert lr_at(55, LR, cfg, 100) == pytest.approx((LR + 1e-4) / 2)
    assert lr_at(100, LR, cfg, 100) == pytest.approx(1e-4)
    assert lr_at(150, LR, cfg, 100) == pytest.approx(1e-4)


def test_wsd_stable_then_linear_decay():
    cfg = WSDScheduleConfig(name="wsd", warmup_steps=10, min_lr=0.0, decay_fraction=0.2)
    assert lr_at(50, LR, cfg, 100) == pytest.approx(LR)
    assert lr_at(80, LR, cfg, 100) == pytest.approx(LR)
    assert lr_at(90, LR, cfg, 100) == pytest.approx(LR / 2)
    assert lr_at(100, LR, cfg, 100) == pytest.approx(0.0)


def test_exp_decays_and_floors_at_min_lr():
    cfg = ExpScheduleConfig(name="exp", warmup_steps=0, min_lr=1e-3, decay_rate=0.5, decay_every=10)
    assert lr_at(10, LR, cfg, 100) == pytest.approx(LR / 2)
    assert lr_at(20, LR, cfg, 100) == pytest.approx(LR / 4)
    assert lr_at(90, LR, cfg, 100) == pytest.approx(1e-3)


def test_constant_after_warmup():
    cfg = ConstantScheduleConfig(name="constant", warmup_steps=4, min_lr=0.0)
    assert lr_at(2, LR, cfg, 100) == pytest.approx(LR / 2)
    assert lr_at(99, LR, cfg, 100) == pytest.approx(LR)
