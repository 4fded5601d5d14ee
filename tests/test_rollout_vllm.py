"""The vLLM rollout backend. Anywhere: its token guard, the missing-vLLM error and the saved folder's video processor
config. Marked `vllm` (vLLM run for real; `bash scripts/test.sh vllm` runs them on the CPU in .venv-vllm): HF/vLLM
greedy parity, sampling n = G, weight sync of every parameter group (the tied head included), old log-probs from the
trainer (ratio 1) or from vLLM, the trainer's RNG left alone, and `experiments/train.py` / a two-trial sweep with
`rollout.backend=vllm`. Each of those runs once per device: `cpu` where vLLM is the CPU build, `cuda` (also marked
`gpu`) where CUDA and the `gpu` extra are installed (`python -m pytest tests/test_rollout_vllm.py -m gpu`); a case
whose device vLLM was not built for is skipped."""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from visurf_ray.models.generation import suppressed_token_ids
from visurf_ray.models.policy import VIDEO_PROCESSOR_CONFIG, VIDEO_PROCESSOR_TYPE, Policy, load_policy
from visurf_ray.rollout.vllm import VLLM_MISSING, VLLMRolloutBackend, allowed_token_ids

ROOT = Path(__file__).resolve().parents[1]
HAS_VLLM = importlib.util.find_spec("vllm") is not None
PROMPTS, ROLLOUTS, NEW_TOKENS = 4, 4, 24
KV_CACHE_BYTES = 1 << 28
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.gpu)]
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}
# |log π_vLLM − log π_HF| in nats over the sampled tokens (mean, max): float32 on CPU agrees to ~1e-5, bfloat16 on a
# GPU runs other kernels in each engine.
LOGP_TOLERANCE = {"cpu": (1e-5, 1e-4), "cuda": (0.05, 0.3)}


def vllm_device_type() -> str | None:
    """The device vLLM's installed build runs on ("cpu", "cuda", ...), or None without vLLM."""
    if not HAS_VLLM:
        return None
    from vllm.platforms import current_platform

    return current_platform.device_type


def skip_unless_vllm_runs_on(device: str) -> None:
    built_for = vllm_device_type()
    if built_for != device:
        pytest.skip(
            f"needs vLLM built for {device} (here: {built_for or 'no vLLM'}); CPU: bash scripts/test.sh vllm, "
            "CUDA: the `gpu` extra"
        )


def test_token_guard_bans_vision_and_control_tokens_but_keeps_eos_and_answer_tokens(small_policy_dir):
    tokenizer = load_policy(small_policy_dir, device="cpu").tokenizer
    allowed = allowed_token_ids(tokenizer)
    banned = suppressed_token_ids(tokenizer)
    assert sorted(set(allowed) | set(banned)) == list(range(len(tokenizer)))
    assert not set(allowed) & set(banned)
    ids = tokenizer.convert_tokens_to_ids
    assert ids("<|image_pad|>") not in allowed and ids("<|im_start|>") not in allowed
    assert tokenizer.eos_token_id in allowed and ids("<answer>") in allowed


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_missing_vllm_names_where_to_get_it(small_policy_dir):
    policy = load_policy(small_policy_dir, device="cpu")
    with pytest.raises(ImportError, match="`gpu` extra") as error:
        VLLMRolloutBackend(policy, model_path=small_policy_dir, kv_cache_bytes=KV_CACHE_BYTES)
    assert str(error.value) == VLLM_MISSING
    assert "scripts/venv-vllm.sh" in str(error.value)


def test_saved_policy_folder_has_the_video_processor_config_vllm_loads(small_policy_dir):
    """vLLM builds the stock Qwen2.5-VL processor, whose video processor needs this file; it mirrors the image
    processor's patching, so that the folder loads in vLLM as it is."""
    video = json.loads((small_policy_dir / VIDEO_PROCESSOR_CONFIG).read_text())
    image = json.loads(load_policy(small_policy_dir, device="cpu").processor.image_processor.to_json_string())
    assert video["video_processor_type"] == VIDEO_PROCESSOR_TYPE
    for key in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std", "size"):
        assert video[key] == image[key], key


@pytest.fixture(scope="module")
def vllm_policy_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL of the default spec (head_dim 64, which vLLM's GPU attention kernels need), random init."""
    from visurf_ray.data.benchmark import text_corpus
    from visurf_ray.models.tiny import TinyVLMSpec, build_tiny_vlm

    folder = tmp_path_factory.mktemp("vllm_policy")
    build_tiny_vlm(text_corpus(seed=0, n=200), TinyVLMSpec(), seed=0, out_dir=folder)
    return folder


@dataclass
class EngineSetup:
    device: str
    policy: Policy
    backend: VLLMRolloutBackend
    samples: list
    rng_kept: bool  # the trainer's global RNG states were the same after building the engine


@pytest.fixture(scope="module", params=DEVICES)
def engine_setup(request, vllm_policy_dir) -> EngineSetup:
    """One engine per device for the module (a process holds one colocated engine) on the policy's folder."""
    device = request.param
    skip_unless_vllm_runs_on(device)
    from visurf_ray.data.benchmark import make_split
    from visurf_ray.train.engine import ensure_process_group

    ensure_process_group()  # the trainer's single-rank group, which vLLM's external launcher joins
    policy = load_policy(vllm_policy_dir, dtype=DTYPES[device], device=device)
    random.seed(11)
    torch.manual_seed(11)
    before = (random.getstate(), torch.get_rng_state())
    backend = VLLMRolloutBackend(policy, model_path=vllm_policy_dir, kv_cache_bytes=KV_CACHE_BYTES, max_model_len=512)
    rng_kept = random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[1])
    return EngineSetup(device, policy, backend, make_split("posttrain", PROMPTS, seed=0), rng_kept)


def sample(setup: EngineSetup, n: int, seed: int, *, do_sample: bool = True, policy: Policy | None = None):
    """(encoded prompts, vLLM's rollouts) of the setup's samples."""
    from visurf_ray.models.inputs import encode_prompts
    from visurf_ray.rollout.base import SamplingConfig

    images, questions = [s.image for s in setup.samples], [s.problem for s in setup.samples]
    prompts = encode_prompts(policy or setup.policy, images, questions)
    sampling = SamplingConfig(max_new_tokens=NEW_TOKENS, do_sample=do_sample)
    return prompts, setup.backend.generate(prompts, n, sampling, seed, images=images, questions=questions)


def hf_greedy(policy: Policy, prompts) -> list[list[int]]:
    from visurf_ray.models.generation import generate

    policy.model.eval()
    return generate(policy, prompts, num_return_sequences=1, max_new_tokens=NEW_TOKENS, do_sample=False).completion_ids


def trainer_logprobs(policy: Policy, prompts, rollouts) -> list[torch.Tensor]:
    """log π of each sampled token under the trainer's own forward pass (float32, CPU)."""
    from visurf_ray.models.inputs import completion_logprobs, encode_sequences

    with torch.no_grad():
        batch = encode_sequences(policy, prompts, rollouts.completion_ids, rollouts.prompt_index).to(policy.device)
        logp, _ = completion_logprobs(policy.model.eval(), batch)
    return [logp[i, : len(ids)].float().cpu() for i, ids in enumerate(rollouts.completion_ids)]


def assert_logprobs_match_trainer(device: str, policy: Policy, prompts, rollouts) -> None:
    expected = torch.cat(trainer_logprobs(policy, prompts, rollouts))
    difference = (torch.cat(rollouts.engine_logp) - expected).abs()
    mean_tolerance, max_tolerance = LOGP_TOLERANCE[device]
    assert difference.mean() <= mean_tolerance and difference.max() <= max_tolerance, difference


@pytest.mark.vllm
def test_building_the_engine_leaves_the_trainers_rng_alone(engine_setup):
    assert engine_setup.rng_kept


@pytest.mark.vllm
def test_greedy_matches_hf_generate(engine_setup):
    prompts, rollouts = sample(engine_setup, 1, seed=0, do_sample=False)
    if engine_setup.device == "cpu":  # float32: the same tokens; bfloat16 on a GPU may part at a near-tie
        assert rollouts.completion_ids == hf_greedy(engine_setup.policy, prompts)
    assert rollouts.old_logp is None  # π_old is the trainer's by default
    assert_logprobs_match_trainer(engine_setup.device, engine_setup.policy, prompts, rollouts)


@pytest.mark.vllm
def test_sampling_g_completions_per_prompt(engine_setup):
    prompts, rollouts = sample(engine_setup, ROLLOUTS, seed=0)
    assert rollouts.prompt_index == [p for p in range(PROMPTS) for _ in range(ROLLOUTS)]
    banned = set(suppressed_token_ids(engine_setup.policy.tokenizer))
    eos = engine_setup.policy.tokenizer.eos_token_id
    for ids, logp in zip(rollouts.completion_ids, rollouts.engine_logp):
        assert 1 <= len(ids) <= NEW_TOKENS and not banned & set(ids)
        assert len(ids) == NEW_TOKENS or ids[-1] == eos  # stopped early only at eos, which is kept
        assert logp.shape == (len(ids),) and logp.dtype == torch.float32
        assert torch.isfinite(logp).all() and (logp <= 0).all()
    for prompt in range(PROMPTS):  # the G completions of a prompt are G samples, not one repeated
        group = rollouts.completion_ids[prompt * ROLLOUTS : (prompt + 1) * ROLLOUTS]
        assert len({tuple(ids) for ids in group}) > 1
    assert_logprobs_match_trainer(engine_setup.device, engine_setup.policy, prompts, rollouts)
    assert sample(engine_setup, ROLLOUTS, seed=0)[1].completion_ids == rollouts.completion_ids
    assert sample(engine_setup, ROLLOUTS, seed=1)[1].completion_ids != rollouts.completion_ids


PARAMETER_GROUPS = {
    "vision": "model.visual.",
    "language_layers": "model.language_model.layers.",
    "tied_embedding_and_head": "model.language_model.embed_tokens.",  # lm_head.weight is the same tensor
}


@pytest.mark.vllm
@pytest.mark.parametrize("group", PARAMETER_GROUPS)
def test_weight_sync_loads_each_parameter_group(engine_setup, group):
    """After an update of one parameter group the engine samples from the updated module: greedy equals the updated
    HF model (float32), and vLLM's log-probs are the updated model's."""
    prompts, unchanged = sample(engine_setup, 1, seed=0, do_sample=False)
    updated = copy.deepcopy(engine_setup.policy.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in updated.named_parameters():
            if name.startswith(PARAMETER_GROUPS[group]):
                param.add_(0.2 * param.std() * torch.randn(param.shape, generator=generator).to(param))
    updated_policy = Policy(model=updated, processor=engine_setup.policy.processor)
    try:
        engine_setup.backend.sync_weights(updated)
        _, synced = sample(engine_setup, 1, seed=0, do_sample=False)
    finally:
        engine_setup.backend.sync_weights(engine_setup.policy.model)
    assert not torch.allclose(torch.cat(synced.engine_logp[:1]), torch.cat(unchanged.engine_logp[:1]))
    if engine_setup.device == "cpu":
        assert synced.completion_ids == hf_greedy(updated_policy, prompts)
    assert_logprobs_match_trainer(engine_setup.device, updated_policy, prompts, synced)


def visurf_step(engine_setup, *, engine_old_logp: bool) -> dict[str, float]:
    """One ViSurf step of the setup's policy sampling with its engine; the policy's weights are restored after."""
    from visurf_ray.config import DeepSpeedConfig, OptimConfig
    from visurf_ray.objectives.paradigms import ObjectiveConfig, get_paradigm
    from visurf_ray.rollout.base import SamplingConfig
    from visurf_ray.train.engine import build_engine
    from visurf_ray.train.trainer import Trainer

    policy = engine_setup.policy
    weights = {name: value.clone() for name, value in policy.model.state_dict().items()}
    objective = ObjectiveConfig(paradigm="visurf", num_rollouts=ROLLOUTS)
    engine = build_engine(
        policy.model, OptimConfig(lr=1e-3), DeepSpeedConfig(enabled=False), total_steps=1, micro_batch=4
    )
    trainer = Trainer(
        policy=policy,
        engine=engine,
        backend=engine_setup.backend,
        paradigm=get_paradigm("visurf"),
        objective=objective,
        sampling=SamplingConfig(max_new_tokens=NEW_TOKENS),
        total_steps=1,
    )
    engine_setup.backend.engine_old_logp = engine_old_logp
    try:
        return trainer.step(0, engine_setup.samples, seed=0)
    finally:
        engine_setup.backend.engine_old_logp = False
        policy.model.load_state_dict(weights)
        engine_setup.backend.sync_weights(policy.model)


@pytest.mark.vllm
def test_old_logprobs_come_from_the_trainer_and_vllms_are_reported(engine_setup):
    metrics = visurf_step(engine_setup, engine_old_logp=False)
    assert metrics["approx_kl"] == 0.0 and metrics["clip_fraction"] == 0.0  # ratio exactly 1 at the one update
    mean_tolerance, max_tolerance = LOGP_TOLERANCE[engine_setup.device]
    assert 0 < metrics["engine_logp_diff_mean"] <= mean_tolerance
    assert metrics["engine_logp_diff_mean"] <= metrics["engine_logp_diff_max"] <= max_tolerance


@pytest.mark.vllm
def test_vllms_logprobs_as_old_logprobs_on_request(engine_setup):
    _, rollouts = sample(engine_setup, ROLLOUTS, seed=0)
    assert rollouts.old_logp is None
    engine_setup.backend.engine_old_logp = True
    try:
        _, rollouts = sample(engine_setup, ROLLOUTS, seed=0)
    finally:
        engine_setup.backend.engine_old_logp = False
    assert rollouts.old_logp is rollouts.engine_logp
    metrics = visurf_step(engine_setup, engine_old_logp=True)
    assert metrics["engine_logp_diff_max"] > 0  # vLLM's π_old differs from the trainer's: the ratio is not 1


def run_command(args: list[str], timeout: int) -> None:
    """Run `python args...` in the repository root; fail with the end of its stderr."""
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]


def assert_steps_report_ratio_one_and_the_engine_gap(rows: list[dict], device: str) -> None:
    """Every training report of a run: π_old from the trainer (approx. KL exactly 0), vLLM's gap reported."""
    steps = [row for row in rows if "engine_logp_diff_mean" in row]
    assert [row["step"] for row in steps] == [1.0, 2.0]
    for row in steps:
        assert row["approx_kl"] == 0.0
        assert 0 < row["engine_logp_diff_mean"] <= row["engine_logp_diff_max"] <= LOGP_TOLERANCE[device][1]


def vllm_run_overrides(policy_dir: Path) -> list[str]:
    return [
        f"model.path={policy_dir}",
        "rollout.backend=vllm",
        f"rollout.vllm_kv_cache_bytes={KV_CACHE_BYTES}",
        "rollout.vllm_max_model_len=512",
    ]


@pytest.mark.vllm
@pytest.mark.parametrize("device", DEVICES)
def test_train_py_runs_with_the_vllm_backend(device, small_run_overrides, vllm_policy_dir, tmp_path):
    skip_unless_vllm_runs_on(device)
    settings = ["name=vllm-run", f"output_dir={tmp_path}", "log_to=[]", "data.eval_size=2", "eval_every=2"]
    run_command(["experiments/train.py", *small_run_overrides, *vllm_run_overrides(vllm_policy_dir), *settings], 900)
    rows = [json.loads(line) for line in (tmp_path / "vllm-run" / "metrics.jsonl").read_text().splitlines()]
    assert_steps_report_ratio_one_and_the_engine_gap(rows, device)


@pytest.mark.vllm
@pytest.mark.parametrize("device", DEVICES)
def test_two_trial_sweep_with_the_vllm_backend(device, small_sweep_args, vllm_policy_dir, tmp_path):
    skip_unless_vllm_runs_on(device)
    trial = [f"experiment.{override}" for override in vllm_run_overrides(vllm_policy_dir)]
    run_command(["experiments/sweep.py", "--fresh", *small_sweep_args("vllm-sweep"), *trial], 1500)
    import pandas as pd

    results = pd.read_parquet(tmp_path / "results" / "vllm-sweep" / "results.parquet")
    assert set(results["variant"]) == {"RLVR", "ViSurf"}
    reports = sorted((tmp_path / "runs" / "vllm-sweep").glob("*/result.json"))
    assert len(reports) == 2
    for report in reports:
        rows = [json.loads(line) for line in report.read_text().splitlines() if line.strip()]
        assert_steps_report_ratio_one_and_the_engine_gap(rows, device)
