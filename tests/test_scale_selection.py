"""Tests of the scale experiment's driver (experiments/scale_selection.py) on CPU: a variant trains, is checked and
tabulated end to end at a small spec; the budget's step count; the variants are valid models; the deadline stops
unfinished workers and says so."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from experiments.scale_selection import (
    DECIDING_COLUMNS,
    RESULT_FILE,
    SMOKE_STEPS,
    VARIANTS,
    Variant,
    budget_steps,
    main,
    run_variant,
    summary_table,
)


def test_a_smoke_variant_trains_runs_the_perception_checks_and_tabulates(tmp_path, small_spec):
    args = argparse.Namespace(
        device="cpu", smoke=True, threads=1, per_class=10, per_look=5, train_budget_s=1.0, out=tmp_path
    )
    result = run_variant("small", Variant(spec=asdict(small_spec), batch_size=4), args)
    assert result["steps"] == SMOKE_STEPS and result["pretrain_report"]["config"]["steps"] == SMOKE_STEPS
    assert result["pretrain_report"]["device"] == "cpu" and result["seconds_per_step"] > 0
    assert set(DECIDING_COLUMNS) <= set(result["checks"])
    values = {name: result["checks"][name]["value"] for name in DECIDING_COLUMNS}
    assert values["query_binding"] is None  # 16 tokens of a 30-step model hold no box: no answer finds an object
    assert all(0.0 <= value <= 1.0 for name, value in values.items() if name != "query_binding")
    assert json.loads((tmp_path / "small" / RESULT_FILE).read_text()) == json.loads(json.dumps(result))
    header, row = summary_table([result]).splitlines()
    assert header.split(" | ")[:3] == ["variant", "params", "steps"] and row.startswith(
        f"small | {result['parameters']:,} | 30 |"
    )


def test_budget_steps_round_down_to_hundreds_and_cover_the_curriculum():
    assert budget_steps(300.0, 0.07, 520) == 4200  # 4,285 steps fit
    assert budget_steps(300.0, 0.5, 520) == 620  # 600 fit: the curriculum and 100 whole-mix steps at least


def test_every_variant_is_a_valid_model_with_head_dim_64():
    from visurf_ray.models.tiny import TinyVLMSpec

    assert VARIANTS["recipe"] == Variant(steps=1100)
    for variant in VARIANTS.values():
        assert TinyVLMSpec(**variant.spec).head_dim == 64


def test_the_deadline_stops_unfinished_variants_and_reports_them(tmp_path, capsys):
    results = main(["--device", "cpu", "--smoke", "--out", str(tmp_path), "--variants", "recipe", "--deadline-s", "0"])
    assert results == []
    printed = capsys.readouterr().out
    assert (
        "recipe: exit code -9" in printed
        and "unfinished (killed at the deadline or failed; see their logs): recipe" in printed
    )
    assert json.loads((tmp_path / "variants.json").read_text()) == {"recipe": asdict(VARIANTS["recipe"])}
    assert (tmp_path / "summary.md").read_text().startswith("variant | params")
