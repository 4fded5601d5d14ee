"""Figures of a gradient table (`analysis.gradients.gradient_table` rows over checkpoints): group outcomes and the
label's share of the ViSurf gradient, cosines between the SFT, RLVR and ViSurf gradients, and the identity residuals.

Imports pandas, and matplotlib inside the plot functions (the caller picks the backend); never Ray.
"""

from __future__ import annotations

import pandas as pd

from analysis.gradient_identities import OUTCOMES, TOLERANCE, residual_summary


def _outcome_lines(table: pd.DataFrame, column: str, ax, *, all_groups: bool = False) -> None:
    """Mean of `column` per step for each outcome (and over all groups); NaN values (undefined cosines) are skipped."""
    from matplotlib.ticker import MaxNLocator

    lines = {outcome: table[table["outcome"] == outcome] for outcome in OUTCOMES}
    if all_groups:
        lines["all groups"] = table
    plotted = False
    for name, part in lines.items():
        means = part.groupby("step")[column].mean().dropna()
        if len(means):
            style = {"color": "black", "linestyle": "--"} if name == "all groups" else {}
            ax.plot(means.index, means.values, marker="o", label=name, **style)
            plotted = True
    if plotted:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "undefined in every group", transform=ax.transAxes, ha="center")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_label_share(table: pd.DataFrame):
    """Figure over the checkpoints' steps: the share of groups in each outcome, the label share (mean per outcome and
    over all groups), and the label advantage Â_y per outcome."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (outcomes, share, advantage) = plt.subplots(1, 3, figsize=(14, 3.6))
    fractions = table.groupby("step")["outcome"].value_counts(normalize=True).unstack(fill_value=0.0)
    for outcome in OUTCOMES:
        if outcome in fractions:
            outcomes.plot(fractions.index, fractions[outcome], marker="o", label=outcome)
    outcomes.set(xlabel="optimizer step", ylabel="share of groups", title="group outcomes", ylim=(-0.05, 1.05))
    outcomes.xaxis.set_major_locator(MaxNLocator(integer=True))
    outcomes.legend()
    _outcome_lines(table, "label_share", share, all_groups=True)
    share.set(
        ylabel="‖label‖ / (‖label‖ + ‖rollout‖)", title="SFT term's share of the ViSurf gradient", ylim=(-0.05, 1.05)
    )
    _outcome_lines(table, "label_advantage", advantage)
    advantage.set(ylabel="Â_y", title="label advantage")
    fig.tight_layout()
    return fig


def plot_cosines(table: pd.DataFrame):
    """Figure: mean cos(SFT, RLVR), cos(SFT, ViSurf) and cos(RLVR, ViSurf) per outcome over the checkpoints' steps
    (a cosine with a zero gradient, e.g. RLVR's in a tied group, is undefined and skipped)."""
    import matplotlib.pyplot as plt

    pairs = {
        "cos_sft_rlvr": "cos(SFT, RLVR)",
        "cos_sft_visurf": "cos(SFT, ViSurf)",
        "cos_rlvr_visurf": "cos(RLVR, ViSurf)",
    }
    fig, axes = plt.subplots(1, len(pairs), figsize=(14, 3.6), sharey=True)
    for ax, (column, title) in zip(axes, pairs.items()):
        _outcome_lines(table, column, ax)
        ax.set(title=title, ylim=(-1.05, 1.05))
    axes[0].set_ylabel("cosine")
    fig.tight_layout()
    return fig


def plot_residuals(table: pd.DataFrame):
    """Figure: the largest residual of each check (log scale) against TOLERANCE; an exact 0 is drawn at 1e-18 and
    labelled, and checks that applied to no group are named in the title."""
    import matplotlib.pyplot as plt

    summary = residual_summary(table)
    applied = summary[summary["groups"] > 0]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    floor = 1e-18
    bars = ax.bar(applied.index, applied["max_residual"].clip(lower=floor))
    for bar, value in zip(bars, applied["max_residual"]):
        if value == 0:
            ax.text(bar.get_x() + bar.get_width() / 2, floor * 3, "exactly 0", ha="center", va="bottom")
    ax.axhline(TOLERANCE, color="red", linestyle="--", label=f"tolerance {TOLERANCE:g}")
    ax.set_yscale("log")
    ax.set_ylabel("max relative residual")
    missing = sorted(set(summary.index) - set(applied.index))
    ax.set_title("identity residuals (float64)" + (f"; not applicable: {', '.join(missing)}" if missing else ""))
    ax.tick_params(axis="x", rotation=20)
    ax.legend()
    fig.tight_layout()
    return fig
