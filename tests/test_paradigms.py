"""Paradigm registry, member order, schedules, configuration checks, and the ViSurf gradient identity, in float64."""

import dataclasses

import pytest
import torch

from visurf_ray.objectives import (
    PARADIGMS,
    GroupAdvantages,
    ObjectiveConfig,
    Paradigm,
    get_paradigm,
    group_advantages,
    policy_loss,
    register_paradigm,
    sft_loss,
    stack_members,
    visurf_advantages,
)

F64 = torch.float64
VOCAB, PROMPTS, GROUP, LENGTH = 11, 2, 4, 7


class BigramLM(torch.nn.Module):
    """A tiny autoregressive model: log π(token t | token t−1)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 5, dtype=F64)
        self.head = torch.nn.Linear(5, VOCAB, dtype=F64)

    def forward(self, tokens):
        """tokens: [N, T + 1] ids -> logp [N, T] of tokens[:, 1:]."""
        logits = self.head(torch.tanh(self.embed(tokens[:, :-1])))
        return logits.log_softmax(dim=-1).gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


def _visurf_batch(seed=0):
    """Members in order (per prompt: GROUP rollouts, then the label) with ragged lengths, and their advantages."""
    generator = torch.Generator().manual_seed(seed)
    rollout_tokens = torch.randint(VOCAB, (PROMPTS, GROUP, LENGTH + 1), generator=generator)
    label_tokens = torch.randint(VOCAB, (PROMPTS, LENGTH + 1), generator=generator)
    rollout_lengths = torch.randint(2, LENGTH + 1, (PROMPTS, GROUP), generator=generator)
    label_lengths = torch.tensor([LENGTH, 3])
    positions = torch.arange(LENGTH)
    rollout_mask = positions < rollout_lengths.unsqueeze(-1)
    label_mask = positions < label_lengths.unsqueeze(-1)
    rollout_rewards = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.5]], dtype=F64)
    label_rewards = torch.tensor([1.0, 1.0], dtype=F64)
    cfg = ObjectiveConfig(paradigm="visurf", num_rollouts=GROUP, eps=0.0)
    group = get_paradigm("visurf").advantages(rollout_rewards, label_rewards, cfg)
    advantages, is_label = group.per_member()
    return {
        "tokens": stack_members(rollout_tokens, label_tokens),
        "mask": stack_members(rollout_mask, label_mask),
        "advantages": advantages,
        "is_label": is_label,
        "group": group,
        "cfg": cfg,
    }


def _gradient(model, loss_of_logp):
    model.zero_grad()
    loss_of_logp().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_visurf_gradient_is_rlvr_part_plus_weighted_label_sft_gradient():
    """Ratio 1, seq-mean-token-mean: ∇L = G/(G+1)·∇L_RLVR(rollouts) + Σ_b Â_y,b/(B(G+1))·∇L_SFT(label_b)."""
    batch = _visurf_batch()
    model = BigramLM()
    is_label, mask, advantages, cfg = batch["is_label"], batch["mask"], batch["advantages"], batch["cfg"]
    assert cfg.agg == "seq-mean-token-mean"
    label_adv = batch["group"].label
    assert label_adv[0].item() > 0 and label_adv[1].item() == 0.0  # prompt 1: a rollout reaches r(y), smoothing fired

    def visurf_loss():
        logp = model(batch["tokens"])
        return get_paradigm("visurf").loss(logp, logp.detach(), mask, advantages, is_label, cfg)[0]

    def rlvr_part():
        logp = model(batch["tokens"][~is_label])
        return policy_loss(logp, logp.detach(), advantages[~is_label], mask[~is_label], agg=cfg.agg)[0]

    def label_sft(b):
        return lambda: sft_loss(model(batch["tokens"][is_label][b : b + 1]), mask[is_label][b : b + 1])

    expected = GROUP / (GROUP + 1) * _gradient(model, rlvr_part)
    for b in range(PROMPTS):
        expected += label_adv[b] / (PROMPTS * (GROUP + 1)) * _gradient(model, label_sft(b))
    torch.testing.assert_close(_gradient(model, visurf_loss), expected, rtol=0, atol=1e-10)


def test_single_prompt_label_gradient_weight_is_advantage_over_group_size():
    """The paper's statement for one prompt: the label's term is Â_y/(G+1) · ∇L_SFT(label)."""
    batch = _visurf_batch(seed=1)
    model = BigramLM()
    first = slice(0, GROUP + 1)
    tokens, mask, advantages, is_label = (batch[k][first] for k in ("tokens", "mask", "advantages", "is_label"))
    cfg, label_adv = batch["cfg"], batch["group"].label[0]

    def visurf_loss():
        logp = model(tokens)
        return get_paradigm("visurf").loss(logp, logp.detach(), mask, advantages, is_label, cfg)[0]

    def rollouts_sum():
        logp = model(tokens[:GROUP])
        return GROUP * policy_loss(logp, logp.detach(), advantages[:GROUP], mask[:GROUP], agg=cfg.agg)[0]

    expected = (
        _gradient(model, rollouts_sum) + label_adv * _gradient(model, lambda: sft_loss(model(tokens[-1:]), mask[-1:]))
    ) / (GROUP + 1)
    torch.testing.assert_close(_gradient(model, visurf_loss), expected, rtol=0, atol=1e-10)


def test_token_mean_weighs_each_member_by_its_token_share():
    """Under token-mean, member n weighs n_n / Σ n: ∇L = Σ_j (n_j/n)·∇L_j + Â_y·(n_y/n)·∇L_SFT(label)."""
    batch = _visurf_batch(seed=2)
    model = BigramLM()
    cfg = dataclasses.replace(batch["cfg"], agg="token-mean")
    tokens, mask, advantages, is_label = batch["tokens"], batch["mask"], batch["advantages"], batch["is_label"]
    shares = mask.sum(dim=1).double() / mask.sum()

    def member_loss(n):
        logp = model(tokens[n : n + 1])
        if is_label[n]:
            return advantages[n] * sft_loss(logp, mask[n : n + 1])
        return policy_loss(logp, logp.detach(), advantages[n : n + 1], mask[n : n + 1])[0]

    def visurf_loss():
        logp = model(tokens)
        return get_paradigm("visurf").loss(logp, logp.detach(), mask, advantages, is_label, cfg)[0]

    expected = sum(shares[n] * _gradient(model, lambda n=n: member_loss(n)) for n in range(len(tokens)))
    torch.testing.assert_close(_gradient(model, visurf_loss), expected, rtol=0, atol=1e-10)
    assert shares[is_label].tolist() != [1 / len(tokens)] * PROMPTS  # ragged labels: not the uniform member weight


def test_builtin_paradigms_and_member_layout():
    cfg = ObjectiveConfig(num_rollouts=3)
    layouts = {name: PARADIGMS[name].member_is_label(2, cfg).tolist() for name in ("sft", "rlvr", "visurf")}
    assert layouts == {
        "sft": [True, True],
        "rlvr": [False] * 6,
        "visurf": [False, False, False, True, False, False, False, True],
    }
    assert {name: (p.needs_rollouts, p.needs_label) for name, p in PARADIGMS.items()} == {
        "sft": (False, True),
        "rlvr": (True, False),
        "visurf": (True, True),
        "sft_rlvr": (True, True),
    }


def test_advantages_per_paradigm():
    rollout_rewards = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0], [0.5, 0.5, 0.5]], dtype=F64)
    label_rewards = torch.tensor([1.0, 1.0, 0.2], dtype=F64)
    cfg = ObjectiveConfig(num_rollouts=3)

    sft = get_paradigm("sft").advantages(None, label_rewards, cfg)
    assert sft.rollout is None and torch.equal(sft.label, torch.ones(3, dtype=F64))
    assert sft.metrics["label_advantage_mean"] == 1.0

    rlvr = get_paradigm("rlvr").advantages(rollout_rewards, None, cfg)
    assert rlvr.label is None and torch.equal(rlvr.rollout, group_advantages(rollout_rewards))
    assert rlvr.metrics["zero_std_fraction"] == pytest.approx(2 / 3)

    visurf = get_paradigm("visurf").advantages(rollout_rewards, label_rewards, cfg)
    expected_rollout, expected_label = visurf_advantages(rollout_rewards, label_rewards)
    assert torch.equal(visurf.rollout, expected_rollout) and torch.equal(visurf.label, expected_label)
    assert visurf.metrics["smoothing_fired_fraction"] == pytest.approx(2 / 3)  # rows 1 and 2
    assert visurf.metrics["zero_std_fraction"] == pytest.approx(1 / 3)  # row 2 after smoothing
    assert visurf.metrics["label_advantage_mean"] == pytest.approx(expected_label.mean().item())
    assert visurf.metrics["label_reward_mean"] == pytest.approx(0.7333333333333333)

    unsmoothed = get_paradigm("visurf").advantages(
        rollout_rewards, label_rewards, dataclasses.replace(cfg, smoothing=False)
    )
    assert unsmoothed.metrics["smoothing_fired_fraction"] == 0.0
    assert unsmoothed.label[1].item() > 0


def test_per_member_stacks_rollouts_then_label():
    group = GroupAdvantages(
        rollout=torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64), label=torch.tensor([5.0, 6.0], dtype=F64), metrics={}
    )
    advantages, is_label = group.per_member()
    assert advantages.tolist() == [1.0, 2.0, 5.0, 3.0, 4.0, 6.0]
    assert is_label.tolist() == [False, False, True, False, False, True]
    rows = stack_members(torch.zeros(2, 3, 5), torch.ones(2, 5))
    assert rows.shape == (8, 5) and rows[3].tolist() == [1.0] * 5 and rows[4].tolist() == [0.0] * 5


def _loss_inputs(paradigm, cfg, num_prompts=2, seed=0):
    is_label = PARADIGMS[paradigm].member_is_label(num_prompts, cfg)
    generator = torch.Generator().manual_seed(seed)
    logp = -torch.rand(len(is_label), 5, generator=generator, dtype=F64)
    mask = torch.ones_like(logp, dtype=torch.bool)
    advantages = torch.randn(len(is_label), generator=generator, dtype=F64)
    return logp, logp.clone(), mask, advantages, is_label


@pytest.mark.parametrize("paradigm", ["sft", "rlvr", "visurf"])
def test_loss_metrics_separate_label_and_rollouts(paradigm):
    cfg = ObjectiveConfig(paradigm=paradigm, num_rollouts=3)
    logp, old_logp, mask, advantages, is_label = _loss_inputs(paradigm, cfg)
    loss, metrics = get_paradigm(paradigm).loss(logp, old_logp, mask, advantages, is_label, cfg)
    assert metrics["loss"] == loss.item()
    assert ("label_logp_mean" in metrics) == get_paradigm(paradigm).needs_label
    assert ("rollout_logp_mean" in metrics) == get_paradigm(paradigm).needs_rollouts
    if paradigm == "visurf":
        assert metrics["label_logp_mean"] == pytest.approx(logp[is_label].mean().item())
        assert metrics["label_token_fraction"] == pytest.approx(1 / 4)
    if paradigm == "sft":
        assert loss.item() == pytest.approx(-logp.mean().item())


@pytest.mark.parametrize("paradigm", ["sft", "rlvr", "visurf"])
def test_loss_rejects_members_out_of_order(paradigm):
    cfg = ObjectiveConfig(paradigm=paradigm, num_rollouts=3)
    logp, old_logp, mask, advantages, is_label = _loss_inputs(paradigm, cfg)
    flipped = is_label.clone()
    flipped[0] = ~flipped[0]
    with pytest.raises(ValueError, match="is_label must follow"):
        get_paradigm(paradigm).loss(logp, old_logp, mask, advantages, flipped, cfg)
    with pytest.raises(ValueError, match="is_label must be a torch.bool"):
        get_paradigm(paradigm).loss(logp, old_logp, mask, advantages, is_label.long(), cfg)


@pytest.mark.parametrize("paradigm", ["rlvr", "visurf"])
def test_loss_rejects_incomplete_groups(paradigm):
    cfg = ObjectiveConfig(paradigm=paradigm, num_rollouts=3)
    logp, old_logp, mask, advantages, is_label = _loss_inputs(paradigm, cfg)
    with pytest.raises(ValueError, match="is_label must follow"):
        get_paradigm(paradigm).loss(logp[1:], old_logp[1:], mask[1:], advantages[1:], is_label[1:], cfg)


def test_kl_term_needs_ref_logp_and_adds_with_its_coefficient():
    cfg = ObjectiveConfig(paradigm="rlvr", num_rollouts=3, kl_coef=0.1, kl_kind="mse")
    logp, old_logp, mask, advantages, is_label = _loss_inputs("rlvr", cfg)
    with pytest.raises(ValueError, match="ref_logp is required"):
        get_paradigm("rlvr").loss(logp, old_logp, mask, advantages, is_label, cfg)
    ref_logp = logp - 0.2
    loss, metrics = get_paradigm("rlvr").loss(logp, old_logp, mask, advantages, is_label, cfg, ref_logp=ref_logp)
    assert metrics["kl"] == pytest.approx(0.5 * 0.2**2, rel=1e-12)
    assert loss.item() == pytest.approx(metrics["pg_loss"] + 0.1 * metrics["kl"], rel=1e-12)


def test_unknown_paradigm_names_the_argument_and_lists_known_ones():
    with pytest.raises(ValueError, match=r"paradigm must be one of \['rlvr', 'sft', 'sft_rlvr', 'visurf'\]"):
        get_paradigm("luffy")
    with pytest.raises(ValueError, match="paradigm must be one of"):
        ObjectiveConfig(paradigm="chord")


@pytest.fixture
def rejection_sampling_paradigm():
    """A new paradigm in one class: rejection-sampling fine-tuning (SFT on rollouts weighted by their reward)."""

    @register_paradigm("rft")
    class RejectionSamplingFT(Paradigm):
        needs_rollouts = True
        needs_label = False

        def advantages(self, rollout_rewards, label_rewards, cfg):
            return GroupAdvantages(rollout=rollout_rewards.clone(), label=None, metrics={})

        def loss(self, logp, old_logp, mask, advantages, is_label, cfg, *, ref_logp=None):
            loss, metrics = policy_loss(logp, old_logp, advantages, mask, agg=cfg.agg)
            return loss, {"loss": loss.item(), **metrics}

    yield RejectionSamplingFT
    del PARADIGMS["rft"]


def test_registering_a_paradigm_is_one_class(rejection_sampling_paradigm):
    cfg = ObjectiveConfig(paradigm="rft", num_rollouts=2)
    paradigm = get_paradigm(cfg.paradigm)
    assert isinstance(paradigm, rejection_sampling_paradigm) and paradigm.name == "rft"
    assert paradigm.for_step(3, 10, cfg) is paradigm
    group = paradigm.advantages(torch.tensor([[1.0, 0.0]], dtype=F64), None, cfg)
    assert group.per_member()[0].tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="already registered"):
        register_paradigm("rft")(rejection_sampling_paradigm)


@pytest.mark.parametrize(
    ("sft_share", "total_steps", "sft_steps"),
    [(0.5, 10, 5), (0.3, 10, 3), (0.0, 4, 0), (1.0, 4, 4), (0.25, 2, 0), (0.75, 2, 2)],
)
def test_sft_rlvr_schedule(sft_share, total_steps, sft_steps):
    cfg = ObjectiveConfig(paradigm="sft_rlvr", num_rollouts=2, sft_share=sft_share)
    stages = [get_paradigm("sft_rlvr").for_step(step, total_steps, cfg).name for step in range(total_steps)]
    assert stages == ["sft"] * sft_steps + ["rlvr"] * (total_steps - sft_steps)


@pytest.mark.parametrize("paradigm", ["sft", "rlvr", "visurf"])
def test_other_paradigms_are_their_own_stage(paradigm):
    cfg = ObjectiveConfig(paradigm=paradigm)
    assert get_paradigm(paradigm).for_step(0, 1, cfg) is get_paradigm(paradigm)


def test_schedule_is_not_an_objective_and_steps_are_checked():
    cfg = ObjectiveConfig(paradigm="sft_rlvr")
    with pytest.raises(ValueError, match="for_step"):
        get_paradigm("sft_rlvr").advantages(torch.zeros(1, 8, dtype=F64), torch.zeros(1, dtype=F64), cfg)
    with pytest.raises(ValueError, match="step must be"):
        get_paradigm("sft_rlvr").for_step(10, 10, cfg)
    with pytest.raises(ValueError, match="total_steps must be"):
        get_paradigm("visurf").for_step(0, 0, cfg)


@pytest.mark.parametrize(
    ("paradigm", "rollout_rewards", "label_rewards", "match"),
    [
        ("rlvr", torch.zeros(2, 3, dtype=F64), torch.zeros(2, dtype=F64), "label_rewards must be None for rlvr"),
        ("sft", torch.zeros(2, 3, dtype=F64), torch.zeros(2, dtype=F64), "rollout_rewards must be None for sft"),
        ("sft", None, None, "label_rewards must be given for sft"),
        ("sft", None, torch.zeros(2, dtype=torch.int64), "label_rewards must be a floating-point"),
        ("sft", None, [1.0, 0.0], "label_rewards must be a floating-point"),
        ("visurf", None, torch.zeros(2, dtype=F64), "rollout_rewards must be given for visurf"),
        ("visurf", torch.zeros(2, 4, dtype=F64), torch.zeros(2, dtype=F64), r"num_rollouts=3\], got \(2, 4\)"),
    ],
)
def test_advantages_reject_missing_or_extra_members(paradigm, rollout_rewards, label_rewards, match):
    cfg = ObjectiveConfig(paradigm=paradigm, num_rollouts=3)
    with pytest.raises(ValueError, match=match):
        get_paradigm(paradigm).advantages(rollout_rewards, label_rewards, cfg)


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_rollouts", 1),
        ("num_rollouts", 4.0),
        ("clip_low", 1.2),
        ("clip_high", 0.0),
        ("agg", "sum"),
        ("unbiased_std", 1),
        ("smoothing", "yes"),
        ("eps", -1.0),
        ("kl_coef", -0.1),
        ("kl_coef", float("nan")),
        ("kl_kind", "k3"),
        ("sft_share", 1.5),
    ],
)
def test_config_rejects_bad_fields_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        ObjectiveConfig(**{field: value})


def test_config_defaults_and_sft_needs_no_rollouts():
    cfg = ObjectiveConfig()
    assert (cfg.paradigm, cfg.num_rollouts, cfg.agg, cfg.smoothing) == ("visurf", 8, "seq-mean-token-mean", True)
    assert ObjectiveConfig(paradigm="sft", num_rollouts=0).num_rollouts == 0
    with pytest.raises(ValueError, match="num_rollouts"):
        ObjectiveConfig(paradigm="sft_rlvr", num_rollouts=1)
