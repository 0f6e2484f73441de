"""Optimizer state_dict round trips: every buffer, other dtypes and devices, same trajectory."""

from __future__ import annotations

import io

import pytest
import torch

from mars_m_exp.optim import MARS_M, Moonlight

CONFIGS = {
    "mars_m_one_buffer": (MARS_M, dict(clip_c=False, is_approx=True)),
    "mars_m_clip": (MARS_M, dict(clip_c=True, is_approx=True)),
    "mars_m_exact": (MARS_M, dict(clip_c=True, is_approx=False)),
    "moonlight": (Moonlight, {}),
}
# State keys each configuration keeps between steps, for a matrix and for an AdamW tensor.
MATRIX_KEYS = {
    "mars_m_one_buffer": ["exp_avg"],
    "mars_m_clip": ["last_grad", "momentum_buffer"],
    "mars_m_exact": ["last_grad", "momentum_buffer"],
    "moonlight": ["momentum_buffer"],
}
ADAMW_KEYS = ["exp_avg", "exp_avg_sq", "step"]


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.linear = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv(x)).mean(dim=(2, 3))  # (batch, 4)
        return self.linear(torch.cat([hidden, hidden**2], dim=1))


def make_model(dtype=torch.float32) -> Tiny:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return Tiny().to(dtype)


def make_optimizer(name: str, model: Tiny):
    optimizer_class, kwargs = CONFIGS[name]
    matrices = [model.conv.weight, model.linear.weight]
    vectors = [model.conv.bias, model.linear.bias]
    return optimizer_class(lr=0.05, muon_params=matrices, adamw_params=vectors, **kwargs)


def batch(index: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(index)
    return torch.randn(4, 2, 5, 5, generator=generator).to(dtype), torch.randn(4, 3, generator=generator).to(dtype)


def backward(model: Tiny, index: int) -> None:
    dtype = next(model.parameters()).dtype
    x, y = batch(index, dtype)
    torch.nn.functional.mse_loss(model(x), y).backward()


def train(model: Tiny, optimizer, steps: range) -> None:
    """Train in the trainer's call order; the exact form evaluates the next batch first."""
    exact = isinstance(optimizer, MARS_M) and not optimizer.param_groups[0]["is_approx"]
    for step in steps:
        if exact:
            backward(model, step + 1)
            optimizer.update_previous_grad()
            optimizer.zero_grad(set_to_none=True)
        backward(model, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if exact:
            optimizer.update_last_grad()


def save_and_load(state: dict) -> dict:
    """Serialize as the trainer's checkpoints do, and load without executing code."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_round_trips_every_buffer(name):
    model = make_model()
    optimizer = make_optimizer(name, model)
    train(model, optimizer, range(3))

    restored_model = make_model()
    restored_model.load_state_dict(model.state_dict())
    restored = make_optimizer(name, restored_model)
    restored.load_state_dict(save_and_load(optimizer.state_dict()))

    for p, q in zip(model.parameters(), restored_model.parameters()):
        state, restored_state = optimizer.state[p], restored.state[q]
        expected_keys = MATRIX_KEYS[name] if p.ndim >= 2 else ADAMW_KEYS
        assert sorted(state) == expected_keys
        assert sorted(restored_state) == expected_keys
        for key in expected_keys:
            if key == "step":
                assert restored_state[key] == state[key] == 3
            else:
                assert torch.equal(restored_state[key], state[key]), key


def test_exact_form_round_trips_pending_previous_grad():
    model = make_model()
    optimizer = make_optimizer("mars_m_exact", model)
    train(model, optimizer, range(2))
    # A checkpoint taken between update_previous_grad and step contains the next g_prev too.
    backward(model, 3)
    optimizer.update_previous_grad()

    restored_model = make_model()
    restored = make_optimizer("mars_m_exact", restored_model)
    restored.load_state_dict(save_and_load(optimizer.state_dict()))

    pending = optimizer.state[model.conv.weight]["previous_grad"]
    assert torch.equal(restored.state[restored_model.conv.weight]["previous_grad"], pending)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_resumed_trajectory_equals_uninterrupted(name):
    uninterrupted = make_model()
    uninterrupted_optimizer = make_optimizer(name, uninterrupted)
    train(uninterrupted, uninterrupted_optimizer, range(6))

    first_half = make_model()
    first_optimizer = make_optimizer(name, first_half)
    train(first_half, first_optimizer, range(3))
    resumed = make_model()
    resumed.load_state_dict(save_and_load(first_half.state_dict()))
    resumed_optimizer = make_optimizer(name, resumed)
    resumed_optimizer.load_state_dict(save_and_load(first_optimizer.state_dict()))
    train(resumed, resumed_optimizer, range(3, 6))

    for (param_name, p), q in zip(uninterrupted.named_parameters(), resumed.parameters()):
        assert torch.equal(q, p), param_name


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_loads_into_float64_model(name):
    model = make_model()
    optimizer = make_optimizer(name, model)
    train(model, optimizer, range(2))

    wide_model = make_model(torch.float64)
    wide = make_optimizer(name, wide_model)
    wide.load_state_dict(save_and_load(optimizer.state_dict()))

    for p, q in zip(model.parameters(), wide_model.parameters()):
        for key, value in optimizer.state[p].items():
            loaded = wide.state[q][key]
            if key == "step":
                assert loaded == value
                continue
            assert loaded.dtype == torch.float64, key
            assert torch.equal(loaded, value.double()), key
    # The loaded state keeps training in float64.
    train(wide_model, wide, range(2, 4))
    assert all(torch.isfinite(p).all() for p in wide_model.parameters())


@pytest.mark.parametrize("device", ["meta"] + (["cuda"] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_state_dict_moves_to_params_device(name, device):
    model = make_model()
    optimizer = make_optimizer(name, model)
    train(model, optimizer, range(2))

    moved_model = make_model().to(device)
    moved = make_optimizer(name, moved_model)
    moved.load_state_dict(save_and_load(optimizer.state_dict()))

    for p in moved_model.parameters():
        for key, value in moved.state[p].items():
            if key != "step":
                assert value.device.type == device, key
    if device == "cuda":
        for p, q in zip(model.parameters(), moved_model.parameters()):
            for key, value in optimizer.state[p].items():
                if key != "step":
                    assert torch.equal(moved.state[q][key].cpu(), value), key
