"""The ViSurf paper's claims (arXiv 2510.10606) checked on a sweep: each claim's difference or ratio, its bootstrap
interval and a verdict.

`evaluate_claims(items, results, history)` takes the sweep's three tables (`analysis.results.load_items`,
`load_results`, `load_history`) and returns one `Claim` per comparison; `format_claims` renders them as a markdown
table. `evaluate_neighbours(items, results)` compares ViSurf with its single-stage neighbours LUFFY and CHORD the same
way (not one of the paper's claims). Which variant plays which role (the reference ViSurf, SFT, RLVR, SFT→RLVR, LUFFY,
CHORD, the ablation of each reward control) is read from the results' `config/objective.*` columns (`infer_roles`),
never from names alone. Intervals are
`analysis.intervals`' paired bootstrap over eval items and seeds (95% percentile); the step-cost ratio resamples each
trial's steps and the seeds. A claim whose variant, eval set, step 0 or history is missing is "inconclusive" with a
detail saying what is missing.

Imports numpy, pandas and analysis.intervals; never Ray or torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.intervals import (
    CHANGE_SUFFIX,
    LEVEL,
    MEAN_SET,
    RETAINED_PREFIX,
    Bootstrap,
    bootstrap,
    difference,
    percentile_interval,
)

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
ABOVE_ZERO = (0.0, math.inf)
EQUIVALENCE_MARGIN = 0.05
"""Claim 3: RLVR's gain counts as ≈ 0 when its interval lies within ±this (metric units)."""
STEP_COST_BAND = (0.8, 1.25)
"""Claim 5: ViSurf's mean step time over RLVR's counts as ≈ 1 when its interval lies within this band."""
OBJECTIVE = "config/objective."
CONTROLS = {
    "align_label": "aligning",
    "eliminate_label_thinking": "eliminating the thinking reward",
    "smoothing": "smoothing",
}
"""Reward controls (objective keys) and their names in the paper."""
REFERENCE_REQUIRED = {"align_label": True, "eliminate_label_thinking": True, "smoothing": True}
REFERENCE_IF_PRESENT = {"label_reasoning": False, "smoothing_rule": "literal"}
"""The reference ViSurf's objective settings; the second set is checked only where the results have the column (a
missing value counts as the default)."""
BASELINES = {"sft": "SFT", "rlvr": "RLVR", "sft_rlvr": "SFT-RLVR"}
"""Baseline roles: paradigm → the variant name preferred when several variants share the paradigm."""
NEIGHBOURS = {"luffy": "LUFFY", "chord": "CHORD"}
"""ViSurf's single-stage neighbours (other ways of mixing the label in), roles as BASELINES'."""
ROLE_DESCRIPTIONS = {
    "visurf": "ViSurf (paradigm visurf; align_label, eliminate_label_thinking and smoothing true; label_reasoning "
    "false and smoothing_rule literal where set; the one named 'ViSurf' if several)",
    **{
        role: f"{name} (the one paradigm-{role} variant, or the one named {name!r})"
        for role, name in (BASELINES | NEIGHBOURS).items()
    },
    **{
        f"ablation/{control}": f"ViSurf without {name} (as ViSurf in every objective setting but {control} false)"
        for control, name in CONTROLS.items()
    },
}
BEYOND_KNOWLEDGE = {
    "grounding": ("abstain_balanced_accuracy_empty_image", "abstain_balanced_accuracy"),
    "anomaly": ("balanced_accuracy",),
}
"""Claim 2: per task, the metrics of the items the base model cannot solve (no-object queries on an empty image and
among other objects, anomaly detection), each a balanced accuracy: answering `[]` (or "no defect") to everything
gains nothing, as N-Acc alone would reward it."""
WITHIN_KNOWLEDGE = {"grounding": "giou_object", "gui_point": "score"}
"""Claim 2: per task, the headline scores it is compared with."""
NO_SUCCESS = {"grounding": ("n_acc_empty_image", "n_acc"), "anomaly": ("accuracy_clean",)}
"""Claim 3: per task, the metrics on which RLVR's rollouts never succeed (the base model never answers `[]` or
"clean")."""
FORGETTING_BASELINES = ("sft", "sft_rlvr")


@dataclass(frozen=True)
class Claim:
    """One checked comparison. estimate, low, high: the difference (or ratio) and its 95% interval, NaN when it could
    not be computed; verdict: supported | contradicted | inconclusive; detail: what is missing, or how it was paired."""

    claim: str
    comparison: str
    estimate: float
    low: float
    high: float
    verdict: str
    detail: str = ""


def verdict(low: float, high: float, band: tuple[float, float]) -> str:
    """The verdict of an interval [low, high] on a claim that the value lies in the open band (a, b): supported if the
    interval lies inside it, contradicted if entirely outside it, else (overlapping a boundary, or NaN) inconclusive.
    "> 0" is the band (0, inf); "≈ 0 within a margin m" is (−m, m)."""
    lower, upper = band
    if lower < low and high < upper:
        return SUPPORTED
    if high < lower or low > upper:
        return CONTRADICTED
    return INCONCLUSIVE


def _norm(value) -> str:
    """A config value as comparable text: booleans "true"/"false", missing "nan", else its lower-case text."""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "nan"
    return str(value).strip().lower()


def _configs(results: pd.DataFrame) -> pd.DataFrame:
    """One row per variant: its paradigm and objective settings (column names without the prefix, `_norm` text)."""
    missing = [key for key in ("variant", "paradigm") if key not in results.columns]
    if missing:
        raise ValueError(f"results table lacks columns {missing}")
    firsts = results.drop_duplicates("variant").set_index("variant")
    objective = [c for c in results.columns if c.startswith(OBJECTIVE)]
    configs = firsts[objective].rename(columns=lambda c: c.removeprefix(OBJECTIVE)).map(_norm)
    configs["paradigm"] = firsts["paradigm"].map(_norm)  # the same as objective.paradigm where both are present
    return configs


def _one(variants: Iterable[str], preferred: str | None) -> str | None:
    """The only variant, else the preferred name among several, else None (never a guess)."""
    variants = list(variants)
    if len(variants) == 1:
        return variants[0]
    return preferred if preferred in variants else None


def _reference(configs: pd.DataFrame) -> str | None:
    chosen = configs[configs["paradigm"] == "visurf"]
    for key, expected in REFERENCE_REQUIRED.items():
        if key not in configs.columns:
            return None
        chosen = chosen[chosen[key] == _norm(expected)]
    for key, expected in REFERENCE_IF_PRESENT.items():
        if key in configs.columns:
            chosen = chosen[chosen[key].isin([_norm(expected), "nan"])]
    return _one(chosen.index, "ViSurf")


def _ablation(configs: pd.DataFrame, reference: str | None, control: str) -> str | None:
    """The visurf variant equal to the reference in every objective setting except `control`, which is false."""
    if reference is None or control not in configs.columns:
        return None
    others = [key for key in configs.columns if key != control]
    same = (configs[others] == configs.loc[reference, others]).all(axis=1)
    chosen = configs[same & (configs[control] == "false") & (configs.index != reference)]
    return _one(chosen.index, None)


def infer_roles(results: pd.DataFrame) -> dict[str, str | None]:
    """Role → variant (None when missing or ambiguous) from the results' paradigm and config/objective.* columns.

    Roles: "visurf" (the reference), "sft", "rlvr", "sft_rlvr", "luffy", "chord", and "ablation/<control>" for each
    of CONTROLS."""
    configs = _configs(results)
    roles: dict[str, str | None] = {"visurf": _reference(configs)}
    for paradigm, name in (BASELINES | NEIGHBOURS).items():
        roles[paradigm] = _one(configs.index[configs["paradigm"] == paradigm], name)
    for control in CONTROLS:
        roles[f"ablation/{control}"] = _ablation(configs, roles["visurf"], control)
    return roles


class _Cells:
    """Bootstrap cells by column. All columns are bootstrapped at once; if that fails, column by column, and a column
    that still fails raises its error when asked for (the resamples are the same either way, so cells stay paired)."""

    def __init__(self, items: pd.DataFrame, columns: Sequence[str], n_boot: int, seed: int):
        self.boots: dict[str, Bootstrap | str] = {}
        try:
            boot = bootstrap(items, columns, n_boot=n_boot, seed=seed)
            self.boots = dict.fromkeys(columns, boot)
        except ValueError:
            for column in columns:
                try:
                    self.boots[column] = bootstrap(items, [column], n_boot=n_boot, seed=seed)
                except ValueError as error:
                    self.boots[column] = str(error)

    def _boot(self, column: str) -> Bootstrap:
        boot = self.boots.get(column, f"column {column!r} is not in the items")
        if isinstance(boot, str):
            raise ValueError(boot)
        return boot

    def cell(self, variant: str, column: str) -> tuple[float, np.ndarray, str]:
        """(estimate, draws [n_boot], detail) of one variant's column."""
        return (*self._boot(column).cell(variant, column), "")

    def difference(self, variant: str, other: str, column: str) -> tuple[float, np.ndarray, str]:
        """(estimate, draws [n_boot], detail) of variant − other, paired by seed where their seeds agree."""
        boot = self._boot(column)
        paired = boot.seeds.get(variant) == boot.seeds.get(other)
        estimate, draws = difference(boot, variant, other, column, paired=paired)
        return estimate, draws, "paired by seed" if paired else "unpaired: the seeds differ"


def _variant(roles: dict[str, str | None], role: str) -> str:
    if roles.get(role) is None:
        raise ValueError(f"no such variant: {ROLE_DESCRIPTIONS[role]}")
    return roles[role]


def _label(roles: dict[str, str | None], role: str) -> str:
    """The role's variant name, or the paper's name for it when missing."""
    default = {"visurf": "ViSurf", **BASELINES, **NEIGHBOURS}.get(role, role)
    return roles.get(role) or default


def _checked(claim: str, comparison: str, band: tuple[float, float], compute: Callable) -> Claim:
    """A Claim from compute() -> (estimate, draws [n_boot], detail); inconclusive with the error's text as detail
    when compute raises ValueError (a missing variant, eval set, step 0 or history)."""
    try:
        estimate, draws, detail = compute()
    except ValueError as error:
        return Claim(claim, comparison, math.nan, math.nan, math.nan, INCONCLUSIVE, str(error))
    low, high = percentile_interval(draws)
    return Claim(claim, comparison, float(estimate), low, high, verdict(low, high, band), detail)


def _beats_baselines(cells: _Cells, roles, post_sets: dict[str, str]) -> list[Claim]:
    """Claim 1: ViSurf − X > 0 on each post-training set's score, X ∈ SFT, RLVR, SFT→RLVR."""
    claims = []
    for role in BASELINES:
        for name in post_sets:
            column = f"{name}/score"
            comparison = f"{_label(roles, 'visurf')} − {_label(roles, role)}: {column}"
            claims.append(
                _checked(
                    f"ViSurf beats {BASELINES[role]} on {name}",
                    comparison,
                    ABOVE_ZERO,
                    lambda role=role, column=column: cells.difference(
                        _variant(roles, "visurf"), _variant(roles, role), column
                    ),
                )
            )
    return claims


def _gain_gap(cells: _Cells, roles, column: str, others: list[str]) -> tuple[float, np.ndarray, str]:
    """(ViSurf − RLVR) on `column` minus the largest (ViSurf − RLVR) on `others`, or minus 0 where none is above 0,
    per draw: a gain of 0 is not "largest" because ViSurf lost everywhere else."""
    visurf, rlvr = _variant(roles, "visurf"), _variant(roles, "rlvr")
    if not others:
        raise ValueError(f"no within-knowledge column to compare with ({WITHIN_KNOWLEDGE}) in the items")
    estimate, draws, detail = cells.difference(visurf, rlvr, column)
    gains = [cells.difference(visurf, rlvr, other) for other in others]
    largest = int(np.argmax([gain[0] for gain in gains]))
    bar = max(gains[largest][0], 0.0)
    bar_draws = np.maximum(np.max([gain[1] for gain in gains], axis=0), 0.0)
    named = f"largest other gain: {others[largest]}" if bar > 0 else "no other gain above 0: compared with 0"
    return estimate - bar, draws - bar_draws, f"{detail}; {named}"


def _largest_beyond_knowledge(cells: _Cells, roles, post_sets: dict[str, str]) -> list[Claim]:
    """Claim 2: ViSurf's gain over RLVR on each beyond-knowledge metric exceeds its largest other gain (and 0)."""
    others = [f"{name}/{WITHIN_KNOWLEDGE[task]}" for name, task in post_sets.items() if task in WITHIN_KNOWLEDGE]
    claims = []
    for name, task in post_sets.items():
        for metric in BEYOND_KNOWLEDGE.get(task, ()):
            column = f"{name}/{metric}"
            pair = f"({_label(roles, 'visurf')} − {_label(roles, 'rlvr')})"
            comparison = f"{pair}: {column} − max over {', '.join(others) or 'none'}"
            claims.append(
                _checked(
                    f"ViSurf's gain over RLVR is largest beyond the base model's knowledge ({column})",
                    comparison,
                    ABOVE_ZERO,
                    lambda column=column: _gain_gap(cells, roles, column, others),
                )
            )
    return claims


def _rlvr_no_gain(cells: _Cells, roles, post_sets: dict[str, str]) -> list[Claim]:
    """Claim 3: RLVR's final − step 0 on items its rollouts never solve lies within ±EQUIVALENCE_MARGIN."""
    claims = []
    for name, task in post_sets.items():
        for metric in NO_SUCCESS.get(task, ()):
            column = f"{name}/{metric}{CHANGE_SUFFIX}"
            claims.append(
                _checked(
                    f"RLVR gains ≈ 0 where rollouts never succeed ({name}/{metric})",
                    f"{_label(roles, 'rlvr')}: {column} (final − step 0), margin ±{EQUIVALENCE_MARGIN}",
                    (-EQUIVALENCE_MARGIN, EQUIVALENCE_MARGIN),
                    lambda column=column: cells.cell(_variant(roles, "rlvr"), column),
                )
            )
    return claims


def _forgetting(cells: _Cells, roles, retained_sets: list[str]) -> list[Claim]:
    """Claim 4: ViSurf's score change on each retained set exceeds SFT's and SFT→RLVR's (they forget more)."""
    claims = []
    for role in FORGETTING_BASELINES:
        for name in retained_sets:
            column = f"{name}/score{CHANGE_SUFFIX}"
            claims.append(
                _checked(
                    f"{BASELINES[role]} forgets {name} more than ViSurf",
                    f"{_label(roles, 'visurf')} − {_label(roles, role)}: {column}",
                    ABOVE_ZERO,
                    lambda role=role, column=column: cells.difference(
                        _variant(roles, "visurf"), _variant(roles, role), column
                    ),
                )
            )
    return claims


def _step_times(history: pd.DataFrame, variant: str) -> tuple[tuple[int, ...], list[np.ndarray]]:
    """(sorted seeds, per seed its steps' step_time [T] in seconds) of a variant's history rows."""
    missing = [key for key in ("variant", "seed", "step_time") if key not in history.columns]
    if missing:
        raise ValueError(f"history table lacks columns {missing}")
    rows = history[(history["variant"] == variant) & np.isfinite(pd.to_numeric(history["step_time"]))]
    if rows.empty:
        raise ValueError(f"history has no step_time rows for variant {variant!r}")
    groups = dict(list(rows.groupby("seed", sort=True)))
    return tuple(int(s) for s in groups), [g["step_time"].to_numpy(np.float64) for g in groups.values()]


def _mean_step_time(times: list[np.ndarray], positions: np.ndarray, rng: np.random.Generator):
    """(estimate, draws [B]) of the mean over seeds of each trial's mean step time; positions [B, S] resample the S
    seeds, each trial's T steps are resampled with replacement."""
    n_boot = positions.shape[0]
    per_trial = np.stack([t[rng.integers(0, len(t), size=(n_boot, len(t)))].mean(axis=1) for t in times], axis=1)
    draws = np.take_along_axis(per_trial, positions, axis=1).mean(axis=1)
    return float(np.mean([t.mean() for t in times])), draws


def _step_cost_ratio(history: pd.DataFrame, roles, n_boot: int, seed: int) -> tuple[float, np.ndarray, str]:
    """ViSurf's mean step time / RLVR's, per draw; seeds resampled at the same positions when the seeds agree."""
    visurf_seeds, visurf_times = _step_times(history, _variant(roles, "visurf"))
    rlvr_seeds, rlvr_times = _step_times(history, _variant(roles, "rlvr"))
    rng = np.random.default_rng([seed, 2])
    positions = rng.integers(0, len(visurf_seeds), size=(n_boot, len(visurf_seeds)))
    paired = visurf_seeds == rlvr_seeds
    if not paired:
        positions_rlvr = rng.integers(0, len(rlvr_seeds), size=(n_boot, len(rlvr_seeds)))
    estimate, draws = _mean_step_time(visurf_times, positions, rng)
    rlvr_estimate, rlvr_draws = _mean_step_time(rlvr_times, positions if paired else positions_rlvr, rng)
    return estimate / rlvr_estimate, draws / rlvr_draws, "paired by seed" if paired else "unpaired: the seeds differ"


def _step_cost(history: pd.DataFrame, roles, n_boot: int, seed: int) -> list[Claim]:
    """Claim 5: ViSurf's mean step time / RLVR's lies within STEP_COST_BAND."""
    low, high = STEP_COST_BAND
    comparison = f"mean step_time {_label(roles, 'visurf')} / {_label(roles, 'rlvr')}, band [{low}, {high}]"
    return [
        _checked(
            "ViSurf's step cost ≈ RLVR's",
            comparison,
            STEP_COST_BAND,
            lambda: _step_cost_ratio(history, roles, n_boot, seed),
        )
    ]


def _controls_help(cells: _Cells, roles) -> list[Claim]:
    """Claim 6: ViSurf − its ablation without each reward control > 0 on the mean score."""
    column = f"{MEAN_SET}/score"
    claims = []
    for control, name in CONTROLS.items():
        role = f"ablation/{control}"
        claims.append(
            _checked(
                f"{name} helps",
                f"{_label(roles, 'visurf')} − {roles.get(role) or f'ViSurf without {name}'}: {column}",
                ABOVE_ZERO,
                lambda role=role: cells.difference(_variant(roles, "visurf"), _variant(roles, role), column),
            )
        )
    return claims


def _columns(post_sets: dict[str, str], retained_sets: list[str]) -> list[str]:
    """Every column the claims read."""
    columns = [f"{name}/score" for name in post_sets]
    for name, task in post_sets.items():
        columns += [f"{name}/{metric}" for metric in BEYOND_KNOWLEDGE.get(task, ())]
        if task in WITHIN_KNOWLEDGE:
            columns.append(f"{name}/{WITHIN_KNOWLEDGE[task]}")
        columns += [f"{name}/{metric}{CHANGE_SUFFIX}" for metric in NO_SUCCESS.get(task, ())]
    columns += [f"{name}/score{CHANGE_SUFFIX}" for name in retained_sets]
    return list(dict.fromkeys([*columns, f"{MEAN_SET}/score"]))


def evaluate_claims(
    items: pd.DataFrame, results: pd.DataFrame, history: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0
) -> list[Claim]:
    """The paper's claims 1–6 (module docstring of this file) on one sweep's tables, in order:
    ViSurf beats each baseline per post-training set; its gain over RLVR is largest beyond knowledge; RLVR gains ≈ 0
    where rollouts never succeed; SFT and SFT→RLVR forget retained sets more; ViSurf's step cost ≈ RLVR's; each
    reward control helps. n_boot draws of the bootstrap, seeded by `seed` (>= 0)."""
    roles = infer_roles(results)
    task_of = dict(zip(items["eval_set"], items["task"]))
    post_sets = {name: task for name, task in task_of.items() if not name.startswith(RETAINED_PREFIX)}
    retained_sets = [name for name in task_of if name.startswith(RETAINED_PREFIX)]
    cells = _Cells(items, _columns(post_sets, retained_sets), n_boot, seed)
    return [
        *_beats_baselines(cells, roles, post_sets),
        *_largest_beyond_knowledge(cells, roles, post_sets),
        *_rlvr_no_gain(cells, roles, post_sets),
        *_forgetting(cells, roles, retained_sets),
        *_step_cost(history, roles, n_boot, seed),
        *_controls_help(cells, roles),
    ]


def evaluate_neighbours(
    items: pd.DataFrame, results: pd.DataFrame, *, n_boot: int = 2000, seed: int = 0
) -> list[Claim]:
    """ViSurf − X > 0 for X ∈ LUFFY, CHORD (NEIGHBOURS) on each post-training set's score and on the mean score, in
    that order: is the label as group member G+1 better than the label replacing a rollout (LUFFY) or a μ-weighted SFT
    term (CHORD)? Paired bootstrap intervals and verdicts as `evaluate_claims`'; a missing variant or eval set makes
    its rows inconclusive."""
    roles = infer_roles(results)
    task_of = dict(zip(items["eval_set"], items["task"]))
    columns = [f"{name}/score" for name in task_of if not name.startswith(RETAINED_PREFIX)] + [f"{MEAN_SET}/score"]
    cells = _Cells(items, columns, n_boot, seed)
    return [
        _checked(
            f"ViSurf beats {name} on {column.removesuffix('/score')}",
            f"{_label(roles, 'visurf')} − {_label(roles, role)}: {column}",
            ABOVE_ZERO,
            lambda role=role, column=column: cells.difference(_variant(roles, "visurf"), _variant(roles, role), column),
        )
        for role, name in NEIGHBOURS.items()
        for column in columns
    ]


def _number(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}"


def format_claims(claims: Sequence[Claim]) -> str:
    """A markdown table: claim, comparison, estimate, 95% interval, verdict, detail."""
    lines = [
        f"| claim | comparison | estimate | {LEVEL:.0%} interval | verdict | detail |",
        "|---|---|---|---|---|---|",
    ]
    for c in claims:
        interval = "–" if math.isnan(c.low) else f"[{_number(c.low)}, {_number(c.high)}]"
        cells = (c.claim, c.comparison, _number(c.estimate), interval, c.verdict, c.detail)
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)
