"""The vLLM rollout backend: its token guard and missing-vLLM error (anywhere), and on a CUDA machine with vLLM (the
`gpu` extra) sampling, old log-probs against the trainer's own forward, determinism and weight sync.

Run the GPU part with `python -m pytest tests/test_rollout_vllm.py -m gpu`; it is skipped without CUDA or vLLM."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from visurf_ray.models.generation import suppressed_token_ids
from visurf_ray.models.policy import load_policy
from visurf_ray.rollout.vllm import VLLM_MISSING, VLLMRolloutBackend, allowed_token_ids

HAS_VLLM = importlib.util.find_spec("vllm") is not None
GPU_SKIP = pytest.mark.skipif(
    not (HAS_VLLM and torch.cuda.is_available()),
    reason="needs a CUDA GPU and vLLM (pip install -e '.[gpu]'); CPU machines sample with the HF backend",
)
PROMPTS, ROLLOUTS, NEW_TOKENS = 4, 4, 16
LOGP_MEAN_TOL, LOGP_MAX_TOL = 0.05, 0.3  # nats; both engines compute in bfloat16


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
def test_missing_vllm_names_the_gpu_extra(small_policy_dir):
    policy = load_policy(small_policy_dir, device="cpu")
    with pytest.raises(ImportError, match="`gpu` extra") as error:
        VLLMRolloutBackend(policy, model_path=small_policy_dir, gpu_memory_utilization=0.3)
    assert str(error.value) == VLLM_MISSING


@pytest.fixture(scope="module")
def vllm_setup(tmp_path_factory):
    """A tiny Qwen2.5-VL with head_dim 64 (vLLM's attention kernels need >= 64) in bfloat16 on the GPU, and one
    engine for the module's tests (a process holds one colocated engine)."""
    from visurf_ray.data.benchmark import make_split, text_corpus
    from visurf_ray.models.tiny import TinyVLMSpec, build_tiny_vlm

    folder = tmp_path_factory.mktemp("vllm_policy")
    build_tiny_vlm(text_corpus(seed=0, n=200), TinyVLMSpec(), seed=0, out_dir=folder)  # head_dim 64, as vLLM needs
    policy = load_policy(folder, dtype=torch.bfloat16, device="cuda")
    backend = VLLMRolloutBackend(policy, model_path=folder, gpu_memory_utilization=0.3, max_model_len=512)
    samples = make_split("posttrain", PROMPTS, seed=0)
    return policy, backend, samples


def sample_with(backend, policy, samples, seed):
    from visurf_ray.models.inputs import encode_prompts
    from visurf_ray.rollout.base import SamplingConfig

    images, questions = [s.image for s in samples], [s.problem for s in samples]
    prompts = encode_prompts(policy, images, questions)
    rollouts = backend.generate(
        prompts, ROLLOUTS, SamplingConfig(max_new_tokens=NEW_TOKENS), seed, images=images, questions=questions
    )
    return prompts, rollouts


def trainer_logprobs(policy, prompts, rollouts) -> list[torch.Tensor]:
    """log π of each sampled token under the trainer's own forward pass (float32, CPU)."""
    from visurf_ray.models.inputs import completion_logprobs, encode_sequences

    with torch.no_grad():
        batch = encode_sequences(policy, prompts, rollouts.completion_ids, rollouts.prompt_index).to(policy.device)
        logp, _ = completion_logprobs(policy.model.eval(), batch)
    return [logp[i, : len(ids)].float().cpu() for i, ids in enumerate(rollouts.completion_ids)]


def assert_close_to_trainer(policy, prompts, rollouts):
    expected = torch.cat(trainer_logprobs(policy, prompts, rollouts))
    got = torch.cat(rollouts.old_logp)
    difference = (got - expected).abs()
    assert difference.mean() < LOGP_MEAN_TOL and difference.max() < LOGP_MAX_TOL, (difference.mean(), difference.max())


@pytest.mark.gpu
@GPU_SKIP
def test_vllm_rollouts_have_the_trainers_shapes_tokens_and_logprobs(vllm_setup):
    policy, backend, samples = vllm_setup
    prompts, rollouts = sample_with(backend, policy, samples, seed=0)

    assert rollouts.prompt_index == [p for p in range(PROMPTS) for _ in range(ROLLOUTS)]
    banned = set(suppressed_token_ids(policy.tokenizer))
    eos = policy.tokenizer.eos_token_id
    for ids, logp in zip(rollouts.completion_ids, rollouts.old_logp):
        assert 1 <= len(ids) <= NEW_TOKENS and not banned & set(ids)
        assert len(ids) == NEW_TOKENS or ids[-1] == eos  # stopped early only at eos, which is kept
        assert logp.shape == (len(ids),) and logp.dtype == torch.float32
        assert torch.isfinite(logp).all() and (logp <= 0).all()
    assert_close_to_trainer(policy, prompts, rollouts)
    _, again = sample_with(backend, policy, samples, seed=0)
    assert again.completion_ids == rollouts.completion_ids


@pytest.mark.gpu
@GPU_SKIP
def test_sync_weights_makes_the_engine_sample_from_the_updated_module(vllm_setup):
    policy, backend, samples = vllm_setup
    _, before = sample_with(backend, policy, samples, seed=1)
    generator = torch.Generator(device=policy.device).manual_seed(0)
    with torch.no_grad():  # a change of every weight, the vision tower's included
        for param in policy.model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator, device=param.device, dtype=param.dtype))
    backend.sync_weights(policy.model)
    prompts, after = sample_with(backend, policy, samples, seed=1)

    changed = [
        ids_a != ids_b or not torch.allclose(logp_a, logp_b)
        for ids_a, ids_b, logp_a, logp_b in zip(
            before.completion_ids, after.completion_ids, before.old_logp, after.old_logp
        )
    ]
    assert any(changed)
    assert_close_to_trainer(policy, prompts, after)
