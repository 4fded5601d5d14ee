"""Perception checks on a base model before any post-training: can it see what its answers were never taught?

Examples:
    python experiments/perception.py                         # the cached tiny base model
    python experiments/perception.py --model /path/to/ckpt   # any local Qwen2.5-VL checkpoint folder
    python experiments/perception.py --model runs/base-gpu --json runs/base-gpu/perception.json   # also as JSON
Prints every check's accuracy (chance 0.5) with its 95 % interval over items, the threshold, and whether each
beyond-knowledge slice's concept is visible (`visurf_ray.train.perception`: the deciding check of each concept
reaches the threshold; a verdict whose interval contains the threshold is marked as within item noise).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from visurf_ray.config import TINY_BASE_MODEL, ModelConfig

if TYPE_CHECKING:
    from visurf_ray.train.perception import Accuracy


def main(argv: list[str] | None = None) -> dict[str, Accuracy]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=TINY_BASE_MODEL, help="checkpoint folder, or tiny-base")
    parser.add_argument("--per-class", type=int, default=300, help="items per class of each concept")
    parser.add_argument("--per-look", type=int, default=100, help="items per class and look of the per-look probe")
    parser.add_argument("--seed", type=int, default=0, help="seed of the items and the cross-validation folds")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per greedy answer")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "auto"),
        help="weights' dtype (auto: bf16 on CUDA)",
    )
    parser.add_argument("--json", type=Path, help="also write {check: {value, half_width, groups}} and verdicts here")
    args = parser.parse_args(argv)

    from visurf_ray.train.models import resolve_policy
    from visurf_ray.train.perception import DECIDING, PROBE_THRESHOLD, perception_checks

    policy = resolve_policy(ModelConfig(path=args.model, dtype=args.dtype))
    results = perception_checks(
        policy, per_class=args.per_class, per_look=args.per_look, seed=args.seed, max_new_tokens=args.max_new_tokens
    )
    for name, accuracy in results.items():
        print(f"{name:<28} {accuracy}")
    verdicts = {}
    for concept, check in DECIDING.items():
        accuracy = results[check]
        verdicts[concept] = accuracy.value >= PROBE_THRESHOLD
        verdict = "visible" if verdicts[concept] else "NOT visible"
        noise = " (within item noise)" if abs(accuracy.value - PROBE_THRESHOLD) <= accuracy.half_width else ""
        print(f"{concept}: {verdict}{noise} ({check} {accuracy}, threshold {PROBE_THRESHOLD})")
    if args.json is not None:
        checks = {name: accuracy.as_dict() for name, accuracy in results.items()}
        summary = {"model": str(args.model), "per_class": args.per_class, "seed": args.seed, "dtype": args.dtype}
        summary |= {"threshold": PROBE_THRESHOLD, "checks": checks, "visible": verdicts}
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
