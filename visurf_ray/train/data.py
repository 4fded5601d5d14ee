"""Which samples a run trains and evaluates on: offline benchmark splits by name, or local files in the ViSurf
(training) and gRefCOCO (evaluation, prefix `grefcoco:`) formats. Never imports Ray."""

from __future__ import annotations

from pathlib import Path

from visurf_ray.config import ExperimentConfig
from visurf_ray.data.benchmark import make_split, make_stratified_split
from visurf_ray.data.loaders import load_grefcoco_eval, load_visurf_rows
from visurf_ray.data.sample import Sample

EVAL_SEED = 0
"""Evaluation sets do not depend on the run's seed, so every trial of a sweep is scored on the same items."""

DATA_FILE_SUFFIXES = (".parquet", ".jsonl")


def _is_file_split(name: str) -> bool:
    return name.startswith("grefcoco:") or Path(name).suffix in DATA_FILE_SUFFIXES


def train_dataset(cfg: ExperimentConfig) -> list[Sample]:
    """The training prompts: the benchmark split `data.train_split` (steps × prompts_per_step fresh items, seeded by
    the run's seed), or every row of a local ViSurf-format file."""
    name = cfg.data.train_split
    if _is_file_split(name):
        return load_visurf_rows(name).samples
    return make_split(name, cfg.steps * cfg.data.prompts_per_step, cfg.seed)


def eval_sets(cfg: ExperimentConfig) -> dict[str, list[Sample]]:
    """Each of `data.eval_splits`: `data.eval_size` benchmark items of each of its slices (seed EVAL_SEED;
    `make_stratified_split`), or a local file's rows (`grefcoco:<path>` for the gRefCOCO evaluation format, else the
    ViSurf format)."""
    sets = {}
    for name in cfg.data.eval_splits:
        if name.startswith("grefcoco:"):
            sets[name] = load_grefcoco_eval(name.removeprefix("grefcoco:")).samples
        elif _is_file_split(name):
            sets[name] = load_visurf_rows(name).samples
        else:
            sets[name] = make_stratified_split(name, cfg.data.eval_size, EVAL_SEED)
    return sets
