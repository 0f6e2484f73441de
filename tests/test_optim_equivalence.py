"""Each optimizer equals its definition: torch.optim.Muon, the two-buffer MARS-M, a hand example."""

from __future__ import annotations

import math

import pytest
import torch
import torch.optim._muon

from mars_m_exp.optim import MARS_M, Moonlight, newton_schulz5
from mars_m_exp.optim import orthogonalized

SHAPES = [(6, 10), (12, 4), (6, 10)]  # two of one shape, so the batched path runs too


def random_tensor(*shape: int, seed: int, scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=generator, dtype=dtype)


def make_params(dtype=torch.float64) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(random_tensor(*shape, seed=k, dtype=dtype)) for k, shape in enumerate(SHAPES)]


def clone_params(params) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def gradient_sequence(steps: int, scale: float, dtype=torch.float64) -> list[list[torch.Tensor]]:
    return [[random_tensor(*shape, seed=100 * t + k, scale=scale, dtype=dtype) for k, shape in enumerate(SHAPES)] for t in range(steps)]


def run(optimizer, params, grad_steps) -> None:
    for grads in grad_steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def float64_torch_newton_schulz(grad, ns_coefficients, ns_steps, eps):
    """Stand-in for torch.optim.Muon's bfloat16 Newton-Schulz: this project's, in float64."""
    return newton_schulz5(grad, ns_steps, torch.float64)


def max_relative_difference(params, reference_params, starts) -> float:
    """Largest difference of the two updates, relative to the largest update entry."""
    worst = 0.0
    for p, q, start in zip(params, reference_params, starts):
        update = q.detach() - start
        difference = (p.detach() - q.detach()).abs().max() / update.abs().max()
        worst = max(worst, difference.item())
    return worst


# ------------------------------------------------------------------ torch.optim.Muon


def test_moonlight_equals_torch_muon_in_float64(monkeypatch):
    # Both sides run the same float64 Newton-Schulz, so what is compared is the momentum,
    # Nesterov, weight decay and lr scaling. The two momentum buffers differ by a factor
    # 1 - mu, which only the 1e-7 eps of the normalization can detect. Gradients around 1e4
    # make that eps 1e-12 of the norm.
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", float64_torch_newton_schulz)
    params = make_params()
    reference_params = clone_params(params)
    grad_steps = gradient_sequence(4, scale=1e4)
    moonlight = Moonlight(lr=0.02, wd=0.1, muon_params=params, momentum=0.9, nesterov=True, ns_dtype=torch.float64)
    muon = torch.optim.Muon(reference_params, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=True, adjust_lr_fn="match_rms_adamw")

    run(moonlight, params, grad_steps)
    run(muon, reference_params, grad_steps)

    for p, q in zip(params, reference_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-12)


def bfloat16_differences(make_optimizer, nesterov: bool) -> tuple[float, float, float]:
    """Run an optimizer in bfloat16, torch.optim.Muon, and the optimizer in float64.

    Returns (ours - torch, ours - float64, torch - float64), each the largest difference of
    the updates relative to the largest update entry.
    """
    params = make_params(torch.float32)
    starts = [p.detach().clone() for p in params]
    reference_params = clone_params(params)
    exact_params = [torch.nn.Parameter(p.detach().double()) for p in params]
    grad_steps = gradient_sequence(3, scale=1.0, dtype=torch.float32)
    muon = torch.optim.Muon(reference_params, lr=0.02, weight_decay=0.0, momentum=0.9, nesterov=nesterov, adjust_lr_fn="match_rms_adamw")

    run(make_optimizer(params, torch.bfloat16), params, grad_steps)
    run(muon, reference_params, grad_steps)
    run(make_optimizer(exact_params, torch.float64), exact_params, [[g.double() for g in grads] for grads in grad_steps])

    exact_as_float32 = [p.detach().float() for p in exact_params]
    return (
        max_relative_difference(params, reference_params, starts),
        max_relative_difference(params, exact_as_float32, starts),
        max_relative_difference(reference_params, exact_as_float32, starts),
    )


def test_moonlight_equals_torch_muon_in_bfloat16():
    def make_moonlight(params, ns_dtype):
        return Moonlight(lr=0.02, wd=0.0, muon_params=params, momentum=0.9, ns_dtype=ns_dtype)

    ours_vs_torch, ours_error, torch_error = bfloat16_differences(make_moonlight, nesterov=True)

    # torch's own bfloat16 error (about 0.02 of the largest entry) is the precision scale.
    # The two runs round differently, so they may differ by more than either one's error.
    assert ours_vs_torch < 3 * torch_error
    assert ours_error < 2.5 * torch_error


@pytest.mark.parametrize("is_approx", [True, False], ids=["approx", "exact"])
def test_gamma_zero_equals_ema_muon(monkeypatch, is_approx):
    # With gamma = 0, c = g whatever g_prev is, so both forms are EMA momentum (as in
    # torch.optim.Muon, which keeps b = lerp(b, g, 1 - mu)) without Nesterov.
    monkeypatch.setattr(torch.optim._muon, "_zeropower_via_newtonschulz", float64_torch_newton_schulz)
    params = make_params()
    reference_params = clone_params(params)
    grad_steps = gradient_sequence(4, scale=3.0)
    mars_m = MARS_M(lr=0.02, wd=0.1, muon_params=params, momentum=0.9, gamma=0.0, clip_c=False, is_approx=is_approx, ns_dtype=torch.float64)
    muon = torch.optim.Muon(reference_params, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=False, adjust_lr_fn="match_rms_adamw")

    for grads in grad_steps:
        if not is_approx:
            for p, g in zip(params, grads):
                p.grad = -g  # any g_prev: gamma = 0 must ignore it
            mars_m.update_previous_grad()
        run(mars_m, params, [grads])
        if not is_approx:
            mars_m.update_last_grad()
    run(muon, reference_params, grad_steps)

    for p, q in zip(params, reference_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-13, atol=1e-15)


def test_gamma_zero_matches_muon_in_bfloat16():
    def make_mars_m(params, ns_dtype):
        return MARS_M(lr=0.02, wd=0.0, muon_params=params, momentum=0.9, gamma=0.0, clip_c=False, ns_dtype=ns_dtype)

    ours_vs_torch, ours_error, torch_error = bfloat16_differences(make_mars_m, nesterov=False)

    assert ours_vs_torch < 3 * torch_error
    assert ours_error < 2.5 * torch_error


# ------------------------------------------------------------------ one buffer against two


def corrected_norms(grad_steps, beta: float, gamma: float) -> list[float]:
    """||c|| of every matrix and step, to show that a clip at 1 never acts on these gradients."""
    norms = []
    previous = [torch.zeros_like(g) for g in grad_steps[0]]
    for grads in grad_steps:
        for g, g_prev in zip(grads, previous):
            norms.append(torch.linalg.norm(g + gamma * beta / (1 - beta) * (g - g_prev)).item())
        previous = grads
    return norms


def test_one_buffer_equals_two_buffer_form():
    beta, gamma = 0.9, 0.4
    # Gradients of norm about 0.01 keep ||c|| far below 1, so the clipped (two-buffer) form
    # computes exactly the unclipped recursion.
    grad_steps = gradient_sequence(8, scale=0.002)
    assert max(corrected_norms(grad_steps, beta, gamma)) < 0.5
    one_params = make_params()
    two_params = clone_params(one_params)
    one_buffer = MARS_M(lr=0.05, wd=0.1, muon_params=one_params, momentum=beta, gamma=gamma, clip_c=False, ns_dtype=torch.float64)
    two_buffer = MARS_M(lr=0.05, wd=0.1, muon_params=two_params, momentum=beta, gamma=gamma, clip_c=True, ns_dtype=torch.float64)

    for step, grads in enumerate(grad_steps):
        # A momentum schedule: the one-buffer form stays exact under it.
        for optimizer in (one_buffer, two_buffer):
            optimizer.param_groups[0]["momentum"] = beta - 0.05 * (step % 3)
        run(one_buffer, one_params, [grads])
        run(two_buffer, two_params, [grads])

        for p, q, g in zip(one_params, two_params, grads):
            momentum_one = gamma * g + (1 - gamma) * one_buffer.state[p]["exp_avg"]
            momentum_two = two_buffer.state[q]["momentum_buffer"]
            torch.testing.assert_close(momentum_one, momentum_two, rtol=1e-13, atol=1e-18)
    for p, q in zip(one_params, two_params):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-15)


def test_one_buffer_gamma_change_differs_as_documented():
    beta, gamma_old, gamma_new = 0.8, 0.2, 0.7
    grad_steps = gradient_sequence(4, scale=0.002)
    one_params = make_params()
    two_params = clone_params(one_params)
    one_buffer = MARS_M(muon_params=one_params, momentum=beta, gamma=gamma_old, clip_c=False, ns_dtype=torch.float64)
    two_buffer = MARS_M(muon_params=two_params, momentum=beta, gamma=gamma_old, clip_c=True, ns_dtype=torch.float64)
    run(one_buffer, one_params, grad_steps[:3])
    run(two_buffer, two_params, grad_steps[:3])
    g_prev = grad_steps[2]
    e_prev = [one_buffer.state[p]["exp_avg"].clone() for p in one_params]
    weights_before = [p.detach().clone() for p in one_params]

    for optimizer in (one_buffer, two_buffer):
        optimizer.param_groups[0]["gamma"] = gamma_new
    run(one_buffer, one_params, grad_steps[3:])
    run(two_buffer, two_params, grad_steps[3:])

    lr, wd = one_buffer.param_groups[0]["lr"], one_buffer.param_groups[0]["wd"]
    for k, (p, q) in enumerate(zip(one_params, two_params)):
        momentum_one = gamma_new * grad_steps[3][k] + (1 - gamma_new) * one_buffer.state[p]["exp_avg"]
        momentum_two = two_buffer.state[q]["momentum_buffer"]
        expected = beta * (gamma_old - gamma_new) * (g_prev[k] - e_prev[k])
        torch.testing.assert_close(momentum_two - momentum_one, expected, rtol=1e-9, atol=1e-18)
        # The step used the new gamma: its update is NewtonSchulz5 of momentum_one.
        scale = 0.2 * math.sqrt(max(p.shape))
        stepped = weights_before[k] * (1 - lr * wd) - lr * scale * newton_schulz5(momentum_one, dtype=torch.float64)
        torch.testing.assert_close(p.detach(), stepped, rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------------ exact form, by hand


def quintic_newton_schulz_scalar(s: float, steps: int = 5) -> float:
    """Newton-Schulz on a multiple of the identity: every singular value follows this map."""
    a, b, c = 3.4445, -4.7750, 2.0315
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return s


def identity_newton_schulz(value: float, n: int) -> float:
    """The diagonal entry of NewtonSchulz5(value * I_n), with the 1e-7 eps of its normalization."""
    return quintic_newton_schulz_scalar(value / (abs(value) * math.sqrt(n) + 1e-7))


# W = w * I (2x2) and loss(W; xi) = xi * trace(W) + ||W||^2 / 2, so grad = (xi + w) * I
# and every quantity is a multiple of I. The exact form's g_prev is batch t's gradient at
# the previous weights, so there g - g_prev = (w_t - w_{t-1}) * I.
EXAMPLE = dict(n=2, w0=0.1, lr=0.1, beta=0.5, gamma=0.5, xi={1: 1.0, 2: -0.3, 3: 0.7})


def run_identity_example(is_approx: bool):
    """Two steps on the example in the trainer's call order; return the weight and optimizer."""
    n, xi = EXAMPLE["n"], EXAMPLE["xi"]
    weight = torch.nn.Parameter(EXAMPLE["w0"] * torch.eye(n, dtype=torch.float64))
    optimizer = MARS_M(
        lr=EXAMPLE["lr"],
        wd=0.0,
        muon_params=[weight],
        momentum=EXAMPLE["beta"],
        gamma=EXAMPLE["gamma"],
        is_approx=is_approx,
        ns_dtype=torch.float64,
    )

    def gradient(batch: int) -> torch.Tensor:
        return (xi[batch] + weight.detach()[0, 0]) * torch.eye(n, dtype=torch.float64)

    for step in (1, 2):
        weight.grad = gradient(step + 1)
        optimizer.update_previous_grad()
        optimizer.zero_grad(set_to_none=True)
        weight.grad = gradient(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        optimizer.update_last_grad()
    return weight, optimizer


def test_exact_form_matches_two_step_hand_example():
    n, w0, lr, beta, gamma, xi = (EXAMPLE[k] for k in ("n", "w0", "lr", "beta", "gamma", "xi"))
    kappa = gamma * beta / (1 - beta)  # 0.5
    scale = 0.2 * math.sqrt(n)

    weight, optimizer = run_identity_example(is_approx=False)

    # Step 1: g = 1.1, g_prev = 0, c = 1.5 * 1.1 = 1.65; ||c * I|| = 1.65 * sqrt(2) > 1, so
    # the clip divides by it; m = (1 - beta) * c.
    c1 = (1 + kappa) * (xi[1] + w0)
    c1 = c1 / max(1.0, abs(c1) * math.sqrt(n))
    m1 = (1 - beta) * c1
    w1 = w0 - lr * scale * identity_newton_schulz(m1, n)
    # Step 2: g = xi_2 + w1 and g_prev = xi_2 + w0, so c = g + kappa * (w1 - w0).
    c2 = (xi[2] + w1) + kappa * (w1 - w0)
    c2 = c2 / max(1.0, abs(c2) * math.sqrt(n))
    m2 = beta * m1 + (1 - beta) * c2
    w2 = w1 - lr * scale * identity_newton_schulz(m2, n)

    identity = torch.eye(n, dtype=torch.float64)
    torch.testing.assert_close(weight.detach(), w2 * identity, rtol=1e-12, atol=1e-15)
    assert sorted(optimizer.state[weight]) == ["last_grad", "momentum_buffer"]
    torch.testing.assert_close(optimizer.state[weight]["last_grad"], (xi[3] + w1) * identity)


def test_exact_form_differs_from_approximate_on_hand_example():
    # The approximate form's g_prev at step 2 is step 1's gradient, (xi_1 + w0) * I.
    approx_weight, _ = run_identity_example(is_approx=True)
    exact_weight, _ = run_identity_example(is_approx=False)

    assert (approx_weight - exact_weight).abs().max().item() > 1e-3


# ------------------------------------------------------------------ gradient accumulation


class TwoLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.hidden = torch.nn.Linear(6, 16)
            self.out = torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))


OPTIMIZERS = {
    "mars_m_clip": lambda m, a: MARS_M(lr=0.05, muon_params=m, adamw_params=a, clip_c=True),
    "mars_m_one_buffer": lambda m, a: MARS_M(lr=0.05, muon_params=m, adamw_params=a, clip_c=False),
    "moonlight": lambda m, a: Moonlight(lr=0.05, muon_params=m, adamw_params=a),
}


def train_accumulated(make_optimizer, micro_batches: int, inputs, targets) -> TwoLayer:
    model = TwoLayer()
    matrices = [model.hidden.weight, model.out.weight]
    optimizer = make_optimizer(matrices, [model.hidden.bias, model.out.bias])
    for step in range(3):
        for x, y in zip(inputs[step].chunk(micro_batches), targets[step].chunk(micro_batches)):
            loss = torch.nn.functional.mse_loss(model(x), y)
            (loss / micro_batches).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_gradient_accumulation_matches_full_batch(monkeypatch, name):
    matrices_orthogonalized = []

    def counting_newton_schulz(G, steps, dtype, compile=False):
        matrices_orthogonalized.append(G.shape[0])
        return newton_schulz5(G, steps, dtype)

    monkeypatch.setattr(orthogonalized, "run_newton_schulz", counting_newton_schulz)
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(3, 8, 6, generator=generator)
    targets = torch.randn(3, 8, 4, generator=generator)

    full = train_accumulated(OPTIMIZERS[name], 1, inputs, targets)
    full_count = sum(matrices_orthogonalized)
    accumulated = train_accumulated(OPTIMIZERS[name], 4, inputs, targets)
    accumulated_count = sum(matrices_orthogonalized) - full_count

    for p, q in zip(full.parameters(), accumulated.parameters()):
        torch.testing.assert_close(q, p, rtol=0.0, atol=1e-5)
    # Two matrices, three steps: one orthogonalization per matrix per step.
    assert full_count == 6
    assert accumulated_count == 6
