"""The GPU check: ViSurf steps on a randomly initialised Qwen2.5-VL of Qwen2.5-VL-3B's text shape, in
bfloat16 with DeepSpeed ZeRO-2 and HF-generate rollouts, first under Ray Train (one GPU worker), then in this process.

    bash benchmarks/gpu_check.sh                   # on the GPU machine: installs the carried .whl kit, then this
    python benchmarks/gpu_check.py --cpu-smoke     # here: the same code path at a tiny shape on CPU (gloo)

Model: text hidden 2048, 36 layers, MLP 11008, 16 heads (2 KV heads), vocabulary 151,936, tied embeddings, with the
tiny builder's small vision tower (the benchmark's 112-px images are 16 image tokens) and its small trained tokenizer:
throughput does not depend on which tokens the ids stand for, so no real Qwen vocabulary is needed, but the
embedding and LM head have their real size. Prompts are the offline benchmark's; a random model's completions run to
max_new_tokens. Each path runs the trainer (`Trainer.from_config`) through `benchmarks.step_runner.StepRunner` (the
loop's set-up without evaluation or checkpoints: a 3B model's DeepSpeed checkpoint is ~45 GB), `--warmup` unmeasured
steps, then `--steps` measured ones; figures are medians over the measured steps.

Printed, as the last line (and written to --json after each path): per path, step time and its rollout / reward /
update split, HF rollout tokens/s (generated tokens / rollout time), update tokens/s (prompt + completion tokens of
all G+1 members / update time), MFU of the update = 6 · parameters · update tokens/s / the card's dense bf16 peak
(989 TFLOP/s for an H100 SXM or an H200), and peak GPU memory.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.step_runner import StepRunner  # noqa: E402
from visurf_ray.config import ExperimentConfig, config_from_dict, load_config  # noqa: E402

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak per card, FLOP/s


@dataclass(frozen=True)
class Shape:
    """Text-model sizes of the random-init policy (the vision tower is the tiny builder's)."""

    hidden: int
    layers: int
    mlp: int
    heads: int
    kv_heads: int
    vocab: int


QWEN25_VL_3B = Shape(hidden=2048, layers=36, mlp=11008, heads=16, kv_heads=2, vocab=151_936)
SMOKE = Shape(hidden=64, layers=2, mlp=128, heads=2, kv_heads=1, vocab=2048)

# Run settings on top of the defaults (then the command line's key=value overrides).
GPU_SETTINGS = [
    "model.dtype=bfloat16",
    "model.gradient_checkpointing=true",
    "data.prompts_per_step=8",
    "objective.paradigm=visurf",
    "objective.num_rollouts=8",
    "rollout.max_new_tokens=128",
    "optim.lr=1e-6",
    "optim.micro_batches=4",
    "deepspeed.zero_stage=2",
    "deepspeed.bf16=true",
    "ray.num_workers=1",
    "ray.use_gpu=true",
    "ray.cpus_per_worker=8",
]
SMOKE_SETTINGS = [
    "model.dtype=float32",
    "data.prompts_per_step=2",
    "objective.paradigm=visurf",
    "objective.num_rollouts=2",
    "rollout.max_new_tokens=8",
    "deepspeed.zero_stage=2",
    "ray.num_workers=1",
    "ray.cpus_per_worker=1",
]


def build_random_policy(folder: Path, shape: Shape, device: str, dtype) -> Path:
    """Save a randomly initialised Qwen2.5-VL of `shape` (built directly on `device` in `dtype`) with the tiny
    builder's tokenizer, processor and vision tower into `folder`."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from visurf_ray.data.benchmark import text_corpus
    from visurf_ray.models.policy import Policy
    from visurf_ray.models.tiny import TinyVLMSpec, build_tiny_vlm

    tiny = build_tiny_vlm(text_corpus(seed=0), TinyVLMSpec(), seed=0)
    values = tiny.model.config.to_dict()
    head_dim = shape.hidden // shape.heads
    text = values["text_config"]
    text.pop("layer_types")  # recomputed for the new number of layers
    text.update(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        max_window_layers=shape.layers,
        intermediate_size=shape.mlp,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
    )
    text["rope_parameters"]["mrope_section"] = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    values["vision_config"]["out_hidden_size"] = shape.hidden
    config = Qwen2_5_VLConfig.from_dict(values)
    default_dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config = tiny.model.generation_config
    Policy(model=model, processor=tiny.processor).save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def measure(cfg: ExperimentConfig, warmup: int) -> dict:
    """Run cfg.steps steps with StepRunner on this process's device; summarise the steps after the first `warmup`."""
    import torch

    runner = StepRunner(cfg)
    device = runner.trainer.policy.device
    steps = []
    for step in range(cfg.steps):
        metrics = runner.step(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= warmup:
            steps.append(metrics)

    def median(key: str) -> float:
        return statistics.median(m[key] for m in steps)

    update_tokens_per_s = median("update_sequence_tokens") / median("time/update")
    on_gpu = device.type == "cuda"
    card = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in card), None)
    result = {
        "device": card,
        "parameters": runner.num_parameters,
        "steps_measured": len(steps),
        "step_time_s": median("step_time"),
        "rollout_s": median("time/rollout"),
        "reward_s": median("time/reward"),
        "update_s": median("time/update"),
        "generated_tokens_per_step": median("generated_tokens"),
        "update_tokens_per_step": median("update_sequence_tokens"),
        "rollout_tokens_per_s": median("rollout_tokens_per_s"),
        "update_tokens_per_s": update_tokens_per_s,
        "update_completion_tokens_per_s": median("update_tokens") / median("time/update"),
        "mfu": 6 * runner.num_parameters * update_tokens_per_s / peak if peak else None,
        "peak_memory_gib": runner.peak_memory_mib() / 1024,
        "memory_kind": "max CUDA memory allocated" if on_gpu else "peak RSS of the process",
    }
    del runner
    return result


def ray_train_loop(config: dict) -> None:
    """Ray Train's train_loop_per_worker: `measure` on this worker's device; the result travels in a checkpoint
    (Train V2 returns metrics only with one)."""
    import ray.train
    import ray.train.torch
    import torch

    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    result = measure(config_from_dict(config["experiment"]), config["warmup"])
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "result.json").write_text(json.dumps(result))
        ray.train.report(
            {"steps_measured": result["steps_measured"]}, checkpoint=ray.train.Checkpoint.from_directory(folder)
        )


def run_ray_train(cfg: ExperimentConfig, warmup: int, storage: Path) -> dict:
    """`measure` inside a one-worker TorchTrainer (NCCL on GPU, gloo on CPU); Ray is shut down afterwards."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from visurf_ray.train.launcher import init_ray

    # Ray's workers inherit this environment: they import benchmarks.step_runner and visurf_ray as this script does.
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    init_ray()
    try:
        trainer = TorchTrainer(
            ray_train_loop,
            train_loop_config={"experiment": cfg.to_dict(), "warmup": warmup},
            torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
            scaling_config=ScalingConfig(
                num_workers=1, use_gpu=cfg.ray.use_gpu, resources_per_worker={"CPU": cfg.ray.cpus_per_worker}
            ),
            run_config=RunConfig(name="gpu_check", storage_path=str(storage)),
        )
        fit = trainer.fit()
        if fit.error is not None:
            raise fit.error
        with fit.checkpoint.as_directory() as folder:
            result = json.loads(Path(folder, "result.json").read_text())
    finally:
        ray.shutdown()
    return result


def versions() -> dict[str, str]:
    from importlib import metadata

    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "deepspeed", "ray"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shape on CPU (gloo), to test the script")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per path")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per path")
    parser.add_argument("--layers", type=int, help="text layers instead of 36 (18 fits an 80 GB H100 comfortably)")
    parser.add_argument("--skip-ray", action="store_true", help="only the in-process path")
    parser.add_argument("--skip-local", action="store_true", help="only the Ray Train path")
    parser.add_argument("--json", help="write the summary here (after each path)")
    parser.add_argument("--deadline", type=float, default=560, help="seconds; then dump all stacks and exit")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. optim.micro_batches=8")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps < 1:
        parser.error(f"--warmup ({args.warmup}) must be >= 0 and --steps ({args.steps}) >= 1")
    for key, value in (
        ("RAY_USAGE_STATS_ENABLED", "0"),
        ("RAY_AUTH_MODE", "disabled"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(key, value)
    if args.cpu_smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    faulthandler.dump_traceback_later(args.deadline, exit=True)

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        parser.error("no CUDA device: run on the GPU machine, or pass --cpu-smoke")
    shape, settings = (SMOKE, SMOKE_SETTINGS) if args.cpu_smoke else (QWEN25_VL_3B, GPU_SETTINGS)
    if args.layers is not None:
        shape = replace(shape, layers=args.layers)
    summary: dict = {"mode": "cpu-smoke" if args.cpu_smoke else "gpu", "versions": versions(), "errors": {}}
    if torch.cuda.is_available():
        summary["card"] = torch.cuda.get_device_name()
        summary["versions"]["cuda"] = torch.version.cuda

    def write() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        started = time.perf_counter()
        dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
        folder = build_random_policy(Path(scratch) / "model", shape, "cpu" if args.cpu_smoke else "cuda", dtype)
        summary["model_build_s"] = time.perf_counter() - started
        cfg = load_config(
            None, [f"model.path={folder}", *settings, f"steps={args.warmup + args.steps}", *args.overrides]
        )
        summary["shape"] = vars(shape)
        summary["config"] = {
            "prompts_per_step": cfg.data.prompts_per_step,
            "num_rollouts": cfg.objective.num_rollouts,
            "max_new_tokens": cfg.rollout.max_new_tokens,
            "micro_batches": cfg.optim.micro_batches,
            "zero_stage": cfg.deepspeed.zero_stage,
            "dtype": cfg.model.dtype,
            "gradient_checkpointing": cfg.model.gradient_checkpointing,
            "warmup": args.warmup,
            "steps": args.steps,
        }
        paths = {
            "ray_train": lambda: run_ray_train(cfg, args.warmup, Path(scratch) / "ray"),  # first: its worker exits
            "in_process": lambda: measure(cfg, args.warmup),  # after it, with the GPU free again
        }
        skipped = {"ray_train": args.skip_ray, "in_process": args.skip_local}
        for name, run in paths.items():
            if skipped[name]:
                continue
            started = time.perf_counter()
            try:
                summary[name] = run()
                summary[name]["wall_s"] = time.perf_counter() - started
                print(f"[gpu_check] {name}: {json.dumps(summary[name])}", flush=True)
            except Exception:
                trace = traceback.format_exc()
                print(trace, file=sys.stderr, flush=True)
                summary["errors"][name] = trace.strip().splitlines()[-1][:500]
            write()
    summary["ok"] = not summary["errors"]
    write()
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
