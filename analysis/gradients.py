"""Gradient derivation checks of ViSurf: the SFT, RLVR and ViSurf gradients of one prompt group, ViSurf's split into
its rollout part and its label part, the paper's identities checked numerically, and how the label's (SFT-like) term
changes as a policy improves over the checkpoints of a training run. Importable, and a CLI:

    python analysis/gradients.py --checkpoint PATH [--out DIR]   # PATH: a policy folder or a LocalSession run folder

Everything runs in float64 on CPU. A group is one prompt with its G rollouts and its label (member order of
`visurf_ray.objectives`: rollouts, then the label). Every loss goes through the suite's own paradigms with
agg="seq-mean-token-mean", the aggregation under which each of the G+1 members weighs exactly 1/(G+1) (the paper's
formula averages over members; under "token-mean" a member's weight would be its share of the group's tokens), and with
old_logp = logp.detach(), i.e. ratio ρ = 1 as at ViSurf's single update per batch. Then, with ∇SFT the gradient of
the label's token-mean negative log-likelihood:
  - ViSurf = rollout part + Â_y/(G+1)·∇SFT ("decomposition"; "label_part" checks the label part alone);
  - rollouts tied at one reward below the label's (the paper's all-fail group, r(o_j) = 0 < R): the label part is
    √G/(G+1)·∇SFT with the population std, G/((G+1)√(G+1))·∇SFT with the unbiased one ("all_fail_closed_form"), and
    ∇RLVR = 0 ("rlvr_no_signal");
  - smoothing fired (max_j r(o_j) >= r(y)): the label part is 0 ("smoothing_label_zero") and ViSurf is RLVR rescaled,
    c·G/(G+1)·∇RLVR with c = √(G/(G−1)) (unbiased std) or √((G+1)/G) (population std) ("smoothing_rescale").
The closed forms are exact for eps = 0 (`GradientCheckConfig.eps`, the default here); with eps > 0 every std σ
becomes σ + eps and the residuals show it.

Imports torch, transformers, pandas, and matplotlib inside the plot functions; never Ray.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import Tensor

from visurf_ray import rewards
from visurf_ray.config import TINY_BASE_MODEL
from visurf_ray.data.benchmark import make_split
from visurf_ray.data.sample import Sample
from visurf_ray.models.generation import generate
from visurf_ray.models.inputs import completion_logprobs, encode_prompts, encode_sequences
from visurf_ray.models.policy import Policy, load_policy, use_input_dtype_norms
from visurf_ray.objectives.advantages import smoothing_mask
from visurf_ray.objectives.paradigms import ObjectiveConfig, get_paradigm, stack_members
from visurf_ray.rollout.base import Rollouts
from visurf_ray.train.loop import TRAINER_STATE
from visurf_ray.train.step import label_token_ids, score_groups

AGGREGATION = "seq-mean-token-mean"
OUTCOMES = ("all_fail", "mixed", "label_matched")
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
DEEPSPEED_MODEL_STATES = Path("engine") / "mp_rank_00_model_states.pt"
TORCH_ENGINE_STATE = Path("engine.pt")


@dataclass(frozen=True)
class GradientCheckConfig:
    """How groups are sampled and which ViSurf objective is differentiated; validated on construction.

    num_rollouts: G completions per prompt (>= 2). max_new_tokens: rollout length limit in tokens (48: a tiny-model
    answer with its reasoning is ~34 tokens). temperature: sampling temperature (> 0). seed: the sampling seed, the
    same at every checkpoint. unbiased_std, smoothing, eps, align_label, eliminate_label_thinking: as in
    `ObjectiveConfig` (eps defaults to 0 here: the closed forms are exact then).
    """

    num_rollouts: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    seed: int = 0
    unbiased_std: bool = True
    smoothing: bool = True
    eps: float = 0.0
    align_label: bool = True
    eliminate_label_thinking: bool = True

    def __post_init__(self) -> None:
        for name, least in (("max_new_tokens", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if isinstance(self.temperature, bool) or not (
            isinstance(self.temperature, int | float) and math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        self.objective()  # validates num_rollouts, eps and the flags

    def objective(self) -> ObjectiveConfig:
        """The ViSurf objective differentiated: these settings, agg "seq-mean-token-mean", no KL term."""
        return ObjectiveConfig(
            paradigm="visurf",
            num_rollouts=self.num_rollouts,
            agg=AGGREGATION,
            unbiased_std=self.unbiased_std,
            smoothing=self.smoothing,
            eps=self.eps,
            align_label=self.align_label,
            eliminate_label_thinking=self.eliminate_label_thinking,
            kl_coef=0.0,
        )


@dataclass(frozen=True)
class Group:
    """One prompt group, scored as the trainer scores it (`visurf_ray.train.step.score_groups`).

    rollout_ids: G completions as token ids (each closed by eos unless cut at max_new_tokens); rollout_texts: their
    text. label_text / label_ids: the label completion after the reward controls (aligned when configured), its ids
    closed by eos. rollout_rewards / label_reward: `overall` rewards (reward units), the label's after eliminating its
    thinking reward when configured and before smoothing. rollout_success: the task verifier's `is_success` per rollout.
    """

    sample: Sample
    rollout_texts: list[str]
    rollout_ids: list[list[int]]
    label_text: str
    label_ids: list[int]
    rollout_rewards: list[float]
    label_reward: float
    rollout_success: list[bool]

    @property
    def outcome(self) -> str:
        """`group_outcome` of this group."""
        return group_outcome(self.rollout_rewards, self.label_reward, self.rollout_success)


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


def _groups_from_rollouts(
    policy: Policy, samples: list[Sample], rollouts: Rollouts, cfg: GradientCheckConfig
) -> list[Group]:
    scored = score_groups(samples, rollouts, cfg.objective(), get_paradigm("visurf"))
    labels = label_token_ids(policy, [group.label_text for group in scored])
    groups = []
    for index, (sample, group, label_ids) in enumerate(zip(samples, scored, labels)):
        members = [j for j, owner in enumerate(rollouts.prompt_index) if owner == index]
        verifier = rewards.get_verifier(sample.task)
        groups.append(
            Group(
                sample=sample,
                rollout_texts=[rollouts.texts[j] for j in members],
                rollout_ids=[rollouts.completion_ids[j] for j in members],
                label_text=group.label_text,
                label_ids=label_ids,
                rollout_rewards=[c["overall"] for c in group.rollout_components],
                label_reward=group.label_components["overall"],
                rollout_success=[verifier.is_success(c) for c in group.rollout_components],
            )
        )
    return groups


def sample_groups(policy: Policy, samples: list[Sample], cfg: GradientCheckConfig) -> list[Group]:
    """Sample cfg.num_rollouts completions per prompt (seed cfg.seed, cfg.temperature, up to cfg.max_new_tokens tokens)
    with `visurf_ray.models.generation.generate` and score each group as the trainer does."""
    if not samples:
        raise ValueError("samples is empty: no prompt to sample groups for")
    prompts = encode_prompts(policy, [s.image for s in samples], [s.problem for s in samples])
    completions = generate(
        policy,
        prompts,
        num_return_sequences=cfg.num_rollouts,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        seed=cfg.seed,
    )
    rollouts = Rollouts(completions.completion_ids, completions.prompt_index, completions.texts)
    return _groups_from_rollouts(policy, samples, rollouts, cfg)


def constructed_groups(
    policy: Policy, samples: list[Sample], rollout_texts: list[list[str]], cfg: GradientCheckConfig
) -> list[Group]:
    """Groups whose rollouts are chosen texts (each tokenized and closed by eos), scored as the trainer does.

    rollout_texts: for each sample, exactly cfg.num_rollouts completion strings.
    """
    if not samples or len(rollout_texts) != len(samples):
        raise ValueError(f"rollout_texts needs one list per sample ({len(samples)}), got {len(rollout_texts)}")
    for index, texts in enumerate(rollout_texts):
        if len(texts) != cfg.num_rollouts or not all(isinstance(text, str) for text in texts):
            raise ValueError(
                f"rollout_texts[{index}] must hold {cfg.num_rollouts} strings (num_rollouts), got {texts!r}"
            )
    flat = [text for texts in rollout_texts for text in texts]
    prompt_index = [index for index, texts in enumerate(rollout_texts) for _ in texts]
    rollouts = Rollouts(label_token_ids(policy, flat), prompt_index, flat)
    return _groups_from_rollouts(policy, samples, rollouts, cfg)


def group_logprobs(policy: Policy, group: Group) -> tuple[Tensor, Tensor]:
    """Log-probs of the group's G+1 members (rollouts, then the label) under `policy`, differentiable.

    Returns (logp [G+1, T] nats in the model's dtype, mask [G+1, T] bool), T the longest member in tokens.
    """
    prompts = encode_prompts(policy, [group.sample.image], [group.sample.problem])
    members = [*group.rollout_ids, group.label_ids]
    sequences = encode_sequences(policy, prompts, members, [0] * len(members)).to(policy.device)
    logp, mask = completion_logprobs(policy.model, sequences)
    return logp, mask.bool()


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


def gradient_table(policy: Policy, groups: list[Group], cfg: GradientCheckConfig, *, step: int = 0) -> pd.DataFrame:
    """One row per group at one checkpoint (`step`, optimizer steps; 0 for the starting model): the group's facts
    (prompt id, task, outcome, rewards, success rate, smoothing), `gradient_metrics` and `residual_<check>` for every
    check in CHECKS. The policy must be float64 for residuals below TOLERANCE; it is put in eval mode."""
    policy.model.eval()
    params = [p for p in policy.model.parameters() if p.requires_grad]
    objective = cfg.objective()
    rows = []
    for group in groups:
        logp, mask = group_logprobs(policy, group)
        rollout_rewards = torch.tensor(group.rollout_rewards, dtype=torch.float64)
        grads = paradigm_gradients(logp, mask, params, rollout_rewards, group.label_reward, objective)
        residuals = identity_residuals(grads, objective)
        rows.append(
            {
                "step": step,
                "prompt_id": group.sample.id,
                "task": group.sample.task,
                "outcome": group.outcome,
                "all_fail": not any(group.rollout_success),
                "success_rate": sum(group.rollout_success) / len(group.rollout_success),
                "rollout_reward_mean": sum(group.rollout_rewards) / len(group.rollout_rewards),
                "rollout_reward_max": max(group.rollout_rewards),
                "label_reward": group.label_reward,
                "smoothing_fired": grads.smoothing_fired,
                **gradient_metrics(grads),
                **{f"residual_{name}": value for name, value in residuals.items()},
            }
        )
    return pd.DataFrame(rows)


def load_float64_policy(path: str | Path) -> Policy:
    """A policy folder (`load_policy`), or "tiny-base" for the cached tiny base model, in float64 on CPU, eval mode.

    Every Qwen2.5-VL RMSNorm is replaced by a `torch.nn.RMSNorm` sharing its weight (the same function, computed in
    the input's dtype): transformers' RMSNorm computes in float32 whatever the model's dtype, which rounds every
    gradient passing through it to float32 (identity residuals ~4e-8 instead of ~1e-13). One float32 step remains,
    in transformers' vision rotary embedding (`apply_rotary_pos_emb_vision` casts q and k to float32): it bounds the
    residuals at float32 precision times the vision attention's share of the gradient.
    """
    if str(path) == TINY_BASE_MODEL:
        from visurf_ray.train.pretrain import ensure_base_model  # pretrains it on first use (minutes)

        path = ensure_base_model()
    policy = load_policy(path, dtype=torch.float64, device="cpu")
    use_input_dtype_norms(policy.model)
    policy.model.eval()
    return policy


def load_checkpoint_weights(policy: Policy, step_dir: str | Path) -> None:
    """Load the model weights of a `LocalSession` checkpoint folder (`<run>/checkpoints/step_*/`) into `policy`, in
    its dtype: DeepSpeed's `engine/mp_rank_00_model_states.pt` (the module state under "module"; with bf16 training
    these are the bf16 module weights, not the fp32 master copy) or `engine.pt` when DeepSpeed was off. ZeRO-3
    checkpoints (partitioned weights) are refused."""
    step_dir = Path(step_dir)
    files = [step_dir / name for name in (DEEPSPEED_MODEL_STATES, TORCH_ENGINE_STATE) if (step_dir / name).is_file()]
    if not files:
        raise ValueError(f"checkpoint {step_dir} holds neither {DEEPSPEED_MODEL_STATES} nor {TORCH_ENGINE_STATE}")
    state = torch.load(files[0], map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "module" not in state:
        raise ValueError(f"{files[0]} has no 'module' state dict")
    try:
        policy.model.load_state_dict(state["module"])
    except RuntimeError as error:
        raise ValueError(f"{files[0]} does not match the run's model (a ZeRO-3 checkpoint?): {error}") from error


def _run_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    steps = []
    for step_dir in sorted((run_dir / "checkpoints").glob("step_*")):
        state_file = step_dir / TRAINER_STATE
        if not state_file.is_file():
            raise ValueError(f"checkpoint {step_dir} has no {TRAINER_STATE} (incomplete checkpoint)")
        steps.append((int(json.loads(state_file.read_text())["step"]), step_dir))
    if not steps:
        raise ValueError(f"run folder {run_dir} has no checkpoints/step_* folder")
    return sorted(steps)


def checkpoint_policies(checkpoint: str | Path) -> Iterator[tuple[int, Policy]]:
    """(step, float64 policy) pairs: for a policy folder or "tiny-base", only (0, it); for a run folder written by
    `visurf_ray.train.loop.LocalSession` (`<run>/checkpoints/step_*/`), the run's starting model (its
    trainer_state.json's config model.path) as step 0, then every checkpoint in step order. Each policy is loaded
    fresh when its turn comes."""
    path = Path(checkpoint)
    if str(checkpoint) == TINY_BASE_MODEL or (path / "config.json").is_file():
        yield 0, load_float64_policy(checkpoint)
        return
    if not (path / "checkpoints").is_dir():
        raise ValueError(
            f"checkpoint {str(checkpoint)!r} is neither a policy folder (config.json), 'tiny-base' nor a "
            "run folder (checkpoints/step_*/)"
        )
    checkpoints = _run_checkpoints(path)
    base = json.loads((checkpoints[0][1] / TRAINER_STATE).read_text())["config"]["model"]["path"]
    yield 0, load_float64_policy(base)
    for step, step_dir in checkpoints:
        policy = load_float64_policy(base)
        load_checkpoint_weights(policy, step_dir)
        yield step, policy


def analyse_checkpoints(checkpoint: str | Path, samples: list[Sample], cfg: GradientCheckConfig) -> pd.DataFrame:
    """`gradient_table` of groups sampled (same prompts, same seed) from every policy of `checkpoint_policies`,
    concatenated: one row per (step, prompt)."""
    tables = [
        gradient_table(policy, sample_groups(policy, samples, cfg), cfg, step=step)
        for step, policy in checkpoint_policies(checkpoint)
    ]
    return pd.concat(tables, ignore_index=True)


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


def _outcome_lines(table: pd.DataFrame, column: str, ax, *, all_groups: bool = False) -> None:
    """Mean of `column` per step for each outcome (and over all groups); NaN values (undefined cosines) are skipped."""
    from matplotlib.ticker import MaxNLocator

    lines = {outcome: table[table["outcome"] == outcome] for outcome in OUTCOMES}
    if all_groups:
        lines["all groups"] = table
    plotted = False
    for name, part in lines.items():
        means = part.groupby("step")[column].mean().dropna()
        if len(means):
            style = {"color": "black", "linestyle": "--"} if name == "all groups" else {}
            ax.plot(means.index, means.values, marker="o", label=name, **style)
            plotted = True
    if plotted:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "undefined in every group", transform=ax.transAxes, ha="center")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_label_share(table: pd.DataFrame):
    """Figure over the checkpoints' steps: the share of groups in each outcome, the label share (mean per outcome and
    over all groups), and the label advantage Â_y per outcome."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (outcomes, share, advantage) = plt.subplots(1, 3, figsize=(14, 3.6))
    fractions = table.groupby("step")["outcome"].value_counts(normalize=True).unstack(fill_value=0.0)
    for outcome in OUTCOMES:
        if outcome in fractions:
            outcomes.plot(fractions.index, fractions[outcome], marker="o", label=outcome)
    outcomes.set(xlabel="optimizer step", ylabel="share of groups", title="group outcomes", ylim=(-0.05, 1.05))
    outcomes.xaxis.set_major_locator(MaxNLocator(integer=True))
    outcomes.legend()
    _outcome_lines(table, "label_share", share, all_groups=True)
    share.set(
        ylabel="‖label‖ / (‖label‖ + ‖rollout‖)", title="SFT term's share of the ViSurf gradient", ylim=(-0.05, 1.05)
    )
    _outcome_lines(table, "label_advantage", advantage)
    advantage.set(ylabel="Â_y", title="label advantage")
    fig.tight_layout()
    return fig


def plot_cosines(table: pd.DataFrame):
    """Figure: mean cos(SFT, RLVR), cos(SFT, ViSurf) and cos(RLVR, ViSurf) per outcome over the checkpoints' steps
    (a cosine with a zero gradient, e.g. RLVR's in a tied group, is undefined and skipped)."""
    import matplotlib.pyplot as plt

    pairs = {
        "cos_sft_rlvr": "cos(SFT, RLVR)",
        "cos_sft_visurf": "cos(SFT, ViSurf)",
        "cos_rlvr_visurf": "cos(RLVR, ViSurf)",
    }
    fig, axes = plt.subplots(1, len(pairs), figsize=(14, 3.6), sharey=True)
    for ax, (column, title) in zip(axes, pairs.items()):
        _outcome_lines(table, column, ax)
        ax.set(title=title, ylim=(-1.05, 1.05))
    axes[0].set_ylabel("cosine")
    fig.tight_layout()
    return fig


def plot_residuals(table: pd.DataFrame):
    """Figure: the largest residual of each check (log scale) against TOLERANCE; an exact 0 is drawn at 1e-18 and
    labelled, and checks that applied to no group are named in the title."""
    import matplotlib.pyplot as plt

    summary = residual_summary(table)
    applied = summary[summary["groups"] > 0]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    floor = 1e-18
    bars = ax.bar(applied.index, applied["max_residual"].clip(lower=floor))
    for bar, value in zip(bars, applied["max_residual"]):
        if value == 0:
            ax.text(bar.get_x() + bar.get_width() / 2, floor * 3, "exactly 0", ha="center", va="bottom")
    ax.axhline(TOLERANCE, color="red", linestyle="--", label=f"tolerance {TOLERANCE:g}")
    ax.set_yscale("log")
    ax.set_ylabel("max relative residual")
    missing = sorted(set(summary.index) - set(applied.index))
    ax.set_title("identity residuals (float64)" + (f"; not applicable: {', '.join(missing)}" if missing else ""))
    ax.tick_params(axis="x", rotation=20)
    ax.legend()
    fig.tight_layout()
    return fig


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """CLI: sample groups at every checkpoint, print the residual and outcome summaries; with --out, also write
    gradients.csv and the three plots there. Returns the table."""
    parser = argparse.ArgumentParser(
        description="Check ViSurf's gradient identities (float64) and summarise the SFT, RLVR and ViSurf gradients by "
        "group outcome over a policy's or a run's checkpoints."
    )
    parser.add_argument(
        "--checkpoint", default=TINY_BASE_MODEL, help="policy folder, LocalSession run folder, or 'tiny-base' (default)"
    )
    parser.add_argument("--split", default="eval/grounding", help="benchmark split of the prompts")
    parser.add_argument("--prompts", type=int, default=4, help="number of prompts")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the benchmark split")
    parser.add_argument("--num-rollouts", type=int, default=GradientCheckConfig.num_rollouts)
    parser.add_argument("--max-new-tokens", type=int, default=GradientCheckConfig.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=GradientCheckConfig.temperature)
    parser.add_argument("--seed", type=int, default=GradientCheckConfig.seed, help="sampling seed")
    parser.add_argument("--population-std", action="store_true", help="population std (default: unbiased)")
    parser.add_argument("--no-smoothing", action="store_true", help="turn reward smoothing off")
    parser.add_argument("--out", type=Path, help="folder for gradients.csv and the plots")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: fastest for the tiny models' small ops)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = GradientCheckConfig(
        num_rollouts=args.num_rollouts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        unbiased_std=not args.population_std,
        smoothing=not args.no_smoothing,
    )
    table = analyse_checkpoints(args.checkpoint, make_split(args.split, args.prompts, args.data_seed), cfg)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print("Identity residuals (relative, float64):")
        print(residual_summary(table).to_string())
        print("\nBy checkpoint step and group outcome:")
        print(outcome_summary(table).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "gradients.csv", index=False)
        for name, plot in (("label_share", plot_label_share), ("cosines", plot_cosines), ("residuals", plot_residuals)):
            plot(table).savefig(args.out / f"{name}.png", dpi=120)
        print(f"\nwrote {args.out / 'gradients.csv'} and plots")
    return table


if __name__ == "__main__":
    main()
