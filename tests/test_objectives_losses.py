"""Clipped surrogate, LUFFY's policy shaping, SFT loss (plain and token-weighted), KL penalty and aggregations against
their direct formulas, in float64."""

import math

import pytest
import torch

from visurf_ray.objectives import (
    AGGREGATIONS,
    clipped_surrogate,
    kl_penalty,
    masked_mean,
    policy_loss,
    policy_shaping,
    sft_loss,
)

F64 = torch.float64


def _batch(seed: int = 0, n: int = 4, t: int = 6):
    generator = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=generator, dtype=F64) * 3.0
    old_logp = logp + 0.3 * torch.randn(n, t, generator=generator, dtype=F64)
    mask = torch.rand(n, t, generator=generator) < 0.7
    mask[:, 0] = True
    mask[1] = False  # one sequence with no counted token
    advantages = torch.randn(n, generator=generator, dtype=F64)
    return logp, old_logp, mask, advantages


def _direct_aggregate(values, mask, agg):
    """Loops over sequences and tokens."""
    rows = [[v for v, m in zip(row, mrow) if m] for row, mrow in zip(values.tolist(), mask.tolist())]
    if agg == "token-mean":
        counted = [v for row in rows for v in row]
        return sum(counted) / max(len(counted), 1)
    if agg == "seq-mean-token-mean":
        return sum(sum(row) / len(row) if row else 0.0 for row in rows) / len(rows)
    return sum(sum(row) for row in rows) / len(rows)


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_aggregations_equal_direct_formulas(agg):
    logp, _, mask, _ = _batch()
    logp[~mask] = float("inf")  # masked positions never reach the sum
    expected = _direct_aggregate(torch.where(mask, logp, 0.0), mask, agg)
    assert AGGREGATIONS[agg](logp, mask).item() == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_all_empty_mask_gives_zero_not_nan(agg):
    logp, old_logp, _, advantages = _batch()
    logp.requires_grad_(True)
    empty = torch.zeros_like(logp, dtype=torch.bool)
    loss, metrics = policy_loss(logp, old_logp, advantages, empty, agg=agg)
    assert loss.item() == 0.0 and metrics == {"clip_fraction": 0.0, "approx_kl": 0.0}
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    assert sft_loss(logp, empty, agg=agg).item() == 0.0


def test_seq_mean_token_mean_counts_empty_sequences():
    values = torch.tensor([[1.0, 3.0], [5.0, 7.0]], dtype=F64)
    mask = torch.tensor([[True, True], [False, False]])
    assert AGGREGATIONS["seq-mean-token-mean"](values, mask).item() == 1.0  # (2 + 0) / 2 sequences


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_policy_loss_equals_direct_clipped_surrogate(agg):
    logp, old_logp, mask, advantages = _batch(seed=1)
    clip_low, clip_high = 0.1, 0.25
    ratio = torch.exp(logp - old_logp)
    per_token = torch.tensor(
        [
            [max(-a * r, -a * min(max(r, 1 - clip_low), 1 + clip_high)) for r in ratio_row]
            for a, ratio_row in zip(advantages.tolist(), ratio.tolist())
        ],
        dtype=F64,
    )
    loss, metrics = policy_loss(logp, old_logp, advantages, mask, clip_low=clip_low, clip_high=clip_high, agg=agg)
    assert loss.item() == pytest.approx(_direct_aggregate(per_token, mask, agg), rel=1e-12)

    a = advantages.unsqueeze(1)
    clipped = ((a > 0) & (ratio > 1 + clip_high)) | ((a < 0) & (ratio < 1 - clip_low))
    assert metrics["clip_fraction"] == pytest.approx(clipped[mask].double().mean().item(), rel=1e-12)
    log_ratio = (logp - old_logp)[mask]
    assert metrics["approx_kl"] == pytest.approx((log_ratio.exp() - 1 - log_ratio).mean().item(), rel=1e-12)


def test_per_token_advantages_equal_broadcast_sequence_advantages():
    logp, old_logp, mask, advantages = _batch(seed=2)
    per_sequence, _ = policy_loss(logp, old_logp, advantages, mask)
    per_token, _ = policy_loss(logp, old_logp, advantages.unsqueeze(1).expand_as(logp), mask)
    assert per_token.item() == per_sequence.item()


@pytest.mark.parametrize(
    ("advantage", "log_ratio", "gradient_is_zero"),
    [
        (1.0, math.log(1.5), True),  # pushed up past 1 + clip_high: clipped
        (1.0, math.log(0.5), False),  # below 1 - clip_low, advantage pushes back up: unclipped
        (-1.0, math.log(0.5), True),  # pushed down past 1 - clip_low: clipped
        (-1.0, math.log(1.5), False),  # above 1 + clip_high, advantage pushes back down: unclipped
        (1.0, math.log(1.1), False),  # inside the range
    ],
)
def test_clipped_direction_has_zero_gradient(advantage, log_ratio, gradient_is_zero):
    old_logp = torch.full((1, 3), -1.0, dtype=F64)
    logp = (old_logp + log_ratio).requires_grad_(True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, metrics = policy_loss(logp, old_logp, torch.tensor([advantage], dtype=F64), mask, clip_low=0.2, clip_high=0.2)
    loss.backward()
    ratio = math.exp(log_ratio)
    if gradient_is_zero:
        assert torch.equal(logp.grad, torch.zeros_like(logp))
        assert metrics["clip_fraction"] == 1.0
    else:
        # d/dlogp of −Â·ρ under token-mean over 3 tokens.
        torch.testing.assert_close(logp.grad, torch.full((1, 3), -advantage * ratio / 3, dtype=F64), rtol=1e-13, atol=0)
        assert metrics["clip_fraction"] == 0.0


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_sft_loss_is_negative_aggregated_log_likelihood(agg):
    logp, _, mask, _ = _batch(seed=3)
    assert sft_loss(logp, mask, agg=agg).item() == pytest.approx(-_direct_aggregate(logp, mask, agg), rel=1e-13)


@pytest.mark.parametrize("agg", sorted(AGGREGATIONS))
def test_token_weighted_sft_loss_weighs_each_log_likelihood(agg):
    logp, _, mask, _ = _batch(seed=4)
    weight = torch.rand(logp.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    expected = -_direct_aggregate(weight * logp, mask, agg)
    assert sft_loss(logp, mask, agg=agg, token_weight=weight).item() == pytest.approx(expected, rel=1e-13)
    assert (
        sft_loss(logp, mask, agg=agg, token_weight=torch.ones_like(logp)).item() == sft_loss(logp, mask, agg=agg).item()
    )
    with pytest.raises(ValueError, match="token_weight must be"):
        sft_loss(logp, mask, token_weight=weight[:, :2])


def test_clipped_surrogate_is_policy_loss_before_aggregation():
    logp, old_logp, mask, advantages = _batch(seed=5)
    values, clipped = clipped_surrogate(logp, old_logp, advantages, mask, clip_low=0.1, clip_high=0.15)
    loss, metrics = policy_loss(logp, old_logp, advantages, mask, clip_low=0.1, clip_high=0.15, agg="token-mean")
    assert loss.item() == pytest.approx(_direct_aggregate(values, mask, "token-mean"), rel=1e-13)
    assert metrics["clip_fraction"] == pytest.approx(_direct_aggregate(clipped.double(), mask, "token-mean"), rel=1e-13)
    assert 0 < metrics["clip_fraction"] < 1


def test_policy_shaping_value_and_gradient():
    """f(π) = π/(π + γ) with d f / d log π = γπ/(π + γ)², largest (1/4) at π = γ."""
    gamma = 0.1
    probabilities = torch.tensor([1e-4, 0.05, 0.1, 0.5, 0.999], dtype=F64)
    logp = probabilities.log().reshape(1, -1).requires_grad_()
    shaped = policy_shaping(logp, gamma)
    torch.testing.assert_close(shaped.detach()[0], probabilities / (probabilities + gamma), rtol=1e-14, atol=0)
    shaped.sum().backward()
    torch.testing.assert_close(logp.grad[0], gamma * probabilities / (probabilities + gamma) ** 2, rtol=1e-12, atol=0)
    assert logp.grad[0, 2].item() == pytest.approx(0.25, rel=1e-12) and logp.grad.max() == logp.grad[0, 2]
    for bad in (0.0, -0.1, float("inf"), True):
        with pytest.raises(ValueError, match="gamma must be"):
            policy_shaping(logp, bad)


@pytest.mark.parametrize(
    ("kind", "formula"),
    [
        ("kl", lambda d: d),
        ("abs", lambda d: abs(d)),
        ("mse", lambda d: 0.5 * d * d),
        ("low_var_kl", lambda d: min(max(math.exp(-d) + d - 1, -10.0), 10.0)),
    ],
)
def test_kl_penalty_equals_direct_formulas(kind, formula):
    logp, _, mask, _ = _batch(seed=4)
    ref_logp = logp + torch.linspace(-3.0, 3.0, logp.numel(), dtype=F64).reshape(logp.shape)
    ref_logp[0, 0] = logp[0, 0] + 15.0  # k3 beyond its clamp
    per_token = torch.tensor([[formula(d) for d in row] for row in (logp - ref_logp).tolist()], dtype=F64)
    for agg in AGGREGATIONS:
        got = kl_penalty(logp, ref_logp, mask, kind, agg=agg).item()
        assert got == pytest.approx(_direct_aggregate(per_token, mask, agg), rel=1e-12)
    if kind == "low_var_kl":
        assert per_token[0, 0].item() == 10.0


def test_kl_penalty_is_zero_at_reference_and_nonnegative_for_k3():
    logp, _, mask, _ = _batch(seed=5)
    assert kl_penalty(logp, logp.clone(), mask).item() == 0.0
    assert kl_penalty(logp, logp - 0.7, mask).item() > 0
    assert kl_penalty(logp, logp + 0.7, mask).item() > 0


def test_masked_mean_ignores_masked_values():
    values = torch.tensor([[1.0, float("nan")], [3.0, 5.0]], dtype=F64)
    mask = torch.tensor([[True, False], [True, True]])
    assert masked_mean(values, mask).item() == 3.0


def _valid():
    logp, old_logp, mask, advantages = _batch()
    return {"logp": logp, "old_logp": old_logp, "advantages": advantages, "mask": mask}


@pytest.mark.parametrize(
    ("field", "bad", "match"),
    [
        ("logp", torch.zeros(4, dtype=F64), r"logp must have 2 dimension\(s\) \[N, T\], got shape \(4,\)"),
        ("logp", torch.zeros(4, 6, dtype=torch.int64), "logp must be a floating-point"),
        ("old_logp", torch.zeros(4, 5, dtype=F64), "old_logp must be"),
        ("old_logp", torch.zeros(4, 6, dtype=torch.float32), "old_logp must be a torch.float64"),
        ("mask", torch.ones(4, 6, dtype=F64), "mask must be a torch.bool"),
        ("mask", torch.ones(4, 5, dtype=torch.bool), "mask must be"),
        ("advantages", torch.zeros(3, dtype=F64), "advantages must have shape"),
        ("advantages", torch.zeros(4, dtype=torch.int64), "advantages must be a floating-point"),
    ],
)
def test_policy_loss_rejects_bad_tensors(field, bad, match):
    kwargs = _valid() | {field: bad}
    with pytest.raises(ValueError, match=match):
        policy_loss(**kwargs)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"agg": "seq-sum"}, "agg must be one of"),
        ({"clip_low": 1.0}, "clip_low"),
        ({"clip_low": 0.0}, "clip_low"),
        ({"clip_high": -0.1}, "clip_high"),
        ({"clip_high": float("inf")}, "clip_high"),
    ],
)
def test_policy_loss_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        policy_loss(**_valid(), **options)


def test_sft_and_kl_reject_bad_names_and_tensors():
    logp, _, mask, _ = _batch()
    with pytest.raises(ValueError, match="agg must be one of"):
        sft_loss(logp, mask, agg="sum")
    with pytest.raises(ValueError, match="kind must be one of"):
        kl_penalty(logp, logp, mask, "k3")
    with pytest.raises(ValueError, match="ref_logp must be"):
        kl_penalty(logp, logp[:, :3], mask)
    with pytest.raises(ValueError, match="mask must be"):
        sft_loss(logp, mask.long())
