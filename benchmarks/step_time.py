"""Step time and memory of paradigms at the same G, batch and seed, side by side in one run (default: RLVR against
ViSurf; `--paradigms rlvr,luffy,chord` compares ViSurf's neighbours with RLVR).

    python benchmarks/step_time.py [--paradigms rlvr,visurf] [--model PATH] [--warmup 1] [--pairs 5] [--threads 1]
                                   [key=value ...]

Each paradigm trains in its own worker process (so that each has its own peak memory), all from the same weights,
through the trainer (`Trainer.from_config`) with the config of experiments/configs/tiny_cpu.yaml (plus
`key=value` overrides). The parent runs them in turn, one step at a time, in interleaved rounds whose order flips
every round: the machines drift by ±10–15%, so the verdict is the median of the per-round ratios to the first
paradigm (the baseline). Default model: a randomly initialised tiny Qwen2.5-VL (TinyVLMSpec defaults), whose
completions run to rollout.max_new_tokens; the table says which model it used. Memory: peak RSS of each worker process
on CPU (weights, optimizer state and the step's transient tensors), peak allocated CUDA memory on a GPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.step_runner import StepRunner, random_tiny_model  # noqa: E402
from visurf_ray.config import load_config  # noqa: E402

DEFAULT_CONFIG = ROOT / "experiments" / "configs" / "tiny_cpu.yaml"
DEFAULT_PARADIGMS = "rlvr,visurf"
TARGET_RATIO = 1.05  # the goal: ViSurf's step time at most 1.05x RLVR's
TIMES = ("step_time", "time/rollout", "time/reward", "time/update")


def _worker(cfg_dict: dict, threads: int, conn) -> None:
    """A paradigm's worker: builds its StepRunner, then answers each step number with (metrics, peak MiB)."""
    import torch

    from visurf_ray.config import config_from_dict

    torch.set_num_threads(threads)
    runner = StepRunner(config_from_dict(cfg_dict))
    conn.send({"parameters": runner.num_parameters, "setup_mib": runner.peak_memory_mib()})
    while (step := conn.recv()) is not None:
        metrics = runner.step(step)
        conn.send({"metrics": metrics, "peak_mib": runner.peak_memory_mib()})


def summarise(runs: dict[str, list[dict]], setup: dict[str, dict]) -> dict:
    """Medians per paradigm over the measured steps, and each paradigm's per-round step-time ratios to the first one
    (`runs` is in paradigm order, the baseline first) with their median."""
    summary: dict = {}
    for name, steps in runs.items():
        median = {key: statistics.median(s["metrics"][key] for s in steps) for key in steps[0]["metrics"]}
        times = [s["metrics"]["step_time"] for s in steps]
        summary[name] = {
            **{key: median[key] for key in (*TIMES, "generated_tokens", "update_tokens", "update_sequence_tokens")},
            "step_time_min": min(times),
            "step_time_max": max(times),
            "peak_mib": max(s["peak_mib"] for s in steps),
            "setup_mib": setup[name]["setup_mib"],
        }
    baseline, *others = runs
    summary["pair_ratios"] = {
        name: [o["metrics"]["step_time"] / b["metrics"]["step_time"] for b, o in zip(runs[baseline], runs[name])]
        for name in others
    }
    summary["pair_ratio_median"] = {name: statistics.median(ratios) for name, ratios in summary["pair_ratios"].items()}
    return summary


def print_table(summary: dict, paradigms: list[str], memory_label: str) -> None:
    """One column per paradigm, then each non-baseline paradigm's ratio to the baseline (the first)."""
    rows = [
        ("step time, median (s)", "step_time", "{:.3f}"),
        ("  rollout (s)", "time/rollout", "{:.3f}"),
        ("  reward + advantages (s)", "time/reward", "{:.4f}"),
        ("  update: fwd+bwd+step (s)", "time/update", "{:.3f}"),
        ("step time, min (s)", "step_time_min", "{:.3f}"),
        ("step time, max (s)", "step_time_max", "{:.3f}"),
        ("generated tokens / step", "generated_tokens", "{:.0f}"),
        ("update completion tokens / step", "update_tokens", "{:.0f}"),
        ("update tokens incl. prompts / step", "update_sequence_tokens", "{:.0f}"),
        (f"{memory_label} by end of set-up (MiB)", "setup_mib", "{:.0f}"),
        (f"{memory_label} by end of run (MiB)", "peak_mib", "{:.0f}"),
    ]
    baseline, *others = paradigms
    header = [name.upper() for name in paradigms] + [f"{name.upper()}/{baseline.upper()}" for name in others]
    print(f"{'':36s} " + " ".join(f"{h:>12s}" for h in header))
    for label, key, fmt in rows:
        base = summary[baseline][key]
        values = [fmt.format(summary[name][key]) for name in paradigms]
        ratios = [f"{summary[name][key] / base:.3f}" if base else "nan" for name in others]
        print(f"{label:36s} " + " ".join(f"{v:>12s}" for v in values + ratios))
    for name in others:
        ratios = ", ".join(f"{r:.3f}" for r in summary["pair_ratios"][name])
        median = summary["pair_ratio_median"][name]
        print(f"median of per-round step-time ratios {name}/{baseline}: {median:.3f} ({ratios})")
    if baseline == "rlvr" and "visurf" in others:
        verdict = "met" if summary["pair_ratio_median"]["visurf"] <= TARGET_RATIO else "NOT met"
        print(f"target ViSurf <= {TARGET_RATIO}x RLVR: {verdict}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML experiment config (G, batch, lengths)")
    parser.add_argument("--model", help="checkpoint folder (default: a randomly initialised tiny Qwen2.5-VL)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps per paradigm first")
    parser.add_argument(
        "--paradigms", default=DEFAULT_PARADIGMS, help="comma-separated registered paradigms, the baseline first"
    )
    parser.add_argument("--pairs", type=int, default=5, help="measured rounds (one step of each paradigm per round)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per worker (1: no spin contention on busy machines)"
    )
    parser.add_argument("--json", help="also write the summary to this file")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. objective.num_rollouts=4")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.pairs < 1:
        parser.error(f"--warmup ({args.warmup}) must be >= 0 and --pairs ({args.pairs}) >= 1")
    from visurf_ray.objectives.paradigms import PARADIGMS

    paradigms = args.paradigms.split(",")
    unknown = [name for name in paradigms if name not in PARADIGMS]
    if unknown or len(set(paradigms)) != len(paradigms) or len(paradigms) < 2:
        parser.error(f"--paradigms {args.paradigms!r}: two or more distinct names of {sorted(PARADIGMS)}")
    if args.model and not Path(args.model).is_dir():
        parser.error(f"--model {args.model!r} is not a checkpoint folder")
    cfg = load_config(args.config, [*args.overrides, f"steps={args.warmup + args.pairs}"])

    with tempfile.TemporaryDirectory(prefix="step-time-") as scratch:
        if args.model:
            model_dir, model_label = Path(args.model), f"checkpoint {args.model}"
        else:
            model_dir = random_tiny_model(Path(scratch) / "model", cfg.seed)
            model_label = "randomly initialised tiny Qwen2.5-VL (TinyVLMSpec defaults; completions run to max length)"
        context = multiprocessing.get_context("spawn")
        workers, setup = {}, {}
        for name in paradigms:
            paradigm_cfg = replace(
                cfg, model=replace(cfg.model, path=str(model_dir)), objective=replace(cfg.objective, paradigm=name)
            )
            parent, child = context.Pipe()
            process = context.Process(target=_worker, args=(paradigm_cfg.to_dict(), args.threads, child), daemon=True)
            process.start()
            workers[name] = (process, parent)
        for name, (_, conn) in workers.items():
            setup[name] = conn.recv()

        runs: dict[str, list[dict]] = {name: [] for name in paradigms}
        started = time.perf_counter()
        for step in range(args.warmup + args.pairs):
            order = paradigms if step % 2 == 0 else paradigms[::-1]
            for name in order:
                workers[name][1].send(step)
                result = workers[name][1].recv()
                if step >= args.warmup:
                    runs[name].append(result)
            print(
                f"[step {step + 1}/{args.warmup + args.pairs}] {time.perf_counter() - started:6.1f}s "
                + " ".join(f"{n}={runs[n][-1]['metrics']['step_time']:.2f}s" for n in paradigms if runs[n]),
                file=sys.stderr,
                flush=True,
            )
        for process, conn in workers.values():
            conn.send(None)
            process.join()

    import torch

    summary = summarise(runs, setup)
    memory_label = "peak CUDA memory" if torch.cuda.is_available() else "peak RSS"
    print(f"model: {model_label}, {setup[paradigms[0]]['parameters']:,} parameters")
    print(
        f"G={cfg.objective.num_rollouts} rollouts, {cfg.data.prompts_per_step} prompts/step, "
        f"max_new_tokens={cfg.rollout.max_new_tokens}, agg={cfg.objective.agg}, deepspeed="
        f"{'ZeRO-' + str(cfg.deepspeed.zero_stage) if cfg.deepspeed.enabled else 'off'}, "
        f"{args.warmup} warm-up + {args.pairs} measured steps each, {args.threads} threads, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'} ({os.cpu_count()} cores)"
    )
    print_table(summary, paradigms, memory_label)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model_label, "config": cfg.to_dict(), **summary}, indent=1))
    return summary


if __name__ == "__main__":
    main()
