"""MARS-M and Moonlight against updates computed by hand in float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mars_m_exp import GPT, GPTConfig, MARS_M, Moonlight, split_params

NS_ABC = (3.4445, -4.7750, 2.0315)


def reference_newton_schulz(matrix: np.ndarray, steps: int = 5) -> np.ndarray:
    """Newton-Schulz in numpy float64, written out from its definition."""
    a, b, c = NS_ABC
    x = matrix.T if matrix.shape[0] > matrix.shape[1] else matrix
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if matrix.shape[0] > matrix.shape[1] else x


def make_matrix_param(rows: int = 5, cols: int = 3, seed: int = 0) -> torch.nn.Parameter:
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(rows, cols, generator=generator, dtype=torch.float64))


def gradients(count: int, shape: tuple[int, int], scale: float, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(*shape, generator=generator, dtype=torch.float64) for _ in range(count)]


def run_steps(optimizer, param, grads):
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("clip_c", [True, False])
def test_mars_m_approx_matches_hand_update(clip_c):
    param = make_matrix_param()
    x = param.detach().numpy().copy()
    lr, wd, beta, gamma = 0.02, 0.1, 0.9, 0.5
    # Gradient norms around 3 make the clip act whenever it is on.
    grads = gradients(3, (5, 3), scale=1.0)
    optimizer = MARS_M(lr=lr, wd=wd, muon_params=[param], momentum=beta, gamma=gamma, clip_c=clip_c, ns_dtype=torch.float64)

    run_steps(optimizer, param, grads)

    m = np.zeros_like(x)
    g_prev = np.zeros_like(x)
    for grad in grads:
        g = grad.numpy()
        c = g + gamma * beta / (1 - beta) * (g - g_prev)
        if clip_c:
            c = c / max(1.0, np.linalg.norm(c))
        m = beta * m + (1 - beta) * c
        x = x - lr * (0.2 * math.sqrt(5) * reference_newton_schulz(m) + wd * x)
        g_prev = g
    np.testing.assert_allclose(param.detach().numpy(), x, rtol=1e-10, atol=1e-12)


def test_mars_m_clip_bounds_c_norm():
    param = make_matrix_param()
    beta = 0.95
    grad = 100.0 * torch.ones(5, 3, dtype=torch.float64)
    optimizer = MARS_M(lr=0.01, wd=0.0, muon_params=[param], momentum=beta, ns_dtype=torch.float64)

    param.grad = grad
    optimizer.step()

    buffer = optimizer.state[param]["momentum_buffer"]
    # After one step m = (1 - beta) * c / ||c||, so its norm is exactly 1 - beta.
    assert torch.linalg.norm(buffer).item() == pytest.approx(1 - beta, rel=1e-12)


def test_mars_m_exact_uses_previous_weights_gradient():
    param = make_matrix_param()
    x = param.detach().numpy().copy()
    lr, wd, beta, gamma = 0.05, 0.0, 0.9, 1.0
    main_grads = gradients(2, (5, 3), scale=0.1, seed=3)
    # The gradient of step t's batch at the previous weights; the first step has none.
    extra_grads = gradients(2, (5, 3), scale=0.1, seed=4)
    optimizer = MARS_M(lr=lr, wd=wd, muon_params=[param], momentum=beta, gamma=gamma, is_approx=False, ns_dtype=torch.float64)

    for main, extra in zip(main_grads, extra_grads):
        param.grad = extra.clone()
        optimizer.update_previous_grad()
        optimizer.zero_grad(set_to_none=True)
        param.grad = main.clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        optimizer.update_last_grad()

    m = np.zeros_like(x)
    g_prev = np.zeros_like(x)
    for main, extra in zip(main_grads, extra_grads):
        g = main.numpy()
        c = g + gamma * beta / (1 - beta) * (g - g_prev)
        c = c / max(1.0, np.linalg.norm(c))
        m = beta * m + (1 - beta) * c
        x = x - lr * 0.2 * math.sqrt(5) * reference_newton_schulz(m)
        g_prev = extra.numpy()
    np.testing.assert_allclose(param.detach().numpy(), x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("nesterov", [True, False])
def test_moonlight_matches_hand_update(nesterov):
    param = make_matrix_param(3, 6)
    x = param.detach().numpy().copy()
    lr, wd, mu = 0.03, 0.1, 0.95
    grads = gradients(3, (3, 6), scale=1.0, seed=5)
    optimizer = Moonlight(lr=lr, wd=wd, muon_params=[param], momentum=mu, nesterov=nesterov, ns_dtype=torch.float64)

    run_steps(optimizer, param, grads)

    buf = np.zeros_like(x)
    for grad in grads:
        g = grad.numpy()
        buf = mu * buf + g
        direction = g + mu * buf if nesterov else buf
        x = x - lr * (0.2 * math.sqrt(6) * reference_newton_schulz(direction) + wd * x)
    np.testing.assert_allclose(param.detach().numpy(), x, rtol=1e-10, atol=1e-12)


def test_adamw_side_matches_hand_update():
    vector = torch.nn.Parameter(torch.linspace(-1, 1, 7, dtype=torch.float64))
    x = vector.detach().numpy().copy()
    lr, wd, beta1, beta2, eps = 0.01, 0.1, 0.9, 0.95, 1e-8
    grads = [torch.linspace(0.5, -0.3, 7, dtype=torch.float64) * (k + 1) for k in range(3)]
    optimizer = MARS_M(lr=lr, wd=wd, muon_params=[], adamw_params=[vector], adamw_betas=(beta1, beta2), adamw_eps=eps)

    run_steps(optimizer, vector, grads)

    m = np.zeros_like(x)
    v = np.zeros_like(x)
    for step, grad in enumerate(grads, start=1):
        g = grad.numpy()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        x = x * (1 - lr * wd)
        x = x - lr * math.sqrt(1 - beta2**step) / (1 - beta1**step) * m / (np.sqrt(v) + eps)
    np.testing.assert_allclose(vector.detach().numpy(), x, rtol=1e-10, atol=1e-12)


def test_split_params_puts_tied_weight_once():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64))
    split = split_params(model)

    all_ids = [id(p) for p in split.matrix_params + split.adamw_params]
    assert len(all_ids) == len(set(all_ids))
    assert len(all_ids) == len(list(model.parameters()))
    assert id(model.lm_head.weight) in {id(p) for p in split.adamw_params}
    assert "transformer.wte.weight" in split.adamw_names
    assert "transformer.wpe.weight" in split.adamw_names
    assert all(p.ndim == 2 for p in split.matrix_params)
    assert len(split.matrix_params) == 2 * 4  # c_attn, attn c_proj, c_fc, mlp c_proj per layer
    assert all(p.ndim == 1 for name, p in zip(split.adamw_names, split.adamw_params) if "ln" in name)


def test_matrix_side_rejects_vector_with_its_shape():
    with pytest.raises(ValueError, match=r"shape \(7,\)"):
        MARS_M(muon_params=[torch.nn.Parameter(torch.zeros(7))])


def test_param_in_both_sides_rejected():
    param = make_matrix_param()
    with pytest.raises(ValueError, match="both muon_params and adamw_params"):
        Moonlight(muon_params=[param], adamw_params=[param])
