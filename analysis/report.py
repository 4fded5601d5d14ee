"""The sweep's report: every cell with its 95% interval, the paired "ViSurf − X" table, every cell's estimate at
each eval step (where the curves settle), where log π(`[]`) rises, the paper's claims with a verdict, ViSurf against
its single-stage neighbours (LUFFY, CHORD), and what each variant was given (prompts, optimizer steps, wall time,
evaluation's share).

A plain function of the three tables `experiments/sweep.py` writes (`analysis.results`); what it prints at the end
of a sweep and writes to `summary.md`. Re-report a finished sweep with the current analysis code (its tables are
kept): `python -m analysis.report results/<name>`. Imports pandas and the analysis modules; never Ray.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu

from analysis.claims import NEIGHBOURS, evaluate_claims, evaluate_neighbours, format_claims
from analysis.intervals import (
    bootstrap,
    default_columns,
    estimates_by_step,
    half_width,
    interval_table,
    paired_table,
    slice_sizes,
)
from analysis.results import load_history, load_items, load_results, variant_order
from visurf_ray.rewards.grounding import EMPTY_IMAGE, NO_OBJECT, OBJECT_SLICES

REFERENCE = "ViSurf"
NO_OBJECT_COLUMN = "grounding/n_acc"
FORMAT_METRICS = ("mean_thinking_format", "strict_format_rate", "multi_block_rate")
"""Per eval set in the formats table: the paper's thinking-format rate beside the strict one (exactly one think and
one answer block) and the share of completions with repeated think/answer tags."""
ABSENCE_COLUMNS = ("grounding/logp_empty_no_object", "grounding/logp_empty_object")
"""log π(`[]`) after the model's own `<answer>` (nats) on no-object items and on items with an object."""
SUMMARY_FILE = "summary.md"
ABSENCE_SET = "grounding"
ABSENCE_SLICES = {"empty image": EMPTY_IMAGE, "no object": NO_OBJECT}
"""Column label -> a grounding slice whose answer is `[]`, in `absence_by_step`."""


def _markdown(frame: pd.DataFrame) -> str:
    """A table as markdown (index as the first column)."""
    header = [frame.index.name or "", *map(str, frame.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join([str(index), *map(str, row)]) + " |" for index, row in frame.iterrows()]
    return "\n".join(lines)


def absence_by_step(items: pd.DataFrame, eval_set: str = ABSENCE_SET) -> pd.DataFrame | None:
    """Where the label's `[]` rises, per (variant, eval step), mean over seeds: log π(`[]`) after the model's own
    `<answer>` (nats) on each no-object slice of `eval_set` (`ABSENCE_SLICES`) and on items with an object; each
    slice's gap to the object items; and its AUC against them (the chance that one of its items has the higher
    log π(`[]`) than an object item, ties half: 1 is perfect separation, 0.5 none). Item level, repeated contents
    counted per item. None where the items have no log π(`[]`) or no such slices."""
    if "logp_empty" not in items.columns:
        return None
    rows = items.loc[(items["eval_set"] == eval_set) & items["logp_empty"].notna()]
    present = {label: slice_ for label, slice_ in ABSENCE_SLICES.items() if (rows["slice"] == slice_).any()}
    if not present or not rows["slice"].isin(OBJECT_SLICES).any():
        return None
    columns = [*(f"{eval_set}/logp_empty_{slice_}" for slice_ in present.values()), f"{eval_set}/logp_empty_object"]
    table = estimates_by_step(items, columns).set_index(["variant", "step"])
    table.columns = [*present, "object"]
    for label in present:
        table[f"{label} − object"] = table[label] - table["object"]

    def auc(trial_step: pd.DataFrame, slice_: str) -> float:
        absent = trial_step.loc[trial_step["slice"] == slice_, "logp_empty"].to_numpy()
        there = trial_step.loc[trial_step["slice"].isin(OBJECT_SLICES), "logp_empty"].to_numpy()
        if not len(absent) or not len(there):
            return np.nan
        return mannwhitneyu(absent, there).statistic / (len(absent) * len(there))

    per_trial = rows.groupby(["variant", "seed", "step"])
    for label, slice_ in present.items():
        aucs = per_trial.apply(lambda frame, s=slice_: auc(frame, s), include_groups=False)
        table[f"AUC {label}"] = aucs.groupby(["variant", "step"]).mean()
    return table


def _step_labels(table: pd.DataFrame) -> pd.DataFrame:
    """A (variant, step)-indexed table with rows labelled "<variant>, step <step>" for the report."""
    table.index = [f"{variant}, step {step}" for variant, step in table.index]
    table.index.name = "variant, eval step"
    return table


def budget_table(results: pd.DataFrame, history: pd.DataFrame) -> pd.DataFrame:
    """Per variant (mean over its trials): optimizer steps, prompts seen, tokens generated in rollouts, training and
    evaluation wall time (seconds, from each trial's last report), evaluation's share of the two, and — when the
    history has `step_cpu_time` — the trials' CPU seconds per wall second of training steps ("CPU/wall": ≈ the
    threads a trial uses when it has its cores alone, less when other work shared them, so wall times compare only
    between variants whose CPU/wall agree)."""
    last = history.sort_values("step").groupby("trial_id").tail(1)
    per_trial = pd.DataFrame(
        {
            "variant": last["variant"],
            "optimizer steps": last["step"],
            "prompts": last["prompts_seen"],
            "rollout tokens": last["generated_tokens_total"],
            "train s": last["train_time_total"],
            "eval s": last["eval_time_total"],
        }
    )
    table = per_trial.groupby("variant").mean()
    table["eval share"] = table["eval s"] / (table["train s"] + table["eval s"])
    if "step_cpu_time" in history.columns:
        timed = history[history["step_cpu_time"].notna()]  # trials run before the metric existed have none
        sums = timed.groupby(["variant", "trial_id"])[["step_cpu_time", "step_time"]].sum()
        table["CPU/wall"] = (sums["step_cpu_time"] / sums["step_time"]).groupby("variant").mean()
    paradigm_of = dict(zip(results["variant"], results["paradigm"]))
    table = table.loc[variant_order(table.index, paradigm_of)]
    table.index.name = "variant (mean over seeds)"
    formats = {
        "optimizer steps": "{:.0f}",
        "prompts": "{:.0f}",
        "rollout tokens": "{:.0f}",
        "eval share": "{:.0%}",
        "CPU/wall": "{:.2f}",
    }
    return table.apply(lambda column: column.map((formats.get(column.name, "{:.1f}")).format))


def checkpoint_text(results: pd.DataFrame) -> str:
    """The trials' starting checkpoints, each with its weights' sha256 (`model.weights_sha256`, which the sweep sets
    for the tiny base model): two reports of one sweep configuration can agree only where these agree, since the
    tiny base model's bits depend on the CPU that built it (README, "Tiny base model")."""
    path, digest = "config/model.path", "config/model.weights_sha256"
    digests = results[digest].fillna("") if digest in results.columns else pd.Series("", index=results.index)
    pairs = sorted(set(zip(results[path], digests)))
    return "; ".join(f"{name} (weights sha256 {value or 'not recorded'})" for name, value in pairs)


def sweep_report(results: pd.DataFrame, history: pd.DataFrame, items: pd.DataFrame, *, n_boot: int = 2000) -> str:
    """The report as markdown: intervals of every default column (`analysis.intervals.default_columns`), paired
    differences to ViSurf, the same columns' estimates at every eval step, the claims, ViSurf against LUFFY and CHORD
    (where the sweep has either) and the budget table. Intervals: 95% percentile bootstrap over distinct eval items
    (stratified by slice) and seeds, paired across variants by item and seed; the header gives each slice's items
    and, where some repeat, its distinct ones, and the starting checkpoint (`checkpoint_text`)."""
    columns = default_columns(items)
    boot = bootstrap(items, columns, n_boot=n_boot)
    final = items.loc[items.groupby("trial_id")["step"].transform("max") == items["step"]]
    sizes_text = "; ".join(
        f"{eval_set}/{slice_} {count}" + (f" ({distinct} distinct)" if distinct < count else "")
        for (eval_set, slice_), count, distinct in slice_sizes(final).itertuples(name=None)
    )
    seeds = sorted(items["seed"].unique().tolist())
    parts = [
        f"{items['trial_id'].nunique()} trials, seeds {seeds}; eval items per slice: {sizes_text}.",
        f"Starting checkpoint: {checkpoint_text(results)}.",
        "Cells: final-step estimate (mean over seeds) [95% bootstrap interval over items and seeds]; `*_change`: "
        "final − step 0 on the same items (retained sets: forgetting).",
        "\n## Scores\n",
        _markdown(interval_table(boot)),
    ]
    if REFERENCE in boot.variants:
        parts += ["\n## ViSurf − X (paired by item and seed)\n", _markdown(paired_table(boot, REFERENCE))]
        if NO_OBJECT_COLUMN in columns:
            widths = {v: half_width(boot, v, NO_OBJECT_COLUMN) for v in boot.variants}
            widest = max(widths, key=widths.get)
            parts.append(
                f"\nN-Acc interval half-width: at most {widths[widest]:.3f} ({widest}); the slice's number of distinct "
                "items n bounds the item part of it by 1.96·√(0.25/n) at any rate, the seeds add their own spread."
            )
    by_step = _step_labels(estimates_by_step(items, columns).set_index(["variant", "step"]))
    parts += [
        "\n## By eval step (mean over seeds): where the curves settle\n",
        _markdown(by_step.map("{:.3f}".format).replace("nan", "–")),
    ]
    format_columns = [f"{name}/{metric}" for name in dict.fromkeys(items["eval_set"]) for metric in FORMAT_METRICS]
    format_columns += [column for column in ABSENCE_COLUMNS if "logp_empty" in items.columns]
    parts += [
        "\n## Answer formats and log π(`[]`)\n",
        _markdown(interval_table(bootstrap(items, format_columns, n_boot=n_boot))),
    ]
    absence = absence_by_step(items)
    if absence is not None:
        parts += [
            "\n## log π(`[]`) by eval step (mean over seeds): does the `[]` rise where nothing matches?\n",
            "Nats after the model's own `<answer>`, on empty images, on no-object items among other objects and on "
            "items with an object; AUC: the chance that a no-object item's log π(`[]`) is above an object item's "
            "(1: a threshold separates them, 0.5: none does).\n",
            _markdown(_step_labels(absence).map("{:.2f}".format).replace("nan", "–")),
        ]
    claims = evaluate_claims(items, results, history, n_boot=n_boot)
    parts += ["\n## The paper's claims on this sweep\n", format_claims(claims)]
    if set(results["paradigm"]) & NEIGHBOURS.keys():
        neighbours = evaluate_neighbours(items, results, n_boot=n_boot)
        parts += ["\n## ViSurf vs its single-stage neighbours (LUFFY, CHORD)\n", format_claims(neighbours)]
    parts += ["\n## What each variant was given\n", _markdown(budget_table(results, history))]
    return "\n".join(parts) + "\n"


def write_summary(results_dir: str | Path, *, n_boot: int = 2000) -> str:
    """Write `summary.md` of a sweep's results folder (`results/<name>/`, the tables `experiments/sweep.py` writes)
    from its tables, headed by the folder's name (written to a temporary name, then renamed into place); returns the
    report."""
    folder = Path(results_dir)
    report = sweep_report(load_results(folder), load_history(folder), load_items(folder), n_boot=n_boot)
    temporary = folder / f".{SUMMARY_FILE}.tmp"
    temporary.write_text(f"# {folder.name}\n\n{report}")
    temporary.replace(folder / SUMMARY_FILE)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Re-write the summary.md of finished sweeps from their tables with the current analysis code."
    )
    parser.add_argument("results_dirs", nargs="+", type=Path, help="results/<name> folders of finished sweeps")
    for folder in parser.parse_args(argv).results_dirs:
        write_summary(folder)
        print(folder / SUMMARY_FILE)


if __name__ == "__main__":
    main()
