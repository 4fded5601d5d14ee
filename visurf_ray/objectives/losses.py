"""Token-level losses on log-probabilities: PPO/GRPO clipped surrogate, LUFFY's policy shaping, SFT negative
log-likelihood (optionally token-weighted), KL penalty, and the aggregations that turn per-token values into one scalar.

Pure torch on [N sequences, T tokens] tensors. Must not import ray, transformers or visurf_ray.rewards.

Conventions: `logp[n, t]` is log π(token t of completion n) in nats; `mask[n, t]` (bool) marks the completion tokens
that count. Masked-out positions must hold finite values (their gradient is multiplied by 0, and 0·inf is NaN).

Aggregations (`agg`):
  - "token-mean": sum over all counted tokens / number of counted tokens; a sequence weighs its share of the tokens.
  - "seq-mean-token-mean": mean over the N sequences of each sequence's token-mean; every sequence weighs exactly 1/N
    (the paper's 1/(G+1) per group member). A sequence with no counted token contributes 0 and still counts in N.
  - "seq-mean-token-sum": mean over the N sequences of each sequence's token sum (Dr.GRPO). Dr.GRPO's division by a
    constant maximum length only rescales the loss (a learning-rate change, invisible to Adam up to its eps), so it is
    not offered.
An all-empty mask gives 0 for every aggregation, never NaN.

Validation: the public functions check their arguments (`visurf_ray.validation`; shapes and dtypes, no device work)
and call unchecked cores (`_policy_loss`, `_sft_loss`, ...), which the paradigms call directly once `Paradigm.loss`
has checked its tensors and `ObjectiveConfig` its scalars (clip range, γ, aggregation, KL estimator).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from visurf_ray.validation import check_choice, check_number, check_tensor, require


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over the positions where `mask` is True ("token-mean"); 0 when the mask is empty.

    values: [N, T] floating; mask: [N, T] bool. Returns a scalar of values' dtype.
    """
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1).to(values.dtype)


def _seq_mean_token_mean(values: Tensor, mask: Tensor) -> Tensor:
    per_sequence = torch.where(mask, values, torch.zeros_like(values)).sum(dim=1)
    return (per_sequence / mask.sum(dim=1).clamp(min=1).to(values.dtype)).mean()


def _seq_mean_token_sum(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, torch.zeros_like(values)).sum(dim=1).mean()


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "token-mean": masked_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum": _seq_mean_token_sum,
}


def _low_var_kl(log_ratio: Tensor) -> Tensor:
    ref_log_ratio = (-log_ratio).clamp(-20.0, 20.0)
    return (torch.exp(ref_log_ratio) - ref_log_ratio - 1.0).clamp(-10.0, 10.0)


# Per-token estimators of KL(π_θ ‖ π_ref) from log_ratio = logp − ref_logp, on tokens sampled from π_θ (verl's names).
KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {
    "kl": lambda log_ratio: log_ratio,  # k1
    "abs": lambda log_ratio: log_ratio.abs(),
    "mse": lambda log_ratio: 0.5 * log_ratio.square(),  # k2
    "low_var_kl": _low_var_kl,  # k3 = exp(−log_ratio) + log_ratio − 1, log ratio clamped to ±20, result to ±10
}


def get_aggregation(agg: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The aggregation registered as `agg` (see the module docstring); ValueError naming `agg` otherwise."""
    check_choice("agg", agg, sorted(AGGREGATIONS))
    return AGGREGATIONS[agg]


def get_kl_estimator(kind: str) -> Callable[[Tensor], Tensor]:
    """The per-token KL estimator registered as `kind`; ValueError naming `kind` otherwise."""
    check_choice("kind", kind, sorted(KL_ESTIMATORS))
    return KL_ESTIMATORS[kind]


def check_clip_range(clip_low: float, clip_high: float) -> None:
    """ValueError naming the argument unless 0 < clip_low < 1 and clip_high > 0, finite (the ratio is clipped to
    [1 − clip_low, 1 + clip_high])."""
    check_number("clip_low", clip_low, low=0, high=1, low_open=True, high_open=True)
    check_number("clip_high", clip_high, low=0, low_open=True)


def check_token_batch(logp: object, mask: object, **same_as_logp: object) -> None:
    """The token-level contract of this module's entry functions: logp a floating [N, T] tensor with N >= 1; each of
    `same_as_logp` (by name) of logp's dtype and shape; mask torch.bool of logp's shape. ValueError naming the argument.
    Shapes and dtypes only: no device work."""
    check_tensor("logp", logp, floating=True, ndim=2, dims="[N, T]", nonempty="sequence")
    assert isinstance(logp, Tensor)
    for name, tensor in same_as_logp.items():
        check_tensor(name, tensor, dtype=logp.dtype, shape=logp.shape)
    check_tensor("mask", mask, dtype=torch.bool, shape=logp.shape)


def check_advantages(advantages: object, logp: Tensor) -> None:
    """Advantages must be floating, of shape [N] (one per sequence) or [N, T] (per token), N, T as logp's."""
    check_tensor("advantages", advantages, floating=True)
    assert isinstance(advantages, Tensor)
    require(
        advantages.shape in (logp.shape[:1], logp.shape),
        "advantages",
        f"must have shape {tuple(logp.shape[:1])} or {tuple(logp.shape)}, got {tuple(advantages.shape)}",
    )


def _token_advantages(advantages: Tensor, logp: Tensor) -> Tensor:
    """Checked advantages [N] or [N, T] as [N, 1] or [N, T] in logp's dtype."""
    if advantages.ndim == 1:
        advantages = advantages.unsqueeze(1)
    return advantages.to(logp.dtype)


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2
) -> tuple[Tensor, Tensor]:
    """The clipped surrogate per token, before aggregation: max(−Â·ρ, −Â·clip(ρ, 1 − clip_low, 1 + clip_high)) with
    ρ = exp(logp − old_logp). Arguments as `policy_loss`'s, validated the same way.

    Returns (values [N, T] of logp's dtype, clipped [N, T] bool: where the clipped term is the active one).
    """
    check_token_batch(logp, mask, old_logp=old_logp)
    check_advantages(advantages, logp)
    check_clip_range(clip_low, clip_high)
    return _clipped_surrogate(logp, old_logp, advantages, clip_low, clip_high)


def _clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float, clip_high: float
) -> tuple[Tensor, Tensor]:
    """`clipped_surrogate` on checked arguments (callers below an entry: the paradigms' losses)."""
    advantages = _token_advantages(advantages, logp)
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    return torch.maximum(unclipped, clipped), (clipped > unclipped).detach()


def approx_kl(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """KL(π_old ‖ π_θ) estimated by k3 = (ρ − 1) − log ρ, ρ = exp(logp − old_logp), token-mean over the mask (nats).

    logp, old_logp: [N, T] log-probs; mask: [N, T] bool. Returns a detached scalar."""
    with torch.no_grad():
        log_ratio = logp - old_logp
        return masked_mean(torch.exp(log_ratio) - 1.0 - log_ratio, mask)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token-mean",
) -> tuple[Tensor, dict[str, float]]:
    """PPO/GRPO clipped surrogate: per token max(−Â·ρ, −Â·clip(ρ, 1 − clip_low, 1 + clip_high)), aggregated by `agg`.

    ρ = exp(logp − old_logp). A token whose ratio left the clip range in the direction its advantage pushes gets zero
    gradient; in the other direction the unclipped term stays active.

    logp, old_logp: [N, T] log-probs (nats), same floating dtype; advantages: [N] (one per sequence) or [N, T]
    (per token), floating, cast to logp's dtype; mask: [N, T] bool.
    Returns (loss: scalar, metrics) with metrics (token-means over the mask, whatever `agg`):
      clip_fraction — share of tokens where the clipped term is the active one;
      approx_kl — KL(π_old ‖ π_θ) estimated by k3 = (ρ − 1) − log ρ.
    """
    check_token_batch(logp, mask, old_logp=old_logp)
    check_advantages(advantages, logp)
    check_clip_range(clip_low, clip_high)
    return _policy_loss(logp, old_logp, advantages, mask, clip_low, clip_high, get_aggregation(agg))


def _policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    aggregate: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Tensor, dict[str, float]]:
    """`policy_loss` on checked arguments (callers below an entry: the paradigms' losses)."""
    values, clipped = _clipped_surrogate(logp, old_logp, advantages, clip_low, clip_high)
    loss = aggregate(values, mask)
    metrics = {
        "clip_fraction": masked_mean(clipped.to(logp.dtype), mask).item(),
        "approx_kl": approx_kl(logp, old_logp, mask).item(),
    }
    return loss, metrics


def policy_shaping(logp: Tensor, gamma: float) -> Tensor:
    """LUFFY's policy shaping per token: f(π) = π/(π + γ), π = exp(logp), with the gradient through π.

    d f / d log π = γ·π/(π + γ)²: at most 1/4 (at π = γ), so unlike the SFT gradient (weight 1 on ∇ log π) it
    vanishes on tokens the policy already finds likely and stays finite on unlikely ones. logp: [N, T] log-probs
    (nats); gamma > 0. Returns [N, T] in (0, 1), of logp's dtype.
    """
    check_number("gamma", gamma, low=0, low_open=True)
    return _policy_shaping(logp, gamma)


def _policy_shaping(logp: Tensor, gamma: float) -> Tensor:
    """`policy_shaping` with a checked gamma (callers below an entry: LUFFY's loss)."""
    probability = torch.exp(logp)
    return probability / (probability + gamma)


def sft_loss(logp: Tensor, mask: Tensor, *, agg: str = "token-mean", token_weight: Tensor | None = None) -> Tensor:
    """Supervised fine-tuning loss: negative log-likelihood of the counted tokens, aggregated by `agg`.

    logp: [N, T] log-probs (nats) of the target tokens; mask: [N, T] bool; token_weight: optional [N, T] weight of
    each token's log-likelihood (e.g. CHORD's φ), of logp's dtype, used as given (detach it for a constant weight).
    Returns a scalar (nats per token for the token-mean aggregations, nats per sequence for "seq-mean-token-sum").
    """
    if token_weight is None:
        check_token_batch(logp, mask)
    else:
        check_token_batch(logp, mask, token_weight=token_weight)
    return _sft_loss(logp, mask, get_aggregation(agg), token_weight)


def _sft_loss(
    logp: Tensor, mask: Tensor, aggregate: Callable[[Tensor, Tensor], Tensor], token_weight: Tensor | None = None
) -> Tensor:
    """`sft_loss` on checked arguments (callers below an entry: the paradigms' losses)."""
    if token_weight is None:
        return -aggregate(logp, mask)
    return -aggregate(token_weight * logp, mask)


def kl_penalty(
    logp: Tensor, ref_logp: Tensor, mask: Tensor, kind: str = "low_var_kl", *, agg: str = "token-mean"
) -> Tensor:
    """KL(π_θ ‖ π_ref) penalty: the per-token estimator `kind` (see KL_ESTIMATORS), aggregated by `agg`.

    logp, ref_logp: [N, T] log-probs (nats) of tokens sampled from π_θ, same floating dtype; mask: [N, T] bool.
    Returns a scalar (nats).
    """
    check_token_batch(logp, mask, ref_logp=ref_logp)
    return _kl_penalty(logp, ref_logp, mask, get_kl_estimator(kind), get_aggregation(agg))


def _kl_penalty(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    estimator: Callable[[Tensor], Tensor],
    aggregate: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """`kl_penalty` on checked arguments (callers below an entry: the paradigms' losses)."""
    return aggregate(estimator(logp - ref_logp), mask)
