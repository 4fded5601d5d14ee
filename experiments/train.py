"""Run one experiment: `python experiments/train.py [--config FILE] key=value ...`.

Examples:
    python experiments/train.py paradigm=visurf                  # tiny CPU default, in this process
    python experiments/train.py --config experiments/configs/tiny_cpu.yaml objective.smoothing=false
    python experiments/train.py ray.num_workers=2 deepspeed.zero_stage=2   # Ray Train, 2 CPU workers
`paradigm=...` is short for `objective.paradigm=...`. Prints progress per step and the final metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from visurf_ray.config import ConfigError, load_config
from visurf_ray.interrupts import Interrupts

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "tiny_cpu.yaml"
SHORTHANDS = {"paradigm": "objective.paradigm"}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML experiment config")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys (objective.num_rollouts=4)")
    args = parser.parse_args(argv)
    overrides = []
    for text in args.overrides:
        key, sep, value = text.partition("=")
        overrides.append(f"{SHORTHANDS.get(key, key)}{sep}{value}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as error:
        parser.error(str(error))
    from visurf_ray.train.launcher import launch, run_dir

    with Interrupts() as interrupts:
        try:
            metrics = launch(cfg)
        except KeyboardInterrupt:
            interrupts.received = interrupts.received or signal.SIGINT
            print(
                f"{interrupts.name}: run stopped; its checkpoints are kept under {run_dir(cfg)} and the same command "
                "resumes it",
                file=sys.stderr,
                flush=True,
            )
            raise SystemExit(interrupts.exit_code) from None
    print(json.dumps({k: metrics[k] for k in sorted(metrics)}, indent=1))
    return metrics


if __name__ == "__main__":
    main()
