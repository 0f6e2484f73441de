"""Newton-Schulz: batched against one matrix at a time, the dtype and compile settings."""

from __future__ import annotations

import logging

import pytest
import torch

from mars_m_exp.optim import MARS_M, Moonlight, newton_schulz5, orthogonalize_many
from mars_m_exp.optim import newton_schulz, orthogonalized


def random_tensor(*shape: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator, dtype=dtype)


def textbook_newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic iteration on one matrix, written as Keller Jordan's Muon writes it."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.T if G.shape[0] > G.shape[1] else G
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if G.shape[0] > G.shape[1] else X


@pytest.mark.parametrize("shape", [(5, 9), (9, 5), (7, 7)])
def test_newton_schulz_matches_textbook_iteration(shape):
    G = random_tensor(*shape, seed=0)

    result = newton_schulz5(G, dtype=torch.float64)

    torch.testing.assert_close(result, textbook_newton_schulz(G), rtol=1e-12, atol=1e-14)


def test_newton_schulz_batch_equals_each_matrix():
    batch = random_tensor(2, 3, 6, 4, seed=1)  # two batch dimensions, tall matrices

    result = newton_schulz5(batch, dtype=torch.float64)

    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(result[i, j], textbook_newton_schulz(batch[i, j]), rtol=1e-12, atol=1e-14)


def test_newton_schulz_leaves_input_unchanged():
    G = random_tensor(4, 6, seed=2)
    before = G.clone()

    newton_schulz5(G, dtype=torch.float64)

    assert torch.equal(G, before)


def test_newton_schulz_returns_input_dtype():
    G = random_tensor(4, 6, seed=3, dtype=torch.float32)

    assert newton_schulz5(G, dtype=torch.float64).dtype == torch.float32


def test_orthogonalize_many_keeps_order_and_dtype():
    matrices = [random_tensor(4, 6, seed=4), random_tensor(3, 3, seed=5, dtype=torch.float32), random_tensor(4, 6, seed=6)]

    results = orthogonalize_many(matrices, dtype=torch.float64)

    for matrix, result in zip(matrices, results):
        assert result.dtype == matrix.dtype
        torch.testing.assert_close(result, textbook_newton_schulz(matrix.double()).to(matrix.dtype), rtol=1e-6, atol=1e-9)


def count_newton_schulz_calls(monkeypatch, module) -> list[tuple[int, ...]]:
    """Replace `module.run_newton_schulz` with a wrapper; return the list of input shapes it records."""
    shapes: list[tuple[int, ...]] = []
    original = newton_schulz.run_newton_schulz

    def recording(G, steps, dtype, compile=False):
        shapes.append(tuple(G.shape))
        return original(G, steps, dtype, compile)

    monkeypatch.setattr(module, "run_newton_schulz", recording)
    return shapes


def test_orthogonalize_many_batches_each_shape_once(monkeypatch):
    calls = count_newton_schulz_calls(monkeypatch, newton_schulz)
    matrices = [random_tensor(4, 6, seed=k) for k in range(3)] + [random_tensor(6, 4, seed=9)]

    orthogonalize_many(matrices, dtype=torch.float64)

    assert sorted(calls) == [(1, 6, 4), (3, 4, 6)]


@pytest.mark.parametrize("optimizer_class", [MARS_M, Moonlight])
def test_step_runs_one_batched_call_per_shape(monkeypatch, optimizer_class):
    calls = count_newton_schulz_calls(monkeypatch, orthogonalized)
    # Two blocks of GPT-2's four matrix shapes, scaled down; the conv weight is viewed as 8 x 36.
    shapes = [(24, 8), (8, 8), (32, 8), (8, 32)] * 2 + [(8, 4, 3, 3)]
    params = [torch.nn.Parameter(random_tensor(*shape, seed=k, dtype=torch.float32)) for k, shape in enumerate(shapes)]
    optimizer = optimizer_class(muon_params=params)
    for p in params:
        p.grad = torch.ones_like(p)

    optimizer.step()

    assert sorted(calls) == [(1, 8, 36), (2, 8, 8), (2, 8, 32), (2, 24, 8), (2, 32, 8)]


def test_batched_step_equals_one_optimizer_per_matrix():
    shapes = [(6, 4), (6, 4), (6, 4), (4, 6)]
    params = [torch.nn.Parameter(random_tensor(*shape, seed=k)) for k, shape in enumerate(shapes)]
    singles = [torch.nn.Parameter(p.detach().clone()) for p in params]
    batched = MARS_M(muon_params=params, ns_dtype=torch.float64)
    separate = [MARS_M(muon_params=[p], ns_dtype=torch.float64) for p in singles]

    for step in range(3):
        for k, (p, q) in enumerate(zip(params, singles)):
            p.grad = random_tensor(*p.shape, seed=100 * step + k)
            q.grad = p.grad.clone()
        batched.step()
        for optimizer in separate:
            optimizer.step()

    for p, q in zip(params, singles):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------ dtype and compile settings


def test_default_settings_float32_eager_on_cpu(monkeypatch):
    monkeypatch.delenv(newton_schulz.COMPILE_ENV_VAR, raising=False)
    optimizer = MARS_M(muon_params=[torch.nn.Parameter(torch.zeros(4, 4))])

    assert optimizer._newton_schulz_settings(torch.device("cpu")) == (torch.float32, False)


def test_default_settings_bfloat16_compiled_on_cuda(monkeypatch):
    # Only the device type is read, so no GPU is needed to check the choice.
    monkeypatch.delenv(newton_schulz.COMPILE_ENV_VAR, raising=False)
    optimizer = MARS_M(muon_params=[torch.nn.Parameter(torch.zeros(4, 4))])

    assert optimizer._newton_schulz_settings(torch.device("cuda")) == (torch.bfloat16, True)


@pytest.mark.parametrize("value, expected", [("0", False), ("1", True), ("", None)])
def test_compile_env_var_parsed(monkeypatch, value, expected):
    monkeypatch.setenv(newton_schulz.COMPILE_ENV_VAR, value)

    assert newton_schulz.compile_enabled_by_env() is expected


def test_compile_env_var_invalid_rejected(monkeypatch):
    monkeypatch.setenv(newton_schulz.COMPILE_ENV_VAR, "yes")

    with pytest.raises(ValueError, match="MARS_M_EXP_COMPILE_NS must be 0 or 1, got 'yes'"):
        newton_schulz.compile_enabled_by_env()


def test_compile_env_var_turns_compile_off_on_cuda(monkeypatch):
    monkeypatch.setenv(newton_schulz.COMPILE_ENV_VAR, "0")
    optimizer = MARS_M(muon_params=[torch.nn.Parameter(torch.zeros(4, 4))])

    assert optimizer._newton_schulz_settings(torch.device("cuda")) == (torch.bfloat16, False)


def test_constructor_flag_overrides_env_var(monkeypatch):
    monkeypatch.setenv(newton_schulz.COMPILE_ENV_VAR, "0")
    optimizer = MARS_M(muon_params=[torch.nn.Parameter(torch.zeros(4, 4))], compile_ns=True)

    assert optimizer._newton_schulz_settings(torch.device("cpu")) == (torch.float32, True)


@pytest.fixture
def fresh_compile_state(monkeypatch):
    """Start without a compiled function or a recorded failure; restore both afterwards."""
    monkeypatch.setattr(newton_schulz, "_compiled_newton_schulz", None)
    monkeypatch.setattr(newton_schulz, "_compile_failed", False)


def test_compiled_path_used_when_requested(monkeypatch, fresh_compile_state):
    compiled_with = []
    real_compile = torch.compile

    def eager_backend_compile(function, **kwargs):
        # The eager backend traces with dynamo but generates no code, so it costs no C++ build.
        compiled_with.append(kwargs)
        return real_compile(function, backend="eager", **kwargs)

    monkeypatch.setattr(newton_schulz.torch, "compile", eager_backend_compile)
    torch._dynamo.reset()
    G = random_tensor(3, 5, 4, seed=7, dtype=torch.float32)

    result = newton_schulz.run_newton_schulz(G, 5, torch.float32, compile=True)
    torch._dynamo.reset()

    assert compiled_with == [{"dynamic": False, "fullgraph": True}]
    torch.testing.assert_close(result, newton_schulz5(G, dtype=torch.float32))


def test_failed_compile_falls_back_to_eager(monkeypatch, fresh_compile_state, caplog):
    def broken_compile(function, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler")

        return compiled

    monkeypatch.setattr(newton_schulz.torch, "compile", broken_compile)
    G = random_tensor(3, 5, 4, seed=8, dtype=torch.float32)

    with caplog.at_level(logging.WARNING, logger=newton_schulz.__name__):
        first = newton_schulz.run_newton_schulz(G, 5, torch.float32, compile=True)
        second = newton_schulz.run_newton_schulz(G, 5, torch.float32, compile=True)

    expected = newton_schulz5(G, dtype=torch.float32)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)
    assert len(caplog.records) == 1
    assert "no C++ compiler" in caplog.records[0].getMessage()


@pytest.mark.slow
def test_inductor_compiled_newton_schulz_matches_eager(fresh_compile_state):
    # A real C++ build: about 40 s on a 2-core CPU with a cold inductor cache.
    torch._dynamo.reset()
    G = random_tensor(2, 6, 4, seed=9, dtype=torch.float32)

    result = newton_schulz.run_newton_schulz(G, 5, torch.float32, compile=True)
    torch._dynamo.reset()

    assert not newton_schulz._compile_failed
    torch.testing.assert_close(result, newton_schulz5(G, dtype=torch.float32), rtol=1e-5, atol=1e-6)
