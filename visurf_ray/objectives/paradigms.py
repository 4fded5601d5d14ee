"""Training paradigms by name (SFT, RLVR, ViSurf, SFT→RLVR, and ViSurf's single-stage neighbours LUFFY and CHORD):
which members a batch holds, how their advantages are computed from rewards, and which loss trains on them. The
objective configuration lives here too.

Pure torch. Must not import ray, transformers or visurf_ray.rewards. A new paradigm is one class decorated with
`@register_paradigm("name")`.

Member order (the trainer stacks sequences this way; `stack_members` does it): for each prompt, its K rollouts (when
the paradigm `needs_rollouts`; K = `rollouts_per_prompt(cfg)`: G = cfg.num_rollouts, G − 1 for LUFFY), then its label
(when it `needs_label`). With B prompts, N = B·(K + needs_label) members.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from visurf_ray.objectives.advantages import (
    _group_advantages,
    _visurf_advantages,
    check_label_pairing,
    check_rewards,
    smoothing_mask,
)
from visurf_ray.objectives.losses import (
    AGGREGATIONS,
    KL_ESTIMATORS,
    _clipped_surrogate,
    _kl_penalty,
    _policy_loss,
    _policy_shaping,
    _sft_loss,
    approx_kl,
    check_advantages,
    check_clip_range,
    check_token_batch,
    masked_mean,
)
from visurf_ray.validation import (
    ValidationError,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_tensor,
    require,
)

PARADIGMS: dict[str, Paradigm] = {}


def register_paradigm(name: str):
    """Class decorator: instantiate the Paradigm subclass and register it as `name` (also set as its `name`), with
    `paradigm_id` the next free id (registration order: sft 0, rlvr 1, visurf 2, sft_rlvr 3, luffy 4, chord 5)."""

    def wrap(cls: type[Paradigm]) -> type[Paradigm]:
        require(name not in PARADIGMS, "paradigm", f"{name!r} is already registered")
        cls.name = name
        cls.paradigm_id = 1 + max((p.paradigm_id for p in PARADIGMS.values()), default=-1)
        PARADIGMS[name] = cls()
        return cls

    return wrap


def get_paradigm(name: str) -> Paradigm:
    """The paradigm registered as `name`; ValueError naming `paradigm` and listing the known ones otherwise."""
    check_choice("paradigm", name, sorted(PARADIGMS))
    return PARADIGMS[name]


SMOOTHING_RULES = ("literal", "like_for_like")
SFT_TARGETS = ("answer", "empty_think", "reasoning")
CHORD_TOKEN_WEIGHTS = ("none", "p_one_minus_p")


@dataclass(frozen=True)
class ObjectiveConfig:
    """What a run optimises; validated on construction (ValueError naming the field).

    paradigm: registry name (see PARADIGMS). num_rollouts: G completions sampled per prompt, >= 2 for paradigms that
    need rollouts. clip_low / clip_high: the ratio is clipped to [1 − clip_low, 1 + clip_high], 0 < clip_low < 1,
    clip_high > 0. agg: loss aggregation over tokens and sequences (losses.AGGREGATIONS). unbiased_std /
    normalize_std / eps: group normalisation (advantages.group_advantages). smoothing: ViSurf reward control 3, applied
    here. align_label / eliminate_label_thinking: ViSurf reward controls 1 and 2, applied by the trainer to the label
    text and its reward components before the rewards reach this package. label_reasoning: the label's think block
    holds the sample's reasoning trace (`Sample.meta["think"]`, which the offline benchmark provides) instead of
    nothing; off in the paper, whose labels have no reasoning (an ablation for policies that reason before answering).
    smoothing_rule: which rewards smoothing compares: "literal" (the paper's rule: the label's reward after control 2
    against the rollouts' full rewards, so a rollout one accuracy point below the label can fire it) or
    "like_for_like" (both sides without the thinking-format reward). strict_format: the thinking-format reward
    requires exactly one think and one answer block (`rewards.thinking_format.follows_strict_format`) instead of
    the paper's regex, for rollouts and label alike.
    sft_target: the SFT baseline's training text (the SFT paradigm and the SFT stage of sft_rlvr), a baseline
    setting independent of ViSurf's label controls: "answer" (the paper's: the dataset's solution verbatim inside
    `<answer>…</answer>`, no think block), "empty_think" (`<think></think><answer>…</answer>` with json.dumps spacing)
    or "reasoning" (the sample's reasoning trace in the think block; the offline benchmark provides one).
    kl_coef / kl_kind: KL(π_θ ‖ π_ref) penalty weight (>= 0, 0 = off) and estimator (losses.KL_ESTIMATORS), taken
    over the rollouts' tokens only (masked off the label's, which are not sampled from π_θ).
    sft_share: for sft_rlvr, the fraction of optimizer steps spent in SFT, in [0, 1]; the RL stage starts with a
    fresh optimizer state and learning-rate schedule, as a second run would.
    luffy_gamma: LUFFY's policy-shaping constant γ > 0 in π/(π + γ) (the paper's 0.1).
    luffy_shaping: False replaces LUFFY's shaping of the label's tokens by the plain ratio π_θ/sg(π_θ) (gradient
    −Â·∇log π, ViSurf's label term): an ablation that leaves LUFFY only its group layout (G − 1 rollouts + the label).
    chord_mu_start / chord_mu_end: CHORD's SFT weight μ at the first and the last optimizer step, each in [0, 1],
    cosine-decayed in between (0.9 → 0.05: the CHORD-μ values of the authors' released example, Trinity-RFT
    examples/mix_chord). chord_token_weight: "none" (CHORD-μ) or "p_one_minus_p" (CHORD-φ: each label token's
    log-likelihood weighted by φ = p(1 − p); that example runs CHORD-φ at a constant μ = 0.1: chord_mu_start =
    chord_mu_end = 0.1).
    """

    paradigm: str = "visurf"
    num_rollouts: int = 8
    clip_low: float = 0.2
    clip_high: float = 0.2
    agg: str = "seq-mean-token-mean"
    unbiased_std: bool = True
    normalize_std: bool = True
    eps: float = 1e-6
    smoothing: bool = True
    align_label: bool = True
    eliminate_label_thinking: bool = True
    label_reasoning: bool = False
    smoothing_rule: str = "literal"
    strict_format: bool = False
    sft_target: str = "answer"
    kl_coef: float = 0.0
    kl_kind: str = "low_var_kl"
    sft_share: float = 0.5
    luffy_gamma: float = 0.1
    luffy_shaping: bool = True
    chord_mu_start: float = 0.9
    chord_mu_end: float = 0.05
    chord_token_weight: str = "none"

    def __post_init__(self) -> None:
        paradigm = get_paradigm(self.paradigm)
        check_int(
            "num_rollouts",
            self.num_rollouts,
            low=2 if paradigm.needs_rollouts else 0,
            note=f"for paradigm {self.paradigm!r}",
        )
        check_clip_range(self.clip_low, self.clip_high)
        check_choice("agg", self.agg, sorted(AGGREGATIONS))
        for name in (
            "unbiased_std",
            "normalize_std",
            "smoothing",
            "align_label",
            "eliminate_label_thinking",
            "label_reasoning",
            "strict_format",
            "luffy_shaping",
        ):
            check_bool(name, getattr(self, name))
        check_choice("smoothing_rule", self.smoothing_rule, SMOOTHING_RULES)
        check_choice("sft_target", self.sft_target, SFT_TARGETS)
        check_number("eps", self.eps, low=0)
        check_number("kl_coef", self.kl_coef, low=0)
        check_choice("kl_kind", self.kl_kind, sorted(KL_ESTIMATORS))
        check_number("sft_share", self.sft_share, low=0, high=1)
        check_number("luffy_gamma", self.luffy_gamma, low=0, low_open=True, note="(γ = 0 makes π/(π + γ) constant)")
        check_number("chord_mu_start", self.chord_mu_start, low=0, high=1)
        check_number("chord_mu_end", self.chord_mu_end, low=0, high=1)
        check_choice("chord_token_weight", self.chord_token_weight, CHORD_TOKEN_WEIGHTS)


def stack_members(rollout: Tensor | None, label: Tensor | None) -> Tensor:
    """Stack per-member values in member order: for each prompt, its G rollouts, then its label.

    rollout: [B, G, *] or None; label: [B, *] or None; at least one given, with equal B and trailing dims *.
    Returns [N, *] with N = B·(G + 1), B·G or B. Works for advantages, rewards, flags and padded token rows alike.
    """
    require(
        rollout is None or (isinstance(rollout, Tensor) and rollout.ndim >= 2),
        "rollout",
        f"must be a [B, G, *] tensor, got {type(rollout).__name__}",
    )
    require(
        label is None or (isinstance(label, Tensor) and label.ndim >= 1),
        "label",
        f"must be a [B, *] tensor, got {type(label).__name__}",
    )
    if rollout is None:
        require(label is not None, "stack_members", "needs rollout or label, got neither")
        assert label is not None
        return label
    if label is None:
        return rollout.flatten(0, 1)
    require(
        rollout.shape[:1] + rollout.shape[2:] == label.shape and rollout.dtype == label.dtype,
        "label",
        f"({label.dtype}, shape {tuple(label.shape)}) must match rollout ({rollout.dtype}, shape "
        f"{tuple(rollout.shape)}) without its group dimension",
    )
    return torch.cat([rollout, label.unsqueeze(1)], dim=1).flatten(0, 1)


@dataclass(frozen=True)
class GroupAdvantages:
    """Advantages of one batch: rollout [B, G] (None without rollouts), label [B] (None without the label), and
    metrics (floats) for logging."""

    rollout: Tensor | None
    label: Tensor | None
    metrics: dict[str, float]

    def per_member(self) -> tuple[Tensor, Tensor]:
        """(advantages [N], is_label [N] bool) in member order, ready for `Paradigm.loss`."""
        rollout_flags = None if self.rollout is None else torch.zeros_like(self.rollout, dtype=torch.bool)
        label_flags = None if self.label is None else torch.ones_like(self.label, dtype=torch.bool)
        return stack_members(self.rollout, self.label), stack_members(rollout_flags, label_flags)


def _zero_std_fraction(group_advantages: Tensor) -> float:
    """Share of groups whose every advantage is exactly 0 (all rewards equal after smoothing: no signal).

    group_advantages: [B, K]."""
    return (group_advantages == 0).all(dim=1).double().mean().item()


class Paradigm(ABC):
    """How one training paradigm assembles a batch. Subclasses set `needs_rollouts` / `needs_label` (whether each
    prompt contributes rollouts / its label as members) and implement `advantages` and `loss`; `register_paradigm`
    sets `name` and `paradigm_id` (the trainer logs it as `paradigm_stage`)."""

    name: ClassVar[str]
    paradigm_id: ClassVar[int]
    needs_rollouts: ClassVar[bool]
    needs_label: ClassVar[bool]

    def rollouts_per_prompt(self, cfg: ObjectiveConfig) -> int:
        """How many completions the trainer samples per prompt: cfg.num_rollouts (G) with rollouts, else 0."""
        return cfg.num_rollouts if self.needs_rollouts else 0

    @abstractmethod
    def advantages(
        self,
        rollout_rewards: Tensor | None,
        label_rewards: Tensor | None,
        cfg: ObjectiveConfig,
        *,
        smoothing_reference: tuple[Tensor, Tensor] | None = None,
    ) -> GroupAdvantages:
        """Advantages from rewards. rollout_rewards: [B, K] with K = `rollouts_per_prompt(cfg)` (given iff
        `needs_rollouts`); label_rewards: [B] (given
        iff `needs_label`); reward units, floating. smoothing_reference: the rewards ViSurf's smoothing compares
        (`visurf_advantages`), ignored by paradigms without smoothing."""

    @abstractmethod
    def loss(
        self,
        logp: Tensor,
        old_logp: Tensor,
        mask: Tensor,
        advantages: Tensor,
        is_label: Tensor,
        cfg: ObjectiveConfig,
        *,
        ref_logp: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss over the batch's N members in member order. logp, old_logp, ref_logp: [N, T] log-probs (nats) of the
        members' completion tokens; mask: [N, T] bool; advantages: [N]; is_label: [N] bool (pass it on the CPU: its
        layout is checked there, without a device sync, then it moves to logp's device). ref_logp is required
        when cfg.kl_coef > 0; when given, its KL over the rollouts' tokens (never the label's) is reported as `kl`
        and added with weight cfg.kl_coef.
        Returns (loss scalar, metrics with at least `loss`)."""

    def for_step(self, step: int, total_steps: int, cfg: ObjectiveConfig) -> Paradigm:
        """The paradigm in effect at optimizer step `step` of `total_steps` (0-based): this one, unless a schedule."""
        check_int("total_steps", total_steps, low=1)
        check_int("step", step, low=0, high=total_steps, high_open=True)
        return self

    def stage_starts(self, total_steps: int, cfg: ObjectiveConfig) -> tuple[int, ...]:
        """The 0-based steps at which a training stage begins, first 0: each stage gets a fresh optimizer state and
        its own learning-rate schedule (one stage unless a schedule)."""
        return (0,)

    def member_is_label(self, num_prompts: int, cfg: ObjectiveConfig) -> Tensor:
        """The is_label flags [N] (bool) of a batch of `num_prompts` prompts in member order."""
        rollouts = self.rollouts_per_prompt(cfg)
        rollout = torch.zeros(num_prompts, rollouts, dtype=torch.bool) if self.needs_rollouts else None
        label = torch.ones(num_prompts, dtype=torch.bool) if self.needs_label else None
        return stack_members(rollout, label)

    def _validate_rewards(
        self, rollout_rewards: Tensor | None, label_rewards: Tensor | None, cfg: ObjectiveConfig
    ) -> None:
        """The rewards `advantages` receives, checked once at that entry (the advantage functions below it trust
        them): given iff the paradigm has those members; rollout [B, K] (K = `rollouts_per_prompt`) and label [B],
        floating and finite (CPU tensors: the finiteness check reads them)."""
        require(
            self.needs_rollouts == (rollout_rewards is not None),
            "rollout_rewards",
            f"must be {'given' if self.needs_rollouts else 'None'} for {self.name}",
        )
        require(
            self.needs_label == (label_rewards is not None),
            "label_rewards",
            f"must be {'given' if self.needs_label else 'None'} for {self.name}",
        )
        if rollout_rewards is not None:
            rollouts = self.rollouts_per_prompt(cfg)
            expected = f"num_rollouts={cfg.num_rollouts}" + (" − 1" if rollouts != cfg.num_rollouts else "")
            check_rewards("rollout_rewards", rollout_rewards, ndim=2)
            require(
                rollout_rewards.shape[1] == rollouts,
                "rollout_rewards",
                f"must have shape [B, {expected}], got {tuple(rollout_rewards.shape)}",
            )
        if label_rewards is not None:
            check_rewards("label_rewards", label_rewards, ndim=1)
        if rollout_rewards is not None and label_rewards is not None:
            require(
                label_rewards.shape[0] == rollout_rewards.shape[0],
                "label_rewards",
                f"must have one reward per group ({rollout_rewards.shape[0]}), got shape {tuple(label_rewards.shape)}",
            )

    def _validate_loss_inputs(
        self,
        logp: Tensor,
        old_logp: Tensor,
        mask: Tensor,
        advantages: Tensor,
        is_label: Tensor,
        cfg: ObjectiveConfig,
        ref_logp: Tensor | None,
    ) -> Tensor:
        """The tensors `loss` receives, checked once at that entry (the loss functions below it trust them, and cfg's
        scalars were checked by ObjectiveConfig): shapes and dtypes, free of device work, and `is_label` against this
        paradigm's member order where it lies (on the CPU: no device sync). Returns is_label on logp's device."""
        if ref_logp is None:
            check_token_batch(logp, mask, old_logp=old_logp)
            require(cfg.kl_coef == 0, "ref_logp", f"is required when kl_coef > 0 (kl_coef={cfg.kl_coef})")
        else:
            check_token_batch(logp, mask, old_logp=old_logp, ref_logp=ref_logp)
        check_advantages(advantages, logp)
        num_members = logp.shape[0]
        check_tensor("is_label", is_label, dtype=torch.bool, shape=(num_members,))
        rollouts = self.rollouts_per_prompt(cfg)
        per_prompt = rollouts + self.needs_label
        require(
            num_members % per_prompt == 0
            and torch.equal(is_label.cpu(), self.member_is_label(num_members // per_prompt, cfg)),
            "is_label",
            f"must follow {self.name}'s member order ({per_prompt} members per prompt: "
            f"{rollouts} rollouts then {int(self.needs_label)} label)",
        )
        return is_label.to(logp.device)

    @staticmethod
    def _finish(
        loss: Tensor,
        metrics: dict[str, float],
        logp: Tensor,
        mask: Tensor,
        is_label: Tensor,
        cfg: ObjectiveConfig,
        ref_logp: Tensor | None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Add the KL term and the label/rollout split metrics. The KL estimators hold on tokens sampled from π_θ, so
        the term is taken over the rollouts alone (aggregated by cfg.agg over them), never over a label's tokens; a
        batch of labels only (SFT) has no KL term."""
        if ref_logp is not None:
            rollouts = ~is_label
            kl = (
                _kl_penalty(
                    logp[rollouts],
                    ref_logp[rollouts],
                    mask[rollouts],
                    KL_ESTIMATORS[cfg.kl_kind],
                    AGGREGATIONS[cfg.agg],
                )
                if rollouts.any()
                else logp.new_zeros(())
            )
            loss = loss + cfg.kl_coef * kl
            metrics["kl"] = kl.item()
        with torch.no_grad():
            member_is_label = is_label.unsqueeze(1)
            counted = mask.sum().clamp(min=1).double()
            for part, part_mask in (("label", mask & member_is_label), ("rollout", mask & ~member_is_label)):
                if part_mask.any():
                    metrics[f"{part}_logp_mean"] = masked_mean(logp.detach(), part_mask).item()
                    metrics[f"{part}_token_fraction"] = (part_mask.sum() / counted).item()
        metrics["loss"] = loss.item()
        return loss, metrics


@register_paradigm("sft")
class SFT(Paradigm):
    """Supervised fine-tuning on the labels alone: each member is a label with advantage 1; loss `sft_loss`."""

    needs_rollouts = False
    needs_label = True

    def advantages(self, rollout_rewards, label_rewards, cfg, *, smoothing_reference=None):
        """label_rewards [B] gives B and is reported as label_reward_mean; every label's advantage is 1."""
        self._validate_rewards(rollout_rewards, label_rewards, cfg)
        label = torch.ones_like(label_rewards)
        metrics = {"label_reward_mean": label_rewards.double().mean().item(), "label_advantage_mean": 1.0}
        return GroupAdvantages(rollout=None, label=label, metrics=metrics)

    def loss(self, logp, old_logp, mask, advantages, is_label, cfg, *, ref_logp=None):
        """`sft_loss` with cfg.agg; old_logp and advantages (all 1 by definition) are accepted for the common
        signature and only checked."""
        is_label = self._validate_loss_inputs(logp, old_logp, mask, advantages, is_label, cfg, ref_logp)
        loss = _sft_loss(logp, mask, AGGREGATIONS[cfg.agg])
        return self._finish(loss, {"sft_loss": loss.item()}, logp, mask, is_label, cfg, ref_logp)


@register_paradigm("rlvr")
class RLVR(Paradigm):
    """GRPO on the G rollouts: group advantages, clipped surrogate `policy_loss` over all members."""

    needs_rollouts = True
    needs_label = False

    def advantages(self, rollout_rewards, label_rewards, cfg, *, smoothing_reference=None):
        self._validate_rewards(rollout_rewards, label_rewards, cfg)
        rollout = _group_advantages(rollout_rewards, cfg.unbiased_std, cfg.normalize_std, cfg.eps)
        metrics = {
            "rollout_reward_mean": rollout_rewards.double().mean().item(),
            "zero_std_fraction": _zero_std_fraction(rollout),
        }
        return GroupAdvantages(rollout=rollout, label=None, metrics=metrics)

    def loss(self, logp, old_logp, mask, advantages, is_label, cfg, *, ref_logp=None):
        """`policy_loss` over all members (a label, where present, is a member with its own advantage and old_logp)."""
        is_label = self._validate_loss_inputs(logp, old_logp, mask, advantages, is_label, cfg, ref_logp)
        loss, metrics = _policy_loss(
            logp, old_logp, advantages, mask, cfg.clip_low, cfg.clip_high, AGGREGATIONS[cfg.agg]
        )
        return self._finish(loss, {"pg_loss": loss.item(), **metrics}, logp, mask, is_label, cfg, ref_logp)


@register_paradigm("visurf")
class ViSurf(RLVR):
    """ViSurf: the label joins each group of G rollouts as member G+1 (`visurf_advantages`, with cfg.smoothing); the
    loss is RLVR's over all G+1 members. With ratio 1 and "seq-mean-token-mean", the label's gradient is
    Â_y/(G+1) · ∇ sft_loss(label) per prompt."""

    needs_rollouts = True
    needs_label = True

    def advantages(self, rollout_rewards, label_rewards, cfg, *, smoothing_reference=None):
        """Metrics: reward means (label before smoothing), label_advantage_mean, smoothing_condition_fraction (groups
        where the smoothing rule holds, whether or not smoothing is on), smoothing_fired_fraction (0 when smoothing is
        off), zero_std_fraction (groups whose G+1 advantages are all 0)."""
        self._validate_rewards(rollout_rewards, label_rewards, cfg)
        check_label_pairing(rollout_rewards, label_rewards, smoothing_reference if cfg.smoothing else None)
        rollout, label = _visurf_advantages(
            rollout_rewards,
            label_rewards,
            cfg.smoothing,
            smoothing_reference,
            cfg.unbiased_std,
            cfg.normalize_std,
            cfg.eps,
        )
        condition = smoothing_mask(*(smoothing_reference or (rollout_rewards, label_rewards)))
        fired = condition & cfg.smoothing
        metrics = {
            "rollout_reward_mean": rollout_rewards.double().mean().item(),
            "label_reward_mean": label_rewards.double().mean().item(),
            "label_advantage_mean": label.double().mean().item(),
            "smoothing_condition_fraction": condition.double().mean().item(),
            "smoothing_fired_fraction": fired.double().mean().item(),
            "zero_std_fraction": _zero_std_fraction(torch.cat([rollout, label.unsqueeze(1)], dim=1)),
        }
        return GroupAdvantages(rollout=rollout, label=label, metrics=metrics)


@register_paradigm("sft_rlvr")
class SFTThenRLVR(Paradigm):
    """Two stages in sequence: SFT for the first round(sft_share · total_steps) optimizer steps, then RLVR (Python's
    round: halves go to the even integer). A schedule, not an objective: `for_step` returns the paradigm in effect,
    whose `advantages` and `loss` the trainer calls; batches over the run need both rollouts and labels."""

    needs_rollouts = True
    needs_label = True

    def for_step(self, step, total_steps, cfg):
        check_int("total_steps", total_steps, low=1)
        check_int("step", step, low=0, high=total_steps, high_open=True)
        return get_paradigm("sft") if step < self.switch_step(total_steps, cfg) else get_paradigm("rlvr")

    @staticmethod
    def switch_step(total_steps: int, cfg: ObjectiveConfig) -> int:
        """The first RLVR step: round(sft_share · total_steps)."""
        return round(cfg.sft_share * total_steps)

    def stage_starts(self, total_steps, cfg):
        """(0, the switch step) when both stages have steps, else (0,)."""
        switch = self.switch_step(total_steps, cfg)
        return (0, switch) if 0 < switch < total_steps else (0,)

    def advantages(self, rollout_rewards, label_rewards, cfg, *, smoothing_reference=None):
        """Refused: ask `for_step` for the stage in effect."""
        raise ValidationError(
            "paradigm 'sft_rlvr' is a schedule: call for_step(step, total_steps, cfg).advantages(...)"
        )

    def loss(self, logp, old_logp, mask, advantages, is_label, cfg, *, ref_logp=None):
        """Refused: ask `for_step` for the stage in effect."""
        raise ValidationError("paradigm 'sft_rlvr' is a schedule: call for_step(step, total_steps, cfg).loss(...)")


@register_paradigm("luffy")
class LUFFY(Paradigm):
    """LUFFY-style mixed-policy GRPO (Yan et al. 2025, "Learning to Reason under Off-Policy Guidance",
    arXiv 2504.14945): the label, an off-policy trace, *replaces* one of the G on-policy rollouts (G − 1 + 1).

    Per prompt the trainer samples G − 1 rollouts (`rollouts_per_prompt`: one sequence fewer per prompt than RLVR and
    ViSurf at the same G; the same prompts and optimizer steps); the label is member G. Advantages: GRPO over the G
    members, `group_advantages([r(o_1), …, r(o_{G−1}), r(y)])` with cfg.unbiased_std / normalize_std / eps, and no
    smoothing (LUFFY has no such control). The label's text and reward are ViSurf's (the trainer applies
    cfg.align_label and cfg.eliminate_label_thinking to every paradigm with rollouts and a label), so that ViSurf,
    LUFFY and CHORD mix the same label and differ only in how.

    Loss per token t of member i, aggregated over all members by cfg.agg:
      rollout tokens: max(−Â_i·ρ_t, −Â_i·clip(ρ_t, 1 − clip_low, 1 + clip_high)), ρ_t = π_θ/π_old (RLVR's);
      label tokens:   −Â_y·f(π_t), f(π) = π/(π + γ), π_t = π_θ(y_t | x, y_<t), γ = cfg.luffy_gamma (0.1), unclipped.
    LUFFY's off-policy ratio π_θ/π_φ takes the expert's π_φ = 1 (its probabilities are unknown) and policy shaping
    replaces it by f(π_θ), with the gradient through π_θ: the label's term has gradient
      −Â_y·γ·π_t/(π_t + γ)²·∇ log π_t,
    an SFT-like gradient whose per-token weight (at most 1/4, at π = γ) vanishes on tokens the policy already finds
    likely. Metrics beside RLVR's (clip_fraction and approx_kl over the rollouts' tokens, those of the clipped term):
    label_advantage_mean, label_shaped_ratio_mean (mean f(π) over the label's tokens) and label_shaping_weight_mean
    (mean γ·π/(π + γ)², the weight on ∇ log π; SFT's is 1).
    """

    needs_rollouts = True
    needs_label = True

    def rollouts_per_prompt(self, cfg):
        """G − 1: the label takes the G-th slot of the group."""
        return cfg.num_rollouts - 1

    def advantages(self, rollout_rewards, label_rewards, cfg, *, smoothing_reference=None):
        """rollout_rewards [B, G − 1], label_rewards [B] -> advantages over each group of G. Metrics: reward means,
        label_advantage_mean, zero_std_fraction (groups whose G rewards are all equal)."""
        self._validate_rewards(rollout_rewards, label_rewards, cfg)
        rewards = torch.cat([rollout_rewards, label_rewards.to(rollout_rewards.dtype).unsqueeze(1)], dim=1)
        group = _group_advantages(rewards, cfg.unbiased_std, cfg.normalize_std, cfg.eps)
        metrics = {
            "rollout_reward_mean": rollout_rewards.double().mean().item(),
            "label_reward_mean": label_rewards.double().mean().item(),
            "label_advantage_mean": group[:, -1].double().mean().item(),
            "zero_std_fraction": _zero_std_fraction(group),
        }
        return GroupAdvantages(rollout=group[:, :-1], label=group[:, -1], metrics=metrics)

    def loss(self, logp, old_logp, mask, advantages, is_label, cfg, *, ref_logp=None):
        """The clipped surrogate on rollout tokens and −Â·π/(π + γ) on label tokens, one aggregation (cfg.agg); the
        label's old_logp is not used."""
        is_label = self._validate_loss_inputs(logp, old_logp, mask, advantages, is_label, cfg, ref_logp)
        clipped_values, clipped = _clipped_surrogate(logp, old_logp, advantages, cfg.clip_low, cfg.clip_high)
        label_tokens = is_label.unsqueeze(1)
        member_advantages = advantages.to(logp.dtype)
        if member_advantages.ndim == 1:
            member_advantages = member_advantages.unsqueeze(1)
        if cfg.luffy_shaping:
            shaped = _policy_shaping(logp, cfg.luffy_gamma)
        else:  # value 1, gradient ∇log π: the unshaped off-policy term (objective.luffy_shaping)
            shaped = torch.exp(logp - logp.detach())
        values = torch.where(label_tokens, -member_advantages * shaped, clipped_values)
        loss = AGGREGATIONS[cfg.agg](values, mask)
        rollout_mask, label_mask = mask & ~label_tokens, mask & label_tokens
        with torch.no_grad():
            probability = logp.exp()
            metrics = {
                "pg_loss": loss.item(),
                "clip_fraction": masked_mean(clipped.to(logp.dtype), rollout_mask).item(),
                "approx_kl": approx_kl(logp, old_logp, rollout_mask).item(),
                "label_shaped_ratio_mean": masked_mean(shaped, label_mask).item(),
                "label_shaping_weight_mean": masked_mean(
                    cfg.luffy_gamma * probability / (probability + cfg.luffy_gamma) ** 2
                    if cfg.luffy_shaping
                    else torch.ones_like(probability),
                    label_mask,
                ).item(),
            }
        return self._finish(loss, metrics, logp, mask, is_label, cfg, ref_logp)


@register_paradigm("chord")
class CHORD(Paradigm):
    """CHORD-style SFT and RL in one objective (Zhang et al. 2025, "On-Policy RL Meets Off-Policy Experts: Harmonizing
    SFT and RL via Dynamic Weighting", arXiv 2508.11408). Members are ViSurf's (each prompt's G rollouts, then its
    label, built as ViSurf's), but the label is not in the group:

      L = (1 − μ_t)·L_GRPO(rollouts) + μ_t·L_SFT(labels)

    L_GRPO: RLVR's clipped surrogate over the rollouts, with GRPO advantages over the G rollouts; L_SFT: `sft_loss`
    over the labels; each term aggregated by cfg.agg over its own members. μ_t at optimizer step t of T decays by a
    cosine from cfg.chord_mu_start (0.9) to cfg.chord_mu_end (0.05): the schedule and CHORD-μ values of the authors'
    released example (Trinity-RFT examples/mix_chord, warm-up 0), its decay stretched over the whole run:
      μ_t = μ_end + (μ_start − μ_end)·(1 + cos(π·t/(T − 1)))/2   (μ_start when T = 1).
    CHORD-φ (cfg.chord_token_weight = "p_one_minus_p"): L_SFT = −agg(φ_t·log p_t), φ_t = p_t(1 − p_t),
    p_t = π_θ(y_t | x, y_<t), with φ detached as in the authors' implementation: the gradient is −φ_t·∇ log p_t,
    that of −agg(p − p²/2), largest where p = 1/2 and vanishing at both ends.

    `for_step` returns the paradigm of step t (holding μ_t); the registered instance has no μ and refuses `loss`.
    The label's advantage is 1 (unused: it is not in the group). Metrics beside RLVR's (clip_fraction and approx_kl
    over the rollouts' tokens): chord_mu (μ_t), pg_loss (L_GRPO), sft_loss (L_SFT), label_phi_mean (CHORD-φ: mean φ).
    Under "token-mean" each term is a token mean over its own members of the forward pass, so with
    optim.micro_batches > 1 the step weighs chunk-level means by their token share (as the authors' implementation
    weighs micro-batches); the per-sequence aggregations give the whole batch's loss exactly.
    """

    needs_rollouts = True
    needs_label = True

    def __init__(self, mu: float | None = None):
        self.mu = mu

    @staticmethod
    def mu_at(step: int, total_steps: int, cfg: ObjectiveConfig) -> float:
        """μ at 0-based optimizer step `step` of `total_steps`: the cosine from chord_mu_start to chord_mu_end."""
        check_int("total_steps", total_steps, low=1)
        check_int("step", step, low=0, high=total_steps, high_open=True)
        progress = step / (total_steps - 1) if total_steps > 1 else 0.0
        return cfg.chord_mu_end + (cfg.chord_mu_start - cfg.chord_mu_end) * (1 + math.cos(math.pi * progress)) / 2

    def for_step(self, step, total_steps, cfg):
        return CHORD(self.mu_at(step, total_steps, cfg))

    def advantages(self, rollout_rewards, label_rewards, cfg, *, smoothing_reference=None):
        """GRPO advantages over the G rollouts; every label's advantage is 1. Metrics: reward means,
        zero_std_fraction (groups whose G rollout rewards are all equal)."""
        self._validate_rewards(rollout_rewards, label_rewards, cfg)
        rollout = _group_advantages(rollout_rewards, cfg.unbiased_std, cfg.normalize_std, cfg.eps)
        metrics = {
            "rollout_reward_mean": rollout_rewards.double().mean().item(),
            "label_reward_mean": label_rewards.double().mean().item(),
            "zero_std_fraction": _zero_std_fraction(rollout),
        }
        return GroupAdvantages(rollout=rollout, label=torch.ones_like(label_rewards), metrics=metrics)

    def loss(self, logp, old_logp, mask, advantages, is_label, cfg, *, ref_logp=None):
        """(1 − μ)·`policy_loss`(rollouts) + μ·`sft_loss`(labels, φ-weighted for CHORD-φ); labels' advantages and
        old_logp are not used."""
        if self.mu is None:
            raise ValidationError(
                "paradigm 'chord' weighs its terms by μ at a step: call for_step(step, total_steps, cfg).loss(...)"
            )
        is_label = self._validate_loss_inputs(logp, old_logp, mask, advantages, is_label, cfg, ref_logp)
        rollouts = ~is_label
        aggregate = AGGREGATIONS[cfg.agg]
        pg_loss, metrics = _policy_loss(
            logp[rollouts],
            old_logp[rollouts],
            advantages[rollouts],
            mask[rollouts],
            cfg.clip_low,
            cfg.clip_high,
            aggregate,
        )
        label_logp, label_mask = logp[is_label], mask[is_label]
        phi = None
        if cfg.chord_token_weight == "p_one_minus_p":
            probability = label_logp.detach().exp()
            phi = probability * (1 - probability)
            metrics["label_phi_mean"] = masked_mean(phi, label_mask).item()
        sft = _sft_loss(label_logp, label_mask, aggregate, phi)
        loss = (1 - self.mu) * pg_loss + self.mu * sft
        metrics |= {"pg_loss": pg_loss.item(), "sft_loss": sft.item(), "chord_mu": self.mu}
        return self._finish(loss, metrics, logp, mask, is_label, cfg, ref_logp)
