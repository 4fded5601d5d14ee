"""Group advantages (GRPO) and ViSurf advantages (label as member G+1, smoothing), in float64."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from visurf_ray.objectives import group_advantages, smoothing_mask, visurf_advantages

F64 = torch.float64


def _direct_group_advantages(rewards: np.ndarray, ddof: int, eps: float) -> np.ndarray:
    """Row by row, from the definition Â = (r − mean) / (std + eps)."""
    out = np.zeros_like(rewards)
    for b, row in enumerate(rewards):
        mean = sum(row) / len(row)
        std = math.sqrt(sum((r - mean) ** 2 for r in row) / (len(row) - ddof))
        out[b] = [(r - mean) / (std + eps) for r in row]
    return out


@pytest.mark.parametrize("unbiased_std", [True, False])
@pytest.mark.parametrize("eps", [0.0, 1e-6, 0.5])
def test_group_advantages_equal_direct_formula(unbiased_std, eps):
    rewards = torch.rand(5, 8, generator=torch.Generator().manual_seed(0), dtype=F64) * 3.0
    expected = _direct_group_advantages(rewards.numpy(), ddof=1 if unbiased_std else 0, eps=eps)
    got = group_advantages(rewards, unbiased_std=unbiased_std, eps=eps)
    assert got.dtype == F64
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-14)


def test_normalize_std_false_is_mean_centring_only():
    rewards = torch.tensor([[0.0, 1.0, 2.0, 5.0], [1.0, 1.0, 0.0, 0.0]], dtype=F64)
    got = group_advantages(rewards, normalize_std=False)
    expected = torch.tensor([[-2.0, -1.0, 0.0, 3.0], [0.5, 0.5, -0.5, -0.5]], dtype=F64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("normalize_std", [True, False])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_equal_reward_rows_give_exactly_zero_without_nan(normalize_std, eps):
    # 0.1 is inexact in binary: its rounded mean differs from 0.1, which must not leak into the advantages.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.0, 0.0, 0.0], [1.0, 0.0, 0.5]], dtype=F64)
    got = group_advantages(rewards, normalize_std=normalize_std, eps=eps)
    assert not torch.isnan(got).any()
    assert torch.equal(got[:2], torch.zeros(2, 3, dtype=F64))
    assert (got[2] != 0).sum() == 2


# Reward-like values (1e-3 resolution), far from the underflow of squared deviations.
@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.lists(st.floats(-10, 10).map(lambda reward: round(reward, 3)), min_size=4, max_size=4),
        min_size=1,
        max_size=3,
    )
)
def test_group_advantages_have_zero_mean_and_unit_std_per_row(rows):
    rewards = torch.tensor(rows, dtype=F64)
    advantages = group_advantages(rewards, unbiased_std=False, eps=0.0)
    torch.testing.assert_close(advantages.sum(dim=1), torch.zeros(len(rows), dtype=F64), rtol=0, atol=1e-9)
    for reward_row, advantage_row in zip(rewards, advantages):
        if reward_row.std() > 1e-3:
            assert advantage_row.std(correction=0).item() == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("group_size", [2, 4, 8])
@pytest.mark.parametrize("label_reward", [1.0, 2.5])
def test_all_rollouts_fail_label_succeeds(group_size, label_reward):
    rollouts = torch.zeros(1, group_size, dtype=F64)
    label = torch.tensor([label_reward], dtype=F64)
    g = group_size

    rollout_adv, label_adv = visurf_advantages(rollouts, label, unbiased_std=False, eps=0.0)
    assert label_adv.item() == pytest.approx(math.sqrt(g), rel=1e-13)
    torch.testing.assert_close(rollout_adv, torch.full((1, g), -1 / math.sqrt(g), dtype=F64), rtol=1e-13, atol=0)

    rollout_adv, label_adv = visurf_advantages(rollouts, label, unbiased_std=True, eps=0.0)
    assert label_adv.item() == pytest.approx(g / math.sqrt(g + 1), rel=1e-13)
    torch.testing.assert_close(rollout_adv, torch.full((1, g), -1 / math.sqrt(g + 1), dtype=F64), rtol=1e-13, atol=0)
    assert (rollout_adv < 0).all()
    # GRPO alone gives no signal on this group.
    assert torch.equal(group_advantages(rollouts), torch.zeros(1, g, dtype=F64))


def _smoothing_batch():
    rollouts = torch.tensor([[0.0, 1.0, 0.5, 0.25], [2.0, 0.0, 0.0, 1.0], [0.3, 0.9, 0.1, 0.6]], dtype=F64)
    labels = torch.tensor([1.0, 1.5, 0.2], dtype=F64)  # max rollout >= label in every row (ties in row 0)
    return rollouts, labels


@pytest.mark.parametrize(
    ("unbiased_std", "normalize_std", "factor"),
    [
        (False, True, lambda g: math.sqrt((g + 1) / g)),
        (True, True, lambda g: math.sqrt(g / (g - 1))),
        (True, False, lambda g: 1.0),
        (False, False, lambda g: 1.0),
    ],
)
def test_smoothing_zeroes_label_and_rescales_group_advantages(unbiased_std, normalize_std, factor):
    rollouts, labels = _smoothing_batch()
    g = rollouts.shape[1]
    assert smoothing_mask(rollouts, labels).all()
    rollout_adv, label_adv = visurf_advantages(
        rollouts, labels, unbiased_std=unbiased_std, normalize_std=normalize_std, eps=0.0
    )
    assert torch.equal(label_adv, torch.zeros(3, dtype=F64))
    grpo = group_advantages(rollouts, unbiased_std=unbiased_std, normalize_std=normalize_std, eps=0.0)
    torch.testing.assert_close(rollout_adv, factor(g) * grpo, rtol=1e-12, atol=1e-14)


def test_smoothed_unbiased_advantages_equal_grpo_with_population_std():
    rollouts, labels = _smoothing_batch()
    rollout_adv, _ = visurf_advantages(rollouts, labels, unbiased_std=True, eps=0.0)
    torch.testing.assert_close(rollout_adv, group_advantages(rollouts, unbiased_std=False, eps=0.0), rtol=1e-12, atol=0)


def test_smoothing_only_where_best_rollout_reaches_label():
    rollouts = torch.tensor([[0.0, 0.5, 0.2], [0.0, 0.5, 0.2]], dtype=F64)
    labels = torch.tensor([0.5, 0.9], dtype=F64)  # row 0: tie fires; row 1: label strictly better
    assert smoothing_mask(rollouts, labels).tolist() == [True, False]
    rollout_adv, label_adv = visurf_advantages(rollouts, labels, eps=0.0)
    assert label_adv[0].item() == 0.0
    unsmoothed_rollout, unsmoothed_label = visurf_advantages(rollouts, labels, smoothing=False, eps=0.0)
    assert label_adv[1].item() == unsmoothed_label[1].item() > 0
    torch.testing.assert_close(rollout_adv[1], unsmoothed_rollout[1], rtol=0, atol=0)
    assert unsmoothed_label[0].item() > 0  # without smoothing, the tie row still supervises the label


def test_smoothing_on_equal_rollouts_gives_all_zero_advantages():
    rollouts = torch.full((2, 3), 0.1, dtype=F64)
    labels = torch.tensor([0.1, 0.05], dtype=F64)
    rollout_adv, label_adv = visurf_advantages(rollouts, labels, eps=0.0)
    assert torch.equal(rollout_adv, torch.zeros(2, 3, dtype=F64))
    assert torch.equal(label_adv, torch.zeros(2, dtype=F64))


@pytest.mark.parametrize(
    ("rewards", "match"),
    [
        (torch.zeros(4, dtype=F64), "rewards must have 2"),
        (torch.zeros(2, 3, dtype=torch.int64), "rewards must be a floating"),
        (torch.zeros(2, 1, dtype=F64), "rewards must have at least 2 members"),
        (torch.zeros(0, 3, dtype=F64), "rewards must hold at least one group"),
        (torch.tensor([[0.0, float("nan")]], dtype=F64), "rewards must be finite"),
        ([[0.0, 1.0]], "rewards must be a floating-point tensor, got list"),
    ],
)
def test_group_advantages_reject_bad_rewards(rewards, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards)


def test_group_advantages_reject_negative_eps():
    with pytest.raises(ValueError, match="eps"):
        group_advantages(torch.zeros(1, 2, dtype=F64), eps=-1e-6)


@pytest.mark.parametrize(
    ("rollouts", "labels", "match"),
    [
        (torch.zeros(2, 3, dtype=F64), torch.zeros(3, dtype=F64), "label_rewards must have one reward per group"),
        (torch.zeros(2, 3, dtype=F64), torch.zeros(2, 1, dtype=F64), "label_rewards must have 1 dimension"),
        (torch.zeros(2, 3, dtype=F64), torch.zeros(2, dtype=torch.float32), "label_rewards dtype"),
        (torch.zeros(6, dtype=F64), torch.zeros(2, dtype=F64), "rollout_rewards must have 2 dimension"),
    ],
)
def test_visurf_advantages_reject_bad_shapes(rollouts, labels, match):
    with pytest.raises(ValueError, match=match):
        visurf_advantages(rollouts, labels)
