"""Rollouts with a colocated vLLM engine on the trainer's device (CPU or GPU), in the trainer's process.

One engine per trainer process (tensor parallel 1), built on the policy's checkpoint folder. Before every `generate`
the trainer's current weights are loaded into it with vLLM's in-place `reload_weights` (the same call on every
platform; it re-runs the post-load processing, e.g. the CPU layers' weight repacking). Where vLLM's platform supports
sleep mode (CUDA, ROCm, XPU) the engine's memory is held only while it samples:

    generate:  wake weights -> load the trainer's current weights -> wake KV cache -> sample -> sleep (level 2)
    update:    the engine is asleep (weights and KV cache released), the trainer has the device
    sync_weights(model): records the module whose weights the next `generate` loads (no device work)

Level-2 sleep drops the engine's weights instead of copying them to CPU: they are replaced at every `generate` anyway.
On CPU the engine stays awake. Building the engine and sampling leave the trainer's global RNGs as they were.
vLLM processes each image with the checkpoint folder's own processor config, so prompts tokenize as in the trainer.
Imports torch and visurf_ray.models; vllm only inside `VLLMRolloutBackend`; never Ray.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from transformers import PreTrainedTokenizerBase

from visurf_ray.models.generation import Rollouts, suppressed_token_ids
from visurf_ray.models.inputs import PromptBatch, chat_prompt
from visurf_ray.models.policy import VIDEO_PROCESSOR_CONFIG, Policy
from visurf_ray.rollout.base import SamplingConfig
from visurf_ray.validation import ValidationError, check_int, require

SLEEP_LEVEL = 2  # drop the engine's weights while asleep (no CPU copy): every generate loads all of them anyway
VLLM_MISSING = (
    "rollout.backend=vllm needs vLLM, which is not installed: on a CUDA machine install the project's `gpu` extra "
    "(pip install -e '.[gpu]' -c constraints-gpu.txt); on a CPU machine use .venv-vllm (bash scripts/venv-vllm.sh); "
    "or use rollout.backend=hf"
)


def allowed_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids the engine may sample: every id of `tokenizer` except `suppressed_token_ids` (vision and control
    tokens; eos stays allowed), the guard the HF backend applies with `suppress_tokens`. Sorted ascending."""
    banned = set(suppressed_token_ids(tokenizer))
    return [token_id for token_id in range(len(tokenizer)) if token_id not in banned]


def trainer_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter of the trainer's module under each of its state-dict names: a tied weight is
    yielded under both names (vLLM keeps a separate copy of the tied lm_head, e.g. repacked on CPU). Parameters
    partitioned by DeepSpeed ZeRO-3 are gathered one at a time, on every rank."""
    for name, param in model.named_parameters(remove_duplicate=False):
        if hasattr(param, "ds_id"):  # a ZeRO-3 partition: the full tensor exists only inside GatheredParameters
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                yield name, param.data
        else:
            yield name, param.data


@contextlib.contextmanager
def global_rng_kept() -> Iterator[None]:
    """Restore Python's, NumPy's and torch's global RNG states (CPU and every CUDA device) on exit: vLLM reseeds them
    (`set_random_seed(seed)`) while it builds an engine, which would otherwise change the trainer's random stream."""
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    numpy_state = np.random.get_state()  # noqa: NPY002 (the legacy global state is what vLLM reseeds)
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)  # noqa: NPY002
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def _external_launcher_env(device_type: str) -> None:
    """vLLM's "external_launcher" executor (as in vLLM's torchrun examples and TRL's colocate mode) joins this
    process's torch.distributed world (Ray Train's, or the single-rank group of `train.engine`) from RANK/LOCAL_RANK/
    WORLD_SIZE, creating it from MASTER_ADDR/PORT when no group exists yet; every rank then holds its own engine (tensor
    parallel 1), running in this process, so the weights passed to it need no serialization."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if dist.is_initialized():
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device() if device_type == "cuda" else 0))
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])


class VLLMRolloutBackend:
    """Samples with a colocated `vllm.LLM` holding a copy of the trainer's weights. Returns vLLM's log-probs of the
    sampled tokens (raw: full vocabulary, before temperature and the token guard) as `Rollouts.engine_logp`, and also
    as `Rollouts.old_logp` (the π_old of the clipped objective) only when `engine_old_logp` is set; by default the
    trainer's own log-probs are π_old, as in verl and EasyR1."""

    def __init__(
        self,
        policy: Policy,
        *,
        model_path: str | Path,
        kv_cache_bytes: int,
        max_model_len: int | None = None,
        engine_old_logp: bool = False,
    ):
        """policy: the trainer's policy (its module is the weight source until `sync_weights` names another).
        model_path: the checkpoint folder `policy` was loaded from (config, tokenizer, processor; the weights there
        are replaced before the first sample). kv_cache_bytes: memory of the engine's KV cache in bytes (vLLM's
        kv_cache_memory_bytes: the same meaning on CPU and GPU). max_model_len: prompt + completion tokens per sequence
        (default: the model's maximum). engine_old_logp: use vLLM's log-probs as π_old instead of the trainer's."""
        try:
            import vllm
            from vllm.platforms import current_platform
        except ImportError as error:
            raise ImportError(VLLM_MISSING) from error
        device_type = current_platform.device_type
        if device_type != policy.device.type:
            raise RuntimeError(
                f"rollout.backend=vllm: vLLM's platform here is {device_type or 'unspecified'!r} but the policy is on "
                f"{policy.device.type!r}; install the vLLM build for this device (CUDA: the `gpu` extra; CPU: "
                "scripts/venv-vllm.sh) or use rollout.backend=hf"
            )
        check_int("kv_cache_bytes", kv_cache_bytes, low=1, note="(bytes)")
        folder = Path(model_path)
        require(folder.is_dir(), f"model_path={str(model_path)!r}", "is not a checkpoint folder")
        if not any((folder / name).is_file() for name in (VIDEO_PROCESSOR_CONFIG, "preprocessor_config.json")):
            raise ValidationError(
                f"{folder} has no {VIDEO_PROCESSOR_CONFIG} (nor preprocessor_config.json), which vLLM's Qwen2.5-VL "
                "processor needs; folders written by Policy.save_pretrained have it: re-save this one with "
                "load_policy(folder).save_pretrained(folder)"
            )
        self.policy = policy
        self.source: torch.nn.Module = policy.model
        self.engine_old_logp = engine_old_logp
        self.sleeps = current_platform.is_sleep_mode_available()
        self.allowed_token_ids = allowed_token_ids(policy.tokenizer)
        _external_launcher_env(device_type)
        if device_type == "cuda":
            torch.cuda.empty_cache()
        with global_rng_kept():
            self.llm = vllm.LLM(
                model=str(folder),
                dtype=str(policy.model.dtype).removeprefix("torch."),
                kv_cache_memory_bytes=kv_cache_bytes,
                max_model_len=max_model_len,
                enable_sleep_mode=self.sleeps,
                distributed_executor_backend="external_launcher",
                tensor_parallel_size=1,
                generation_config="vllm",  # sampling is set here alone, not by the checkpoint's generation_config.json
                logprobs_mode="raw_logprobs",  # log π of the unmodified model, as the trainer computes it
                limit_mm_per_prompt={"image": 1, "video": 0},
                seed=0,
            )
            if self.sleeps:
                self.llm.sleep(level=SLEEP_LEVEL)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """The next `generate` samples with `model`'s weights as they are then (loaded right before sampling)."""
        self.source = model

    def _load_trainer_weights(self) -> None:
        # After a level-2 sleep the documented RLHF sequence (docs.vllm.ai/en/latest/features/sleep_mode) wakes the
        # weights alone, restores every weight, then wakes the KV cache (vLLM issue #29341: skipping the restore gives
        # garbage). `reload_weights` (collective_rpc: with the external launcher it runs here, in-process) maps Hugging
        # Face names (model.language_model.*, model.visual.*, lm_head.*) through the model's `load_weights` and then
        # re-runs the post-load processing, so it also works where a platform repacks weights after loading (CPU).
        if self.sleeps:
            torch.cuda.empty_cache()  # memory the trainer freed goes back to the driver, where vLLM allocates
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": trainer_weights(self.source)})
        if self.sleeps:
            self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()  # no key/value states computed with older weights may be reused,
        self.llm.llm_engine.reset_encoder_cache()  # nor image features (the scheduler's record of them included)

    def generate(
        self,
        prompt_batch: PromptBatch,
        n: int,
        sampling: SamplingConfig,
        seed: int,
        *,
        images: list[Image.Image],
        questions: list[str],
    ) -> Rollouts:
        """n completions for each of the B prompts, sampled by vLLM from the raw (image, question) pairs.

        Args:
            prompt_batch: the B prompts as the trainer encoded them [B, P] (only its length is used: vLLM tokenizes
                the same chat text and image itself).
            n: completions per prompt. sampling: lengths in tokens, temperature, top-p; greedy if not do_sample.
            seed: prompt b's completions use seeds seed + b·n .. seed + b·n + n − 1 (vLLM seeds each completion).
            images: the B PIL images; questions: the B question texts (as given to `encode_prompts`).

        Returns:
            Rollouts of B·n completions, prompt-major; engine_logp[i]: float32 [len(completion_ids[i])] nats (also
            old_logp when the backend was built with engine_old_logp).
        """
        from vllm import SamplingParams

        require(
            len(images) == len(prompt_batch) and len(questions) == len(prompt_batch),
            f"images ({len(images)}) and questions ({len(questions)})",
            f"must hold one entry per prompt ({len(prompt_batch)})",
        )
        check_int("n", n, low=1)
        requests = [
            {"prompt": chat_prompt(self.policy, question), "multi_modal_data": {"image": image}}
            for image, question in zip(images, questions)
        ]
        params = [
            SamplingParams(
                n=n,
                temperature=sampling.temperature if sampling.do_sample else 0.0,
                top_p=sampling.top_p if sampling.do_sample else 1.0,
                max_tokens=sampling.max_new_tokens,
                seed=seed + row * n,
                logprobs=0,  # the sampled token's log-prob only
                stop_token_ids=[self.policy.tokenizer.eos_token_id],
                allowed_token_ids=self.allowed_token_ids,
                detokenize=False,  # texts are decoded below with the trainer's tokenizer, as the HF backend does
            )
            for row in range(len(requests))
        ]
        with global_rng_kept():
            self._load_trainer_weights()
            try:
                outputs = self.llm.generate(requests, params, use_tqdm=False)
            finally:
                if self.sleeps:
                    self.llm.sleep(level=SLEEP_LEVEL)

        completion_ids: list[list[int]] = []
        prompt_index: list[int] = []
        engine_logp: list[torch.Tensor] = []
        for row, output in enumerate(outputs):
            for completion in sorted(output.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                completion_ids.append(ids)
                prompt_index.append(row)
                logps = [position[token].logprob for token, position in zip(ids, completion.logprobs)]
                engine_logp.append(torch.tensor(logps, dtype=torch.float32))
        texts = self.policy.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollouts(
            completion_ids,
            prompt_index,
            texts,
            old_logp=engine_logp if self.engine_old_logp else None,
            engine_logp=engine_logp,
        )
