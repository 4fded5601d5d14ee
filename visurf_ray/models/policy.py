"""The policy object (a Qwen2.5-VL model and its processor) and the one loader for tiny and real checkpoint folders.

A folder written by `Policy.save_pretrained` (the tiny model) and a downloaded Qwen2.5-VL checkpoint load through the
same `load_policy`. Imports torch and transformers; never Ray.
"""

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import SafetensorError
from transformers import (
    AutoProcessor,
    PreTrainedTokenizerBase,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRMSNorm

from visurf_ray.models.processor import ImageOnlyQwenVLProcessor
from visurf_ray.models.vision_attention import batch_vision_windows
from visurf_ray.validation import ValidationError

logger = logging.getLogger(__name__)

MODEL_TYPE = "qwen2_5_vl"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
PROCESSOR_CONFIG_FILES = ("processor_config.json", "preprocessor_config.json")
VIDEO_PROCESSOR_CONFIG = "video_preprocessor_config.json"
VIDEO_PROCESSOR_TYPE = "Qwen2VLVideoProcessor"


@dataclass
class Policy:
    """A Qwen2.5-VL model with the processor that turns (image, text) into its inputs."""

    model: Qwen2_5_VLForConditionalGeneration
    processor: ProcessorMixin

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def save_pretrained(self, path: str | Path) -> Path:
        """Write model weights, config, generation config, processor, tokenizer and chat template to `path`, and a
        video processor config with the image processor's settings: vLLM (and `AutoProcessor` where torchvision is
        installed) loads the stock Qwen2.5-VL processor, which needs one; the folder then loads in vLLM as it is."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)
        video = {
            key: value
            for key, value in self.processor.image_processor.to_dict().items()
            if key != "image_processor_type"
        }
        video["video_processor_type"] = VIDEO_PROCESSOR_TYPE
        (path / VIDEO_PROCESSOR_CONFIG).write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")
        return path


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValidationError(f"{what} {path} is not valid JSON: {error}") from error


def _saved_processor_class(folder: Path) -> str | None:
    """The `processor_class` a folder's processor config names, or None."""
    for name in PROCESSOR_CONFIG_FILES:
        if (folder / name).is_file():
            processor_class = _read_json(folder / name, "processor config").get("processor_class")
            if processor_class is not None:
                return processor_class
    return None


def _load_processor(folder: Path) -> ProcessorMixin:
    if _saved_processor_class(folder) == ImageOnlyQwenVLProcessor.__name__:
        return ImageOnlyQwenVLProcessor.from_pretrained(folder)
    try:
        return AutoProcessor.from_pretrained(folder)
    except ImportError as error:
        # The stock Qwen2.5-VL processor also builds a video processor, which needs torchvision; images suffice here.
        logger.warning("%s: stock processor unavailable (%s); loading the image-only processor", folder, error)
        return ImageOnlyQwenVLProcessor.from_pretrained(folder)


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_policy(
    path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None
) -> Policy:
    """Load a Qwen2.5-VL policy (tiny folder or real checkpoint) from a local folder.

    Args:
        path: folder with config.json (model_type "qwen2_5_vl"), weights (safetensors or .bin, single or sharded),
            a processor config and tokenizer files.
        dtype: parameter dtype; default bfloat16 on CUDA, float32 on CPU.
        device: where to put the model; default CUDA when available, else CPU.

    Raises:
        FileNotFoundError: the folder, its config.json or its weight files are missing.
        ValueError: config.json is not valid JSON or is another model type; the weights are unreadable or do not
            cover the model's parameters.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"policy folder {folder} does not exist or is not a directory")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"policy folder {folder} has no config.json")
    model_type = _read_json(config_file, "config").get("model_type")
    if model_type != MODEL_TYPE:
        raise ValidationError(f"{config_file} has model_type {model_type!r}; load_policy loads {MODEL_TYPE!r} only")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise FileNotFoundError(f"policy folder {folder} has no weights (expected one of {', '.join(WEIGHT_FILES)})")

    device = torch.device(device) if device is not None else default_device()
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        # with output_loading_info transformers returns (model, info), though it types the call as the model alone
        model, loading_info = cast(
            tuple[Qwen2_5_VLForConditionalGeneration, dict[str, Any]],
            Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, dtype=dtype, output_loading_info=True),
        )
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:
        raise ValidationError(f"could not read the weights in {folder}: {error}") from error
    incomplete = {key: loading_info[key] for key in ("missing_keys", "mismatched_keys") if loading_info.get(key)}
    if incomplete:
        raise ValidationError(f"weights in {folder} do not match the model: {incomplete}")
    # transformers' decorator on PreTrainedModel.to hides its signature from mypy
    model = batch_vision_windows(model).to(device)  # type: ignore[arg-type]
    return Policy(model=model, processor=_load_processor(folder))


def use_input_dtype_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every Qwen2.5-VL RMSNorm of `model` (in place) by a `torch.nn.RMSNorm` sharing its weight: the same
    function, computed in the input's dtype. transformers' RMSNorm computes in float32 whatever the model's dtype,
    which rounds every gradient passing through it to float32; float64 identity checks need this swap (residuals
    ~1e-13 instead of ~4e-8). Returns `model`."""
    for name, module in list(model.named_modules()):
        if isinstance(module, Qwen2_5_VLRMSNorm):
            norm = torch.nn.RMSNorm(module.weight.shape, eps=module.variance_epsilon, dtype=module.weight.dtype)
            norm.weight = module.weight
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, norm)
    return model
