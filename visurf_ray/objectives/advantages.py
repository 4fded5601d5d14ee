"""Group-relative advantages: GRPO over G rollouts, and ViSurf with the label as group member G+1.

Pure torch on reward tensors (reward units, one value per completion). Must not import ray, transformers or
visurf_ray.rewards: reward controls that rewrite text (aligning, eliminating the label's thinking reward) happen before
this module; only smoothing (reward control 3) acts on the numbers and lives here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_rewards(name: str, rewards: object, ndim: int) -> None:
    if not isinstance(rewards, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(rewards).__name__}")
    if rewards.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(rewards.shape)}")
    if not rewards.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {rewards.dtype}")
    if rewards.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one group, got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"{name} must be finite (no NaN or inf)")


def _check_eps(eps: float) -> None:
    if not (isinstance(eps, int | float) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")


def constant_rows(rewards: Tensor) -> Tensor:
    """Groups whose rewards are all exactly equal (no learning signal).

    rewards: [B, K] reward units. Returns [B] bool.
    """
    return rewards.amax(dim=1) == rewards.amin(dim=1)


def group_advantages(
    rewards: Tensor, *, unbiased_std: bool = True, normalize_std: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO advantage of each group member relative to its group (row).

    Â_bk = (r_bk − mean_k r_b) / (std_k r_b + eps) with `normalize_std`, else r_bk − mean_k r_b (Dr.GRPO:
    mean-centring only). `unbiased_std` uses Bessel's correction (divide by K−1), otherwise the population std
    (divide by K). A group whose rewards are all equal gets advantage exactly 0 (no division by its zero std).

    rewards: [B, K] floating, reward units, K >= 2 members per group. Returns [B, K] of the same dtype (unitless with
    `normalize_std`, reward units without).
    """
    _check_rewards("rewards", rewards, ndim=2)
    if rewards.shape[1] < 2:
        raise ValueError(f"rewards must have at least 2 members per group (dim 1), got shape {tuple(rewards.shape)}")
    _check_eps(eps)
    constant = constant_rows(rewards).unsqueeze(1)
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std:
        std = rewards.std(dim=1, keepdim=True, correction=1 if unbiased_std else 0)
        centered = centered / torch.where(constant, torch.ones_like(std), std + eps)
    return torch.where(constant, torch.zeros_like(centered), centered)


def smoothing_mask(rollout_rewards: Tensor, label_rewards: Tensor) -> Tensor:
    """Where ViSurf's smoothing fires: the best rollout reaches the label's reward, max_j r(o_j) >= r(y).

    rollout_rewards: [B, G], label_rewards: [B], reward units. Returns [B] bool.
    """
    return rollout_rewards.amax(dim=1) >= label_rewards


def visurf_advantages(
    rollout_rewards: Tensor,
    label_rewards: Tensor,
    *,
    smoothing: bool = True,
    smoothing_reference: tuple[Tensor, Tensor] | None = None,
    unbiased_std: bool = True,
    normalize_std: bool = True,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """ViSurf advantages: the label y joins each group of G rollouts as member G+1, normalised over all G+1 rewards.

    With `smoothing` (reward control 3), where max_j r(o_j) >= r(y) the label's reward is replaced by the rollouts'
    mean m_G before normalisation, and its advantage is set to exactly 0.0. `smoothing_reference` = (rollout [B, G],
    label [B]) gives other rewards for that test only (e.g. both sides without the thinking-format reward, which the
    label's side has lost to reward control 2); m_G is always the mean of `rollout_rewards`.

    Smoothing rescaling (derivation). Let d_j = r(o_j) − m_G and S = Σ_j d_j². With r(y) := m_G the G+1 mean is m_G,
    the label's deviation is 0 and the rollouts' deviations d_j and S are unchanged; only the std's divisor changes:
      - population std: σ_{G+1} = √(S/(G+1)) = √(G/(G+1))·σ_G, so Â_j = √((G+1)/G) · Â_j^GRPO(population);
      - unbiased std:   σ_{G+1} = √(S/G) = √((G−1)/G)·σ_G, so Â_j = √(G/(G−1)) · Â_j^GRPO(unbiased), which is the
        G-group advantage with the *population* std;
      - without `normalize_std`: Â_j = Â_j^GRPO (factor 1).
    The factors are exact for eps = 0; with eps > 0 each std σ is replaced by σ + eps.

    All rollouts fail, label succeeds (r(o_j) = 0, r(y) = R > 0, smoothing does not fire): Â_y = √G and
    Â_j = −1/√G with the population std; Â_y = G/√(G+1) and Â_j = −1/√(G+1) with the unbiased std (eps = 0).

    rollout_rewards: [B, G] floating, label_rewards: [B] of the same dtype, reward units.
    Returns (rollout_adv [B, G], label_adv [B]).
    """
    _check_rewards("rollout_rewards", rollout_rewards, ndim=2)
    _check_rewards("label_rewards", label_rewards, ndim=1)
    if label_rewards.shape[0] != rollout_rewards.shape[0]:
        raise ValueError(
            f"label_rewards must have one reward per group ({rollout_rewards.shape[0]}), "
            f"got shape {tuple(label_rewards.shape)}"
        )
    if label_rewards.dtype != rollout_rewards.dtype:
        raise ValueError(
            f"label_rewards dtype {label_rewards.dtype} must equal rollout_rewards dtype {rollout_rewards.dtype}"
        )
    label = label_rewards
    if smoothing:
        reference = (rollout_rewards, label_rewards) if smoothing_reference is None else smoothing_reference
        for name, given, like in zip(("rollout", "label"), reference, (rollout_rewards, label_rewards)):
            if not isinstance(given, Tensor) or given.shape != like.shape:
                got = tuple(given.shape) if isinstance(given, Tensor) else type(given).__name__
                raise ValueError(f"smoothing_reference {name} rewards must have shape {tuple(like.shape)}, got {got}")
        fired = smoothing_mask(*reference)
        # Equal rollouts keep their exact value: a rounded mean would make the G+1 group look non-constant.
        rollout_mean = torch.where(constant_rows(rollout_rewards), rollout_rewards[:, 0], rollout_rewards.mean(dim=1))
        label = torch.where(fired, rollout_mean, label_rewards)
    advantages = group_advantages(
        torch.cat([rollout_rewards, label.unsqueeze(1)], dim=1),
        unbiased_std=unbiased_std,
        normalize_std=normalize_std,
        eps=eps,
    )
    rollout_adv, label_adv = advantages[:, :-1].contiguous(), advantages[:, -1]
    if smoothing:
        label_adv = torch.where(fired, torch.zeros_like(label_adv), label_adv)
    return rollout_adv, label_adv
