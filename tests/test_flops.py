"""Each group's shared bottleneck is computed once per forward: FLOPs equal 2·tokens·Σ(factor params)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import lord_export as le
from lord_export.core.modules import LordBottleneck
from tests.helpers import PlainMLP, correlated_batches, tiny_model


@pytest.mark.parametrize("arch", ["llama", "phi3", "gpt2"])
def test_member_flops_match_the_analytic_count(arch):
    model = tiny_model(arch)
    batch = correlated_batches(1, batch=2, seq=40)[0]
    tokens = batch["input_ids"].numel()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**batch)
    dense_total = counter.get_total_flops()

    plan = le.compress(model, correlated_batches(), rank_reduction=0.5, force=True)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**batch)
    per_module = counter.get_flop_counts()
    top = type(model).__name__
    measured = sum(sum(per_module[f"{top}.{m.name}"].values()) for g in plan.factorized_groups for m in g.members)
    analytic = 2 * tokens * sum(g.factor_params for g in plan.factorized_groups)
    assert measured == pytest.approx(analytic, rel=0.01)
    # the whole model changes by exactly the factorized layers' difference
    dense_params = sum(g.dense_params for g in plan.factorized_groups)
    expected_change = analytic - 2 * tokens * dense_params
    assert counter.get_total_flops() - dense_total == pytest.approx(expected_change, rel=0.01)


def test_bottleneck_recomputed_per_member_would_be_caught():
    """Without the shared cache the count rises by (members − 1) bottleneck GEMMs: the test above can fail."""
    model = PlainMLP()
    xs = [torch.randn(16, 24) for _ in range(3)]
    plan = le.compress(model, lambda m: [m(x) for x in xs], rank_reduction=0.5, force=True)
    x = torch.randn(5, 24)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    shared = counter.get_total_flops()
    assert shared == 2 * 5 * sum(g.factor_params for g in plan.factorized_groups)
    for m in model.modules():
        if isinstance(m, LordBottleneck):
            m.n_members = 1  # disables sharing
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    group = plan.groups[0]
    assert counter.get_total_flops() - shared == 2 * 5 * group.rank * group.d_in


def test_cache_respects_in_place_changes_and_new_inputs():
    model = PlainMLP().double()
    xs = [torch.randn(32, 24, dtype=torch.float64) for _ in range(3)]
    le.compress(model, lambda m: [m(x) for x in xs], rank_reduction=0.0, force=True)
    x = torch.randn(4, 24, dtype=torch.float64)
    ha = model.a(x)
    x.mul_(2)  # same tensor object, new version: b must not reuse a's bottleneck
    torch.testing.assert_close(model.b(x), model.b(x.clone()))
    assert not torch.allclose(ha, model.a(x))


def test_shared_bottleneck_under_inference_mode():
    """Inference tensors have no version counter; the cache must still work (optimum validates so)."""
    model = PlainMLP()
    xs = [torch.randn(32, 24) for _ in range(3)]
    le.compress(model, lambda m: [m(x) for x in xs], rank_reduction=0.5, force=True)
    x = torch.randn(4, 24)
    with torch.inference_mode():
        y = model(x)
    torch.testing.assert_close(y, model(x))
