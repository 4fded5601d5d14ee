"""ViSurf's gradient derivation as checks: the SFT, RLVR and ViSurf gradients of one prompt group, ViSurf's split into
its rollout part and its label part, the paper's identities between them with their residuals, and summaries of a
table of groups (`analysis.gradients.gradient_table`).

A group's G+1 members are in the member order of `visurf_ray.objectives`: rollouts, then the label. Every loss goes
through the suite's own paradigms with agg="seq-mean-token-mean", the aggregation under which each of the G+1 members
weighs exactly 1/(G+1) (the paper's formula averages over members; under "token-mean" a member's weight would be its
share of the group's tokens), and with old_logp = logp.detach(), i.e. ratio ρ = 1 as at ViSurf's single update per
batch. Then, with ∇SFT the gradient of the label's token-mean negative log-likelihood:
  - ViSurf = rollout part + Â_y/(G+1)·∇SFT ("decomposition"; "label_part" checks the label part alone);
  - rollouts tied at one reward below the label's (the paper's all-fail group, r(o_j) = 0 < R): the label part is
    √G/(G+1)·∇SFT with the population std, G/((G+1)√(G+1))·∇SFT with the unbiased one ("all_fail_closed_form"), and
    ∇RLVR = 0 ("rlvr_no_signal");
  - smoothing fired (max_j r(o_j) >= r(y)): the label part is 0 ("smoothing_label_zero") and ViSurf is RLVR rescaled,
    c·G/(G+1)·∇RLVR with c = √(G/(G−1)) (unbiased std) or √((G+1)/G) (population std) ("smoothing_rescale").
The closed forms are exact for eps = 0; with eps > 0 every std σ becomes σ + eps and the residuals show it.

Imports torch, pandas and `visurf_ray.objectives`; no model, no files, no plots; never Ray or transformers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor

from visurf_ray.objectives.advantages import smoothing_mask
from visurf_ray.objectives.paradigms import ObjectiveConfig, get_paradigm, stack_members

AGGREGATION = "seq-mean-token-mean"
"""The loss aggregation of every gradient here: each of a group's G+1 members weighs 1/(G+1)."""
OUTCOMES = ("all_fail", "mixed", "label_matched")
"""`group_outcome`'s values."""
CHECKS = (
    "decomposition",
    "label_part",
    "all_fail_closed_form",
    "rlvr_no_signal",
    "smoothing_label_zero",
    "smoothing_rescale",
)
TOLERANCE = 1e-8
"""Largest residual a check may show in float64."""


def group_outcome(rollout_rewards: Sequence[float], label_reward: float, rollout_success: Sequence[bool]) -> str:
    """The outcome of a group, by what happens to its label term:

    "label_matched" where smoothing fires, max_j r(o_j) >= r(y) (checked first: the label term then vanishes with
    smoothing on, even if no rollout counts as a success); else "all_fail" where no rollout `is_success`; else "mixed".

    rollout_rewards: G rewards (reward units); label_reward: the label's reward; rollout_success: G flags.
    """
    if len(rollout_rewards) == 0 or len(rollout_rewards) != len(rollout_success):
        raise ValueError(
            f"rollout_rewards ({len(rollout_rewards)}) and rollout_success ({len(rollout_success)}) must have the "
            "same non-zero length"
        )
    if max(rollout_rewards) >= label_reward:
        return "label_matched"
    return "mixed" if any(rollout_success) else "all_fail"


@dataclass(frozen=True)
class GroupGradients:
    """The gradients of one group as flat vectors [P] over the P trainable parameters (dtype of the log-probs).

    sft: ∇ of the SFT loss on the label; rlvr: ∇ of GRPO on the G rollouts; visurf: ∇ of ViSurf on all G+1 members;
    rollout_part / label_part: ∇ of ViSurf's loss with the label's / the rollouts' advantages set to 0.
    rollout_rewards [G], label_reward: the rewards differentiated (reward units); label_advantage: ViSurf's Â_y
    (after smoothing); smoothing_fired: whether smoothing acted.
    """

    sft: Tensor
    rlvr: Tensor
    visurf: Tensor
    rollout_part: Tensor
    label_part: Tensor
    rollout_rewards: Tensor
    label_reward: float
    label_advantage: float
    smoothing_fired: bool

    @property
    def num_rollouts(self) -> int:
        return self.rollout_rewards.shape[0]


def _flat_gradient(loss: Tensor, params: list[Tensor], *, retain_graph: bool) -> Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, materialize_grads=True)
    return torch.cat([grad.reshape(-1) for grad in grads])


def paradigm_gradients(
    logp: Tensor,
    mask: Tensor,
    params: list[Tensor],
    rollout_rewards: Tensor,
    label_reward: float,
    objective: ObjectiveConfig,
) -> GroupGradients:
    """The SFT, RLVR and ViSurf gradients of one group and ViSurf's two parts, each through the suite's paradigm.

    logp: [G+1, T] log-probs (nats) of the G rollouts then the label, differentiable w.r.t. `params`; mask: [G+1, T]
    bool; params: the P trainable parameters (flattened in this order); rollout_rewards: [G] (reward units);
    label_reward: the label's reward before smoothing; objective: a ViSurf objective with agg "seq-mean-token-mean",
    num_rollouts G and kl_coef 0. Every loss uses old_logp = logp.detach() (ratio 1).
    """
    if objective.agg != AGGREGATION or objective.kl_coef != 0 or objective.num_rollouts < 2:
        raise ValueError(
            f"objective must use agg={AGGREGATION!r}, kl_coef=0 and num_rollouts >= 2, got {objective.agg!r}, "
            f"{objective.kl_coef}, {objective.num_rollouts}"
        )
    group_size = objective.num_rollouts
    if not isinstance(rollout_rewards, Tensor) or rollout_rewards.shape != (group_size,):
        raise ValueError(
            f"rollout_rewards must be a tensor of shape ({group_size},) (num_rollouts), got "
            f"{getattr(rollout_rewards, 'shape', type(rollout_rewards).__name__)}"
        )
    if logp.ndim != 2 or logp.shape[0] != group_size + 1:
        raise ValueError(f"logp must be [G+1={group_size + 1}, T] (rollouts then the label), got {tuple(logp.shape)}")
    if not params:
        raise ValueError("params is empty: nothing to differentiate")
    old = logp.detach()
    rollout_r = rollout_rewards.to(torch.float64).unsqueeze(0)
    label_r = torch.tensor([float(label_reward)], dtype=torch.float64)
    sft, rlvr, visurf = get_paradigm("sft"), get_paradigm("rlvr"), get_paradigm("visurf")
    grpo = rlvr.advantages(rollout_r, None, objective).rollout[0]
    advantages = visurf.advantages(rollout_r, label_r, objective)
    rollout_adv, label_adv = advantages.rollout[0], advantages.label
    is_label = visurf.member_is_label(1, objective)
    rollouts, label = slice(0, group_size), slice(group_size, group_size + 1)

    def visurf_loss(rollout_advantages: Tensor, label_advantage: Tensor) -> Tensor:
        member_advantages = stack_members(rollout_advantages.unsqueeze(0), label_advantage)
        return visurf.loss(logp, old, mask, member_advantages, is_label, objective)[0]

    losses = {
        "sft": sft.loss(
            logp[label], old[label], mask[label], torch.ones(1, dtype=logp.dtype), is_label[label], objective
        )[0],
        "rlvr": rlvr.loss(logp[rollouts], old[rollouts], mask[rollouts], grpo, is_label[rollouts], objective)[0],
        "visurf": visurf_loss(rollout_adv, label_adv),
        "rollout_part": visurf_loss(rollout_adv, torch.zeros_like(label_adv)),
        "label_part": visurf_loss(torch.zeros_like(rollout_adv), label_adv),
    }
    grads = {
        name: _flat_gradient(loss, params, retain_graph=index < len(losses) - 1)
        for index, (name, loss) in enumerate(losses.items())
    }
    fired = bool(objective.smoothing and smoothing_mask(rollout_r, label_r)[0])
    return GroupGradients(
        **grads,
        rollout_rewards=rollout_r[0],
        label_reward=float(label_reward),
        label_advantage=float(label_adv[0]),
        smoothing_fired=fired,
    )


def _relative_residual(actual: Tensor, expected: Tensor) -> float:
    """‖actual − expected‖ / max(‖actual‖, ‖expected‖); 0 when both are 0."""
    scale = max(actual.norm().item(), expected.norm().item())
    return 0.0 if scale == 0 else (actual - expected).norm().item() / scale


def _norm_ratio(vector: Tensor, scale: Tensor) -> float:
    """‖vector‖ / ‖scale‖ (a vector that should be 0, measured against a gradient of the group); ‖vector‖ itself
    when ‖scale‖ is 0."""
    scale_norm = scale.norm().item()
    return vector.norm().item() / scale_norm if scale_norm else vector.norm().item()


def all_fail_label_advantage(num_rollouts: int, *, unbiased_std: bool) -> float:
    """Â_y when the G rollouts are tied below the label (eps = 0): √G (population std) or G/√(G+1) (unbiased)."""
    return num_rollouts / math.sqrt(num_rollouts + 1) if unbiased_std else math.sqrt(num_rollouts)


def smoothing_scale(num_rollouts: int, *, unbiased_std: bool) -> float:
    """c in Â_j(ViSurf, smoothing fired) = c·Â_j(GRPO): √(G/(G−1)) (unbiased std) or √((G+1)/G) (population)."""
    g = num_rollouts
    return math.sqrt(g / (g - 1)) if unbiased_std else math.sqrt((g + 1) / g)


def identity_residuals(grads: GroupGradients, objective: ObjectiveConfig) -> dict[str, float]:
    """The residual of each check in CHECKS (module docstring); NaN where a check's condition does not hold.

    Residuals are relative: ‖actual − expected‖ / max(‖actual‖, ‖expected‖), or ‖actual‖ / ‖∇SFT‖ for the checks
    whose expected value is 0 (rlvr_no_signal, smoothing_label_zero). Unitless; below TOLERANCE in float64.
    """
    g = grads.num_rollouts
    weight = grads.label_advantage / (g + 1)
    tied_below = bool((grads.rollout_rewards == grads.rollout_rewards[0]).all()) and (
        grads.label_reward > grads.rollout_rewards[0].item()
    )
    nan = float("nan")
    closed_form = all_fail_label_advantage(g, unbiased_std=objective.unbiased_std) / (g + 1)
    rescale = smoothing_scale(g, unbiased_std=objective.unbiased_std) * g / (g + 1)
    return {
        "decomposition": _relative_residual(grads.visurf, grads.rollout_part + weight * grads.sft),
        "label_part": _relative_residual(grads.label_part, weight * grads.sft),
        "all_fail_closed_form": _relative_residual(grads.label_part, closed_form * grads.sft) if tied_below else nan,
        "rlvr_no_signal": _norm_ratio(grads.rlvr, grads.sft) if tied_below else nan,
        "smoothing_label_zero": _norm_ratio(grads.label_part, grads.sft) if grads.smoothing_fired else nan,
        "smoothing_rescale": _relative_residual(grads.visurf, rescale * grads.rlvr) if grads.smoothing_fired else nan,
    }


def _cosine(a: Tensor, b: Tensor) -> float:
    """cos(a, b); NaN when either vector is 0 (no direction)."""
    norms = a.norm().item() * b.norm().item()
    return float("nan") if norms == 0 else torch.dot(a, b).item() / norms


def gradient_metrics(grads: GroupGradients) -> dict[str, float]:
    """Norms (per parameter vector, gradient units), cosines between the SFT, RLVR and ViSurf gradients (NaN where one
    is 0), the label advantage Â_y and weight Â_y/(G+1), and label_share = ‖label part‖ / (‖label part‖ + ‖rollout
    part‖), the SFT term's share of ViSurf's gradient (0 when it vanishes, 1 when the rollouts give no signal)."""
    label_norm, rollout_norm = grads.label_part.norm().item(), grads.rollout_part.norm().item()
    parts = label_norm + rollout_norm
    return {
        "label_advantage": grads.label_advantage,
        "label_weight": grads.label_advantage / (grads.num_rollouts + 1),
        "norm_sft": grads.sft.norm().item(),
        "norm_rlvr": grads.rlvr.norm().item(),
        "norm_visurf": grads.visurf.norm().item(),
        "norm_rollout_part": rollout_norm,
        "norm_label_part": label_norm,
        "label_share": float("nan") if parts == 0 else label_norm / parts,
        "cos_sft_rlvr": _cosine(grads.sft, grads.rlvr),
        "cos_sft_visurf": _cosine(grads.sft, grads.visurf),
        "cos_rlvr_visurf": _cosine(grads.rlvr, grads.visurf),
    }


def residual_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per check (rows, CHECKS order): groups where it applies, its largest residual, and whether all pass TOLERANCE."""
    rows = []
    for name in CHECKS:
        values = table[f"residual_{name}"].dropna()
        worst = values.max() if len(values) else float("nan")
        rows.append(
            {"check": name, "groups": len(values), "max_residual": worst, "passed": bool((values < TOLERANCE).all())}
        )
    return pd.DataFrame(rows).set_index("check")


def outcome_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Means per (step, outcome) of the label's advantage and share, the norms and the cosines, with the number of
    groups; means skip NaN (a cosine with a zero gradient)."""
    columns = [
        "label_advantage",
        "label_share",
        "norm_sft",
        "norm_rlvr",
        "norm_visurf",
        "norm_label_part",
        "cos_sft_rlvr",
        "cos_sft_visurf",
        "cos_rlvr_visurf",
    ]
    grouped = table.groupby(["step", "outcome"])
    return grouped[columns].mean().join(grouped.size().rename("groups")).reset_index()
