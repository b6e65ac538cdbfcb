"""Example level against hand-worked cases and plain loop references (method.md section 1)."""
from __future__ import annotations

import random

import pytest
import torch

from trivit.sparse.examples import ExampleConfig, ExampleSelector, ExampleStats, forgetting_scores, least_forgotten

NO_SYNC = lambda tensor: None  # noqa: E731  (one process: nothing to sum)


def logits_for(correct: list[bool], labels: list[int], classes: int = 3) -> torch.Tensor:
    """Logits whose argmax is the label where ``correct``, another class elsewhere."""
    logits = torch.zeros(len(labels), classes)
    for row, (ok, label) in enumerate(zip(correct, labels)):
        logits[row, label if ok else (label + 1) % classes] = 1.0
    return logits


def present(stats: ExampleStats, ids: list[int], correct: list[bool], losses=None, variance=None):
    labels = [i % 3 for i in ids]
    cls_attention = None
    if variance is not None:
        cls_attention = torch.stack([torch.tensor([0.0, (2.0 * v) ** 0.5]) for v in variance])  # sample variance v
    stats.update(torch.tensor(ids), logits_for(correct, labels), torch.tensor(labels), cls_attention,
                 torch.tensor(losses if losses is not None else [0.0] * len(ids)))


def test_forgetting_counts_on_a_hand_worked_sequence():
    stats = ExampleStats(4)
    # presentation:   1      2      3      4      5
    # sample 0:       C      C      W      C      W      -> 2 forgetting events
    # sample 1:       W      W      W                    -> never correct
    # sample 2:       C      C      C      C             -> 0
    # sample 3:              W      C      W      W      -> 1
    sequence = [
        ([0, 1, 2], [True, False, True]),
        ([0, 1, 2, 3], [True, False, True, False]),
        ([0, 1, 2, 3], [False, False, True, True]),
        ([0, 2, 3], [True, True, False]),
        ([0, 3], [False, False]),
    ]
    for ids, correct in sequence:
        present(stats, ids, correct)
    assert stats.forgetting.tolist() == [2, 0, 0, 1]
    assert stats.presentations.tolist() == [5, 3, 4, 4]
    assert stats.correct.tolist() == [3, 0, 4, 1]
    assert forgetting_scores(stats, window_epochs=5).tolist() == [2, 5, 0, 1]


def test_forgetting_counts_match_a_loop_reference():
    rng = random.Random(0)
    num_samples = 50
    stats = ExampleStats(num_samples)
    last, forgotten = {}, [0] * num_samples
    for _ in range(40):
        ids = rng.sample(range(num_samples), 12)
        correct = [rng.random() < 0.6 for _ in ids]
        present(stats, ids, correct)
        for i, ok in zip(ids, correct):
            forgotten[i] += int(last.get(i, False) and not ok)
            last[i] = ok
    assert stats.forgetting.tolist() == forgotten


def test_latest_loss_and_attention_variance_are_kept():
    stats = ExampleStats(3)
    present(stats, [0, 1], [True, True], losses=[0.5, 2.0], variance=[0.1, 0.3])
    present(stats, [1], [True], losses=[1.5], variance=[0.2])
    torch.testing.assert_close(stats.loss, torch.tensor([0.5, 1.5, 0.0]))
    torch.testing.assert_close(stats.attention_variance, torch.tensor([0.1, 0.2, 0.0]))


def test_least_forgotten_breaks_ties_by_lowest_attention_variance():
    active = torch.tensor([0, 2, 3, 5, 6, 8])
    scores = torch.tensor([1, 9, 0, 1, 9, 0, 2, 9, 1])
    variance = torch.tensor([0.5, 0.0, 0.3, 0.1, 0.0, 0.9, 0.0, 0.0, 0.2])
    # active ids by (score, variance): 2 (0, .3), 5 (0, .9), 3 (1, .1), 8 (1, .2), 0 (1, .5), 6 (2, 0)
    assert least_forgotten(active, scores, variance, 4).tolist() == [2, 5, 3, 8]


def test_forgetting_policy_initial_removal_and_refresh():
    config = ExampleConfig(policy="forgetting", initial_remove_fraction=0.2, remove_fraction=0.1,
                           refresh_every_epochs=2, max_refreshes=1)
    selector = ExampleSelector(config, 20, total_epochs=10, seed=0)
    first = selector.plan_epoch(0, NO_SYNC)
    assert int(first.active.sum()) == 16 and torch.equal(first.weights, torch.ones(20))
    pool_before = (~first.active).nonzero().squeeze(1)
    active_ids = first.active.nonzero().squeeze(1).tolist()
    # epoch 0 and 1: every active sample correct except two that flip correct -> wrong
    flips = active_ids[:2]
    for epoch in range(2):
        if epoch == 1:
            assert torch.equal(selector.plan_epoch(1, NO_SYNC).active, first.active), "no refresh before epoch 2"
        present(selector.stats, active_ids, [not (epoch == 1 and i in flips) for i in active_ids],
                variance=[0.01 * (k + 1) for k in range(len(active_ids))])
    second = selector.plan_epoch(2, NO_SYNC)
    assert int(second.active.sum()) == 16, "the active set keeps its size"
    left = (first.active & ~second.active).nonzero().squeeze(1).tolist()
    came_back = (second.active & ~first.active).nonzero().squeeze(1)
    assert left == sorted(active_ids[2:4]), "score 0, lowest attention variance first (the flipped ones score 1)"
    assert len(came_back) == 2 and set(came_back.tolist()) <= set(pool_before.tolist())
    assert int(selector.stats.presentations.sum()) == 0, "the statistics window restarts"
    for epoch in (3, 4, 6):
        assert torch.equal(selector.plan_epoch(epoch, NO_SYNC).active, second.active), "frozen after max_refreshes"


def reference_infobatch(loss, seen, ratio, pruned):
    mean = sum(value for value, s in zip(loss, seen) if s) / sum(seen)
    well = [s and value < mean for value, s in zip(loss, seen)]
    weights = [1.0 / (1 - ratio) if w and i not in pruned else 1.0 for i, w in enumerate(well)]
    return well, weights


def test_infobatch_prunes_below_mean_samples_and_rescales_the_rest():
    config = ExampleConfig(policy="infobatch", prune_ratio=0.5, delta=0.5)
    selector = ExampleSelector(config, 10, total_epochs=4, seed=0)
    assert selector.plan_epoch(0, NO_SYNC).active.all(), "nothing is scored before the first epoch"
    losses = [0.1, 2.0, 0.3, 0.2, 3.0, 0.4, 5.0, 0.05, 1.0, 4.0]
    present(selector.stats, list(range(10)), [True] * 10, losses=losses)
    plan = selector.plan_epoch(1, NO_SYNC)
    pruned = set((~plan.active).nonzero().squeeze(1).tolist())
    well, weights = reference_infobatch(losses, [True] * 10, 0.5, pruned)
    assert sum(well) == 6 and len(pruned) == 3 and all(well[i] for i in pruned)
    torch.testing.assert_close(plan.weights[plan.active], torch.tensor(weights)[plan.active])
    assert selector.plan_epoch(2, NO_SYNC).active.all(), "no pruning in the last (1 - delta) of training"


def test_infobatch_rescaling_keeps_the_expected_gradient_unbiased():
    """Monte Carlo over pruning draws: E[sum_i kept_i w_i g_i] = sum_i g_i."""
    torch.manual_seed(0)
    num_samples, dim, draws = 40, 3, 4000
    gradients = torch.randn(num_samples, dim, dtype=torch.float64)
    config = ExampleConfig(policy="infobatch", prune_ratio=0.5, delta=1.0)
    selector = ExampleSelector(config, num_samples, total_epochs=10, seed=1)
    losses = torch.cat([torch.linspace(0.0, 0.1, 20), torch.linspace(1.0, 2.0, 20)])  # 20 below the mean
    present(selector.stats, list(range(num_samples)), [True] * num_samples, losses=losses.tolist())
    total = torch.zeros(dim, dtype=torch.float64)
    for epoch in range(draws):
        plan = selector.plan_epoch(epoch % 9, NO_SYNC)
        total += ((plan.active * plan.weights).double().unsqueeze(1) * gradients).sum(0)
    estimate, exact = total / draws, gradients.sum(0)
    # per draw the estimator's spread is at most sqrt(sum of |g_i|^2 over the 20 pruned candidates)
    bound = 4 * gradients[:20].norm() / draws ** 0.5
    assert (estimate - exact).norm() < bound
    biased = ((torch.rand(draws, num_samples) > 0.25).double().mean(0).unsqueeze(1) * gradients).sum(0)
    assert (biased - exact).norm() > bound, "the check can tell a biased estimator apart"


def test_selector_state_round_trip_gives_the_same_decisions():
    config = ExampleConfig(policy="forgetting", refresh_every_epochs=1, max_refreshes=3)
    a = ExampleSelector(config, 30, total_epochs=5, seed=3)
    a.plan_epoch(0, NO_SYNC)
    present(a.stats, list(range(30)), [i % 3 == 0 for i in range(30)], variance=[0.01 * i for i in range(30)])
    b = ExampleSelector(config, 30, total_epochs=5, seed=99)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.plan_epoch(1, NO_SYNC).active, b.plan_epoch(1, NO_SYNC).active)
    assert torch.equal(a.plan_epoch(2, NO_SYNC).active, b.plan_epoch(2, NO_SYNC).active)


@pytest.mark.parametrize("key, value", [("initial_remove_fraction", 1.0), ("prune_ratio", -0.1), ("delta", 0.0),
                                        ("refresh_every_epochs", 0)])
def test_config_ranges(key, value):
    from trivit.config import ConfigError
    with pytest.raises(ConfigError, match=key):
        ExampleConfig(**{key: value})
