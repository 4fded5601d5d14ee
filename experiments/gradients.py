"""Check ViSurf's gradient identities (float64) and summarise the SFT, RLVR and ViSurf gradients by group outcome over
a policy's or a training run's checkpoints (`analysis.gradients`).

Examples:
    python experiments/gradients.py                              # the cached tiny base model
    python experiments/gradients.py --checkpoint PATH --out DIR  # PATH: a policy folder or a LocalSession run folder
Prints the identity residuals and the per-outcome means; with --out also writes gradients.csv and three plots.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from analysis.gradient_identities import outcome_summary, residual_summary
from analysis.gradient_plots import plot_cosines, plot_label_share, plot_residuals
from analysis.gradients import GradientCheckConfig, analyse_checkpoints
from visurf_ray.config import TINY_BASE_MODEL
from visurf_ray.data.benchmark import make_split


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    """CLI: sample groups at every checkpoint, print the residual and outcome summaries; with --out, also write
    gradients.csv and the three plots there. Returns the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", default=TINY_BASE_MODEL, help="policy folder, LocalSession run folder, or 'tiny-base' (default)"
    )
    parser.add_argument("--split", default="eval/grounding", help="benchmark split of the prompts")
    parser.add_argument("--prompts", type=int, default=4, help="number of prompts")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the benchmark split")
    parser.add_argument("--num-rollouts", type=int, default=GradientCheckConfig.num_rollouts)
    parser.add_argument("--max-new-tokens", type=int, default=GradientCheckConfig.max_new_tokens)
    parser.add_argument("--temperature", type=float, default=GradientCheckConfig.temperature)
    parser.add_argument("--seed", type=int, default=GradientCheckConfig.seed, help="sampling seed")
    parser.add_argument("--population-std", action="store_true", help="population std (default: unbiased)")
    parser.add_argument("--no-smoothing", action="store_true", help="turn reward smoothing off")
    parser.add_argument("--out", type=Path, help="folder for gradients.csv and the plots")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (1: fastest for the tiny models' small ops)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = GradientCheckConfig(
        num_rollouts=args.num_rollouts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        seed=args.seed,
        unbiased_std=not args.population_std,
        smoothing=not args.no_smoothing,
    )
    table = analyse_checkpoints(args.checkpoint, make_split(args.split, args.prompts, args.data_seed), cfg)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print("Identity residuals (relative, float64):")
        print(residual_summary(table).to_string())
        print("\nBy checkpoint step and group outcome:")
        print(outcome_summary(table).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "gradients.csv", index=False)
        for name, plot in (("label_share", plot_label_share), ("cosines", plot_cosines), ("residuals", plot_residuals)):
            plot(table).savefig(args.out / f"{name}.png", dpi=120)
        print(f"\nwrote {args.out / 'gradients.csv'} and plots")
    return table


if __name__ == "__main__":
    main()
