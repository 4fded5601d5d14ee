"""Qwen2.5-VL processor with the image processor and tokenizer only (no video processor, so no torchvision).

Saved folders name this class in `processor_config.json`; `load_policy` reads that name and loads it back with
`ImageOnlyQwenVLProcessor.from_pretrained`. Imports transformers' processor classes only; never Ray, never model code.
"""

from transformers import Qwen2_5_VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from visurf_ray.validation import ValidationError

TEMPORAL_PATCH_SIZE = 2  # Qwen2-VL repeats a still image over two frames


class ImageOnlyQwenVLProcessor(Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` whose sub-processors are `image_processor` and `tokenizer`; images only, no videos."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


def build_image_processor(*, image_size: int, patch_size: int, merge_size: int) -> Qwen2VLImageProcessorPil:
    """Qwen2-VL PIL image processor that resizes every image to about `image_size`² pixels.

    Args:
        image_size: side in pixels of the square image the model sees; a multiple of `patch_size * merge_size`.
        patch_size: vision patch side in pixels.
        merge_size: patches merged per side into one language-model token.

    An `image_size`×`image_size` image becomes (image_size / patch_size)² patches and that / merge_size² image tokens.
    """
    factor = patch_size * merge_size
    if image_size <= 0 or image_size % factor:
        raise ValidationError(
            f"image_size must be a positive multiple of patch_size * merge_size = {factor}, got {image_size}"
        )
    return Qwen2VLImageProcessorPil(
        min_pixels=factor * factor,
        max_pixels=image_size * image_size,
        patch_size=patch_size,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=merge_size,
    )
