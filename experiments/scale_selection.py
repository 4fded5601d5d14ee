"""Does scale make the no-object concept visible to the tiny base model? Variants of the base model (sizes, steps,
batch) pretrained side by side on one device, each followed by the perception checks.

At the default size no recipe tried on 2 cores passes the no-object check: the model reads the question and sees the
objects but does not select objects by the question (README, "Where selection fails"). Scale is the lever left;
this script measures it where a GPU allows. Every variant trains in its own process: the recipe's control at its
own 1,100 steps, and the others for as many steps as `--train-budget-s` allows at their measured step time (rounded
down to 100, at least the curriculum plus 100). Each variant then writes `<out>/<variant>/result.json`: its
config, steps, seconds per step, base-model scores (`pretrain_report.json` beside it) and every perception check;
a table of the deciding figures is printed at the end. Models trained on CUDA are reproducible only up to its
kernels' nondeterminism; none of them replaces the cached CPU base model.

Examples:
    python experiments/scale_selection.py --device cuda --out "$OUT"     # the lent GPU machine (scale_selection.sh)
    python experiments/scale_selection.py --device cpu --smoke --out /tmp/scale   # the script's own check, ~3 min
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from visurf_ray.train.pretrain import PretrainConfig

VARIANTS_FILE = "variants.json"
RESULT_FILE = "result.json"
SMOKE_STEPS = 30  # steps of every variant in --smoke (each curriculum stage cut to 10)
SMOKE_TOKENS = 16  # new tokens per greedy answer in --smoke


@dataclass(frozen=True)
class Variant:
    """A base-model variant: TinyVLMSpec fields to change, batch size and peak lr; `steps` fixed, or None to fill the
    training budget."""

    spec: dict = field(default_factory=dict)
    batch_size: int = 32
    lr: float = 4e-3
    steps: int | None = None


WIDE = {"text_hidden": 256, "text_heads": 4, "text_kv_heads": 2, "text_mlp": 1024}
VARIANTS = {
    "recipe": Variant(steps=1100),  # the cached base model's recipe: the control
    "long": Variant(),
    "long-batch128": Variant(batch_size=128),
    "wide-long": Variant(spec=WIDE, lr=2e-3),
    "wide-deep-long": Variant(spec={**WIDE, "text_layers": 8}, lr=2e-3),
    "wider-deep-long": Variant(
        spec={"text_hidden": 512, "text_heads": 8, "text_kv_heads": 2, "text_mlp": 2048, "text_layers": 8}, lr=1e-3
    ),
}
"""Variants run by default (head_dim stays 64, as vLLM needs). Peak lr 4e-3 · 128 / text_hidden: at 256 and the
recipe's 4e-3 the model learnt no boxes in 1,100 steps (IoU>0.5 0.02; README, "Where selection fails")."""
DECIDING_COLUMNS = (
    "no_object_count_answer",
    "query_selection_answer",
    "query_selection_by_objects",
    "query_binding",
    "query_reading",
    "empty_image_all_think",
    "anomaly_image",
)


def seconds_per_step(cfg: PretrainConfig, device: str, *, warmup: int = 3, measured: int = 12) -> float:
    """Mean wall seconds of one pretraining update of `cfg`'s model and batch size on `device`, on whole-mix batches
    (longer than the first stages': an upper bound for the run)."""
    import torch

    from visurf_ray.data.benchmark import make_split
    from visurf_ray.train.pretrain import sft_update, untrained_policy

    torch.set_num_threads(cfg.threads)
    policy = untrained_policy(cfg, device)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=cfg.lr)
    items = make_split("pretrain", cfg.batch_size * (warmup + measured), cfg.seed + 1)
    batches = [items[i : i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    for batch in batches[:warmup]:
        sft_update(policy, optimizer, batch, groups=cfg.length_groups, grad_clip=cfg.grad_clip)
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for batch in batches[warmup:]:
        sft_update(policy, optimizer, batch, groups=cfg.length_groups, grad_clip=cfg.grad_clip)
    if policy.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / measured


def budget_steps(budget_s: float, step_seconds: float, curriculum_steps: int) -> int:
    """Steps that fit `budget_s` at `step_seconds` each, rounded down to 100, at least the curriculum's plus 100."""
    return max(curriculum_steps + 100, math.floor(budget_s / step_seconds / 100) * 100)


def run_variant(name: str, variant: Variant, args: argparse.Namespace) -> dict:
    """Pretrain `variant` into `<out>/<name>`, run the perception checks on it, write and return its result."""
    import torch

    from visurf_ray.models import TinyVLMSpec, load_policy
    from visurf_ray.train.perception import perception_checks
    from visurf_ray.train.pretrain import REPORT_FILE, CurriculumStage, PretrainConfig, pretrain_base

    cfg = PretrainConfig(
        spec=TinyVLMSpec(**variant.spec), batch_size=variant.batch_size, lr=variant.lr, threads=args.threads
    )
    if args.smoke:
        first, second = cfg.curriculum
        stages = (replace(first, steps=10), CurriculumStage(10, second.kinds))
        cfg = replace(cfg, curriculum=stages, corpus_size=200, eval_size=4, eval_max_new_tokens=SMOKE_TOKENS)
        cfg = replace(cfg, rollout_prompts=2, rollout_samples=2)
    step_seconds = seconds_per_step(cfg, args.device)
    curriculum_steps = sum(stage.steps for stage in cfg.curriculum)
    if args.smoke:
        steps = SMOKE_STEPS
    elif variant.steps is not None:
        steps = variant.steps
    else:
        steps = budget_steps(args.train_budget_s, step_seconds, curriculum_steps)
    cfg = replace(cfg, steps=steps)
    folder = args.out / name
    pretrain_base(cfg, folder, device=args.device, log=lambda line: print(f"[{name}] {line}", flush=True))
    policy = load_policy(folder, dtype=torch.float32, device=args.device)
    start = time.perf_counter()
    checks = perception_checks(
        policy, per_class=args.per_class, per_look=args.per_look, seed=0, max_new_tokens=cfg.eval_max_new_tokens
    )
    result = {
        "variant": name,
        "definition": asdict(variant),
        "device": args.device,
        "parameters": sum(p.numel() for p in policy.model.parameters()),
        "steps": steps,
        "seconds_per_step": round(step_seconds, 4),
        "perception_seconds": round(time.perf_counter() - start, 1),
        "pretrain_report": json.loads((folder / REPORT_FILE).read_text()),
        "per_class": args.per_class,
        "checks": {check: accuracy.as_dict() for check, accuracy in checks.items()},
    }
    (folder / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


def summary_table(results: list[dict]) -> str:
    """The deciding figures of `results` side by side, one row per variant (check values ± 95 % half-widths)."""
    header = ["variant", "params", "steps", "s/step", "train s", "IoU>0.5", "count", *DECIDING_COLUMNS]
    rows = [" | ".join(header)]
    for result in results:
        report = result["pretrain_report"]
        scores = report["scores"]
        checks = result["checks"]
        figures = [
            "n/a" if checks[c]["value"] is None else f"{checks[c]['value']:.3f} ± {checks[c]['half_width']:.3f}"
            for c in DECIDING_COLUMNS
        ]
        row = [
            result["variant"],
            f"{result['parameters']:,}",
            str(result["steps"]),
            f"{result['seconds_per_step']:.3f}",
            f"{report['train_seconds']:.0f}",
            f"{scores['eval/grounding/iou50']:.2f}",
            f"{scores['eval/count/score']:.2f}",
            *figures,
        ]
        rows.append(" | ".join(row))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="torch device every variant trains on")
    parser.add_argument("--out", type=Path, required=True, help="folder for the variants' models and results")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), help="which to run")
    parser.add_argument("--train-budget-s", type=float, default=300.0, help="pretraining seconds per budget variant")
    parser.add_argument("--deadline-s", type=float, default=540.0, help="wall seconds; then unfinished variants stop")
    parser.add_argument("--per-class", type=int, default=300, help="perception items per class")
    parser.add_argument("--per-look", type=int, default=50, help="per-look probe items per class and look")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per variant")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_STEPS} steps each, tiny evaluations")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # a worker process: run this one variant
    args = parser.parse_args(argv)
    if args.smoke:
        args.per_class, args.per_look = min(args.per_class, 10), min(args.per_look, 5)
    if args.variant is not None:
        return [run_variant(args.variant, VARIANTS[args.variant], args)]

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / VARIANTS_FILE).write_text(json.dumps({n: asdict(VARIANTS[n]) for n in args.variants}, indent=2) + "\n")
    forwarded = ["--device", args.device, "--out", str(args.out), "--train-budget-s", str(args.train_budget_s)]
    forwarded += ["--per-class", str(args.per_class), "--per-look", str(args.per_look), "--threads", str(args.threads)]
    forwarded += ["--smoke"] if args.smoke else []
    workers = {}
    for name in args.variants:
        log = (args.out / f"{name}.log").open("w")
        command = [sys.executable, __file__, *forwarded, "--variant", name]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        workers[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + args.deadline_s
    for name, worker in workers.items():
        try:
            worker.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        print(f"{name}: exit code {worker.returncode} (log {args.out / f'{name}.log'})", flush=True)
    results = [
        json.loads(path.read_text())
        for path in (args.out / name / RESULT_FILE for name in args.variants)
        if path.is_file()
    ]
    table = summary_table(results)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)
    unfinished = [name for name in args.variants if not (args.out / name / RESULT_FILE).is_file()]
    if unfinished:
        print(f"unfinished (killed at the deadline or failed; see their logs): {', '.join(unfinished)}")
    return results


if __name__ == "__main__":
    main()
