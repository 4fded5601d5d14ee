"""Which samples a run trains and evaluates on: offline benchmark splits by name, or local files in the ViSurf
(training) and gRefCOCO (evaluation, prefix `grefcoco:`) formats. Never imports Ray."""

from __future__ import annotations

from pathlib import Path

from visurf_ray.config import ExperimentConfig
from visurf_ray.data.benchmark import make_split, make_stratified_split
from visurf_ray.data.frames import to_model_frame
from visurf_ray.data.loaders import load_grefcoco_eval, load_visurf_rows
from visurf_ray.data.sample import Sample

EVAL_SEED = 0
"""Evaluation sets do not depend on the run's seed, so every trial of a sweep is scored on the same items."""

DATA_FILE_SUFFIXES = (".parquet", ".jsonl")


def _is_file_split(name: str) -> bool:
    return name.startswith("grefcoco:") or Path(name).suffix in DATA_FILE_SUFFIXES


def _in_model_frame(cfg: ExperimentConfig, samples: list[Sample]) -> list[Sample]:
    """`samples` resized to the model's frame (`data.frames.to_model_frame`) when `data.image_side` is set."""
    side = cfg.data.image_side
    return [to_model_frame(s, side) for s in samples] if side else samples


def train_dataset(cfg: ExperimentConfig) -> list[Sample]:
    """The training prompts: the benchmark split `data.train_split` (steps × prompts_per_step fresh items, seeded by
    the run's seed), or every row of a local ViSurf-format file; in the model's frame (`data.image_side`)."""
    name = cfg.data.train_split
    if _is_file_split(name):
        return _in_model_frame(cfg, load_visurf_rows(name).samples)
    return _in_model_frame(cfg, make_split(name, cfg.steps * cfg.data.prompts_per_step, cfg.seed))


def eval_sets(cfg: ExperimentConfig) -> dict[str, list[Sample]]:
    """Each of `data.eval_splits`: `data.eval_size` benchmark items of each of its slices (seed EVAL_SEED;
    `make_stratified_split`), or a local file's rows (`grefcoco:<path>` for the gRefCOCO evaluation format, else the
    ViSurf format); in the model's frame (`data.image_side`; evaluation scores in each image's own frame)."""
    sets = {}
    for name in cfg.data.eval_splits:
        if name.startswith("grefcoco:"):
            sets[name] = load_grefcoco_eval(name.removeprefix("grefcoco:")).samples
        elif _is_file_split(name):
            sets[name] = load_visurf_rows(name).samples
        else:
            sets[name] = make_stratified_split(name, cfg.data.eval_size, EVAL_SEED)
    return {name: _in_model_frame(cfg, samples) for name, samples in sets.items()}
