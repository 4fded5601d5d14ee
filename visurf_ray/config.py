"""One typed, validated configuration tree for a visurf_ray run: YAML files plus `key=value` overrides.

Each component has a dataclass; `ExperimentConfig` nests them. Unknown keys, wrong types and out-of-range values raise
`ConfigError` naming the dotted field (e.g. `objective.num_rollouts`). Imports neither Ray nor transformers.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from visurf_ray.objectives.paradigms import ObjectiveConfig
from visurf_ray.validation import ValidationError, check_choice, check_int, check_number, require


class ConfigError(ValidationError):
    """A configuration value is unknown, of the wrong type or out of range; the message names the dotted field."""


TINY_BASE_MODEL = "tiny-base"  # the embedded tiny base model, built and pretrained on first use (experiments/)


@dataclass(frozen=True)
class ModelConfig:
    path: str = TINY_BASE_MODEL  # a local checkpoint folder, or "tiny-base"
    dtype: str = "auto"  # auto: bf16 on CUDA, float32 on CPU
    gradient_checkpointing: bool = False
    # sha256 the checkpoint's weight files must have (`visurf_ray.train.pretrain.weights_sha256`), or "" for any: the
    # sweep sets the driver's tiny base model's, so trials on a node whose CPU builds other bits stop with an error
    weights_sha256: str = ""

    def __post_init__(self):
        check_choice("model.dtype", self.dtype, ("auto", "float32", "bfloat16", "float16"), error=ConfigError)
        require(
            self.path, "model.path", f"must be a checkpoint folder or 'tiny-base', got {self.path!r}", error=ConfigError
        )
        require(
            self.weights_sha256 == "" or re.fullmatch(r"[0-9a-f]{64}", self.weights_sha256) is not None,
            "model.weights_sha256",
            f"must be 64 lowercase hex digits or empty, got {self.weights_sha256!r}",
            error=ConfigError,
        )


@dataclass(frozen=True)
class DataConfig:
    train_split: str = "posttrain"  # a benchmark split name, or a local .parquet/.jsonl file in the ViSurf format
    eval_splits: tuple[str, ...] = ("eval/grounding", "eval/gui_point", "eval/anomaly", "retained/count")
    eval_size: int = 64  # items per slice of each benchmark eval split (`benchmark.split_slices`)
    prompts_per_step: int = 8  # global batch of prompts per optimizer step (split across workers)
    # pixels: every image resized to image_side × image_side before the model sees it (the authors' 840), answers
    # scored in each image's own frame at evaluation (visurf_ray/data/frames.py); 0 keeps each image's own size
    image_side: int = 0

    def __post_init__(self):
        check_int("data.prompts_per_step", self.prompts_per_step, low=1, error=ConfigError)
        check_int(
            "data.image_side", self.image_side, low=0, note="(pixels; 0 keeps each image's size)", error=ConfigError
        )
        check_int("data.eval_size", self.eval_size, low=1, error=ConfigError)


@dataclass(frozen=True)
class RolloutConfig:
    backend: str = "hf"  # hf | vllm
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 48
    eval_max_new_tokens: int = 48
    vllm_kv_cache_bytes: int = 1 << 30  # vLLM's KV cache in bytes (kv_cache_memory_bytes; same meaning on CPU and GPU)
    vllm_max_model_len: int = 0  # prompt + completion tokens per sequence; 0: the model's maximum
    old_logp: str = "trainer"  # π_old: the trainer's log-probs (verl's, EasyR1's) | engine: vLLM's (hf: always trainer)

    def __post_init__(self):
        check_choice("rollout.backend", self.backend, ("hf", "vllm"), error=ConfigError)
        check_number("rollout.temperature", self.temperature, low=0, low_open=True, error=ConfigError)
        check_number("rollout.top_p", self.top_p, low=0, high=1, low_open=True, error=ConfigError)
        check_int("rollout.max_new_tokens", self.max_new_tokens, low=1, error=ConfigError)
        check_int("rollout.eval_max_new_tokens", self.eval_max_new_tokens, low=1, error=ConfigError)
        check_int("rollout.vllm_kv_cache_bytes", self.vllm_kv_cache_bytes, low=1, note="(bytes)", error=ConfigError)
        check_int("rollout.vllm_max_model_len", self.vllm_max_model_len, low=0, error=ConfigError)
        check_choice("rollout.old_logp", self.old_logp, ("trainer", "engine"), error=ConfigError)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine: decay to 10% of lr at the last step; constant: the paper's (after warmup)
    max_grad_norm: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    micro_batches: int = 1  # forward/backward passes per optimizer step (prompt-aligned chunks of the members)

    def __post_init__(self):
        check_int("optim.micro_batches", self.micro_batches, low=1, error=ConfigError)
        check_number("optim.lr", self.lr, low=0, low_open=True, error=ConfigError)
        check_number("optim.weight_decay", self.weight_decay, low=0, error=ConfigError)
        check_int("optim.warmup_steps", self.warmup_steps, low=0, error=ConfigError)
        check_choice("optim.schedule", self.schedule, ("cosine", "constant"), error=ConfigError)
        # finite=False: an infinite max_grad_norm (no clipping) stays accepted, as before
        check_number("optim.max_grad_norm", self.max_grad_norm, low=0, low_open=True, finite=False, error=ConfigError)


@dataclass(frozen=True)
class DeepSpeedConfig:
    enabled: bool = True
    zero_stage: int = 2
    bf16: str = "auto"  # auto: on with CUDA, off on CPU; "true" / "false" force it
    reduce_bucket_size: int = 50_000_000

    def __post_init__(self):
        check_choice("deepspeed.zero_stage", self.zero_stage, (0, 1, 2, 3), error=ConfigError)
        check_choice("deepspeed.bf16", self.bf16, ("auto", "true", "false"), error=ConfigError)


@dataclass(frozen=True)
class RayConfig:
    num_workers: int = 0  # 0: run the loop in this process, without Ray
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 0
    address: str = ""  # "" starts a local cluster on 127.0.0.1 (or joins RAY_ADDRESS); "auto" joins a running one

    def __post_init__(self):
        check_int("ray.num_workers", self.num_workers, low=0, error=ConfigError)
        check_number("ray.cpus_per_worker", self.cpus_per_worker, low=0, low_open=True, error=ConfigError)
        check_int("ray.max_failures", self.max_failures, low=-1, error=ConfigError)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "visurf"
    seed: int = 0
    steps: int = 20  # optimizer steps (the same budget for every paradigm)
    eval_every: int = 10  # 0 disables periodic evaluation (a final one still runs)
    checkpoint_every: int = 10  # 0 disables checkpoints
    output_dir: str = "runs"
    log_to: tuple[str, ...] = ("stdout", "tensorboard")  # any of stdout, tensorboard, wandb
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        check_int("steps", self.steps, low=1, error=ConfigError)
        check_int("eval_every", self.eval_every, low=0, error=ConfigError)
        check_int("checkpoint_every", self.checkpoint_every, low=0, error=ConfigError)
        per_worker = self.data.prompts_per_step // max(1, self.ray.num_workers)
        require(
            self.data.prompts_per_step % max(1, self.ray.num_workers) == 0,
            "data.prompts_per_step",
            f"must be divisible by ray.num_workers={self.ray.num_workers}, got {self.data.prompts_per_step}",
            error=ConfigError,
        )
        require(
            self.optim.micro_batches <= per_worker,
            "optim.micro_batches",
            f"must be <= prompts per worker ({per_worker}), got {self.optim.micro_batches}",
            error=ConfigError,
        )
        for sink in self.log_to:
            check_choice("log_to", sink, ("stdout", "tensorboard", "wandb"), error=ConfigError)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists) that `config_from_dict` turns back into the same config."""
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    return value


def config_from_dict(values: dict[str, Any], cls: type = ExperimentConfig, prefix: str = "") -> Any:
    """Build `cls` from a nested dict, converting YAML scalars to the declared field types.

    Raises ConfigError naming the dotted key for unknown keys, wrong types and invalid values.
    """
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r}; known keys here: {', '.join(sorted(fields))}")
        kwargs[key] = _convert(value, hints[key], dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as err:  # component configs (e.g. ObjectiveConfig) name their field already
        raise ConfigError(f"{prefix}{err}" if prefix and not str(err).startswith(prefix) else str(err)) from err


def _convert(value: Any, hint: Any, dotted: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return config_from_dict(value, hint, f"{dotted}.")
    origin = typing.get_origin(hint)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{dotted} must be a list, got {value!r}")
        args = typing.get_args(hint)
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ConfigError(f"{dotted} must be a list of {len(item_types)} items, got {value!r}")
        return tuple(_convert(v, t, f"{dotted}[{i}]") for i, (v, t) in enumerate(zip(value, item_types)))
    if origin in (typing.Union, types.UnionType):
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{dotted} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{dotted} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{dotted} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{dotted} must be a string, got {value!r}")
        return value
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`objective.num_rollouts=8` -> (["objective", "num_rollouts"], 8); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def merge(base: dict[str, Any], keys: list[str], value: Any) -> dict[str, Any]:
    """Return a copy of nested dict `base` with `value` set at the dotted path `keys`."""
    merged = dict(base)
    if len(keys) == 1:
        merged[keys[0]] = value
    else:
        child = merged.get(keys[0], {})
        if not isinstance(child, dict):
            raise ConfigError(f"{keys[0]!r} is not a section; cannot set {'.'.join(keys)}")
        merged[keys[0]] = merge(child, keys[1:], value)
    return merged


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML config (or the defaults when `path` is None) and apply `key=value` overrides in order."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        values = merge(values, keys, value)
    return config_from_dict(values)


def check_paths(cfg: ExperimentConfig) -> None:
    """Checks that need the filesystem, made when a run starts (shipped GPU configs name folders that exist only on
    the cluster): the model folder and local data files must exist."""
    if cfg.model.path != TINY_BASE_MODEL and not Path(cfg.model.path).is_dir():
        raise ConfigError(f"model.path={cfg.model.path!r} is not a folder: expected a local checkpoint or 'tiny-base'")
    for key, names in (("data.train_split", [cfg.data.train_split]), ("data.eval_splits", cfg.data.eval_splits)):
        for name in names:
            file = name.removeprefix("grefcoco:")
            if (name.startswith("grefcoco:") or Path(file).suffix in (".parquet", ".jsonl")) and not Path(
                file
            ).is_file():
                raise ConfigError(f"{key} names the file {file!r}, which does not exist")
