"""Sweep results as tidy pandas tables, the paper-style summary, and plots.

`experiments/sweep.py` writes `results/<experiment>/results.{csv,parquet}` (one row per trial × eval set × metric,
config columns flattened as `config/<dotted key>`), `history.{csv,parquet}` (one row per trial × training step) and
`items.{csv,parquet}` (one row per trial × evaluation step × eval item: its slice and per-item values, what
`analysis.intervals` bootstraps); `load_results` / `load_history` / `load_items` read them back for notebooks.
Imports pandas and matplotlib; never Ray.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

PARADIGM_ORDER = ("sft", "rlvr", "sft_rlvr", "luffy", "chord", "visurf")
PARADIGM_NAMES = {
    "sft": "SFT",
    "rlvr": "RLVR",
    "sft_rlvr": "SFT-RLVR",
    "luffy": "LUFFY",
    "chord": "CHORD",
    "visurf": "ViSurf",
}
CURVES = (
    "rollout/overall",
    "label/overall",
    "label_advantage_mean",
    "all_fail_fraction",
    "smoothing_fired_fraction",
    "smoothing_condition_fraction",
    "eval/grounding/logp_empty_no_object",
    "eval/grounding/logp_empty_empty_image",
    "eval/grounding/logp_empty_object",
)


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = tuple(value) if isinstance(value, list) else value
    return flat


def tidy_trial(
    trial_id: str, variant: str, config: Mapping[str, Any], final_metrics: Mapping[str, float]
) -> pd.DataFrame:
    """One trial's final eval metrics as rows (trial_id, variant, paradigm, seed, eval_set, metric, value, config/…).

    config: the trial's `ExperimentConfig.to_dict()`; final_metrics: its last report (`eval/<set>/<metric>` keys,
    sets may contain '/', e.g. `eval/retained/count/accuracy`; `eval/mean_score` becomes eval_set "mean")."""
    rows = []
    for key, value in final_metrics.items():
        if not key.startswith("eval/") or not isinstance(value, int | float):
            continue
        name = key.removeprefix("eval/")
        eval_set, metric = ("mean", "score") if name == "mean_score" else tuple(name.rsplit("/", 1))
        rows.append({"eval_set": eval_set, "metric": metric, "value": float(value)})
    frame = pd.DataFrame(rows, columns=["eval_set", "metric", "value"])
    frame.insert(0, "trial_id", trial_id)
    frame.insert(1, "variant", variant)
    frame.insert(2, "paradigm", config["objective"]["paradigm"])
    frame.insert(3, "seed", int(config["seed"]))
    for key, value in _flatten(config).items():
        frame[f"config/{key}"] = str(value) if isinstance(value, tuple) else value
    return frame


def tidy_history(trial_id: str, variant: str, seed: int, history: pd.DataFrame) -> pd.DataFrame:
    """A trial's per-step reports (Tune's metrics dataframe) reduced to step, prompts seen, time, training curves and
    the latest evaluation's metrics (`eval/...`, with `eval_step` saying which step it evaluated)."""
    keep = ["step", "prompts_seen", "generated_tokens", "step_time", "step_cpu_time", "generated_tokens_total"]
    keep += ["train_time_total", "eval_time_total"]
    keep += [*CURVES, "lr", "loss", "entropy", "eval_step"]
    keep += [c for c in history.columns if c.startswith("eval/") and c not in keep]
    frame = history[[c for c in keep if c in history.columns]].copy()
    frame.insert(0, "trial_id", trial_id)
    frame.insert(1, "variant", variant)
    frame.insert(2, "seed", seed)
    return frame


def tidy_items(trial_id: str, variant: str, paradigm: str, seed: int, rows: Iterable[Mapping]) -> pd.DataFrame:
    """A trial's per-item evaluation rows (`visurf_ray.train.loop.EVAL_ITEMS`: step, eval_set, item_id, task, slice
    and item values) as a table with trial columns first; for a (step, eval_set, item_id) written twice (a resumed
    trial evaluates a step again) the last row is kept."""
    frame = pd.DataFrame(list(rows))
    if frame.empty:
        raise ValueError(f"trial {trial_id!r} wrote no evaluation items")
    frame = frame.drop_duplicates(["step", "eval_set", "item_id"], keep="last").reset_index(drop=True)
    for position, (name, value) in enumerate(
        (("trial_id", trial_id), ("variant", variant), ("paradigm", paradigm), ("seed", seed))
    ):
        frame.insert(position, name, value)
    return frame


def write_tables(tables: Mapping[str, pd.DataFrame], out_dir: Path) -> None:
    """CSV and parquet copies of each named table (each written to a temporary name, then renamed into place)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        for suffix, write in (
            (".csv", lambda f, p: f.to_csv(p, index=False)),
            (".parquet", lambda f, p: f.to_parquet(p, index=False)),
        ):
            temporary = out_dir / f".{name}{suffix}.tmp"
            write(frame, temporary)
            temporary.replace(out_dir / f"{name}{suffix}")


def load_results(results_dir: str | Path) -> pd.DataFrame:
    """The tidy results table of a sweep folder (`results/<experiment>`)."""
    return pd.read_parquet(Path(results_dir) / "results.parquet")


def load_history(results_dir: str | Path) -> pd.DataFrame:
    return pd.read_parquet(Path(results_dir) / "history.parquet")


def load_items(results_dir: str | Path) -> pd.DataFrame:
    """The per-item evaluation table of a sweep folder."""
    return pd.read_parquet(Path(results_dir) / "items.parquet")


def variant_order(variants: Iterable[str], paradigm_of: Mapping[str, str]) -> list[str]:
    """Paper order: SFT, RLVR, SFT→RLVR, then ViSurf's neighbours LUFFY and CHORD, ViSurf, then ablations (other
    ViSurf variants) by name."""

    def rank(variant: str) -> tuple[int, int, str]:
        paradigm = paradigm_of[variant]
        position = PARADIGM_ORDER.index(paradigm) if paradigm in PARADIGM_ORDER else len(PARADIGM_ORDER)
        return (position, variant != PARADIGM_NAMES.get(paradigm, variant), variant)

    return sorted(set(variants), key=rank)


def plot_curves(history: pd.DataFrame, out_path: Path) -> Path:
    """Training curves per variant (mean over seeds): rollout and label reward, label advantage, all-fail and
    smoothing fractions against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [c for c in CURVES if c in history.columns and history[c].notna().any()]
    colours = {variant: f"C{i % 10}" for i, variant in enumerate(dict.fromkeys(history["variant"]))}
    figure, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
    for axis, curve in zip(axes[0], curves):
        for variant, rows in history.groupby("variant", sort=False):
            mean = rows.groupby("step")[curve].mean()
            if mean.notna().any():
                axis.plot(mean.index, mean.values, label=variant, color=colours[variant])
        axis.set_title(curve)
        axis.set_xlabel("step")
    handles = [plt.Line2D([], [], color=c, label=v) for v, c in colours.items()]
    figure.legend(handles=handles, loc="upper right", fontsize=7)
    figure.tight_layout()
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return out_path


def plot_task_bars(results: pd.DataFrame, out_path: Path, metric: str = "score") -> Path:
    """Bars of `metric` per eval set and variant (mean over seeds, error bars = std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = results[results["metric"] == metric]
    paradigm_of = dict(zip(results["variant"], results["paradigm"]))
    variants = variant_order(chosen["variant"], paradigm_of)
    sets = list(dict.fromkeys(chosen["eval_set"]))
    stats = chosen.groupby(["eval_set", "variant"])["value"].agg(["mean", "std"])
    width = 0.8 / len(variants)
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(sets)), 3.6))
    for index, variant in enumerate(variants):
        means = [stats["mean"].get((s, variant), float("nan")) for s in sets]
        stds = [stats["std"].get((s, variant), 0.0) for s in sets]
        positions = [i + index * width for i in range(len(sets))]
        axis.bar(positions, means, width, yerr=[0 if math.isnan(v) else v for v in stds], label=variant)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(sets))], sets, rotation=15, fontsize=8)
    axis.set_ylabel(metric)
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(out_path, dpi=110)
    plt.close(figure)
    return out_path
