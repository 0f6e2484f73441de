"""GPT-2 model: attention against a naive implementation, tying and initialisation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mars_m_exp import GPT, GPTConfig
from mars_m_exp.model import CausalSelfAttention


def naive_attention(module: CausalSelfAttention, x: torch.Tensor, layer_idx: int, inverse_layer_scale: bool) -> torch.Tensor:
    """Masked-softmax attention with a materialised T x T mask, from the textbook definition."""
    batch, seq, width = x.shape
    head_dim = width // module.n_head
    q, k, v = module.c_attn(x).split(width, dim=2)
    q, k, v = (t.view(batch, seq, module.n_head, head_dim).transpose(1, 2) for t in (q, k, v))

    scores = q @ k.transpose(-2, -1) / math.sqrt(head_dim)
    if inverse_layer_scale:
        scores = scores / (layer_idx + 1)
    mask = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    scores = scores.masked_fill(~mask, float("-inf"))
    y = F.softmax(scores, dim=-1) @ v
    return module.c_proj(y.transpose(1, 2).reshape(batch, seq, width))


@pytest.mark.parametrize("inverse_layer_scale", [True, False])
def test_sdpa_attention_equals_naive(inverse_layer_scale):
    torch.manual_seed(0)
    config = GPTConfig(n_layer=3, n_head=4, n_embd=32, block_size=16, vocab_size=97, scale_attn_by_inverse_layer_idx=inverse_layer_scale)
    model = GPT(config).double().eval()
    idx = torch.randint(0, 97, (2, 16))

    with torch.no_grad():
        logits, _ = model(idx, idx)
        x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(16))
        for layer_idx, block in enumerate(model.transformer.h):
            x = x + naive_attention(block.attn, block.ln_1(x), layer_idx, inverse_layer_scale)
            x = x + block.mlp(block.ln_2(x))
        naive_logits = model.lm_head(model.transformer.ln_f(x))

    torch.testing.assert_close(logits, naive_logits, rtol=1e-10, atol=1e-10)


def test_inverse_layer_scale_changes_logits():
    torch.manual_seed(0)
    scaled = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50, scale_attn_by_inverse_layer_idx=True))
    plain = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50, scale_attn_by_inverse_layer_idx=False))
    plain.load_state_dict(scaled.state_dict())
    idx = torch.randint(0, 50, (1, 8))

    assert scaled.transformer.h[1].attn.scale == pytest.approx(1 / (math.sqrt(8) * 2))
    assert not torch.allclose(scaled(idx, idx)[0], plain(idx, idx)[0])


def test_head_tied_to_token_embedding():
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert "lm_head.weight" not in dict(model.named_parameters())


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    n_layer = 8
    model = GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=256, block_size=8, vocab_size=64))
    residual_std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    other_std = model.transformer.h[0].mlp.c_fc.weight.std().item()

    assert residual_std == pytest.approx(0.02 / math.sqrt(2 * n_layer), rel=0.05)
    assert other_std == pytest.approx(0.02, rel=0.05)


def test_gpt2_small_parameter_count():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    # Token embedding 50304*768 + 12 layers * (4 matrices of 12*768^2 in all + 2 gains of 768)
    # + final gain 768; no biases, position embedding excluded.
    expected = 50304 * 768 + 12 * (12 * 768 * 768 + 2 * 768) + 768
    assert model.num_params() == expected
    assert expected == 123_587_328


def test_sequence_longer_than_block_rejected():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=16))
    with pytest.raises(ValueError, match="block_size=4"):
        model(torch.zeros(1, 5, dtype=torch.long))
