import pytest
import torch
from torch import nn

import sparsebert
from sparsebert.pruning import CubicSchedule, OneShotSchedule, Pruner, global_masks, keep_count, topk_mask


def test_cubic_schedule_matches_zhu_gupta_formula():
    s = CubicSchedule(initial_sparsity=0.1, final_sparsity=0.9, start_step=100, end_step=1100, frequency=10)
    for t in [100, 150, 333, 600, 1000, 1099]:
        expected = 0.9 + (0.1 - 0.9) * (1 - (t - 100) / 1000) ** 3
        assert s.sparsity_at(t) == pytest.approx(expected, abs=1e-12)
    assert s.sparsity_at(0) == 0.1 and s.sparsity_at(1100) == 0.9 and s.sparsity_at(5000) == 0.9
    assert [t for t in range(90, 135) if s.is_update_step(t)] == [100, 110, 120, 130]
    assert s.is_update_step(1100) and not s.is_update_step(1110) and not s.is_update_step(99)
    # monotone
    vals = [s.sparsity_at(t) for t in range(0, 1200, 7)]
    assert all(a <= b + 1e-15 for a, b in zip(vals, vals[1:]))


def test_schedule_validation():
    with pytest.raises(ValueError, match="end_step"):
        CubicSchedule(0, 0.5, 10, 5)
    with pytest.raises(ValueError, match="frequency"):
        CubicSchedule(0, 0.5, 0, 5, frequency=0)
    assert OneShotSchedule(0.5, step=3).sparsity_at(2) == 0.0 and OneShotSchedule(0.5, 3).sparsity_at(3) == 0.5


def test_topk_is_exact_even_with_ties():
    scores = torch.zeros(10, 10)
    m = topk_mask(scores, keep_count(100, 0.37))
    assert m.sum() == 63


def test_global_masks_exact_to_one_unit():
    torch.manual_seed(0)
    scores = [torch.rand(4, 4), torch.rand(8, 2) * 3, torch.rand(3, 5)]
    units = [64, 16, 1]
    for sparsity in [0.0, 0.3, 0.5, 0.77, 1.0]:
        masks = global_masks(scores, sparsity, weights=units)
        total = sum(s.numel() * u for s, u in zip(scores, units))
        kept = sum(int(m.sum()) * u for m, u in zip(masks, units))
        assert abs(kept - (1 - sparsity) * total) <= max(units)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))


@pytest.mark.parametrize("mode", ["block", "unstructured"])
def test_per_layer_sparsity_is_exact(mode):
    model = sparsebert.sparsify(_model(), sparsity=0.0, block=16, mode=mode, targets=[r"^\d+$"])
    pruner = Pruner(model, OneShotSchedule(0.7, step=0))
    assert pruner.step(0)
    for name, kept in pruner.kept_fractions().items():
        units = (128 * 64) // (256 if mode == "block" else 1)
        assert kept == pytest.approx(round(units * 0.3) / units)


def test_global_scope_is_exact_within_one_block():
    model = sparsebert.sparsify(_model(), sparsity=0.0, block=16, targets=[r"^\d+$"])
    with torch.no_grad():
        model[0].values.mul_(10)                 # first layer far more important
    pruner = Pruner(model, OneShotSchedule(0.6), scope="global")
    pruner.step(0)
    fr = pruner.kept_fractions()
    assert fr["0"] > fr["2"]
    assert abs(pruner.sparsity() - 0.6) <= 256 / (2 * 128 * 64)


def test_pruner_only_removes_and_follows_the_schedule():
    model = sparsebert.sparsify(_model(), sparsity=0.0, mode="unstructured", targets=[r"^\d+$"])
    sched = CubicSchedule(0.0, 0.8, start_step=0, end_step=100, frequency=10)
    pruner = Pruner(model, sched, score="random", seed=1)
    prev = {n: m.mask.clone() for n, m in pruner.layers}
    updates = []
    for step in range(0, 120):
        with torch.no_grad():
            for _, m in pruner.layers:
                m.weight.add_(torch.randn_like(m.weight))     # scores change every step
        if pruner.step(step):
            updates.append(step)
            for n, m in pruner.layers:
                assert not (m.mask & ~prev[n]).any()          # nothing regrows
                prev[n] = m.mask.clone()
                assert m.density == pytest.approx(1 - sched.sparsity_at(step), abs=1 / m.mask.numel())
    assert updates == list(range(10, 101, 10))
    assert pruner.sparsity() == pytest.approx(0.8, abs=1e-3)


def test_block_pruner_shrinks_optimizer_state_and_training_continues():
    model = sparsebert.sparsify(_model(), sparsity=0.0, block=16, targets=[r"^\d+$"], backend="reference")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pruner = Pruner(model, CubicSchedule(0.0, 0.5, 0, 20, 5), optimizer=opt)
    x = torch.randn(16, 64)
    for step in range(30):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        pruner.step(step)
        for _, m in pruner.layers:
            st = opt.state[m.values]
            assert st["exp_avg"].shape == m.values.shape == st["exp_avg_sq"].shape
    assert all(k == pytest.approx(0.5) for k in pruner.kept_fractions().values())


def test_pruner_needs_sparse_layers():
    with pytest.raises(ValueError, match="sparsify"):
        Pruner(_model(), OneShotSchedule(0.5))


def test_decreasing_cubic_schedule_is_refused():
    """CubicSchedule(0.8, 0.2) used to be accepted and then never pruned (masks only tighten)."""
    with pytest.raises(ValueError, match="final_sparsity .* below initial_sparsity"):
        CubicSchedule(0.8, 0.2)
    assert CubicSchedule(0.5, 0.5).sparsity_at(10) == 0.5      # constant is fine


def _optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, foreach=kind == "foreach",
                             fused=kind == "fused")


@pytest.mark.parametrize("kind", ["loop", "foreach", "fused", "sgd"])
@pytest.mark.parametrize("give_optimizer", [True, False])
def test_training_after_a_shrink_equals_a_model_built_at_the_final_layout(kind, give_optimizer):
    """The last input block-column is zero, so the blocks reading it (also the smallest, so the
    ones pruned) get zero gradient and never change the output: the model trained at the full
    layout and shrunk at step 3 must train exactly like one built at the final layout, whether or
    not the Pruner was given the optimizer, with the graph of the last step still alive (`loss`)
    while the layer shrinks, and with a parameter list taken before pruning."""
    from sparsebert import BlockSparseLinear
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    with torch.no_grad():
        dense.weight[:, 48:] *= 0.01
    a = BlockSparseLinear.from_dense(dense, sparsity=0.0, block=16, backend="reference")
    final_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    b = BlockSparseLinear.from_dense(dense, mask=final_mask, block=16, backend="reference")
    params_a = list(a.parameters())
    opt_a, opt_b = _optimizer(kind, params_a), _optimizer(kind, b.parameters())
    pruner = Pruner(a, OneShotSchedule(0.25, step=3), optimizer=opt_a if give_optimizer else None)
    g = torch.Generator().manual_seed(1)
    losses = {}         # each loss (and its graph) stays alive until the next one is computed
    for step in range(10):
        x, y = torch.randn(16, 64, generator=g), torch.randn(16, 32, generator=g)
        x[:, 48:] = 0
        for layer, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            losses[layer] = (layer(x) - y).square().mean()
            losses[layer].backward()
            opt.step()
        if pruner.step(step):
            assert a.layout == b.layout and a.values is params_a[0]
            torch.nn.utils.clip_grad_norm_(params_a, 1e9)      # the old list sees the new shape
        if step >= 3:
            torch.testing.assert_close(a.values, b.values, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a.bias, b.bias, rtol=1e-6, atol=1e-7)
    for k, v in opt_b.state[b.values].items():
        torch.testing.assert_close(opt_a.state[a.values][k], v, rtol=1e-6, atol=1e-7)


def test_block_pruner_without_optimizer_keeps_every_layer_training():
    """Pruning used to swap in new Parameters: an optimizer the Pruner was not given kept the old
    ones, and the shrunk layers silently stopped training."""
    model = sparsebert.sparsify(_model(), sparsity=0.0, block=16, targets=[r"^\d+$"], backend="reference")
    params = list(model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = Pruner(model, OneShotSchedule(0.5, step=0))
    x = torch.randn(16, 64)
    for step in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        pruner.step(step)
    for _, m in pruner.layers:
        assert any(p is m.values for p in params)
        assert opt.state[m.values]["exp_avg"].shape == m.values.shape
    changed = [m.values.detach().clone() for _, m in pruner.layers]
    opt.zero_grad(); model(x).square().mean().backward(); opt.step()
    assert all(not torch.equal(m.values, c) for (_, m), c in zip(pruner.layers, changed))


@pytest.mark.parametrize("give_optimizer", [True, False])
def test_masked_weights_pruned_mid_training_stay_zero_with_adamw(give_optimizer):
    """Whether or not the Pruner was given the optimizer: a stale AdamW moment used to move newly
    pruned weights away from zero when it was not."""
    model = sparsebert.sparsify(_model(), sparsity=0.0, mode="unstructured", targets=[r"^\d+$"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    pruner = Pruner(model, CubicSchedule(0.0, 0.7, 0, 20, 5), optimizer=opt if give_optimizer else None)
    x = torch.randn(16, 64)
    for step in range(30):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        pruner.step(step)
        for _, m in pruner.layers:
            assert torch.count_nonzero(m.weight[~m.mask]) == 0, step
    assert pruner.sparsity() == pytest.approx(0.7, abs=1e-3)
