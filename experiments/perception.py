"""Perception checks on a base model before any post-training: can it see what its answers were never taught?

Examples:
    python experiments/perception.py                         # the cached tiny base model
    python experiments/perception.py --model /path/to/ckpt   # any local Qwen2.5-VL checkpoint folder
Prints every check's accuracy (chance 0.5) with its 95 % interval over items, the threshold, and whether each
beyond-knowledge slice's concept is visible (`visurf_ray.train.perception`: the deciding check of each concept
reaches the threshold; a verdict whose interval contains the threshold is marked as within item noise).
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)

    from visurf_ray.train.models import resolve_policy
    from visurf_ray.train.perception import DECIDING, PROBE_THRESHOLD, perception_checks

    policy = resolve_policy(ModelConfig(path=args.model))
    results = perception_checks(policy, per_class=args.per_class, per_look=args.per_look, seed=args.seed)
    for name, accuracy in results.items():
        print(f"{name:<28} {accuracy}")
    for concept, check in DECIDING.items():
        accuracy = results[check]
        verdict = "visible" if accuracy.value >= PROBE_THRESHOLD else "NOT visible"
        noise = " (within item noise)" if abs(accuracy.value - PROBE_THRESHOLD) <= accuracy.half_width else ""
        print(f"{concept}: {verdict}{noise} ({check} {accuracy}, threshold {PROBE_THRESHOLD})")
    return results


if __name__ == "__main__":
    main()
