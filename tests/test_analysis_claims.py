"""analysis.claims: role inference from the results' objective settings, the verdict rule, and the six claims on
synthetic sweeps built so that every kind of claim reaches each verdict (supported, contradicted, inconclusive),
with missing variants, a missing step 0 and the markdown table; ViSurf against its neighbours LUFFY and CHORD."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.claims import (
    CONTRADICTED,
    INCONCLUSIVE,
    SUPPORTED,
    Claim,
    evaluate_claims,
    evaluate_neighbours,
    format_claims,
    infer_roles,
    verdict,
)

N_BOOT = 400
SETS = {  # eval set: (task, slices)
    "grounding": ("grounding", ["seen"] * 12 + ["no_object"] * 4 + ["empty_image"] * 4),
    "gui_point": ("gui_point", ["all"] * 20),
    "anomaly": ("anomaly", ["clean"] * 10 + ["defect"] * 10),
    "retained/count": ("count", ["all"] * 20),
}
OBJECTIVE = {"align_label": True, "eliminate_label_thinking": True, "smoothing": True, "label_reasoning": False}
VARIANTS = {  # variant: (paradigm, objective settings that differ from OBJECTIVE)
    "SFT": ("sft", {}),
    "RLVR": ("rlvr", {}),
    "SFT-RLVR": ("sft_rlvr", {}),
    "LUFFY": ("luffy", {}),
    "CHORD": ("chord", {}),
    "ViSurf": ("visurf", {}),
    "ViSurf-no-align": ("visurf", {"align_label": False}),
    "ViSurf-no-eliminate": ("visurf", {"eliminate_label_thinking": False}),
    "ViSurf-no-smoothing": ("visurf", {"smoothing": False}),
    "ViSurf-label-reasoning": ("visurf", {"label_reasoning": True}),
}
SEEDS = (0, 1)


def outcome(iou, nacc, hit, clean, defect, count) -> dict[str, np.ndarray]:
    """Per-item values of one evaluation: grounding IoU on the 12 object items and correct `[]` on the 8 no-object
    items (4 among other objects, 4 on an empty image), gui_point hits, anomaly correctness on 10 clean and 10 defect
    items, retained count correctness."""
    sizes = {"iou": 12, "nacc": 8, "hit": 20, "clean": 10, "defect": 10, "count": 20}
    given = {"iou": iou, "nacc": nacc, "hit": hit, "clean": clean, "defect": defect, "count": count}
    return {key: np.broadcast_to(np.asarray(value, dtype=np.float64), sizes[key]) for key, value in given.items()}


def eval_rows(values: dict[str, np.ndarray]) -> list[dict]:
    columns = {
        "grounding": {
            "iou": np.concatenate([values["iou"], values["nacc"]]),
            "empty": np.concatenate([np.zeros(12), values["nacc"]]),
            "abstain_correct": np.concatenate([np.ones(12), values["nacc"]]),  # no `[]` on object items
        },
        "gui_point": {"hit": values["hit"]},
        "anomaly": {"correct": np.concatenate([values["clean"], values["defect"]])},
        "retained/count": {"correct": values["count"]},
    }
    rows = []
    for eval_set, (task, slices) in SETS.items():
        for i, slice_ in enumerate(slices):
            row = {"eval_set": eval_set, "task": task, "item_id": f"{eval_set}-{i}", "slice": slice_}
            rows.append(row | {name: float(column[i]) for name, column in columns[eval_set].items()})
    return rows


def sweep(base: dict, finals: dict[str, dict], step_times: dict[str, list[float]]):
    """(items, results, history) of the VARIANTS × SEEDS with the base model's values at step 0 and `finals[v]` at
    step 10 (variants missing from `finals` are left out)."""
    items, results, history = [], [], []
    for variant, final in finals.items():
        paradigm, changed = VARIANTS[variant]
        for seed in SEEDS:
            trial = {"trial_id": f"{variant}-{seed}", "variant": variant, "paradigm": paradigm, "seed": seed}
            items += [trial | {"step": step} | row for step, v in ((0, base), (10, final)) for row in eval_rows(v)]
            config = {f"config/objective.{k}": v for k, v in (OBJECTIVE | changed).items()}
            config |= {"config/objective.paradigm": paradigm, "config/objective.smoothing_rule": "literal"}
            results.append(trial | {"eval_set": "mean", "metric": "score", "value": 0.0} | config)
            times = step_times.get(variant, step_times["other"])
            history += [
                {"trial_id": trial["trial_id"], "variant": variant, "seed": seed, "step": step + 1, "step_time": t}
                for step, t in enumerate(times)
            ]
    return pd.DataFrame(items), pd.DataFrame(results), pd.DataFrame(history)


BASE = outcome(iou=0.3, nacc=0, hit=0.2, clean=0, defect=1, count=1)


def supported_sweep():
    visurf = outcome(iou=0.8, nacc=1, hit=1, clean=1, defect=1, count=1)
    rlvr = outcome(iou=0.7, nacc=0, hit=0.8, clean=0, defect=1, count=1)  # no gain on no-object and clean items
    sft = outcome(iou=0.5, nacc=0, hit=0.5, clean=0.5, defect=0.5, count=0)  # forgets counting
    finals = {v: rlvr for v in VARIANTS} | {"ViSurf": visurf, "SFT": sft, "SFT-RLVR": sft}
    return sweep(BASE, finals, {"other": [1.0, 1.1, 0.9, 1.0]})


def contradicted_sweep():
    visurf = outcome(iou=0.5, nacc=0, hit=0.5, clean=0, defect=1, count=0)
    rlvr = outcome(iou=0.6, nacc=1, hit=0.6, clean=1, defect=1, count=1)
    strong = outcome(iou=0.9, nacc=1, hit=0.9, clean=1, defect=1, count=1)
    finals = {v: strong for v in VARIANTS} | {"ViSurf": visurf, "RLVR": rlvr}
    return sweep(BASE, finals, {"ViSurf": [2.0, 2.1, 1.9, 2.0], "other": [1.0, 1.1, 0.9, 1.0]})


def inconclusive_sweep():
    """Every comparison is 0 on average with item-level noise: ViSurf and the others alternate in opposite phase."""
    a, b = [1.0, 0.0], [0.0, 1.0]
    base = outcome(iou=0.3, nacc=a * 4, hit=0.2, clean=a * 5, defect=1, count=a * 10)
    visurf = outcome(iou=a * 6, nacc=a * 4, hit=a * 10, clean=a * 5, defect=a * 5, count=b * 10)
    other = outcome(iou=b * 6, nacc=b * 4, hit=b * 10, clean=b * 5, defect=b * 5, count=a * 10)
    finals = {v: other for v in VARIANTS} | {"ViSurf": visurf}
    return sweep(base, finals, {"other": [0.5, 1.5] * 3})


def kind(claim: Claim) -> int:
    """Which of the paper's six claims a Claim checks, from its text."""
    text = claim.claim
    for number, test in enumerate(
        (
            text.startswith("ViSurf beats"),
            text.startswith("ViSurf's gain over RLVR"),
            text.startswith("RLVR gains"),
            " forgets " in text,
            text.startswith("ViSurf's step cost"),
            text.endswith(" helps"),
        ),
        start=1,
    ):
        if test:
            return number
    raise AssertionError(f"unclassified claim {text!r}")


@pytest.fixture(scope="module")
def verdicts() -> dict[str, list[Claim]]:
    scenarios = {SUPPORTED: supported_sweep, CONTRADICTED: contradicted_sweep, INCONCLUSIVE: inconclusive_sweep}
    return {name: evaluate_claims(*build(), n_boot=N_BOOT, seed=0) for name, build in scenarios.items()}


def test_verdict_rule():
    assert verdict(0.1, 0.3, (0.0, math.inf)) == SUPPORTED
    assert verdict(-0.3, -0.1, (0.0, math.inf)) == CONTRADICTED
    assert verdict(-0.1, 0.3, (0.0, math.inf)) == INCONCLUSIVE
    assert verdict(0.0, 0.0, (0.0, math.inf)) == INCONCLUSIVE  # on the boundary
    assert verdict(-0.04, 0.04, (-0.05, 0.05)) == SUPPORTED
    assert verdict(0.06, 0.2, (-0.05, 0.05)) == CONTRADICTED
    assert verdict(-0.2, -0.06, (-0.05, 0.05)) == CONTRADICTED
    assert verdict(-0.2, 0.2, (-0.05, 0.05)) == INCONCLUSIVE
    assert verdict(math.nan, math.nan, (0.8, 1.25)) == INCONCLUSIVE


def test_every_kind_of_claim_reaches_every_verdict(verdicts):
    for expected, claims in verdicts.items():
        kinds = [kind(c) for c in claims]
        assert sorted(set(kinds)) == [1, 2, 3, 4, 5, 6]
        assert [kinds.count(k) for k in range(1, 7)] == [9, 3, 3, 2, 1, 3]
        wrong = [(c.claim, c.verdict, c.low, c.high, c.detail) for c in claims if c.verdict != expected]
        assert not wrong, f"{expected} scenario: {wrong}"
        assert all(not math.isnan(c.estimate) for c in claims)


def test_estimates_of_the_supported_sweep(verdicts):
    by_comparison = {c.comparison: c for c in verdicts[SUPPORTED]}
    nacc_gap = by_comparison[
        "(ViSurf − RLVR): grounding/abstain_balanced_accuracy − max over grounding/giou_object, gui_point/score"
    ]
    assert nacc_gap.estimate == pytest.approx(0.5 - 0.2)  # the balanced accuracy's gain minus the gui_point gain
    assert "largest other gain: gui_point/score" in nacc_gap.detail
    forgetting = by_comparison["ViSurf − SFT: retained/count/score_change"]
    assert forgetting.estimate == pytest.approx(1.0) and forgetting.low == pytest.approx(1.0)
    (cost,) = [c for c in verdicts[SUPPORTED] if kind(c) == 5]
    assert cost.estimate == pytest.approx(1.0) and 0.8 < cost.low <= 1.0 <= cost.high < 1.25
    assert cost.detail == "paired by seed"


def test_no_gain_beyond_knowledge_is_not_the_largest_gain():
    """ViSurf gains nothing on no-object items and loses elsewhere: a gain of 0 is not "largest" (it is compared with
    0, not with the losses), so the claim is not supported."""
    visurf = outcome(iou=0.5, nacc=0, hit=0.5, clean=0, defect=1, count=1)
    rlvr = outcome(iou=0.7, nacc=0, hit=0.8, clean=0, defect=1, count=1)
    finals = {v: rlvr for v in VARIANTS} | {"ViSurf": visurf}
    claims = evaluate_claims(*sweep(BASE, finals, {"other": [1.0, 1.1, 0.9, 1.0]}), n_boot=N_BOOT, seed=0)
    (gap,) = [c for c in claims if kind(c) == 2 and "grounding/abstain_balanced_accuracy −" in c.comparison]
    assert gap.estimate == pytest.approx(0.0) and gap.verdict != SUPPORTED
    assert "no other gain above 0" in gap.detail


def test_a_blind_empty_answer_gains_nothing_beyond_knowledge():
    """ViSurf answers `[]` to every grounding item: N-Acc 1 (RLVR 0), but its `[]` on the object items cancels it in
    the balanced accuracy the claim reads, so the claim is not supported."""
    items, results, history = supported_sweep()
    blind = (items["variant"] == "ViSurf") & (items["step"] == 10) & (items["slice"] == "seen")
    items.loc[blind, ["iou", "empty", "abstain_correct"]] = [0.0, 1.0, 0.0]
    claims = evaluate_claims(items, results, history, n_boot=N_BOOT, seed=0)
    gaps = [c for c in claims if kind(c) == 2 and c.comparison.startswith("(ViSurf − RLVR): grounding/")]
    assert len(gaps) == 2
    for gap in gaps:  # balanced accuracy 0.5 for both, with gui_point's gain of 0.2 above it
        assert gap.estimate == pytest.approx(0.0 - 0.2) and gap.verdict != SUPPORTED


def test_infer_roles():
    _, results, _ = supported_sweep()
    assert infer_roles(results) == {
        "visurf": "ViSurf",
        "sft": "SFT",
        "rlvr": "RLVR",
        "sft_rlvr": "SFT-RLVR",
        "luffy": "LUFFY",
        "chord": "CHORD",
        "ablation/align_label": "ViSurf-no-align",
        "ablation/eliminate_label_thinking": "ViSurf-no-eliminate",
        "ablation/smoothing": "ViSurf-no-smoothing",
    }
    renamed = results.replace({"variant": {"ViSurf": "visurf-main", "RLVR": "grpo"}})
    assert infer_roles(renamed)["visurf"] == "visurf-main" and infer_roles(renamed)["rlvr"] == "grpo"
    old = results.drop(columns=["config/objective.smoothing_rule", "config/objective.label_reasoning"])
    assert infer_roles(old)["visurf"] == "ViSurf"  # optional settings absent: not checked
    like_for_like = results.copy()
    like_for_like.loc[like_for_like["variant"] == "ViSurf", "config/objective.smoothing_rule"] = "like_for_like"
    assert infer_roles(like_for_like)["visurf"] is None  # not the paper's setting, and not guessed otherwise


def test_ambiguous_baselines_are_not_guessed():
    _, results, _ = supported_sweep()
    two = pd.concat([results, results[results["variant"] == "RLVR"].assign(variant="RLVR-dr-grpo")])
    assert infer_roles(two)["rlvr"] == "RLVR"
    neither = two.replace({"variant": {"RLVR": "RLVR-grpo"}})
    assert infer_roles(neither)["rlvr"] is None
    assert infer_roles(neither)["sft"] == "SFT"


def test_missing_variants_make_their_claims_inconclusive():
    items, results, history = supported_sweep()
    keep = ~results["variant"].isin(["ViSurf-no-smoothing", "SFT-RLVR"])
    roles = infer_roles(results[keep])
    assert roles["ablation/smoothing"] is None and roles["sft_rlvr"] is None
    assert roles["ablation/align_label"] == "ViSurf-no-align"
    claims = evaluate_claims(items, results[keep], history, n_boot=N_BOOT)
    missing = [c for c in claims if "SFT-RLVR" in c.claim or c.claim == "smoothing helps"]
    assert len(missing) == 3 + 1 + 1
    for claim in missing:
        assert claim.verdict == INCONCLUSIVE and math.isnan(claim.estimate)
        assert claim.detail.startswith("no such variant: ")
    smoothing = next(c for c in missing if c.claim == "smoothing helps")
    assert "ViSurf without smoothing" in smoothing.detail
    assert all(c.verdict == SUPPORTED for c in claims if c not in missing)


def test_missing_step_zero_and_history():
    items, results, history = supported_sweep()
    claims = evaluate_claims(items[items["step"] > 0], results, history[history["variant"] != "RLVR"], n_boot=N_BOOT)
    for claim in claims:
        if kind(claim) in (3, 4):
            assert claim.verdict == INCONCLUSIVE and "step 0" in claim.detail
        elif kind(claim) == 5:
            assert claim.verdict == INCONCLUSIVE and "no step_time rows for variant 'RLVR'" in claim.detail
        else:
            assert claim.verdict == SUPPORTED


def test_format_claims(verdicts):
    claims = verdicts[CONTRADICTED]
    table = format_claims(claims).splitlines()
    assert table[0] == "| claim | comparison | estimate | 95% interval | verdict | detail |"
    assert len(table) == 2 + len(claims)
    assert table[2].startswith("| ViSurf beats SFT on grounding | ViSurf − SFT: grounding/score | -")
    assert table[2].rstrip(" |").endswith("paired by seed") and f"| {CONTRADICTED} |" in table[2]
    assert "| – | – | inconclusive | no such variant" in format_claims(
        [Claim("c", "x", *[math.nan] * 3, INCONCLUSIVE, "no such variant: X")]
    )


@pytest.mark.parametrize(
    ("build", "expected"),
    [(supported_sweep, SUPPORTED), (contradicted_sweep, CONTRADICTED), (inconclusive_sweep, INCONCLUSIVE)],
)
def test_visurf_against_each_neighbour_on_every_post_training_set_and_the_mean(build, expected):
    """LUFFY and CHORD score as RLVR (supported), as the strong variant (contradicted) or in opposite phase to
    ViSurf (inconclusive)."""
    items, results, _ = build()
    rows = evaluate_neighbours(items, results, n_boot=N_BOOT, seed=0)
    sets = ("grounding", "gui_point", "anomaly", "mean")
    assert [row.claim for row in rows] == [f"ViSurf beats {n} on {s}" for n in ("LUFFY", "CHORD") for s in sets]
    assert rows[0].comparison == "ViSurf − LUFFY: grounding/score"
    assert rows[-1].comparison == "ViSurf − CHORD: mean/score"
    wrong = [(row.claim, row.verdict, row.low, row.high) for row in rows if row.verdict != expected]
    assert not wrong and all(row.detail == "paired by seed" for row in rows)


def test_a_missing_neighbour_makes_its_rows_inconclusive():
    items, results, _ = supported_sweep()
    rows = evaluate_neighbours(items, results[results["variant"] != "CHORD"], n_boot=N_BOOT)
    chord = [row for row in rows if "CHORD" in row.claim]
    assert len(chord) == 4 and all(row.verdict == INCONCLUSIVE and math.isnan(row.estimate) for row in chord)
    assert chord[0].detail == "no such variant: CHORD (the one paradigm-chord variant, or the one named 'CHORD')"
    assert all(row.verdict == SUPPORTED for row in rows if row not in chord)
