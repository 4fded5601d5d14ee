"""Our RLVR step against TRL's `GRPOTrainer` on the same tiny Qwen2.5-VL, data, G, batch and lengths, side by side.

    python benchmarks/peer_trl.py --setup                 # once: the peer venv .venv-peer (TRL is never a dependency)
    .venv-peer/bin/python benchmarks/peer_trl.py          # step time and peak memory, 1 warm-up + 5 pairs
    .venv-peer/bin/python benchmarks/peer_trl.py --check-loss   # same inputs -> same loss and gradients (float64)

Step time: each trainer runs in its own worker process (its own peak RSS), both from the same saved weights, on the
same prompts in the same order (TRL's sampler unshuffled, fed our loop's batches). Our side is
`benchmarks.step_runner.StepRunner` (the trainer, `Trainer.from_config`) with RLVR and the aggregation
matching TRL's `loss_type`; TRL's side is `GRPOTrainer.train()` paused between optimizer steps by a callback. The
parent alternates them one step at a time, flipping the order every pair; the verdict is the median of per-pair
ratios. Both sample with temperature 1, top-p 1, no top-k, at most `rollout.max_new_tokens` tokens, with the
vision/control tokens suppressed, and score with the same verifiers (`visurf_ray.rewards.score`).

Loss check: one TRL batch (its generation, rewards and advantages; rewards from `digit_share_reward`, since a random
model's completions score 0 on every verifier) is scored by TRL's `compute_loss` and by our
`encode_sequences` → `completion_logprobs` → RLVR `advantages` → `loss`, on one float64 model. TRL computes rewards
and advantages in float32, so the advantages agree to float32 rounding; the loss and every parameter's gradient are
compared twice, with our advantages and with TRL's. TRL's fused LM head (`trl/kernels/chunked_logprob.py`) computes
the log-softmax in float32 even for a float64 model, so agreement is to float32 rounding: the verdict asks for a
relative difference below CHECK_RTOL.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visurf_ray.config import ExperimentConfig, load_config  # noqa: E402

PEER_VENV = ROOT / ".venv-peer"
PEER_REQUIREMENTS = ROOT / "benchmarks" / "requirements-peer.txt"
DEFAULT_CONFIG = ROOT / "experiments" / "configs" / "tiny_cpu.yaml"
TARGET_RATIO = 0.7  # the goal: our step at most 0.7x TRL's
CHECK_RTOL = 1e-5  # float32 rounding of TRL's log-probs and advantages, relative to the largest value
LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo"}  # our agg -> TRL loss_type with the same value
# The comparison's defaults: RLVR, token-mean (TRL's default loss_type "dapo"), TRL's 1e-4 std offset, 48 new tokens.
PEER_OVERRIDES = ["objective.paradigm=rlvr", "objective.agg=token-mean", "objective.eps=0.0001"]


def setup_peer_env(venv: Path) -> None:
    """Create `venv` with this project (-e .), TRL and its datasets/accelerate pins, under constraints.txt."""
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-c", str(ROOT / "constraints.txt")]
    subprocess.run([*pip, "-r", str(PEER_REQUIREMENTS), "-e", str(ROOT)], check=True)


def peer_config(config: str, overrides: list[str], steps: int) -> ExperimentConfig:
    cfg = load_config(config, [*PEER_OVERRIDES, *overrides, f"steps={steps}"])
    if cfg.objective.paradigm != "rlvr" or cfg.objective.agg not in LOSS_TYPES:
        raise ValueError(
            f"the peer comparison needs objective.paradigm=rlvr and objective.agg in {sorted(LOSS_TYPES)}, got "
            f"{cfg.objective.paradigm!r} and {cfg.objective.agg!r}"
        )
    return cfg


def step_samples(cfg: ExperimentConfig, steps: int) -> list:
    """The prompts of optimizer steps 0..steps-1 in our loop's order (rank 0 of 1), step after step."""
    from visurf_ray.train.data import train_dataset
    from visurf_ray.train.loop import batch_for_step

    dataset = train_dataset(cfg)
    return [
        s for step in range(steps) for s in batch_for_step(dataset, step, cfg.data.prompts_per_step, 0, 1, cfg.seed)
    ]


def peer_rows(samples: list) -> list[dict]:
    """TRL dataset rows: a conversational prompt, the image, and the columns our verifiers need."""
    return [
        {
            "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.problem}]}],
            "image": s.image,
            "task": s.task,
            "solution": s.solution,
            "img_width": s.img_width,
            "img_height": s.img_height,
        }
        for s in samples
    ]


def verifier_reward(text: str, task: str, solution: str, width: int, height: int) -> float:
    """The task verifier's overall reward (`visurf_ray.rewards.score`)."""
    from visurf_ray import rewards

    return rewards.score(task, text, solution, image_size=(width, height))["overall"]


def digit_share_reward(text: str, task: str, solution: str, width: int, height: int) -> float:
    """A stand-in reward for the loss check: the fraction of the completion's characters that are digits. A random
    model's completions all score 0 on the task verifiers, which makes every advantage 0 and the check vacuous."""
    return sum(c.isdigit() for c in text) / max(len(text), 1)


class RewardLog:
    """TRL reward function scoring each completion with `score(text, task, solution, width, height)`; keeps each
    call's rewards [N] and generated tokens."""

    __name__ = "visurf_overall"

    def __init__(self, score):
        self.score = score
        self.rewards: list[list[float]] = []
        self.tokens: list[int] = []

    def __call__(self, prompts, completions, completion_ids, task, solution, img_width, img_height, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        scores = [self.score(*row) for row in zip(texts, task, solution, img_width, img_height)]
        self.rewards.append(scores)
        self.tokens.append(sum(len(ids) for ids in completion_ids))
        return scores


def build_trl_trainer(
    cfg: ExperimentConfig, model_dir: Path, samples: list, output_dir: Path, score=verifier_reward, callbacks=()
):
    """A GRPOTrainer whose settings mirror `cfg` (G, prompts per step, lengths, sampling, clip, loss aggregation)."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    from visurf_ray.models.generation import suppressed_token_ids
    from visurf_ray.models.policy import load_policy

    policy = load_policy(model_dir)
    group, prompts = cfg.objective.num_rollouts, cfg.data.prompts_per_step
    args = GRPOConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=group * prompts // cfg.optim.micro_batches,
        gradient_accumulation_steps=cfg.optim.micro_batches,
        num_generations=group,
        max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=0,
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1],
        max_grad_norm=cfg.optim.max_grad_norm,
        lr_scheduler_type="constant",
        beta=cfg.objective.kl_coef,
        epsilon=cfg.objective.clip_low,
        epsilon_high=cfg.objective.clip_high,
        loss_type=LOSS_TYPES[cfg.objective.agg],
        scale_rewards="group" if cfg.objective.normalize_std else "none",
        generation_kwargs={"suppress_tokens": suppressed_token_ids(policy.tokenizer)},
        max_steps=cfg.steps,
        shuffle_dataset=False,
        seed=cfg.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        report_to=[],
        logging_steps=10**6,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    reward = RewardLog(score)
    trainer = GRPOTrainer(
        model=policy.model,
        reward_funcs=[reward],
        args=args,
        train_dataset=datasets.Dataset.from_list(peer_rows(samples)),
        processing_class=policy.processor,
        callbacks=list(callbacks),
    )
    return trainer, reward, policy


def _ours_worker(cfg_dict: dict, threads: int, conn) -> None:
    """Our trainer: answers each step number with (seconds, generated tokens, peak RSS MiB)."""
    import torch

    from benchmarks.step_runner import StepRunner
    from visurf_ray.config import config_from_dict

    torch.set_num_threads(threads)
    runner = StepRunner(config_from_dict(cfg_dict))
    conn.send("ready")
    while (step := conn.recv()) is not None:
        start = time.perf_counter()
        metrics = runner.step(step)
        conn.send((time.perf_counter() - start, metrics["generated_tokens"], _peak_rss_mib()))


def _trl_worker(cfg_dict: dict, model_dir: str, threads: int, conn) -> None:
    """TRL's trainer: `train()` waits at the start of every optimizer step for the parent's go, then reports."""
    import torch
    from transformers import TrainerCallback

    from visurf_ray.config import config_from_dict

    torch.set_num_threads(threads)
    cfg = config_from_dict(cfg_dict)

    class Paced(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            conn.recv()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            conn.send((time.perf_counter() - self.start, reward.tokens[-1], _peak_rss_mib()))
            if state.global_step >= args.max_steps:
                conn.recv()  # hold train()'s wind-down until the parent has timed our last step too

    with tempfile.TemporaryDirectory(prefix="peer-trl-") as scratch:
        trainer, reward, _ = build_trl_trainer(
            cfg, Path(model_dir), step_samples(cfg, cfg.steps), Path(scratch), callbacks=[Paced()]
        )
        conn.send("ready")
        trainer.train()


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def benchmark(cfg: ExperimentConfig, warmup: int, pairs: int, threads: int) -> dict:
    """Alternate our step and TRL's; per side the medians, and the median of per-pair ratios ours/TRL."""
    from benchmarks.step_runner import random_tiny_model

    with tempfile.TemporaryDirectory(prefix="peer-") as scratch:
        model_dir = random_tiny_model(Path(scratch) / "model", cfg.seed)
        ours_cfg = replace(cfg, model=replace(cfg.model, path=str(model_dir)))
        context = multiprocessing.get_context("spawn")
        workers = {}
        for name, target, args in (
            ("ours", _ours_worker, (ours_cfg.to_dict(), threads)),
            ("trl", _trl_worker, (cfg.to_dict(), str(model_dir), threads)),
        ):
            parent, child = context.Pipe()
            process = context.Process(target=target, args=(*args, child), daemon=True)
            process.start()
            workers[name] = (process, parent)
        for _, conn in workers.values():
            conn.recv()
        runs: dict[str, list[tuple[float, float, float]]] = {"ours": [], "trl": []}
        started = time.perf_counter()
        for step in range(warmup + pairs):
            for name in ("ours", "trl") if step % 2 == 0 else ("trl", "ours"):
                workers[name][1].send(step)
                result = workers[name][1].recv()
                if step >= warmup:
                    runs[name].append(result)
            print(
                f"[step {step + 1}/{warmup + pairs}] {time.perf_counter() - started:6.1f}s "
                + " ".join(f"{n}={runs[n][-1][0]:.2f}s" for n in runs if runs[n]),
                file=sys.stderr,
                flush=True,
            )
        for _, conn in workers.values():
            conn.send(None)
        for process, _ in workers.values():
            process.join(timeout=120)
    summary = {
        name: {
            "step_s": statistics.median(r[0] for r in rows),
            "step_min_s": min(r[0] for r in rows),
            "generated_tokens": statistics.median(r[1] for r in rows),
            "peak_mib": max(r[2] for r in rows),
        }
        for name, rows in runs.items()
    }
    ratios = [o[0] / t[0] for o, t in zip(runs["ours"], runs["trl"])]
    summary["pair_ratios"] = ratios
    summary["pair_ratio_median"] = statistics.median(ratios)
    return summary


def check_loss(cfg: ExperimentConfig) -> dict[str, float]:
    """One TRL batch scored by TRL and by us on the same float64 weights: largest absolute differences."""
    import torch

    from benchmarks.step_runner import random_tiny_model
    from visurf_ray.models.inputs import completion_logprobs, encode_prompts, encode_sequences
    from visurf_ray.objectives.paradigms import get_paradigm

    torch.manual_seed(cfg.seed)
    with tempfile.TemporaryDirectory(prefix="peer-loss-") as scratch:
        model_dir = random_tiny_model(Path(scratch) / "model", cfg.seed)
        samples = step_samples(cfg, 1)
        trainer, reward, policy = build_trl_trainer(cfg, model_dir, samples, Path(scratch) / "trl", digit_share_reward)
        model = trainer.model.double()
        model.train()
        group = cfg.objective.num_rollouts
        rows = [row for row in peer_rows(samples) for _ in range(group)]  # TRL's RepeatSampler order
        inputs = trainer._generate_and_score_completions(rows)
        trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps  # set by train()
        trl_loss = trainer.compute_loss(model, inputs)
        trl_loss.backward()
        trl_grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)

        policy.model = model
        prompts = encode_prompts(policy, [s.image for s in samples], [s.problem for s in samples])
        prompt_rows = prompts.select([i for i in range(len(samples)) for _ in range(group)])
        completion_mask = inputs["completion_mask"].bool()
        completions = [ids[keep].tolist() for ids, keep in zip(inputs["completion_ids"], completion_mask)]
        batch = encode_sequences(policy, prompts, completions, [i for i in range(len(samples)) for _ in range(group)])
        logp, mask = completion_logprobs(model, batch)
        rlvr = get_paradigm("rlvr")
        rewards = torch.tensor(reward.rewards[-1], dtype=torch.float64).view(len(samples), group)
        advantages = rlvr.advantages(rewards, None, cfg.objective)
        member_advantages, is_label = advantages.per_member()
        trl_advantages = inputs["advantages"].detach().cpu().double()  # TRL computes them in float32
        with torch.no_grad():
            loss_own_advantages, _ = rlvr.loss(logp, logp, mask.bool(), member_advantages, is_label, cfg.objective)
        loss, _ = rlvr.loss(logp, logp.detach(), mask.bool(), trl_advantages, is_label, cfg.objective)
        loss.backward()
        ours_grads = {name: p.grad.detach() for name, p in model.named_parameters() if p.grad is not None}
    return {
        "prompt_ids_equal": float(torch.equal(prompt_rows.input_ids, inputs["prompt_ids"].cpu())),
        "members": float(len(completions)),
        "completion_tokens": float(mask.sum()),
        "nonzero_advantages": float((member_advantages != 0).sum()),
        "advantage_max_abs_diff": float((member_advantages - trl_advantages).abs().max()),
        "loss_trl": float(trl_loss.detach()),
        "loss_ours_own_advantages": float(loss_own_advantages),
        "loss_ours_trl_advantages": float(loss.detach()),
        "loss_abs_diff_own_adv": abs(float(trl_loss.detach()) - float(loss_own_advantages)),
        "loss_abs_diff_trl_adv": abs(float(trl_loss.detach()) - float(loss.detach())),
        "grad_params_compared": float(len(trl_grads)),
        "grad_same_parameters": float(trl_grads.keys() == ours_grads.keys()),
        "grad_max_abs_diff_trl_adv": max(float((trl_grads[k] - ours_grads[k]).abs().max()) for k in trl_grads),
        "grad_max_abs": max(float(g.abs().max()) for g in trl_grads.values()),
    }


def print_benchmark(summary: dict, cfg: ExperimentConfig, threads: int, warmup: int, pairs: int) -> None:
    ours, trl = summary["ours"], summary["trl"]
    load = os.getloadavg()
    print(
        f"RLVR step, ours vs TRL {__import__('trl').__version__} GRPOTrainer (loss_type="
        f"{LOSS_TYPES[cfg.objective.agg]}), random-init tiny Qwen2.5-VL, G={cfg.objective.num_rollouts}, "
        f"{cfg.data.prompts_per_step} prompts/step, max_new_tokens={cfg.rollout.max_new_tokens}, ours: deepspeed="
        f"{'ZeRO-' + str(cfg.deepspeed.zero_stage) if cfg.deepspeed.enabled else 'off'}, {threads} thread(s) each, "
        f"{warmup} warm-up + {pairs} pairs, CPU ({os.cpu_count()} cores), load average now {load[0]:.1f}"
    )
    print(f"{'':32s} {'ours':>10s} {'TRL':>10s} {'ours/TRL':>10s}")
    for label, key, fmt in (
        ("step time, median (s)", "step_s", "{:.3f}"),
        ("step time, min (s)", "step_min_s", "{:.3f}"),
        ("generated tokens / step", "generated_tokens", "{:.0f}"),
        ("peak RSS of the worker (MiB)", "peak_mib", "{:.0f}"),
    ):
        print(f"{label:32s} {fmt.format(ours[key]):>10s} {fmt.format(trl[key]):>10s} {ours[key] / trl[key]:>10.3f}")
    ratios = ", ".join(f"{r:.3f}" for r in summary["pair_ratios"])
    print(f"median of per-pair step-time ratios ours/TRL: {summary['pair_ratio_median']:.3f} ({ratios})")
    met = summary["pair_ratio_median"] <= TARGET_RATIO and ours["peak_mib"] <= trl["peak_mib"]
    print(f"target ours <= {TARGET_RATIO}x TRL at equal or lower peak memory: {'met' if met else 'NOT met'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", action="store_true", help=f"create the peer venv {PEER_VENV} and exit")
    parser.add_argument("--check-loss", action="store_true", help="compare the loss and gradients on one batch")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML experiment config (G, batch, lengths)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per side first")
    parser.add_argument("--pairs", type=int, default=5, help="measured (ours, TRL) step pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. rollout.max_new_tokens=48")
    args = parser.parse_args(argv)
    if args.setup:
        setup_peer_env(PEER_VENV)
        return
    try:
        import trl  # noqa: F401
    except ImportError:
        parser.error(f"TRL is not installed here: run `python {__file__} --setup`, then use {PEER_VENV}/bin/python")
    if args.warmup < 0 or args.pairs < 1:
        parser.error(f"--warmup ({args.warmup}) must be >= 0 and --pairs ({args.pairs}) >= 1")
    if args.check_loss:
        import torch

        torch.set_num_threads(args.threads)
        cfg = peer_config(args.config, args.overrides, 1)
        result = check_loss(cfg)
        print(f"loss cross-check, float64, agg={cfg.objective.agg} vs loss_type={LOSS_TYPES[cfg.objective.agg]}:")
        for key, value in result.items():
            print(f"  {key:26s} {value:.6g}")
        relative = max(
            result["advantage_max_abs_diff"],
            result["loss_abs_diff_trl_adv"] / max(abs(result["loss_trl"]), 1.0),
            result["grad_max_abs_diff_trl_adv"] / result["grad_max_abs"],
        )
        same = result["prompt_ids_equal"] and result["grad_same_parameters"] and relative < CHECK_RTOL
        print(f"largest relative difference {relative:.2g}: {'same' if same else 'DIFFERENT'} (rtol {CHECK_RTOL})")
        return
    cfg = peer_config(args.config, args.overrides, args.warmup + args.pairs)
    summary = benchmark(cfg, args.warmup, args.pairs, args.threads)
    print_benchmark(summary, cfg, args.threads, args.warmup, args.pairs)


if __name__ == "__main__":
    main()
