"""The gradient derivation checks (analysis.gradient_identities, analysis.gradients, experiments/gradients.py): the
ViSurf gradient identities in float64 (residuals below 1e-8) on random small autoregressive models and on a small random
tiny VLM (constructed and sampled groups), the outcome split, checkpoints of a LocalSession run (plain torch and
DeepSpeed engine files), bad input, and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis.gradient_identities import (
    CHECKS,
    TOLERANCE,
    all_fail_label_advantage,
    group_outcome,
    identity_residuals,
    paradigm_gradients,
    residual_summary,
)
from analysis.gradients import (
    GradientCheckConfig,
    analyse_checkpoints,
    checkpoint_policies,
    constructed_groups,
    gradient_table,
    load_float64_policy,
    sample_groups,
)
from visurf_ray.data.benchmark import make_split
from visurf_ray.models.inputs import completion_logprobs, encode_prompts, encode_sequences
from visurf_ray.models.policy import load_policy
from visurf_ray.objectives.paradigms import ObjectiveConfig
from visurf_ray.train.engine import load_saved_weights

ROOT = Path(__file__).resolve().parents[1]

# Which checks apply (a finite residual) for each reward pattern, with smoothing on; with it off the smoothing checks
# never apply.
APPLIES = {
    "tied_fail": {"decomposition", "label_part", "all_fail_closed_form", "rlvr_no_signal"},
    "mixed": {"decomposition", "label_part"},
    "matched": {"decomposition", "label_part", "smoothing_label_zero", "smoothing_rescale"},
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' float64 ops are too small to gain from threads, and threads contend on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RandomTokenModel(torch.nn.Module):
    """A small random autoregressive model in float64: token t's logits from token t−1's embedding and position t."""

    def __init__(self, vocab: int, hidden: int, length: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(vocab, hidden, generator=generator, dtype=torch.float64))
        self.position = torch.nn.Parameter(torch.randn(length, hidden, generator=generator, dtype=torch.float64))
        self.out = torch.nn.Parameter(torch.randn(hidden, vocab, generator=generator, dtype=torch.float64) / 4)

    def logp(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [N, T] → log π(token) [N, T] in nats."""
        previous = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1]], dim=1)
        hidden = torch.tanh(self.embed[previous] + self.position[: tokens.shape[1]])
        return torch.log_softmax(hidden @ self.out, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def pattern_rewards(pattern: str, group_size: int, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """Rollout rewards [G] and the label's reward for a reward pattern."""
    spread = torch.rand(group_size, generator=generator, dtype=torch.float64)
    if pattern == "tied_fail":
        return torch.full((group_size,), 1.5, dtype=torch.float64), 4.0
    if pattern == "mixed":
        return 3.0 * spread, 3.5
    matched = 3.0 * spread
    matched[0] = 4.0 + spread[0]  # the best rollout reaches the label's reward
    return matched, 4.0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pattern", sorted(APPLIES))
@pytest.mark.parametrize("unbiased_std", [True, False])
@pytest.mark.parametrize("smoothing", [True, False])
def test_identities_on_random_small_models(seed, pattern, unbiased_std, smoothing):
    generator = torch.Generator().manual_seed(seed)
    group_size, length, vocab = 3 + seed, 7, 11
    model = RandomTokenModel(vocab, hidden=5, length=length, seed=seed)
    tokens = torch.randint(vocab, (group_size + 1, length), generator=generator)
    lengths = torch.randint(1, length + 1, (group_size + 1,), generator=generator)
    mask = torch.arange(length) < lengths.unsqueeze(1)
    logp = model.logp(tokens) * mask
    rollout_rewards, label_reward = pattern_rewards(pattern, group_size, generator)
    objective = ObjectiveConfig(
        num_rollouts=group_size, unbiased_std=unbiased_std, smoothing=smoothing, eps=0.0, agg="seq-mean-token-mean"
    )

    grads = paradigm_gradients(logp, mask, list(model.parameters()), rollout_rewards, label_reward, objective)
    residuals = identity_residuals(grads, objective)

    applies = APPLIES[pattern] if smoothing else APPLIES[pattern] - {"smoothing_label_zero", "smoothing_rescale"}
    assert {name for name, value in residuals.items() if not math.isnan(value)} == applies
    assert all(residuals[name] < TOLERANCE for name in applies), residuals
    assert grads.sft.norm() > 0 and grads.visurf.norm() > 0
    if pattern == "tied_fail":
        assert grads.label_advantage == pytest.approx(all_fail_label_advantage(group_size, unbiased_std=unbiased_std))
        assert grads.rlvr.norm() == 0 and grads.label_part.norm() > 0
    if pattern == "matched":
        assert (grads.label_part.norm() == 0) == smoothing
        assert grads.smoothing_fired == smoothing


def test_closed_form_residual_measures_the_eps_deviation():
    """With eps > 0, Â_y = G(R−c)/(G+1) / (σ + eps) instead of √G: the check reports eps / (σ + eps)."""
    group_size, eps = 4, 1e-3
    model = RandomTokenModel(vocab=9, hidden=4, length=5, seed=3)
    tokens = torch.randint(9, (group_size + 1, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(tokens, dtype=torch.bool)
    objective = ObjectiveConfig(num_rollouts=group_size, unbiased_std=False, eps=eps, agg="seq-mean-token-mean")
    grads = paradigm_gradients(
        model.logp(tokens), mask, list(model.parameters()), torch.zeros(group_size, dtype=torch.float64), 1.0, objective
    )
    sigma = math.sqrt(group_size) / (group_size + 1)  # population std of {0 × G, 1}
    assert identity_residuals(grads, objective)["all_fail_closed_form"] == pytest.approx(eps / (sigma + eps), rel=1e-9)


def test_group_outcome_split():
    assert group_outcome([3.0, 3.0, 3.0], 5.0, [False, False, False]) == "all_fail"
    assert group_outcome([4.5, 3.0, 3.0], 5.0, [True, False, False]) == "mixed"
    assert group_outcome([6.0, 3.0, 3.0], 5.0, [True, False, False]) == "label_matched"
    assert group_outcome([5.0, 1.0], 5.0, [True, False]) == "label_matched"  # a tie fires smoothing
    # A failing rollout that ties the label (e.g. count: 3 format points vs the label's 3 without thinking) smooths
    # the label away: the group counts as label_matched, not all_fail.
    assert group_outcome([3.0, 2.0], 3.0, [False, False]) == "label_matched"
    with pytest.raises(ValueError, match="rollout_success"):
        group_outcome([1.0, 2.0], 3.0, [False])


def grounding_texts(samples, group_size):
    """Per outcome, a grounding sample and G rollout texts producing it (with the label's reward 5 = 1 + 1 + 3 once its
    thinking reward is eliminated): all `[]` (reward 3 each, all tied); one of two objects found (accuracy 1.5 =
    success, reward 4.5 < 5); the exact answer with a think block (reward 6 >= 5)."""
    single = next(s for s in samples if len(json.loads(s.solution)) == 1)
    multi = next(s for s in samples if len(json.loads(s.solution)) == 2)
    wrong = [f"<think>guess {i}</think><answer>[]</answer>" for i in range(group_size)]
    first = json.dumps(json.loads(multi.solution)[:1])
    return {
        "all_fail": (single, wrong),
        "mixed": (multi, [f"<think>one</think><answer>{first}</answer>", *wrong[1:]]),
        "label_matched": (single, [f"<think>it</think><answer>{single.solution}</answer>", *wrong[1:]]),
    }


@pytest.fixture(scope="module")
def small_policy(small_policy_dir):
    return load_float64_policy(small_policy_dir)


@pytest.mark.parametrize("unbiased_std", [True, False])
def test_identities_on_tiny_vlm_constructed_groups(small_policy, unbiased_std):
    cfg = GradientCheckConfig(num_rollouts=2, unbiased_std=unbiased_std)
    cases = grounding_texts(make_split("eval/grounding", 40, 0), cfg.num_rollouts)
    groups = constructed_groups(small_policy, [s for s, _ in cases.values()], [t for _, t in cases.values()], cfg)
    assert [g.outcome for g in groups] == list(cases)
    assert [g.rollout_rewards for g in groups] == [[3.0, 3.0], [4.5, 3.0], [6.0, 3.0]]
    assert [g.label_reward for g in groups] == [5.0] * 3
    assert [g.rollout_success for g in groups] == [[False, False], [True, False], [True, False]]

    table = gradient_table(small_policy, groups, cfg).set_index("outcome")
    for outcome, pattern in (("all_fail", "tied_fail"), ("mixed", "mixed"), ("label_matched", "matched")):
        residuals = {name: table.loc[outcome, f"residual_{name}"] for name in CHECKS}
        assert {name for name, value in residuals.items() if not math.isnan(value)} == APPLIES[pattern]
        assert all(residuals[name] < TOLERANCE for name in APPLIES[pattern]), (outcome, residuals)
    expected = all_fail_label_advantage(cfg.num_rollouts, unbiased_std=unbiased_std)
    assert table.loc["all_fail", "label_advantage"] == pytest.approx(expected)
    assert table.loc["all_fail", "norm_rlvr"] == 0 and table.loc["all_fail", "label_share"] > 0
    assert table.loc["label_matched", "norm_label_part"] == 0 and table.loc["label_matched", "label_share"] == 0
    assert 0 < table.loc["mixed", "label_share"] < 1
    assert table.loc["label_matched", "cos_rlvr_visurf"] == pytest.approx(1.0)


def test_identities_on_sampled_rollouts_are_deterministic(small_policy):
    cfg = GradientCheckConfig(num_rollouts=3, max_new_tokens=8, seed=5)
    samples = make_split("eval/grounding", 2, 0)
    groups = sample_groups(small_policy, samples, cfg)
    assert [g.rollout_ids for g in groups] == [g.rollout_ids for g in sample_groups(small_policy, samples, cfg)]
    assert all(len(g.rollout_ids) == 3 and len(g.rollout_ids[0]) <= 8 for g in groups)
    summary = residual_summary(gradient_table(small_policy, groups, cfg))
    assert summary.loc["decomposition", "groups"] == 2 and summary["passed"].all(), summary


def test_float64_policy_computes_the_same_function_in_float64(small_policy_dir, small_policy):
    """The RMSNorm swap shares the weights and changes only the rounding (the stock one computes in float32)."""
    stock = load_policy(small_policy_dir, dtype=torch.float64, device="cpu").model.eval()
    assert {n for n, _ in stock.named_parameters()} == {n for n, _ in small_policy.model.named_parameters()}
    assert all(p.dtype == torch.float64 for p in small_policy.model.parameters())
    assert not any(type(m).__name__ == "Qwen2_5_VLRMSNorm" for m in small_policy.model.modules())
    sample = make_split("eval/grounding", 1, 0)[0]
    prompts = encode_prompts(small_policy, [sample.image], [sample.problem])
    sequences = encode_sequences(small_policy, prompts, [[5, 6, 7, 8]], [0])
    with torch.no_grad():
        ours, _ = completion_logprobs(small_policy.model, sequences)
        theirs, _ = completion_logprobs(stock, sequences)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("deepspeed", [False, True])
def test_checkpoints_of_a_run_folder(small_policy_dir, small_run, deepspeed):
    run = small_run("optim.lr=1e-2", f"deepspeed.enabled={str(deepspeed).lower()}")
    weights = "engine/mp_rank_00_model_states.pt" if deepspeed else "engine.pt"
    assert (run / "checkpoints" / "step_000002" / weights).is_file()
    base = load_float64_policy(small_policy_dir)
    saved = torch.load(run / "checkpoints" / "step_000002" / weights, map_location="cpu", weights_only=False)["module"]

    policies = list(checkpoint_policies(run))
    assert [step for step, _ in policies] == [0, 1, 2]
    for name, value in policies[0][1].model.state_dict().items():
        assert torch.equal(value, base.model.state_dict()[name]), name
    final = policies[2][1].model.state_dict()
    assert all(torch.equal(final[name], value.to(final[name].dtype)) for name, value in saved.items())
    assert any(not torch.equal(final[name], base.model.state_dict()[name]) for name in saved)

    table = analyse_checkpoints(
        run, make_split("eval/grounding", 1, 0), GradientCheckConfig(num_rollouts=2, max_new_tokens=8)
    )
    assert table.groupby("step").size().to_dict() == {0: 1, 1: 1, 2: 1}
    assert residual_summary(table)["passed"].all()


def test_bad_input_is_refused(small_policy, tmp_path):
    with pytest.raises(ValueError, match="num_rollouts"):
        GradientCheckConfig(num_rollouts=1)
    with pytest.raises(ValueError, match="temperature"):
        GradientCheckConfig(temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        GradientCheckConfig(max_new_tokens=0)
    cfg = GradientCheckConfig(num_rollouts=2)
    sample = make_split("eval/grounding", 1, 0)[0]
    with pytest.raises(ValueError, match=r"rollout_texts\[0\] must hold 2 strings"):
        constructed_groups(small_policy, [sample], [["only one"]], cfg)
    with pytest.raises(ValueError, match="one list per sample"):
        constructed_groups(small_policy, [sample], [], cfg)
    with pytest.raises(ValueError, match="neither a policy folder"):
        list(checkpoint_policies(tmp_path))
    (tmp_path / "checkpoints" / "step_000001").mkdir(parents=True)
    with pytest.raises(ValueError, match="incomplete checkpoint"):
        list(checkpoint_policies(tmp_path))
    with pytest.raises(ValueError, match="holds neither"):
        load_saved_weights(small_policy.model, tmp_path / "checkpoints" / "step_000001")
    logp = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
    objective = ObjectiveConfig(num_rollouts=2, agg="token-mean")
    with pytest.raises(ValueError, match="seq-mean-token-mean"):
        paradigm_gradients(logp, torch.ones(3, 2, dtype=torch.bool), [logp], torch.zeros(2), 1.0, objective)


def test_cli_prints_the_summary_and_writes_table_and_plots(small_policy_dir, tmp_path):
    out = tmp_path / "out"
    command = [
        sys.executable,
        "experiments/gradients.py",
        "--checkpoint",
        str(small_policy_dir),
        "--prompts",
        "2",
        "--num-rollouts",
        "2",
        "--max-new-tokens",
        "8",
        "--population-std",
        "--out",
        str(out),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Identity residuals" in result.stdout and "all_fail_closed_form" in result.stdout
    assert "By checkpoint step and group outcome" in result.stdout
    assert {p.name for p in out.iterdir()} == {"gradients.csv", "label_share.png", "cosines.png", "residuals.png"}
