"""Paradigm registry, member order, schedules, configuration checks, and the gradient identities of ViSurf, LUFFY
(shaped off-policy term) and CHORD (μ-weighted sum of GRPO and SFT), in float64."""

import dataclasses
import math

import pytest
import torch

from visurf_ray.objectives import (
    AGGREGATIONS,
    PARADIGMS,
    GroupAdvantages,
    ObjectiveConfig,
    Paradigm,
    get_paradigm,
    group_advantages,
    kl_penalty,
    masked_mean,
    policy_loss,
    policy_shaping,
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
    names = ("sft", "rlvr", "visurf", "luffy", "chord")
    layouts = {name: PARADIGMS[name].member_is_label(2, cfg).tolist() for name in names}
    assert layouts == {
        "sft": [True, True],
        "rlvr": [False] * 6,
        "visurf": [False, False, False, True, False, False, False, True],
        "luffy": [False, False, True, False, False, True],  # G − 1 rollouts + the label: a group of G
        "chord": [False, False, False, True, False, False, False, True],
    }
    assert {name: PARADIGMS[name].rollouts_per_prompt(cfg) for name in names} == {
        "sft": 0,
        "rlvr": 3,
        "visurf": 3,
        "luffy": 2,
        "chord": 3,
    }
    assert {name: (p.paradigm_id, p.needs_rollouts, p.needs_label) for name, p in PARADIGMS.items()} == {
        "sft": (0, False, True),
        "rlvr": (1, True, False),
        "visurf": (2, True, True),
        "sft_rlvr": (3, True, True),
        "luffy": (4, True, True),
        "chord": (5, True, True),
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


def _at_step(paradigm, cfg):
    """The paradigm in effect at step 0 of a 1-step run (CHORD holds its μ there)."""
    return get_paradigm(paradigm).for_step(0, 1, cfg)


def _loss_inputs(paradigm, cfg, num_prompts=2, seed=0):
    is_label = PARADIGMS[paradigm].member_is_label(num_prompts, cfg)
    generator = torch.Generator().manual_seed(seed)
    logp = -torch.rand(len(is_label), 5, generator=generator, dtype=F64)
    mask = torch.ones_like(logp, dtype=torch.bool)
    advantages = torch.randn(len(is_label), generator=generator, dtype=F64)
    return logp, logp.clone(), mask, advantages, is_label


@pytest.mark.parametrize("paradigm", ["sft", "rlvr", "visurf", "luffy", "chord"])
def test_loss_metrics_separate_label_and_rollouts(paradigm):
    cfg = ObjectiveConfig(paradigm=paradigm, num_rollouts=3)
    logp, old_logp, mask, advantages, is_label = _loss_inputs(paradigm, cfg)
    loss, metrics = _at_step(paradigm, cfg).loss(logp, old_logp, mask, advantages, is_label, cfg)
    assert metrics["loss"] == loss.item()
    assert ("label_logp_mean" in metrics) == get_paradigm(paradigm).needs_label
    assert ("rollout_logp_mean" in metrics) == get_paradigm(paradigm).needs_rollouts
    if paradigm == "visurf":
        assert metrics["label_logp_mean"] == pytest.approx(logp[is_label].mean().item())
        assert metrics["label_token_fraction"] == pytest.approx(1 / 4)
    if paradigm == "sft":
        assert loss.item() == pytest.approx(-logp.mean().item())
    if paradigm in ("rlvr", "visurf", "luffy", "chord"):  # every policy-gradient paradigm reports the same core
        assert {"pg_loss", "clip_fraction", "approx_kl"} <= metrics.keys()
    if paradigm == "luffy":
        assert metrics["label_token_fraction"] == pytest.approx(1 / 3)  # 2 rollouts + the label per prompt
        assert {"label_shaped_ratio_mean", "label_shaping_weight_mean"} <= metrics.keys()
    if paradigm == "chord":
        assert metrics["chord_mu"] == cfg.chord_mu_start
        assert loss.item() == pytest.approx(0.1 * metrics["pg_loss"] + 0.9 * metrics["sft_loss"], rel=1e-12)


@pytest.mark.parametrize("paradigm", ["sft", "rlvr", "visurf", "luffy", "chord"])
def test_loss_rejects_members_out_of_order(paradigm):
    cfg = ObjectiveConfig(paradigm=paradigm, num_rollouts=3)
    logp, old_logp, mask, advantages, is_label = _loss_inputs(paradigm, cfg)
    flipped = is_label.clone()
    flipped[0] = ~flipped[0]
    with pytest.raises(ValueError, match="is_label must follow"):
        _at_step(paradigm, cfg).loss(logp, old_logp, mask, advantages, flipped, cfg)
    with pytest.raises(ValueError, match="is_label must be a torch.bool"):
        _at_step(paradigm, cfg).loss(logp, old_logp, mask, advantages, is_label.long(), cfg)


@pytest.mark.parametrize("paradigm", ["rlvr", "visurf", "luffy", "chord"])
def test_loss_rejects_incomplete_groups(paradigm):
    cfg = ObjectiveConfig(paradigm=paradigm, num_rollouts=3)
    logp, old_logp, mask, advantages, is_label = _loss_inputs(paradigm, cfg)
    with pytest.raises(ValueError, match="is_label must follow"):
        _at_step(paradigm, cfg).loss(logp[1:], old_logp[1:], mask[1:], advantages[1:], is_label[1:], cfg)


def test_kl_term_needs_ref_logp_and_adds_with_its_coefficient():
    cfg = ObjectiveConfig(paradigm="rlvr", num_rollouts=3, kl_coef=0.1, kl_kind="mse")
    logp, old_logp, mask, advantages, is_label = _loss_inputs("rlvr", cfg)
    with pytest.raises(ValueError, match="ref_logp is required"):
        get_paradigm("rlvr").loss(logp, old_logp, mask, advantages, is_label, cfg)
    ref_logp = logp - 0.2
    loss, metrics = get_paradigm("rlvr").loss(logp, old_logp, mask, advantages, is_label, cfg, ref_logp=ref_logp)
    assert metrics["kl"] == pytest.approx(0.5 * 0.2**2, rel=1e-12)
    assert loss.item() == pytest.approx(metrics["pg_loss"] + 0.1 * metrics["kl"], rel=1e-12)


def test_kl_term_is_masked_off_the_label_tokens():
    """ViSurf with KL: the term is the rollouts' KL alone (seq-mean-token-mean over the B·G rollouts), so the label's
    reference log-probs change nothing and its tokens get no KL gradient."""
    batch = _visurf_batch()
    model = BigramLM()
    is_label, mask, advantages = batch["is_label"], batch["mask"], batch["advantages"]
    cfg = dataclasses.replace(batch["cfg"], kl_coef=0.1, kl_kind="low_var_kl")
    no_kl = dataclasses.replace(cfg, kl_coef=0.0)
    offsets = torch.linspace(-0.3, 0.4, LENGTH, dtype=F64) * torch.arange(1, len(is_label) + 1, dtype=F64)[:, None]

    def visurf_loss(objective, label_offset=0.0):
        logp = model(batch["tokens"])
        ref_logp = (logp + offsets + label_offset * is_label[:, None]).detach()
        return get_paradigm("visurf").loss(
            logp, logp.detach(), mask, advantages, is_label, objective, ref_logp=ref_logp
        )

    def rollout_kl():
        logp = model(batch["tokens"][~is_label])
        ref_logp = (logp + offsets[~is_label]).detach()
        return kl_penalty(logp, ref_logp, mask[~is_label], "low_var_kl", agg="seq-mean-token-mean")

    loss, metrics = visurf_loss(cfg)
    assert metrics["kl"] == pytest.approx(rollout_kl().item(), rel=1e-12) and metrics["kl"] > 0
    assert visurf_loss(cfg, label_offset=5.0)[0].item() == pytest.approx(loss.item(), rel=1e-12)
    expected = _gradient(model, lambda: visurf_loss(no_kl)[0]) + 0.1 * _gradient(model, rollout_kl)
    torch.testing.assert_close(_gradient(model, lambda: visurf_loss(cfg)[0]), expected, rtol=0, atol=1e-10)
    sft = ObjectiveConfig(paradigm="sft", kl_coef=0.1)
    logp = model(batch["tokens"][is_label])
    sft_loss_value, sft_metrics = get_paradigm("sft").loss(
        logp, logp.detach(), mask[is_label], torch.ones(PROMPTS, dtype=F64), is_label[is_label], sft, ref_logp=logp - 1
    )
    assert sft_metrics["kl"] == 0.0 and sft_loss_value.item() == pytest.approx(sft_metrics["sft_loss"], rel=1e-12)


def test_unknown_paradigm_names_the_argument_and_lists_known_ones():
    known = r"\['chord', 'luffy', 'rlvr', 'sft', 'sft_rlvr', 'visurf'\]"
    with pytest.raises(ValueError, match=rf"paradigm must be one of {known}, got 'srft'"):
        get_paradigm("srft")
    with pytest.raises(ValueError, match="paradigm must be one of"):
        ObjectiveConfig(paradigm="hpt")


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


@pytest.mark.parametrize("paradigm", ["sft", "rlvr", "visurf", "luffy"])
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
        ("luffy", torch.zeros(2, 3, dtype=F64), torch.zeros(2, dtype=F64), r"num_rollouts=3 − 1\], got \(2, 3\)"),
        ("chord", None, torch.zeros(2, dtype=F64), "rollout_rewards must be given for chord"),
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
        ("luffy_gamma", 0.0),
        ("luffy_gamma", -0.1),
        ("luffy_gamma", float("inf")),
        ("chord_mu_start", 1.5),
        ("chord_mu_end", -0.1),
        ("chord_mu_end", "0.05"),
        ("chord_token_weight", "phi"),
    ],
)
def test_config_rejects_bad_fields_by_name(field, value):
    with pytest.raises(ValueError, match=field):
        ObjectiveConfig(**{field: value})


def test_config_defaults_and_sft_needs_no_rollouts():
    cfg = ObjectiveConfig()
    assert (cfg.paradigm, cfg.num_rollouts, cfg.agg, cfg.smoothing) == ("visurf", 8, "seq-mean-token-mean", True)
    assert (cfg.luffy_gamma, cfg.chord_mu_start, cfg.chord_mu_end, cfg.chord_token_weight) == (0.1, 0.9, 0.05, "none")
    with pytest.raises(ValueError, match="num_rollouts"):
        ObjectiveConfig(paradigm="luffy", num_rollouts=1)  # a group of G = 2 at least: one rollout and the label
    assert ObjectiveConfig(paradigm="sft", num_rollouts=0).num_rollouts == 0
    with pytest.raises(ValueError, match="num_rollouts"):
        ObjectiveConfig(paradigm="sft_rlvr", num_rollouts=1)


def _group_batch(paradigm, cfg, seed=0):
    """Members of `paradigm` in order (per prompt: its rollouts, then the label) with ragged lengths, old log-probs
    (rollouts: off by up to ±0.6 nats so that some tokens clip; labels: 3 nats below, which a ratio would clip), and
    random advantages."""
    rollouts = PARADIGMS[paradigm].rollouts_per_prompt(cfg)
    generator = torch.Generator().manual_seed(seed)
    rollout_tokens = torch.randint(VOCAB, (PROMPTS, rollouts, LENGTH + 1), generator=generator)
    label_tokens = torch.randint(VOCAB, (PROMPTS, LENGTH + 1), generator=generator)
    rollout_lengths = torch.randint(2, LENGTH + 1, (PROMPTS, rollouts), generator=generator)
    positions = torch.arange(LENGTH)
    tokens = stack_members(rollout_tokens, label_tokens)
    mask = stack_members(positions < rollout_lengths.unsqueeze(-1), positions < torch.tensor([[LENGTH], [3]]))
    is_label = PARADIGMS[paradigm].member_is_label(PROMPTS, cfg)
    with torch.no_grad():
        logp = BigramLM()(tokens)
    noise = 0.6 * (2 * torch.rand(logp.shape, generator=generator, dtype=F64) - 1)
    old_logp = torch.where(is_label.unsqueeze(1), logp - 3.0, logp + noise)
    advantages = torch.randn(len(tokens), generator=generator, dtype=F64)
    return tokens, mask, is_label, old_logp, advantages


def _member_shares(mask, agg):
    """Each member's weight in the aggregate: 1/N per sequence, or its share of the tokens under token-mean."""
    if agg == "token-mean":
        return mask.sum(dim=1).double() / mask.sum()
    return torch.full((len(mask),), 1 / len(mask), dtype=F64)


def _assert_luffy_gradient(cfg, model, label_weight):
    """∇ of LUFFY's loss = Σ_n w_n·∇L_n (w_n: the member's share under cfg.agg): rollouts' L_n the clipped surrogate,
    the label's the token-mean of −Â_y·label_weight(log π)·log π with that weight held fixed."""
    tokens, mask, is_label, old_logp, advantages = _group_batch("luffy", cfg)

    def luffy_loss():
        return get_paradigm("luffy").loss(model(tokens), old_logp, mask, advantages, is_label, cfg)[0]

    def member_loss(n):
        logp = model(tokens[n : n + 1])
        if not is_label[n]:
            return policy_loss(logp, old_logp[n : n + 1], advantages[n : n + 1], mask[n : n + 1])[0]
        return masked_mean(-advantages[n] * label_weight(logp) * logp, mask[n : n + 1])

    shares = _member_shares(mask, cfg.agg)
    expected = sum(shares[n] * _gradient(model, lambda n=n: member_loss(n)) for n in range(len(tokens)))
    torch.testing.assert_close(_gradient(model, luffy_loss), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_luffy_gradient_is_clipped_rollouts_plus_the_shaped_label(agg):
    """LUFFY: ∇L = Σ_n w_n·∇L_n, rollouts' L_n the clipped surrogate, the label's L_y the token-mean of −Â_y·π/(π+γ)
    whose gradient is −Â_y·γπ/(π+γ)²·∇ log π (written out here with the weight held fixed), unclipped although its
    old log-probs are 3 nats away."""
    cfg = ObjectiveConfig(paradigm="luffy", num_rollouts=GROUP, agg=agg)
    gamma = cfg.luffy_gamma
    tokens, mask, is_label, old_logp, advantages = _group_batch("luffy", cfg)
    model = BigramLM()
    assert len(tokens) == PROMPTS * GROUP  # G − 1 rollouts and the label per prompt

    def shaped_label_weight(logp):
        probability = logp.detach().exp()
        return gamma * probability / (probability + gamma) ** 2

    _assert_luffy_gradient(cfg, model, shaped_label_weight)
    shares = _member_shares(mask, agg)

    with torch.no_grad():
        logp = model(tokens)
        loss, metrics = get_paradigm("luffy").loss(logp, old_logp, mask, advantages, is_label, cfg)
        probability = logp.exp()
        label_values = [
            masked_mean(-advantages[n] * probability[n] / (probability[n] + gamma), mask[n])
            for n in range(len(tokens))
            if is_label[n]
        ]
        rollout_values = [
            policy_loss(logp[n : n + 1], old_logp[n : n + 1], advantages[n : n + 1], mask[n : n + 1])[0]
            for n in range(len(tokens))
            if not is_label[n]
        ]
    values = torch.zeros(len(tokens), dtype=F64)
    values[is_label], values[~is_label] = torch.stack(label_values), torch.stack(rollout_values)
    assert loss.item() == pytest.approx((shares * values).sum().item(), abs=1e-12)
    label_mask = mask & is_label.unsqueeze(1)
    assert metrics["label_shaped_ratio_mean"] == pytest.approx(
        masked_mean(policy_shaping(logp, gamma), label_mask).item(), rel=1e-12
    )
    assert 0 < metrics["label_shaping_weight_mean"] <= 0.25
    rollout_only = policy_loss(logp[~is_label], old_logp[~is_label], advantages[~is_label], mask[~is_label])[1]
    assert (
        metrics["clip_fraction"] == pytest.approx(rollout_only["clip_fraction"], rel=1e-12)
        and 0 < rollout_only["clip_fraction"]
    )


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_unshaped_luffy_label_has_visurfs_sft_like_gradient(agg):
    """objective.luffy_shaping=false: the label's term is −Â_y·π/sg(π), gradient −Â_y·∇ log π (no shaping weight,
    no clipping), the rollouts' the clipped surrogate — LUFFY's group layout with ViSurf's label term."""
    cfg = ObjectiveConfig(paradigm="luffy", num_rollouts=GROUP, agg=agg, luffy_shaping=False)
    tokens, mask, is_label, old_logp, advantages = _group_batch("luffy", cfg)
    model = BigramLM()
    _assert_luffy_gradient(cfg, model, torch.ones_like)
    with torch.no_grad():
        metrics = get_paradigm("luffy").loss(model(tokens), old_logp, mask, advantages, is_label, cfg)[1]
    assert metrics["label_shaped_ratio_mean"] == metrics["label_shaping_weight_mean"] == 1.0
    with pytest.raises(ValueError, match="luffy_shaping must be a bool"):
        ObjectiveConfig(paradigm="luffy", luffy_shaping="no")


def test_luffy_advantages_put_the_label_in_a_group_of_g():
    cfg = ObjectiveConfig(paradigm="luffy", num_rollouts=3)
    rollout_rewards = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, 0.5]], dtype=F64)
    label_rewards = torch.tensor([1.0, 1.0, 0.5], dtype=F64)
    group = get_paradigm("luffy").advantages(rollout_rewards, label_rewards, cfg)
    expected = group_advantages(torch.cat([rollout_rewards, label_rewards.unsqueeze(1)], dim=1))
    assert torch.equal(group.rollout, expected[:, :2]) and torch.equal(group.label, expected[:, 2])
    assert group.label[1].item() > 0  # a rollout reaches the label's reward: no smoothing in LUFFY
    assert group.metrics["zero_std_fraction"] == pytest.approx(1 / 3)  # row 2: all three rewards 0.5
    assert group.metrics["label_advantage_mean"] == pytest.approx(expected[:, 2].mean().item(), rel=1e-12)
    advantages, is_label = group.per_member()
    assert is_label.tolist() == get_paradigm("luffy").member_is_label(3, cfg).tolist()


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("token_weight", ["none", "p_one_minus_p"])
def test_chord_gradient_is_the_mu_weighted_sum_of_grpo_and_sft(agg, token_weight):
    """CHORD: ∇L = (1 − μ_t)·∇L_GRPO(rollouts) + μ_t·∇L_SFT(labels); for CHORD-φ, ∇L_SFT = ∇ −agg(p − p²/2) over the
    labels, whose derivative in log p is −p(1 − p) = −φ: the detached φ written as an independent autograd identity."""
    cfg = ObjectiveConfig(paradigm="chord", num_rollouts=GROUP, agg=agg, chord_token_weight=token_weight)
    chord = get_paradigm("chord").for_step(3, 10, cfg)
    assert cfg.chord_mu_end < chord.mu < cfg.chord_mu_start
    tokens, mask, is_label, old_logp, advantages = _group_batch("chord", cfg, seed=1)
    model = BigramLM()
    aggregate = AGGREGATIONS[agg]

    def chord_loss():
        return chord.loss(model(tokens), old_logp, mask, advantages, is_label, cfg)[0]

    def grpo():
        rollouts = ~is_label
        logp = model(tokens[rollouts])
        return policy_loss(logp, old_logp[rollouts], advantages[rollouts], mask[rollouts], agg=agg)[0]

    def sft():
        logp = model(tokens[is_label])
        if token_weight == "none":
            return sft_loss(logp, mask[is_label], agg=agg)
        probability = logp.exp()
        return -aggregate(probability - probability**2 / 2, mask[is_label])

    expected = (1 - chord.mu) * _gradient(model, grpo) + chord.mu * _gradient(model, sft)
    torch.testing.assert_close(_gradient(model, chord_loss), expected, rtol=0, atol=1e-10)
    _, metrics = chord.loss(model(tokens), old_logp, mask, advantages, is_label, cfg)
    assert metrics["chord_mu"] == chord.mu and ("label_phi_mean" in metrics) == (token_weight == "p_one_minus_p")


def test_chord_advantages_leave_the_label_out_of_the_group():
    cfg = ObjectiveConfig(paradigm="chord", num_rollouts=3)
    rollout_rewards = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 1.0]], dtype=F64)
    label_rewards = torch.tensor([1.0, 1.0], dtype=F64)
    group = get_paradigm("chord").advantages(rollout_rewards, label_rewards, cfg)
    assert torch.equal(group.rollout, group_advantages(rollout_rewards))
    assert torch.equal(group.label, torch.ones(2, dtype=F64))
    assert group.metrics["zero_std_fraction"] == 0.5 and "label_advantage_mean" not in group.metrics


def test_chord_mu_decays_by_a_cosine_over_the_run():
    cfg = ObjectiveConfig(paradigm="chord")
    mus = [get_paradigm("chord").for_step(step, 5, cfg).mu for step in range(5)]
    assert mus == pytest.approx([0.05 + 0.85 * (1 + math.cos(math.pi * step / 4)) / 2 for step in range(5)], abs=1e-15)
    assert mus[0] == pytest.approx(0.9, abs=1e-15) and mus[2] == pytest.approx(0.475, abs=1e-15) and mus[4] == 0.05
    assert get_paradigm("chord").for_step(0, 1, cfg).mu == pytest.approx(0.9, abs=1e-15)
    chord_phi = dataclasses.replace(cfg, chord_mu_start=0.1, chord_mu_end=0.1, chord_token_weight="p_one_minus_p")
    assert {get_paradigm("chord").for_step(step, 7, chord_phi).mu for step in range(7)} == {0.1}
    assert get_paradigm("chord").for_step(2, 5, cfg).name == "chord"
    logp, old_logp, mask, advantages, is_label = _loss_inputs("chord", cfg)
    with pytest.raises(ValueError, match="for_step"):
        get_paradigm("chord").loss(logp, old_logp, mask, advantages, is_label, cfg)
    with pytest.raises(ValueError, match="step must be"):
        get_paradigm("chord").for_step(5, 5, cfg)
