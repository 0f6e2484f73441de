"""Optimizer state size per matrix: MARS-M without the clip keeps what Muon keeps, and no more."""

from __future__ import annotations

import pytest
import torch

from mars_m_exp.optim import MARS_M, Moonlight, state_bytes_per_param_byte

SHAPES = [(24, 8), (8, 8), (32, 8), (8, 32)]  # GPT-2's four block matrices, scaled down


def make_matrices() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]


def set_grads(params, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)


def run_steps(optimizer, params, steps: int = 3) -> None:
    exact = isinstance(optimizer, MARS_M) and not optimizer.param_groups[0]["is_approx"]
    for step in range(steps):
        if exact:
            set_grads(params, 1000 + step)
            optimizer.update_previous_grad()
            optimizer.zero_grad(set_to_none=True)
        set_grads(params, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if exact:
            optimizer.update_last_grad()


def torch_muon_state_ratio() -> float:
    params = make_matrices()
    muon = torch.optim.Muon(params, adjust_lr_fn="match_rms_adamw")
    run_steps(muon, params)
    return state_bytes_per_param_byte(muon, params)


@pytest.mark.parametrize(
    "name, make_optimizer, expected_ratio",
    [
        ("mars_m_one_buffer", lambda p: MARS_M(muon_params=p, clip_c=False), 1.0),
        ("mars_m_clip", lambda p: MARS_M(muon_params=p, clip_c=True), 2.0),
        ("mars_m_exact_no_clip", lambda p: MARS_M(muon_params=p, clip_c=False, is_approx=False), 2.0),
        ("mars_m_exact", lambda p: MARS_M(muon_params=p, clip_c=True, is_approx=False), 2.0),
        ("moonlight", lambda p: Moonlight(muon_params=p), 1.0),
    ],
)
def test_state_size_between_steps(name, make_optimizer, expected_ratio):
    params = make_matrices()
    optimizer = make_optimizer(params)

    run_steps(optimizer, params)

    assert state_bytes_per_param_byte(optimizer, params) == expected_ratio


def test_one_buffer_state_equals_torch_muon():
    params = make_matrices()
    optimizer = MARS_M(muon_params=params, clip_c=False)

    run_steps(optimizer, params)

    assert state_bytes_per_param_byte(optimizer, params) == torch_muon_state_ratio()


def test_exact_form_third_buffer_freed_after_step():
    params = make_matrices()
    optimizer = MARS_M(muon_params=params, is_approx=False)
    run_steps(optimizer, params)

    set_grads(params, 99)
    optimizer.update_previous_grad()
    during_step = state_bytes_per_param_byte(optimizer, params)
    optimizer.step()
    optimizer.update_last_grad()
    after_step = state_bytes_per_param_byte(optimizer, params)

    assert during_step == 3.0
    assert after_step == 2.0
