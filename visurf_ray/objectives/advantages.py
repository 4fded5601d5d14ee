"""Group-relative advantages: GRPO over G rollouts, and ViSurf with the label as group member G+1.

Pure torch on reward tensors (reward units, one value per completion). Must not import ray, transformers or
visurf_ray.rewards: reward controls that rewrite text (aligning, eliminating the label's thinking reward) happen before
this module; only smoothing (reward control 3) acts on the numbers and lives here.

Validation: the public functions check their rewards (`check_rewards`: finite values, read on the CPU tensors the
trainer builds) and call unchecked cores, which the paradigms call once `Paradigm.advantages` has checked the rewards.
"""

from __future__ import annotations

import torch
from torch import Tensor

from visurf_ray.validation import check_number, check_tensor, require


def check_rewards(where: str, rewards: object, ndim: int) -> None:
    """Rewards must be a finite floating tensor with `ndim` dimensions and at least one group (dim 0). Reads the values
    (isfinite): call it on the CPU reward tensors the trainer builds, once per step."""
    check_tensor(where, rewards, floating=True, ndim=ndim, nonempty="group", finite=True)


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
    check_rewards("rewards", rewards, ndim=2)
    require(
        rewards.shape[1] >= 2,
        "rewards",
        f"must have at least 2 members per group (dim 1), got shape {tuple(rewards.shape)}",
    )
    check_number("eps", eps, low=0)
    return _group_advantages(rewards, unbiased_std, normalize_std, eps)


def _group_advantages(rewards: Tensor, unbiased_std: bool, normalize_std: bool, eps: float) -> Tensor:
    """`group_advantages` on checked arguments (callers below an entry: `visurf_advantages`, the paradigms)."""
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
    check_rewards("rollout_rewards", rollout_rewards, ndim=2)
    check_rewards("label_rewards", label_rewards, ndim=1)
    check_label_pairing(rollout_rewards, label_rewards, smoothing_reference if smoothing else None)
    check_number("eps", eps, low=0)
    return _visurf_advantages(
        rollout_rewards, label_rewards, smoothing, smoothing_reference, unbiased_std, normalize_std, eps
    )


def check_label_pairing(
    rollout_rewards: Tensor, label_rewards: Tensor, smoothing_reference: tuple[Tensor, Tensor] | None = None
) -> None:
    """The label's side of `visurf_advantages`' contract, on rewards that passed `check_rewards`: one label reward per
    group, of the rollouts' dtype, and, when given, smoothing_reference's two tensors of the same shapes."""
    require(
        label_rewards.shape[0] == rollout_rewards.shape[0],
        "label_rewards",
        f"must have one reward per group ({rollout_rewards.shape[0]}), got shape {tuple(label_rewards.shape)}",
    )
    require(
        label_rewards.dtype == rollout_rewards.dtype,
        "label_rewards",
        f"dtype {label_rewards.dtype} must equal rollout_rewards dtype {rollout_rewards.dtype}",
    )
    if smoothing_reference is not None:
        for name, given, like in zip(("rollout", "label"), smoothing_reference, (rollout_rewards, label_rewards)):
            check_tensor(f"smoothing_reference {name} rewards", given, shape=like.shape)


def _visurf_advantages(
    rollout_rewards: Tensor,
    label_rewards: Tensor,
    smoothing: bool,
    smoothing_reference: tuple[Tensor, Tensor] | None,
    unbiased_std: bool,
    normalize_std: bool,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """`visurf_advantages` on checked arguments (callers below an entry: ViSurf's paradigm)."""
    label = label_rewards
    if smoothing:
        reference = (rollout_rewards, label_rewards) if smoothing_reference is None else smoothing_reference
        fired = smoothing_mask(*reference)
        # Equal rollouts keep their exact value: a rounded mean would make the G+1 group look non-constant.
        rollout_mean = torch.where(constant_rows(rollout_rewards), rollout_rewards[:, 0], rollout_rewards.mean(dim=1))
        label = torch.where(fired, rollout_mean, label_rewards)
    advantages = _group_advantages(
        torch.cat([rollout_rewards, label.unsqueeze(1)], dim=1), unbiased_std, normalize_std, eps
    )
    rollout_adv, label_adv = advantages[:, :-1].contiguous(), advantages[:, -1]
    if smoothing:
        label_adv = torch.where(fired, torch.zeros_like(label_adv), label_adv)
    return rollout_adv, label_adv
