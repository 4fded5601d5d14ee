"""Shared fixtures: the small tiny-VLM spec and its checkpoint folder built once per test session (seconds), configs,
runs and sweep arguments of seconds-long training on it, and the environment the project's commands set (offline
wandb, Ray clusters of the tests' own, a stable DeepSpeed extension cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# every Ray cluster a test starts is its own: Ray's "auto" address joins any cluster running on the machine (another
# job's sweep), whose CPUs the test would then wait for (`experiments/sweep.py connect_ray`, `launcher.init_ray`)
os.environ["RAY_ADDRESS"] = "local"
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

SMALL_RUN = (
    "steps=2",
    "eval_every=0",
    "data.prompts_per_step=2",
    "objective.num_rollouts=2",
    "rollout.max_new_tokens=8",
    "rollout.eval_max_new_tokens=8",
    "deepspeed.enabled=false",
)
"""Experiment overrides of a seconds-long run: 2 steps of 2 prompts × 2 rollouts of at most 8 tokens, no evaluation
during training, plain torch. Overrides given after them win."""


@pytest.fixture(scope="session")
def small_spec():
    """A TinyVLMSpec of ~0.2M parameters (vocabulary 400): built in seconds, still Qwen2.5-VL's own classes."""
    from visurf_ray.models.tiny import TinyVLMSpec

    return TinyVLMSpec(
        text_hidden=64,
        text_layers=2,
        text_heads=2,
        text_kv_heads=1,
        text_mlp=128,
        vision_depth=1,
        vision_hidden=32,
        vision_heads=2,
        vision_mlp=64,
        vocab_size=400,
    )


@pytest.fixture(scope="session")
def small_policy_dir(tmp_path_factory, small_spec) -> Path:
    """A saved tiny Qwen2.5-VL of `small_spec` (random init) with a tokenizer trained on the benchmark's corpus."""
    from visurf_ray.data.benchmark import text_corpus
    from visurf_ray.models.tiny import build_tiny_vlm

    folder = tmp_path_factory.mktemp("small_policy")
    build_tiny_vlm(text_corpus(seed=0, n=200), small_spec, seed=0, out_dir=folder)
    return folder


@pytest.fixture(scope="session")
def small_run_overrides(small_policy_dir) -> list[str]:
    """The overrides (`key=value`, as experiments/train.py takes them) of a SMALL_RUN of the small policy."""
    return [f"model.path={small_policy_dir}", *SMALL_RUN]


@pytest.fixture
def small_run_config(small_run_overrides, tmp_path):
    """`make(*overrides, name="run")`: the ExperimentConfig of a SMALL_RUN of the small policy writing into
    `<tmp_path>/<name>`, with `overrides` applied last."""
    from visurf_ray.config import load_config

    def make(*overrides: str, name: str = "run"):
        return load_config(None, [f"name={name}", f"output_dir={tmp_path}", *small_run_overrides, *overrides])

    return make


@pytest.fixture
def small_run(small_run_config):
    """`train(*overrides)`: run `small_run_config` in this process (`LocalSession`, no Ray) with a checkpoint after
    every step and 2 grounding evaluation items, `overrides` last; returns the run folder."""
    from visurf_ray.train.launcher import run_dir
    from visurf_ray.train.loop import LocalSession, run_training

    def train(*overrides: str) -> Path:
        cfg = small_run_config(
            "checkpoint_every=1", "data.eval_size=2", "data.eval_splits=[eval/grounding]", "log_to=[]", *overrides
        )
        session = LocalSession(run_dir(cfg), verbose=False)
        run_training(cfg, session, scratch_dir=session.scratch_dir)
        return run_dir(cfg)

    return train


@pytest.fixture
def small_sweep_args(small_run_overrides, tmp_path):
    """`args(name, variants)`: experiments/sweep.py arguments of a one-seed sweep over `variants` (default RLVR and
    ViSurf) whose trials are SMALL_RUNs of the small policy, evaluated (4 items per set) and checkpointed after every
    step; results under `<tmp_path>/results`, Tune's folders under `<tmp_path>/runs`."""

    def args(name: str, variants: str = "{RLVR: {objective.paradigm: rlvr}, ViSurf: {objective.paradigm: visurf}}"):
        trial = [*small_run_overrides, "eval_every=1", "checkpoint_every=1", "data.eval_size=4"]
        return [
            f"name={name}",
            f"variants={variants}",
            "seeds=[0]",
            *(f"experiment.{override}" for override in trial),
            f"output_dir={tmp_path / 'results'}",
            f"storage_dir={tmp_path / 'runs'}",
        ]

    return args
