"""Shared fixtures: a small tiny-VLM checkpoint folder built once per test session (seconds), and the environment the
project's commands set (offline wandb, local-only Ray, a stable DeepSpeed extension cache)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def small_policy_dir(tmp_path_factory) -> Path:
    """A saved tiny Qwen2.5-VL (random init, ~0.2M parameters) with a tokenizer trained on the benchmark's corpus."""
    from visurf_ray.data.benchmark import text_corpus
    from visurf_ray.models.tiny import TinyVLMSpec, build_tiny_vlm

    spec = TinyVLMSpec(
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
    folder = tmp_path_factory.mktemp("small_policy")
    build_tiny_vlm(text_corpus(seed=0, n=200), spec, seed=0, out_dir=folder)
    return folder
