"""Rollouts with a colocated vLLM engine on the trainer's GPU (the optional `gpu` extra), with old log-probs.

One engine per trainer process (tensor parallel 1), built on the policy's checkpoint folder in sleep mode. Its memory
is held only while it samples; the trainer's weights are loaded into it right before:

    generate:  wake weights -> load the trainer's current weights -> wake KV cache -> sample -> sleep (level 2)
    update:    the engine is asleep (weights and KV cache released), the trainer has the GPU
    sync_weights(model): records the module whose weights the next `generate` loads (no GPU work)

Level-2 sleep drops the engine's weights instead of copying them to CPU: they are replaced at every `generate` anyway.
vLLM processes each image with the checkpoint folder's own processor config, so prompts tokenize as in the trainer.
Imports torch and visurf_ray.models; vllm only inside `VLLMRolloutBackend` (GPU machines); never Ray.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from transformers import PreTrainedTokenizerBase

from visurf_ray.models.generation import suppressed_token_ids
from visurf_ray.models.inputs import PromptBatch, chat_prompt
from visurf_ray.models.policy import Policy
from visurf_ray.rollout.base import Rollouts, SamplingConfig

SLEEP_LEVEL = 2  # drop the engine's weights while asleep (no CPU copy): every generate loads all of them anyway
VLLM_MISSING = (
    "rollout.backend=vllm needs vLLM, which is not installed: install the project's `gpu` extra "
    "(pip install -e '.[gpu]', CUDA machines only), or use rollout.backend=hf"
)


def allowed_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids the engine may sample: every id of `tokenizer` except `suppressed_token_ids` (vision and control
    tokens; eos stays allowed), the guard the HF backend applies with `suppress_tokens`. Sorted ascending."""
    banned = set(suppressed_token_ids(tokenizer))
    return [token_id for token_id in range(len(tokenizer)) if token_id not in banned]


def trainer_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every parameter of the trainer's module, named as in its state dict (vLLM's Qwen2.5-VL maps
    these names). Parameters partitioned by DeepSpeed ZeRO-3 are gathered one at a time, on every rank."""
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id"):  # a ZeRO-3 partition: the full tensor exists only inside GatheredParameters
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                yield name, param.data
        else:
            yield name, param.data


def _external_launcher_env() -> None:
    """vLLM's "external_launcher" executor (as in vLLM's torchrun examples and TRL's colocate mode) joins this
    process's torch.distributed world (Ray Train's, or the single-rank group of `train.engine`) from RANK/LOCAL_RANK/
    WORLD_SIZE, creating it from MASTER_ADDR/PORT when no group exists yet; every rank then holds its own engine (tensor
    parallel 1), running in this process, so functions passed to the model need no serialization."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if dist.is_initialized():
        os.environ.setdefault("RANK", str(dist.get_rank()))
        os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
        os.environ.setdefault("LOCAL_RANK", str(torch.cuda.current_device()))
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])


class VLLMRolloutBackend:
    """Samples with a colocated `vllm.LLM` holding a copy of the trainer's weights; returns vLLM's log-probs of the
    sampled tokens (raw: full vocabulary, before temperature and the token guard) as `Rollouts.old_logp`."""

    def __init__(
        self,
        policy: Policy,
        *,
        model_path: str | Path,
        gpu_memory_utilization: float,
        max_model_len: int | None = None,
    ):
        """policy: the trainer's policy (its module is the weight source until `sync_weights` names another).
        model_path: the checkpoint folder `policy` was loaded from (config, tokenizer, processor; the weights there
        are replaced before the first sample). gpu_memory_utilization: fraction of the GPU's memory the engine may
        take while awake, weights and KV cache together. max_model_len: prompt + completion tokens per sequence
        (default: the model's maximum)."""
        try:
            import vllm
        except ImportError as error:
            raise ImportError(VLLM_MISSING) from error
        if not torch.cuda.is_available():
            raise RuntimeError("rollout.backend=vllm needs a CUDA GPU; use rollout.backend=hf on CPU")
        if not 0 < gpu_memory_utilization < 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1), got {gpu_memory_utilization}")
        if not Path(model_path).is_dir():
            raise ValueError(f"model_path={str(model_path)!r} is not a checkpoint folder")
        self.policy = policy
        self.source = policy.model
        self.allowed_token_ids = allowed_token_ids(policy.tokenizer)
        _external_launcher_env()
        torch.cuda.empty_cache()  # vLLM sizes itself from the memory free on the device
        self.llm = vllm.LLM(
            model=str(model_path),
            dtype=str(policy.model.dtype).removeprefix("torch."),
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep_mode=True,
            distributed_executor_backend="external_launcher",
            tensor_parallel_size=1,
            generation_config="vllm",  # sampling is set here alone, not by the checkpoint's generation_config.json
            logprobs_mode="raw_logprobs",  # log π of the unmodified model, as the trainer computes it
            limit_mm_per_prompt={"image": 1, "video": 0},
            seed=0,
        )
        self.llm.sleep(level=SLEEP_LEVEL)

    def sync_weights(self, model: torch.nn.Module) -> None:
        """The next `generate` samples with `model`'s weights as they are then (loaded right before sampling)."""
        self.source = model

    def _wake_with_trainer_weights(self) -> None:
        # The documented RLHF sequence after a level-2 sleep (docs.vllm.ai/en/latest/features/sleep_mode): wake the
        # weights alone, restore every weight, then wake the KV cache (vLLM issue #29341: skipping the restore gives
        # garbage). Weights are restored with `LLM.apply_model(fn)`, i.e. collective_rpc("apply_model"), which calls
        # fn on each worker's nn.Module (WorkerBase.apply_model, vllm/v1/worker/worker_base.py); with the external
        # launcher that runs here, in-process. The module's `load_weights(Iterable[(name, tensor)])` maps Hugging
        # Face names (model.language_model.*, model.visual.*, lm_head.*) onto vLLM's layout.
        torch.cuda.empty_cache()  # memory the trainer freed goes back to the driver, where vLLM allocates
        self.llm.wake_up(tags=["weights"])
        weights = trainer_weights(self.source)
        self.llm.apply_model(lambda model: model.load_weights(weights))
        self.llm.wake_up(tags=["kv_cache"])
        self.llm.reset_prefix_cache()  # no prefix computed with older weights may be reused

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
            Rollouts of B·n completions, prompt-major; old_logp[i]: float32 [len(completion_ids[i])] nats.
        """
        from vllm import SamplingParams

        if len(images) != len(prompt_batch) or len(questions) != len(prompt_batch):
            raise ValueError(
                f"images ({len(images)}) and questions ({len(questions)}) must hold one entry per prompt "
                f"({len(prompt_batch)})"
            )
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
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
        self._wake_with_trainer_weights()
        try:
            outputs = self.llm.generate(requests, params, use_tqdm=False)
        finally:
            self.llm.sleep(level=SLEEP_LEVEL)

        completion_ids: list[list[int]] = []
        prompt_index: list[int] = []
        old_logp: list[torch.Tensor] = []
        for row, output in enumerate(outputs):
            for completion in sorted(output.outputs, key=lambda c: c.index):
                ids = list(completion.token_ids)
                completion_ids.append(ids)
                prompt_index.append(row)
                logps = [position[token].logprob for token, position in zip(ids, completion.logprobs)]
                old_logp.append(torch.tensor(logps, dtype=torch.float32))
        texts = self.policy.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Rollouts(completion_ids, prompt_index, texts, old_logp=old_logp)
