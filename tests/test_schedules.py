"""The learning-rate schedules (visurf_ray/train/schedules.py) give, bit for bit, the values of the formulas they
replaced in the trainer (per-stage warmup + cosine to 10% / constant) and in pretraining (warmup + a decay shape to
the final ratio at the last step), at every step of the pretraining recipe and of every shipped trainer config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from visurf_ray.config import load_config
from visurf_ray.objectives.paradigms import get_paradigm
from visurf_ray.sweep import load_sweep
from visurf_ray.train.pretrain import PretrainConfig
from visurf_ray.train.schedules import StagedSchedule

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"


def reference_trainer_multiplier(step: int, total: int, warmup: int, starts: tuple[int, ...], shape: str) -> float:
    """The trainer's multiplier as written before the merge: the stage's own warmup, then cosine to 10% at the stage's
    end (one past its last step) or constant 1."""
    start = max(s for s in starts if s <= step)
    later = [s for s in starts if s > step]
    step, total = step - start, (later[0] if later else total) - start
    if shape == "constant":
        return (step + 1) / warmup if step < warmup else 1.0
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def reference_pretrain_lr(cfg: PretrainConfig, step: int) -> float:
    """Pretraining's learning rate as written before the merge."""
    shapes = {
        "constant": lambda progress: 1.0,
        "linear": lambda progress: 1.0 - progress,
        "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    }
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps - 1, 1)
    factor = shapes[cfg.schedule](min(progress, 1.0))
    return cfg.lr * (cfg.final_lr_ratio + (1.0 - cfg.final_lr_ratio) * factor)


PRETRAIN_RECIPES = {
    "default": PretrainConfig(),
    "linear, final 0.1": PretrainConfig(steps=113, lr=1e-3, warmup_steps=10, schedule="linear", final_lr_ratio=0.1),
    "constant": PretrainConfig(steps=50, lr=3e-3, warmup_steps=7, schedule="constant"),
    "cosine, final 0.1": PretrainConfig(steps=110, lr=1e-3, warmup_steps=10, final_lr_ratio=0.1),
    "no warmup": PretrainConfig(steps=40, warmup_steps=0),
}


@pytest.mark.parametrize("name", sorted(PRETRAIN_RECIPES))
def test_pretraining_learning_rate_equals_the_former_formula_at_every_step(name):
    cfg = PRETRAIN_RECIPES[name]
    assert [cfg.lr_at(step) for step in range(cfg.steps)] == [reference_pretrain_lr(cfg, s) for s in range(cfg.steps)]


def trainer_configs() -> dict[str, object]:
    """Every experiment config and every variant of every sweep file, as the trainer would run them."""
    configs = {path.name: load_config(path, []) for path in CONFIGS.glob("*.yaml") if not path.name.startswith("sweep")}
    for path in CONFIGS.glob("sweep*.yaml"):
        sweep = load_sweep(path)
        for variant in sweep.variants:
            configs[f"{path.name}:{variant}"] = sweep.trial_config({"variant": variant, "seed": sweep.seeds[0]})
    return configs


def test_trainer_multiplier_equals_the_former_formula_at_every_step_of_every_config():
    configs = trainer_configs()
    assert len(configs) > 20 and {cfg.optim.schedule for cfg in configs.values()} == {"cosine", "constant"}
    for name, cfg in configs.items():
        starts = get_paradigm(cfg.objective.paradigm).stage_starts(cfg.steps, cfg.objective)
        for warmup in sorted({cfg.optim.warmup_steps, 3}):  # the shipped configs have no warmup; 3 covers it
            schedule = StagedSchedule(cfg.steps, warmup, starts, cfg.optim.schedule)
            expected = [
                reference_trainer_multiplier(s, cfg.steps, warmup, starts, cfg.optim.schedule) for s in range(cfg.steps)
            ]
            assert [schedule(step) for step in range(cfg.steps)] == expected, (name, warmup)


@pytest.mark.parametrize("shape", ["cosine", "constant"])
def test_trainer_multiplier_equals_the_former_formula_across_stage_layouts(shape):
    for total, warmup, starts in [(24, 0, (0,)), (24, 4, (0, 12)), (10, 2, (0, 4)), (7, 7, (0, 3, 5)), (1, 0, (0,))]:
        schedule = StagedSchedule(total, warmup, starts, shape)
        expected = [reference_trainer_multiplier(s, total, warmup, starts, shape) for s in range(total)]
        assert [schedule(step) for step in range(total)] == expected
