"""Pretrain the tiny base model (SFT on the benchmark's "pretrain" mix) and print its scores per task.

Examples:
    python experiments/pretrain_base.py                   # the cached default model: built once, then reused
    python experiments/pretrain_base.py --force           # rebuild the cached default model
    python experiments/pretrain_base.py --steps 300 --out runs/base-300   # another recipe, into a folder
    python experiments/pretrain_base.py --spec rope_theta=1000 text_heads=4 text_kv_heads=2 --out runs/base-theta
        # another model (TinyVLMSpec fields; values in YAML), then: python experiments/perception.py --model runs/...
    python experiments/pretrain_base.py --device cuda --steps 3300 --out runs/base-gpu   # on a GPU (float32)
The cache root is --cache-dir, else $VISURF_CACHE, else ~/.cache/visurf_ray; the folder name holds the recipe's hash.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields, replace
from pathlib import Path

import yaml

from visurf_ray.models.tiny import TinyVLMSpec
from visurf_ray.train.pretrain import REPORT_FILE, PretrainConfig, ensure_base_model, pretrain_base
from visurf_ray.validation import ValidationError

HEADLINES = {
    "format (think + answer)": ["eval/{set}/mean_thinking_format", "eval/{set}/mean_answer_format"],
    "score": ["eval/{set}/score"],
}


def print_report(report: dict) -> None:
    """Print the headline scores of a `pretrain_report.json` per task, then the rollout outcomes and the wall time."""
    scores = report["scores"]
    print(f"{'set':<10} {'thinking_format':>15} {'answer_format':>13} {'score':>7}  task metric")
    for name in ("grounding", "gui_point", "anomaly", "count", "no_object"):
        extras = {"grounding": ("iou50",), "no_object": ("n_acc", "n_acc_empty_image")}.get(name, ())
        row = [
            scores.get(f"eval/{name}/{metric}", float("nan"))
            for metric in ("mean_thinking_format", "mean_answer_format", "score")
        ]
        detail = "".join(f"  {extra} {scores.get(f'eval/{name}/{extra}', float('nan')):.3f}" for extra in extras)
        print(f"{name:<10} {row[0]:>15.3f} {row[1]:>13.3f} {row[2]:>7.3f}{detail}")
    print(
        "rollout groups (8 samples, temperature 1, posttrain grounding): "
        + ", ".join(
            f"{key.removeprefix('rollout/')} {value:.2f}" for key, value in scores.items() if key.startswith("rollout/")
        )
    )
    print(f"pretraining {report['train_seconds']:.0f} s, evaluation {report['eval_seconds']:.0f} s")
    if "weights_sha256" in report:  # reports of builds before the fields were added lack them
        built = ", ".join(f"{key} {value}" for key, value in report["numerics"].items())
        print(f"weights sha256 {report['weights_sha256']} (built with {built})")


def spec_with(spec: TinyVLMSpec, overrides: list[str]) -> TinyVLMSpec:
    """`spec` with `key=value` overrides of its fields (values parsed as YAML: `1000.0`, `[1]`); ValidationError
    naming an unknown field, a malformed override or a value the spec rejects."""
    names = {f.name for f in fields(TinyVLMSpec)}
    changes = {}
    for text in overrides:
        key, sep, value = text.partition("=")
        if not sep or key not in names:
            raise ValidationError(f"--spec {text!r} must be key=value with key one of {sorted(names)}")
        parsed = yaml.safe_load(value)
        changes[key] = tuple(parsed) if isinstance(parsed, list) else parsed
    return replace(spec, **changes)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = PretrainConfig()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the data stream and the weights")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="items per step")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    parser.add_argument("--threads", type=int, default=defaults.threads, help="torch threads")
    parser.add_argument("--device", default="cpu", help="torch device to train on (the cache holds CPU-trained models)")
    parser.add_argument("--spec", nargs="+", default=[], metavar="KEY=VALUE", help="TinyVLMSpec fields to change")
    parser.add_argument("--out", type=Path, help="train into this folder instead of the cache (must not exist)")
    parser.add_argument("--cache-dir", type=Path, help="cache root (default $VISURF_CACHE or ~/.cache/visurf_ray)")
    parser.add_argument("--force", action="store_true", help="rebuild the cached model even if present")
    args = parser.parse_args(argv)
    try:
        cfg = replace(
            defaults,
            steps=args.steps,
            seed=args.seed,
            batch_size=args.batch_size,
            lr=args.lr,
            threads=args.threads,
            spec=spec_with(defaults.spec, args.spec),
        )
    except ValueError as error:
        parser.error(str(error))
    if args.out is not None:
        if args.out.exists():
            parser.error(f"--out {args.out} already exists")
        pretrain_base(cfg, args.out, device=args.device)
        folder = args.out
    elif args.device != "cpu":
        parser.error(
            f"--device {args.device} needs --out: the cache holds CPU-trained models (equal recipe, equal bits)"
        )
    else:
        folder = ensure_base_model(args.cache_dir, cfg, force=args.force)
    report = json.loads((folder / REPORT_FILE).read_text())
    print(f"base model: {folder}")
    print_report(report)
    return report


if __name__ == "__main__":
    main()
