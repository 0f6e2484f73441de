"""The plan that splits Newton-Schulz work across ranks."""

from __future__ import annotations

from mars_m_exp.optim.sharding import assign_to_ranks, newton_schulz_flops

GPT2_SMALL_SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12


def test_assignment_balances_gpt2_small_flops():
    owner = assign_to_ranks(GPT2_SMALL_SHAPES, world_size=8)
    loads = [0] * 8
    for shape, rank in zip(GPT2_SMALL_SHAPES, owner):
        loads[rank] += newton_schulz_flops(shape, 5)

    assert set(owner) == set(range(8))
    assert max(loads) / (sum(loads) / 8) < 1.1


def test_assignment_is_deterministic_and_covers_every_matrix():
    first = assign_to_ranks(GPT2_SMALL_SHAPES, world_size=3)
    second = assign_to_ranks(list(GPT2_SMALL_SHAPES), world_size=3)
    assert first == second
    assert len(first) == len(GPT2_SMALL_SHAPES)


def test_more_ranks_than_matrices_leaves_ranks_idle():
    owner = assign_to_ranks([(4, 4), (8, 4)], world_size=4)
    assert sorted(owner) == [0, 1]


def test_flops_use_the_short_side():
    assert newton_schulz_flops((3072, 768), 5) == newton_schulz_flops((768, 3072), 5)
    assert newton_schulz_flops((768, 768), 1) == 4 * 768**3 + 2 * 768**3
