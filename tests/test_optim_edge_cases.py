"""MARS-M and Moonlight on awkward shapes, degenerate gradients and changing hyperparameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch._dynamo

from mars_m_exp.optim import MARS_M, Moonlight, is_matrix_shape, newton_schulz5, split_params

# (name, constructor keyword arguments) for every state layout the matrix side can have.
MARS_M_FORMS = [
    ("one_buffer", dict(clip_c=False, is_approx=True)),
    ("clip", dict(clip_c=True, is_approx=True)),
    ("exact", dict(clip_c=True, is_approx=False)),
]
ALL_OPTIMIZERS = [(name, MARS_M, kwargs) for name, kwargs in MARS_M_FORMS] + [("moonlight", Moonlight, {})]
ALL_OPTIMIZER_IDS = [name for name, _, _ in ALL_OPTIMIZERS]


def random_tensor(*shape: int, seed: int, scale: float = 1.0, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=generator, dtype=dtype)


def exact_form(optimizer) -> bool:
    return isinstance(optimizer, MARS_M) and not optimizer.param_groups[0]["is_approx"]


def take_step(optimizer, params, grads, extra_grads=None) -> None:
    """One training step in the trainer's call order; `extra_grads` feed the exact form's g_prev."""
    if exact_form(optimizer):
        for p, g in zip(params, extra_grads if extra_grads is not None else grads):
            p.grad = None if g is None else g.clone()
        optimizer.update_previous_grad()
        optimizer.zero_grad(set_to_none=True)
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if exact_form(optimizer):
        optimizer.update_last_grad()


# ------------------------------------------------------------------ shapes


class ShapesModel(torch.nn.Module):
    """One parameter of each shape class the split has to sort."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, bias=True)  # weight 8x4x3x3, bias (8,)
        self.gain = torch.nn.Parameter(torch.ones(8, 1, 1))
        self.scale = torch.nn.Parameter(torch.tensor(1.0))
        self.row = torch.nn.Parameter(torch.zeros(1, 5))
        self.linear = torch.nn.Linear(5, 3, bias=False)


def test_split_params_sorts_each_shape_class():
    split = split_params(ShapesModel())

    assert split.matrix_names == ["conv.weight", "linear.weight"]
    assert sorted(split.adamw_names) == ["conv.bias", "gain", "row", "scale"]


@pytest.mark.parametrize(
    "shape",
    [(), (7,), (8, 1, 1), (1, 5), (5, 1), (3, 4), (8, 4, 3, 3), (2, 1, 1, 3), (1, 1), (0, 4), (4, 0)],
)
def test_matrix_side_accepts_exactly_split_matrices(shape):
    param = torch.nn.Parameter(torch.zeros(shape))
    split = split_params(torch.nn.ParameterDict({"p": param}))
    split_says_matrix = bool(split.matrix_params)

    try:
        MARS_M(muon_params=[param])
        optimizer_accepts = True
    except ValueError:
        optimizer_accepts = False

    assert split_says_matrix == is_matrix_shape(shape)
    assert optimizer_accepts == split_says_matrix


def first_mars_m_direction(grad: torch.Tensor, beta: float = 0.95, gamma: float = 0.025) -> torch.Tensor:
    """m after MARS-M's first step with the default clip: g_prev = 0, so c = (1 + kappa) * g."""
    c = (1 + gamma * beta / (1 - beta)) * grad
    return (1 - beta) * c / max(1.0, torch.linalg.norm(c).item())


@pytest.mark.parametrize(
    "optimizer_class, first_direction",
    [(MARS_M, first_mars_m_direction), (Moonlight, lambda grad: grad + 0.95 * grad)],
    ids=["mars_m", "moonlight"],
)
def test_conv_weight_orthogonalized_as_2d_view(optimizer_class, first_direction):
    conv = torch.nn.Parameter(random_tensor(8, 4, 3, 3, seed=0))
    before = conv.detach().clone()
    grad = random_tensor(8, 4, 3, 3, seed=1, scale=10.0)
    lr = 0.01
    optimizer = optimizer_class(lr=lr, wd=0.0, muon_params=[conv], ns_dtype=torch.float64)

    conv.grad = grad
    optimizer.step()

    # The (8, 36) view's longer side sets the scale: 0.2 * sqrt(36).
    view = first_direction(grad).reshape(8, 36)
    expected = -lr * 0.2 * math.sqrt(36) * newton_schulz5(view, dtype=torch.float64).reshape(8, 4, 3, 3)
    torch.testing.assert_close(conv.detach() - before, expected, rtol=1e-10, atol=1e-14)


def test_gain_rejected_with_name_and_shape():
    gain = torch.nn.Parameter(torch.ones(8, 1, 1))

    with pytest.raises(ValueError, match=r"blocks\.0\.gain of shape \(8, 1, 1\)"):
        MARS_M(muon_params=[("blocks.0.gain", gain)])


def test_complex_param_rejected_with_name():
    weight = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.complex64))

    with pytest.raises(ValueError, match=r"head\.weight of shape \(3, 4\) has dtype torch\.complex64"):
        Moonlight(muon_params=[("head.weight", weight)])


def test_param_twice_in_one_side_rejected():
    weight = torch.nn.Parameter(torch.zeros(3, 4))

    with pytest.raises(ValueError, match="muon_params\\[1\\] appears twice in muon_params"):
        MARS_M(muon_params=[weight, weight])


def test_sparse_gradient_rejected_with_name():
    weight = torch.nn.Parameter(torch.zeros(3, 4))
    optimizer = MARS_M(muon_params=[("emb.weight", weight)])
    weight.grad = torch.zeros(3, 4).to_sparse()

    with pytest.raises(RuntimeError, match=r"emb\.weight of shape \(3, 4\) has a sparse gradient"):
        optimizer.step()


# ------------------------------------------------------------------ degenerate gradients


@pytest.mark.parametrize("name, optimizer_class, kwargs", ALL_OPTIMIZERS, ids=ALL_OPTIMIZER_IDS)
def test_zero_gradient_leaves_only_weight_decay(name, optimizer_class, kwargs):
    weight = torch.nn.Parameter(random_tensor(6, 4, seed=2))
    lr, wd = 0.1, 0.5
    optimizer = optimizer_class(lr=lr, wd=wd, muon_params=[weight], ns_dtype=torch.float64, **kwargs)
    expected = weight.detach().clone()

    for _ in range(3):
        take_step(optimizer, [weight], [torch.zeros(6, 4, dtype=torch.float64)])
        expected = expected * (1 - lr * wd)

    torch.testing.assert_close(weight.detach(), expected, rtol=1e-15, atol=0.0)
    for key, value in optimizer.state[weight].items():
        assert torch.isfinite(value).all(), key


def test_newton_schulz_of_zero_is_zero():
    zeros = torch.zeros(2, 5, 3)

    assert torch.equal(newton_schulz5(zeros, dtype=torch.float32), zeros)


@pytest.mark.parametrize("name, optimizer_class, kwargs", ALL_OPTIMIZERS, ids=ALL_OPTIMIZER_IDS)
def test_param_without_grad_skipped_without_state(name, optimizer_class, kwargs):
    with_grad = torch.nn.Parameter(random_tensor(4, 4, seed=3))
    without_grad = torch.nn.Parameter(random_tensor(4, 4, seed=4))
    vector = torch.nn.Parameter(random_tensor(4, seed=5))
    before = without_grad.detach().clone()
    optimizer = optimizer_class(muon_params=[with_grad, without_grad], adamw_params=[vector], **kwargs)

    for _ in range(2):
        take_step(optimizer, [with_grad, without_grad, vector], [random_tensor(4, 4, seed=6), None, None])

    assert torch.equal(without_grad.detach(), before)
    assert without_grad not in optimizer.state
    assert vector not in optimizer.state
    assert with_grad in optimizer.state


# ------------------------------------------------------------------ ownership of g_prev


def test_last_grad_survives_in_place_zero_grad():
    weight = torch.nn.Parameter(random_tensor(5, 3, seed=7))
    grad = random_tensor(5, 3, seed=8)
    optimizer = MARS_M(muon_params=[weight], clip_c=True, ns_dtype=torch.float64)

    weight.grad = grad.clone()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)

    assert torch.equal(optimizer.state[weight]["last_grad"], grad)


def test_previous_grad_survives_in_place_zero_grad():
    weight = torch.nn.Parameter(random_tensor(5, 3, seed=7))
    grad = random_tensor(5, 3, seed=8)
    optimizer = MARS_M(muon_params=[weight], is_approx=False, ns_dtype=torch.float64)

    weight.grad = grad.clone()
    optimizer.update_previous_grad()
    optimizer.zero_grad(set_to_none=False)

    assert torch.equal(optimizer.state[weight]["previous_grad"], grad)


@pytest.mark.parametrize("name, optimizer_class, kwargs", ALL_OPTIMIZERS, ids=ALL_OPTIMIZER_IDS)
def test_reused_grad_buffer_matches_fresh_grads(name, optimizer_class, kwargs):
    grads = [random_tensor(5, 3, seed=10 + k) for k in range(4)]
    extra_grads = [random_tensor(5, 3, seed=20 + k) for k in range(4)]
    fresh = torch.nn.Parameter(random_tensor(5, 3, seed=9))
    reused = torch.nn.Parameter(fresh.detach().clone())
    fresh_optimizer = optimizer_class(muon_params=[fresh], ns_dtype=torch.float64, **kwargs)
    reused_optimizer = optimizer_class(muon_params=[reused], ns_dtype=torch.float64, **kwargs)

    for grad, extra in zip(grads, extra_grads):
        take_step(fresh_optimizer, [fresh], [grad], [extra])
    # The trainer of a memory-tight run keeps one gradient tensor and overwrites it in place.
    reused.grad = torch.zeros(5, 3, dtype=torch.float64)
    for grad, extra in zip(grads, extra_grads):
        if exact_form(reused_optimizer):
            reused.grad.copy_(extra)
            reused_optimizer.update_previous_grad()
            reused_optimizer.zero_grad(set_to_none=False)
        reused.grad.copy_(grad)
        reused_optimizer.step()
        reused_optimizer.zero_grad(set_to_none=False)
        if exact_form(reused_optimizer):
            reused_optimizer.update_last_grad()

    assert torch.equal(reused.detach(), fresh.detach())


# ------------------------------------------------------------------ hyperparameters per step


def mars_m_reference(x, grads, settings, clip_c=True):
    """Two-buffer MARS-M from its definition, with per-step (lr, wd, momentum, gamma)."""
    x = x.clone()
    m = torch.zeros_like(x)
    g_prev = torch.zeros_like(x)
    scale = 0.2 * math.sqrt(max(x.shape))
    for g, (lr, wd, beta, gamma) in zip(grads, settings):
        c = g + gamma * beta / (1 - beta) * (g - g_prev)
        if clip_c:
            c = c / max(1.0, torch.linalg.norm(c).item())
        m = beta * m + (1 - beta) * c
        x = x - lr * (scale * newton_schulz5(m, dtype=torch.float64) + wd * x)
        g_prev = g
    return x


@pytest.mark.parametrize("key", ["lr", "wd", "momentum", "gamma"])
def test_mars_m_reads_changed_hyperparameter(key):
    initial = {"lr": 0.02, "wd": 0.1, "momentum": 0.9, "gamma": 0.3}
    changed = {"lr": 0.05, "wd": 0.4, "momentum": 0.5, "gamma": 0.9}
    weight = torch.nn.Parameter(random_tensor(5, 3, seed=30))
    x0 = weight.detach().clone()
    grads = [random_tensor(5, 3, seed=31 + k, scale=0.3) for k in range(3)]
    optimizer = MARS_M(muon_params=[weight], ns_dtype=torch.float64, clip_c=True, **initial)
    settings = []

    for step, grad in enumerate(grads):
        if step == 1:
            optimizer.param_groups[0][key] = changed[key]
        group = optimizer.param_groups[0]
        settings.append((group["lr"], group["wd"], group["momentum"], group["gamma"]))
        take_step(optimizer, [weight], [grad])

    expected = mars_m_reference(x0, grads, settings)
    torch.testing.assert_close(weight.detach(), expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("key", ["lr", "wd", "momentum"])
def test_moonlight_reads_changed_hyperparameter(key):
    initial = {"lr": 0.02, "wd": 0.1, "momentum": 0.9}
    changed = {"lr": 0.05, "wd": 0.4, "momentum": 0.5}
    weight = torch.nn.Parameter(random_tensor(3, 5, seed=40))
    x = weight.detach().clone()
    grads = [random_tensor(3, 5, seed=41 + k) for k in range(3)]
    optimizer = Moonlight(muon_params=[weight], ns_dtype=torch.float64, **initial)
    buf = torch.zeros_like(x)

    for step, grad in enumerate(grads):
        if step == 1:
            optimizer.param_groups[0][key] = changed[key]
        take_step(optimizer, [weight], [grad])
        group = optimizer.param_groups[0]
        lr, wd, mu = group["lr"], group["wd"], group["momentum"]
        buf = mu * buf + grad
        direction = grad + mu * buf
        x = x - lr * (0.2 * math.sqrt(5) * newton_schulz5(direction, dtype=torch.float64) + wd * x)

    torch.testing.assert_close(weight.detach(), x, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("flag, value", [("clip_c", True), ("is_approx", False)])
def test_mars_m_form_change_after_first_step_rejected(flag, value):
    weight = torch.nn.Parameter(random_tensor(4, 3, seed=50))
    optimizer = MARS_M(muon_params=[("w", weight)], clip_c=False, is_approx=True)
    take_step(optimizer, [weight], [random_tensor(4, 3, seed=51)])
    optimizer.param_groups[0][flag] = value
    weight.grad = random_tensor(4, 3, seed=52)

    with pytest.raises(ValueError, match="cannot change after the first step"):
        optimizer.step()


# ------------------------------------------------------------------ no host synchronization


@pytest.mark.parametrize("name, optimizer_class, kwargs", ALL_OPTIMIZERS, ids=ALL_OPTIMIZER_IDS)
def test_step_runs_on_meta_tensors(name, optimizer_class, kwargs):
    # A meta tensor has no data, so any read of a value on the host (.item(), a Python `if`
    # on a tensor, a clip written as `if norm > 1`) raises here.
    matrix = torch.nn.Parameter(torch.empty(6, 4, device="meta"))
    conv = torch.nn.Parameter(torch.empty(8, 4, 3, 3, device="meta"))
    vector = torch.nn.Parameter(torch.empty(4, device="meta"))
    optimizer = optimizer_class(muon_params=[matrix, conv], adamw_params=[vector], **kwargs)
    params = [matrix, conv, vector]

    for _ in range(2):
        take_step(optimizer, params, [torch.empty_like(p) for p in params])

    assert optimizer.state[matrix]
    assert optimizer.state[conv]


@pytest.mark.parametrize("name, optimizer_class, kwargs", ALL_OPTIMIZERS, ids=ALL_OPTIMIZER_IDS)
def test_step_traces_as_one_graph(name, optimizer_class, kwargs):
    matrix = torch.nn.Parameter(random_tensor(6, 4, seed=60, dtype=torch.float32))
    vector = torch.nn.Parameter(random_tensor(4, seed=61, dtype=torch.float32))
    optimizer = optimizer_class(muon_params=[matrix], adamw_params=[vector], **kwargs)
    eager_matrix = torch.nn.Parameter(matrix.detach().clone())
    eager_vector = torch.nn.Parameter(vector.detach().clone())
    eager = optimizer_class(muon_params=[eager_matrix], adamw_params=[eager_vector], **kwargs)
    grads = [random_tensor(6, 4, seed=62, dtype=torch.float32), random_tensor(4, seed=63, dtype=torch.float32)]
    # State creation happens at the first step; trace the steady-state step after it.
    take_step(optimizer, [matrix, vector], grads)
    take_step(eager, [eager_matrix, eager_vector], grads)
    torch._dynamo.reset()
    # The eager backend checks for graph breaks (fullgraph raises on one, e.g. at a
    # host read of a tensor) without paying for code generation.
    compiled_step = torch.compile(optimizer.step, backend="eager", fullgraph=True)

    matrix.grad, vector.grad = grads[0].clone(), grads[1].clone()
    compiled_step()
    eager_matrix.grad, eager_vector.grad = grads[0].clone(), grads[1].clone()
    eager.step()
    torch._dynamo.reset()

    torch.testing.assert_close(matrix.detach(), eager_matrix.detach())
    torch.testing.assert_close(vector.detach(), eager_vector.detach())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mars_m_clip_step_captured_in_cuda_graph():
    device = torch.device("cuda")
    weight = torch.nn.Parameter(random_tensor(64, 32, seed=70, dtype=torch.float32).to(device))
    reference = torch.nn.Parameter(weight.detach().clone())
    optimizer = MARS_M(muon_params=[weight], clip_c=True, compile_ns=False)
    reference_optimizer = MARS_M(muon_params=[reference], clip_c=True, compile_ns=False)
    grads = [random_tensor(64, 32, seed=71 + k, dtype=torch.float32, scale=3.0).to(device) for k in range(4)]
    weight.grad = grads[0].clone()
    reference.grad = grads[0].clone()

    # Warm up on a side stream, as CUDA graph capture requires, so the state exists.
    side_stream = torch.cuda.Stream()
    side_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side_stream):
        optimizer.step()
    torch.cuda.current_stream().wait_stream(side_stream)
    reference_optimizer.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        optimizer.step()

    for grad in grads[1:]:
        weight.grad.copy_(grad)
        graph.replay()
        reference.grad.copy_(grad)
        reference_optimizer.step()
    torch.cuda.synchronize()

    torch.testing.assert_close(weight.detach(), reference.detach())
