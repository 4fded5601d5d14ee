"""The analysis notebooks run top to bottom in a fresh kernel against artefacts made here (a short LocalSession run; a
synthetic sweep results folder written by `analysis.results`), and are stored without outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "analysis" / "notebooks"


def execute(name: str):
    """Run notebook `name` in a fresh python3 kernel started in the notebooks folder; returns the executed notebook."""
    import nbclient
    import nbformat

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    return client.execute()


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def images(notebook) -> int:
    return sum("image/png" in output.get("data", {}) for cell in code_cells(notebook) for output in cell.outputs)


@pytest.mark.parametrize("name", ["gradients.ipynb", "sweep_results.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
    import nbformat

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    code = code_cells(notebook)
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


def test_gradients_notebook_runs_on_a_training_run(small_run, monkeypatch):
    monkeypatch.setenv("VISURF_CHECKPOINT", str(small_run()))
    monkeypatch.setenv("VISURF_PROMPTS", "1")
    monkeypatch.setenv("VISURF_MAX_NEW_TOKENS", "8")

    notebook = execute("gradients.ipynb")
    assert images(notebook) == 3  # residuals, label share, cosines
    printed = "".join(
        o.get("text", "") for cell in code_cells(notebook) for o in cell.outputs if o.output_type == "stream"
    )
    assert "all-fail Â_y" in printed


def synthetic_items(rng, trial_id: str, variant: str, paradigm: str, seed: int, eval_splits) -> pd.DataFrame:
    """Per-item rows at steps 0 and 3 of every eval set, with each task's slices and seeded random 0/1 values."""
    from analysis.results import tidy_items
    from visurf_ray.data.benchmark import KINDS, split_mix, split_slices

    rows = []
    for split in eval_splits:
        task = KINDS[next(iter(split_mix(split).kinds))].task
        for slice_ in split_slices(split):
            for number in range(6):
                for step in (0, 3):
                    values = {k: float(rng.integers(2)) for k in ("thinking_format", "non_repeat", "answer_format")}
                    values |= {
                        k: float(rng.integers(2)) for k in ("accuracy", "success", "strict_format", "multi_block")
                    }
                    values["overall"] = sum(values[k] for k in ("thinking_format", "non_repeat", "answer_format"))
                    values |= (
                        {"iou": rng.random(), "empty": float(rng.integers(2)), "logp_empty": -10 * rng.random()}
                        if task == "grounding"
                        else {}
                    )
                    values |= {"hit": float(rng.integers(2))} if task == "gui_point" else {}
                    values |= {"correct": float(rng.integers(2))} if task in ("anomaly", "count") else {}
                    item_id = f"{split}/{slice_}/{number}"
                    rows.append({"step": step, "eval_set": split.removeprefix("eval/"), "item_id": item_id,
                                 "task": task, "slice": slice_, **values})  # fmt: skip
    return tidy_items(trial_id, variant, paradigm, seed, rows)


def synthetic_results(out_dir: Path) -> None:
    """results, history and items tables of the embedded tiny sweep's variants × 2 seeds, with seeded random
    metrics, written by `analysis.results` as `experiments/sweep.py` writes them."""
    from analysis.results import CURVES, tidy_history, tidy_trial, write_tables
    from visurf_ray.sweep import load_sweep

    sweep = load_sweep(ROOT / "experiments" / "configs" / "sweep_tiny.yaml")
    rng = np.random.default_rng(0)
    results, histories, items = [], [], []
    for number, (variant, seed) in enumerate((v, s) for v in sweep.variants for s in (0, 1)):
        config = sweep.trial_config({"variant": variant, "seed": seed})
        metrics = {"eval/mean_score": float(rng.random())}
        for eval_set in config.data.eval_splits:
            label = eval_set.removeprefix("eval/")
            metrics |= {f"eval/{label}/{m}": float(rng.random()) for m in ("score", "success_rate")}
        metrics["eval/grounding/n_acc"] = float(rng.random())
        trial_id = f"trial_{number:02d}"
        results.append(tidy_trial(trial_id, variant, config.to_dict(), metrics))
        steps = pd.DataFrame(
            {"step": [1.0, 2.0, 3.0], "step_time": 1 + rng.random(3), **{c: rng.random(3) for c in CURVES}}
        ).assign(prompts_seen=lambda h: h["step"] * 8, train_time_total=1.0, eval_time_total=1.0)
        steps["generated_tokens_total"] = 5.0
        histories.append(tidy_history(trial_id, variant, seed, steps))
        paradigm = config.objective.paradigm
        items.append(synthetic_items(rng, trial_id, variant, paradigm, seed, config.data.eval_splits))
    tables = {"results": results, "history": histories, "items": items}
    write_tables({name: pd.concat(frames, ignore_index=True) for name, frames in tables.items()}, out_dir)


def test_sweep_results_notebook_runs_on_a_results_folder(tmp_path, monkeypatch):
    out_dir = tmp_path / "results" / "tiny-visurf-sweep"
    synthetic_results(out_dir)
    monkeypatch.setenv("VISURF_RESULTS_DIR", str(out_dir))

    notebook = execute("sweep_results.ipynb")
    assert images(notebook) == 3  # task bars, ablation bars, curves
    outputs = [output.get("data", {}) for cell in code_cells(notebook) for output in cell.outputs]
    tables = [data["text/html"] for data in outputs if "text/html" in data]
    assert any("ViSurf-no-smoothing" in table and "ViSurf" in table for table in tables)
    assert any("ViSurf − RLVR" in table for table in tables)  # the paired table
    markdown = [data["text/markdown"] for data in outputs if "text/markdown" in data]
    assert any("supported" in text or "inconclusive" in text or "contradicted" in text for text in markdown)


def test_sweep_report_prints_intervals_paired_differences_claims_and_budgets(tmp_path):
    from analysis.report import sweep_report
    from analysis.results import load_history, load_items, load_results, tidy_items

    synthetic_results(tmp_path)
    history = load_history(tmp_path)
    items = load_items(tmp_path)
    items["content"] = items["item_id"].where(items["slice"] != "empty_image", "background")  # one repeated item
    results = load_results(tmp_path)
    assert "Starting checkpoint: tiny-base (weights sha256 not recorded)." in sweep_report(
        results, history, items, n_boot=20
    )
    results["config/model.weights_sha256"] = "ab" * 32  # as the sweep records the tiny base model it built
    report = sweep_report(results, history, items, n_boot=200)
    assert f"Starting checkpoint: tiny-base (weights sha256 {'ab' * 32})." in report
    sections = ("## Scores", "## ViSurf − X", "## By eval step", "## log π(`[]`) by eval step", "## The paper's claims")
    sections += ("## ViSurf vs its single-",)
    for section in (*sections, "## What each variant was given"):
        assert section in report
    assert "| ViSurf beats LUFFY on mean | ViSurf − LUFFY: mean/score |" in report and "ViSurf − CHORD" in report
    assert "grounding/n_acc" in report and "N-Acc interval half-width" in report and "| SFT-RLVR |" in report
    assert "retained/count/score_change" in report and "50%" in report  # eval share of 1 s + 1 s
    assert "| ViSurf, step 0 |" in report and "| ViSurf, step 3 |" in report
    assert "grounding/empty_image 6 (1 distinct);" in report and "grounding/no_object 6;" in report

    assert "| ViSurf, step 3 |" in report.partition("## log π(`[]`) by eval step")[2]  # the log π(`[]`) table

    row = {"step": 0, "eval_set": "count", "item_id": "a", "task": "count", "slice": "all"}
    resumed = tidy_items("t", "SFT", "sft", 0, [row | {"correct": 0.0}, row | {"correct": 1.0}])
    assert len(resumed) == 1 and resumed["correct"].item() == 1.0  # a resumed trial's repeated row: the last counts
    assert list(resumed.columns[:4]) == ["trial_id", "variant", "paradigm", "seed"]


def test_report_command_rewrites_a_sweeps_summary_from_its_tables(tmp_path, capsys):
    from analysis.report import SUMMARY_FILE, main, sweep_report
    from analysis.results import load_history, load_items, load_results

    folder = tmp_path / "my-sweep"
    synthetic_results(folder)
    (folder / SUMMARY_FILE).write_text("# my-sweep\n\nan older report\n")
    main([str(folder)])
    assert capsys.readouterr().out.strip() == str(folder / SUMMARY_FILE)
    report = sweep_report(load_results(folder), load_history(folder), load_items(folder))
    assert (folder / SUMMARY_FILE).read_text() == f"# my-sweep\n\n{report}"
    assert sorted(path.name for path in folder.iterdir() if path.name.startswith(".")) == []  # no temporary left
    with pytest.raises(FileNotFoundError, match="results.parquet"):
        main([str(tmp_path / "missing")])


def test_budget_table_gives_each_variants_cpu_seconds_per_wall_second_when_recorded():
    from analysis.report import budget_table

    def trial(trial_id, variant, step_time, step_cpu_time):
        return pd.DataFrame(
            {
                "trial_id": trial_id,
                "variant": variant,
                "step": [1.0, 2.0],
                "prompts_seen": [8.0, 16.0],
                "generated_tokens_total": [5.0, 10.0],
                "train_time_total": [step_time, 2 * step_time],
                "eval_time_total": 1.0,
                "step_time": step_time,
                "step_cpu_time": step_cpu_time,
            }
        )

    history = pd.concat(
        [trial("a", "RLVR", 2.0, 1.0), trial("b", "RLVR", 2.0, 2.0), trial("c", "ViSurf", 1.0, 1.0)],
        ignore_index=True,
    )
    results = pd.DataFrame({"variant": ["RLVR", "ViSurf"], "paradigm": ["rlvr", "visurf"]})
    table = budget_table(results, history)
    assert table["CPU/wall"].tolist() == ["0.75", "1.00"]  # RLVR: one trial had half a core (0.5), one a whole
    assert table["train s"].tolist() == ["4.0", "2.0"] and table["eval share"].tolist() == ["20%", "33%"]
    assert "CPU/wall" not in budget_table(results, history.drop(columns="step_cpu_time"))  # older sweeps' tables
    history.loc[history["trial_id"] == "c", "step_cpu_time"] = np.nan  # a trial run before the metric existed
    assert budget_table(results, history)["CPU/wall"].tolist() == ["0.75", "nan"]
