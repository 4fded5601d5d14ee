"""What the two-stage baseline's RL stage does to its SFT policy at the switch. From one SFT-stage policy (the run's
first `stage_starts[1]` steps, trained here in one process), the next RL steps twice: with the optimizer state
reset and the learning-rate schedule restarted (the suite's `sft_rlvr`: the RL stage as a new run on the SFT weights)
and with the SFT stage's AdamW moments carried into the RL stage (one optimizer throughout; the schedule restarts
in both). Per RL step: the rollouts' answer format and reward, the share of groups whose rewards are all equal (no
advantage, no gradient), the gradient norm, and the update's size relative to the weights and to the LR. The check
behind the README's "why SFT→RLVR scores 0":

    python -m analysis.stage_switch --seed 1 steps=300 data.eval_size=100

Imports torch and the suite's trainer; never Ray.
"""

from __future__ import annotations

import argparse
import copy
import random

import pandas as pd
import torch

from visurf_ray.config import ExperimentConfig, load_config
from visurf_ray.train.data import train_dataset
from visurf_ray.train.loop import batch_for_step, step_seed
from visurf_ray.train.trainer import Trainer
from visurf_ray.validation import require

OPTIMIZER_STATES = ("reset", "carried")
"""The RL stage's start: a fresh AdamW (the suite's sft_rlvr) or the SFT stage's moments kept."""


def update_size(before: list[torch.Tensor], after: list[torch.Tensor], lr: float) -> dict[str, float]:
    """The step's update: its norm over the weights' norm (all parameters as one vector), and the mean absolute
    change of a weight in units of the step's learning rate (AdamW's first step from a fresh state: ≈ 1 for every
    weight whose gradient is not 0)."""
    change = torch.cat([(b - a).double().flatten() for a, b in zip(before, after)])
    weights = torch.cat([a.double().flatten() for a in before])
    return {
        "relative_update": float(change.norm() / weights.norm()),
        "update_over_lr": float(change.abs().mean() / lr) if lr else float("nan"),
    }


def measured_step(trainer: Trainer, cfg: ExperimentConfig, dataset, step: int) -> dict[str, float]:
    """Optimizer step `step` of `cfg`'s run (its batch and rollout seed) with its metrics and `update_size`."""
    before = [p.detach().clone() for p in trainer.module.parameters()]
    samples = batch_for_step(dataset, step, cfg.data.prompts_per_step, 0, 1, cfg.seed)
    metrics = trainer.step(step, samples, step_seed(cfg.seed, step, 0))
    after = [p.detach() for p in trainer.module.parameters()]
    return {**metrics, **update_size(before, after, metrics["lr"])}


def stage_switch(cfg: ExperimentConfig, rl_steps: int) -> pd.DataFrame:
    """Train `cfg` (paradigm sft_rlvr, DeepSpeed off: the optimizer state is copied between branches) to its stage
    switch, then `rl_steps` RL steps from that same policy for each of OPTIMIZER_STATES. One row per step: branch
    ("sft" for the SFT stage's last step), step (1-based), the rollouts' answer format and reward, zero-std share,
    gradient norm, lr, relative_update and update_over_lr."""
    require(cfg.objective.paradigm == "sft_rlvr", "objective.paradigm", "must be 'sft_rlvr' (a two-stage run)")
    require(not cfg.deepspeed.enabled, "deepspeed.enabled", "must be false (the branches copy AdamW's state)")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    trainer = Trainer.from_config(cfg)
    require(len(trainer.stage_starts) == 2, "objective.sft_share", "must leave steps to both stages")
    switch = trainer.stage_starts[1]
    require(switch + rl_steps <= cfg.steps, "rl_steps", f"must fit in the run's RL stage ({cfg.steps - switch} steps)")
    dataset = train_dataset(cfg)
    rows = []
    for step in range(switch):
        metrics = measured_step(trainer, cfg, dataset, step)
    rows.append({"branch": "sft", "step": switch, **metrics})
    weights = copy.deepcopy(trainer.module.state_dict())
    optimizer = trainer.engine.torch_optimizer()
    moments = copy.deepcopy(optimizer.state_dict())
    schedule = copy.deepcopy(trainer.engine.scheduler.state_dict())
    for branch in OPTIMIZER_STATES:
        trainer.module.load_state_dict(weights)
        optimizer.load_state_dict(copy.deepcopy(moments))
        trainer.engine.scheduler.load_state_dict(schedule)
        trainer.stage_starts = (0, switch) if branch == "reset" else (0,)
        for step in range(switch, switch + rl_steps):
            rows.append({"branch": branch, "step": step + 1, **measured_step(trainer, cfg, dataset, step)})
    columns = {
        "rollout/answer_format": "answer_format",
        "rollout_reward_mean": "reward",
        "zero_std_fraction": "zero_std",
        "grad_norm": "grad_norm",
        "lr": "lr",
        "relative_update": "relative_update",
        "update_over_lr": "update_over_lr",
    }
    table = pd.DataFrame(rows).reindex(columns=["branch", "step", *columns]).rename(columns=columns)
    return table


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the experiment config (steps=300)")
    parser.add_argument("--config", default="experiments/configs/tiny_cpu.yaml", help="YAML experiment config")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed")
    parser.add_argument("--rl-steps", type=int, default=10, help="RL steps after the switch, per branch")
    args = parser.parse_args(argv)
    fixed = [f"seed={args.seed}", "objective.paradigm=sft_rlvr", "deepspeed.enabled=false", "log_to=[]"]
    table = stage_switch(load_config(args.config, [*fixed, *args.overrides]), args.rl_steps)
    print(table.round(4).to_string(index=False))
    return table


if __name__ == "__main__":
    main()
