"""Learning-rate schedules: linear warmup, then a registered decay shape, for the trainer (`StagedSchedule`, one
schedule per training stage) and the tiny base model's pretraining (`PretrainConfig.lr_at`).

Imports only the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from visurf_ray.validation import check_choice, require

DecayShape = Callable[[float], float]
LR_SCHEDULES: dict[str, DecayShape] = {}
"""Decay shapes by name: `progress -> factor`, progress in [0, 1] of the decay, factor 1.0 at progress 0."""


def register_lr_schedule(name: str):
    """Register a decay shape `progress -> factor` under `name` (see LR_SCHEDULES)."""

    def wrap(shape: DecayShape) -> DecayShape:
        LR_SCHEDULES[name] = shape
        return shape

    return wrap


@register_lr_schedule("constant")
def constant_schedule(progress: float) -> float:
    return 1.0


@register_lr_schedule("linear")
def linear_schedule(progress: float) -> float:
    return 1.0 - progress


@register_lr_schedule("cosine")
def cosine_schedule(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_at(step: float, *, peak: float, warmup: int, decay_end: int, shape: str, final_ratio: float) -> float:
    """Learning rate of update `step` (0-based): peak·(step + 1)/warmup during the `warmup` steps, then
    peak·(final_ratio + (1 − final_ratio)·factor), factor the decay `shape` (a name in LR_SCHEDULES) at progress
    (step − warmup)/(decay_end − warmup), held at 1 from step `decay_end` on. peak = 1 gives a multiplier of the
    optimizer's learning rate (`StagedSchedule`)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(decay_end - warmup, 1)
    factor = LR_SCHEDULES[shape](min(progress, 1.0))
    return peak * (final_ratio + (1.0 - final_ratio) * factor)


@dataclass(frozen=True)
class StagedSchedule:
    """LR multiplier of a run made of stages (e.g. SFT then RLVR): each stage starting at a step of `starts` (0 first,
    increasing) runs its own warmup and `shape` (a name in LR_SCHEDULES) over its own length, as a separate run would;
    the decay reaches `final_ratio` at the stage's end (one step past its last). A picklable callable, so that
    LambdaLR's state_dict keeps it."""

    total: int
    warmup: int
    starts: tuple[int, ...] = (0,)
    shape: str = "cosine"
    final_ratio: float = 0.1

    def __post_init__(self):
        require(
            self.starts and self.starts[0] == 0 and list(self.starts) == sorted(set(self.starts)),
            "stage starts",
            f"must be increasing and begin at 0, got {self.starts}",
        )
        require(
            self.starts[-1] < max(self.total, 1),
            f"stage starts {self.starts}",
            f"must lie below the total of {self.total} steps",
        )
        check_choice("schedule shape", self.shape, sorted(LR_SCHEDULES))

    def __call__(self, step: int) -> float:
        start = max(s for s in self.starts if s <= step)
        later = [s for s in self.starts if s > step]
        end = later[0] if later else self.total
        return lr_at(
            step - start,
            peak=1.0,
            warmup=self.warmup,
            decay_end=end - start,
            shape=self.shape,
            final_ratio=self.final_ratio,
        )
