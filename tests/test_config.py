"""Config tree: YAML + overrides, and errors that name the offending field."""

from __future__ import annotations

from pathlib import Path

import pytest

from visurf_ray.config import ConfigError, ExperimentConfig, check_paths, config_from_dict, load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "experiments" / "configs"
CONFIGS = sorted(p for p in CONFIG_DIR.glob("*.yaml") if not p.name.startswith("sweep_"))
SWEEPS = sorted(CONFIG_DIR.glob("sweep_*.yaml"))


def test_defaults_round_trip_through_a_plain_dict():
    cfg = ExperimentConfig()
    assert config_from_dict(cfg.to_dict()) == cfg


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        None,
        [
            "objective.num_rollouts=4",
            "objective.smoothing=false",
            "optim.lr=3e-4",
            "data.eval_splits=[eval/grounding]",
            "log_to=stdout,tensorboard",
        ],
    )
    assert cfg.objective.num_rollouts == 4 and cfg.objective.smoothing is False
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.data.eval_splits == ("eval/grounding",)
    assert cfg.log_to == ("stdout", "tensorboard")


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("objective.paradigm=ppo", "paradigm"),
        ("objective.num_rollouts=1", "objective.num_rollouts"),
        ("objective.clip_low=1.5", "clip_low"),
        ("objective.clip_high=-0.1", "clip_high"),
        ("objective.agg=mean", "agg"),
        ("objective.num_rollouts=two", "objective.num_rollouts"),
        ("optim.lr=0", "optim.lr"),
        ("optim.schedule=linear", "optim.schedule"),
        ("steps=0", "steps"),
        ("rollout.backend=sglang", "rollout.backend"),
        ("rollout.old_logp=vllm", "rollout.old_logp"),
        ("rollout.vllm_kv_cache_bytes=0", "rollout.vllm_kv_cache_bytes"),
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage"),
        ("objective.smothing=true", "objective.smothing"),
        ("data.prompts_per_step=3", "data.prompts_per_step"),
        ("log_to=screen", "log_to"),
        ("model.weights_sha256=85e64743", "model.weights_sha256"),
    ],
)
def test_bad_values_name_their_field(override, field):
    overrides = [override, "ray.num_workers=2"] if override.startswith("data.prompts_per_step") else [override]
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


def test_missing_checkpoint_and_data_files_are_named_at_launch(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.path"):
        check_paths(load_config(None, [f"model.path={tmp_path / 'nowhere'}"]))
    with pytest.raises(ConfigError, match=r"data\.train_split"):
        check_paths(load_config(None, [f"data.train_split={tmp_path / 'rows.parquet'}"]))
    with pytest.raises(ConfigError, match=r"data\.eval_splits"):
        check_paths(load_config(None, [f"data.eval_splits=[grefcoco:{tmp_path / 'g.jsonl'}]"]))


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.steps >= 1


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_shipped_sweeps_validate(path):
    from visurf_ray.sweep import load_sweep

    assert load_sweep(path).variants
