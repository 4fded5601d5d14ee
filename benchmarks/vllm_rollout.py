"""vLLM against the HF backend (`models.generation.generate`) as the rollout engine: engine start-up, sampling time
and log-prob agreement.

    .venv-vllm/bin/python benchmarks/vllm_rollout.py                        # tiny base model, float32, CPU
    .venv-vllm/bin/python benchmarks/vllm_rollout.py --dtype bfloat16 --rounds 6 --json /tmp/vllm.json

Builds one `VLLMRolloutBackend` on the policy folder (timed: the engine's start-up, compilation included), then
alternates the two engines `--rounds` times on the same prompts (vLLM first in even rounds, HF first in odd ones) and
prints the median sampling time of each and their ratio; the first round is a warm-up. Also prints the mean and max
|log π_vLLM − log π_trainer| over vLLM's sampled tokens, and whether greedy completions are identical. Runs on the
device vLLM was built for (.venv-vllm: CPU; the `gpu` extra: CUDA).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-base", help="a policy folder, or tiny-base (the cached base model)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--samples", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds; the first is a warm-up")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be >= 2 (the first is a warm-up)")

    from vllm.platforms import current_platform

    from visurf_ray.config import ModelConfig
    from visurf_ray.data.benchmark import make_split
    from visurf_ray.models.generation import generate
    from visurf_ray.models.inputs import completion_logprobs, encode_prompts, encode_sequences
    from visurf_ray.models.policy import load_policy
    from visurf_ray.rollout.base import SamplingConfig
    from visurf_ray.rollout.vllm import VLLMRolloutBackend
    from visurf_ray.train.engine import ensure_process_group
    from visurf_ray.train.models import model_dir

    folder = model_dir(ModelConfig(path=args.model))
    device = current_platform.device_type
    policy = load_policy(folder, dtype=DTYPES[args.dtype], device=device)
    policy.model.eval()
    samples = make_split("posttrain", args.prompts, seed=0)
    images, questions = [s.image for s in samples], [s.problem for s in samples]
    prompts = encode_prompts(policy, images, questions)
    sampling = SamplingConfig(max_new_tokens=args.new_tokens)

    ensure_process_group()
    began = time.perf_counter()
    backend = VLLMRolloutBackend(policy, model_path=folder, kv_cache_bytes=1 << 30, max_model_len=1024)
    startup = time.perf_counter() - began

    def with_vllm(seed: int):
        return backend.generate(prompts, args.samples, sampling, seed, images=images, questions=questions)

    def with_hf(seed: int):
        return generate(policy, prompts, num_return_sequences=args.samples, max_new_tokens=args.new_tokens, seed=seed)

    seconds: dict[str, list[float]] = {"vllm": [], "hf": []}
    tokens: dict[str, list[int]] = {"vllm": [], "hf": []}
    for round_index in range(args.rounds):
        order = [("vllm", with_vllm), ("hf", with_hf)]
        for name, run in order if round_index % 2 == 0 else order[::-1]:
            began = time.perf_counter()
            completions = run(round_index)
            if round_index:  # round 0 warms both up
                seconds[name].append(time.perf_counter() - began)
                tokens[name].append(sum(len(ids) for ids in completions.completion_ids))

    rollouts = with_vllm(0)
    with torch.no_grad():
        batch = encode_sequences(policy, prompts, rollouts.completion_ids, rollouts.prompt_index).to(policy.device)
        logp, _ = completion_logprobs(policy.model, batch)
    gaps = torch.cat(
        [(engine - logp[i, : len(engine)].float().cpu()).abs() for i, engine in enumerate(rollouts.engine_logp)]
    )
    greedy = SamplingConfig(max_new_tokens=args.new_tokens, do_sample=False)
    greedy_vllm = backend.generate(prompts, 1, greedy, 0, images=images, questions=questions).completion_ids
    greedy_hf = generate(policy, prompts, num_return_sequences=1, max_new_tokens=args.new_tokens, do_sample=False)

    figures = {
        "device": device,
        "dtype": args.dtype,
        "engine_startup_s": startup,
        "vllm_median_s": statistics.median(seconds["vllm"]),
        "hf_median_s": statistics.median(seconds["hf"]),
        "vllm_tokens_per_s": sum(tokens["vllm"]) / sum(seconds["vllm"]),
        "hf_tokens_per_s": sum(tokens["hf"]) / sum(seconds["hf"]),
        "logp_abs_diff_mean": float(gaps.mean()),
        "logp_abs_diff_max": float(gaps.max()),
        "greedy_identical": greedy_vllm == greedy_hf.completion_ids,
    }
    figures["vllm_over_hf_time"] = figures["vllm_median_s"] / figures["hf_median_s"]
    print(
        f"{args.prompts} prompts x {args.samples} samples x {args.new_tokens} tokens, {args.dtype} on {device}, "
        f"{args.rounds - 1} measured rounds"
    )
    for key, value in figures.items():
        print(f"  {key:<22} {value:.4g}" if isinstance(value, float) else f"  {key:<22} {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
